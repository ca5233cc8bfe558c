"""Adapter for open_clip models (OpenAI CLIP, LAION / DataComp / MetaCLIP checkpoints,
SigLIP): hooks on the image tower, ``encode_text`` through the text tower for zero-shot."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import Tensor, nn

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import BlockSpec, HookedModel, ModelSpec, TokenLayout
from prisma_mm.zoo import registry
from prisma_mm.zoo.timm_vit import resample_to, vit_spec

OPEN_CLIP_BLOCK = BlockSpec(
    attn_branch="ls_1",
    mlp_branch="ls_2",
    ln2="ln_2",
    mlp_proj="mlp.c_proj",
    norm1="ln_1",
    attn="attn",
    pattern_style="mha",
)


@functools.cache
def _register_config(path: str) -> None:
    open_clip.add_model_config(path)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _transform(visual: nn.Module, card: registry.ModelCard) -> object:
    # open_clip merges a tag's preprocessing (SigLIP's mean/std 0.5, 'squash' resizing) only
    # when it downloads that tag: merge it here too, so the transform is the same whatever
    # the weights (tag, local file, random init, meta).
    config = open_clip.get_model_preprocess_cfg(visual)
    if card.pretrained and not card.pretrained.startswith("hf-hub:"):
        tag_config = open_clip.get_pretrained_cfg(card.arch, card.pretrained)
        config = {**merge_preprocess_dict(config, tag_config), "size": config["size"]}
    config = {**config, **card.preprocess}
    return image_transform_v2(PreprocessCfg(**config), is_train=False)


def clip_spec(model: nn.Module, card: registry.ModelCard) -> ModelSpec:
    """A :class:`ModelSpec` over an open_clip model's image tower (native ViT or timm trunk)."""
    visual = model.visual
    transform = _transform(visual, card)
    if hasattr(visual, "trunk"):  # SigLIP & co: a timm ViT inside open_clip's TimmModel
        spec = vit_spec(visual.trunk, forward=visual, output_module=visual)
        spec.transform = transform
    elif hasattr(visual, "transformer") and hasattr(visual, "class_embedding"):
        spec = ModelSpec(
            module=model,
            forward=visual,
            blocks=list(visual.transformer.resblocks),
            block_spec=OPEN_CLIP_BLOCK,
            embed=visual.patch_dropout,
            final_norm=visual.ln_post,
            output_module=visual,
            layout=TokenLayout(
                n_prefix=1,
                grid=(1, *_pair(visual.grid_size)),
                patch_size=_pair(visual.patch_size),
                input_size=_pair(visual.image_size),
            ),
            transform=transform,
            d_model=int(visual.transformer.width),
        )
    else:
        raise PrismaError(
            f"{card.name!r}: open_clip image tower {type(visual).__name__} is not a ViT; "
            "prisma-mm hooks ViT towers only"
        )
    spec.module = model
    spec.text = text_spec(model, card)
    return spec


def text_spec(model: nn.Module, card: registry.ModelCard) -> ModelSpec:
    """A :class:`ModelSpec` over the text tower (CLIP's own or a CustomTextCLIP's
    TextTransformer): hook names under ``text.``, tokens as positions ``(1, 1, n_ctx)``."""
    tower = model.text if hasattr(model, "text") else model
    if not (hasattr(tower, "transformer") and hasattr(tower, "ln_final")):
        raise PrismaError(
            f"{card.name!r}: text tower {type(tower).__name__} is not open_clip's "
            "TextTransformer; prisma-mm hooks native text towers only"
        )
    transformer = tower.transformer
    n_ctx = int(getattr(model, "context_length", 0) or tower.context_length)
    return ModelSpec(
        module=model,
        forward=model.encode_text,
        blocks=list(transformer.resblocks),
        block_spec=OPEN_CLIP_BLOCK,
        embed=transformer,
        embed_is_input=True,  # token + position embedding: the transformer's input
        final_norm=tower.ln_final,
        output_module=None,  # the projection is a matmul in encode_text: hook its return
        layout=TokenLayout(
            n_prefix=0, grid=(1, 1, n_ctx), patch_size=(1, 1), input_size=(1, n_ctx)
        ),
        transform=None,
        d_model=int(transformer.width),
        prefix="text.",
        prepare=functools.partial(_tokens, model, card, n_ctx),
    )


@functools.cache
def _tokenizer(arch: str):
    return open_clip.get_tokenizer(arch)


def _tokens(model: nn.Module, card: registry.ModelCard, n_ctx: int, texts) -> Tensor:
    """Prompts (a string or a list of strings) or tokens ``[batch, n_ctx]`` as the text
    tower's input ``[batch, n_ctx]`` (int64, on the model's device)."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Tensor):
        if texts.dim() != 2 or texts.shape[1] != n_ctx or texts.is_floating_point():
            raise PrismaError(
                f"text input has shape {tuple(texts.shape)} and dtype {texts.dtype}; expected "
                f"integer tokens [batch, {n_ctx}] (or pass the prompts as a list of strings)"
            )
        tokens = texts
    elif isinstance(texts, list | tuple) and texts and all(isinstance(t, str) for t in texts):
        try:
            tokenizer = _tokenizer(card.arch)
        except OSError as error:
            raise PrismaError(
                f"the tokenizer of {card.name!r} is not available offline "
                f"({error.__class__.__name__}); "
                f"{registry.offline_hint(card.source, ['tokenizer.json'])}"
            ) from error
        tokens = tokenizer(list(texts))
    else:
        raise PrismaError(
            f"text input is a {type(texts).__name__}; expected a prompt, a non-empty list of "
            f"prompts, or integer tokens [batch, {n_ctx}]"
        )
    return tokens.to(device=next(model.parameters()).device, dtype=torch.long)


def _create(
    card: registry.ModelCard, pretrained: str | None, device: torch.device, img_size=None
) -> nn.Module:
    arch = card.arch
    kwargs = dict(card.kwargs)
    if img_size is not None:
        kwargs["force_image_size"] = img_size  # open_clip resizes the position embedding
    if card.config_file:
        _register_config(str(registry.zoo_dir() / card.config_file))
    if pretrained and pretrained.startswith("hf-hub:"):
        arch, pretrained = pretrained, None
    quiet = logging.getLogger()
    level = quiet.level
    if pretrained is None:  # open_clip warns that random init is random init
        quiet.setLevel(logging.ERROR)
    # open_clip builds on the CPU and moves afterwards: build a meta model under the meta
    # device context instead, or a ViT-bigG allocates and initialises gigabytes first.
    context = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    try:
        with context:
            model = open_clip.create_model(
                arch,
                pretrained=pretrained,
                device="meta" if device.type == "meta" else "cpu",
                require_pretrained=pretrained is not None,
                **kwargs,
            )
    except (OSError, RuntimeError, ValueError) as error:
        if isinstance(error, PrismaError) or pretrained is None and not arch.startswith("hf-hub:"):
            raise
        repo = arch.removeprefix("hf-hub:") if arch.startswith("hf-hub:") else card.source
        files = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        raise PrismaError(
            f"pretrained weights of {card.name!r} could not be loaded "
            f"({error.__class__.__name__}); {registry.offline_hint(repo, files)}"
        ) from error
    finally:
        quiet.setLevel(level)
    return model


def _resample(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's image position embedding resampled to ``model``'s input size."""
    open_clip.model.resize_pos_embed(state, model)  # native towers, in place
    trunk = getattr(model.visual, "trunk", None)
    if trunk is not None:  # a timm trunk: timm's own filter
        prefix = "visual.trunk."
        inner = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        inner = resample_to(trunk, inner)
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({prefix + k: v for k, v in inner.items()})
    return state


def build(
    card: registry.ModelCard, weights: str | None, device: torch.device, img_size: int | None = None
) -> HookedModel:
    """Build the card's open_clip model with the requested weights, wrapped with hook points;
    ``img_size`` overrides the image tower's input size."""
    if weights == "pretrained":
        model = _create(card, card.pretrained or card.source, device, img_size)
    elif weights is not None and weights.startswith("hf-hub:"):
        model = _create(card, weights, device, img_size)
    else:
        model = _create(card, None, device, img_size)
        if weights is not None:
            path = registry.resolve_local_weights(weights)
            if path.is_dir():
                candidates = [
                    path / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                ]
                found = [c for c in candidates if c.is_file()]
                if not found:
                    raise PrismaError(
                        f"directory {path} has no open_clip_model.safetensors or .bin"
                    )
                path = found[0]
            state = registry.load_state_dict_file(Path(path))
            if img_size is not None:
                state = _resample(model, state)
            registry.load_into(model, state, str(path))
    if device.type not in ("meta", "cpu"):
        model = model.to(device)
    model.eval()
    return HookedModel(clip_spec(model, card), card=card)
