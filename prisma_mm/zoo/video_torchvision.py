"""Adapter for torchvision's video transformers (MViT v1/v2, Swin3D T/S/B): hook points over
torchvision's own modules, found by class at run time.

Input ``[batch, 3, frames, H, W]`` (torchvision's own order). Both families shrink their token
grid between stages, so the layout is per hook (:meth:`HookedModel.layout_for`):

- MViT: CLS + a ``(frames, h, w)`` grid, frame-major; a block whose query is pooled has a
  smaller grid (and width) after it than before it.
- Swin3D: no prefix; its blocks work on channel-last grids ``[batch, frames, h, w, d]``,
  hooked as ``[batch, frames*h*w, d]`` (frame-major); patch merging halves h and w.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformerBlock
from torchvision.models.video import mvit as tv_mvit
from torchvision.models.video import swin_transformer as tv_swin

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import BlockSpec, HookedModel, ModelSpec, TokenLayout
from prisma_mm.zoo import registry
from prisma_mm.zoo.video import clip_transform, exact_clip, find_all

# the classes a card's arch may name besides torchvision's registered builders (tiny cards)
CLASSES = {"MViT": tv_mvit.MViT, "SwinTransformer3d": tv_swin.SwinTransformer3d}


def _shrink(size: tuple[int, ...], pool: nn.Module) -> tuple[int, ...]:
    """The grid after a Conv3d / MaxPool3d over ``size`` (torch's output-size formula)."""
    out = []
    for i, n in enumerate(size):
        kernel, stride, padding = (
            (v[i] if isinstance(v, tuple | list) else v)
            for v in (pool.kernel_size, pool.stride, pool.padding)
        )
        out.append((n + 2 * padding - kernel) // stride + 1)
    return tuple(out)


def _stage_layout(n_prefix: int, grid: tuple[int, ...], frames: int, size) -> TokenLayout:
    t, h, w = (int(v) for v in grid)
    return TokenLayout(
        n_prefix=n_prefix,
        grid=(t, h, w),
        patch_size=(size[0] // h, size[1] // w),
        input_size=size,
        tubelet=frames // t,
    )


def _mvit(module: tv_mvit.MViT, card: registry.ModelCard) -> ModelSpec:
    frames = int(module.pos_encoding.temporal_size) * int(module.conv_proj.stride[0])
    size = (
        int(module.pos_encoding.spatial_size[0]) * int(module.conv_proj.stride[1]),
        int(module.pos_encoding.spatial_size[1]) * int(module.conv_proj.stride[2]),
    )
    blocks = find_all(module, tv_mvit.MultiscaleBlock)
    grid: tuple[int, ...] = (
        int(module.pos_encoding.temporal_size),
        *(int(v) for v in module.pos_encoding.spatial_size),
    )
    layouts = []
    for block in blocks:
        before = _stage_layout(1, grid, frames, size)
        if block.attn.pool_q is not None:
            grid = _shrink(grid, block.attn.pool_q.pool)
        layouts.append((before, _stage_layout(1, grid, frames, size)))
    pooled = (
        "MViT pools its queries and keys inside the attention (their token grids differ "
        "from the stream's)"
    )
    return ModelSpec(
        module=module,
        forward=module,
        blocks=blocks,
        block_spec=BlockSpec(
            attn_branch="attn",
            mlp_branch="mlp",
            ln2="norm2",
            mlp_proj="mlp.3",
            norm1="norm1",
            attn="attn",
            pattern_style="none",
            attn_out_proj="attn.project.0",
            resid_mid_at_ln2=True,
        ),
        embed=module.pos_encoding,
        final_norm=module.norm,
        output_module=module.head,
        layout=layouts[0][0],
        transform=clip_transform(card, frames, size, **_transform_defaults(card)),
        d_model=int(module.norm.normalized_shape[0]),
        frames=frames,
        check=exact_clip(
            repr(card.name), frames, size, "MViT's position encoding is fixed to that clip"
        ),
        block_layouts=layouts,
        missing=dict.fromkeys(("attn.hook_q", "attn.hook_k", "attn.hook_v"), pooled),
        read_only={
            "hook_resid_mid": "it is read at norm2's input; the block pools its skip path "
            "itself (edit hook_attn_out or hook_resid_post)"
        },
    )


def _swin3d(module: tv_swin.SwinTransformer3d, card: registry.ModelCard) -> ModelSpec:
    frames, size = int(card.preprocess.get("frames", 32)), (224, 224)
    if "crop" in card.preprocess:
        size = (int(card.preprocess["crop"]),) * 2
    patch = module.patch_embed.tuple_patch_size
    grid = (-(-frames // patch[0]), -(-size[0] // patch[1]), -(-size[1] // patch[2]))
    layouts = []
    for stage in module.features:
        if isinstance(stage, nn.Sequential):
            layout = _stage_layout(0, grid, frames, size)
            layouts += [(layout, layout)] * len(find_all(stage, SwinTransformerBlock))
        else:  # patch merging: pads h and w to even, then halves them
            grid = (grid[0], -(-grid[1] // 2), -(-grid[2] // 2))
    windowed = (
        "Swin3D attends within shifted 3D windows: its q / k / v are per window, not per "
        "token of the stream"
    )
    return ModelSpec(
        module=module,
        forward=module,
        blocks=find_all(module.features, SwinTransformerBlock),
        block_spec=BlockSpec(
            attn_branch="attn",
            mlp_branch="mlp",
            ln2="norm2",
            mlp_proj="mlp.3",
            norm1="norm1",
            attn="attn",
            pattern_style="none",
            attn_out_proj="attn.proj",
        ),
        embed=module.pos_drop,
        final_norm=module.norm,
        output_module=module.head,
        layout=layouts[0][0],
        transform=clip_transform(card, frames, size, **_transform_defaults(card)),
        d_model=int(module.num_features),
        frames=frames,
        check=exact_clip(
            repr(card.name),
            frames,
            size,
            "the card's token layout and per-block grids are that clip's",
        ),  # fmt: skip
        block_layouts=layouts,
        missing=dict.fromkeys(
            ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"), windowed
        ),
    )


def _transform_defaults(card: registry.ModelCard) -> dict:
    """Resize, mean and std from torchvision's own weights record (the card may override)."""
    if not card.pretrained:
        return {"resize": 256, "mean": (0.45,) * 3, "std": (0.225,) * 3}
    transforms = weights_entry(card).transforms()
    return {
        "resize": int(transforms.resize_size[0]),
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
    }


def _construct(card: registry.ModelCard) -> nn.Module:
    """The card's architecture, random init: a torchvision builder or a class (tiny cards)."""
    kwargs = dict(card.kwargs)
    if card.arch == "MViT":
        kwargs["block_setting"] = [tv_mvit.MSBlockConfig(**b) for b in kwargs["block_setting"]]
        for key in (
            "spatial_size",
            "patch_embed_kernel",
            "patch_embed_stride",
            "patch_embed_padding",
        ):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
    if card.arch in CLASSES:
        return CLASSES[card.arch](**kwargs)
    if card.arch not in torchvision.models.list_models(module=torchvision.models.video):
        raise PrismaError(
            f"card {card.name!r}: {card.arch!r} is not a torchvision video model "
            f"(torchvision {torchvision.__version__})"
        )
    return torchvision.models.get_model(card.arch, **kwargs)


def weights_entry(card: registry.ModelCard):
    """torchvision's own weights entry of a real card (URL, classes, transforms)."""
    enum = torchvision.models.get_model_weights(card.arch)
    if card.pretrained not in enum.__members__:
        raise PrismaError(
            f"card {card.name!r}: {card.pretrained!r} is not one of {card.arch}'s weights "
            f"{sorted(enum.__members__)}"
        )
    return enum[card.pretrained]


def _pretrained_state(card: registry.ModelCard) -> tuple[dict[str, Tensor], str]:
    """The card's checkpoint (``card.source``, torchvision's URL) from torch hub's cache,
    downloaded there if missing, read without unpickling objects (torchvision's own loader
    would unpickle)."""
    url = card.source
    if not url.startswith(("https://", "http://")):
        raise PrismaError(
            f"card {card.name!r} has no checkpoint URL (source {url!r}): use weights=None or a "
            "state-dict file"
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except (OSError, RuntimeError, ValueError) as error:
            raise PrismaError(
                f"pretrained weights of {card.name!r} could not be loaded "
                f"({error.__class__.__name__}); fetch {url} into {path.parent} (torch hub's "
                "cache) on a machine with network access, then copy the file here"
            ) from error
    return registry.load_state_dict_file(path), str(path)


def build(
    card: registry.ModelCard, weights: str | None, device: torch.device, img_size: int | None = None
) -> HookedModel:
    """Build the card's torchvision video model with the requested weights, hooked.

    ``weights``: None (seeded random init), ``"pretrained"`` (torchvision's checkpoint for
    the card's weights tag, from torch hub's cache), or a path to a state-dict file
    (safetensors or a plain ``torch.save(model.state_dict())``)."""
    del img_size  # refused for video cards by registry.check_img_size
    if weights is not None and weights.startswith("hf-hub:"):
        raise PrismaError(
            f"card {card.name!r} loads torchvision checkpoints: use weights='pretrained' or a "
            "state-dict file, not an hf-hub: repo"
        )
    if device.type == "meta":
        with torch.device("meta"):
            module = _construct(card)
    else:
        module = _construct(card)
    if weights == "pretrained":
        state, source = _pretrained_state(card)
        registry.load_into(module, state, source)
    elif weights is not None:
        path = registry.resolve_local_weights(weights)
        if path.is_dir():
            raise PrismaError(
                f"weights {path} is a directory; torchvision cards load one state-dict file "
                "(.safetensors or .pth)"
            )
        registry.load_into(module, registry.load_state_dict_file(path), str(path))
    if device.type != "meta":
        module = module.to(device)
    module.eval()
    if isinstance(module, tv_mvit.MViT):
        spec = _mvit(module, card)
    elif isinstance(module, tv_swin.SwinTransformer3d):
        spec = _swin3d(module, card)
    else:
        raise PrismaError(f"card {card.name!r}: {type(module).__name__} is not MViT or Swin3D")
    return HookedModel(spec, card=card)
