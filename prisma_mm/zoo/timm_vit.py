"""Adapter for timm Vision Transformers (ViT/AugReg, DeiT/DeiT-III, DINOv2 ± registers,
EVA-02, SigLIP/SigLIP2 image towers, CLIP-in-timm): hook points over timm's own modules."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import BlockSpec, HookedModel, ModelSpec, TokenLayout
from prisma_mm.zoo import registry

# timm's Block and EvaBlock both add drop_path1(attn branch) and drop_path2(mlp branch) to
# the stream, and their attention modules expose the explicit path through fused_attn.
TIMM_BLOCK = BlockSpec(
    attn_branch="drop_path1",
    mlp_branch="drop_path2",
    ln2="norm2",
    mlp_proj="mlp.fc2",
    norm1="norm1",
    attn="attn",
    pattern_style="timm",
)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def vit_spec(
    vit: nn.Module, forward=None, output_module: nn.Module | None = None, overrides=None
) -> ModelSpec:
    """A :class:`ModelSpec` for a timm VisionTransformer / Eva (also open_clip's timm trunks)."""
    for attribute in ("blocks", "patch_embed", "pos_drop", "norm", "num_prefix_tokens"):
        if not hasattr(vit, attribute):
            raise PrismaError(
                f"{type(vit).__name__} is not a timm ViT-style model (no {attribute!r}); "
                "prisma-mm's timm adapter supports VisionTransformer and Eva"
            )
    patch_embed = vit.patch_embed
    grid = _pair(patch_embed.grid_size)
    layout = TokenLayout(
        n_prefix=int(vit.num_prefix_tokens),
        grid=(1, *grid),
        patch_size=_pair(patch_embed.patch_size),
        input_size=_pair(patch_embed.img_size),
    )
    config = resolve_data_config({}, model=vit)
    config.update(overrides or {})
    if "input_size" not in (overrides or {}):
        config["input_size"] = (3, *layout.input_size)
    transform = create_transform(**config, is_training=False)
    return ModelSpec(
        module=vit,
        forward=forward or vit,
        blocks=list(vit.blocks),
        block_spec=TIMM_BLOCK,
        embed=vit.pos_drop,
        final_norm=vit.norm,
        output_module=output_module or vit,
        layout=layout,
        transform=transform,
        d_model=int(vit.embed_dim),
        extras={"data_config": config},
    )


def _timm_name(card: registry.ModelCard) -> str:
    return f"{card.arch}.{card.pretrained}" if card.pretrained else card.arch


def _create(
    card: registry.ModelCard, pretrained: bool, hub_id: str | None, device, img_size=None
) -> nn.Module:
    kwargs = dict(card.kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size  # timm resamples the checkpoint's position embedding
    if hub_id is not None:
        # a checkpoint of this exact architecture: keep its head instead of timm's 1000 classes
        overlay = {"hf_hub_id": hub_id}
        if "num_classes" in kwargs:
            overlay["num_classes"] = kwargs["num_classes"]
        kwargs["pretrained_cfg_overlay"] = overlay
    context = torch.device(device) if device.type == "meta" else contextlib.nullcontext()
    with context:
        return timm.create_model(_timm_name(card), pretrained=pretrained, **kwargs)


def _hub_files_hint(repo_id: str) -> str:
    return registry.offline_hint(repo_id, ["model.safetensors", "pytorch_model.bin"])


def _from_hub(card: registry.ModelCard, hub_id: str | None, device, img_size=None) -> nn.Module:
    repo_id = hub_id or card.source.removeprefix("hf-hub:")
    try:
        return _create(card, pretrained=True, hub_id=hub_id, device=device, img_size=img_size)
    except (OSError, RuntimeError, ValueError) as error:
        if isinstance(error, PrismaError):
            raise
        reason = error.__class__.__name__
        raise PrismaError(
            f"pretrained weights of {card.name!r} could not be loaded ({reason}); "
            f"{_hub_files_hint(repo_id)}"
        ) from error


def _local_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if path.is_dir():
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
            if (path / filename).is_file():
                path = path / filename
                break
        else:
            raise PrismaError(
                f"directory {path} has no model.safetensors or pytorch_model.bin "
                "(expected a timm save_pretrained / push_to_hub folder)"
            )
    return registry.load_state_dict_file(path), str(path)


def resample_to(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT / Eva state dict with its position embedding resampled to ``module``'s
    input size, by the model family's own checkpoint filter (as timm's pretrained loader)."""
    family = importlib.import_module(type(module).__module__)
    return family.checkpoint_filter_fn(state, module)


def build(
    card: registry.ModelCard, weights: str | None, device: torch.device, img_size: int | None = None
) -> HookedModel:
    """Build the card's timm model with the requested weights, wrapped with hook points;
    ``img_size`` overrides the card's input size."""
    if weights == "pretrained" and card.weights and card.weights.startswith("asset:"):
        weights = str(registry.assets_dir() / card.weights.removeprefix("asset:"))
    if weights == "pretrained":
        module = _from_hub(card, None, device, img_size)
    elif weights is not None and weights.startswith("hf-hub:"):
        module = _from_hub(card, weights.removeprefix("hf-hub:"), device, img_size)
    else:
        module = _create(card, pretrained=False, hub_id=None, device=device, img_size=img_size)
        if weights is not None:
            path = registry.resolve_local_weights(weights)
            state, source = _local_state(path)
            if img_size is not None:
                state = resample_to(module, state)
            registry.load_into(module, state, source)
    if device.type != "meta":
        module = module.to(device)
    module.eval()
    return HookedModel(vit_spec(module, overrides=card.preprocess), card=card)
