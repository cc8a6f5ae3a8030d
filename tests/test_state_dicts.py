"""Every upstream model id builds with exactly upstream's state-dict keys, shapes and
param/buffer kinds (so official checkpoints load with strict=True)."""
import pytest

from configs.default import DefaultEngineConfig
from networks.models import build_vos_model
from tests.conftest import shared_path
from tests.golden_weights import read_keyfile

UPSTREAM_IDS = ['aott', 'aots', 'aotb', 'aotl', 'r50_aotl', 'r101_aotl', 'swinb_aotl',
                'deaott', 'deaots', 'deaotb', 'deaotl', 'r50_deaotl', 'swinb_deaotl']
PARAMS = {'aott': 5734099, 'aots': 6998235, 'aotb': 8262371, 'aotl': 8262371,
          'r50_aotl': 14909923, 'r101_aotl': 33849827, 'swinb_aotl': 65398683,
          'deaott': 7238188, 'deaots': 10202765, 'deaotb': 13167342, 'deaotl': 13167342,
          'r50_deaotl': 19814894, 'swinb_deaotl': 70303654}


@pytest.mark.parametrize('model_id', UPSTREAM_IDS)
def test_state_dict_matches_upstream(model_id):
    path = shared_path('reference', 'state_dicts', f'sd_{model_id}.txt')
    expected = read_keyfile(path)
    cfg = DefaultEngineConfig('t', model_id)
    model = build_vos_model(cfg.MODEL_VOS, cfg)
    sd = model.state_dict()
    assert list(sd) == [k for k, *_ in expected]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, shape, kind in expected:
        assert tuple(sd[key].shape) == tuple(shape), key
        assert key in (params if kind == 'param' else buffers), (key, kind)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[model_id]
