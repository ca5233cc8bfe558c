"""Reconstruction and sparsity metrics of a dictionary, exact over any number of batches.

Every formula here is written out in docs/metrics.md and pinned to a hand-computed value in
tests/test_analysis_metrics.py. Over ``N`` evaluated tokens with targets ``x_n`` (flattened:
``[D]``, ``D = d`` for an SAE, ``d_out`` for a transcoder, ``n_sources * d`` for a
crosscoder), reconstructions ``x̂_n`` and codes ``z_n [n_latents]``:

- ``fvu = Σ_n ||x_n - x̂_n||² / Σ_n ||x_n - x̄||²`` with ``x̄`` the per-dimension mean over
  the evaluated set (not about zero, not per batch); ``explained_variance = 1 - fvu``;
- ``mse = Σ_n ||x_n - x̂_n||² / (N D)`` (per element);
- ``cosine_similarity = mean_n <x_n, x̂_n> / (||x_n|| ||x̂_n||)`` (0 where a norm is 0);
- ``relative_reconstruction_bias = Σ_n ||x̂_n||² / Σ_n <x_n, x̂_n>``
  (Rajamanoharan et al. 2024, eq. 10: ``γ = argmin_γ Σ_n ||x̂_n / γ - x_n||²``; < 1 is shrinkage);
- ``l0 = Σ_n #{i: z_ni ≠ 0} / N``; ``firing_frequency_i = #{n: z_ni ≠ 0} / N``;
  ``dead_fraction``: latents with frequency 0 over the N evaluated tokens (the window is the
  evaluated split, not training's window in tokens); ``dense_fraction``: latents with
  frequency > ``dense_threshold``.

Training uses the same accumulator: per step for the batch's FVU, MSE and cosine similarity
(:func:`reconstruction_metrics`), and over the eval split for validation, summed over processes
by :meth:`MetricsAccumulator.all_reduce`.

Sums are float64. The total variance is kept exactly while streaming through shifted sums
``S1 = Σ (x - s)``, ``S2 = Σ (x - s)²`` per dimension (``s``: the first batch's mean, which
avoids cancellation when the mean is large): ``Σ_n ||x_n - x̄||² = Σ_j (S2_j - S1_j² / N)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary

__all__ = [
    "DEFAULT_DENSE_THRESHOLD",
    "EmptyEvaluation",
    "Metrics",
    "MetricsAccumulator",
    "evaluate",
    "plot_density_histogram",
    "reconstruction_metrics",
    "split_batch",
]

DEFAULT_DENSE_THRESHOLD = 0.1


class EmptyEvaluation(PrismaError):
    """The evaluated data held no rows."""


@dataclass
class Metrics:
    """Metrics of one dictionary over ``n_tokens`` evaluated tokens (definitions: module doc).

    ``firing_frequency [n_latents]`` (float64) is kept for the density histogram and left out
    of :meth:`to_dict` unless asked for; ``fvu_per_source`` is set for crosscoders.
    """

    n_tokens: int
    n_latents: int
    d: int
    fvu: float
    explained_variance: float
    mse: float
    cosine_similarity: float
    relative_reconstruction_bias: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    firing_frequency: np.ndarray = field(repr=False)
    fvu_per_source: list[float] | None = None
    losses: dict[str, float] = field(default_factory=dict)

    def to_dict(self, frequencies: bool = False) -> dict[str, Any]:
        """JSON-ready fields (``firing_frequency`` only with ``frequencies=True``)."""
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "n_latents": self.n_latents,
            "d": self.d,
            "fvu": self.fvu,
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "cosine_similarity": self.cosine_similarity,
            "relative_reconstruction_bias": self.relative_reconstruction_bias,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "dense_threshold": self.dense_threshold,
            "n_dead": int((self.firing_frequency == 0).sum()),
        }
        if self.fvu_per_source is not None:
            out["fvu_per_source"] = list(self.fvu_per_source)
        out.update({f"loss/{name}": value for name, value in self.losses.items()})
        if frequencies:
            out["firing_frequency"] = self.firing_frequency.tolist()
        return out

    def rows(self) -> list[tuple[str, str]]:
        """``(name, formatted value)`` pairs for a printed table."""
        rows = [
            ("tokens", f"{self.n_tokens}"),
            ("latents", f"{self.n_latents}"),
            ("fvu", f"{self.fvu:.4f}"),
            ("explained variance", f"{self.explained_variance:.4f}"),
            ("mse (per element)", f"{self.mse:.4g}"),
            ("cosine similarity", f"{self.cosine_similarity:.4f}"),
            ("relative recon. bias", f"{self.relative_reconstruction_bias:.4f}"),
            ("l0", f"{self.l0:.2f}"),
            (f"dead fraction (no firing in {self.n_tokens} tokens)", f"{self.dead_fraction:.4f}"),
            (f"dense fraction (>{self.dense_threshold:g})", f"{self.dense_fraction:.4f}"),
        ]
        for s, value in enumerate(self.fvu_per_source or []):
            rows.append((f"fvu source {s}", f"{value:.4f}"))
        return rows


class MetricsAccumulator:
    """Float64 running sums over batches; :meth:`compute` gives the exact :class:`Metrics`
    of everything added, however it was cut into batches (or over processes: call
    :meth:`all_reduce` once, on every process, before :meth:`compute`).

    ``n_sources``: crosscoders, for the per-source FVU (targets ``[batch, n_sources, d]``).
    ``n_latents = 0``: reconstruction metrics only (no firing counts).
    """

    def __init__(
        self,
        n_latents: int,
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
        n_sources: int | None = None,
    ) -> None:
        if not 0.0 <= dense_threshold <= 1.0:
            raise PrismaError(f"dense_threshold must be in [0, 1], got {dense_threshold}")
        self.n_latents = int(n_latents)
        self.dense_threshold = float(dense_threshold)
        self.n_sources = n_sources
        self.n_tokens = 0
        self.fire_count: Tensor | None = None  # [n_latents]
        self.shift: Tensor | None = None
        self.sum_shifted: Tensor | None = None  # [D]  Σ (x - s)
        self.sumsq_shifted: Tensor | None = None  # [D]  Σ (x - s)²
        self.sq_error: Tensor | None = None  # [D]  Σ (x - x̂)²
        self.scalars: Tensor | None = None  # [3]: Σ ||x̂||², Σ <x, x̂>, Σ cos
        self.loss_sums: dict[str, Tensor] = {}  # row-weighted sums of named scalar losses

    def _start(self, d: int, device: torch.device) -> None:
        zeros = torch.zeros(d, dtype=torch.float64, device=device)
        self.shift = zeros.clone()
        self.sum_shifted, self.sumsq_shifted, self.sq_error = (
            zeros.clone(),
            zeros.clone(),
            zeros.clone(),
        )
        self.scalars = torch.zeros(3, dtype=torch.float64, device=device)
        self.fire_count = torch.zeros(self.n_latents, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(
        self,
        target: Tensor,
        recon: Tensor,
        fire_counts: Tensor | None = None,
        losses: dict[str, Tensor] | None = None,
    ) -> None:
        """Add one batch. ``target, recon [batch, ...]`` (rows flattened to ``[batch, D]``);
        ``fire_counts [n_latents]``: in how many of the batch's rows each latent is non-zero
        (required unless ``n_latents == 0``); ``losses``: named scalar terms of the batch, kept
        as row-weighted means."""
        # sums stay on the batch's device (no transfer per batch), in float64
        x = target.detach().reshape(target.shape[0], -1).to(torch.float64)
        x_hat = recon.detach().reshape(recon.shape[0], -1).to(x.device, torch.float64)
        if x.shape != x_hat.shape:
            raise PrismaError(
                f"target {tuple(target.shape)} and reconstruction {tuple(recon.shape)} differ"
            )
        if self.n_latents and (fire_counts is None or fire_counts.numel() != self.n_latents):
            got = "none" if fire_counts is None else fire_counts.numel()
            raise PrismaError(f"fire_counts has {got} entries for {self.n_latents} latents")
        n = x.shape[0]
        if n == 0:
            return
        if self.shift is None:
            self._start(x.shape[1], x.device)
            assert self.shift is not None
            self.shift.copy_(x.mean(0))  # the first batch's mean: no cancellation later
        elif x.shape[1] != self.shift.numel():
            raise PrismaError(
                f"batch rows have {x.shape[1]} values; earlier batches had {self.shift.numel()}"
            )
        assert self.sum_shifted is not None and self.sumsq_shifted is not None
        assert self.sq_error is not None and self.scalars is not None
        assert self.fire_count is not None
        x = x.to(self.shift.device)
        x_hat = x_hat.to(self.shift.device)
        centred = x - self.shift
        self.sum_shifted += centred.sum(0)
        self.sumsq_shifted += centred.pow(2).sum(0)
        self.sq_error += (x - x_hat).pow(2).sum(0)
        dots = (x * x_hat).sum(1)
        recon_norm_sq = x_hat.pow(2).sum(1)
        norms = x.pow(2).sum(1).sqrt() * recon_norm_sq.sqrt()
        cos = torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots))
        self.scalars += torch.stack([recon_norm_sq.sum(), dots.sum(), cos.sum()])
        if self.n_latents:
            assert fire_counts is not None
            self.fire_count += fire_counts.detach().to(self.fire_count.device, torch.float64)
        for name, value in (losses or {}).items():
            weighted = value.detach().to(self.shift.device, torch.float64).reshape(()) * n
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + weighted
        self.n_tokens += n

    @torch.no_grad()
    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Combine the sums of every process (no-op outside torch.distributed); every process
        then holds the totals. Call once, on every process. The shifted sums of each process
        are re-centred on the global mean (Chan et al.'s pairwise update), so the variance stays
        exact. A process that saw no rows contributes zeros, on ``device`` (the communication
        backend's device)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        dist = torch.distributed
        here = self.shift.device if self.shift is not None else torch.device(device)
        d = torch.tensor([0 if self.shift is None else self.shift.numel()], device=here)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        names: list[Any] = [None] * world
        dist.all_gather_object(names, sorted(self.loss_sums))
        if int(d) == 0:
            return  # no process saw a row
        if self.shift is None:
            self._start(int(d), here)
        assert self.shift is not None and self.sum_shifted is not None
        assert self.sumsq_shifted is not None and self.sq_error is not None
        assert self.scalars is not None and self.fire_count is not None
        n_local = torch.tensor(float(self.n_tokens), dtype=torch.float64, device=here)
        safe_n = n_local.clamp_min(1.0)
        mean_local = self.shift + self.sum_shifted / safe_n
        m2_local = self.sumsq_shifted - self.sum_shifted.pow(2) / safe_n
        n_total = n_local.clone()
        dist.all_reduce(n_total)
        mean = mean_local * n_local
        dist.all_reduce(mean)
        mean /= n_total.clamp_min(1.0)
        m2 = m2_local + n_local * (mean_local - mean).pow(2)
        dist.all_reduce(m2)
        self.shift, self.sum_shifted, self.sumsq_shifted = mean, torch.zeros_like(mean), m2
        for tensor in (self.sq_error, self.scalars, self.fire_count):
            dist.all_reduce(tensor)
        for name in sorted(set().union(*names)):
            value = self.loss_sums.get(name)
            value = torch.zeros((), dtype=torch.float64, device=here) if value is None else value
            dist.all_reduce(value)
            self.loss_sums[name] = value
        self.n_tokens = int(n_total)

    def total_variance_per_dim(self) -> Tensor:
        """``[D]``: ``Σ_n (x_nj - x̄_j)²`` for each flattened dimension ``j``."""
        if self.n_tokens == 0:
            raise EmptyEvaluation("no tokens were evaluated: the data yielded no rows")
        assert self.sumsq_shifted is not None and self.sum_shifted is not None
        return (self.sumsq_shifted - self.sum_shifted.pow(2) / self.n_tokens).clamp_min(0.0)

    def reconstruction(self) -> dict[str, Tensor]:
        """``fvu``, ``mse`` and ``cosine_similarity`` so far as 0-dim float64 tensors on the
        sums' device (no host synchronisation: cheap to log every step)."""
        variance = self.total_variance_per_dim().sum()
        assert self.sq_error is not None and self.scalars is not None
        sq_error = self.sq_error.sum()
        fvu = torch.where(variance > 0, sq_error / variance.clamp_min(1e-300), math.inf)
        return {
            "fvu": fvu,
            "mse": sq_error / (self.n_tokens * self.sq_error.numel()),
            "cosine_similarity": self.scalars[2] / self.n_tokens,
        }

    def compute(self) -> Metrics:
        """The metrics of every row added so far."""
        variance = self.total_variance_per_dim().cpu()
        assert self.sq_error is not None and self.scalars is not None
        assert self.fire_count is not None
        recon_sq, dot, cos_sum = self.scalars.tolist()
        sq_error_per_dim = self.sq_error.cpu()
        reconstruction = {k: float(v) for k, v in self.reconstruction().items()}
        per_source = None
        if self.n_sources:
            err_s = sq_error_per_dim.reshape(self.n_sources, -1).sum(1)
            var_s = variance.reshape(self.n_sources, -1).sum(1)
            per_source = [
                float(e / v) if v > 0 else math.inf for e, v in zip(err_s.tolist(), var_s.tolist())
            ]
        frequency = (self.fire_count / self.n_tokens).cpu().numpy()
        d = int(variance.numel())
        return Metrics(
            n_tokens=self.n_tokens,
            n_latents=self.n_latents,
            d=d,
            fvu=reconstruction["fvu"],
            explained_variance=1.0 - reconstruction["fvu"],
            mse=reconstruction["mse"],
            cosine_similarity=reconstruction["cosine_similarity"],
            relative_reconstruction_bias=recon_sq / dot if dot != 0 else math.nan,
            l0=float(frequency.sum()),
            dead_fraction=float((frequency == 0).mean()) if frequency.size else math.nan,
            dense_fraction=float((frequency > self.dense_threshold).mean())
            if frequency.size
            else math.nan,
            dense_threshold=self.dense_threshold,
            firing_frequency=frequency,
            fvu_per_source=per_source,
            losses={k: float(v) / self.n_tokens for k, v in sorted(self.loss_sums.items())},
        )


def reconstruction_metrics(target: Tensor, recon: Tensor) -> dict[str, Tensor]:
    """``fvu``, ``mse``, ``cosine_similarity`` of one batch (0-dim float64 tensors, no host
    synchronisation), by the formulas of :class:`MetricsAccumulator`. ``target, recon
    [batch, ...]``."""
    acc = MetricsAccumulator(0)
    acc.update(target, recon)
    return acc.reconstruction()


def split_batch(dictionary: Dictionary, batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(input, target)`` of a training or evaluation batch for ``dictionary``.

    Accepts ``(x, target)`` pairs, or one tensor as the cache reader yields it: SAE
    ``[batch, d]`` (or ``[batch, 1, d]``); transcoder ``[batch, 2, d]`` (input hook, output
    hook); crosscoder ``[batch, n_sources, d]``. ``target`` is None where it is the input.
    """
    architecture = getattr(dictionary, "architecture", "")
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
            raise PrismaError("batches must be tensors or (input, target) tensor pairs")
        return batch[0], batch[1]
    if not isinstance(batch, Tensor):
        raise PrismaError(f"batches must be tensors, got {type(batch).__name__}")
    if architecture == "transcoder":
        if batch.ndim == 3 and batch.shape[1] == 2:
            return batch[:, 0], batch[:, 1]
        raise PrismaError(
            f"a transcoder reads two hooks [input, output]: (input, target) pairs or "
            f"[batch, 2, d] batches; got {tuple(batch.shape)}: set data.hooks to "
            "[input_hook, output_hook]"
        )
    if architecture == "crosscoder":
        if batch.ndim != 3:
            raise PrismaError(
                f"a crosscoder reads several hooks: [batch, n_sources, d] batches; got "
                f"{tuple(batch.shape)}: set data.hooks to the list of its sources"
            )
        return batch, None
    if batch.ndim == 3 and batch.shape[1] == 1:
        batch = batch[:, 0]
    if batch.ndim != 2:
        raise PrismaError(
            f"a {architecture or type(dictionary).__name__} dictionary reads [batch, d] rows of "
            f"one hook; got {tuple(batch.shape)}: set data.hooks to a single hook name"
        )
    return batch, None


@torch.no_grad()
def evaluate(
    dictionary: Dictionary,
    batches: Iterable[Any],
    *,
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Metrics:
    """Metrics of ``dictionary`` over ``batches`` (see :func:`split_batch` for their shapes),
    stopping after ``max_tokens`` rows when given. The dictionary runs in eval mode (its
    inference encoding: e.g. BatchTopK's learned threshold) and is restored afterwards."""
    if max_tokens is not None and max_tokens <= 0:
        raise PrismaError(f"max_tokens must be positive, got {max_tokens}")
    n_sources = getattr(dictionary.cfg, "n_sources", None)
    if getattr(dictionary, "architecture", "") != "crosscoder":
        n_sources = None
    acc = MetricsAccumulator(dictionary.cfg.n_latents, dense_threshold, n_sources)
    param = next(dictionary.parameters(), None)
    device = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else "cpu")
    )
    dtype = param.dtype if param is not None else torch.float32
    was_training = dictionary.training
    dictionary.eval()
    bar = tqdm(total=max_tokens, desc="evaluate", unit="tok", unit_scale=True, disable=not progress)
    try:
        for batch in batches:
            x, target = split_batch(dictionary, batch)
            if max_tokens is not None:
                room = max_tokens - acc.n_tokens
                if room <= 0:
                    break
                x = x[:room]
                target = None if target is None else target[:room]
            x = x.to(device, dtype)
            target = None if target is None else target.to(device, dtype)
            out = dictionary(x, target)
            acc.update(x if target is None else target, out.recon, out.fire_counts())
            bar.update(x.shape[0])
    finally:
        bar.close()
        dictionary.train(was_training)
    return acc.compute()


def plot_density_histogram(
    metrics: Metrics | np.ndarray, path: str | Path, title: str | None = None, bins: int = 50
) -> Path:
    """Histogram of ``log10(firing frequency)`` over the latents that fired, written as a PNG;
    the number of dead latents (frequency 0, no logarithm) is given in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frequency = metrics.firing_frequency if isinstance(metrics, Metrics) else np.asarray(metrics)
    alive = frequency[frequency > 0]
    n_dead = int((frequency == 0).sum())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        ax.hist(np.log10(alive), bins=bins, color="#3b6ea5", label=f"{alive.size} alive")
    ax.plot([], [], " ", label=f"{n_dead} dead (never fired)")
    ax.set_xlabel("log10(firing frequency)")
    ax.set_ylabel("latents")
    ax.set_title(title or "feature density")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
