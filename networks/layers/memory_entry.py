"""One stored frame of one propagation layer (what the LSTT layers build and attend to).

The layers produce and read it; the engines' :class:`~networks.engines.memory.VOSMemory`
keeps lists of them. It lives here, below the engines, so the layers need not import them.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = ['MemoryEntry']


@dataclass
class MemoryEntry:
    """One frame of one layer.

    ``key``: ``(L, B, Ck)``; ``value``: ``(L, B, Cv)`` (AOT: visual value with the ID
    embedding fused in; DeAOT: visual value); ``id_value``: DeAOT's ID value
    ``(L, B, Cv)``, ``None`` for AOT. The same fields hold 2D maps for short-term memory.
    """
    key: Tensor
    value: Tensor
    id_value: Optional[Tensor] = None
    # Tensors derived from the fields (e.g. the long-term attention's prepared layout), kept
    # as long as the entry: the engine's memory re-uses one concatenated entry until the next
    # write, so a layout built here is built once per write instead of once per frame.
    _derived: Dict[str, object] = field(default_factory=dict, init=False, repr=False,
                                        compare=False)

    def derived(self, name: str, build: Callable[['MemoryEntry'], object]):
        """``build(self)``, computed on the first call for ``name`` and returned afterwards.

        The fields must not change in place after the first call (nothing in the project
        does: memory writes make new entries).
        """
        if name not in self._derived:
            self._derived[name] = build(self)
        return self._derived[name]

    def map(self, fn):
        return MemoryEntry(*(None if t is None else fn(t)
                             for t in (self.key, self.value, self.id_value)))

    @staticmethod
    def cat(entries, dim=0):
        """Concatenate entries field by field (fields that are ``None`` stay ``None``)."""
        first = entries[0]
        out = []
        for name in ('key', 'value', 'id_value'):
            if getattr(first, name) is None:
                out.append(None)
            elif len(entries) == 1:
                out.append(getattr(first, name))
            else:
                out.append(torch.cat([getattr(e, name) for e in entries], dim=dim))
        return MemoryEntry(*out)
