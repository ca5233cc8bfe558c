"""prisma-mm: mechanistic interpretability for vision, video and diffusion models."""

from __future__ import annotations

from typing import Any

from prisma_mm.errors import PrismaError

__version__ = "0.1.0"
__all__ = ["PrismaError", "list_models", "load_model", "load_sae", "model_card", "__version__"]


def list_models(family: str | None = None) -> list[str]:
    """Names of the carded models, optionally of one family (``timm``, ``open_clip`` …)."""
    from prisma_mm.zoo.registry import list_models as _list

    return _list(family)


def model_card(name: str) -> Any:
    """The :class:`~prisma_mm.zoo.registry.ModelCard` of a carded model."""
    from prisma_mm.zoo.registry import get_card

    return get_card(name)


def load_model(
    name: str,
    weights: Any = "pretrained",
    device: Any = "cpu",
    dtype: Any = None,
    *,
    img_size: int | None = None,
    seed: int = 0,
):
    """Build a carded model wrapped as a :class:`~prisma_mm.hooks.HookedModel`.

    ``weights``: ``None`` for random init, ``"pretrained"`` for the library's own loader
    (Hugging Face hub / open_clip tag, offline from a populated cache), or a local path.
    ``img_size``: run at this input size; ``seed``: seeds random initialisation.
    """
    from prisma_mm.zoo.registry import load_model as _load

    return _load(name, weights=weights, device=device, dtype=dtype, img_size=img_size, seed=seed)


def load_sae(name: str, **kwargs: Any):
    """A published SAE by name (``prisma-mm sae list``), offline from the Hugging Face cache or
    ``path=`` a local folder; see :func:`prisma_mm.sae.published.load_sae` for the options."""
    from prisma_mm.sae.published import load_sae as _load

    return _load(name, **kwargs)
