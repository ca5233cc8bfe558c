"""Motion ground truth: score latents against the moving toy world's factors, and say how much
of each latent's activation depends on motion (its temporal score).

Scoring reuses :mod:`prisma_mm.analysis.ground_truth` unchanged: token rows of clips are
patch rows (one row per token of the ``(frames, h, w)`` grid, labels per token from
:func:`prisma_mm.data.toyworld.clip_patch_labels`), clips are image rows. This module adds
what is specific to motion: which values are motion values, the controls, and the temporal
score.

**Temporal score** (also in docs/video.md). For a latent with non-negative activations
(dictionary latents are), let ``m`` be its activation summed over every token of a set of
moving clips, ``r`` the same on each clip with one frame repeated (no motion:
:func:`~prisma_mm.data.toyworld.repeat_frame`) and ``s`` on each clip frame-shuffled (the same
frames, no coherent motion: :func:`~prisma_mm.data.toyworld.shuffle_frames`). Then

* ``frozen = 1 - r / m``: the share of the activation that goes when nothing moves;
* ``order = 1 - s / m``: the share that goes when the frames are put out of order;
* ``temporal score = clamp(1 - (r + s) / (2 m), 0, 1)``: the share that goes, on average
  over the two controls. 0: the latent is as active without motion (a static feature: a
  colour, a shape); 1: it is silent on both controls (it needs coherent motion); NaN: it
  never fires on the moving clips. A latent more active on the controls than on motion
  (a flicker detector on shuffled frames) scores 0; ``frozen`` and ``order`` keep the sign.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_mm.analysis.ground_truth import (
    DEFAULT_THRESHOLD,
    GroundTruthReport,
    score_ground_truth,
)
from prisma_mm.errors import PrismaError


def _codes(x: Any, name: str) -> Tensor:
    """``[n_clips, tokens, n_latents]`` float64 from a tensor or array of 2 or 3 dims."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double()
    if t.ndim == 2:
        t = t.unsqueeze(1)
    if t.ndim != 3:
        raise PrismaError(
            f"{name} must be [clips, tokens, latents] or [clips, latents], got {tuple(t.shape)}"
        )
    if bool((t < 0).any()):
        raise PrismaError(
            f"{name} has negative activations: the temporal score compares amounts of "
            "activation, so give non-negative codes (dictionary latents, or relu of a feature)"
        )
    return t


@dataclass
class TemporalScores:
    """Per-latent activation totals on moving clips and on the two controls (``[n_latents]``
    each, summed over clips and tokens) and the scores derived from them (see the module)."""

    moving: Tensor
    repeated: Tensor
    shuffled: Tensor

    def _share_gone(self, control: Tensor) -> Tensor:
        out = 1 - control / self.moving
        return torch.where(self.moving > 0, out, torch.full_like(out, float("nan")))

    @property
    def frozen(self) -> Tensor:
        """``1 - r / m`` per latent (NaN where ``m = 0``)."""
        return self._share_gone(self.repeated)

    @property
    def order(self) -> Tensor:
        """``1 - s / m`` per latent (NaN where ``m = 0``)."""
        return self._share_gone(self.shuffled)

    @property
    def score(self) -> Tensor:
        """The temporal score ``clamp(1 - (r + s) / (2 m), 0, 1)`` per latent (NaN where m = 0)."""
        return self._share_gone((self.repeated + self.shuffled) / 2).clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, list[float | None]]:
        """JSON lists per latent: ``score``, ``frozen``, ``order`` (None where NaN) and the
        activation totals ``moving``, ``repeated``, ``shuffled``."""

        def plain(t: Tensor) -> list[float | None]:
            return [None if v != v else float(v) for v in t.tolist()]

        names = ("score", "frozen", "order", "moving", "repeated", "shuffled")
        return {name: plain(getattr(self, name)) for name in names}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (``prisma-mm browse --temporal PATH`` reads it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path


def temporal_scores(moving: Any, repeated: Any, shuffled: Any) -> TemporalScores:
    """Temporal scores of every latent from its codes on the same clips moving, with one frame
    repeated, and frame-shuffled: each ``[n_clips, tokens, n_latents]`` (or ``[n_clips,
    n_latents]``), non-negative, the same clips in the same order."""
    m, r, s = _codes(moving, "moving"), _codes(repeated, "repeated"), _codes(shuffled, "shuffled")
    if not m.shape == r.shape == s.shape:
        raise PrismaError(
            f"moving {tuple(m.shape)}, repeated {tuple(r.shape)} and shuffled "
            f"{tuple(s.shape)} codes must have one shape: the same clips, tokens and latents"
        )
    return TemporalScores(m.sum((0, 1)), r.sum((0, 1)), s.sum((0, 1)))


def motion_value_mask(value_names: Sequence[str]) -> Tensor:
    """Bool ``[n_values]``: the values of the motion factors (direction, speed, appears,
    disappears) among ``value_names``."""
    from prisma_mm.data.toyworld import MOTION_FACTORS

    return torch.tensor([name.split("=", 1)[0] in MOTION_FACTORS for name in value_names])


@dataclass
class MotionReport:
    """Ground-truth scores over clip tokens (``ground_truth.patch``) and clips
    (``ground_truth.image``), and the temporal scores of every latent when controls were given."""

    ground_truth: GroundTruthReport
    temporal: TemporalScores | None

    @property
    def value_names(self) -> list[str]:
        return self.ground_truth.value_names

    def _level(self):
        gt = self.ground_truth
        return gt.patch if gt.patch is not None else gt.image

    def recovery(self, motion: bool) -> float:
        """Mean of ``max(0, 2 * heldout_auroc - 1)`` over the motion values (``motion=True``)
        or the static ones, at token level (clip level without token data)."""
        level = self._level()
        pick = motion_value_mask(self.value_names) == motion
        held = level.heldout_auroc[pick]
        held = held[~torch.isnan(held)]
        return float((2 * held - 1).clamp(min=0).mean()) if len(held) else float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """One row per value: its best latent, AUROC, held-out AUROC, whether it is a motion
        value, and the best latent's temporal score (NaN without controls)."""
        level = self._level()
        motion = motion_value_mask(self.value_names)
        out = []
        for v, name in enumerate(self.value_names):
            latent = int(level.best_latent[v])
            temporal = float("nan")
            if self.temporal is not None:
                temporal = float(self.temporal.score[latent])
            out.append(
                {
                    "value": name,
                    "motion": bool(motion[v]),
                    "latent": latent,
                    "auroc": float(level.auroc[v]),
                    "heldout_auroc": float(level.heldout_auroc[v]),
                    "temporal_score": temporal,
                }
            )
        return out

    def summary(self) -> dict[str, float]:
        """Headline numbers: recovery of motion and static values, and the mean temporal score
        of the best latents of motion values and of static values."""
        out = {"motion_recovery": self.recovery(True), "static_recovery": self.recovery(False)}
        if self.temporal is not None:
            rows = self.rows()
            for kind, flag in (("motion", True), ("static", False)):
                scores = [
                    r["temporal_score"]
                    for r in rows
                    if r["motion"] == flag and not np.isnan(r["auroc"])
                    and not np.isnan(r["temporal_score"])
                ]  # fmt: skip
                out[f"{kind}_best_temporal_score"] = (
                    float(np.mean(scores)) if scores else float("nan")
                )
        return out


def score_motion(
    token_codes: Any,
    token_labels: Any,
    clip_labels: Any = None,
    value_names: Sequence[str] | None = None,
    repeated_codes: Any = None,
    shuffled_codes: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> MotionReport:
    """Score latents on clips of the moving toy world.

    ``token_codes [n_clips, tokens, n_latents]`` (patch tokens, in the layout's
    ``(frames, h, w)`` order); ``token_labels`` ``[n_clips, frames, h, w, n_values]`` (from
    :func:`~prisma_mm.data.toyworld.clip_patch_labels` with the model's tubelet) or
    ``[n_clips, tokens, n_values]``; ``clip_labels [n_clips, n_values]`` (clip level; the
    clip's code is its max over tokens). ``value_names`` default to
    :data:`~prisma_mm.data.toyworld.CLIP_VALUE_NAMES`. With ``repeated_codes`` and
    ``shuffled_codes`` (the same clips as controls, shaped like ``token_codes``) the report
    carries every latent's temporal score.
    """
    if value_names is None:
        from prisma_mm.data.toyworld import CLIP_VALUE_NAMES

        value_names = CLIP_VALUE_NAMES
    codes = torch.as_tensor(np.asarray(token_codes) if not isinstance(token_codes, Tensor)
                            else token_codes)  # fmt: skip
    labels = torch.as_tensor(np.asarray(token_labels) if not isinstance(token_labels, Tensor)
                             else token_labels)  # fmt: skip
    if codes.ndim != 3:
        raise PrismaError(f"token_codes must be [clips, tokens, latents], got {tuple(codes.shape)}")
    if labels.ndim == 5:
        labels = labels.reshape(labels.shape[0], -1, labels.shape[-1])
    if labels.shape[:2] != codes.shape[:2]:
        raise PrismaError(
            f"token_labels cover {tuple(labels.shape[:2])} (clips, tokens) but token_codes "
            f"{tuple(codes.shape[:2])}: give labels on the model's token grid (tubelet pooled)"
        )
    report = score_ground_truth(
        value_names,
        patch_codes=codes,
        patch_labels=labels,
        image_labels=clip_labels,
        threshold=threshold,
    )
    temporal = None
    if (repeated_codes is None) != (shuffled_codes is None):
        raise PrismaError("give repeated_codes and shuffled_codes together (or neither)")
    if repeated_codes is not None:
        temporal = temporal_scores(codes, repeated_codes, shuffled_codes)
    return MotionReport(report, temporal)


def clip_codes(model: Any, dictionary: Any, hook: str, clips: Any, batch_size: int = 64) -> Tensor:
    """A dictionary's codes on the patch tokens of clips: float32 ``[n_clips, frames * h * w,
    n_latents]`` in frame-major order (``(frames, h, w)`` of the hook's layout, whatever the
    family's own token order), prefix tokens dropped, so rows line up with
    :func:`~prisma_mm.data.toyworld.clip_patch_labels` on the model's grid and tubelet.

    ``clips``: uint8 ``[n, T, H, W, 3]`` (decoded frames, the card's clip length)."""
    layout = model.layout_for(hook)  # MViT / Swin3D grids shrink between stages
    out = []
    with torch.inference_mode():
        for lo in range(0, len(clips), batch_size):
            batch = model.preprocess(list(clips[lo : lo + batch_size]))
            _, cache = model.run_with_cache(batch, names_filter=[hook])
            acts = cache[hook].to(dictionary.W_dec.device, dictionary.W_dec.dtype)
            code = dictionary.encode(acts.flatten(0, 1)).view(*acts.shape[:2], -1).float().cpu()
            grid = layout.patch_map(code.transpose(1, 2))  # [b, L, frames, h, w]
            out.append(grid.flatten(2).transpose(1, 2).contiguous())
    return torch.cat(out)


def score_dictionary_on_clips(
    model: Any,
    dictionary: Any,
    hook: str,
    clips: Any,
    token_labels: Any,
    clip_labels: Any = None,
    shuffle_seed: int = 0,
    batch_size: int = 64,
) -> MotionReport:
    """:func:`score_motion` of a dictionary at ``hook`` on clips of the moving toy world, with
    both controls run through the model (:func:`~prisma_mm.data.toyworld.repeat_frame` of the
    middle frame, :func:`~prisma_mm.data.toyworld.shuffle_frames` with ``shuffle_seed``), so
    the report carries every latent's temporal score.

    ``clips`` uint8 ``[n, T, H, W, 3]``; ``token_labels [n, frames, h, w, n_values]`` on the
    model's grid and tubelet; ``clip_labels [n, n_values]``."""
    from prisma_mm.data.toyworld import repeat_frame, shuffle_frames

    clips = np.asarray(clips)
    moving = clip_codes(model, dictionary, hook, clips, batch_size)
    repeated = clip_codes(model, dictionary, hook, repeat_frame(clips), batch_size)
    shuffled = clip_codes(model, dictionary, hook, shuffle_frames(clips, shuffle_seed)[0],
                          batch_size)  # fmt: skip
    return score_motion(moving, token_labels, clip_labels, None, repeated, shuffled)
