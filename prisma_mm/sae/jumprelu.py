"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024).

``code_i = pre_i * H(pre_i - theta_i)`` with a learned threshold ``theta`` per latent (stored
directly, as SAELens and Gemma Scope save it, so conversions are exact; kept >= ``1e-6``).
Straight-through estimator with a rectangle kernel ``K(u) = 1[|u| < 1/2]`` of bandwidth
``eps``: ``d code_i / d theta_i = -(theta_i / eps) K((pre_i - theta_i) / eps)`` and
``d H(pre_i - theta_i) / d theta_i = -(1 / eps) K((pre_i - theta_i) / eps)`` (no gradient
to ``pre`` through the step). Loss:
``mse + lambda(t) * L0`` with ``L0 = mean_rows sum_i H(pre_i - theta_i)``, or, with
``target_l0`` set, ``mse + lambda(t) * ((L0 - target_l0) / target_l0)^2``;
``lambda(t) = l0_coefficient * min(1, t / l0_warmup_fraction)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Activation, DictionaryConfig, SparseAutoencoder, warmup

__all__ = ["JumpReLUActivation", "JumpReLUConfig", "JumpReLUParams", "JumpReLUSAE"]


@dataclass
class JumpReLUParams:
    """``bandwidth``: STE kernel width; ``threshold_init``: initial theta for every latent;
    ``l0_coefficient`` and ``l0_warmup_fraction``: the L0 (or target-L0) penalty and its linear
    warm-up; ``target_l0``: when set, penalise the relative squared gap to this L0 instead."""

    bandwidth: float = 0.05
    threshold_init: float = 0.1
    l0_coefficient: float = 0.05
    l0_warmup_fraction: float = 0.05
    target_l0: float | None = None


@dataclass
class JumpReLUConfig(JumpReLUParams, DictionaryConfig):
    """Config of :class:`JumpReLUSAE`."""

    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = None
    seed: int = 0


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


_MIN_THRESHOLD = 1e-6


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        theta = threshold.clamp_min(_MIN_THRESHOLD).to(pre.dtype)
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad
        return grad_pre, grad_theta.reshape(-1, theta.numel()).sum(0).float(), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        theta = threshold.clamp_min(_MIN_THRESHOLD).to(pre.dtype)
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad
        return None, grad_theta.reshape(-1, theta.numel()).sum(0).float(), None


class JumpReLUActivation(Activation):
    """JumpReLU with learned thresholds (parameter ``threshold [n_latents]``) and an L0
    penalty (``l0`` or ``l0_target``)."""

    name = "jumprelu"
    recon_loss = "mse"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if cfg.bandwidth <= 0 or cfg.threshold_init <= 0:
            raise PrismaError("jumprelu: bandwidth and threshold_init must be positive")
        if cfg.target_l0 is not None and cfg.target_l0 <= 0:
            raise PrismaError(f"jumprelu: target_l0 must be positive, got {cfg.target_l0}")
        self.bandwidth = float(cfg.bandwidth)
        self.l0_coefficient = float(cfg.l0_coefficient)
        self.l0_warmup_fraction = float(cfg.l0_warmup_fraction)
        self.target_l0 = cfg.target_l0
        self.threshold = nn.Parameter(torch.full((cfg.n_latents,), float(cfg.threshold_init)))

    def encode(self, sae: SparseAutoencoder, x_in: Tensor) -> Tensor:
        pre = sae.pre_acts(x_in)
        # kept for loss_terms of the same forward (saves a second encoder matmul)
        self._last = (x_in, pre)
        return _JumpReLU.apply(pre, self.threshold, self.bandwidth)

    def loss_terms(self, sae, x_in, code, recon, target):  # type: ignore[override]
        last, self._last = getattr(self, "_last", None), None
        pre = last[1] if last is not None and last[0] is x_in else sae.pre_acts(x_in)
        l0 = _Step.apply(pre, self.threshold, self.bandwidth).float().sum(-1).mean()
        coef = self.l0_coefficient * warmup(sae.progress, self.l0_warmup_fraction)
        if self.target_l0 is None:
            return {"l0": (coef, l0)}
        gap = ((l0 - self.target_l0) / self.target_l0).pow(2)
        return {"l0_target": (coef, gap), "l0": (0.0, l0)}

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder, out: Any) -> None:
        """Keep thresholds at or above the floor the forward pass uses (exact exports)."""
        self.threshold.clamp_(min=_MIN_THRESHOLD)

    @torch.no_grad()
    def scale_thresholds_(self, factor: Tensor | float) -> None:
        self.threshold.mul_(torch.as_tensor(factor, dtype=self.threshold.dtype).reshape(()))


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE. ``losses``: ``mse`` (in the loss), ``l0`` or ``l0_target``, ``fvu``."""

    config_class = JumpReLUConfig
    architecture = "jumprelu"
    activation_name = "jumprelu"
    cfg: JumpReLUConfig
