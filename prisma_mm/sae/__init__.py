"""Sparse dictionaries: SAEs of every current kind, Matryoshka SAEs, transcoders, crosscoders.

``build(architecture, **kwargs)`` makes one, ``load(path)`` reads a saved one (dispatching on
``cfg.json``'s ``"architecture"``), ``from_pretrained`` reads any supported format from disk or
the Hugging Face hub, and ``fit_simple`` trains a small one in a plain loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prisma_mm.errors import unknown
from prisma_mm.sae.base import (
    Activation,
    Dictionary,
    DictionaryConfig,
    FiringTracker,
    Output,
    SparseAutoencoder,
    SparseCode,
    fvu,
    geometric_median,
    load_dictionary,
)
from prisma_mm.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from prisma_mm.sae.crosscoder import Crosscoder, CrosscoderConfig
from prisma_mm.sae.fit import fit_simple
from prisma_mm.sae.io import (
    from_pretrained,
    from_saelens,
    from_sparsify,
    from_vit_prisma,
    push_to_hub,
    to_saelens,
    to_sparsify,
)
from prisma_mm.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from prisma_mm.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from prisma_mm.sae.relu import ReLUConfig, ReLUSAE
from prisma_mm.sae.topk import TopKConfig, TopKSAE
from prisma_mm.sae.transcoder import Transcoder, TranscoderConfig

# every family, by architecture name (the registry Dictionary subclasses join when defined)
ARCHITECTURES: dict[str, type[Dictionary]] = Dictionary.registry


def build(architecture: str, **kwargs: Any) -> Dictionary:
    """A new dictionary: ``build("topk", d_in=768, n_latents=12288, k=32)``."""
    if architecture not in ARCHITECTURES:
        raise unknown("architecture", architecture, ARCHITECTURES)
    return ARCHITECTURES[architecture](**kwargs)


def load(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load a dictionary saved with ``.save(path)`` (any architecture), in eval mode."""
    return load_dictionary(path, device=device)


__all__ = [
    "ARCHITECTURES",
    "Activation",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "Crosscoder",
    "CrosscoderConfig",
    "Dictionary",
    "DictionaryConfig",
    "FiringTracker",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "Output",
    "ReLUConfig",
    "ReLUSAE",
    "SparseAutoencoder",
    "SparseCode",
    "TopKConfig",
    "TopKSAE",
    "Transcoder",
    "TranscoderConfig",
    "build",
    "fit_simple",
    "from_pretrained",
    "from_saelens",
    "from_sparsify",
    "from_vit_prisma",
    "fvu",
    "geometric_median",
    "load",
    "push_to_hub",
    "to_saelens",
    "to_sparsify",
]
