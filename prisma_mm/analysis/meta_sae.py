"""Meta-SAEs (Leask et al., ICLR 2025; Bussmann et al. 2024): a BatchTopK SAE trained on the
unit-norm decoder rows of another dictionary, whose latents ("meta-latents") show what each
latent is made of.

The data are the ``n`` rows ``u_i = W_dec[i] / ||W_dec[i]||`` (a crosscoder's rows are
flattened over its sources). The meta-SAE is a :class:`~prisma_mm.sae.BatchTopKSAE` with
``k = 4`` meta-latents per row on average and ``n_meta = n // 4`` meta-latents by default,
trained with Adam by :func:`prisma_mm.sae.fit_simple` on shuffled mini-batches of rows. By
default it has no decoder bias (``b_dec`` fixed at 0), so each row is decomposed as a sparse
sum ``u_i ≈ Σ_m c_im v_m`` of meta-latent directions ``v_m`` with nothing shared added.

After training, every row is encoded with the meta-SAE's inference encoding (its learned
BatchTopK threshold): ``c_i [n_meta]``. Outputs: each latent's decomposition
``[(meta-latent, weight), ...]``, each meta-latent's members (the latents it is part of, by
weight), the meta-SAE's FVU over the rows (about their mean, as in
:mod:`prisma_mm.analysis.metrics`), and a JSON export for the visual browser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary

__all__ = [
    "DecompositionScore",
    "MetaSAEResult",
    "decoder_rows",
    "decomposition_score",
    "meta_decompose",
    "train_meta_sae",
]


def decoder_rows(dictionary: Dictionary) -> Tensor:
    """The unit-norm decoder rows ``[n_latents, D]`` (float32) of ``dictionary``."""
    rows = dictionary.W_dec.detach().reshape(dictionary.W_dec.shape[0], -1).float()
    norms = rows.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise PrismaError(
            f"{int((norms == 0).sum())} decoder row(s) are zero: a meta-SAE needs directions"
        )
    return rows / norms


class _RowBatches:
    """Shuffled mini-batches of rows, a new order on each pass (seeded)."""

    def __init__(self, rows: Tensor, batch_size: int, seed: int) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        order = torch.randperm(self.rows.shape[0], generator=self.generator).to(self.rows.device)
        for start in range(0, self.rows.shape[0] - self.batch_size + 1, self.batch_size):
            yield self.rows[order[start : start + self.batch_size]]


@torch.no_grad()
def meta_decompose(meta: Dictionary, rows: Tensor) -> Tensor:
    """Meta-codes ``[n, n_meta]`` of ``rows [n, D]`` (inference encoding, eval mode)."""
    was_training = meta.training
    meta.eval()
    try:
        param = next(meta.parameters())
        return meta.encode(rows.to(param.device, param.dtype)).float()
    finally:
        meta.train(was_training)


@dataclass
class MetaSAEResult:
    """A trained meta-SAE and the decomposition of every latent.

    ``meta``: the meta-SAE; ``codes [n_latents, n_meta]``: each latent's meta-code;
    ``fvu``: the meta-SAE's fraction of variance unexplained over the rows; ``history``: the
    training log of :func:`~prisma_mm.sae.fit_simple`.
    """

    meta: Dictionary
    codes: Tensor
    fvu: float
    source: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def n_latents(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_meta(self) -> int:
        return int(self.codes.shape[1])

    def decomposition(self, latent: int) -> list[tuple[int, float]]:
        """``[(meta-latent, weight), ...]`` of one latent, largest weight first."""
        if not 0 <= latent < self.n_latents:
            raise PrismaError(f"latent {latent} is outside 0..{self.n_latents - 1}")
        code = self.codes[latent]
        active = code.nonzero().flatten()
        order = code[active].argsort(descending=True)
        return [(int(m), float(code[m])) for m in active[order]]

    def members(self, meta_latent: int) -> list[tuple[int, float]]:
        """``[(latent, weight), ...]``: the latents meta-latent ``meta_latent`` is part of,
        largest weight first."""
        if not 0 <= meta_latent < self.n_meta:
            raise PrismaError(f"meta-latent {meta_latent} is outside 0..{self.n_meta - 1}")
        column = self.codes[:, meta_latent]
        active = column.nonzero().flatten()
        order = column[active].argsort(descending=True)
        return [(int(i), float(column[i])) for i in active[order]]

    def meta_directions(self) -> Tensor:
        """``[n_meta, D]``: the meta-latents' unit-norm decoder directions."""
        return decoder_rows(self.meta)

    @property
    def mean_meta_per_latent(self) -> float:
        """How many meta-latents a latent's decoder row uses, on average."""
        return float((self.codes != 0).sum(1).float().mean())

    def to_dict(self) -> dict[str, Any]:
        """The browser export: summary, per-latent decompositions, per-meta-latent members."""
        nonzero = (self.codes != 0).sum(1).float()
        return {
            "format": "prisma-mm-meta-sae",
            "source": self.source,
            "meta": {
                "n_meta": self.n_meta,
                "k": int(getattr(self.meta.cfg, "k", 0)),
                "fvu": self.fvu,
                "explained_variance": 1.0 - self.fvu,
                "mean_meta_per_latent": self.mean_meta_per_latent,
                "n_latents_without_meta": int((nonzero == 0).sum()),
                "n_unused_meta": int(((self.codes != 0).sum(0) == 0).sum()),
            },
            "latents": [
                {"latent": i, "meta": [[m, round(w, 6)] for m, w in self.decomposition(i)]}
                for i in range(self.n_latents)
            ],
            "meta_latents": [
                {
                    "meta": m,
                    "n_latents": len(members),
                    "latents": [[i, round(w, 6)] for i, w in members],
                }
                for m in range(self.n_meta)
                for members in [self.members(m)]
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path/meta_sae`` (the meta-SAE, loadable with ``prisma_mm.sae.load``) and
        ``path/meta_sae.json`` (:meth:`to_dict`). Returns the JSON path."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.meta.save(path / "meta_sae")
        out = path / "meta_sae.json"
        out.write_text(json.dumps(self.to_dict(), indent=1))
        return out


def train_meta_sae(
    dictionary: Dictionary,
    *,
    k: int = 4,
    n_meta: int | None = None,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int | None = None,
    decoder_bias: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MetaSAEResult:
    """Train a BatchTopK meta-SAE on ``dictionary``'s unit-norm decoder rows (module doc).

    ``n_meta``: meta-latents (default ``max(1, n_latents // 4)``); ``k``: average meta-latents
    per row; ``steps`` Adam steps at ``lr`` on mini-batches of ``batch_size`` rows (default
    ``min(n_latents, 4096)``); ``decoder_bias``: learn a ``b_dec`` (off by default).
    """
    from prisma_mm.analysis.metrics import evaluate
    from prisma_mm.sae import BatchTopKSAE, fit_simple

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrismaError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise PrismaError(f"lr must be positive, got {lr!r}")
    if seed < 0:
        raise PrismaError(f"seed must be >= 0, got {seed}")
    if n_meta is not None and n_meta < 1:
        raise PrismaError(f"n_meta must be a positive integer, got {n_meta}")
    rows = decoder_rows(dictionary)
    if device is not None:
        rows = rows.to(device)
    n, width = rows.shape
    n_meta = max(1, n // 4) if n_meta is None else int(n_meta)
    batch_size = min(n, 4096) if batch_size is None else int(batch_size)
    if not 0 < batch_size <= n:
        raise PrismaError(f"batch_size must be in 1..{n} (the number of latents), got {batch_size}")
    if not 0 < k <= n_meta:
        raise PrismaError(f"k must be in 1..n_meta={n_meta}, got {k}")
    meta = BatchTopKSAE(d_in=width, n_latents=n_meta, k=k, seed=seed).to(rows.device)
    if not decoder_bias:
        meta.b_dec.requires_grad_(False)
    history = fit_simple(
        meta,
        _RowBatches(rows, batch_size, seed),
        steps=steps,
        lr=lr,
        init_from_first_batch=decoder_bias,
        progress=progress,
        log_every=max(1, steps // 20),
    )
    meta.metadata = {
        "meta_sae_of": {
            "architecture": dictionary.architecture,
            "n_latents": n,
            "hook": dictionary.metadata.get("hook"),
            "model": dictionary.metadata.get("model"),
        }
    }
    codes = meta_decompose(meta, rows).cpu()
    fvu = evaluate(meta, [rows], progress=False).fvu
    return MetaSAEResult(
        meta=meta.eval(),
        codes=codes,
        fvu=fvu,
        source=meta.metadata["meta_sae_of"],
        history=history,
    )


# ----- decomposition against known parts -------------------------------------------------------
@dataclass
class DecompositionScore:
    """Does the meta-SAE split each target latent into meta-latents that stand for its parts?

    For a target latent ``j`` with parts ``P_j`` (e.g. ``colour=red`` and ``shape=circle`` for a
    red-circle latent) and a meta-latent ``m`` of ``j``'s decomposition, ``share(m, p)`` is the
    fraction of ``m``'s other members (latents with a non-zero weight on ``m``, ``j`` left out)
    that carry value ``p``. ``part_share[j, p] = max_m share(m, p)`` (0 when ``j`` has no
    meta-latent with another member); ``score_j`` is its mean over ``P_j``; ``decomposed_j``:
    every part has ``part_share >= decomposed_at``. ``score`` / ``fraction_decomposed`` are
    the means over targets; ``shuffled_*`` the same with the latents' carried values permuted
    at random (``n_shuffles`` times; the meta-SAE and the targets' parts kept), ``p_value`` the
    fraction of shuffles scoring at least ``score`` (with the add-one rule).
    """

    score: float
    fraction_decomposed: float
    shuffled_score: float
    shuffled_score_std: float
    shuffled_fraction_decomposed: float
    p_value: float
    n_targets: int
    n_shuffles: int
    decomposed_at: float
    latents: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _part_shares(
    members: Tensor, carried: Tensor, latents: Tensor, parts: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Best share and its meta-latent (-1: none) ``[n_targets, max_parts]`` for every part of
    every target, all at once (``members [n, n_meta]`` bool, ``carried [n, n_values]`` bool;
    target ``t`` is latent ``latents[t]`` with parts ``parts[t]`` where ``valid[t]``)."""
    counts = members.T.float() @ carried.float()  # [n_meta, n_values]
    others = members.sum(0).float() - 1  # each target is a member of its own meta-latents
    same = counts.T[parts] - carried[latents[:, None], parts].float()[..., None]  # [t, P, m]
    share = torch.where(others > 0, same / others.clamp_min(1), torch.zeros_like(same))
    candidate = members[latents][:, None, :].expand_as(share)
    share = torch.where(candidate, share, torch.full_like(share, -1.0))
    best, meta = share.max(-1)
    none = best < 0
    best = torch.where(none | ~valid, torch.zeros_like(best), best)
    return best, torch.where(none | ~valid, torch.full_like(meta, -1), meta)


def decomposition_score(
    codes: Tensor,
    carried: Tensor,
    targets: Sequence[tuple[int, Sequence[int]]],
    *,
    value_names: Sequence[str] | None = None,
    decomposed_at: float = 0.5,
    n_shuffles: int = 200,
    seed: int = 0,
) -> DecompositionScore:
    """Score the meta-SAE decomposition of ``targets`` against their known parts
    (:class:`DecompositionScore`).

    ``codes [n_latents, n_meta]``: the meta-codes (:attr:`MetaSAEResult.codes`);
    ``carried [n_latents, n_values]`` bool: the values each latent stands for (e.g.
    :func:`prisma_mm.analysis.ground_truth.carried_values`); ``targets``: ``(latent, [part
    value indices])``; ``value_names`` names the parts in the per-latent rows.
    """
    import numpy as np

    codes = torch.as_tensor(codes)
    carried = torch.as_tensor(carried).bool()
    if codes.ndim != 2 or carried.ndim != 2 or codes.shape[0] != carried.shape[0]:
        raise PrismaError(
            f"codes {tuple(codes.shape)} and carried {tuple(carried.shape)} must be "
            "[n_latents, n_meta] and [n_latents, n_values] over the same latents"
        )
    if n_shuffles < 1 or not 0.0 < decomposed_at <= 1.0:
        raise PrismaError(
            f"n_shuffles must be >= 1 and decomposed_at in (0, 1], got {n_shuffles}, "
            f"{decomposed_at}"
        )
    target_list = [(int(j), [int(p) for p in parts]) for j, parts in targets]
    for j, parts in target_list:
        if not 0 <= j < codes.shape[0] or not parts:
            raise PrismaError(
                f"target latent {j} is outside 0..{codes.shape[0] - 1} or has no parts"
            )
        if any(not 0 <= p < carried.shape[1] for p in parts):
            raise PrismaError(f"target latent {j}: a part is outside 0..{carried.shape[1] - 1}")
    members = codes != 0
    if not target_list:
        nan = float("nan")
        return DecompositionScore(nan, nan, nan, nan, nan, nan, 0, n_shuffles, decomposed_at)
    width = max(len(parts) for _, parts in target_list)
    latents = torch.tensor([j for j, _ in target_list])
    parts = torch.tensor([parts + [0] * (width - len(parts)) for _, parts in target_list])
    valid = torch.tensor([[i < len(p) for i in range(width)] for _, p in target_list])
    n_parts = valid.sum(1).float()

    def summarise(best: Tensor) -> tuple[float, float]:
        scores = best.sum(1) / n_parts
        decomposed = ((best >= decomposed_at) | ~valid).all(1)
        return float(scores.mean()), float(decomposed.float().mean())

    best, meta = _part_shares(members, carried, latents, parts, valid)
    score, fraction = summarise(best)
    generator = torch.Generator().manual_seed(seed)
    shuffled_scores, shuffled_fractions = [], []
    for _ in range(n_shuffles):
        permuted = carried[torch.randperm(carried.shape[0], generator=generator)]
        s, f = summarise(_part_shares(members, permuted, latents, parts, valid)[0])
        shuffled_scores.append(s)
        shuffled_fractions.append(f)
    rows = []
    for t, (j, target_parts) in enumerate(target_list):
        rows.append(
            {
                "latent": j,
                "meta": [int(m) for m in members[j].nonzero().flatten().tolist()],
                "parts": [
                    {
                        "value": value_names[p] if value_names is not None else p,
                        "share": float(best[t, i]),
                        "meta_latent": int(meta[t, i]),
                    }
                    for i, p in enumerate(target_parts)
                ],
            }
        )
    at_least = sum(s >= score for s in shuffled_scores)
    return DecompositionScore(
        score=score,
        fraction_decomposed=fraction,
        shuffled_score=float(np.mean(shuffled_scores)),
        shuffled_score_std=float(np.std(shuffled_scores)),
        shuffled_fraction_decomposed=float(np.mean(shuffled_fractions)),
        p_value=(at_least + 1) / (n_shuffles + 1),
        n_targets=len(target_list),
        n_shuffles=n_shuffles,
        decomposed_at=decomposed_at,
        latents=rows,
    )
