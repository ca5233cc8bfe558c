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

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prisma_mm.errors import PrismaError, nearest

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
# TransformerLens' names_filter: None (default set), a name, a list of names, or name -> bool
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None

# Per-block hook names, in the order they fire inside a block.
BLOCK_HOOKS = (
    "hook_resid_pre",
    "attn.hook_pattern",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of an activation map to space and time.

    Tokens are ``n_prefix`` prefix tokens (CLS, registers) followed by the patch grid
    ``(frames, height, width)`` flattened row-major (frame-major for video).
    """

    n_prefix: int
    grid: tuple[int, int, int]
    patch_size: tuple[int, int]
    input_size: tuple[int, int]
    tubelet: int = 1

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
        _, height, width = self.grid
        return index // (height * width), (index // width) % height, index % width

    def patch_map(self, values: Tensor) -> Tensor:
        """Reshape per-token values ``[..., tokens]`` into ``[..., frames, h, w]`` (prefix dropped)."""
        if values.shape[-1] == self.n_tokens:
            values = values[..., self.n_prefix :]
        if values.shape[-1] != self.n_patches:
            raise PrismaError(
                f"values have {values.shape[-1]} tokens; this layout has {self.n_tokens} "
                f"({self.n_prefix} prefix + {self.n_patches} patches)"
            )
        return values.reshape(*values.shape[:-1], *self.grid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_prefix": self.n_prefix,
            "grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "input_size": list(self.input_size),
            "tubelet": self.tubelet,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        return cls(
            n_prefix=int(data["n_prefix"]),
            grid=tuple(int(v) for v in data["grid"]),  # type: ignore[arg-type]
            patch_size=tuple(int(v) for v in data["patch_size"]),  # type: ignore[arg-type]
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            tubelet=int(data.get("tubelet", 1)),
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
    input is the residual stream, read to form ``hook_resid_mid``); ``attn``: the attention.
    """

    attn_branch: str
    mlp_branch: str
    ln2: str
    mlp_proj: str
    norm1: str
    attn: str
    pattern_style: (
        str  # "timm" (explicit path via fused_attn=False) or "mha" (nn.MultiheadAttention)
    )


@dataclass
class ModelSpec:
    """What an adapter tells :class:`HookedModel` about one native model."""

    module: nn.Module
    forward: Callable[[Tensor], Tensor]
    blocks: Sequence[nn.Module]
    block_spec: BlockSpec
    embed: nn.Module  # its output is hook_embed: tokens with position embedding, prefix included
    final_norm: nn.Module  # its output is ln_final.hook_normalized (all tokens)
    output_module: nn.Module  # its output is hook_output
    layout: TokenLayout
    transform: Callable[[Any], Tensor]  # PIL RGB image -> normalized [3, H, W]
    d_model: int
    extras: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised inside a hook to end the forward once every requested hook has fired."""


def _as_tokens(value: Tensor) -> tuple[Tensor, bool]:
    """A pooled output ``[batch, d]`` as ``[batch, 1, d]``; returns whether it was squeezed."""
    if value.dim() == 2:
        return value.unsqueeze(1), True
    return value, False


class HookedModel(nn.Module):
    """A native vision model with uniform, TransformerLens-style hook points.

    ``model.module`` is the untouched native module; calling ``model(x)`` runs its forward.
    """

    def __init__(self, spec: ModelSpec, card: Any = None) -> None:
        super().__init__()
        self.module = spec.module
        self.spec = spec
        self.card = card
        self.layout = spec.layout
        self.d_model = spec.d_model
        self.n_layers = len(spec.blocks)
        self.hook_names: list[str] = self._all_hook_names()
        self._points = {name: self._point(name) for name in self.hook_names}
        self._kept_hooks = contextlib.ExitStack()  # run_with_hooks(reset_hooks_end=False)

    # ----- names -----------------------------------------------------------------------
    def _all_hook_names(self) -> list[str]:
        names = ["hook_embed"]
        for i in range(len(self.spec.blocks)):
            names += [f"blocks.{i}.{suffix}" for suffix in BLOCK_HOOKS]
        return [*names, "ln_final.hook_normalized", "hook_output"]

    def _point(self, name: str) -> HookPoint:
        if name == "hook_embed":
            return HookPoint(name, None, (-1, 0))
        if name == "ln_final.hook_normalized":
            return HookPoint(name, None, (self.n_layers, 0))
        if name == "hook_output":
            return HookPoint(name, None, (self.n_layers, 1))
        match = _BLOCK_RE.match(name)
        assert match is not None
        layer = int(match.group(1))
        return HookPoint(name, layer, (layer, BLOCK_HOOKS.index(match.group(2))))

    def hook_point(self, name: str) -> HookPoint:
        """The :class:`HookPoint` called ``name``; unknown names get the nearest valid ones."""
        point = self._points.get(name)
        if point is None:
            raise self._unknown_hook(name)
        return point

    def _unknown_hook(self, name: str) -> PrismaError:
        hint = ""
        match = _BLOCK_RE.match(name)
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
        model's normalized input batch ``[batch, 3, H, W]`` (float32), via the card's transform."""
        from prisma_mm.data.images import to_pil_rgb

        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise PrismaError("preprocess got no images: pass a list of at least one image")
        return torch.stack([self.spec.transform(to_pil_rgb(image)) for image in images])

    def _check_input(self, x: Any) -> Tensor:
        height, width = self.layout.input_size
        expected = f"a float tensor [batch, 3, {height}, {width}]"
        if not isinstance(x, Tensor):
            raise PrismaError(
                f"model input is a {type(x).__name__}; expected {expected} "
                "(use model.preprocess(images) to convert images)"
            )
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (height, width):
            raise PrismaError(
                f"model input has shape {tuple(x.shape)}; expected {expected} "
                "(use model.preprocess(images) to resize and normalize images)"
            )
        if not x.is_floating_point():
            raise PrismaError(
                f"model input has dtype {x.dtype}; expected {expected} "
                "(use model.preprocess(images) to normalize uint8 images)"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The native model's forward (logits or embeddings), with any active hooks."""
        return self.spec.forward(self._check_input(x))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[len(texts), d_embed]`` (CLIP / SigLIP cards only)."""
        encode = self.spec.extras.get("encode_text")
        if encode is None:
            name = getattr(self.card, "name", type(self.module).__name__)
            raise PrismaError(
                f"model {name!r} has no text tower: encode_text needs a CLIP or SigLIP card"
            )
        return encode(list(texts))

    # ----- hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, HookFn | Sequence[HookFn]]) -> Iterator[HookedModel]:
        """Attach ``{name: fn}`` (or ``{name: [fn, ...]}``) for the duration of the block;
        removed on exit, also on error.

        ``fn(activation, hook)`` gets ``[batch, tokens, d]`` (pattern: ``[batch, heads, q, k]``)
        and returns None to leave it unchanged or a tensor of the same shape to replace it.
        """
        points = [self.hook_point(name) for name in fns]
        with contextlib.ExitStack() as stack:
            for point in points:
                chosen = fns[point.name]
                for fn in chosen if isinstance(chosen, list | tuple) else [chosen]:
                    self._attach(stack, point, fn)
            yield self

    def _attach(self, stack: contextlib.ExitStack, point: HookPoint, fn: HookFn) -> None:
        spec = self.spec
        name = point.name
        if name == "hook_embed":
            return self._on_output(stack, spec.embed, point, fn)
        if name == "ln_final.hook_normalized":
            return self._on_output(stack, spec.final_norm, point, fn)
        if name == "hook_output":
            return self._on_output(stack, spec.output_module, point, fn)
        block = spec.blocks[point.layer]  # type: ignore[index]
        bs = spec.block_spec
        suffix = name.split(".", 2)[2]
        if suffix == "hook_resid_pre":
            return self._on_input(stack, block, point, fn)
        if suffix == "hook_attn_out":
            return self._on_output(stack, block.get_submodule(bs.attn_branch), point, fn)
        if suffix == "hook_resid_mid":
            return self._on_resid_mid(stack, block, point, fn)
        if suffix == "ln2.hook_normalized":
            return self._on_output(stack, block.get_submodule(bs.ln2), point, fn)
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
            value, squeezed = _as_tokens(primary)
            new = self._checked(point, value, fn(value, point))
            if new is None:
                return None
            new = new.squeeze(1) if squeezed else new
            return (new, *output[1:]) if isinstance(output, tuple) else new

        stack.callback(module.register_forward_hook(hook).remove)

    def _on_input(self, stack, module: nn.Module, point: HookPoint, fn: HookFn) -> None:
        def hook(_module, args, kwargs):
            value = args[0] if args else kwargs["q_x"]
            new = self._checked(point, value, fn(value, point))
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "q_x": new}

        stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)

    def _on_resid_mid(self, stack, block: nn.Module, point: HookPoint, fn: HookFn) -> None:
        # resid_mid = resid_pre + attention branch; the native block adds them itself, so we
        # read the stream at norm1's input and, to edit it, rewrite the branch as new - pre.
        bs = self.spec.block_spec
        stash: dict[str, Tensor] = {}

        def keep_pre(_module, args):
            stash["pre"] = args[0]

        def hook(_module, _inputs, branch):
            pre = stash.pop("pre")
            mid = pre + branch
            new = self._checked(point, mid, fn(mid, point))
            return None if new is None else new - pre

        norm1 = block.get_submodule(bs.norm1)
        stack.callback(norm1.register_forward_pre_hook(keep_pre).remove)
        branch_module = block.get_submodule(bs.attn_branch)
        stack.callback(branch_module.register_forward_hook(hook).remove)

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

            stack.callback(attn.attn_drop.register_forward_hook(hook).remove)
            return
        if style == "mha":

            def want_weights(_module, args, kwargs):
                return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

            def hook(_module, _inputs, output):
                out, pattern = output
                if fn(pattern, point) is not None:
                    raise PrismaError(
                        f"{point.name!r} can be read but not replaced on this model: "
                        "nn.MultiheadAttention does not expose its pattern for editing "
                        "(edit hook_attn_out or the resid hooks instead)"
                    )
                return out, None

            stack.callback(attn.register_forward_pre_hook(want_weights, with_kwargs=True).remove)
            stack.callback(attn.register_forward_hook(hook).remove)
            return
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
        x = self._check_input(x)
        names = self._select_names(names_filter)
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
                output = self.spec.forward(x)
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
