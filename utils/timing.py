"""Per-frame network time for the evaluator's FPS figures."""
import time

import torch

__all__ = ['FrameTimer']


class FrameTimer:
    """Network time per frame: CUDA events on a GPU (no sync per frame), wall time on CPU."""

    def __init__(self, device):
        self.cuda = device.type == 'cuda'
        self.spans = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self):
        self.spans.append([self._now(), None])

    def stop(self):
        self.spans[-1][1] = self._now()

    def last(self):
        begin, end = self.spans[-1]
        if self.cuda:
            end.synchronize()
            return begin.elapsed_time(end) / 1e3
        return end - begin

    def total(self):
        if self.cuda:
            torch.cuda.synchronize()
            return sum(b.elapsed_time(e) for b, e in self.spans) / 1e3
        return sum(e - b for b, e in self.spans)
