"""Model-level taps of golden/encoders.npz: projected 16x map, ID embedding, sine
position embedding, for the MobileNetV2 (deaott) and ResNet-50 (r50_deaotl) models."""
import numpy as np
import pytest
import torch

from networks.engines.identity import one_hot_mask
from tests.golden_engine import build_recipe_model, golden


@pytest.mark.parametrize('model_id,enc', [('deaott', 'mobilenetv2'), ('r50_deaotl', 'resnet50')])
def test_projection_id_and_position_embeddings(model_id, enc):
    f = golden('encoders.npz')
    _, model = build_recipe_model(model_id)
    img = torch.from_numpy(f['image_ac'])[None]
    label = torch.from_numpy(f['label_ac'].astype(np.float32))[None, None]
    with torch.no_grad():
        proj = model.encode_image(img)[-1]
        id_emb = model.get_id_emb(one_hot_mask(label, 10))
        pos = model.get_pos_emb(proj)
    np.testing.assert_allclose(proj[0].numpy(), f[f'{enc}_proj16'], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(id_emb[0].numpy(), f[f'{enc}_id_emb'], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pos[0].numpy(), f['pos_emb_ac'], atol=1e-5, rtol=1e-5)
