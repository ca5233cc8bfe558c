"""Crosscoders (Lindsey et al. 2024): one latent space read from and written to several
sources (layers of one model, or one layer of several models).

``x [batch, n_sources, d]``; ``code = act(sum_s W_enc[s]^T x_s + b_enc)``;
``recon_s = W_dec[:, s]^T code + b_dec[s]``. Parameters ``W_enc [n_sources, d, n_latents]``,
``W_dec [n_latents, n_sources, d]``, ``b_dec [n_sources, d]``. Reconstruction terms are summed
over sources (``fvu = sum_s fvu_s``, ``mse = mean_rows sum_{s,j} err^2``). With
``activation="relu"`` the L1 term weights each latent by ``sum_s ||W_dec[i, s]||``; with
TopK/BatchTopK each latent's joint decoder row (all sources) has unit norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import DictionaryConfig, SparseAutoencoder, fvu
from prisma_mm.sae.batchtopk import BatchTopKParams
from prisma_mm.sae.jumprelu import JumpReLUParams
from prisma_mm.sae.relu import ReLUParams
from prisma_mm.sae.transcoder import check_activation

__all__ = ["Crosscoder", "CrosscoderConfig"]


@dataclass
class CrosscoderConfig(JumpReLUParams, ReLUParams, BatchTopKParams, DictionaryConfig):
    """Config of :class:`Crosscoder`: ``d_in`` is the size of one source's vector,
    ``n_sources`` the number of sources, ``activation`` one of the registered activations."""

    n_sources: int = 2
    activation: str = "topk"
    apply_b_dec_to_input: bool = False
    decoder_init_norm: float | None = None
    seed: int = 0

    def __post_init__(self, d_sae: int | None = None) -> None:
        super().__post_init__(d_sae)
        if self.n_sources <= 0:
            raise PrismaError(f"n_sources must be a positive integer, got {self.n_sources}")
        check_activation(self)


class Crosscoder(SparseAutoencoder):
    """``Crosscoder(d_in=768, n_sources=12, n_latents=32768, activation="topk", k=64)``;
    ``forward(x [B, n_sources, d])``; ``losses`` include ``fvu_source_{s}``."""

    config_class = CrosscoderConfig
    architecture = "crosscoder"
    cfg: CrosscoderConfig
    _in_dims: ClassVar[int] = 2

    def encoder_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_sources, self.cfg.d_in, self.cfg.n_latents)

    def output_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_sources, self.cfg.d_in)

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_in)

    def decoder_norms(self) -> Tensor:
        """``[n_latents]``: sum over sources of each source's decoder-row norm."""
        return self.W_dec.norm(dim=-1).sum(-1)

    def reconstruction_terms(self, recon: Tensor, target: Tensor) -> dict[str, Tensor]:
        s, d = self.cfg.n_sources, self.cfg.d_in
        recon, target = recon.reshape(-1, s, d), target.reshape(-1, s, d)
        terms: dict[str, Tensor] = {}
        for i in range(s):
            terms[f"fvu_source_{i}"] = fvu(recon[:, i], target[:, i])
        terms["fvu"] = sum(terms[f"fvu_source_{i}"] for i in range(s))  # type: ignore[assignment]
        terms["mse"] = (recon.float() - target.float()).pow(2).sum((1, 2)).mean()
        return terms
