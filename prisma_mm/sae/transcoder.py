"""Transcoders (Dunefsky et al. 2024; skip transcoders, Paulo et al. 2025): read one hook,
reconstruct another.

``code = act(W_enc^T x + b_enc)``, ``recon = W_dec^T code + b_dec (+ W_skip^T x)`` where
``x [batch, d_in]`` is the input hook and the target ``[batch, d_out]`` the output hook.
``act`` is any registered activation (``topk``, ``batchtopk``, ``relu``, ``jumprelu``) with
that family's loss terms; the reconstruction term is that family's (``fvu`` or ``mse``)
measured against the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prisma_mm.errors import PrismaError, unknown
from prisma_mm.sae.base import Activation, DictionaryConfig, Output, SparseAutoencoder
from prisma_mm.sae.batchtopk import BatchTopKParams
from prisma_mm.sae.jumprelu import JumpReLUParams
from prisma_mm.sae.relu import ReLUParams
from prisma_mm.sae.topk import _check_k, nested_k_forward

__all__ = ["Transcoder", "TranscoderConfig", "check_activation"]


def check_activation(cfg: Any) -> None:
    """Validate ``cfg.activation`` against the registered activations (and ``k`` for TopK)."""
    if cfg.activation not in Activation.registry:
        raise unknown("activation", cfg.activation, Activation.registry)
    if cfg.activation in ("topk", "batchtopk"):
        _check_k(cfg)


@dataclass
class TranscoderConfig(JumpReLUParams, ReLUParams, BatchTopKParams, DictionaryConfig):
    """Config of :class:`Transcoder`: ``d_out`` (default ``d_in``), ``activation`` (name),
    ``skip`` (learn ``W_skip [d_in, d_out]``, zero-initialised), plus the chosen activation's
    parameters."""

    d_out: int | None = None
    activation: str = "topk"
    skip: bool = False
    apply_b_dec_to_input: bool = False
    decoder_init_norm: float | None = None
    seed: int = 0

    def __post_init__(self, d_sae: int | None = None) -> None:
        super().__post_init__(d_sae)
        if self.d_out is not None and self.d_out <= 0:
            raise PrismaError(f"d_out must be a positive integer, got {self.d_out}")
        if self.apply_b_dec_to_input and (self.d_out or self.d_in) != self.d_in:
            raise PrismaError("apply_b_dec_to_input needs d_out == d_in")
        check_activation(self)


class Transcoder(SparseAutoencoder):
    """``Transcoder(d_in=768, n_latents=12288, d_out=768, activation="topk", k=32, skip=True)``;
    ``forward(x [B, d_in], target [B, d_out])``. Parameters as an SAE plus ``W_skip``.
    ``decode(code)`` is the decoder half only (``W_dec^T code + b_dec``): the skip term needs
    ``x``, which ``forward`` adds."""

    config_class = TranscoderConfig
    architecture = "transcoder"
    cfg: TranscoderConfig

    def __init__(self, cfg: TranscoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        if self.cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.cfg.d_in, self.d_out))

    def skip(self, x: Tensor) -> Tensor | None:
        """``x @ W_skip`` ``[batch, d_out]`` when the skip connection is on."""
        if not self.cfg.skip:
            return None
        return x @ self.W_skip.to(x.dtype)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        if target is None and self.d_out != self.cfg.d_in:
            raise PrismaError(
                f"transcoder forward needs target [batch, {self.d_out}] (the output hook)"
            )
        if self.training and self.cfg.activation == "topk" and self.cfg.multi_topk:
            ks = [self.cfg.k, 4 * self.cfg.k]
            return nested_k_forward(self, x, target, ks, [1.0, 1.0], names=["fvu", "fvu_multi"])
        return super().forward(x, target)
