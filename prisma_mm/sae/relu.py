"""ReLU sparse autoencoder with an L1 penalty weighted by decoder-row norms (Anthropic, April
2024 update).

``code = relu(W_enc^T (x - b_dec) + b_enc)``, ``recon = W_dec^T code + b_dec``;
``loss = mse + lambda(t) * sum_i code_i * ||W_dec[i]||`` (mean over rows), with
``lambda(t) = l1_coefficient * min(1, t / l1_warmup_fraction)``. Decoder rows are free (the
norm-weighted penalty replaces the unit-norm constraint) and start at norm 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from prisma_mm.sae.base import Activation, DictionaryConfig, SparseAutoencoder, warmup

__all__ = ["ReLUActivation", "ReLUConfig", "ReLUParams", "ReLUSAE"]


@dataclass
class ReLUParams:
    """``l1_coefficient``: final weight of the norm-weighted L1 term; ``l1_warmup_fraction``:
    fraction of training over which it ramps linearly from 0."""

    l1_coefficient: float = 5.0
    l1_warmup_fraction: float = 0.05


@dataclass
class ReLUConfig(ReLUParams, DictionaryConfig):
    """Config of :class:`ReLUSAE`."""

    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = None
    seed: int = 0


class ReLUActivation(Activation):
    """``relu(pre)`` with the decoder-norm-weighted L1 term ``l1``."""

    name = "relu"
    recon_loss = "mse"
    unit_decoder = False
    decoder_init_norm = 0.1

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.l1_coefficient = float(cfg.l1_coefficient)
        self.l1_warmup_fraction = float(cfg.l1_warmup_fraction)

    def encode(self, sae: SparseAutoencoder, x_in: Tensor) -> Tensor:
        return sae.pre_acts(x_in).relu()

    def loss_terms(self, sae, x_in, code, recon, target):  # type: ignore[override]
        l1 = (code.float() * sae.decoder_norms()).sum(-1).mean()
        coef = self.l1_coefficient * warmup(sae.progress, self.l1_warmup_fraction)
        return {"l1": (coef, l1)}

    def scale_thresholds_(self, factor: Tensor | float) -> None:
        """ReLU has no threshold (it is positively homogeneous)."""


class ReLUSAE(SparseAutoencoder):
    """ReLU + norm-weighted L1 SAE. ``losses``: ``mse`` (in the loss), ``l1``, ``fvu``."""

    config_class = ReLUConfig
    architecture = "relu"
    activation_name = "relu"
    cfg: ReLUConfig
