"""Running statistics of cached activations: per-sample moments (numpy on the CPU beside
the forward, torch on the device) and their exact float64 merge into per-hook totals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class RunningMoments:
    """Per-dimension mean and variance, mean norm and mean squared norm over token rows,
    merged exactly in float64 (Chan et al.'s parallel update), one sample at a time."""

    d: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]  # [d] float64
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]  # [d] sum of squared deviations
    norm_sum: float = 0.0
    sq_norm_sum: float = 0.0
    nonfinite: int = 0  # rows holding inf or nan (fp16 overflow: cache in bfloat16 instead)

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.d, np.float64)
        if self.m2 is None:
            self.m2 = np.zeros(self.d, np.float64)

    def merge(
        self,
        count: int,
        mean: np.ndarray,
        m2: np.ndarray,
        norm_sum: float,
        sq_norm_sum: float,
        nonfinite: int = 0,
    ) -> None:
        """Fold in the moments of ``count`` more rows (their mean [d] and M2 [d])."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total
        self.norm_sum += norm_sum
        self.sq_norm_sum += sq_norm_sum
        self.nonfinite += nonfinite

    def copy(self) -> RunningMoments:
        return RunningMoments(
            self.d,
            self.count,
            self.mean.copy(),
            self.m2.copy(),
            self.norm_sum,
            self.sq_norm_sum,
            self.nonfinite,
        )

    @property
    def var(self) -> np.ndarray:
        """Population variance per dimension [d]."""
        return self.m2 / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        n = max(self.count, 1)
        return {
            "count": self.count,
            "mean_norm": self.norm_sum / n,
            "mean_sq_norm": self.sq_norm_sum / n,
            "nonfinite": self.nonfinite,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunningMoments:
        count = int(data["count"])
        mean = np.asarray(data["mean"], np.float64)
        return cls(
            d=len(mean),
            count=count,
            mean=mean,
            m2=np.asarray(data["var"], np.float64) * count,
            norm_sum=float(data["mean_norm"]) * count,
            sq_norm_sum=float(data["mean_sq_norm"]) * count,
            nonfinite=int(data.get("nonfinite", 0)),
        )


def storage_to_float32(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """Stored values as float32 (bf16 bits widened exactly), in numpy."""
    if dtype_name == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def sample_moments_numpy(array: np.ndarray, dtype_name: str) -> dict[str, np.ndarray]:
    """:func:`sample_moments` of stored arrays ``[n, tokens, d]`` with numpy on the CPU
    (single-threaded, so it runs beside the forward). Per-sample sums over at most a few
    hundred tokens are taken in float32 (relative error ~1e-6), then widened to float64."""
    x = storage_to_float32(array, dtype_name)
    with np.errstate(invalid="ignore", over="ignore"):  # inf / nan rows are counted instead
        mean = x.sum(axis=1) / np.float32(x.shape[1])
        centered = x - mean[:, None, :]
        sq_norm = np.einsum("ntd,ntd->nt", x, x).astype(np.float64)
        return {
            "mean": mean.astype(np.float64),
            "m2": np.einsum("ntd,ntd->nd", centered, centered).astype(np.float64),
            "norm_sum": np.sqrt(sq_norm).sum(axis=1),
            "sq_norm_sum": sq_norm.sum(axis=1),
            "nonfinite": (~np.isfinite(sq_norm)).sum(axis=1),
        }


def sample_moments(x: Tensor) -> dict[str, Tensor]:
    """Moments of each sample's rows: ``x [n, tokens, d]`` -> ``mean [n, d]``, ``m2 [n, d]``
    (sum of squared deviations), ``norm_sum [n]`` (Σ ||row||), ``sq_norm_sum [n]``
    (Σ ||row||²), ``nonfinite [n]`` (rows holding inf / nan), in float64 on x's device."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=1)
    centered = x64 - mean.unsqueeze(1)
    sq_norm = (x64 * x64).sum(dim=2)
    return {
        "mean": mean,
        "m2": (centered * centered).sum(dim=1),
        "norm_sum": sq_norm.sqrt().sum(dim=1),
        "sq_norm_sum": sq_norm.sum(dim=1),
        "nonfinite": (~torch.isfinite(sq_norm)).sum(dim=1),
    }
