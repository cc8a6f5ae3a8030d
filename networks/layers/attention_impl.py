"""Which implementation the attention layers of a built model use.

Every choice computes the same sums (tests compare them); they differ in speed and memory:

* ``local``: the short-term 15x15 window attention. ``'tiled'`` (default) works on 16x16
  query tiles (networks/layers/local_window.py); ``'dense'`` is upstream's pure-PyTorch
  fallback (unfolded windows, a dense ``L x L`` aggregation matrix), kept as the speed baseline.
* ``global_``: the global attentions (long-term and self-attention). ``'sdpa'`` (default)
  calls ``F.scaled_dot_product_attention``; ``'explicit'`` builds the softmax map and
  multiplies, as upstream.

The choice lives on the modules (``local_impl`` / ``global_impl`` attributes), so two models in
one process can differ (``tools/benchmark.py --vs-upstream-dense`` alternates them frame by
frame) and nothing is monkeypatched.
"""
import torch.nn as nn

from .local_window import LOCAL_IMPLS

__all__ = ['GLOBAL_IMPLS', 'LOCAL_IMPLS', 'set_attention_impl']

GLOBAL_IMPLS = ('sdpa', 'explicit')


def set_attention_impl(model: nn.Module, local=None, global_=None):
    """Set the implementation of every attention module of ``model``; ``None`` leaves a kind
    as it is. Returns the number of modules changed."""
    if local is not None and local not in LOCAL_IMPLS:
        raise ValueError(f'local attention impl {local!r}: use one of {sorted(LOCAL_IMPLS)}')
    if global_ is not None and global_ not in GLOBAL_IMPLS:
        raise ValueError(f'global attention impl {global_!r}: use one of {list(GLOBAL_IMPLS)}')
    changed = 0
    for module in model.modules():
        if local is not None and hasattr(module, 'local_impl'):
            module.local_impl = local
            changed += 1
        if global_ is not None and hasattr(module, 'global_impl'):
            module.global_impl = global_
            changed += 1
    return changed
