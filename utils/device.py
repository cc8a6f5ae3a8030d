"""The compute device: choosing it from a user's ``--device`` (or its absence), and the
peak memory a run used on it."""
import sys
import warnings

import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(requested=None, gpu=None):
    """``None`` -> CUDA when available, else CPU; ``'cuda'`` without an index -> GPU ``gpu``
    (default 0). Raises :class:`DeviceError` with a hint when CUDA or that GPU is missing."""
    device = torch.device(requested or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type != 'cuda':
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f'device {device} was asked for but CUDA is not available here; '
                          f'use --device cpu')
    index = device.index if device.index is not None else (gpu or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f'GPU {index} was asked for but only {torch.cuda.device_count()} '
                          f'are visible')
    return torch.device('cuda', index)


def peak_rss_mb():
    """Peak resident memory of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on
    macOS); ``None`` where the ``resource`` module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 1024.


def peak_memory_mb(device):
    """Peak memory of a run on ``device`` in MiB: ``torch.cuda.max_memory_allocated`` on CUDA
    (since the last ``reset_peak_memory_stats``), else the process's peak RSS."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


PRECISIONS = {'float32': torch.float32, 'fp32': torch.float32,
              'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16,
              'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16}


class SlowPrecisionWarning(UserWarning):
    """The requested compute dtype is emulated on this CPU and will be much slower."""


def cpu_has_native_bf16():
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 or AMX, as oneDNN reports it).
    Without it, CPU autocast to bf16 emulates the type: a ``deaotl`` training step ran 8x
    slower than float32 on an AVX2-only EPYC (docs/results.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: assume emulation
        return False


def warn_if_emulated(dtype, device):
    """Warn (:class:`SlowPrecisionWarning`) when ``dtype`` is bf16 on a CPU that emulates it;
    the run stays correct, only slow, so this does not stop it."""
    if dtype == torch.bfloat16 and torch.device(device).type == 'cpu' \
            and not cpu_has_native_bf16():
        warnings.warn('bf16 on this CPU is emulated (no AVX512-BF16/AMX): expect it to be '
                      'several times slower than fp32; drop --amp / --precision bf16 here',
                      SlowPrecisionWarning, stacklevel=3)


def resolve_channels_last(setting, device):
    """Whether inference runs the encoder channels-last: ``setting`` when it is a bool, else
    (``None``) on the CPU only, where it is faster (docs/benchmark.md). Logits equal the
    default layout's to float rounding (``tests/test_attention_impl.py``)."""
    if setting is None:
        return torch.device(device).type == 'cpu'
    return bool(setting)


def resolve_precision(dtype=None, amp=False, device='cpu'):
    """The compute dtype of an inference run: ``torch.float32`` (exact, the default),
    ``torch.bfloat16`` or ``torch.float16`` (run under ``torch.autocast``).

    ``dtype``: a name (``'fp32'``, ``'bf16'``, ``'fp16'``, ...) or a torch dtype; it wins over
    ``amp``. ``amp=True``: the usual autocast dtype of the device: bf16 on CPU (fp16 matmuls are
    slow there), fp16 on CUDA (what upstream's ``--amp`` uses). bf16 on a CPU without native
    bf16 warns (:func:`warn_if_emulated`).
    """
    dtype = _precision_dtype(dtype, amp, torch.device(device))
    warn_if_emulated(dtype, device)
    return dtype


def _precision_dtype(dtype, amp, device):
    if dtype is None:
        if not amp:
            return torch.float32
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    if isinstance(dtype, str):
        try:
            dtype = PRECISIONS[dtype.lower()]
        except KeyError:
            raise ValueError(f'precision {dtype!r}: use fp32, bf16 or fp16') from None
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f'precision {dtype}: use torch.float32, torch.float16 or torch.bfloat16')
    return dtype
