"""Steering: interventions with a dictionary's features at a hook, and their effect.

``AddFeature`` adds a feature's decoder row scaled by strength x its mean activation;
``EditFeatures`` / ``ablate`` scale latents through the SAE with the error term kept;
``steer(model, [...])`` attaches them for a ``with`` block; ``steering_effect`` reports what
they do to a classifier's logits and accuracy. See docs/steering.md.
"""

from __future__ import annotations

from prisma_mm.steer.base import (
    AddFeature,
    EditFeatures,
    Intervention,
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
    "SteeringEffect",
    "ablate",
    "feature_scale",
    "steer",
    "steering_effect",
    "token_mask",
]
