"""BatchTopK sparse autoencoder (Bussmann et al. 2024).

Training keeps the top ``batch * k`` ReLU'd pre-activations over the whole batch (exact, via
the sparse kernels). Inference uses one threshold ``theta``: ``code = pre * (pre > theta)``,
where ``theta`` is a running average of the smallest kept activation during training, stored
as the buffer ``activation.threshold`` and saved with the weights, so encoding one sample does
not depend on the rest of its batch. Loss: ``fvu + auxk_coefficient * auxk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prisma_mm.sae.base import Activation, DictionaryConfig, Output, SparseAutoencoder, SparseCode
from prisma_mm.sae.distributed import all_gather_cat, reduce_, spanning_world_size
from prisma_mm.sae.kernels import batchtopk_encode
from prisma_mm.sae.topk import TopKParams, _check_k, auxk_term

__all__ = ["BatchTopKActivation", "BatchTopKConfig", "BatchTopKParams", "BatchTopKSAE"]


@dataclass
class BatchTopKParams(TopKParams):
    """TopK parameters plus ``threshold_momentum``: the inference threshold follows
    ``theta <- momentum * theta + (1 - momentum) * min_kept`` (the first batch sets it)."""

    threshold_momentum: float = 0.99


@dataclass
class BatchTopKConfig(BatchTopKParams, DictionaryConfig):
    """Config of :class:`BatchTopKSAE`."""

    apply_b_dec_to_input: bool = True
    decoder_init_norm: float | None = None
    seed: int = 0

    def __post_init__(self, d_sae: int | None = None) -> None:
        super().__post_init__(d_sae)
        _check_k(self)


class BatchTopKActivation(Activation):
    """Batch-wide top-(batch*k) while training, a learned global threshold at inference.

    Buffer: ``threshold []``, 0 until the first training step calibrates it (kept activations
    are positive, so a calibrated threshold is > 0); until then inference falls back to the
    batch-wide top-k of the given batch.
    """

    name = "batchtopk"
    recon_loss = "fvu"
    threshold: Tensor

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        _check_k(cfg)
        self.k = int(cfg.k)
        self.k_aux = cfg.k_aux
        self.auxk_coefficient = float(cfg.auxk_coefficient)
        self.momentum = float(getattr(cfg, "threshold_momentum", 0.99))
        self.register_buffer("threshold", torch.zeros(()))

    def encode(self, sae: SparseAutoencoder, x_in: Tensor) -> Tensor | SparseCode:
        if sae.training or not self.calibrated:
            world = spanning_world_size()
            if world > 1 and sae.training:
                return self._encode_spanning(sae, x_in, world)
            return batchtopk_encode(
                x_in, sae.encoder_weight(), sae.b_enc, self.k, center=sae.encoder_center()
            )
        pre = sae.pre_acts(x_in)
        return pre * (pre > self.threshold.to(pre.dtype))

    def _encode_spanning(self, sae: SparseAutoencoder, x_in: Tensor, world: int) -> SparseCode:
        """The global batch's top ``batch * k`` when the batch is split over ``world``
        processes: this process's top ``batch * k`` (a superset of its share of the global top)
        are gathered, the global cut is the ``batch * k``-th largest of all of them, and each
        process keeps its entries at or above it -- the code one process would give."""
        rows = reduce_(torch.tensor(x_in.shape[0], device=x_in.device))
        total = int(rows) * self.k
        local_k = min(sae.cfg.n_latents, -(-total // max(1, x_in.shape[0])))
        code = batchtopk_encode(
            x_in, sae.encoder_weight(), sae.b_enc, local_k, center=sae.encoder_center()
        )
        values = code.values.detach().float()  # gathered in float32 (any backend, bf16 too)
        candidates = values.new_full((total,), float("-inf"))
        top = values.topk(min(total, values.numel())).values
        candidates[: top.numel()] = top
        cut = all_gather_cat(candidates).topk(total).values[-1]
        keep = values >= cut
        kept_rows = code.rows()[keep]
        offsets = torch.zeros(code.batch, dtype=torch.long, device=values.device)
        offsets[1:] = torch.bincount(kept_rows, minlength=code.batch).cumsum(0)[:-1]
        return SparseCode(
            code.values[keep], code.latents[keep], offsets, code.batch, code.n_latents
        )

    @property
    def calibrated(self) -> bool:
        """Whether training has set the inference threshold."""
        return bool(self.threshold > 0)

    def loss_terms(self, sae, x_in, code, recon, target):  # type: ignore[override]
        aux = auxk_term(sae, x_in, recon, target, self.k_aux)
        return {} if aux is None else {"auxk": (self.auxk_coefficient, aux)}

    def extras(self, code: Tensor | SparseCode) -> dict[str, Tensor]:
        if isinstance(code, SparseCode) and code.values.numel():
            return {"min_kept": code.values.detach().min().float()}
        return {}

    @torch.no_grad()
    def after_step(self, sae: SparseAutoencoder, out: Output) -> None:
        """Move the inference threshold towards the smallest activation the batch kept (over
        every process the batch spans: each one reduces, so all hold the same threshold)."""
        value = out.extras.get("min_kept")
        value = torch.tensor(float("inf")) if value is None else value.detach().float()
        value = reduce_(value.to(self.threshold.device, torch.float32).reshape(()), "min")
        if not bool(torch.isfinite(value)):  # nothing was kept anywhere
            return
        value = value.to(self.threshold)
        if not self.calibrated:
            self.threshold.copy_(value)
        else:
            self.threshold.mul_(self.momentum).add_((1.0 - self.momentum) * value)

    @torch.no_grad()
    def scale_thresholds_(self, factor: Tensor | float) -> None:
        self.threshold.mul_(torch.as_tensor(factor, dtype=self.threshold.dtype).reshape(()))


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK SAE. ``BatchTopKSAE(d_in=768, n_latents=12288, k=32)``; ``losses``: ``fvu``,
    ``mse``, ``auxk`` (when latents are dead)."""

    config_class = BatchTopKConfig
    architecture = "batchtopk"
    activation_name = "batchtopk"
    cfg: BatchTopKConfig
