"""Match the latents of two dictionaries (other seeds, sizes or architectures) by decoder
direction.

``C[i, j] = cos(W_dec_A[i], W_dec_B[j])`` over unit-norm decoder rows (a crosscoder's rows
flattened over its sources). The matching is the one-to-one assignment maximising
``Σ C[i, π(i)]`` (the Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``); with
sizes ``n_A ≠ n_B`` it pairs ``min(n_A, n_B)`` latents. A pair is *shared* when its cosine is
at least ``threshold`` (default 0.7). Reported: ``fraction_shared = n_shared / min(n_A,
n_B)``, also relative to each side (``n_shared / n_A``, ``n_shared / n_B``), the mean matched
cosine, and the mean over A's latents of their best cosine in B (no one-to-one constraint;
likewise B in A).

Cost: the dense ``[n_A, n_B]`` float64 matrix (2 GiB at 16k x 16k) and the assignment,
cubic in the size in the worst case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prisma_mm.analysis.stitching import decoder_cosines
from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary

__all__ = ["DEFAULT_THRESHOLD", "MatchResult", "match_dictionaries", "match_rows"]

DEFAULT_THRESHOLD = 0.7


@dataclass
class MatchResult:
    """The one-to-one matching of A's latents to B's.

    ``pairs_a`` / ``pairs_b`` / ``cosine``: matched latent indices and their cosines (sorted by
    A's index); ``best_a_in_b [n_A]`` / ``best_b_in_a [n_B]``: each latent's best cosine on
    the other side.
    """

    n_a: int
    n_b: int
    threshold: float
    pairs_a: np.ndarray
    pairs_b: np.ndarray
    cosine: np.ndarray
    best_a_in_b: np.ndarray
    best_b_in_a: np.ndarray

    @property
    def n_shared(self) -> int:
        return int((self.cosine >= self.threshold).sum())

    @property
    def fraction_shared(self) -> float:
        """``n_shared / min(n_A, n_B)``."""
        return self.n_shared / max(min(self.n_a, self.n_b), 1)

    def to_dict(self, pairs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_a": self.n_a,
            "n_b": self.n_b,
            "threshold": self.threshold,
            "n_matched": int(self.cosine.size),
            "n_shared": self.n_shared,
            "fraction_shared": self.fraction_shared,
            "fraction_of_a_shared": self.n_shared / self.n_a,
            "fraction_of_b_shared": self.n_shared / self.n_b,
            "mean_matched_cosine": float(self.cosine.mean()) if self.cosine.size else float("nan"),
            "mean_best_cosine_a_in_b": float(self.best_a_in_b.mean()),
            "mean_best_cosine_b_in_a": float(self.best_b_in_a.mean()),
            "matched_cosine_quantiles": {
                str(q): float(np.quantile(self.cosine, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
            }
            if self.cosine.size
            else {},
        }
        if pairs:
            out["pairs"] = [
                [int(a), int(b), round(float(c), 6)]
                for a, b, c in zip(self.pairs_a, self.pairs_b, self.cosine)
            ]
        return out

    def rows(self) -> list[tuple[str, str]]:
        d = self.to_dict(pairs=False)
        return [
            ("latents A / B", f"{self.n_a} / {self.n_b}"),
            ("matched pairs", str(d["n_matched"])),
            (f"shared (cos >= {self.threshold:g})", f"{self.n_shared}"),
            ("fraction shared", f"{self.fraction_shared:.4f}"),
            (
                "fraction of A / of B",
                f"{d['fraction_of_a_shared']:.4f} / {d['fraction_of_b_shared']:.4f}",
            ),
            ("mean matched cosine", f"{d['mean_matched_cosine']:.4f}"),
            ("mean best cos A in B", f"{d['mean_best_cosine_a_in_b']:.4f}"),
            ("mean best cos B in A", f"{d['mean_best_cosine_b_in_a']:.4f}"),
        ]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def match_rows(cos: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> MatchResult:
    """Hungarian matching of a cosine matrix ``cos [n_A, n_B]`` (module doc)."""
    from scipy.optimize import linear_sum_assignment

    if not -1.0 <= threshold <= 1.0:
        raise PrismaError(f"cosine threshold must be in [-1, 1], got {threshold}")
    cos = np.asarray(cos, dtype=np.float64)
    if cos.ndim != 2 or 0 in cos.shape:
        raise PrismaError(f"the cosine matrix must be 2-D and non-empty, got {cos.shape}")
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return MatchResult(
        n_a=cos.shape[0],
        n_b=cos.shape[1],
        threshold=float(threshold),
        pairs_a=rows,
        pairs_b=cols,
        cosine=cos[rows, cols],
        best_a_in_b=cos.max(1),
        best_b_in_a=cos.max(0),
    )


def match_dictionaries(
    a: Dictionary, b: Dictionary, threshold: float = DEFAULT_THRESHOLD
) -> MatchResult:
    """Match ``a``'s latents to ``b``'s by decoder cosine (module doc)."""
    return match_rows(decoder_cosines(a, b).double().cpu().numpy(), threshold)
