"""Dictionaries with known answers, shared by the tests."""

from __future__ import annotations

import torch

from prisma_mm.sae import ReLUSAE


def exact_sae(d: int, hook: str | None = None) -> ReLUSAE:
    """recon = relu(x) - relu(-x) = x exactly: latents +e_j and -e_j (``2 d`` of them);
    ``hook`` is recorded in its metadata."""
    sae = ReLUSAE(d_in=d, n_latents=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    if hook is not None:
        sae.metadata["hook"] = hook
    return sae.eval()
