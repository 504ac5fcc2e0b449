"""The order in which rows are trained: a pure function of (seed, epoch, micro-batch index).

Micro-batch k of the run is computable without replaying earlier batches, so a resumed run can
continue at any position in O(1). With several ranks, each global micro-batch is split into one
contiguous slice per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchOrder:
    num_rows: int
    micro_batch_size: int
    seed: int
    world_size: int = 1
    rank: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def micro_batch(self, k: int) -> list[int]:
        """Row indices of this rank's share of global micro-batch k (k counts across epochs)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        perm = self.permutation(epoch)
        start = j * self.global_batch + self.rank * self.micro_batch_size
        idx = perm[start : start + self.micro_batch_size]
        if len(idx) == 0:  # last, short global batch: a rank with nothing left re-reads the epoch's first rows
            idx = perm[: min(self.micro_batch_size, self.num_rows)]
        return idx.tolist()
