"""Matryoshka sparse autoencoders: nested dictionaries whose prefixes each reconstruct.

``nesting="latents"`` (Bussmann et al. 2025; Nabeshima 2024): a BatchTopK code; latents are
split into consecutive groups of ``group_sizes``; prefix ``g`` decodes latents of groups
``0..g``; ``loss = sum_g fvu_prefix_g + auxk_coefficient * auxk``.

``nesting="k"`` (MSAE, Zaigrajew et al. 2025): a per-row TopK code with ``max(ks)`` latents,
prefix ``i`` decodes the ``ks[i]`` largest; ``loss = sum_i k_weights[i] * fvu_prefix_i
(+ auxk)``; inference keeps the top ``k`` (default ``max(ks)``).

``losses`` holds ``fvu_prefix_0 ...`` (the last prefix is the full reconstruction), ``fvu``,
``mse`` and ``auxk`` (when latents are dead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import (
    DictionaryConfig,
    Output,
    SparseAutoencoder,
    SparseCode,
    nested_fvus,
)
from prisma_mm.sae.batchtopk import BatchTopKParams
from prisma_mm.sae.topk import auxk_term, nested_k_forward

__all__ = ["MatryoshkaConfig", "MatryoshkaSAE", "default_group_sizes"]


def default_group_sizes(n_latents: int, n_groups: int = 5) -> list[int]:
    """Doubling group sizes summing to ``n_latents``: e.g. 16 -> [1, 1, 2, 4, 8]."""
    sizes = [max(1, n_latents >> (n_groups - 1))]
    for i in range(1, n_groups):
        sizes.append(max(1, n_latents >> (n_groups - i)))
    sizes[-1] += n_latents - sum(sizes)
    return sizes


@dataclass
class MatryoshkaConfig(BatchTopKParams, DictionaryConfig):
    """Config of :class:`MatryoshkaSAE`.

    ``group_sizes``: latents per nested group (sum ``n_latents``; default doubling, 5 groups).
    ``nesting``: ``"latents"`` or ``"k"``; ``ks`` / ``k_weights``: the nested k's and their
    loss weights (``"k"`` nesting; weights default to 1). ``k``: latents per row (BatchTopK
    average for ``"latents"``, default 32; the inference k for ``"k"``, default ``max(ks)``).
    """

    k: int | None = None  # type: ignore[assignment]
    nesting: str = "latents"
    group_sizes: list[int] | None = None
    ks: list[int] | None = None
    k_weights: list[float] | None = None
    activation: str = field(default="", init=False)
    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = None
    seed: int = 0

    def __post_init__(self, d_sae: int | None = None) -> None:
        DictionaryConfig.__post_init__(self, d_sae)
        if self.nesting not in ("latents", "k"):
            raise PrismaError(f"nesting must be 'latents' or 'k', got {self.nesting!r}")
        if self.nesting == "latents":
            self.group_sizes = list(self.group_sizes or default_group_sizes(self.n_latents))
            if sum(self.group_sizes) != self.n_latents or min(self.group_sizes) <= 0:
                raise PrismaError(
                    f"group_sizes {self.group_sizes} must be positive and sum to "
                    f"n_latents={self.n_latents}"
                )
            self.k = 32 if self.k is None else int(self.k)
            self.activation = "batchtopk"
        else:
            if not self.ks:
                raise PrismaError("nesting='k' needs ks, e.g. ks=[16, 32, 64]")
            self.ks = sorted(int(k) for k in self.ks)
            if self.ks[0] <= 0 or self.ks[-1] > self.n_latents:
                raise PrismaError(f"ks must be in 1..n_latents={self.n_latents}, got {self.ks}")
            self.k_weights = list(self.k_weights or [1.0] * len(self.ks))
            if len(self.k_weights) != len(self.ks):
                raise PrismaError("k_weights must have one weight per k in ks")
            self.k = self.ks[-1] if self.k is None else int(self.k)
            self.activation = "topk"
        if not 0 < self.k <= self.n_latents:
            raise PrismaError(f"k must be in 1..n_latents={self.n_latents}, got {self.k}")


class MatryoshkaSAE(SparseAutoencoder):
    """Matryoshka SAE over a BatchTopK code (``nesting="latents"``) or nested k's
    (``nesting="k"``). ``MatryoshkaSAE(d_in=768, n_latents=12288, k=32,
    group_sizes=[768, 768, 1536, 3072, 6144])``."""

    config_class = MatryoshkaConfig
    architecture = "matryoshka"
    cfg: MatryoshkaConfig

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Training and eval both report ``fvu_prefix_*`` (eval encodes with the inference
        threshold, or the inference k)."""
        if self.cfg.nesting == "k":
            assert self.cfg.ks is not None and self.cfg.k_weights is not None
            names = [f"fvu_prefix_{i}" for i in range(len(self.cfg.ks))]
            return nested_k_forward(
                self, x, target, self.cfg.ks, self.cfg.k_weights, self.cfg.k, names
            )
        target = x if target is None else target
        flat_x, lead = self._flat_in(x)
        flat_t = self._flat_target(target, flat_x.shape[0])
        x_in = flat_x.reshape(flat_x.shape[0], -1)
        code = self.activation.encode(self, x_in)
        if not isinstance(code, SparseCode):  # eval: the threshold code is dense
            code = SparseCode.from_dense(code)
        sizes = torch.tensor(self.cfg.group_sizes, device=x_in.device)
        group = torch.bucketize(code.latents, sizes.cumsum(0), right=True)
        # groups are runs of consecutive latents, so they already ascend within each row
        parts = self.nested_parts(code, group, len(sizes), in_order=True)
        fvus, recon = nested_fvus(parts, self.b_dec.reshape(-1), flat_t)
        loss = fvus.sum()
        losses = {f"fvu_prefix_{g}": fvus[g] for g in range(len(sizes))}
        losses.update(self.reconstruction_terms(recon, flat_t))
        aux = auxk_term(self, x_in, recon, flat_t, self.cfg.k_aux)
        if aux is not None:
            losses["auxk"] = aux
            loss = loss + self.cfg.auxk_coefficient * aux
        return Output(
            recon=recon.reshape(*lead, *self.b_dec.shape),
            loss=loss,
            losses={k: v.detach() for k, v in losses.items()},
            sparse=code,
            extras=self.activation.extras(code),
        )
