"""Seeds derived from a run's seed and a purpose (data order, ID shuffle, one step ...)."""
import numpy as np

__all__ = ['derive_seed']


def derive_seed(*parts):
    """A 63-bit seed from integers/strings (stable across runs and platforms)."""
    words = [int(p) if not isinstance(p, str) else int.from_bytes(p.encode()[:8], 'little')
             for p in parts]
    state = np.random.SeedSequence([w % 2 ** 64 for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
