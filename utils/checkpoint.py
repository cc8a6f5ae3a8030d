"""Checkpoint loading and saving in upstream aot-benchmark's format.

Upstream files are ``torch.save({'state_dict': model.state_dict(), 'optimizer': ...,
'scaler': ...})`` with keys as the bare model names (``encoder.features.0.0.weight``...).
We also accept a raw state dict, ``{'model': ...}``, EMA files and keys with ``module.``
prefixes (DDP). Loading is strict by default: a mismatch raises
:class:`CheckpointMismatchError` that lists every missing, unexpected and wrongly shaped
key. New parameters a model is *expected* to lack in a checkpoint (e.g. the offset
networks of a GDA student loading a vanilla DeAOT checkpoint) are allowed by prefix and
reported explicitly.

Saving writes to a temporary file in the target folder and renames it, so a crash or a
kill during saving never leaves a truncated ``save_step_N.pth``.
"""
import glob
import logging
import os
import re

import torch

from utils.io import atomic_write

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ('state_dict', 'model', 'model_ema', 'ema', 'state_dict_ema')
_PREFIXES = ('module.', 'AOT.', 'module.AOT.')


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a torch file, or holding
    objects other than tensors and plain containers); the message names the file."""


def _reason(err):
    """A one-line cause from torch's error, without its advice to retry with
    ``weights_only=False`` (that would run arbitrary code from the file)."""
    text = str(err)
    if 'PytorchStreamReader' in text or 'central directory' in text:
        return 'the file is truncated or corrupt (an incomplete download or copy?)'
    if 'Weights only load failed' in text or 'WeightsUnpickler' in text:
        glob_ = re.search(r'Unsupported global: GLOBAL (\S+)', text)
        if glob_:
            return (f'it holds a Python object ({glob_.group(1)}) other than tensors and plain '
                    f'containers, which is never loaded (it could run code)')
        return 'not a PyTorch checkpoint (or a damaged one): its contents are not a torch save'
    if isinstance(err, EOFError):
        return 'the file is empty or truncated'
    first = text.strip().splitlines()[0] if text.strip() else ''
    return f'{type(err).__name__}: {first}' if first else type(err).__name__


def load_checkpoint_file(path):
    """``torch.load`` a checkpoint safely (``weights_only``, on the CPU); every failure is a
    :class:`CheckpointReadError` naming the file, or ``FileNotFoundError``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # corrupt, truncated, not a torch file, or unsafe contents
        raise CheckpointReadError(f'cannot read checkpoint {path}: {_reason(err)}') from None


def read_state_dict(path):
    """Read the model state dict of a checkpoint file (any supported layout)."""
    return extract_state_dict(load_checkpoint_file(path), source=path)


def extract_state_dict(ckpt, source='<checkpoint>'):
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(
            f'{source}: expected a dict (a state dict or {{"state_dict": ...}}), '
            f'got {type(ckpt).__name__}')
    for key in _WRAPPER_KEYS:
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    state = {}
    for key, value in ckpt.items():
        if not torch.is_tensor(value):
            raise CheckpointMismatchError(
                f'{source}: entry {key!r} is a {type(value).__name__}, not a tensor; '
                f'this does not look like a model state dict')
        for prefix in sorted(_PREFIXES, key=len, reverse=True):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value
    return state


def compare_state_dict(model, state):
    """Return ``(missing, unexpected, mismatched)``; ``mismatched`` holds
    ``(key, checkpoint_shape, model_shape)``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                  for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def load_network(net, path_or_state, strict=True, allow_missing_prefixes=(), source=None):
    """Load model weights.

    Args:
        net: the model (a DDP-wrapped model is unwrapped).
        path_or_state: a checkpoint path or an already read state dict.
        strict: raise on any missing / unexpected / mis-shaped key.
        allow_missing_prefixes: key substrings that may be missing from the checkpoint
            even in strict mode (new modules); they keep their initial values.
    Returns:
        ``(net, report)`` with ``report = {'missing', 'unexpected', 'new'}``.
    """
    net = getattr(net, 'module', net)
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or str(path_or_state)
        state = read_state_dict(path_or_state)
    else:
        source = source or '<state dict>'
        state = extract_state_dict(path_or_state, source)
    missing, unexpected, mismatched = compare_state_dict(net, state)
    new = [k for k in missing if any(p in k for p in allow_missing_prefixes)]
    missing = [k for k in missing if k not in new]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f'checkpoint {source} does not fit {type(net).__name__}:']
        own = net.state_dict()
        lines += [f'  shape mismatch {k}: checkpoint {c} vs model {m}' for k, c, m in mismatched]
        lines += [f'  missing in checkpoint {k} {tuple(own[k].shape)}' for k in missing]
        lines += [f'  unexpected in checkpoint {k} {tuple(state[k].shape)}' for k in unexpected]
        raise CheckpointMismatchError('\n'.join(lines))
    result = net.load_state_dict(state, strict=False)
    if new:
        logger.info('%s: loaded; %d new keys not in the checkpoint keep their init (%s)',
                    source, len(new), ', '.join(sorted({k.rsplit('.', 2)[0] for k in new})))
    if unexpected or missing:
        logger.warning('%s: ignored %d unexpected keys, %d keys missing', source,
                       len(unexpected), len(missing))
    report = {'missing': missing, 'unexpected': unexpected, 'new': new}
    del result
    return net, report


def atomic_torch_save(obj, path):
    """``torch.save`` to a temporary file next to ``path``, then rename over it."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_path(folder, step):
    return os.path.join(folder, f'save_step_{step}.pth')


def save_network(net, step, folder, optimizer=None, scaler=None, extra=None, max_keep=None):
    """Write ``folder/save_step_<step>.pth`` in upstream's format (atomically).

    ``extra`` entries (e.g. EMA state, data-sampler position) are added under their own
    keys; upstream's loaders ignore them. Keeps only the newest ``max_keep`` files.
    """
    net = getattr(net, 'module', net)
    ckpt = {'state_dict': net.state_dict()}
    if optimizer is not None:
        ckpt['optimizer'] = optimizer.state_dict()
    if scaler is not None:
        ckpt['scaler'] = scaler.state_dict()
    if extra:
        ckpt.update(extra)
    path = checkpoint_path(folder, step)
    atomic_torch_save(ckpt, path)
    if max_keep:
        prune_checkpoints(folder, max_keep)
    return path


def list_checkpoints(folder):
    """``[(step, path)]`` of ``save_step_N.pth`` files, oldest first."""
    found = []
    for path in glob.glob(os.path.join(folder, 'save_step_*.pth')):
        m = re.fullmatch(r'save_step_(\d+)\.pth', os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder):
    found = list_checkpoints(folder)
    return found[-1] if found else (None, None)


def prune_checkpoints(folder, max_keep):
    for _, path in list_checkpoints(folder)[:-max_keep]:
        os.remove(path)
