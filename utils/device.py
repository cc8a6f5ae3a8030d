"""Choosing the compute device from a user's ``--device`` (or its absence)."""
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
