"""SAE stitching (Leask et al., "Sparse Autoencoders Do Not Find Canonical Units of Analysis",
ICLR 2025): how the latents of a larger SAE ``L`` relate to those of a smaller ``S`` trained
on the same hook, and a sequence of stitched SAEs running from ``S`` to ``L``.

1. **Matching.** For each latent ``j`` of ``L``: its best-matching latent of ``S`` and the
   cosine ``max_i cos(d_j, d_i)`` between unit decoder rows.
2. **Exact test.** A latent of ``L`` that never fires (in ``L``'s own encoding) on the data
   sample is *inactive*: the sample says nothing about it. For every other ``j``, insert it
   alone into ``S`` and measure ``ΔMSE_j = MSE(S ∪ {j}) - MSE(S)``: ``j`` is *novel* when
   ``ΔMSE_j < 0`` (it adds information ``S`` lacks), a *reconstruction* latent otherwise (a
   copy or a finer version of ``S`` latents: adding it double-counts). Computed in closed
   form for every ``j`` at once (see docs/metrics.md).
3. **Proxy.** An active ``j`` is predicted novel when its max cosine is below ``threshold``
   (0.7); ``agreement`` is the fraction of active ``L`` latents on which test and proxy agree.
4. **Stitching.** Starting from ``S``: insert the novel latents one at a time (largest MSE
   drop first), then swap groups: the connected components of the graph joining each
   reconstruction latent to the ``S`` latents it matches (cosine ≥ ``threshold``, and always
   its best match; every ``S`` latent joins its best-matching reconstruction latent), each
   swap removing the group's ``S`` latents and adding its ``L`` latents; the inactive latents
   come last, in one step. The last member is ``L`` itself. MSE (and, with ``loss_fn``, any
   task loss) is measured along the way, and whether it falls monotonically is reported.

A stitched dictionary keeps each latent's own encoder row, bias and threshold, so every
latent fires exactly as in its source SAE: pre-activations are put in one frame,
``pre_i = w_i·x + b_enc_i - w_i·c`` (``c`` = the source's ``b_dec`` when it centres its input,
else 0), and the stitched SAE does not centre its input. Its decoder bias is ``S``'s until
the last member (``L``'s). Per family:

- **ReLU** pair: a ReLU SAE (``relu(pre)`` is per latent, so insertions are exact).
- **JumpReLU** pair: a JumpReLU SAE carrying each latent's threshold.
- **BatchTopK** pair (or Matryoshka over BatchTopK): inference is ``pre * (pre > θ)`` with one
  learned ``θ`` per SAE; the stitched SAE is a JumpReLU SAE whose latents carry their
  source's ``θ``. Mixed ReLU / JumpReLU / BatchTopK pairs go the same way (a ReLU latent gets
  the JumpReLU floor threshold 1e-6).
- **TopK** pair: a TopK SAE; latents compete for the ``k`` slots, so an inserted latent enters
  a row when it beats that row's k-th largest ``S`` activation and displaces it. ``k`` goes
  from ``k_S`` to ``k_L`` linearly along the sequence (``round(k_S + (k_L - k_S) t / T)``
  at step ``t`` of ``T``; constant when they are equal, the usual case).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary, SparseAutoencoder

__all__ = [
    "DEFAULT_THRESHOLD",
    "LatentClasses",
    "StitchResult",
    "StitchStep",
    "Stitcher",
    "classify_latents",
    "decoder_cosines",
    "plot_stitching",
    "stitch",
    "stitch_plan",
]

DEFAULT_THRESHOLD = 0.7
_JUMPRELU_FLOOR = 1e-6
_FAMILIES = ("topk", "batchtopk", "relu", "jumprelu")


def _unit_rows(dictionary: Dictionary) -> Tensor:
    rows = dictionary.W_dec.detach().reshape(dictionary.W_dec.shape[0], -1).float()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_cosines(a: Dictionary, b: Dictionary) -> Tensor:
    """``[n_a, n_b]`` cosine similarities between the decoder rows of ``a`` and ``b``."""
    rows_a, rows_b = _unit_rows(a), _unit_rows(b)
    if rows_a.shape[1] != rows_b.shape[1]:
        raise PrismaError(
            f"decoder rows differ in size ({rows_a.shape[1]} vs {rows_b.shape[1]}): the two "
            "dictionaries must reconstruct the same hook"
        )
    return rows_a @ rows_b.to(rows_a.device).T


# ----- latents in one frame ------------------------------------------------------------------
@dataclass
class _Latents:
    """One SAE's latents in the common frame: ``pre = x @ w_enc + b_enc``; code per family."""

    family: str  # topk | threshold (relu / jumprelu / batchtopk) | relu
    w_enc: Tensor  # [d, n]
    b_enc: Tensor  # [n]
    w_dec: Tensor  # [n, d]
    b_dec: Tensor  # [d]
    threshold: Tensor  # [n] (0 for relu latents; unused for topk)
    k: int | None


def _latents(sae: Dictionary, name: str) -> _Latents:
    if not isinstance(sae, SparseAutoencoder) or sae.architecture in ("transcoder", "crosscoder"):
        raise PrismaError(
            f"{name}: stitching takes SAEs (topk, batchtopk, relu, jumprelu, matryoshka), "
            f"got a {getattr(sae, 'architecture', type(sae).__name__)}"
        )
    act = sae.activation.name
    if act not in _FAMILIES:
        raise PrismaError(f"{name}: stitching does not handle the {act!r} activation")
    w_enc = sae.encoder_weight().detach().float()
    b_enc = sae.b_enc.detach().float()
    b_dec = sae.b_dec.detach().float().reshape(-1)
    if sae.apply_b_dec_to_input:
        b_enc = b_enc - b_dec @ w_enc
    n = sae.cfg.n_latents
    threshold = torch.zeros(n)
    k = None
    if act == "topk":
        k = int(sae.activation.k)
    elif act == "jumprelu":
        threshold = sae.activation.threshold.detach().float().clamp_min(_JUMPRELU_FLOOR)
    elif act == "batchtopk":
        if not sae.activation.calibrated:
            raise PrismaError(
                f"{name}: this BatchTopK SAE has no inference threshold yet (it was never "
                "trained): stitching needs per-sample encoding"
            )
        threshold = torch.full((n,), float(sae.activation.threshold))
    return _Latents(
        family="topk" if act == "topk" else ("relu" if act == "relu" else "threshold"),
        w_enc=w_enc,
        b_enc=b_enc,
        w_dec=sae.W_dec.detach().float().reshape(n, -1),
        b_dec=b_dec,
        threshold=threshold.to(w_enc.device),
        k=k,
    )


def _stitched_family(small: _Latents, large: _Latents) -> str:
    if (small.family == "topk") != (large.family == "topk"):
        raise PrismaError(
            "a TopK SAE can only be stitched with another TopK SAE (its latents compete for k "
            "slots; threshold families fire independently)"
        )
    if small.family == large.family == "relu":
        return "relu"
    return "topk" if small.family == "topk" else "jumprelu"


def _threshold_codes(pre: Tensor, threshold: Tensor) -> Tensor:
    return pre * (pre > threshold)


# ----- the exact test and the proxy ----------------------------------------------------------
@dataclass
class LatentClasses:
    """Each latent of ``L`` against ``S`` (arrays of length ``n_L``).

    ``max_cosine`` / ``best_match``: best decoder cosine with ``S`` and that ``S`` latent;
    ``active``: the latent fires (non-zero code in ``L``'s own encoding) on at least one row
    of the sample; the others are *inactive*, neither novel nor reconstruction latents;
    ``delta_mse``: ``MSE(S ∪ {j}) - MSE(S)`` per element on the sample; ``novel_test``:
    active and ``delta_mse < 0``; ``novel_proxy``: active and ``max_cosine < threshold``.
    ``active_small [n_S]``: the ``S`` latents that fire on the sample.
    """

    max_cosine: np.ndarray
    best_match: np.ndarray
    delta_mse: np.ndarray
    novel_test: np.ndarray
    novel_proxy: np.ndarray
    active: np.ndarray
    active_small: np.ndarray
    threshold: float
    mse_small: float
    n_tokens: int

    @property
    def inactive(self) -> np.ndarray:
        """``[n_L]`` bool: latents of ``L`` that never fire on the sample."""
        return ~self.active

    @property
    def reconstruction_test(self) -> np.ndarray:
        """``[n_L]`` bool: active latents whose insertion does not lower the MSE."""
        return self.active & ~self.novel_test

    @property
    def agreement(self) -> float:
        """Fraction of active ``L`` latents where the exact test and the proxy agree (NaN
        when none fired)."""
        if not self.active.any():
            return float("nan")
        return float((self.novel_test == self.novel_proxy)[self.active].mean())

    def confusion(self) -> dict[str, int]:
        """Counts of (test, proxy) outcomes over the active latents, and the inactive ones."""
        t, p, a = self.novel_test, self.novel_proxy, self.active
        return {
            "novel_both": int((t & p).sum()),
            "reconstruction_both": int((a & ~t & ~p).sum()),
            "novel_test_only": int((t & ~p).sum()),
            "novel_proxy_only": int((~t & p).sum()),
            "inactive": int((~a).sum()),
        }

    def counts(self) -> dict[str, int]:
        """Sizes of the classes and how many latents of each SAE fired on the sample."""
        return {
            "n_novel_test": int(self.novel_test.sum()),
            "n_reconstruction_test": int(self.reconstruction_test.sum()),
            "n_inactive": int(self.inactive.sum()),
            "n_novel_proxy": int(self.novel_proxy.sum()),
            "n_fired_small": int(self.active_small.sum()),
            "n_small": int(self.active_small.size),
            "n_fired_large": int(self.active.sum()),
            "n_large": int(self.active.size),
        }

    def to_dict(self, per_latent: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "threshold": self.threshold,
            "n_tokens": self.n_tokens,
            "mse_small": self.mse_small,
            **self.counts(),
            "agreement": self.agreement,
            "confusion": self.confusion(),
        }
        if per_latent:
            out["latents"] = {
                "max_cosine": self.max_cosine.tolist(),
                "best_match": self.best_match.tolist(),
                "delta_mse": self.delta_mse.tolist(),
                "active": self.active.tolist(),
                "novel_test": self.novel_test.tolist(),
                "novel_proxy": self.novel_proxy.tolist(),
            }
        return out


@torch.no_grad()
def _insertion_deltas(
    small: _Latents, large: _Latents, x: Tensor, chunk_elements: int = 1 << 24
) -> tuple[Tensor, float, Tensor, Tensor]:
    """``ΔSSE_j`` (float64 ``[n_L]``, summed over rows) of inserting each ``L`` latent alone
    into ``S``, ``SSE(S)``, and which latents of ``S`` ``[n_S]`` and of ``L`` ``[n_L]`` (each in
    its own SAE's encoding) fire on some row. ``x [N, d]``."""
    n_large = large.w_dec.shape[0]
    chunk = max(1, chunk_elements // max(n_large, small.w_dec.shape[0]))
    delta = torch.zeros(n_large, dtype=torch.float64, device=x.device)
    fired_small = torch.zeros(small.w_dec.shape[0], dtype=torch.bool, device=x.device)
    fired_large = torch.zeros(n_large, dtype=torch.bool, device=x.device)
    sse = 0.0
    dec_norm_sq = large.w_dec.pow(2).sum(1)  # [n_L]
    for rows in x.split(chunk):
        rows = rows.float()
        pre_s = rows @ small.w_enc + small.b_enc
        pre_l = rows @ large.w_enc + large.b_enc
        if small.family == "topk":
            assert small.k is not None
            vals, idx = pre_s.topk(small.k, dim=1)
            vals = vals.relu()
            code_s = torch.zeros_like(pre_s).scatter_(1, idx, vals)
            recon = code_s @ small.w_dec + small.b_dec
            err = rows - recon
            kth_val, kth_idx = vals[:, -1], idx[:, -1]  # the slot an inserted latent takes
            d_kth = small.w_dec[kth_idx]  # [c, d]
            p = pre_l.relu()
            enters = p > kth_val[:, None]
            e_dot_dj = err @ large.w_dec.T  # [c, n_L]
            dj_dot_dm = d_kth @ large.w_dec.T  # [c, n_L]
            removed = 2 * kth_val * (err * d_kth).sum(1) + kth_val.pow(2) * d_kth.pow(2).sum(1)
            change = (
                -2 * p * e_dot_dj
                + p.pow(2) * dec_norm_sq
                - 2 * p * kth_val[:, None] * dj_dot_dm
                + removed[:, None]
            )
            delta += (change * enters).sum(0, dtype=torch.float64)
            assert large.k is not None
            vals_l, idx_l = pre_l.topk(min(large.k, n_large), dim=1)
            fired_large[idx_l[vals_l > 0]] = True
        else:
            code_s = _threshold_codes(pre_s, small.threshold)
            recon = code_s @ small.w_dec + small.b_dec
            err = rows - recon
            a = _threshold_codes(pre_l, large.threshold)
            change = -2 * a * (err @ large.w_dec.T) + a.pow(2) * dec_norm_sq
            delta += change.sum(0, dtype=torch.float64)
            fired_large |= (a != 0).any(0)
        fired_small |= (code_s != 0).any(0)
        sse += float(err.double().pow(2).sum())
    return delta, sse, fired_small, fired_large


@torch.no_grad()
def classify_latents(
    small: Dictionary,
    large: Dictionary,
    x: Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    cos: Tensor | None = None,
) -> LatentClasses:
    """Novel / reconstruction / inactive split of ``large``'s latents against ``small`` (module
    doc) on the sample ``x [N, d]`` (raw activations of the hook both SAEs were trained on);
    ``cos``: :func:`decoder_cosines` ``(large, small)`` when already computed."""
    s, lg = _latents(small, "small SAE"), _latents(large, "large SAE")
    _stitched_family(s, lg)
    if not 0.0 < threshold <= 1.0:
        raise PrismaError(f"cosine threshold must be in (0, 1], got {threshold}")
    if x.ndim != 2 or x.shape[1] != s.w_enc.shape[0]:
        raise PrismaError(
            f"the data sample must be [tokens, {s.w_enc.shape[0]}], got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise PrismaError("the data sample is empty")
    device = s.w_enc.device
    lg = _Latents(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(lg).items()})
    x = x.to(device)
    cos = decoder_cosines(large, small) if cos is None else cos  # [n_L, n_S]
    max_cos, best = cos.max(dim=1)
    delta_sse, sse, fired_small, fired_large = _insertion_deltas(s, lg, x)
    n_elements = x.shape[0] * x.shape[1]
    delta = (delta_sse / n_elements).cpu().numpy()
    active = fired_large.cpu().numpy()
    return LatentClasses(
        max_cosine=max_cos.cpu().numpy(),
        best_match=best.cpu().numpy(),
        delta_mse=delta,
        novel_test=active & (delta < 0),
        novel_proxy=active & (max_cos < threshold).cpu().numpy(),
        active=active,
        active_small=fired_small.cpu().numpy(),
        threshold=float(threshold),
        mse_small=sse / n_elements,
        n_tokens=int(x.shape[0]),
    )


# ----- the stitching sequence ----------------------------------------------------------------
@dataclass
class StitchStep:
    """One step from a stitched SAE to the next: ``kind`` is ``"insert"`` (one novel latent),
    ``"swap"`` (a group), ``"inactive"`` (the ``L`` latents that never fired on the sample,
    added together) or ``"remove"`` (the remaining ``S`` latents, dropped at the end when ``L``
    has no reconstruction latent); ``add_large`` / ``remove_small``: latent indices of ``L`` /
    ``S``."""

    kind: str
    add_large: list[int]
    remove_small: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "add_large": self.add_large, "remove_small": self.remove_small}


def stitch_plan(classes: LatentClasses, cos: Tensor, use: str = "test") -> list[StitchStep]:
    """The steps from ``S`` to ``L`` (module doc). ``cos [n_L, n_S]`` decoder cosines; ``use``
    picks the novel / reconstruction split of the active latents: the exact ``"test"`` or the
    ``"proxy"``; the inactive latents are added in one step after the swaps."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if use not in ("test", "proxy"):
        raise PrismaError(f"use must be 'test' or 'proxy', got {use!r}")
    novel = classes.novel_test if use == "test" else classes.novel_proxy
    n_large, n_small = cos.shape
    cos_np = cos.detach().cpu().numpy()
    steps = [
        StitchStep("insert", [int(j)], [])
        for j in sorted(np.flatnonzero(novel), key=lambda j: (classes.delta_mse[j], j))
    ]
    recon = np.flatnonzero(classes.active & ~novel)
    inactive = np.flatnonzero(classes.inactive)
    if recon.size:
        # nodes: S latents 0..n_S-1, then reconstruction latents n_S..n_S+|R|-1
        sub = cos_np[recon]  # [|R|, n_S]
        r_idx, s_idx = np.nonzero(sub >= classes.threshold)
        edges = [
            (s_idx, n_small + r_idx),  # every match above the threshold
            (classes.best_match[recon], n_small + np.arange(recon.size)),  # R -> its best S
            (np.arange(n_small), n_small + np.argmax(sub, axis=0)),  # S -> its best R
        ]
        rows = np.concatenate([e[0] for e in edges])
        cols = np.concatenate([e[1] for e in edges])
        graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n_small + recon.size,) * 2)
        _, label = connected_components(graph, directed=False)
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for node in range(n_small + recon.size):
            small_list, large_list = groups.setdefault(int(label[node]), ([], []))
            if node < n_small:
                small_list.append(node)
            else:
                large_list.append(int(recon[node - n_small]))
        ordered = sorted(groups.values(), key=lambda g: (min(g[1]) if g[1] else n_large, g[0]))
        steps += [StitchStep("swap", sorted(lg), sorted(sm)) for sm, lg in ordered]
    if inactive.size:  # before any "remove", so that no member is left without latents
        steps.append(StitchStep("inactive", inactive.tolist(), []))
    if not recon.size:
        steps.append(StitchStep("remove", [], list(range(n_small))))
    return steps


class Stitcher:
    """Builds the stitched SAEs between ``small`` and ``large`` (module doc)."""

    def __init__(self, small: Dictionary, large: Dictionary) -> None:
        self.small_sae, self.large_sae = small, large
        self.small = _latents(small, "small SAE")
        self.large = _latents(large, "large SAE")
        if self.small.w_enc.shape[0] != self.large.w_enc.shape[0]:
            raise PrismaError(
                f"the SAEs read different sizes ({self.small.w_enc.shape[0]} vs "
                f"{self.large.w_enc.shape[0]}): stitch SAEs of the same hook"
            )
        self.family = _stitched_family(self.small, self.large)

    def build(
        self,
        keep_small: Sequence[int],
        add_large: Sequence[int],
        b_dec: str = "small",
        k: int | None = None,
    ) -> SparseAutoencoder:
        """A stitched SAE with ``small``'s latents ``keep_small`` then ``large``'s ``add_large``,
        ``b_dec`` of ``"small"`` or ``"large"``; ``k`` for TopK (default ``k_S``)."""
        from prisma_mm.sae import JumpReLUSAE, ReLUSAE, TopKSAE

        s, lg = self.small, self.large
        device = s.w_enc.device
        keep = torch.as_tensor(list(keep_small), dtype=torch.long, device=device)
        add = torch.as_tensor(list(add_large), dtype=torch.long, device=lg.w_enc.device)
        n = keep.numel() + add.numel()
        if n == 0:
            raise PrismaError("a stitched SAE needs at least one latent")
        d = s.w_enc.shape[0]
        common = {
            "d_in": d,
            "n_latents": n,
            "normalize_decoder": False,
            "apply_b_dec_to_input": False,
        }
        if self.family == "topk":
            assert s.k is not None
            sae: SparseAutoencoder = TopKSAE(**common, k=min(int(k or s.k), n))
        elif self.family == "relu":
            sae = ReLUSAE(**common)
        else:
            sae = JumpReLUSAE(**common)
        with torch.no_grad():
            sae.to(device)
            sae.W_enc.copy_(torch.cat([s.w_enc[:, keep], lg.w_enc[:, add].to(device)], 1))
            sae.b_enc.copy_(torch.cat([s.b_enc[keep], lg.b_enc[add].to(device)]))
            sae.W_dec.copy_(torch.cat([s.w_dec[keep], lg.w_dec[add].to(device)]))
            sae.b_dec.copy_(s.b_dec if b_dec == "small" else lg.b_dec.to(device))
            if self.family == "jumprelu":
                theta = torch.cat([s.threshold[keep], lg.threshold[add].to(device)])
                sae.activation.threshold.copy_(theta.clamp_min(_JUMPRELU_FLOOR))
        sae.metadata = {
            "hook": self.small_sae.metadata.get("hook"),
            "model": self.small_sae.metadata.get("model"),
            "stitched": {"n_small": int(keep.numel()), "n_large": int(add.numel()), "b_dec": b_dec},
        }
        return sae.eval()

    def state(self, steps: Sequence[StitchStep], t: int) -> tuple[list[int], list[int]]:
        """``(keep_small, add_large)`` of member ``t``: ``S`` after ``steps[:t]``."""
        if not 0 <= t <= len(steps):
            raise PrismaError(f"member {t} is outside 0..{len(steps)}")
        removed: set[int] = set()
        added: list[int] = []
        for step in steps[:t]:
            removed.update(step.remove_small)
            added.extend(step.add_large)
        keep = [i for i in range(self.small.w_dec.shape[0]) if i not in removed]
        return keep, added

    def member(self, steps: Sequence[StitchStep], t: int) -> SparseAutoencoder:
        """Member ``t`` of the sequence (0: ``S`` in the stitched frame; ``len(steps)``: ``L``,
        with its latents in ``L``'s order and ``L``'s decoder bias)."""
        keep, added = self.state(steps, t)
        last = len(steps)
        k = None
        if self.family == "topk":
            assert self.small.k is not None and self.large.k is not None
            k = round(self.small.k + (self.large.k - self.small.k) * t / max(last, 1))
        if t == last:
            added = sorted(added)
        return self.build(keep, added, b_dec="large" if t == last else "small", k=k)


@dataclass
class StitchResult:
    """Latent classes, the stitching steps and the curve measured along them.

    ``curve``: one dict per evaluated member: ``step`` (members run 0..len(steps)),
    ``n_latents``, ``mse`` (per element), ``fvu``, ``l0`` and ``loss`` when a ``loss_fn`` was
    given. ``monotone``: no evaluated member's MSE exceeds the previous one's by more than
    ``tolerance`` (relative); ``n_increases`` / ``max_relative_increase`` say by how much.
    """

    family: str
    classes: LatentClasses
    steps: list[StitchStep]
    curve: list[dict[str, Any]]
    monotone: bool
    n_increases: int
    max_relative_increase: float
    tolerance: float
    mse_large: float
    use: str
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, per_latent: bool = True) -> dict[str, Any]:
        return {
            "family": self.family,
            "split_by": self.use,
            "classes": self.classes.to_dict(per_latent),
            "n_steps": len(self.steps),
            "steps": [s.to_dict() for s in self.steps],
            "curve": self.curve,
            "monotone": self.monotone,
            "n_increases": self.n_increases,
            "max_relative_increase": self.max_relative_increase,
            "tolerance": self.tolerance,
            "mse_large": self.mse_large,
            **self.extras,
        }

    def rows(self) -> list[tuple[str, str]]:
        c = self.classes
        n = c.counts()
        fired = f"{n['n_fired_small']} / {n['n_small']}, {n['n_fired_large']} / {n['n_large']}"
        first, last = self.curve[0], self.curve[-1]
        return [
            ("stitched family", self.family),
            ("latents S -> L", f"{first['n_latents']} -> {last['n_latents']}"),
            ("sample rows", str(c.n_tokens)),
            ("fired on the sample (S, L)", fired),
            ("novel (exact test)", f"{n['n_novel_test']} / {n['n_large']}"),
            ("reconstruction (exact test)", f"{n['n_reconstruction_test']} / {n['n_large']}"),
            ("inactive (never fired)", f"{n['n_inactive']} / {n['n_large']}"),
            (f"novel (cos < {c.threshold:g})", f"{n['n_novel_proxy']} / {n['n_large']}"),
            ("test/proxy agreement (active)", f"{c.agreement:.3f}"),
            ("steps", str(len(self.steps))),
            ("mse S -> L", f"{first['mse']:.4g} -> {last['mse']:.4g}"),
            (
                "monotone",
                f"{self.monotone} ({self.n_increases} increases, "
                f"max {self.max_relative_increase:.2e})",
            ),  # fmt: skip
        ]


def _points(n_members: int, max_points: int | None) -> list[int]:
    if max_points is None or n_members <= max_points:
        return list(range(n_members))
    if max_points < 2:
        raise PrismaError("max_points must be at least 2 (the two ends)")
    return sorted({int(round(v)) for v in np.linspace(0, n_members - 1, max_points)})


@torch.no_grad()
def stitch(
    small: Dictionary,
    large: Dictionary,
    x: Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    use: str = "test",
    max_points: int | None = 64,
    loss_fn: Callable[[Dictionary], float] | None = None,
    tolerance: float = 1e-4,
    batch_size: int = 4096,
    progress: bool = True,
) -> StitchResult:
    """Classify ``large``'s latents against ``small`` and measure the stitched sequence on the
    sample ``x [N, d]``: MSE (and ``loss_fn(stitched_sae)``, e.g. a spliced-in CE) at
    ``max_points`` members evenly spread over the sequence (all members when None)."""
    from prisma_mm.analysis.metrics import evaluate

    if batch_size < 1 or not tolerance >= 0:
        raise PrismaError(
            f"batch_size must be >= 1 and tolerance >= 0, got {batch_size}, {tolerance}"
        )
    stitcher = Stitcher(small, large)
    cos = decoder_cosines(large, small)
    classes = classify_latents(small, large, x, threshold, cos)
    steps = stitch_plan(classes, cos, use)
    points = _points(len(steps) + 1, max_points)
    curve: list[dict[str, Any]] = []
    batches = list(x.split(batch_size))
    for t in tqdm(points, desc="stitching curve", unit="sae", disable=not progress):
        sae = stitcher.member(steps, t)
        m = evaluate(sae, batches, progress=False)
        row: dict[str, Any] = {
            "step": t,
            "n_latents": sae.cfg.n_latents,
            "mse": m.mse,
            "fvu": m.fvu,
            "l0": m.l0,
        }
        if loss_fn is not None:
            row["loss"] = float(loss_fn(sae))
        curve.append(row)
    mse = np.array([r["mse"] for r in curve])
    rel = (mse[1:] - mse[:-1]) / np.maximum(mse[:-1], 1e-30)
    increases = rel > tolerance
    large_metrics = evaluate(large, batches, progress=False)
    return StitchResult(
        family=stitcher.family,
        classes=classes,
        steps=steps,
        curve=curve,
        monotone=not bool(increases.any()),
        n_increases=int(increases.sum()),
        max_relative_increase=float(rel.max()) if rel.size else 0.0,
        tolerance=tolerance,
        mse_large=large_metrics.mse,
        use=use,
        extras={"n_small": small.cfg.n_latents, "n_large": large.cfg.n_latents},
    )


def plot_stitching(result: StitchResult, path: str | Path, title: str | None = None) -> Path:
    """The stitching curve (MSE, and the loss when measured, against the number of latents) as
    a PNG; insert steps and swap steps are marked differently."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n_latents"] for r in result.curve]
    mse = [r["mse"] for r in result.curve]
    has_loss = all("loss" in r for r in result.curve)
    fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(11 if has_loss else 6, 3.8))
    axes = np.atleast_1d(axes)
    # each member is coloured by the kind of the step that produced it
    phase = ["S" if r["step"] == 0 else result.steps[r["step"] - 1].kind for r in result.curve]
    colours = {"S": "#444444", "insert": "#2a9d8f", "swap": "#e76f51", "inactive": "#8d99ae",
               "remove": "#6d597a"}  # fmt: skip
    for ax, values, label in [(axes[0], mse, "MSE (per element)")] + (
        [(axes[1], [r["loss"] for r in result.curve], "loss")] if has_loss else []
    ):
        ax.plot(n, values, color="#999999", linewidth=1, zorder=1)
        for kind, colour in colours.items():
            xs = [a for a, p in zip(n, phase) if p == kind]
            ys = [v for v, p in zip(values, phase) if p == kind]
            if xs:
                ax.scatter(xs, ys, s=12, color=colour, label=kind, zorder=2)
        ax.set_xlabel("number of latents")
        ax.set_ylabel(label)
        ax.legend(frameon=False)
    axes[0].set_title(title or f"stitching ({'monotone' if result.monotone else 'not monotone'})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
