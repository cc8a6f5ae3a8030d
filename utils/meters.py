"""Running training metrics that cost no device sync per step.

:class:`MetricAccumulator` sums per-step scalar tensors where they live (GPU or CPU) and only
at logging time stacks them, all-reduces once across processes and moves them to the host.
"""
import torch
import torch.distributed as dist


class MetricAccumulator:
    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = {}
        self.count = 0

    def add(self, logs):
        """``logs``: ``{name: 0-d tensor or number}`` of one step."""
        for name, value in logs.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(
                float(value))
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def averages(self, device=None, group=None, reduce=True):
        """Means over the steps since :meth:`reset` and, with ``reduce`` and
        ``torch.distributed`` initialised, over all processes of ``group`` (which must then all
        call this together)."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        device = device or self.sums[names[0]].device
        values = torch.stack([self.sums[n].reshape(()).to(device) for n in names])
        count = torch.tensor(float(self.count), device=values.device)
        packed = torch.cat([values, count[None]])
        if reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, group=group)
        packed = packed.cpu()
        return {n: (packed[i] / packed[-1]).item() for i, n in enumerate(names)}
