"""TopK sparse autoencoder (Gao et al. 2024): per-row top-k, AuxK on dead latents, multi-TopK.

``code = TopK_k(relu(W_enc^T (x - b_dec) + b_enc))``, ``recon = W_dec^T code + b_dec``.
Loss: ``fvu + auxk_coefficient * auxk`` (``+ fvu_multi`` with ``multi_topk``); see
docs/dictionaries.md for the exact terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import (
    Activation,
    DictionaryConfig,
    Output,
    SparseAutoencoder,
    SparseCode,
    nested_fvus,
)
from prisma_mm.sae.distributed import centred_sum_of_squares
from prisma_mm.sae.kernels import topk_encode

__all__ = ["TopKActivation", "TopKConfig", "TopKParams", "TopKSAE", "auxk_term"]


@dataclass
class TopKParams:
    """Hyper-parameters of the TopK activation (shared by every family that uses it).

    ``k``: latents kept per row. ``k_aux``: latents used by AuxK (default ``d_out // 2``).
    ``auxk_coefficient``: weight of the AuxK term. ``dead_tokens_threshold``: a latent is dead
    after this many tokens without firing. ``multi_topk``: also reconstruct with ``4k``
    latents and add that FVU to the loss (sparsify's multi-TopK). ``auxk_normalization``:
    ``"prisma"`` divides the AuxK error by the residual's variance; ``"sparsify"`` by the
    target's variance, times ``min(n_dead / k_aux, 1)`` (docs/dictionaries.md).
    """

    k: int = 32
    k_aux: int | None = None
    auxk_coefficient: float = 1.0 / 32.0
    dead_tokens_threshold: int = 10_000_000
    multi_topk: bool = False
    auxk_normalization: Literal["prisma", "sparsify"] = "prisma"


def _check_k(cfg: Any) -> None:
    if not 0 < cfg.k <= cfg.n_latents:
        raise PrismaError(f"k must be in 1..n_latents={cfg.n_latents}, got {cfg.k}")


@dataclass
class TopKConfig(TopKParams, DictionaryConfig):
    """Config of :class:`TopKSAE`. ``apply_b_dec_to_input``: centre inputs on ``b_dec``."""

    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = None
    seed: int = 0

    def __post_init__(self, d_sae: int | None = None) -> None:
        super().__post_init__(d_sae)
        _check_k(self)


def auxk_term(
    sae: SparseAutoencoder, x_in: Tensor, recon: Tensor, target: Tensor, k_aux: int | None
) -> Tensor | None:
    """AuxK loss on dead latents, or ``None`` when no latent is dead (or not training).

    ``e = (target - recon).detach()``; the top ``k_aux`` pre-activations among dead latents
    are decoded WITHOUT ``b_dec`` (so the bias is not counted twice) into ``e_hat``;
    ``auxk = sum (e_hat - e)^2 / sum (e - mean_batch(e))^2`` (``auxk_normalization="prisma"``)
    or ``min(n_dead / k_aux, 1) * sum (e_hat - e)^2 / sum (y - mean_batch(y))^2`` with ``y``
    the target (``"sparsify"``). ``x_in [B, D]`` (flat, uncentred), ``recon, target [B, d_out]``
    (flat).
    """
    if not sae.training:
        return None
    dead = sae.tracker.dead_mask(int(sae.cfg.dead_tokens_threshold)).nonzero().flatten()
    if dead.numel() == 0:
        return None
    k_wanted = k_aux or max(1, target.shape[-1] // 2)
    k = min(k_wanted, dead.numel())
    weight = sae.encoder_weight()
    aux = topk_encode(x_in, weight[:, dead], sae.b_enc[dead], k, center=sae.encoder_center())
    # map sub-matrix columns back to latent ids (dead is ascending, so rows stay sorted)
    aux = SparseCode(aux.values, dead[aux.latents], aux.offsets, aux.batch, sae.cfg.n_latents)
    e_hat = sae.decode_sparse(aux).float()
    residual = (target.float() - recon.float()).detach()
    if getattr(sae.cfg, "auxk_normalization", "prisma") == "sparsify":
        # sparsify: the target's variance, the term scaled down while few latents are dead
        scale = min(dead.numel() / k_wanted, 1.0)
        variance = centred_sum_of_squares(target.float()) / scale
    else:
        variance = centred_sum_of_squares(residual)  # over every process's rows under DDP
    return (e_hat - residual).pow(2).sum() / variance.clamp_min(torch.finfo(torch.float32).tiny)


class TopKActivation(Activation):
    """Per-row top-k of the ReLU'd pre-activations (fast sparse kernels), plus AuxK."""

    name = "topk"
    recon_loss = "fvu"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        _check_k(cfg)
        self.k = int(cfg.k)
        self.k_aux = cfg.k_aux
        self.auxk_coefficient = float(cfg.auxk_coefficient)

    def encode(self, sae: SparseAutoencoder, x_in: Tensor) -> SparseCode:
        return topk_encode(
            x_in, sae.encoder_weight(), sae.b_enc, self.k, center=sae.encoder_center()
        )

    def loss_terms(self, sae, x_in, code, recon, target):  # type: ignore[override]
        aux = auxk_term(sae, x_in, recon, target, self.k_aux)
        return {} if aux is None else {"auxk": (self.auxk_coefficient, aux)}


class TopKSAE(SparseAutoencoder):
    """TopK SAE. ``TopKSAE(d_in=768, n_latents=12288, k=32)``.

    ``forward(x [B, d_in]) -> Output`` with ``losses`` ``fvu``, ``mse``, ``auxk`` (when latents
    are dead), ``fvu_multi`` (with ``multi_topk``).
    """

    config_class = TopKConfig
    architecture = "topk"
    activation_name = "topk"
    cfg: TopKConfig

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        if not (self.cfg.multi_topk and self.training):
            return super().forward(x, target)
        ks = [self.cfg.k, 4 * self.cfg.k]
        return nested_k_forward(self, x, target, ks, [1.0, 1.0], names=["fvu", "fvu_multi"])


def nested_k_forward(
    sae: SparseAutoencoder,
    x: Tensor,
    target: Tensor | None,
    ks: list[int],
    weights: list[float],
    code_k: int | None = None,
    names: list[str] | None = None,
) -> Output:
    """Forward with reconstructions from the top ``k`` latents for each ``k`` in ``ks``
    (ascending). ``loss = sum_i weights[i] * fvu_i (+ auxk)``; the returned code and ``recon``
    are those of ``code_k`` (default ``ks[0]``). ``x [B, d_in]``."""
    target = x if target is None else target
    flat_x, lead = sae._flat_in(x)
    flat_t = sae._flat_target(target, flat_x.shape[0])
    x_in = flat_x.reshape(flat_x.shape[0], -1)
    n = sae.cfg.n_latents
    ks = [min(k, n) for k in ks]
    code = topk_encode(
        x_in, sae.encoder_weight(), sae.b_enc, max(ks), True, center=sae.encoder_center()
    )
    assert code.rank is not None
    bounds = torch.tensor(ks, device=code.rank.device)
    group = torch.bucketize(code.rank, bounds, right=True)
    b_dec = sae.b_dec.reshape(-1)
    skip = sae.skip(flat_x)
    offset = b_dec if skip is None else b_dec + skip
    names = names or [f"fvu_k{k}" for k in ks]
    code_k = ks[0] if code_k is None else min(code_k, max(ks))
    which = ks.index(code_k) if code_k in ks else None
    parts = sae.nested_parts(code, group, len(ks))
    fvus, prefix = nested_fvus(parts, offset, flat_t, -1 if which is None else which)
    loss = (fvus * torch.tensor(weights, dtype=fvus.dtype, device=fvus.device)).sum()
    losses: dict[str, Tensor] = {name: fvus[i] for i, name in enumerate(names)}
    recon = prefix if which is not None else sae.decode_sparse(_prefix_code(code, code_k)) + offset
    base = sae.reconstruction_terms(recon, flat_t)
    losses.update(base)
    aux = auxk_term(sae, x_in, recon, flat_t, getattr(sae.cfg, "k_aux", None))
    if aux is not None:
        losses["auxk"] = aux
        loss = loss + float(sae.cfg.auxk_coefficient) * aux
    losses = {k: v.detach() for k, v in losses.items()}
    return Output(
        recon=recon.reshape(*lead, *sae.b_dec.shape),
        loss=loss,
        losses=losses,
        sparse=_prefix_code(code, code_k),
    )


def _prefix_code(code: SparseCode, k: int) -> SparseCode:
    """The entries of rank < k of a ranked per-row top-K code (K entries per row)."""
    assert code.rank is not None
    keep = code.rank < k
    return SparseCode(
        code.values[keep],
        code.latents[keep],
        torch.arange(code.batch, device=code.offsets.device) * k,
        code.batch,
        code.n_latents,
        code.rank[keep],
    )
