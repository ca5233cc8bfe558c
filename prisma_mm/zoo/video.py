"""Adapter for transformers' video transformers (VideoMAE, TimeSformer, ViViT, V-JEPA 2,
X-CLIP's video tower): hook points over the native modules, found by class at run time.

Input convention (every video card, here and in :mod:`prisma_mm.zoo.video_torchvision`):
clips are float tensors ``[batch, 3, frames, H, W]``, normalized as the card says
(``model.preprocess(clips)`` turns ``[frames, H, W, 3]`` uint8 clips into that); each family
gets its own order (``[batch, frames, 3, H, W]`` for transformers) inside the adapter.

Token order is each family's own and ``model.layout`` says it: VideoMAE and V-JEPA 2 are
frame-major without prefix tokens (tubelets of 2 frames), ViViT CLS + tubelets frame-major,
TimeSformer CLS + patches with time fastest (``order="hwt"``), X-CLIP every frame's CLS, then
every frame's patches (its blocks see frames as batch items; the hooks show one clip).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import Tensor, nn

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import BlockSpec, HookedModel, ModelSpec, TokenLayout
from prisma_mm.zoo import registry

# hooks on an attention that runs on other sequences than the clip's tokens (TimeSformer's
# divided attention, X-CLIP's message tokens): not offered there
INSIDE_ATTENTION = (
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "hook_attn_out",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClipTransform:
    """A decoded clip ``[frames, H, W, 3]`` (uint8, or float in [0, 1]; numpy or torch) to the
    model's input ``[3, frames, crop, crop]``: shorter side resized to ``resize`` (bilinear,
    antialiased), centre crop, then ``(x - mean) / std``, as the families' own processors."""

    frames: int
    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, clip: Any) -> Tensor:
        video = torch.as_tensor(np.asarray(clip)) if not isinstance(clip, Tensor) else clip
        if video.dim() != 4 or video.shape[-1] != 3:
            raise PrismaError(
                f"a clip has shape {tuple(video.shape)}; expected [frames, H, W, 3] "
                "(decoded RGB frames, channels last)"
            )
        if video.shape[0] != self.frames:
            raise PrismaError(
                f"a clip has {video.shape[0]} frames; this card takes {self.frames} "
                "(sample clips of the card's length, see docs/video.md)"
            )
        frames = video.permute(0, 3, 1, 2)
        frames = frames.float() / 255.0 if not frames.is_floating_point() else frames.float()
        height, width = frames.shape[-2:]
        scale = self.resize / min(height, width)
        size = (max(self.crop[0], round(height * scale)), max(self.crop[1], round(width * scale)))
        if size != (height, width):
            frames = nn.functional.interpolate(
                frames, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        frames = frames[..., top : top + self.crop[0], left : left + self.crop[1]]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((frames - mean) / std).permute(1, 0, 2, 3).contiguous()


def clip_transform(card: registry.ModelCard, frames: int, crop: tuple[int, int], **defaults):
    """The card's :class:`ClipTransform`: its ``preprocess`` entries over the family defaults."""
    settings = {"resize": crop[0], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **defaults}
    settings.update({k: v for k, v in card.preprocess.items() if k in ("resize", "mean", "std")})
    return ClipTransform(
        frames=frames,
        resize=int(settings["resize"]),
        crop=crop,
        mean=tuple(float(v) for v in settings["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in settings["std"]),  # type: ignore[arg-type]
    )


def find_one(module: nn.Module, cls: type, card: registry.ModelCard) -> nn.Module:
    """The first submodule of class ``cls`` (found by class: paths moved between versions)."""
    for sub in module.modules():
        if isinstance(sub, cls):
            return sub
    raise PrismaError(
        f"{card.name!r}: {type(module).__name__} has no {cls.__name__}; this transformers "
        f"version ({transformers.__version__}) lays the model out differently"
    )


def exact_clip(
    label: str, frames: int, size: tuple[int, int], why: str, takes: str | None = None
) -> Callable[[Tensor], None]:
    """A guard refusing clips ``[B, C, T, H, W]`` of another length or size, in one line
    (``label`` names the model, ``why`` says what goes wrong otherwise)."""
    takes = takes or f"{frames} frames at {size}"

    def check(x: Tensor) -> None:
        if x.shape[2] != frames or tuple(x.shape[3:]) != size:
            raise PrismaError(
                f"{label} got {x.shape[2]} frames at {tuple(x.shape[3:])} px; it takes "
                f"{takes} ({why})"
            )

    return check


def find_all(module: nn.Module, cls: type) -> list[nn.Module]:
    """Every submodule of class ``cls``, in registration (= forward) order."""
    return [sub for sub in module.modules() if isinstance(sub, cls)]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _card_frames(card: registry.ModelCard, default: int) -> int:
    return int(card.preprocess.get("frames", default))


# ----- one function per family: (native module, card) -> ModelSpec ----------------------------


def _videomae(module: nn.Module, card: registry.ModelCard) -> ModelSpec:
    from transformers.models.videomae import modeling_videomae as m

    config = module.config
    base = find_one(module, m.VideoMAEModel, card)
    patch = _pair(config.patch_size)
    size = _pair(config.image_size)
    tubelet = int(config.tubelet_size)
    frames = int(config.num_frames)
    layout = TokenLayout(
        n_prefix=0,
        grid=(frames // tubelet, size[0] // patch[0], size[1] // patch[1]),
        patch_size=patch,
        input_size=size,
        tubelet=tubelet,
    )
    return ModelSpec(
        module=module,
        forward=_forward(module, "pixel_values"),
        blocks=find_all(base.encoder, m.VideoMAELayer),
        block_spec=BlockSpec(
            attn_branch="attention",
            mlp_branch="output.dropout",
            ln2="layernorm_after",
            mlp_proj="output.dense",
            norm1="layernorm_before",
            attn="attention.attention",
            pattern_style="hf",
            mlp="intermediate",
            attn_out_proj="attention.output.dense",
        ),
        embed=base.embeddings,
        final_norm=base.layernorm,  # None with mean pooling: its fc_norm sees the pooled token
        output_module=getattr(module, "classifier", None),
        layout=layout,
        transform=clip_transform(card, frames, size),
        d_model=int(config.hidden_size),
        frames=frames,
    )


def _timesformer(module: nn.Module, card: registry.ModelCard) -> ModelSpec:
    from transformers.models.timesformer import modeling_timesformer as m

    config = module.config
    if config.attention_type != "divided_space_time":
        raise PrismaError(
            f"{card.name!r}: TimeSformer attention_type {config.attention_type!r} is not "
            "supported; prisma-mm hooks the divided space-time checkpoints"
        )
    base = find_one(module, m.TimesformerModel, card)
    patch = _pair(config.patch_size)
    size = _pair(config.image_size)
    frames = int(config.num_frames)
    layout = TokenLayout(
        n_prefix=1,
        grid=(frames, size[0] // patch[0], size[1] // patch[1]),
        patch_size=patch,
        input_size=size,
        order="hwt",  # the embeddings put patch-major, time-fastest tokens after CLS
    )
    split = (
        "TimeSformer's divided attention runs on per-patch [batch*patches, frames, d] and "
        "per-frame [batch*frames, 1+patches, d] sequences, not on the clip's tokens"
    )
    missing = dict.fromkeys(
        (*INSIDE_ATTENTION, "attn.hook_pattern"),
        f"{split} (read hook_resid_mid - hook_resid_pre for the attention's update)",
    )

    check = exact_clip(
        f"TimeSformer {card.name!r}", frames, size,
        "other lengths and sizes give wrong outputs without an error",
        takes=f"exactly config.num_frames={frames} at {size}",
    )  # fmt: skip

    return ModelSpec(
        module=module,
        forward=_forward(module, "pixel_values"),
        blocks=find_all(base.encoder, m.TimesformerLayer),
        block_spec=BlockSpec(
            attn_branch="attention",
            mlp_branch="output",
            ln2="layernorm_after",
            mlp_proj="output.dense",
            norm1="layernorm_before",
            attn="attention.attention",
            pattern_style="none",
            mlp="intermediate",
            resid_mid_at_ln2=True,
        ),
        embed=base.embeddings,
        final_norm=base.layernorm,
        output_module=getattr(module, "classifier", None),
        layout=layout,
        transform=clip_transform(card, frames, size, mean=(0.45,) * 3, std=(0.225,) * 3),
        d_model=int(config.hidden_size),
        frames=frames,
        check=check,
        missing=missing,
        read_only={
            "hook_resid_mid": "it is read at layernorm_after's input; the block adds its "
            "temporal and spatial updates itself (edit hook_resid_pre or hook_resid_post)"
        },
    )


def _vivit(module: nn.Module, card: registry.ModelCard) -> ModelSpec:
    from transformers.models.vivit import modeling_vivit as m

    config = module.config
    base = find_one(module, m.VivitModel, card)
    tubelet, patch_h, patch_w = (int(v) for v in config.tubelet_size)
    size = _pair(config.image_size)
    frames = int(config.num_frames)
    layout = TokenLayout(
        n_prefix=1,
        grid=(frames // tubelet, size[0] // patch_h, size[1] // patch_w),
        patch_size=(patch_h, patch_w),
        input_size=size,
        tubelet=tubelet,
    )
    return ModelSpec(
        module=module,
        forward=_forward(module, "pixel_values"),
        blocks=find_all(base, m.VivitLayer),
        block_spec=BlockSpec(
            attn_branch="attention",
            mlp_branch="mlp",
            ln2="layernorm_after",
            mlp_proj="mlp.fc2",
            norm1="layernorm_before",
            attn="attention",
            pattern_style="hf",
            attn_out_proj="attention.o_proj",
        ),
        embed=base.embeddings,
        final_norm=base.layernorm,
        output_module=getattr(module, "classifier", None),
        layout=layout,
        transform=clip_transform(card, frames, size, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3),
        d_model=int(config.hidden_size),
        frames=frames,
    )


def _vjepa2(module: nn.Module, card: registry.ModelCard) -> ModelSpec:
    from transformers.models.vjepa2 import modeling_vjepa2 as m

    config = module.config
    encoder = find_one(module, m.VJEPA2Encoder, card)  # not the predictor's layers
    patch = int(config.patch_size)
    crop = int(config.crop_size)
    tubelet = int(config.tubelet_size)
    frames = _card_frames(card, int(config.frames_per_clip))
    layout = TokenLayout(
        n_prefix=0,
        grid=(frames // tubelet, crop // patch, crop // patch),
        patch_size=(patch, patch),
        input_size=(crop, crop),
        tubelet=tubelet,
    )

    def check(x: Tensor) -> None:
        if tuple(x.shape[3:]) != (crop, crop):
            raise PrismaError(
                f"V-JEPA 2 {card.name!r} got {tuple(x.shape[3:])} px clips; it takes exactly "
                f"config.crop_size={crop} (its rotary positions assume that grid, so other "
                "sizes give wrong positions without an error)"
            )

    classifier = getattr(module, "classifier", None)
    return ModelSpec(
        module=module,
        forward=_forward(
            module,
            "pixel_values_videos",
            **({} if classifier is not None else {"skip_predictor": True}),
        ),
        blocks=find_all(encoder, m.VJEPA2Layer),
        block_spec=BlockSpec(
            attn_branch="attention",
            mlp_branch="mlp",
            ln2="norm2",
            mlp_proj="mlp.fc2",
            norm1="norm1",
            attn="attention",
            pattern_style="hf",
            attn_out_proj="attention.proj",
        ),
        embed=encoder.embeddings,
        final_norm=encoder.layernorm,
        output_module=classifier,
        layout=layout,
        transform=clip_transform(card, frames, (crop, crop), resize=int(crop * 256 / 224)),
        d_model=int(config.hidden_size),
        frames=frames,
        check=check,
    )


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _xclip(module: nn.Module, card: registry.ModelCard) -> ModelSpec:
    from transformers.models.x_clip import modeling_x_clip as m

    vision = find_one(module, m.XCLIPVisionModel, card)
    config = vision.config
    patch = _pair(config.patch_size)
    size = _pair(config.image_size)
    frames = int(config.num_frames)
    layout = TokenLayout(
        n_prefix=frames,  # each frame's CLS, frame order, then every frame's patches
        grid=(frames, size[0] // patch[0], size[1] // patch[1]),
        patch_size=patch,
        input_size=size,
    )
    message = (
        "X-CLIP's cross-frame attention appends a message token to every frame, so its "
        "attention sees [batch*frames, 2 + patches, d]"
    )
    missing = dict.fromkeys(
        INSIDE_ATTENTION,
        f"{message} (read hook_resid_mid - hook_resid_pre for the attention's update)",
    )

    def run(x: Tensor) -> Tensor:  # the video tower: per-frame ViT, projection, then MIT
        return module.get_video_features(pixel_values=x.transpose(1, 2)).pooler_output

    return ModelSpec(
        module=module,
        forward=run,
        blocks=find_all(vision.encoder, m.XCLIPVisionEncoderLayer),
        block_spec=BlockSpec(
            attn_branch="self_attn",
            mlp_branch="mlp",
            ln2="layer_norm2",
            mlp_proj="mlp.fc2",
            norm1="layer_norm1",
            attn="self_attn",
            pattern_style="none",
            resid_mid_at_ln2=True,
        ),
        embed=vision.embeddings,
        final_norm=None,  # post_layernorm sees each frame's CLS only: read hook_output
        output_module=None,
        layout=layout,
        transform=clip_transform(card, frames, size, mean=CLIP_MEAN, std=CLIP_STD),
        d_model=int(config.hidden_size),
        frames=frames,
        frames_in_batch=True,
        missing=missing,
        read_only={
            "hook_resid_mid": "it is read at layer_norm2's input; the block drops the message "
            "token and adds the MLP itself (edit hook_resid_pre or hook_resid_post)"
        },
    )


FAMILIES: dict[str, Callable[[nn.Module, registry.ModelCard], ModelSpec]] = {
    "videomae": _videomae,
    "timesformer": _timesformer,
    "vivit": _vivit,
    "vjepa2": _vjepa2,
    "xclip": _xclip,
}


def _forward(module: nn.Module, input_name: str, **fixed) -> Callable:
    """The native forward on ``[batch, 3, frames, H, W]``: logits (classifiers) or the last
    hidden state ``[batch, tokens, d]`` (encoders)."""

    def run(x: Tensor) -> Tensor:
        output = module(**{input_name: x.transpose(1, 2)}, **fixed)  # [batch, frames, 3, H, W]
        return output.logits if hasattr(output, "logits") else output.last_hidden_state

    return run


# ----- building ------------------------------------------------------------------------------


def _model_class(card: registry.ModelCard) -> type:
    cls = getattr(transformers, card.arch, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise PrismaError(
            f"card {card.name!r}: {card.arch!r} is not a transformers model class "
            f"(transformers {transformers.__version__})"
        )
    if cls.config_class.model_type not in FAMILIES:
        raise PrismaError(
            f"card {card.name!r}: {card.arch} ({cls.config_class.model_type}) is not one of the "
            f"hooked video families {sorted(FAMILIES)}"
        )
    return cls


@contextlib.contextmanager
def _quiet() -> Any:
    # transformers logs every unused pretraining weight (the VideoMAE decoder, ...) at WARNING
    # and draws a progress bar per load: neither belongs in a one-line CLI
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    level = logger.level
    bars = hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _fits(cls: type, module: nn.Module, info: dict, source: str) -> nn.Module:
    """The loaded module, or one line when the checkpoint is of another architecture
    (transformers would only warn and initialise the missing weights at random)."""
    wanted = cls.config_class.model_type
    if module.config.model_type != wanted:
        raise PrismaError(
            f"weights {source} are a {module.config.model_type!r} checkpoint; this card is "
            f"{cls.__name__} ({wanted!r})"
        )
    missing = list(info.get("missing_keys", ())) + [k[0] for k in info.get("mismatched_keys", ())]
    if missing:
        raise PrismaError(
            f"weights {source} do not fit {cls.__name__}: {len(missing)} missing or mis-shaped "
            f"keys (e.g. {missing[:3]}) (is it a checkpoint of this card's architecture?)"
        )
    return module


def _from_pretrained(cls: type, card: registry.ModelCard, source: str) -> nn.Module:
    """``cls.from_pretrained`` from a folder or the HF cache (offline first), else the hub."""
    with _quiet():
        try:
            module, info = cls.from_pretrained(
                source, local_files_only=True, output_loading_info=True
            )
            return _fits(cls, module, info, source)
        except OSError:
            if Path(source).exists():
                raise
        try:
            module, info = cls.from_pretrained(source, output_loading_info=True)
        except (OSError, ValueError) as error:
            from huggingface_hub import constants

            raise PrismaError(
                f"pretrained weights of {card.name!r} could not be loaded "
                f"({error.__class__.__name__}); fetch the Hugging Face repo {source!r} (its "
                f"config.json and model.safetensors) into the HF cache ({constants.HF_HUB_CACHE}), "
                f"e.g. `huggingface-cli download {source}` on a machine with network access, then "
                "copy the cache folder here"
            ) from error
    return _fits(cls, module, info, source)


def _local(cls: type, card: registry.ModelCard, path: Path, device: torch.device) -> nn.Module:
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return _from_pretrained(cls, card, str(path))
        except PrismaError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure here is a bad user folder
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise PrismaError(
                f"directory {path} is not a transformers save_pretrained folder of {card.arch} "
                f"({error.__class__.__name__}: {reason})"
            ) from error
    if path.is_dir():
        found = [
            path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()
        ]
        if not found:
            raise PrismaError(
                f"directory {path} has no config.json, model.safetensors or pytorch_model.bin "
                "(expected a transformers save_pretrained folder)"
            )
        path = found[0]
    module = _random(cls, card, device)
    registry.load_into(module, registry.load_state_dict_file(path), str(path))
    return module


def _random(cls: type, card: registry.ModelCard, device: torch.device) -> nn.Module:
    config = cls.config_class(**card.kwargs)
    context = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    with context:
        return cls(config)


def build(
    card: registry.ModelCard, weights: str | None, device: torch.device, img_size: int | None = None
) -> HookedModel:
    """Build the card's transformers video model with the requested weights, hooked.

    ``weights``: None (seeded random init from the card's config), ``"pretrained"`` (the HF
    repo ``card.source``, from the HF cache offline first), ``"hf-hub:org/repo"``, or a path
    (a ``save_pretrained`` folder, or a safetensors / torch state-dict file of the card's
    architecture)."""
    del img_size  # refused for video cards by registry.check_img_size
    cls = _model_class(card)
    if weights == "pretrained" and card.weights and card.weights.startswith("asset:"):
        weights = str(registry.assets_dir() / card.weights.removeprefix("asset:"))  # toyvideo
    if weights == "pretrained":
        module = _from_pretrained(cls, card, card.source)
    elif weights is not None and weights.startswith("hf-hub:"):
        module = _from_pretrained(cls, card, weights.removeprefix("hf-hub:"))
    elif weights is not None:
        module = _local(cls, card, registry.resolve_local_weights(weights), device)
    else:
        module = _random(cls, card, device)
    if device.type != "meta":
        module = module.to(device)
    module.eval()
    return HookedModel(FAMILIES[cls.config_class.model_type](module, card), card=card)
