"""Steering: interventions with a dictionary's features at a hook, and their effect.

``AddFeature`` adds a feature's decoder row scaled by strength x its mean activation;
``EditFeatures`` / ``ablate`` scale latents through the SAE with the error term kept;
``Reconstruct`` splices the SAE's reconstruction in; ``steer(model, [...])`` attaches them for
a ``with`` block (a classifier or a diffusion pipeline, where they gate by step, CFG half and
``RegionMask``); ``steering_effect`` reports what they do to a classifier's logits and
accuracy; :mod:`prisma_mm.steer.diffusion` grids and heatmaps of steered generations. See
docs/steering.md and docs/diffusion.md.
"""

from __future__ import annotations

from prisma_mm.steer.base import (
    AddFeature,
    EditFeatures,
    Intervention,
    Reconstruct,
    RegionMask,
    ablate,
    feature_scale,
    steer,
    token_mask,
)
from prisma_mm.steer.classifier import SteeringEffect, steering_effect

__all__ = [
    "AddFeature",
    "EditFeatures",
    "Intervention",
    "Reconstruct",
    "RegionMask",
    "SteeringEffect",
    "ablate",
    "feature_scale",
    "steer",
    "steering_effect",
    "token_mask",
]
