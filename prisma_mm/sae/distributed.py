"""Batch statistics of a training batch that is split over processes (DDP).

Under data parallelism every process holds ``1 / world_size`` of the global batch. A quantity
of the batch as a whole (the target's variance in an FVU, the firing counts of the dead-latent
tracker, BatchTopK's global top ``batch * k`` and its smallest kept value) must be taken over
the global batch, or each process trains and tracks on its own slice. Inside
:func:`batch_spans_processes` these helpers reduce over all processes; outside it (one process,
evaluation, :func:`~prisma_mm.sae.fit.fit_simple`) they are the identity, so no call can wait on
a process that is not making it.

``SAEModule`` opens the context around each training forward pass and around the dictionary's
state update after the step, on every process, so every reduction is made by all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "all_gather_cat",
    "batch_spans_processes",
    "centred_sum_of_squares",
    "reduce_",
    "spanning_world_size",
]

_spanning = False


@contextlib.contextmanager
def batch_spans_processes(enabled: bool = True) -> Iterator[None]:
    """Within the block, batch statistics are taken over the batch of every process (a no-op
    without an initialised process group of more than one process)."""
    global _spanning
    previous, _spanning = _spanning, bool(enabled)
    try:
        yield
    finally:
        _spanning = previous


def spanning_world_size() -> int:
    """Processes the current batch spans: the world size inside :func:`batch_spans_processes`
    under torch.distributed, else 1."""
    if not (_spanning and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return int(torch.distributed.get_world_size())


def reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place (``"sum"``, ``"min"`` or ``"max"``) over the processes the
    batch spans; returns it (unchanged on one process). No gradient flows through it."""
    if spanning_world_size() > 1:
        ops = {
            "sum": torch.distributed.ReduceOp.SUM,
            "min": torch.distributed.ReduceOp.MIN,
            "max": torch.distributed.ReduceOp.MAX,
        }
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_cat(tensor: Tensor) -> Tensor:
    """``[n]`` per process -> ``[world_size * n]`` (process order); the same size everywhere.
    Unchanged on one process. No gradient flows through it."""
    world = spanning_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def centred_sum_of_squares(target: Tensor) -> Tensor:
    """``Σ_n ||x_n - x̄||²`` of ``target [batch, d]`` (float32 scalar), the denominator of an FVU.

    When the batch spans processes, ``x̄`` is the global batch mean and the global sum is
    returned scaled to this process's share of the rows (``× n_local / n_global``): then
    ``Σ_local err² / centred_sum_of_squares`` averaged over processes (DDP's gradient mean) is
    exactly the global batch's FVU and its gradient.
    """
    target = target.detach().float().reshape(target.shape[0], -1)
    if spanning_world_size() == 1:
        return (target - target.mean(0, keepdim=True)).pow(2).sum()
    n_local = torch.tensor(float(target.shape[0]), device=target.device, dtype=torch.float64)
    stats = torch.cat([n_local.reshape(1), target.sum(0).double()])
    reduce_(stats)
    n_global, mean = stats[0], (stats[1:] / stats[0].clamp_min(1.0)).to(target.dtype)
    total = reduce_((target - mean).pow(2).sum().double())
    return (total * n_local / n_global.clamp_min(1.0)).float()
