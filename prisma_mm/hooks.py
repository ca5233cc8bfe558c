"""Uniform hook points over native vision models.

:class:`HookedModel` wraps a native ``nn.Module`` (timm, open_clip, …) with PyTorch forward
hooks. The model is never re-implemented: with no hook editing anything, outputs are
bit-identical to the native model's. Hook names follow TransformerLens / ViT-Prisma
(``blocks.{i}.hook_resid_post`` …); every activation is ``[batch, tokens, d]``, except the
attention pattern ``[batch, heads, query, key]``.

An adapter (``prisma_mm.zoo.*``) describes where each hook lives in its family's modules
through a :class:`ModelSpec`; everything else is shared here.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prisma_mm.errors import PrismaError, nearest

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
# TransformerLens' names_filter: None (default set), a name, a list of names, or name -> bool
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None

# Per-block hook names, in the order they fire inside a block. A model offers those its
# native modules expose (see HookedModel.hook_names and docs/hooks.md).
BLOCK_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of an activation map to space and time.

    Tokens are ``n_prefix`` prefix tokens (CLS, registers) followed by the patch grid
    ``(frames, height, width)`` flattened in ``order``, slowest axis first: ``"thw"``
    (frame-major, row-major within a frame: images, VideoMAE, ViViT) or ``"hwt"`` (time
    fastest: TimeSformer). ``tubelet``: input frames per grid frame.
    """

    n_prefix: int
    grid: tuple[int, int, int]
    patch_size: tuple[int, int]
    input_size: tuple[int, int]
    tubelet: int = 1
    order: str = "thw"

    def __post_init__(self) -> None:
        if sorted(self.order) != ["h", "t", "w"]:
            raise PrismaError(f"token order {self.order!r} must be a permutation of 'thw'")

    @property
    def n_patches(self) -> int:
        frames, height, width = self.grid
        return frames * height * width

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def patch_tokens(self) -> slice:
        """Slice selecting the patch tokens of a ``[batch, tokens, d]`` activation."""
        return slice(self.n_prefix, self.n_tokens)

    def token_to_patch(self, token: int) -> tuple[int, int, int] | None:
        """``(frame, row, col)`` of a token index, or None for a prefix token."""
        if not 0 <= token < self.n_tokens:
            raise PrismaError(f"token {token} is outside 0..{self.n_tokens - 1} for this layout")
        if token < self.n_prefix:
            return None
        index = token - self.n_prefix
        sizes = dict(zip("thw", self.grid))
        position = {}
        for axis in reversed(self.order):  # the fastest axis is the last one
            index, position[axis] = divmod(index, sizes[axis])
        return position["t"], position["h"], position["w"]

    def patch_map(self, values: Tensor) -> Tensor:
        """Reshape per-token values ``[..., tokens]`` into ``[..., frames, h, w]`` (prefix dropped)."""
        if values.shape[-1] == self.n_tokens:
            values = values[..., self.n_prefix :]
        if values.shape[-1] != self.n_patches:
            raise PrismaError(
                f"values have {values.shape[-1]} tokens; this layout has {self.n_tokens} "
                f"({self.n_prefix} prefix + {self.n_patches} patches)"
            )
        sizes = dict(zip("thw", self.grid))
        grid = values.reshape(*values.shape[:-1], *(sizes[axis] for axis in self.order))
        lead = list(range(grid.dim() - 3))
        return grid.permute(*lead, *(len(lead) + self.order.index(axis) for axis in "thw"))

    def grid_to_tokens(self, grid: Tensor) -> Tensor:
        """The inverse of :meth:`patch_map`: per-patch values ``[..., frames, h, w]`` as
        ``[..., n_patches]`` in token order (prefix not included)."""
        if tuple(grid.shape[-3:]) != tuple(self.grid):
            raise PrismaError(
                f"grid values have shape {tuple(grid.shape)}; this layout's grid is {self.grid}"
            )
        lead = list(range(grid.dim() - 3))
        ordered = grid.permute(*lead, *(len(lead) + "thw".index(axis) for axis in self.order))
        return ordered.flatten(-3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_prefix": self.n_prefix,
            "grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "input_size": list(self.input_size),
            "tubelet": self.tubelet,
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        return cls(
            n_prefix=int(data["n_prefix"]),
            grid=tuple(int(v) for v in data["grid"]),  # type: ignore[arg-type]
            patch_size=tuple(int(v) for v in data["patch_size"]),  # type: ignore[arg-type]
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            tubelet=int(data.get("tubelet", 1)),
            order=str(data.get("order", "thw")),
        )


@dataclass(frozen=True)
class HookPoint:
    """One named place in the model: handed to hook functions as their second argument."""

    name: str
    layer: int | None  # block index, or None for model-level hooks
    order: tuple[int, int]  # position in execution order, for stopping early


@dataclass
class BlockSpec:
    """Where a block's hook points live, as module paths relative to the block.

    ``attn_branch`` / ``mlp_branch``: modules whose output is the branch added to the
    residual stream; ``ln2``: the norm before the MLP; ``mlp_proj``: the MLP's output
    projection (its input is the MLP hidden); ``norm1``: the norm before attention (its
    input is the residual stream, read to form ``hook_resid_mid``; its output is
    ``ln1.hook_normalized``); ``attn``: the attention; ``mlp``: the MLP; ``attn_out_proj``:
    the attention's output projection, whose input is ``attn.hook_z`` (None: timm's
    ``attn.norm``); ``resid_mid_at_ln2``: ``hook_resid_mid`` is read as ln2's input, for
    blocks whose skip path is pooled or split (there resid_pre + attn_out is not the stream).
    """

    attn_branch: str
    mlp_branch: str
    ln2: str
    mlp_proj: str
    norm1: str
    attn: str
    # "timm" (fused_attn=False), "mha" (nn.MultiheadAttention), "hf" (transformers' eager
    # attention, whose module returns (output, pattern)) or "none"
    pattern_style: str
    mlp: str = "mlp"
    attn_out_proj: str | None = None
    resid_mid_at_ln2: bool = False


@dataclass
class ModelSpec:
    """What an adapter tells :class:`HookedModel` about one native model (or one tower)."""

    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    blocks: Sequence[nn.Module]
    block_spec: BlockSpec
    embed: nn.Module  # its output (its input where embed_is_input) is hook_embed
    final_norm: nn.Module | None  # its output is ln_final.hook_normalized (all tokens)
    output_module: nn.Module | None  # its output is hook_output; None: the forward's return
    layout: TokenLayout
    transform: Callable[[Any], Tensor] | None  # PIL RGB image -> normalized [3, H, W]
    d_model: int
    extras: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # hook-name prefix of this tower ("text." for a text tower)
    embed_is_input: bool = False
    prepare: Callable[[Any], Tensor] | None = None  # raw input -> model input (text towers)
    text: ModelSpec | None = None  # the text tower of a CLIP / SigLIP model
    # video: input [batch, 3, frames, H, W]; check(x) raises a family's own misuse guard
    frames: int | None = None
    check: Callable[[Tensor], None] | None = None
    frames_in_batch: bool = False  # blocks see [batch*frames, 1 + patches, d] (X-CLIP)
    # per block (layout of its input, layout after it): grids that shrink between stages
    block_layouts: Sequence[tuple[TokenLayout, TokenLayout]] | None = None
    # per-block hooks the adapter cannot offer / can only read, with the reason in words
    missing: dict[str, str] = field(default_factory=dict)
    read_only: dict[str, str] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised inside a hook to end the forward once every requested hook has fired."""


Restore = Callable[[Tensor], Tensor] | None


def _as_tokens(value: Tensor, fold: int | None = None) -> tuple[Tensor, Restore]:
    """An activation as ``[batch, tokens, d]``, with the function that turns a replacement back
    into the native shape (None: it already was that). A pooled ``[batch, d]`` becomes
    ``[batch, 1, d]``; a channel-last grid ``[batch, frames, h, w, d]`` (Swin3D)
    ``[batch, frames*h*w, d]``; with ``fold=T``, frames run as batch items
    ``[batch*T, 1 + patches, d]`` (X-CLIP) become ``[batch, T + T*patches, d]``: the T frames'
    first tokens, then every frame's patches."""
    if value.dim() == 2:
        return value.unsqueeze(1), lambda new: new.squeeze(1)
    if value.dim() == 5:
        shape = value.shape
        return value.flatten(1, 3), lambda new: new.reshape(shape)
    if fold is not None and value.dim() == 3:
        per_frame = value.unflatten(0, (-1, fold))  # [batch, T, 1 + patches, d]
        tokens = torch.cat((per_frame[:, :, 0], per_frame[:, :, 1:].flatten(1, 2)), dim=1)

        def unfold(new: Tensor) -> Tensor:
            first = new[:, :fold].unsqueeze(2)
            patches = new[:, fold:].unflatten(1, (fold, -1))
            return torch.cat((first, patches), dim=2).flatten(0, 1)

        return tokens, unfold
    return value, None


def _restore(new: Tensor, restore: Restore) -> Tensor:
    return new if restore is None else restore(new)


class _Dispatch:
    """One torch hook per (module, kind) running prisma's hook functions in forward order.

    Two hook points on one module (``hook_attn_out`` and ``hook_resid_mid`` both sit on the
    attention branch's output) must fire in forward order whatever order they were attached
    in; torch fires a module's hooks in registration order, so they go through one slot.
    """

    _seq = itertools.count()

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module, self.kind = module, kind
        self.entries: list[tuple[tuple[int, int], int, Callable]] = []
        self.handle: Any = None

    def add(self, order: tuple[int, int], fn: Callable) -> Callable[[], None]:
        entry = (order, next(self._seq), fn)
        bisect.insort(self.entries, entry, key=lambda e: e[:2])
        if self.handle is None:
            if self.kind == "forward":
                self.handle = self.module.register_forward_hook(self._forward)
            else:
                self.handle = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)

        def remove() -> None:
            self.entries.remove(entry)
            if not self.entries:
                self.handle.remove()
                self.handle = None
                _SLOTS[self.module].pop(self.kind, None)

        return remove

    def _forward(self, module, args, output):
        changed = False
        for _, _, fn in list(self.entries):
            new = fn(module, args, output)
            if new is not None:
                output, changed = new, True
        return output if changed else None

    def _pre(self, module, args, kwargs):
        changed = False
        for _, _, fn in list(self.entries):
            new = fn(module, args, kwargs)
            if new is not None:
                (args, kwargs), changed = new, True
        return (args, kwargs) if changed else None


# The slots of every hooked native module; shared by all HookedModels over that module.
_SLOTS: weakref.WeakKeyDictionary[nn.Module, dict[str, _Dispatch]] = weakref.WeakKeyDictionary()


def _slot(module: nn.Module, kind: str) -> _Dispatch:
    slots = _SLOTS.setdefault(module, {})
    if kind not in slots:
        slots[kind] = _Dispatch(module, kind)
    return slots[kind]


def _mlp_kind(mlp: nn.Module) -> str | None:
    """How the MLP computes its pre-activation: ``fc1`` (timm Mlp), ``swiglu`` (fc1_g /
    fc1_x), ``glu`` (one fc1 output chunked into gate and value), ``c_fc`` (open_clip)."""
    names = {name for name, _ in mlp.named_children()}
    if {"fc1_g", "fc1_x"} <= names:
        return "swiglu"
    if "fc1" in names and hasattr(mlp, "chunk_dim"):
        return "glu" if mlp.chunk_dim in (-1, 2) else None
    if "fc1" in names:
        return "fc1"
    if "c_fc" in names:
        return "c_fc"
    if "dense" in names and hasattr(mlp, "intermediate_act_fn"):
        return "dense"  # transformers' ViT-style Intermediate: dense, then the activation
    if isinstance(mlp, nn.Sequential) and len(mlp) and isinstance(mlp[0], nn.Linear):
        return "sequential"  # torchvision.ops.MLP: Linear, activation, dropout, Linear, ...
    return None


def _n_heads(attn: nn.Module) -> int:
    return int(getattr(attn, "num_heads", None) or attn.num_attention_heads)


def _qkv_linears(attn: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """The separate q / k / v Linears of an attention without q / k norms (transformers')."""
    for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
        found = [getattr(attn, name, None) for name in names]
        if all(isinstance(module, nn.Linear) for module in found):
            return found[0], found[1], found[2]
    return None


def _qkv_kind(attn: nn.Module) -> str | None:
    """Where q / k / v come from: ``timm`` (a qkv Linear, then q_norm / k_norm), ``fused_bias``
    (EVA's qkv weight with a concatenated bias through F.linear: v is read-only), ``separate``
    (q_proj / k_proj / v_proj, then q_norm / k_norm), ``mha`` (nn.MultiheadAttention)."""
    if isinstance(attn, nn.MultiheadAttention):
        ok = attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_weight is not None
        return "mha" if ok else None
    if not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm") and hasattr(attn, "num_heads")):
        return None
    if getattr(attn, "qkv", None) is not None:
        if getattr(attn, "q_bias", None) is not None and not getattr(
            attn, "qkv_bias_separate", False
        ):
            return "fused_bias"
        return "timm"
    if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        return "separate"
    return None


def _qkv_style(attn: nn.Module) -> str | None:
    """:func:`_qkv_kind`, or ``linears`` (q / k / v Linears, no norms: transformers')."""
    kind = _qkv_kind(attn)
    if kind is None and _qkv_linears(attn) is not None and hasattr(attn, "num_attention_heads"):
        return "linears"
    return kind


class HookedModel(nn.Module):
    """A native vision model with uniform, TransformerLens-style hook points.

    ``model.module`` is the untouched native module; calling ``model(x)`` runs its forward.
    CLIP / SigLIP models also have ``model.text``: the text tower with the same hook names
    under ``text.``, run on prompts (see docs/hooks.md).
    """

    def __init__(self, spec: ModelSpec, card: Any = None) -> None:
        super().__init__()
        self.module = spec.module
        self.spec = spec
        self.card = card
        self.layout = spec.layout  # of hook_embed and the first block (see layout_for)
        self._fold = spec.frames if spec.frames_in_batch else None
        self.d_model = spec.d_model
        self.n_layers = len(spec.blocks)
        self.prefix = spec.prefix
        self._missing, self._read_only = self._block_offer()
        self.hook_names: list[str] = self._all_hook_names()
        self._points = {name: self._point(name) for name in self.hook_names}
        self._kept_hooks = contextlib.ExitStack()  # run_with_hooks(reset_hooks_end=False)
        self._output_fns: list[tuple[int, HookPoint, HookFn]] = []  # output_module None
        # not a registered child: the text tower shares self.module's parameters
        text = HookedModel(spec.text, card) if spec.text is not None else None
        object.__setattr__(self, "_text", text)

    @property
    def text(self) -> HookedModel:
        """The text tower (CLIP / SigLIP cards): hook names ``text.blocks.{i}...``, input prompts."""
        if self._text is None:
            name = getattr(self.card, "name", type(self.module).__name__)
            raise PrismaError(
                f"model {name!r} has no text tower: text hooks need a CLIP or SigLIP card"
            )
        return self._text

    # ----- names -----------------------------------------------------------------------
    def _block_offer(self) -> tuple[dict[str, str], dict[str, str]]:
        """Per-block hooks this model cannot offer, and those it can read but not replace,
        each with the reason in words."""
        missing: dict[str, str] = {}
        read_only: dict[str, str] = {}
        if not self.spec.blocks:
            return missing, read_only
        bs = self.spec.block_spec
        block = self.spec.blocks[0]
        attn = block.get_submodule(bs.attn)
        qkv = _qkv_style(attn)
        if qkv is None:
            for suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
                missing[suffix] = f"{type(attn).__name__} does not expose q / k / v"
        elif qkv == "mha":
            why = (
                "nn.MultiheadAttention computes q / k / v inside one call, so they are "
                "recomputed from ln1's output for reading (edit hook_attn_out or ln1 instead)"
            )
            for suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
                read_only[suffix] = why
        elif qkv == "fused_bias":
            read_only["attn.hook_v"] = (
                f"{type(attn).__name__} computes v with a functional linear, so it is recomputed "
                "for reading (edit attn.hook_z or hook_attn_out instead)"
            )
        if isinstance(attn, nn.MultiheadAttention):
            missing["attn.hook_z"] = (
                "nn.MultiheadAttention applies its output projection inside one call "
                "(read hook_attn_out instead)"
            )
            read_only["attn.hook_pattern"] = (
                "nn.MultiheadAttention does not expose its pattern for editing "
                "(edit hook_attn_out or the resid hooks instead)"
            )
        elif bs.attn_out_proj is None and not (hasattr(attn, "norm") and hasattr(attn, "proj")):
            missing["attn.hook_z"] = f"{type(attn).__name__} has no output projection to hook"
        if bs.pattern_style == "none":
            missing["attn.hook_pattern"] = (
                f"{type(attn).__name__} computes its pattern inside one fused call"
            )
        if bs.pattern_style == "hf":
            read_only["attn.hook_pattern"] = (
                "transformers returns the pattern of its eager attention (switched on while "
                "hooked) without using it again (edit the resid hooks instead)"
            )
        kind = _mlp_kind(block.get_submodule(bs.mlp))
        if kind is None:
            missing["mlp.hook_pre"] = "this MLP has no first linear layer to hook"
        if kind not in ("swiglu", "glu"):
            missing["mlp.hook_pre_linear"] = "the MLP is not gated (hook_pre_linear is GLU-only)"
        missing.update(self.spec.missing)
        read_only.update({k: v for k, v in self.spec.read_only.items() if k not in missing})
        return missing, read_only

    def _all_hook_names(self) -> list[str]:
        p = self.prefix
        offered = [h for h in BLOCK_HOOKS if h not in self._missing]
        names = [f"{p}hook_embed"]
        for i in range(len(self.spec.blocks)):
            names += [f"{p}blocks.{i}.{suffix}" for suffix in offered]
        if self.spec.final_norm is not None:
            names.append(f"{p}ln_final.hook_normalized")
        return [*names, f"{p}hook_output"]

    def _point(self, name: str) -> HookPoint:
        local = name.removeprefix(self.prefix)
        if local == "hook_embed":
            return HookPoint(name, None, (-1, 0))
        if local == "ln_final.hook_normalized":
            return HookPoint(name, None, (self.n_layers, 0))
        if local == "hook_output":
            return HookPoint(name, None, (self.n_layers, 1))
        match = _BLOCK_RE.match(local)
        assert match is not None
        layer = int(match.group(1))
        return HookPoint(name, layer, (layer, BLOCK_HOOKS.index(match.group(2))))

    def hook_point(self, name: str) -> HookPoint:
        """The :class:`HookPoint` called ``name``; unknown names get the nearest valid ones."""
        point = self._points.get(name)
        if point is None:
            if self._text is not None and name.startswith(self._text.prefix):
                return self._text.hook_point(name)
            raise self._unknown_hook(name)
        return point

    def layout_for(self, hook: str) -> TokenLayout:
        """The :class:`TokenLayout` of the activation at ``hook``. Models whose token grid
        shrinks between stages (MViT, Swin3D) have one per block: a block's ``hook_resid_pre``
        and ``ln1.hook_normalized`` see its input grid, its later hooks the grid after it;
        ``ln_final`` and ``hook_output`` the last block's. Elsewhere it is ``model.layout``."""
        point = self.hook_point(hook)
        layouts = self.spec.block_layouts
        if layouts is None or point.layer is None and point.order[0] < 0:
            return self.layout
        if point.layer is None:
            return layouts[-1][1]
        before = point.order[1] <= BLOCK_HOOKS.index("ln1.hook_normalized")
        return layouts[point.layer][0 if before else 1]

    def _unknown_hook(self, name: str) -> PrismaError:
        match = _BLOCK_RE.match(name.removeprefix(self.prefix))
        if match and match.group(2) in self._missing and int(match.group(1)) < self.n_layers:
            return PrismaError(
                f"hook {name!r} is not offered on this model: {self._missing[match.group(2)]}"
            )
        hint = ""
        if match and int(match.group(1)) >= self.n_layers:
            hint = f": the model has blocks 0-{self.n_layers - 1}"
        close = ", ".join(repr(c) for c in nearest(name, self.hook_names))
        return PrismaError(f"unknown hook {name!r}{hint} (did you mean {close}?)")

    # ----- input -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def preprocess(self, images: Any) -> Tensor:
        """Images (PIL of any mode, uint8/uint16 arrays HW/HWC, or tensors CHW/BCHW) to the
        model's normalized input batch ``[batch, 3, H, W]`` (float32), via the card's transform;
        on a text tower, prompts (a string or a list) to tokens ``[batch, n_ctx]``; on a video
        model, clips (``[frames, H, W, 3]`` uint8 arrays / tensors, a list of them, or one
        ``[batch, frames, H, W, 3]``) to ``[batch, 3, frames, H, W]``."""
        if self.spec.prepare is not None:
            return self.spec.prepare(images)
        if self.spec.frames is not None:
            clips = list(images) if isinstance(images, list | tuple) else [images]
            if len(clips) == 1 and getattr(clips[0], "ndim", 0) == 5:
                clips = list(clips[0])
            if not clips:
                raise PrismaError("preprocess got no clips: pass a list of at least one clip")
            return torch.stack([self.spec.transform(clip) for clip in clips])
        from prisma_mm.data.images import to_pil_rgb

        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise PrismaError("preprocess got no images: pass a list of at least one image")
        return torch.stack([self.spec.transform(to_pil_rgb(image)) for image in images])

    def _check_input(self, x: Any) -> Tensor:
        if self.spec.prepare is not None:
            return self.spec.prepare(x)
        height, width = self.layout.input_size
        frames = self.spec.frames
        size = (height, width) if frames is None else (frames, height, width)
        expected = f"a float tensor [batch, 3, {', '.join(map(str, size))}]"
        what = "images" if frames is None else "clips"
        if not isinstance(x, Tensor):
            raise PrismaError(
                f"model input is a {type(x).__name__}; expected {expected} "
                f"(use model.preprocess({what}) to convert {what})"
            )
        if self.spec.check is not None and x.dim() == 2 + len(size) and x.shape[1] == 3:
            self.spec.check(x)  # the family's own guard names its silent failure
        if x.dim() != 2 + len(size) or x.shape[1] != 3 or tuple(x.shape[2:]) != size:
            raise PrismaError(
                f"model input has shape {tuple(x.shape)}; expected {expected} "
                f"(use model.preprocess({what}) to resize and normalize {what})"
            )
        if not x.is_floating_point():
            raise PrismaError(
                f"model input has dtype {x.dtype}; expected {expected} "
                f"(use model.preprocess({what}) to normalize uint8 {what})"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _run(self, x: Tensor) -> Tensor:
        """The native forward on a checked input, then any hook_output of a module-less output."""
        output = self.spec.forward(x)
        for _, point, fn in list(self._output_fns):
            value, restore = _as_tokens(output)
            new = self._checked(point, value, fn(value, point))
            if new is not None:
                output = _restore(new, restore)
        return output

    def forward(self, x: Any) -> Tensor:
        """The native model's forward (logits or embeddings), with any active hooks.
        A text tower takes prompts or tokens ``[batch, n_ctx]`` and returns the (unnormalized)
        text embeddings ``[batch, d_embed]``."""
        return self._run(self._check_input(x))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[len(texts), d_embed]`` (CLIP / SigLIP cards only),
        through the text tower with any active ``text.`` hooks."""
        tower = self if self.prefix == "text." else self.text
        with torch.no_grad():
            return nn.functional.normalize(tower(list(texts)).float(), dim=-1)

    # ----- hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, HookFn | Sequence[HookFn]]) -> Iterator[HookedModel]:
        """Attach ``{name: fn}`` (or ``{name: [fn, ...]}``) for the duration of the block;
        removed on exit, also on error. Hooks fire in forward order, whatever the order of
        ``fns``; functions on one hook point fire in the order given. ``text.`` names go to
        the text tower.

        ``fn(activation, hook)`` gets ``[batch, tokens, d]`` (pattern: ``[batch, heads, q, k]``;
        q/k/v/z: ``[batch, tokens, heads, d_head]``) and returns None to leave it unchanged or
        a tensor of the same shape to replace it.
        """
        points = [self.hook_point(name) for name in fns]
        with contextlib.ExitStack() as stack:
            for point in points:
                chosen = fns[point.name]
                owner = self if point.name in self._points else self.text
                for fn in chosen if isinstance(chosen, list | tuple) else [chosen]:
                    owner._attach(stack, point, fn)
            yield self

    def _register(self, stack, module: nn.Module, kind: str, point: HookPoint, fn) -> None:
        stack.callback(_slot(module, kind).add(point.order, fn))

    def _attach(self, stack: contextlib.ExitStack, point: HookPoint, fn: HookFn) -> None:
        spec = self.spec
        name = point.name.removeprefix(self.prefix)
        if name == "hook_embed":
            if spec.embed_is_input:
                return self._on_input(stack, spec.embed, point, fn)
            return self._on_output(stack, spec.embed, point, fn)
        if name == "ln_final.hook_normalized":
            return self._on_output(stack, spec.final_norm, point, fn)
        if name == "hook_output":
            if spec.output_module is None:
                entry = (next(_Dispatch._seq), point, fn)
                self._output_fns.append(entry)
                stack.callback(self._output_fns.remove, entry)
                return None
            return self._on_output(stack, spec.output_module, point, fn)
        block = spec.blocks[point.layer]  # type: ignore[index]
        bs = spec.block_spec
        suffix = name.split(".", 2)[2]
        if suffix in self._read_only:
            fn = self._reading_only(point, fn, self._read_only[suffix])
        if suffix == "hook_resid_pre":
            return self._on_input(stack, block, point, fn)
        if suffix == "ln1.hook_normalized":
            return self._on_output(stack, block.get_submodule(bs.norm1), point, fn)
        if suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
            return self._on_qkv(stack, block.get_submodule(bs.attn), point, fn, suffix[-1])
        if suffix == "attn.hook_z":
            return self._on_z(stack, block.get_submodule(bs.attn), point, fn, block)
        if suffix == "hook_attn_out":
            return self._on_output(stack, block.get_submodule(bs.attn_branch), point, fn)
        if suffix == "hook_resid_mid" and bs.resid_mid_at_ln2:
            return self._on_input(stack, block.get_submodule(bs.ln2), point, fn)
        if suffix == "hook_resid_mid":
            return self._on_resid_mid(stack, block, point, fn)
        if suffix == "ln2.hook_normalized":
            return self._on_output(stack, block.get_submodule(bs.ln2), point, fn)
        if suffix in ("mlp.hook_pre", "mlp.hook_pre_linear"):
            return self._on_mlp_pre(stack, block.get_submodule(bs.mlp), point, fn, suffix)
        if suffix == "mlp.hook_post":
            return self._on_input(stack, block.get_submodule(bs.mlp_proj), point, fn)
        if suffix == "hook_mlp_out":
            return self._on_output(stack, block.get_submodule(bs.mlp_branch), point, fn)
        if suffix == "hook_resid_post":
            return self._on_output(stack, block, point, fn)
        if suffix == "attn.hook_pattern":
            return self._on_pattern(stack, block.get_submodule(bs.attn), point, fn)
        raise AssertionError(name)

    @staticmethod
    def _reading_only(point: HookPoint, fn: HookFn, why: str) -> HookFn:
        def read(value: Tensor, hook: HookPoint) -> None:
            if fn(value, hook) is not None:
                raise PrismaError(
                    f"{point.name!r} can be read but not replaced on this model: {why}"
                )

        return read

    @staticmethod
    def _checked(point: HookPoint, original: Tensor, new: Tensor | None) -> Tensor | None:
        if new is None:
            return None
        if not isinstance(new, Tensor) or new.shape != original.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise PrismaError(
                f"hook function for {point.name!r} returned {got}; it must return None or a "
                f"tensor of the activation's shape {tuple(original.shape)}"
            )
        return new.to(original.dtype)

    def _on_output(self, stack, module: nn.Module, point: HookPoint, fn: HookFn) -> None:
        def hook(_module, _inputs, output):
            primary = output[0] if isinstance(output, tuple) else output
            value, restore = _as_tokens(primary, self._fold)
            new = self._checked(point, value, fn(value, point))
            if new is None:
                return None
            new = _restore(new, restore)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        self._register(stack, module, "forward", point, hook)

    def _on_input(self, stack, module: nn.Module, point: HookPoint, fn: HookFn) -> None:
        def hook(_module, args, kwargs):
            value, restore = _as_tokens(args[0] if args else kwargs["q_x"], self._fold)
            new = self._checked(point, value, fn(value, point))
            if new is None:
                return None
            new = _restore(new, restore)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "q_x": new}

        self._register(stack, module, "pre", point, hook)

    def _on_slice(
        self,
        stack,
        module: nn.Module,
        point: HookPoint,
        fn: HookFn,
        view: Callable[[Tensor], Tensor],
    ) -> None:
        """A hook on part of ``module``'s output: ``view(output)`` is a view of the part;
        a replacement is written into a copy of the output."""

        def hook(_module, _inputs, output):
            part = view(output)
            new = self._checked(point, part, fn(part, point))
            if new is None:
                return None
            edited = output.clone()
            view(edited).copy_(new)
            return edited

        self._register(stack, module, "forward", point, hook)

    def _on_qkv(self, stack, attn: nn.Module, point: HookPoint, fn: HookFn, which: str) -> None:
        index = "qkv".index(which)
        kind = _qkv_style(attn)
        if kind == "linears":
            heads = _n_heads(attn)
            linear = _qkv_linears(attn)[index]  # type: ignore[index]
            return self._on_slice(
                stack, linear, point, fn, lambda out: out.unflatten(-1, (heads, -1))
            )
        if kind == "mha":
            heads = attn.num_heads

            def read_mha(_module, args, kwargs):
                query = args[0] if args else kwargs["query"]
                proj = nn.functional.linear(query, attn.in_proj_weight, attn.in_proj_bias)
                part = proj.chunk(3, dim=-1)[index]
                fn(part.unflatten(-1, (heads, -1)), point)

            return self._register(stack, attn, "pre", point, read_mha)
        heads = attn.num_heads
        if which in "qk":
            # q_norm / k_norm see [batch, heads, tokens, d_head]: their output is q / k
            norm = attn.q_norm if which == "q" else attn.k_norm

            def per_head(_module, _inputs, output):
                value = output.transpose(1, 2)
                new = self._checked(point, value, fn(value, point))
                return None if new is None else new.transpose(1, 2)

            return self._register(stack, norm, "forward", point, per_head)
        if kind == "separate":
            return self._on_slice(
                stack, attn.v_proj, point, fn, lambda out: out.unflatten(-1, (heads, -1))
            )
        if kind == "fused_bias":

            def read_fused(_module, args, kwargs):
                x = args[0] if args else kwargs["x"]
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                qkv = nn.functional.linear(x, attn.qkv.weight, bias)
                fn(qkv.unflatten(-1, (3, heads, -1))[:, :, 2], point)

            return self._register(stack, attn, "pre", point, read_fused)
        return self._on_slice(
            stack, attn.qkv, point, fn, lambda out: out.unflatten(-1, (3, heads, -1))[:, :, 2]
        )

    def _on_z(self, stack, attn: nn.Module, point: HookPoint, fn: HookFn, block) -> None:
        # z (heads concatenated) is the input of the output projection (timm: of attn.norm)
        heads = _n_heads(attn)
        out_proj = self.spec.block_spec.attn_out_proj
        target = attn.norm if out_proj is None else block.get_submodule(out_proj)

        def hook(_module, args, kwargs):
            value = args[0].unflatten(-1, (heads, -1))
            new = self._checked(point, value, fn(value, point))
            return None if new is None else ((new.flatten(-2), *args[1:]), kwargs)

        self._register(stack, target, "pre", point, hook)

    def _on_mlp_pre(self, stack, mlp: nn.Module, point: HookPoint, fn: HookFn, suffix) -> None:
        kind = _mlp_kind(mlp)
        gate = suffix == "mlp.hook_pre"  # TransformerLens: hook_pre is the gate's pre-activation
        if kind == "fc1":
            return self._on_output(stack, mlp.fc1, point, fn)
        if kind == "c_fc":
            return self._on_output(stack, mlp.c_fc, point, fn)
        if kind == "dense":
            return self._on_output(stack, mlp.dense, point, fn)
        if kind == "sequential":
            return self._on_output(stack, mlp[0], point, fn)
        if kind == "swiglu":
            return self._on_output(stack, mlp.fc1_g if gate else mlp.fc1_x, point, fn)
        # GluMlp: fc1's output chunks into (x1, x2); the activation takes x2 if gate_last
        first = gate != bool(mlp.gate_last)

        def half(out: Tensor) -> Tensor:
            width = out.shape[-1] // 2
            return out[..., :width] if first else out[..., width:]

        return self._on_slice(stack, mlp.fc1, point, fn, half)

    def _on_resid_mid(self, stack, block: nn.Module, point: HookPoint, fn: HookFn) -> None:
        # resid_mid = resid_pre + attention branch; the native block adds them itself, so we
        # read the stream at norm1's input and, to edit it, rewrite the branch as new - pre.
        bs = self.spec.block_spec
        stash: dict[str, Tensor] = {}

        def keep_pre(_module, args, kwargs):
            stash["pre"] = args[0]

        def hook(_module, _inputs, output):
            branch = output[0] if isinstance(output, tuple) else output
            pre = stash.pop("pre")
            mid, restore = _as_tokens(pre + branch, self._fold)
            new = self._checked(point, mid, fn(mid, point))
            if new is None:
                return None
            new = _restore(new, restore) - pre
            return (new, *output[1:]) if isinstance(output, tuple) else new

        self._register(stack, block.get_submodule(bs.norm1), "pre", point, keep_pre)
        self._register(stack, block.get_submodule(bs.attn_branch), "forward", point, hook)

    def _on_pattern(self, stack, attn: nn.Module, point: HookPoint, fn: HookFn) -> None:
        style = self.spec.block_spec.pattern_style
        if style == "timm":
            # timm's unfused path computes softmax(qk^T) explicitly and passes it through
            # attn_drop, whose output is the pattern [batch, heads, q, k].
            fused = attn.fused_attn
            attn.fused_attn = False
            stack.callback(setattr, attn, "fused_attn", fused)

            def hook(_module, _inputs, pattern):
                return self._checked(point, pattern, fn(pattern, point))

            return self._register(stack, attn.attn_drop, "forward", point, hook)
        if style == "mha":

            def want_weights(_module, args, kwargs):
                return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

            def read(_module, _inputs, output):
                out, pattern = output
                fn(pattern, point)  # read-only: wrapped by _reading_only
                return out, None

            self._register(stack, attn, "pre", point, want_weights)
            return self._register(stack, attn, "forward", point, read)
        if style == "hf":
            # the fused kernels return no pattern: the model's eager path, only while hooked
            config = attn.config
            implementation = config._attn_implementation
            config._attn_implementation = "eager"
            stack.callback(setattr, config, "_attn_implementation", implementation)

            def read_hf(_module, _inputs, output):
                fn(output[1], point)  # read-only: wrapped by _reading_only

            return self._register(stack, attn, "forward", point, read_hf)
        raise AssertionError(style)

    # ----- caching -----------------------------------------------------------------------
    def _select_names(self, names_filter: NamesFilter) -> list[str]:
        """Hook names chosen by a TransformerLens-style ``names_filter``."""
        if names_filter is None:
            return [n for n in self.hook_names if not n.endswith("hook_pattern")]
        if isinstance(names_filter, str):
            return [names_filter]
        if callable(names_filter):
            chosen = [n for n in self.hook_names if names_filter(n)]
            if not chosen:
                raise PrismaError("names_filter selected no hook: see model.hook_names")
            return chosen
        return list(names_filter)

    def run_with_cache(
        self,
        x: Any,
        names_filter: NamesFilter = None,
        *,
        stop_at_layer: int | str | None = None,
        detach: bool = True,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Run the model and return ``(output, cache)`` with ``cache[name]: [batch, tokens, d]``.

        As in TransformerLens, the whole forward runs and ``output`` is the model's output.
        ``names_filter``: a hook name, a list of names, or a callable ``name -> bool``
        (default: every hook except attention patterns, which need the unfused attention).
        Early stopping is opt-in: ``stop_at_layer=n`` runs blocks ``0..n-1`` only;
        ``stop_at_layer="auto"`` stops right after the last requested hook fires. In both
        cases ``output`` is None.
        """
        names = self._select_names(names_filter)
        if self._text is not None:
            text_names = [n for n in names if n.startswith(self._text.prefix)]
            if text_names and len(text_names) < len(names):
                raise PrismaError(
                    "image and text hooks run on different inputs: call run_with_cache once "
                    "with image hooks on images and once with text. hooks on prompts"
                )
            if text_names:
                return self._text.run_with_cache(
                    x, names, stop_at_layer=stop_at_layer, detach=detach
                )
        x = self._check_input(x)
        points = [self.hook_point(name) for name in names]
        if stop_at_layer is not None and stop_at_layer != "auto":
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int):
                raise PrismaError(
                    f"stop_at_layer={stop_at_layer!r}: use None, 'auto' or a block index"
                )
            if not 0 <= stop_at_layer <= self.n_layers:
                raise PrismaError(
                    f"stop_at_layer={stop_at_layer} is outside 0..{self.n_layers} "
                    f"(the model has {self.n_layers} blocks)"
                )
            beyond = [p.name for p in points if p.order >= (stop_at_layer, -1)]
            if beyond:
                raise PrismaError(
                    f"hooks {beyond} fire at or after block {stop_at_layer}; "
                    f"raise stop_at_layer or drop them"
                )

        cache: dict[str, Tensor] = {}
        remaining = {p.name for p in points}

        def read(value: Tensor, hook: HookPoint) -> None:
            cache[hook.name] = value.detach() if detach else value
            remaining.discard(hook.name)
            if stop_at_layer == "auto" and not remaining:
                raise _StopForward

        output: Tensor | None = None
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.hooks({p.name: read for p in points}))
            if isinstance(stop_at_layer, int) and stop_at_layer < self.n_layers:

                def stop(_module, _args):
                    raise _StopForward

                stopper = self.spec.blocks[stop_at_layer]
                stack.callback(stopper.register_forward_pre_hook(stop).remove)
            try:
                output = self._run(x)
            except _StopForward:
                output = None
        if stop_at_layer is not None:
            output = None
        missing = [n for n in names if n not in cache]
        if missing:
            raise PrismaError(f"hooks {missing} did not fire during the forward pass")
        return output, {name: cache[name] for name in names}

    def run_with_hooks(
        self,
        x: Any,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        reset_hooks_end: bool = True,
    ) -> Tensor:
        """The model's output with ``fwd_hooks`` attached, as in TransformerLens.

        Each entry is ``(name_or_filter, fn)``: a hook name or a callable ``name -> bool``
        choosing hook names. With ``reset_hooks_end=False`` the hooks stay attached until
        :meth:`reset_hooks`.
        """
        fns: dict[str, list[HookFn]] = {}
        for selector, fn in fwd_hooks:
            chosen = [selector] if isinstance(selector, str) else self._select_names(selector)
            for name in chosen:
                fns.setdefault(name, []).append(fn)
        context = self.hooks(fns)
        if not reset_hooks_end:
            self._kept_hooks.enter_context(context)
            return self(x)
        with context:
            return self(x)

    def reset_hooks(self) -> None:
        """Remove the hooks that ``run_with_hooks(..., reset_hooks_end=False)`` left attached."""
        self._kept_hooks.close()
        self._kept_hooks = contextlib.ExitStack()

    def extra_repr(self) -> str:
        card = getattr(self.card, "name", None)
        return (
            f"card={card!r}, n_layers={self.n_layers}, d_model={self.d_model}, layout={self.layout}"
        )
