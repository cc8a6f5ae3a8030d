"""VOSMemory: long-term cap keeps every reference frame, concatenation order, short-term skip."""
import torch

from networks.engines.memory import MemoryEntry, VOSMemory


def _entry(step, layers=2):
    return [MemoryEntry(torch.full((3, 1, 2), float(step)), torch.full((3, 1, 4), float(step)),
                        torch.full((3, 1, 4), float(step))) for _ in range(layers)]


def test_cap_drops_oldest_unpinned_and_keeps_references():
    mem = VOSMemory(num_layers=2, long_term_mem_max=3)
    mem.prepend_long_term(_entry(0), 0, pinned=True)
    for step in (1, 2, 3):
        mem.prepend_long_term(_entry(step), step)
    assert mem.long_term_steps == [3, 2, 0]
    mem.prepend_long_term(_entry(4), 4, pinned=True)      # objects added at frame 4
    assert mem.long_term_steps == [4, 3, 0]
    for step in (5, 6, 7):
        mem.prepend_long_term(_entry(step), step)
    assert mem.long_term_steps == [7, 4, 0]               # both references survive
    cat = mem.layer_long_term(1)
    assert cat.key[:, 0, 0].tolist() == [7.0] * 3 + [4.0] * 3 + [0.0] * 3
    assert mem.num_long_term_tokens() == 9


def test_references_alone_may_exceed_cap():
    mem = VOSMemory(num_layers=1, long_term_mem_max=2)
    for step in range(4):
        mem.prepend_long_term(_entry(step, 1), step, pinned=True)
    assert mem.long_term_steps == [3, 2, 1, 0]


def test_uncapped_keeps_everything_newest_first():
    mem = VOSMemory(num_layers=1)
    for step in range(5):
        mem.prepend_long_term(_entry(step, 1), step, pinned=step == 0)
    assert mem.long_term_steps == [4, 3, 2, 1, 0]


def test_short_term_skip():
    mem = VOSMemory(num_layers=1)
    for step in range(4):
        mem.push_short_term(_entry(step, 1), skip=2)
        assert mem.short_term[0].key[0, 0, 0].item() == max(step - 1, 0)


def test_write_policy_gap_skip_and_reference_clock():
    """``write`` stores long-term every ``long_term_mem_gap`` frames counted from the last
    long-term write (a reference frame restarts the clock), short-term every frame, and
    ``long_term=False`` advances the clock without storing (upstream's skip flag)."""
    mem = VOSMemory(num_layers=1, long_term_mem_gap=3, short_term_mem_skip=1)
    mem.write_reference(_entry(0, 1), _entry(0, 1), 0)
    for step in range(1, 8):
        mem.write(_entry(step, 1), _entry(step, 1), step, long_term=step != 6)
        assert mem.short_term[0].key[0, 0, 0].item() == step
    assert mem.long_term_steps == [3, 0]          # 6 was due but skipped, clock moved to 6
    assert mem.last_long_term_step == 6
    mem.write_reference(_entry(8, 1), _entry(8, 1), 8)   # objects added at frame 8
    for step in (9, 10, 11):
        mem.write(_entry(step, 1), _entry(step, 1), step)
    assert mem.long_term_steps == [11, 8, 3, 0]
    assert mem.long_term_pinned == [False, True, False, True]
