"""``utils.device``: precision names resolve to the dtype they say, and bf16 on a CPU that
emulates it warns (the run would be several times slower than fp32) without stopping."""
import warnings

import pytest
import torch

import utils.device as device_mod
from utils.device import SlowPrecisionWarning, resolve_precision


@pytest.mark.parametrize('name, dtype', [('fp32', torch.float32), ('float32', torch.float32),
                                         ('bf16', torch.bfloat16), ('BFloat16', torch.bfloat16),
                                         ('fp16', torch.float16), ('half', torch.float16)])
def test_names_resolve(monkeypatch, name, dtype):
    monkeypatch.setattr(device_mod, 'cpu_has_native_bf16', lambda: True)
    assert resolve_precision(name) == dtype


def test_amp_picks_the_device_default(monkeypatch):
    monkeypatch.setattr(device_mod, 'cpu_has_native_bf16', lambda: True)
    assert resolve_precision() == torch.float32
    assert resolve_precision(amp=True, device='cpu') == torch.bfloat16
    # An explicit dtype wins over amp.
    assert resolve_precision('fp32', amp=True, device='cpu') == torch.float32


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="'int8'"):
        resolve_precision('int8')


def test_emulated_bf16_warns_on_cpu_only(monkeypatch):
    monkeypatch.setattr(device_mod, 'cpu_has_native_bf16', lambda: False)
    with pytest.warns(SlowPrecisionWarning, match='emulated'):
        assert resolve_precision('bf16', device='cpu') == torch.bfloat16
    with pytest.warns(SlowPrecisionWarning):
        resolve_precision(amp=True, device='cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        # fp32, and bf16 off the CPU, say nothing.
        resolve_precision('fp32', device='cpu')
        device_mod.warn_if_emulated(torch.bfloat16, 'cuda')


def test_native_bf16_is_quiet(monkeypatch):
    monkeypatch.setattr(device_mod, 'cpu_has_native_bf16', lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        resolve_precision('bf16', device='cpu')


def test_detection_returns_a_bool():
    assert isinstance(device_mod.cpu_has_native_bf16(), bool)
