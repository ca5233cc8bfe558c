"""Reconstruction metrics of a dictionary on a batch, and their exact accumulation over a split.

Every formula is pinned to a hand-computed value in ``tests/test_train_module.py``. The
fraction of variance unexplained is measured about the batch (or split) mean, never about zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def reconstruction_metrics(target: Tensor, recon: Tensor) -> dict[str, Tensor]:
    """FVU, MSE and cosine similarity of one batch.

    target, recon: ``[batch, d]`` (crosscoder: ``[batch, n_sources, d]``, each row flattened).
    Returns 0-dim float32 tensors:

    - ``fvu``: ``sum ||target - recon||^2 / sum ||target - mean(target)||^2`` (mean over the batch)
    - ``mse``: mean squared error per element
    - ``cos_sim``: mean over rows of the cosine similarity between a target row and its recon
    """
    target = target.detach().float().flatten(1)
    recon = recon.detach().float().flatten(1)
    error = (target - recon).pow(2)
    total_variance = (target - target.mean(0)).pow(2).sum()
    return {
        "fvu": error.sum() / total_variance.clamp_min(torch.finfo(torch.float32).tiny),
        "mse": error.mean(),
        "cos_sim": torch.nn.functional.cosine_similarity(target, recon, dim=-1).mean(),
    }


class MetricSums:
    """Running float64 sums that give the exact metrics of a whole split, batch by batch.

    FVU over the split uses the split mean: ``sum err^2 / (sum x^2 - ||sum x||^2 / n)``, so the
    result does not depend on how the split was cut into batches (nor across processes: call
    :meth:`all_reduce` before :meth:`compute`).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def _add(self, name: str, value: Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def update(
        self,
        target: Tensor,
        recon: Tensor,
        fire_counts: Tensor,
        losses: dict[str, Tensor] | None = None,
    ) -> None:
        """Add one batch. target, recon: ``[batch, ...]``; ``fire_counts [n_latents]``: rows of
        the batch each latent is active in (L0, dead and dense fractions); ``losses``: named
        scalar terms of the batch (weighted by its row count)."""
        target = target.detach().to(torch.float64).flatten(1)
        recon = recon.detach().to(torch.float64).flatten(1)
        rows = torch.tensor(float(target.shape[0]), dtype=torch.float64, device=target.device)
        self._add("rows", rows)
        self._add("elements", rows * target.shape[1])
        self._add("sq_error", (target - recon).pow(2).sum())
        self._add("sum_x", target.sum(0))
        self._add("sum_sq_x", target.pow(2).sum())
        self._add("cos_sim", torch.nn.functional.cosine_similarity(target, recon, dim=-1).sum())
        self._add("fire_counts", fire_counts.to(device=target.device))
        for name, value in (losses or {}).items():
            self._add(f"loss/{name}", value.detach().to(torch.float64) * rows)

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the running totals over all processes (no-op outside torch.distributed).

        A process that saw no batch (or other loss terms) contributes zeros; ``device`` is where
        those zeros live (the communication backend's device)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        shapes: list[Any] = [None] * world
        torch.distributed.all_gather_object(
            shapes, {name: tuple(value.shape) for name, value in self.sums.items()}
        )
        union: dict[str, tuple[int, ...]] = {}
        for entry in shapes:
            union.update(entry)
        for name in sorted(union):
            if name not in self.sums:
                self.sums[name] = torch.zeros(union[name], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(self.sums[name])

    def compute(self, dense_threshold: float = 0.1) -> dict[str, Tensor]:
        """Metrics over everything added so far (0-dim float32 tensors); empty if nothing was:
        ``fvu``, ``mse``, ``cos_sim``, ``l0``, ``dead_fraction`` (latents active on no row),
        ``dense_fraction`` (active on more than ``dense_threshold`` of the rows) and
        ``loss/<name>`` (row-weighted means)."""
        if not self.sums:
            return {}
        s = self.sums
        rows = s["rows"]
        total_variance = s["sum_sq_x"] - s["sum_x"].pow(2).sum() / rows
        out = {
            "fvu": s["sq_error"] / total_variance.clamp_min(torch.finfo(torch.float64).tiny),
            "mse": s["sq_error"] / s["elements"],
            "cos_sim": s["cos_sim"] / rows,
            "l0": s["fire_counts"].sum() / rows,
            "dead_fraction": (s["fire_counts"] == 0).double().mean(),
            "dense_fraction": (s["fire_counts"] / rows > dense_threshold).double().mean(),
        }
        for name, value in s.items():
            if name.startswith("loss/"):
                out[name] = value / rows
        return {name: value.float() for name, value in out.items()}
