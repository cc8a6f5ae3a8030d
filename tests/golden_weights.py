"""Deterministic test weights shared with the golden fixtures (golden/README.md section 1).

Every tensor is filled from a counter-based hash of ``(seed, state-dict key, flat index)``, so any
implementation with upstream's key names and shapes gets bit-identical float32 weights; the
golden outputs in ``../shared/reference/golden`` were made by upstream with these weights.

    splitmix64(x)   the SplitMix64 finaliser (all arithmetic mod 2**64)
    base            = splitmix64(splitmix64(seed) ^ crc32(key))
    u_i             = (splitmix64(base + i) >> 11) * 2**-53          in [0, 1), float64

Values (first match wins; float64 then one rounding to float32):
    *relative_position_index   the canonical Swin index for a W x W window (int64, not random)
    *num_batches_tracked       int64 zeros
    *running_var               0.5 + u
    *running_mean              (u - 0.5) * 0.2
    1-D *weight                1 + (u - 0.5) * 0.2
    1-D *bias                  (u - 0.5) * 0.2
    otherwise                  (u - 0.5) * 2 * sqrt(3 / fan_in), with fan_in = prod(shape[1:])
                               for ndim >= 2, shape[0] for 1-D, 1 for 0-D

Typical use in a golden test::

    model.load_state_dict(recipe_for_module(model), strict=True)
"""
import math
import re
import zlib

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_LINE = re.compile(r'^(\S+)\s+\[([0-9,\s]*)\]\s+(param|buffer)\s*$')


def splitmix64(x):
    """SplitMix64 finaliser of ``x`` (python int or numpy uint64 array), mod 2**64."""
    if isinstance(x, (int, np.integer)):
        z = (int(x) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over='ignore'):
        z = z + _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def key_base(seed, key):
    """Per-key stream start: ``splitmix64(splitmix64(seed) ^ crc32(key))`` (python int)."""
    return splitmix64(splitmix64(seed) ^ zlib.crc32(key.encode('utf-8')))


def uniform(seed, key, n):
    """The first ``n`` uniforms ``u_i`` in [0, 1) of ``key``'s stream, float64 ``(n,)``."""
    idx = np.arange(n, dtype=np.uint64)
    with np.errstate(over='ignore'):
        z = splitmix64(idx + np.uint64(key_base(seed, key)))
    # 53 high bits -> exactly representable float64 in [0, 1).
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def swin_relative_position_index(window):
    """Canonical Swin table index ``(W^2, W^2)``: ``(dy + W - 1) * (2W - 1) + dx + W - 1`` int64."""
    yy, xx = np.divmod(np.arange(window * window), window)
    dy = yy[:, None] - yy[None, :] + window - 1
    dx = xx[:, None] - xx[None, :] + window - 1
    return (dy * (2 * window - 1) + dx).astype(np.int64)


def recipe_array(key, shape, seed=0):
    """Recipe value of one state-dict entry as a numpy array (float32, or int64 where stated)."""
    shape = tuple(int(s) for s in shape)
    if key.endswith('relative_position_index'):
        window = math.isqrt(shape[0])
        if shape != (window * window, window * window):
            raise ValueError(f'{key}: relative_position_index must be (W^2, W^2), got {shape}')
        return swin_relative_position_index(window)
    if key.endswith('num_batches_tracked'):
        return np.zeros(shape, dtype=np.int64)
    n = math.prod(shape)
    u = uniform(seed, key, n)
    if key.endswith('running_var'):
        v = 0.5 + u
    elif key.endswith('running_mean'):
        v = (u - 0.5) * 0.2
    elif len(shape) == 1 and key.endswith('weight'):
        v = 1.0 + (u - 0.5) * 0.2
    elif len(shape) == 1 and key.endswith('bias'):
        v = (u - 0.5) * 0.2
    else:
        fan_in = math.prod(shape[1:]) if len(shape) >= 2 else (shape[0] if len(shape) == 1 else 1)
        v = (u - 0.5) * 2.0 * math.sqrt(3.0 / fan_in)
    return v.astype(np.float32).reshape(shape)


def read_keyfile(path):
    """Parse a state-dict dump (``<key> [<shape>] <param|buffer>`` per line).

    Returns ``[(key, shape_tuple, kind)]`` in file order.
    """
    entries = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _LINE.match(line.strip())
            if m is None:
                raise ValueError(f'{path}:{lineno}: expected "<key> [<shape>] <param|buffer>", '
                                 f'got {line.strip()!r}')
            key, dims, kind = m.groups()
            shape = tuple(int(d) for d in dims.replace(' ', '').split(',') if d)
            entries.append((key, shape, kind))
    return entries


def recipe_state_dict(keys_shapes, seed=0):
    """``{key: tensor}`` for ``[(key, shape[, kind])]``; float32, int64 for index/counters."""
    return {entry[0]: torch.from_numpy(recipe_array(entry[0], entry[1], seed))
            for entry in keys_shapes}


def recipe_for_module(module, seed=0):
    """Recipe state dict for ``module``'s own ``state_dict()`` keys and shapes."""
    return recipe_state_dict([(k, tuple(v.shape)) for k, v in module.state_dict().items()], seed)
