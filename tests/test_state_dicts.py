"""Every upstream model id builds with exactly upstream's state-dict keys, shapes and
param/buffer kinds (so official checkpoints load with strict=True)."""
import pytest

from configs.default import DefaultEngineConfig
from networks.models import build_vos_model
from tests.conftest import shared_path
from tests.golden_weights import read_keyfile

UPSTREAM_IDS = ['aott', 'aots', 'aotb', 'aotl', 'r50_aotl', 'r101_aotl', 'swinb_aotl',
                'deaott', 'deaots', 'deaotb', 'deaotl', 'r50_deaotl', 'swinb_deaotl']


def upstream_param_counts():
    """Parameter counts per model id from the fixture's README table (counted by running
    upstream's code, ../shared/reference/state_dicts/README.md), not typed in here."""
    counts = {}
    with open(shared_path('reference', 'state_dicts', 'README.md')) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            if len(cells) == 3 and cells[2].replace(',', '').isdigit():
                counts[cells[0]] = int(cells[2].replace(',', ''))
    return counts


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
    n_params = sum(p.numel() for p in model.parameters())
    n_listed = 0
    for _, shape, kind in expected:
        if kind == 'param':
            size = 1
            for d in shape:
                size *= int(d)
            n_listed += size
    assert n_params == n_listed == upstream_param_counts()[model_id]
