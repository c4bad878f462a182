"""Data-parallel training: N torch.distributed ranks, weights sharded with FSDP2, one update between them.

Every rank is given the whole batch (it is small next to the model: token ids and a few floats per
token), computes the same advantages from it, and runs forward/backward on its own share of each
mini-batch only. The loss denominators are the global ones (valid tokens or sequences summed over
the ranks), the gradients are summed, not averaged, across ranks (FSDP2's divide factor 1), and the
metric sums are summed: so N ranks take the update one process takes on the same batch, up to
float summation order. docs/scale.md, "Data-parallel training".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rollmill.train.batch import TrainBatch


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group (the default torch.distributed process group)."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> "DataParallel | None":
        """The group this process belongs to, or None when it trains alone."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def rows(self, size: int, mini: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's rows of a batch of `size` rows taken `mini` at a time: (row index, 1/0 keep
        weight per row, rows per local mini-batch). Each mini-batch is cut into `world` contiguous parts
        (a group's samples stay together), padded with loss-free copies of its first row to one size,
        so every rank runs the same number of forwards (FSDP2's collectives need that)."""
        index, keep = [], []
        per = math.ceil(min(mini, size) / self.world)
        for start in range(0, size, mini):
            end = min(start + mini, size)
            own = list(range(start + self.rank * per, min(start + (self.rank + 1) * per, end)))
            index += own + [start] * (per - len(own))
            keep += [1.0] * len(own) + [0.0] * (per - len(own))
        return torch.tensor(index, dtype=torch.long), torch.tensor(keep), per

    def shard(self, batch: TrainBatch, mini: int) -> tuple[TrainBatch, torch.Tensor, int]:
        """This rank's rows of `batch` (per `rows`, padding rows with an all-zero mask), their index into
        `batch` (for tensors that go with it) and the rows per local mini-batch."""
        index, keep, per = self.rows(batch.size, mini)
        index = index.to(batch.mask.device)
        local = batch.select(index)
        local.mask = local.mask * keep.to(batch.mask.device)[:, None]
        return local, index, per

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def shard_model(model: torch.nn.Module, blocks: list[str] | None = None) -> torch.nn.Module:
    """Shard `model`'s parameters over the process group with FSDP2: each block (by class name; default
    the ones transformers says a model must not be split inside) is one unit, gathered for its
    forward/backward and freed after; the rest is the root unit, whose forward must be the one called.
    Gradients are summed over ranks, not averaged: the loss already divides by the global denominators."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(blocks if blocks is not None else getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(1.0)  # per unit: the root's setting does not reach the others
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


def gather_rows(local: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
    """Every rank's `local` rows (its `index`, `keep` from `DataParallel.rows`) put back in batch order:
    the whole [size, ...] tensor on every rank (an all-gather)."""
    world = dist.get_world_size()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(indices, index)
    keeps = [torch.empty_like(keep) for _ in range(world)]
    dist.all_gather(keeps, keep)
    out = local.new_zeros((size, *local.shape[1:]))
    for part, idx, k in zip(parts, indices, keeps):
        real = k > 0
        out[idx[real]] = part[real]
    return out


def local_value(t: torch.Tensor) -> float:
    """A scalar that may be a replicated DTensor (e.g. a gradient norm under FSDP2) as a float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)
