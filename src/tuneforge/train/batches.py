"""The order in which rows are trained: a pure function of (seed, epoch, micro-batch index).

Micro-batch k of the run is computable without replaying earlier batches, so a resumed run can
continue at any position in O(1) steps of work. With several ranks, each global micro-batch is split into
one contiguous slice per rank.

Length grouping (padded data): rows are padded to the longest row of their micro-batch, so a random
micro-batch of Alpaca-like rows is ~40% padding. With `lengths`, each chunk of `group_steps` optimizer
steps' worth of the epoch's shuffled rows is sorted by length and cut into steps, and the full steps are
shuffled: every step still draws from the whole epoch, its micro-batches hold rows of similar length,
and an optimizer step contains the same rows whatever its split into micro-batches x accumulation x ranks
(so 1 x 8 == 8 x 1 and 1 process == 2 processes hold with grouping on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BatchOrder:
    num_rows: int
    micro_batch_size: int
    seed: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    lengths: tuple[int, ...] | None = None  # row lengths, to group similar lengths (None: plain shuffle)
    group_steps: int = 16
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def step_rows(self) -> int:
        return self.global_batch * self.grad_accum

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.global_batch)

    def layout(self) -> dict:
        """What fixes the rows of every optimizer step. Two orders with the same layout give each step the same
        rows, however the step is split into micro-batches x processes x accumulation: the rows per step, and
        the global micro-batch only when it does not divide the rows (then epoch ends fall differently)."""
        return {
            "rows": self.num_rows,
            "rows_per_step": self.step_rows,
            "global_micro_batch": self.global_batch if self.num_rows % self.global_batch else None,
        }

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Every row once, in training order for this epoch (cached: one epoch at a time)."""
        if self._cache.get("epoch") == epoch:
            return self._cache["order"]
        perm = self.permutation(epoch)
        if self.lengths is not None and self.num_rows > self.step_rows:
            perm = self._grouped(perm, epoch)
        self._cache.update(epoch=epoch, order=perm)
        return perm

    def _grouped(self, perm: torch.Tensor, epoch: int) -> torch.Tensor:
        lengths = torch.as_tensor(self.lengths, dtype=torch.long)[perm]
        chunk = self.step_rows * self.group_steps
        parts = []
        for start in range(0, self.num_rows, chunk):  # sort each chunk longest first (stable: ties keep the shuffle)
            idx = torch.argsort(lengths[start : start + chunk], descending=True, stable=True)
            parts.append(perm[start : start + chunk][idx])
        grouped = torch.cat(parts)
        full = self.num_rows // self.step_rows  # the last, partial step stays last
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7_919)
        steps = torch.randperm(full, generator=g)
        body = grouped[: full * self.step_rows].view(full, self.step_rows)[steps].reshape(-1)
        return torch.cat([body, grouped[full * self.step_rows :]])

    def micro_batch(self, k: int) -> list[int]:
        """Row indices of this rank's share of global micro-batch k (k counts across epochs)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        start = j * self.global_batch + self.rank * self.micro_batch_size
        idx = order[start : start + self.micro_batch_size]
        if len(idx) == 0:  # last, short global batch: a rank with nothing left re-reads the epoch's first rows
            idx = order[: min(self.micro_batch_size, self.num_rows)]
        return idx.tolist()


def sequence_lengths(row: dict) -> list[int]:
    """The sequences a prepared row becomes in a batch: itself, a preference pair's prompt + chosen and
    prompt + rejected, or a KTO row's prompt + completion (its KL sequence runs without gradient, not counted)."""
    if "input_ids" in row:
        return [len(row["input_ids"])]
    prompt = len(row["prompt_ids"])
    if "completion_ids" in row:
        return [prompt + len(row["completion_ids"])]
    return [prompt + len(row["chosen_ids"]), prompt + len(row["rejected_ids"])]


def join_micro_batches(micro: list[list[dict]], max_positions: int, flat: bool) -> list[list[dict]]:
    """Consecutive micro-batches of one optimizer step joined into passes of at most `max_positions` positions
    (flat: the rows' lengths summed, as FlatCollator lays them end to end; else rows x the longest row, as
    padded); a micro-batch larger than that on its own stays one pass. The step holds the same rows and its
    loss is normalised over all of them, so the gradient is the same however they are split into passes."""

    def positions(rows: list[dict]) -> int:
        lengths = [n for r in rows for n in sequence_lengths(r)]
        return sum(lengths) if flat else len(lengths) * max(lengths, default=0)

    passes: list[list[dict]] = []
    for rows in micro:
        if passes and positions(passes[-1] + rows) <= max_positions:
            passes[-1] = passes[-1] + rows
        else:
            passes.append(list(rows))
    return passes


def pass_budget(cfg, processes: int, strategy: str) -> tuple[int | None, str | None]:
    """(positions per pass for `join_micro_batches`, or None to run each micro-batch alone; a note for the log
    when a set train.pass_tokens cannot apply). Only one process without DeepSpeed joins: other strategies need
    the same number of passes on every rank, and DeepSpeed's engine counts micro-steps."""
    tokens = cfg.train.pass_tokens
    if tokens is None or cfg.train.grad_accum == 1:
        return None, None
    if cfg.objective.type == "grpo":  # its rows are prompts until the rollouts make each one G sequences
        note = (
            None
            if tokens == "auto"
            else (
                f"train.pass_tokens={tokens} ignored: objective grpo runs each micro-batch (micro_batch_size prompts x "
                "their generations) as its own pass"
            )
        )
        return None, note
    if processes == 1 and strategy != "deepspeed":
        return (cfg.train.micro_batch_size * cfg.data.max_seq_len if tokens == "auto" else tokens), None
    if tokens == "auto":
        return None, None
    return None, (
        f"train.pass_tokens={tokens} ignored: with {processes} process(es) ({strategy}) every rank runs "
        "each micro-batch as its own pass"
    )
