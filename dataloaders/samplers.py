"""The training data order: global batches that depend on the seed only."""
import torch
from torch.utils.data import Sampler

from utils.seed import derive_seed

__all__ = ['GlobalBatchSampler']


class GlobalBatchSampler(Sampler):
    """Index lists of this process's share of each global batch.

    Epoch ``e`` visits a permutation of the dataset drawn from ``(seed, e)`` in global batches
    of ``global_batch`` samples (a tail that fills no batch is dropped); process ``rank`` of
    ``world_size`` takes the ``rank``-th slice of ``global_batch / world_size`` samples. The
    order thus depends only on the seed, not on the number of processes, and training step
    ``s`` always sees global batch ``s % batches_per_epoch`` of epoch
    ``s // batches_per_epoch`` (see :meth:`position`).
    """

    def __init__(self, num_samples, global_batch, rank=0, world_size=1, seed=0, shuffle=True):
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f'the global batch size ({global_batch}) must be a positive '
                             f'multiple of the number of processes ({world_size})')
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // world_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = self.num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f'the training set has {self.num_samples} clips, fewer than one '
                             f'global batch of {self.global_batch}')
        self.epoch, self.start_batch = 0, 0

    def position(self, step):
        """``(epoch, batch index in the epoch)`` that training step ``step`` uses."""
        return divmod(int(step), self.batches_per_epoch)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def permutation(self, epoch):
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, epoch, 'data-order'))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self):
        perm = self.permutation(self.epoch)
        for i in range(self.start_batch, self.batches_per_epoch):
            first = i * self.global_batch + self.rank * self.local_batch
            yield perm[first:first + self.local_batch].tolist()

    def __len__(self):
        return self.batches_per_epoch - self.start_batch
