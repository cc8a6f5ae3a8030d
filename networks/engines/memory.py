"""Explicit memory state of the propagation engines.

Upstream keeps memory as positional 4-lists per layer (``[K, V, None, ID_V]``) that are
mutated in place. Here each stored frame of each layer is a :class:`MemoryEntry` with
named fields, and the whole state of one video lives in a :class:`VOSMemory`.

Layout conventions
* long-term entries are sequence-first ``(L, B, C)``; concatenating frames along ``L``
  gives the keys/values the long-term attention reads (newest frame first, as upstream);
* short-term entries are 2D ``(B, C, h, w)`` (what the local attention reads).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from networks.layers.memory_entry import MemoryEntry

__all__ = ['APP_LONG_TERM_MEM_MAX', 'MemoryEntry', 'VOSMemory']  # MemoryEntry: from the layers

# The long-term cap (one name everywhere: ``long_term_mem_max`` / TEST_LONG_TERM_MEM_MAX /
# ``--lt_max``). Evaluation keeps upstream's unbounded memory (TEST_LONG_TERM_MEM_MAX = None),
# so DAVIS / YouTube-VOS scores compare with published ones; the application entry points
# (VideoObjectSegmenter, tools/demo.py) bound it, so memory and time per frame stay flat on
# long videos. docs/memory.md has the table and the measurements.
APP_LONG_TERM_MEM_MAX = 8


@dataclass
class VOSMemory:
    """Memory of one video for an engine with ``num_layers`` propagation layers.

    ``long_term[i]`` is the list of stored frames (newest first) of layer ``i``;
    ``long_term_steps`` holds the frame index of each stored frame and
    ``long_term_pinned`` whether it is a reference frame (a frame whose mask was given:
    the first frame, or a frame where objects were added), both in the same order.

    A cap (``long_term_mem_max`` stored frames) drops the oldest non-reference frame first.
    Reference frames are never dropped: they are the only frames whose masks are known
    to be right, and an object added mid-video exists in no earlier frame. Memory can
    therefore exceed the cap only by the number of reference frames.

    The write policy is owned here too: :meth:`write` stores a frame as short-term memory
    (the frame ``short_term_mem_skip`` back is the one read) and as long-term memory once
    ``long_term_mem_gap`` frames have passed since the last long-term write.
    """
    num_layers: int
    long_term_mem_max: Optional[int] = None
    long_term_mem_gap: int = 9999
    short_term_mem_skip: int = 1
    long_term: List[List[MemoryEntry]] = field(default_factory=list)
    long_term_steps: List[int] = field(default_factory=list)
    long_term_pinned: List[bool] = field(default_factory=list)
    short_term: Optional[List[MemoryEntry]] = None
    short_term_queue: List[List[MemoryEntry]] = field(default_factory=list)
    last_long_term_step: int = -1
    _cat_cache: List[Optional[MemoryEntry]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.long_term:
            self.long_term = [[] for _ in range(self.num_layers)]
        self._cat_cache = [None] * self.num_layers
        if self.long_term_mem_max is not None and self.long_term_mem_max < 1:
            raise ValueError(f'long_term_mem_max must be >= 1 (the reference frame), '
                             f'got {self.long_term_mem_max}')

    # -- long-term -------------------------------------------------------------------
    @property
    def num_long_term_frames(self):
        return len(self.long_term_steps)

    def num_long_term_tokens(self, layer=0):
        return sum(e.key.shape[0] for e in self.long_term[layer])

    def layer_long_term(self, layer):
        """Concatenated long-term entry of ``layer`` (cached until the next write)."""
        if self._cat_cache[layer] is None:
            if not self.long_term[layer]:
                return None
            self._cat_cache[layer] = MemoryEntry.cat(self.long_term[layer], dim=0)
        return self._cat_cache[layer]

    def prepend_long_term(self, entries, step, pinned=False):
        """Store one frame (a list of per-layer entries) as the newest long-term frame;
        ``pinned`` marks a reference frame, which a cap never drops."""
        if len(entries) != self.num_layers:
            raise ValueError(f'expected {self.num_layers} layer entries, got {len(entries)}')
        for layer, entry in enumerate(entries):
            self.long_term[layer].insert(0, entry)
        self.long_term_steps.insert(0, step)
        self.long_term_pinned.insert(0, bool(pinned))
        self._cat_cache = [None] * self.num_layers
        self.cap_long_term()

    def cap_long_term(self):
        if self.long_term_mem_max is None:
            return
        while len(self.long_term_steps) > self.long_term_mem_max:
            unpinned = [i for i, p in enumerate(self.long_term_pinned) if not p]
            if not unpinned:
                break
            drop = unpinned[-1]  # the oldest frame that is not a reference
            for layer in range(self.num_layers):
                del self.long_term[layer][drop]
            del self.long_term_steps[drop]
            del self.long_term_pinned[drop]
            self._cat_cache = [None] * self.num_layers

    # -- writes (the policy) ------------------------------------------------------------
    def write_reference(self, entries, entries_2d, step):
        """Store a reference frame (its mask was given): pinned in long-term memory whatever
        the gap, restarting the gap clock, and as the only short-term frame."""
        self.prepend_long_term(entries, step, pinned=True)
        self.last_long_term_step = step
        self.reset_short_term(entries_2d)

    def write(self, entries, entries_2d, step, long_term=True):
        """Store frame ``step`` from its predicted mask: ``entries`` (sequence-first, for the
        long-term lists) and ``entries_2d`` (the same frame as 2D maps, for short-term).

        ``long_term=False`` advances the gap clock without storing the frame (upstream's
        ``skip_long_term_update``)."""
        self.push_short_term(entries_2d, self.short_term_mem_skip)
        if step - self.last_long_term_step >= self.long_term_mem_gap:
            if long_term:
                self.prepend_long_term(entries, step)
            self.last_long_term_step = step

    # -- short-term ------------------------------------------------------------------
    def push_short_term(self, entries_2d, skip=1):
        """Add the newest frame's 2D entries; short-term memory is the frame ``skip`` back."""
        self.short_term_queue.append(entries_2d)
        if len(self.short_term_queue) > skip:
            self.short_term_queue = self.short_term_queue[-skip:]
        self.short_term = self.short_term_queue[0]

    def reset_short_term(self, entries_2d):
        self.short_term_queue = [entries_2d]
        self.short_term = entries_2d

    def detach_(self):
        """Cut the autograd graph of everything stored (for truncated BPTT)."""
        self.long_term = [[e.map(torch.Tensor.detach) for e in frames]
                          for frames in self.long_term]
        self._cat_cache = [None] * self.num_layers
        if self.short_term is not None:
            self.short_term_queue = [[e.map(torch.Tensor.detach) for e in f]
                                     for f in self.short_term_queue]
            self.short_term = self.short_term_queue[0]
        return self
