"""Score a dictionary's latents against known ground-truth factors (e.g. the toy world).

Inputs are latent activations and binary labels over the same rows (images or patches):
``codes [n, n_latents]`` and ``labels [n, n_values]``. For every factor value we find the
single latent whose activation best separates the rows that have the value from those that
do not (by AUROC), and report its AUROC and best F1. Higher activation means "present": a
latent that fires on the *absence* of a value has AUROC below 0.5 and does not detect it.

Definitions (also in docs/toyworld.md):

* ``auroc[l, v]``: the Mann-Whitney probability that latent ``l`` is larger on a random
  positive row of value ``v`` than on a random negative one, ties counting one half.
* ``best_latent[v] = argmax_l auroc[l, v]``; ``f1[v]``: the best F1 of ``best_latent[v]``
  over all thresholds ("present" when activation >= threshold).
* detected: ``best auroc >= threshold`` (default 0.9); ``fraction_detected`` over the values
  that have both positive and negative rows.
* splitting: ``n_detecting[v]``, how many latents detect value ``v``; ``splitting`` is its
  mean over detected values (1 = each detected value has exactly one latent).
* composition: a latent that detects values of two or more different factors (e.g. "red" and
  "circle"); ``composition`` is the fraction of detecting latents that do.
* **summary score** (one number per dictionary): the mean over factor values of
  ``max(0, 2 * heldout_auroc - 1)`` at patch level (image level when no patch data is given),
  where ``heldout_auroc[v]`` is the AUROC, on the second half of the rows, of the latent that
  is best for ``v`` on the first half. Choosing on one half and measuring on the other keeps
  the best-of-many-latents luck out: 1 means every value has a perfect detector, and a
  dictionary unrelated to the factors scores near 0 however many latents it has. Rows are
  split in order, so per-image patch rows (image-major) split by image.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_mm.errors import PrismaError

DEFAULT_THRESHOLD = 0.9
_CHUNK_ELEMENTS = 2**23  # rows x latents ranked at once: ~50 bytes each, so ~0.4 GB


def _as_tensor(x: Any, name: str, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 2:
        raise PrismaError(f"{name} must be 2-D [rows, columns], got shape {tuple(t.shape)}")
    return t.to(dtype)


def _check_rows(codes: Tensor, labels: Tensor) -> None:
    if codes.shape[0] != labels.shape[0]:
        raise PrismaError(
            f"codes have {codes.shape[0]} rows but labels have {labels.shape[0]}: give one label "
            "row per activation row (same images or patches, same order)"
        )


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of each column of ``x [n, m]`` with ties given their average rank.

    Returns float64 ``[n, m]``.
    """
    n = x.shape[0]
    sorted_x, order = torch.sort(x, dim=0)
    pos = torch.arange(n, dtype=torch.long).unsqueeze(1).expand_as(sorted_x)
    new = torch.ones_like(sorted_x, dtype=torch.bool)
    new[1:] = sorted_x[1:] != sorted_x[:-1]
    last = torch.ones_like(new)
    last[:-1] = new[1:]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=0).values
    end = torch.where(last, pos, torch.full_like(pos, n)).flip(0).cummin(dim=0).values.flip(0)
    avg = (start + end).double() / 2 + 1
    ranks = torch.empty_like(avg)
    ranks.scatter_(0, order, avg)
    return ranks


def auroc(codes: Any, labels: Any, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """AUROC of every latent for every value: float64 ``[n_latents, n_values]``.

    ``codes [n, n_latents]`` (any real dtype), ``labels [n, n_values]`` (0/1 or bool).
    Rank based (Mann-Whitney U) with average ranks for ties, computed for all pairs at once and
    in chunks of latents so that ``n x chunk <= chunk_elements``. Values with no positive or
    no negative row get NaN.
    """
    codes = _as_tensor(codes, "codes", torch.float32)
    y = _as_tensor(labels, "labels", torch.float64)
    _check_rows(codes, y)
    n, n_latents = codes.shape
    n_pos = y.sum(0)
    n_neg = n - n_pos
    chunk = max(1, chunk_elements // max(1, n))
    out = torch.empty(n_latents, y.shape[1], dtype=torch.float64)
    for lo in range(0, n_latents, chunk):
        ranks = average_ranks(codes[:, lo : lo + chunk])
        rank_sum = ranks.T @ y  # [chunk, n_values]
        out[lo : lo + chunk] = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out[:, (n_pos == 0) | (n_neg == 0)] = float("nan")
    return out


def best_f1(scores: Any, labels: Any) -> tuple[Tensor, Tensor]:
    """Best F1 over thresholds, column by column.

    ``scores [n, m]`` and ``labels [n, m]`` (column j of labels is scored by column j of
    scores). A row is predicted present when its score >= the threshold; thresholds are the
    distinct scores. Returns ``(f1 [m], threshold [m])`` (NaN where a column has no positive).
    """
    s = _as_tensor(scores, "scores", torch.float64)
    y = _as_tensor(labels, "labels", torch.float64)
    if s.shape != y.shape:
        raise PrismaError(f"scores {tuple(s.shape)} and labels {tuple(y.shape)} must match")
    n = s.shape[0]
    sorted_s, order = torch.sort(s, dim=0, descending=True)
    tp = torch.gather(y, 0, order).cumsum(0)
    predicted = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    n_pos = y.sum(0)
    f1 = 2 * tp / (predicted + n_pos)
    end_of_tie = torch.ones_like(sorted_s, dtype=torch.bool)
    end_of_tie[:-1] = sorted_s[:-1] != sorted_s[1:]
    f1 = torch.where(end_of_tie, f1, torch.full_like(f1, -1.0))
    best, at = f1.max(0)
    threshold = sorted_s.gather(0, at.unsqueeze(0)).squeeze(0)
    best[n_pos == 0] = float("nan")
    threshold[n_pos == 0] = float("nan")
    return best, threshold


def average_precision(scores: Any, labels: Any) -> Tensor:
    """Average precision of each column: ``scores [n, m]``, ``labels [n, m]`` -> ``[m]``.

    The mean, over positive rows, of the precision at the threshold equal to their score
    (tied rows share one threshold). NaN where a column has no positive.
    """
    s = _as_tensor(scores, "scores", torch.float64)
    y = _as_tensor(labels, "labels", torch.float64)
    if s.shape != y.shape:
        raise PrismaError(f"scores {tuple(s.shape)} and labels {tuple(y.shape)} must match")
    n = s.shape[0]
    sorted_s, order = torch.sort(s, dim=0, descending=True)
    y_sorted = torch.gather(y, 0, order)
    tp = y_sorted.cumsum(0)
    count = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1).expand_as(tp)
    # within a tie group every row takes the counts at the group's end
    end = torch.ones_like(sorted_s, dtype=torch.bool)
    end[:-1] = sorted_s[:-1] != sorted_s[1:]
    pos = torch.arange(n).unsqueeze(1).expand_as(sorted_s)
    group_end = torch.where(end, pos, torch.full_like(pos, n)).flip(0).cummin(0).values.flip(0)
    precision = tp.gather(0, group_end) / count.gather(0, group_end)
    n_pos = y.sum(0)
    return (precision * y_sorted).sum(0) / n_pos


@dataclass
class LevelScores:
    """Scores of one dictionary at one level (patch or image); tensors indexed by value."""

    auroc: Tensor  # [n_values] best AUROC (NaN: value not scorable at this level)
    best_latent: Tensor  # [n_values] long
    f1: Tensor  # [n_values] best F1 of best_latent
    f1_threshold: Tensor  # [n_values]
    n_positive: Tensor  # [n_values] long
    n_detecting: Tensor  # [n_values] long: latents with AUROC >= threshold (splitting)
    n_values_per_latent: Tensor  # [n_latents] long: values each latent detects
    n_factors_per_latent: Tensor  # [n_latents] long: distinct factors among them
    heldout_auroc: Tensor  # [n_values] AUROC on rows [n/2:] of the best latent on rows [:n/2]
    threshold: float
    n_rows: int

    @property
    def scorable(self) -> Tensor:
        """Bool ``[n_values]``: values with both positive and negative rows."""
        return ~torch.isnan(self.auroc)

    @property
    def detected(self) -> Tensor:
        return self.scorable & (self.auroc >= self.threshold)

    @property
    def fraction_detected(self) -> float:
        n = int(self.scorable.sum())
        return float(self.detected.sum()) / n if n else float("nan")

    @property
    def splitting(self) -> float:
        """Mean number of detecting latents over detected values (NaN if none detected)."""
        d = self.detected
        return float(self.n_detecting[d].double().mean()) if d.any() else float("nan")

    @property
    def composition(self) -> float:
        """Fraction of detecting latents that detect values of two or more factors."""
        detecting = self.n_values_per_latent > 0
        if not detecting.any():
            return float("nan")
        return float((self.n_factors_per_latent[detecting] >= 2).double().mean())

    @property
    def recovery(self) -> float:
        """Mean over values scorable in both halves of ``max(0, 2 * heldout_auroc - 1)``."""
        ok = ~torch.isnan(self.heldout_auroc)
        if not ok.any():
            return float("nan")
        return float((2 * self.heldout_auroc[ok] - 1).clamp(min=0).mean())


@dataclass
class GroundTruthReport:
    """Ground-truth scores of one dictionary; ``score`` is the one summary number."""

    value_names: list[str]
    patch: LevelScores | None
    image: LevelScores | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Patch-level :attr:`LevelScores.recovery` (image level when no patch data)."""
        level = self.patch if self.patch is not None else self.image
        return level.recovery if level is not None else float("nan")

    def summary(self) -> dict[str, float]:
        """Flat dict of the headline numbers (for tables and JSON)."""
        out: dict[str, float] = {"score": self.score}
        for name, level in (("patch", self.patch), ("image", self.image)):
            if level is None:
                continue
            out[f"{name}_recovery"] = level.recovery
            out[f"{name}_fraction_detected"] = level.fraction_detected
            out[f"{name}_mean_auroc"] = float(level.auroc[level.scorable].mean())
            out[f"{name}_mean_f1"] = float(level.f1[level.scorable].mean())
            out[f"{name}_splitting"] = level.splitting
            out[f"{name}_composition"] = level.composition
        return out

    def per_value(self) -> list[dict[str, Any]]:
        """One row per factor value: best latent, AUROC, F1 and splitting at each level."""
        rows = []
        for v, name in enumerate(self.value_names):
            row: dict[str, Any] = {"value": name}
            for level_name, level in (("patch", self.patch), ("image", self.image)):
                if level is None:
                    continue
                row[f"{level_name}_latent"] = int(level.best_latent[v])
                row[f"{level_name}_auroc"] = float(level.auroc[v])
                row[f"{level_name}_heldout_auroc"] = float(level.heldout_auroc[v])
                row[f"{level_name}_f1"] = float(level.f1[v])
                row[f"{level_name}_n_detecting"] = int(level.n_detecting[v])
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "values": self.per_value(), **self.extra}


def _factor_of(name: str) -> str:
    return name.split("=", 1)[0]


def _best(au: Tensor) -> tuple[Tensor, Tensor]:
    """Best AUROC and its latent per value from ``au [L, V]``; NaN where unscorable."""
    value, latent = torch.nan_to_num(au, nan=-1.0).max(0)
    return torch.where(value < 0, torch.full_like(value, float("nan")), value), latent


def score_level(
    codes: Any,
    labels: Any,
    value_names: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> LevelScores:
    """Scores at one level: ``codes [n, n_latents]``, ``labels [n, n_values]``.

    ``value_names`` are ``"factor=value"`` strings (the part before ``=`` groups values into
    factors, for composition).
    """
    codes = _as_tensor(codes, "codes", torch.float32)
    y = _as_tensor(labels, "labels", torch.float64)
    _check_rows(codes, y)
    if y.shape[1] != len(value_names):
        raise PrismaError(
            f"labels have {y.shape[1]} columns but {len(value_names)} value names were given"
        )
    au = auroc(codes, y, chunk_elements)  # [L, V]
    best_auroc, best_latent = _best(au)
    half = codes.shape[0] // 2
    selection_auroc, chosen = _best(auroc(codes[:half], y[:half], chunk_elements))
    # [V, V] matrix of the chosen latents against every value; we need its diagonal
    heldout = auroc(codes[half:, chosen], y[half:], chunk_elements).diagonal().clone()
    heldout[torch.isnan(selection_auroc)] = float("nan")
    f1, f1_threshold = best_f1(codes[:, best_latent].double(), y)
    unscorable = torch.isnan(best_auroc)
    f1[unscorable] = float("nan")
    f1_threshold[unscorable] = float("nan")
    detects = torch.nan_to_num(au, nan=-1.0) >= threshold  # [L, V]
    factors = sorted({_factor_of(v) for v in value_names})
    factor_of_value = torch.tensor([factors.index(_factor_of(v)) for v in value_names])
    per_factor = torch.zeros(codes.shape[1], len(factors), dtype=torch.long)
    per_factor.index_add_(1, factor_of_value, detects.long())
    return LevelScores(
        auroc=best_auroc,
        best_latent=best_latent,
        f1=f1,
        f1_threshold=f1_threshold,
        n_positive=y.sum(0).long(),
        n_detecting=detects.sum(0),
        n_values_per_latent=detects.sum(1),
        n_factors_per_latent=(per_factor > 0).sum(1),
        heldout_auroc=heldout,
        threshold=threshold,
        n_rows=int(codes.shape[0]),
    )


def score_ground_truth(
    value_names: Sequence[str],
    patch_codes: Any = None,
    patch_labels: Any = None,
    image_codes: Any = None,
    image_labels: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> GroundTruthReport:
    """Score a dictionary at patch and/or image level.

    Patch level: ``patch_codes [n_patches_total, n_latents]`` and ``patch_labels
    [n_patches_total, n_values]``, or per image ``[n_images, n_patches, ...]`` (flattened).
    Image level: ``image_codes [n_images, n_latents]`` and ``image_labels [n_images,
    n_values]``; when ``image_codes`` is omitted but per-image patch codes
    ``[n_images, n_patches, n_latents]`` are given, image codes are their max over patches.
    """
    patch = image = None
    if (patch_codes is None) != (patch_labels is None):
        raise PrismaError("give patch_codes and patch_labels together (or neither)")
    if image_labels is None and image_codes is not None:
        raise PrismaError("image_codes need image_labels [n_images, n_values]")
    if patch_codes is not None:
        pc = torch.as_tensor(
            np.asarray(patch_codes) if not isinstance(patch_codes, Tensor) else patch_codes
        )
        pl = torch.as_tensor(
            np.asarray(patch_labels) if not isinstance(patch_labels, Tensor) else patch_labels
        )
        if image_codes is None and image_labels is not None and pc.ndim == 3:
            image_codes = pc.float().amax(1)
        patch = score_level(
            pc.reshape(-1, pc.shape[-1]),
            pl.reshape(-1, pl.shape[-1]),
            value_names,
            threshold,
            chunk_elements,
        )
    if image_labels is not None:
        if image_codes is None:
            raise PrismaError(
                "image-level scoring needs image_codes, or per-image patch_codes "
                "[n_images, n_patches, n_latents] to take the max over patches"
            )
        image = score_level(image_codes, image_labels, value_names, threshold, chunk_elements)
    if patch is None and image is None:
        raise PrismaError(
            "nothing to score: give patch_codes/patch_labels or image_codes/image_labels"
        )
    return GroundTruthReport(list(value_names), patch, image)


# ----- conjunctions --------------------------------------------------------------------------
#: Pairs of object factors whose conjunctions are labelled by default: every pair of the toy
#: world's object factors (shape x colour, colour x position, ...).
CONJUNCTION_PAIRS: tuple[tuple[str, str], ...] = tuple(
    itertools.combinations(("shape", "colour", "size", "position", "rotation", "texture"), 2)
)
CONJUNCTION_SEPARATOR = " & "


def conjunction_parts(
    pairs: Sequence[tuple[str, str]] = CONJUNCTION_PAIRS, value_names: Sequence[str] | None = None
) -> list[tuple[int, int]]:
    """``(a, b)`` indices into ``value_names`` (default the toy world's) of every conjunction
    of ``pairs``: for each factor pair, every value of the first with every value of the
    second, in label order."""
    if value_names is None:
        from prisma_mm.data.toyworld import VALUE_NAMES as value_names
    by_factor: dict[str, list[int]] = {}
    for i, name in enumerate(value_names):
        by_factor.setdefault(_factor_of(name), []).append(i)
    unknown = sorted({f for pair in pairs for f in pair if f not in by_factor})
    if unknown:
        raise PrismaError(
            f"unknown factor(s) {unknown} in the conjunction pairs: use {sorted(by_factor)}"
        )
    return [(a, b) for fa, fb in pairs for a in by_factor[fa] for b in by_factor[fb]]


def conjunction_names(
    parts: Sequence[tuple[int, int]], value_names: Sequence[str] | None = None
) -> list[str]:
    """``"shape=circle & colour=red"`` names of the conjunctions ``parts``."""
    if value_names is None:
        from prisma_mm.data.toyworld import VALUE_NAMES as value_names
    return [f"{value_names[a]}{CONJUNCTION_SEPARATOR}{value_names[b]}" for a, b in parts]


def patch_conjunctions(
    scene: Any, owner: np.ndarray, patch_grid: int | Sequence[int], parts: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Per-patch conjunction labels uint8 ``[rows, cols, n_conjunctions]`` of a toy-world
    scene: conjunction ``(a, b)`` is present in a patch when ONE object having both values
    ``a`` and ``b`` has a visible pixel in it (a red square beside a blue circle makes neither
    "red circle"), the rule of the toy world's value labels applied per object.

    ``owner``: int ``[size, size]`` from :func:`prisma_mm.data.toyworld.render_scene`;
    ``parts``: from :func:`conjunction_parts`; patches row-major.
    """
    from prisma_mm.data.toyworld import patch_owners

    blocks = patch_owners(owner, patch_grid)
    rows, cols = blocks.shape[:2]
    index = {(int(a), int(b)): i for i, (a, b) in enumerate(parts)}
    out = np.zeros((rows, cols, len(parts)), np.uint8)
    for k, obj in enumerate(scene.objects):
        values = obj.values()
        hits = [index[p] for p in itertools.permutations(values, 2) if p in index]
        if hits:
            out[:, :, hits] |= (blocks == k).any(-1)[:, :, None]
    return out


def conjunction_detectors(
    values_auroc: Tensor,
    conjunctions_auroc: Tensor,
    parts: Sequence[tuple[int, int]],
    threshold: float = DEFAULT_THRESHOLD,
    margin: float = 0.05,
) -> Tensor:
    """Bool ``[n_latents, n_conjunctions]``: latent ``l`` is a detector of conjunction
    ``c = (a, b)`` when ``auroc[l, c] >= threshold`` and ``auroc[l, c] >= max(auroc[l, a],
    auroc[l, b]) + margin``: it detects the conjunction better than either of its parts (a
    plain "red" latent also ranks red circles high, but ranks red better).

    ``values_auroc [n_latents, n_values]``, ``conjunctions_auroc [n_latents, n_conjunctions]``
    from :func:`auroc`; NaN (unscorable) counts as no detection.
    """
    if not parts:
        return torch.zeros(values_auroc.shape[0], 0, dtype=torch.bool)
    index = torch.tensor(list(parts), dtype=torch.long)  # [C, 2]
    part_best = torch.maximum(values_auroc[:, index[:, 0]], values_auroc[:, index[:, 1]])
    conj = torch.nan_to_num(conjunctions_auroc, nan=-1.0)
    return (conj >= threshold) & (conj >= torch.nan_to_num(part_best, nan=0.0) + margin)


def carried_values(
    values_auroc: Tensor,
    detectors: Tensor,
    parts: Sequence[tuple[int, int]],
    threshold: float = DEFAULT_THRESHOLD,
) -> Tensor:
    """Bool ``[n_latents, n_values]``: the values each latent stands for: those it detects
    (``auroc >= threshold``) and both parts of every conjunction it is a detector of
    (``detectors`` from :func:`conjunction_detectors`)."""
    carried = torch.nan_to_num(values_auroc, nan=-1.0) >= threshold
    if parts:
        index = torch.tensor(list(parts), dtype=torch.long)
        hits = detectors.float()
        for side in (0, 1):
            via = torch.zeros_like(carried, dtype=torch.float32)
            via.index_add_(1, index[:, side], hits)
            carried |= via > 0
    return carried
