"""Hooked diffusion pipelines: uniform hook points on a diffusers text-to-image pipeline.

:class:`HookedPipeline` wraps a native diffusers pipeline (SDXL, SDXL-Turbo, SD 1.5 / 2.1)
with PyTorch hooks that exist only inside :meth:`HookedPipeline.hooks`; the pipeline is never
re-implemented, so with no hook editing anything its images are bit-identical to the plain
pipeline's.

Hook points, named after the block as in Surkov et al. (sdxl-unbox):

- ``unet.down.{i}.{j}`` = ``unet.down_blocks[i].attentions[j]``, ``unet.mid.{j}`` =
  ``unet.mid_block.attentions[j]``, ``unet.up.{i}.{j}`` = ``unet.up_blocks[i].attentions[j]``
  (each a transformer block, found by class at run time), each with ``.hook_in`` (its input),
  ``.hook_out`` (its output) and ``.hook_update`` (out - in, the block's residual update),
  as tokens ``[batch, h*w, channels]`` (the feature map row-major, a ``(1, h, w)`` layout);
- ``text.blocks.{i}.hook_resid_post`` (and ``text2.`` for SDXL's second encoder): the text
  encoders' residual streams ``[batch, 77, d]``.

A hook function ``fn(act, ctx)`` gets a :class:`DiffusionContext`: the denoising step (the
index of the U-Net call's own ``timestep`` argument in the scheduler's timesteps, not a count
of calls), the timestep, and which half of a classifier-free-guidance batch the rows are.
Hooks can be limited to steps and to one half.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prisma_mm.errors import PrismaError, nearest
from prisma_mm.hooks import TokenLayout

HALVES = ("uncond", "cond")
BLOCK_SUFFIXES = ("hook_in", "hook_out", "hook_update")
TEXT_SUFFIX = "hook_resid_post"
_UNET_RE = re.compile(r"^unet\.((?:down|up)\.\d+\.\d+|mid\.\d+)\.(hook_in|hook_out|hook_update)$")
_TEXT_RE = re.compile(r"^(text2?)\.blocks\.(\d+)\.hook_resid_post$")
_TEXT_ENCODERS = {"text": "text_encoder", "text2": "text_encoder_2"}


@dataclass(frozen=True)
class DiffusionContext:
    """What a hook function knows about the activation it is handed.

    ``step``: index into the scheduler's timesteps (0-based) of this U-Net call, read from its
    ``timestep`` argument (None for text-encoder hooks, which run before denoising);
    ``timestep``: that timestep; ``n_steps``: the run's number of steps. ``cfg``: the U-Net
    batch is a classifier-free-guidance batch ``[uncond; cond]``; ``halves``: the rows of
    each half in the whole batch (without CFG every row is ``cond``); ``half``: the half the
    handed rows are, when the hook was limited to one (``half="cond"`` / ``"uncond"``), else
    None (the whole batch); ``rows``: the rows of the whole batch handed to the hook;
    ``prompt_index``: for each handed row, the index of its prompt in the call; ``grid``:
    ``(h, w)`` of the block's feature map (None for text hooks).
    """

    name: str
    step: int | None
    timestep: float | None
    n_steps: int | None
    cfg: bool
    halves: Mapping[str, slice]
    half: str | None
    rows: slice
    prompt_index: list[int]
    grid: tuple[int, int] | None


@dataclass
class _Call:
    """The U-Net call in progress (or the text-encoder call): what its hooks' contexts share."""

    step: int | None
    timestep: float | None
    n_steps: int | None
    cfg: bool
    batch: int


@dataclass
class _Entry:
    fn: Callable[[Tensor, DiffusionContext], Tensor | None]
    steps: frozenset[int] | None
    half: str | None


def _encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The residual blocks of a text encoder, found at run time (transformers 5 dropped
    CLIPTextModel's ``text_model`` level; CLIPTextModelWithProjection keeps it)."""
    for name, module in encoder.named_modules():
        if name.rsplit(".", 1)[-1] == "encoder" and isinstance(
            getattr(module, "layers", None), nn.ModuleList
        ):
            return module.layers
    raise PrismaError(f"text encoder {type(encoder).__name__} has no encoder.layers to hook")


def _halves(batch: int, cfg: bool) -> dict[str, slice]:
    if cfg:
        return {"uncond": slice(0, batch // 2), "cond": slice(batch // 2, batch)}
    return {"cond": slice(0, batch)}


def _to_tokens(feature_map: Tensor) -> Tensor:
    """``[batch, C, h, w]`` -> ``[batch, h*w, C]`` (a view)."""
    return feature_map.flatten(2).transpose(1, 2)


def _to_map(tokens: Tensor, like: Tensor) -> Tensor:
    """``[batch, h*w, C]`` -> ``like``'s ``[batch, C, h, w]``."""
    return tokens.transpose(1, 2).reshape(like.shape)


class HookedPipeline:
    """A diffusers text-to-image pipeline with uniform hook points (see the module docstring).

    ``pipe`` is the untouched diffusers pipeline; ``card`` its model card (generation
    defaults in ``card.generate``: steps, guidance, size, scheduler); ``size`` the default
    image size ``(height, width)``.
    """

    def __init__(self, pipe: Any, card: Any = None, size: int | Sequence[int] | None = None):
        self.pipe = pipe
        self.card = card
        self.blocks = self._find_blocks()
        self.text_layers = self._find_text_layers()
        defaults = dict(getattr(card, "generate", None) or {})
        call_defaults = _call_defaults(pipe)
        self.default_steps = int(defaults.get("steps", call_defaults["num_inference_steps"]))
        self.default_guidance = float(defaults.get("guidance", call_defaults["guidance_scale"]))
        native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.size = self.check_size(size if size is not None else defaults.get("size", native))
        self.hook_names: list[str] = [
            f"{prefix}.blocks.{i}.{TEXT_SUFFIX}"
            for prefix, layers in self.text_layers.items()
            for i in range(len(layers))
        ] + [f"unet.{block}.{suffix}" for block in self.blocks for suffix in BLOCK_SUFFIXES]
        self._call: _Call | None = None

    # ----- structure ---------------------------------------------------------------------
    def _find_blocks(self) -> dict[str, nn.Module]:
        """``{"down.2.1": module, "mid.0": …, "up.0.0": …}`` in forward order."""
        unet = self.pipe.unet
        blocks: dict[str, nn.Module] = {}
        for i, down in enumerate(unet.down_blocks):
            for j, attn in enumerate(getattr(down, "attentions", None) or []):
                blocks[f"down.{i}.{j}"] = attn
        for j, attn in enumerate(getattr(unet.mid_block, "attentions", None) or []):
            blocks[f"mid.{j}"] = attn
        for i, up in enumerate(unet.up_blocks):
            for j, attn in enumerate(getattr(up, "attentions", None) or []):
                blocks[f"up.{i}.{j}"] = attn
        if not blocks:
            raise PrismaError(
                f"the U-Net {type(unet).__name__} has no transformer blocks to hook "
                "(expected down_blocks[i].attentions[j])"
            )
        return blocks

    def _find_text_layers(self) -> dict[str, Sequence[nn.Module]]:
        found = {}
        for prefix, attribute in _TEXT_ENCODERS.items():
            encoder = getattr(self.pipe, attribute, None)
            if encoder is not None:
                found[prefix] = _encoder_layers(encoder)
        return found

    @property
    def n_levels(self) -> int:
        return len(self.pipe.unet.down_blocks)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def module(self) -> nn.Module:
        """The pipeline's networks as one module (its state dict fingerprints the weights)."""
        parts = {"unet": self.pipe.unet, "vae": self.pipe.vae}
        for attribute in _TEXT_ENCODERS.values():
            encoder = getattr(self.pipe, attribute, None)
            if encoder is not None:
                parts[attribute] = encoder
        return nn.ModuleDict(parts)

    @property
    def layout(self) -> TokenLayout:
        """The U-Net's input: the latent grid ``(1, h, w)`` at the default size."""
        height, width = self.size
        scale = int(self.pipe.vae_scale_factor)
        return TokenLayout(0, (1, height // scale, width // scale), (scale, scale), self.size)

    @property
    def d_model(self) -> int:
        return int(self.pipe.unet.config.block_out_channels[-1])

    @property
    def n_layers(self) -> int:
        """The number of hooked U-Net transformer blocks."""
        return len(self.blocks)

    @property
    def text(self) -> Any:
        raise PrismaError(
            "a diffusion pipeline's text encoders are hooked through the pipeline: use "
            "'text.blocks.{i}.hook_resid_post' names with HookedPipeline.hooks"
        )

    def check_size(self, size: Any) -> tuple[int, int]:
        """``size`` (pixels: an int or ``(height, width)``) as ``(height, width)``, a multiple
        of the VAE's downsampling factor; one line otherwise."""
        values = [size, size] if isinstance(size, int) else list(size or [])
        scale = int(self.pipe.vae_scale_factor)
        # diffusers' pipelines also refuse sizes that are not multiples of 8, whatever the VAE
        step = math.lcm(8, scale)
        if len(values) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step for v in values
        ):
            raise PrismaError(
                f"image size {size!r}: give a positive number of pixels that is a multiple of "
                f"{step} (the VAE's downsampling and the pipeline's own check), e.g. "
                f"{self.pipe.unet.config.sample_size * scale}"
            )
        return int(values[0]), int(values[1])

    def hook_point(self, name: str) -> str:
        """``name`` if the pipeline offers it; else one line with the nearest names."""
        if name in self.hook_names:
            return name
        match = _UNET_RE.match(name)
        hint = ""
        if name.startswith("unet.") and match is None:
            hint = f": U-Net blocks are {', '.join(self.blocks)}, each with {BLOCK_SUFFIXES}"
        elif match is not None:
            hint = f": the U-Net's transformer blocks are {', '.join(self.blocks)}"
        close = ", ".join(repr(c) for c in nearest(name, self.hook_names))
        raise PrismaError(f"unknown hook {name!r}{hint} (did you mean {close}?)")

    def _grids(self, size: Any = None) -> list[tuple[int, int]]:
        """The feature-map grid of each U-Net level at ``size`` (stride-2 convs: ceil)."""
        height, width = self.size if size is None else self.check_size(size)
        scale = int(self.pipe.vae_scale_factor)
        grid = (height // scale, width // scale)
        grids = [grid]
        for _ in range(self.n_levels - 1):
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
            grids.append(grid)
        return grids

    def grid(self, name: str, size: Any = None) -> tuple[int, int] | None:
        """``(h, w)`` of a U-Net hook's feature map at ``size`` (default: the card's); None
        for a text hook."""
        self.hook_point(name)
        if name.startswith("text"):
            return None
        block = name.split(".")[1:-1]
        grids = self._grids(size)
        if block[0] == "down":
            return grids[int(block[1])]
        if block[0] == "mid":
            return grids[-1]
        return grids[self.n_levels - 1 - int(block[1])]

    def layout_of(self, name: str, size: Any = None) -> TokenLayout:
        """The :class:`TokenLayout` of hook ``name``: a U-Net block's grid ``(1, h, w)`` at
        ``size`` (no prefix tokens; ``patch_size`` = pixels per token), or a text hook's 77
        tokens as ``(1, 1, 77)``."""
        grid = self.grid(name, size)
        if grid is None:
            n_ctx = int(self._tokenizer_length())
            return TokenLayout(0, (1, 1, n_ctx), (1, 1), (1, n_ctx))
        height, width = self.size if size is None else self.check_size(size)
        return TokenLayout(0, (1, *grid), (height // grid[0], width // grid[1]), (height, width))

    def _tokenizer_length(self) -> int:
        return int(getattr(self.pipe.tokenizer, "model_max_length", 77))

    def d(self, name: str) -> int:
        """Channels (U-Net block) or width (text encoder) at hook ``name``."""
        self.hook_point(name)
        text = _TEXT_RE.match(name)
        if text is not None:
            encoder = getattr(self.pipe, _TEXT_ENCODERS[text.group(1)])
            return int(encoder.config.hidden_size)
        block = self.blocks[name.split(".", 1)[1].rsplit(".", 1)[0]]
        return int(block.config.in_channels)

    def describe_hooks(self, names: Sequence[str], size: Any = None
                       ) -> tuple[TokenLayout, dict[str, list[int]]]:  # fmt: skip
        """For a cache of U-Net hooks ``names``: their common layout and ``{name: [tokens,
        d]}``. One line for a text hook or for hooks on grids of different sizes."""
        shapes: dict[str, list[int]] = {}
        layouts: dict[str, TokenLayout] = {}
        for name in names:
            self.hook_point(name)
            if name.startswith("text"):
                raise PrismaError(
                    f"hook {name!r} is on a text encoder, which runs once per prompt, not per "
                    "step: a prompt cache holds U-Net hooks (unet.down.2.1.hook_update, …)"
                )
            layouts[name] = self.layout_of(name, size)
            shapes[name] = [layouts[name].n_tokens, self.d(name)]
        first = layouts[names[0]]
        other = next((n for n in names if layouts[n].grid != first.grid), None)
        if other is not None:
            raise PrismaError(
                f"hooks {names[0]!r} ({first.grid[1]}x{first.grid[2]}) and {other!r} "
                f"({layouts[other].grid[1]}x{layouts[other].grid[2]}) have different grids: "
                "one cache holds one layout, so cache them in separate caches"
            )
        return first, shapes

    # ----- hooks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(
        self,
        fns: Mapping[str, Callable | Sequence[Callable]],
        steps: int | Sequence[int] | None = None,
        half: str | None = None,
    ) -> Iterator[HookedPipeline]:
        """Attach ``{name: fn}`` (or ``{name: [fn, ...]}``) for the duration of the block;
        removed on exit, also on error.

        ``fn(act, ctx)`` gets ``act`` ``[rows, tokens, d]`` and a :class:`DiffusionContext`,
        and returns None (read) or a tensor of the same shape (edit). ``steps``: only at
        these denoising steps (indices into the scheduler's timesteps; text hooks, which run
        before denoising, ignore it). ``half``: ``"cond"`` or ``"uncond"`` hands only that
        half's rows of a CFG batch (without CFG every row is cond, and an ``"uncond"`` hook
        never fires); None or ``"both"`` hands the whole batch. An edit at ``hook_update``
        changes the block's output by ``edited - update`` (so an unchanged update leaves it
        bit-identical); an edit at ``hook_out`` replaces the output; at ``hook_in`` the input.
        Within a block, hooks run in the order in, update, out.
        """
        step_set = _check_steps(steps)
        if half == "both":
            half = None
        if half is not None and half not in HALVES:
            raise PrismaError(f"half={half!r}: use 'cond', 'uncond' or None (both halves)")
        grouped: dict[str, dict[str, list[_Entry]]] = {}
        for name, chosen in fns.items():
            self.hook_point(name)
            where, _, suffix = name.rpartition(".")
            for fn in chosen if isinstance(chosen, list | tuple) else [chosen]:
                if not callable(fn):
                    raise PrismaError(f"hook function for {name!r} is not callable")
                entry = _Entry(fn, step_set, half)
                grouped.setdefault(where, {}).setdefault(suffix, []).append(entry)
        with contextlib.ExitStack() as stack:
            if any(where.startswith("unet.") for where in grouped):
                unet = self.pipe.unet
                stack.callback(
                    unet.register_forward_pre_hook(self._unet_call, with_kwargs=True).remove
                )
            for where, entries in grouped.items():
                text = re.match(r"^(text2?)\.blocks\.(\d+)$", where)
                if text is not None:
                    self._attach_text(stack, text.group(1), int(text.group(2)), where, entries)
                else:
                    self._attach_block(stack, where, entries)
            yield self

    def _unet_call(self, _module, args, kwargs) -> None:
        """Read the step from the U-Net call's timestep argument; note the CFG halves."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        value = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        schedule = getattr(self.pipe.scheduler, "timesteps", None)
        step = n_steps = None
        if schedule is not None and len(schedule):
            distance = (schedule.detach().double().cpu() - value).abs()
            step, n_steps = int(distance.argmin()), len(schedule)
        batch = int(sample.shape[0])
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
        self._call = _Call(step, value, n_steps, cfg, batch)

    def _context(self, name: str, batch: int, grid: tuple[int, int] | None) -> DiffusionContext:
        call = self._call
        if call is None or call.batch != batch:
            call = _Call(None, None, None, False, batch)
        halves = _halves(batch, call.cfg)
        per_half = batch // 2 if call.cfg else batch
        return DiffusionContext(
            name=name,
            step=call.step,
            timestep=call.timestep,
            n_steps=call.n_steps,
            cfg=call.cfg,
            halves=halves,
            half=None,
            rows=slice(0, batch),
            prompt_index=[row % per_half for row in range(batch)],
            grid=grid,
        )

    @staticmethod
    def _apply(entries: Sequence[_Entry], tokens: Tensor, base: DiffusionContext,
               text_half: str | None = None) -> Tensor | None:  # fmt: skip
        """Run ``entries`` on ``tokens`` ``[batch, tokens, d]``; the edited tokens, or None."""
        edited: Tensor | None = None
        for entry in entries:
            if entry.steps is not None and base.step is not None and base.step not in entry.steps:
                continue
            if entry.half is None:
                rows = base.rows
            elif text_half is not None:  # text encoders: the whole call is one half
                if entry.half != text_half:
                    continue
                rows = base.rows
            elif entry.half in base.halves:
                rows = base.halves[entry.half]
            else:
                continue
            current = tokens if edited is None else edited
            part = current[rows]
            ctx = replace(
                base,
                half=entry.half if entry.half is not None else text_half,
                rows=rows,
                prompt_index=base.prompt_index[rows],
            )
            new = entry.fn(part, ctx)
            if new is None:
                continue
            if not isinstance(new, Tensor) or new.shape != part.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise PrismaError(
                    f"hook function for {base.name!r} returned {got}; it must return None or a "
                    f"tensor of the activation's shape {tuple(part.shape)}"
                )
            if edited is None:
                edited = tokens.clone()
            edited[rows] = new.to(edited.dtype)
        return edited

    def _attach_block(self, stack: contextlib.ExitStack, where: str,
                      entries: Mapping[str, list[_Entry]]) -> None:  # fmt: skip
        block_name = where.removeprefix("unet.")
        module = self.blocks[block_name]
        stash: dict[str, Tensor] = {}

        def grid_of(feature_map: Tensor) -> tuple[int, int]:
            return int(feature_map.shape[2]), int(feature_map.shape[3])

        def pre(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if "hook_in" in entries:
                base = self._context(f"{where}.hook_in", hidden.shape[0], grid_of(hidden))
                new = self._apply(entries["hook_in"], _to_tokens(hidden), base)
                if new is not None:
                    hidden = _to_map(new, hidden)
                    stash["in"] = hidden
                    if args:
                        return (hidden, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": hidden}
            stash["in"] = hidden
            return None

        def post(_module, _args, _kwargs, output):
            out = output[0] if isinstance(output, tuple) else output.sample
            hidden = stash.pop("in")
            changed = False
            grid = grid_of(out)
            if "hook_update" in entries:
                update = _to_tokens(out - hidden)
                base = self._context(f"{where}.hook_update", out.shape[0], grid)
                new = self._apply(entries["hook_update"], update, base)
                if new is not None:
                    # out + (edited - update): an update returned unchanged changes no bit
                    out = out + _to_map(new - update, out)
                    changed = True
            if "hook_out" in entries:
                base = self._context(f"{where}.hook_out", out.shape[0], grid)
                new = self._apply(entries["hook_out"], _to_tokens(out), base)
                if new is not None:
                    out = _to_map(new, out)
                    changed = True
            if not changed:
                return None
            if isinstance(output, tuple):
                return (out, *output[1:])
            return replace(output, sample=out)

        stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        stack.callback(module.register_forward_hook(post, with_kwargs=True).remove)

    def _attach_text(self, stack: contextlib.ExitStack, prefix: str, index: int, where: str,
                     entries: Mapping[str, list[_Entry]]) -> None:  # fmt: skip
        encoder = getattr(self.pipe, _TEXT_ENCODERS[prefix])
        layer = self.text_layers[prefix][index]
        name = f"{where}.{TEXT_SUFFIX}"
        calls = {"n": 0}

        def count(_module, _args):
            calls["n"] += 1

        def reset(_module, _args, _kwargs):
            calls["n"] = 0  # the next text encoding belongs to the next generation

        def post(_module, _args, output):
            resid = output[0] if isinstance(output, tuple) else output
            batch = resid.shape[0]
            base = DiffusionContext(  # the prompts alone: no step, no CFG batch
                name=name, step=None, timestep=None, n_steps=None, cfg=False,
                halves={"cond": slice(0, batch)}, half=None, rows=slice(0, batch),
                prompt_index=list(range(batch)), grid=None,
            )  # fmt: skip
            text_half = "cond" if calls["n"] <= 1 else "uncond"
            new = self._apply(entries[TEXT_SUFFIX], resid, base, text_half)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        stack.callback(encoder.register_forward_pre_hook(count).remove)
        stack.callback(self.pipe.unet.register_forward_pre_hook(reset, with_kwargs=True).remove)
        stack.callback(layer.register_forward_hook(post).remove)

    # ----- generation ------------------------------------------------------------------------
    def settings(self, steps: int | None = None, guidance: float | None = None,
                 size: Any = None) -> dict[str, Any]:  # fmt: skip
        """The generation settings with the card's defaults filled in, checked:
        ``{"steps", "guidance", "size": [h, w]}``."""
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise PrismaError(f"steps={steps!r}: give a positive number of denoising steps")
        guidance = self.default_guidance if guidance is None else guidance
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise PrismaError(f"guidance={guidance!r}: give a number, e.g. 0 or 7.5") from None
        if not math.isfinite(guidance) or guidance < 0:
            raise PrismaError(f"guidance={guidance!r}: give a finite number >= 0")
        height, width = self.size if size is None else self.check_size(size)
        return {"steps": steps, "guidance": guidance, "size": [height, width]}

    def generate(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: Any = None,
        negative_prompt: str | Sequence[str] | None = None,
    ) -> Tensor:
        """Images ``[len(prompts), 3, H, W]`` (float32 in [0, 1], on the CPU) from the native
        pipeline with the card's defaults (each overridable), under any active hooks.

        ``seeds``: one per prompt, or one for all (default 0); each image's initial noise
        comes from its own CPU generator, so an image does not depend on the batch it is in.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise PrismaError("prompts: give a prompt or a non-empty list of prompt strings")
        seeds = _seeds(seeds, len(prompts))
        chosen = self.settings(steps, guidance, size)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        self._call = None
        with torch.no_grad():  # not inference_mode: the images stay ordinary tensors
            output = self.pipe(
                prompt=prompts,
                negative_prompt=negative_prompt,
                num_inference_steps=chosen["steps"],
                guidance_scale=chosen["guidance"],
                height=chosen["size"][0],
                width=chosen["size"][1],
                generator=generators,
                output_type="pt",
            )
        self._call = None
        return output.images.float().cpu()

    def run_with_cache(
        self,
        prompts: str | Sequence[str],
        names: str | Sequence[str],
        seeds: int | Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: Any = None,
        half: str = "cond",
        at_steps: Sequence[int] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Generate and return ``(images, acts)``: ``acts[name]`` is ``[n_prompts, n_steps,
        tokens, d]`` for a U-Net hook (``n_steps``: every step, or ``at_steps``) and
        ``[n_prompts, tokens, d]`` for a text hook, of the ``half`` rows (``"cond"``, the
        default, or ``"uncond"``, which needs guidance > 1)."""
        names = [names] if isinstance(names, str) else list(names)
        if half not in HALVES:
            raise PrismaError(f"half={half!r}: run_with_cache reads 'cond' or 'uncond' rows")
        chosen = self.settings(steps, guidance, size)
        wanted = list(range(chosen["steps"])) if at_steps is None else sorted(set(at_steps))
        _check_steps(wanted)
        store: dict[str, dict[int, Tensor]] = {name: {} for name in names}

        def read(act: Tensor, ctx: DiffusionContext) -> None:
            store[ctx.name][-1 if ctx.step is None else ctx.step] = act.detach().clone()

        with self.hooks({name: read for name in names}, steps=wanted, half=half):
            images = self.generate(prompts, seeds, chosen["steps"], chosen["guidance"],
                                   chosen["size"])  # fmt: skip
        acts: dict[str, Tensor] = {}
        for name in names:
            got = store[name]
            if name.startswith("text"):
                if -1 not in got:
                    raise PrismaError(f"hook {name!r} did not fire (no {half} text encoding)")
                acts[name] = got[-1]
                continue
            missing = [s for s in wanted if s not in got]
            if missing:
                raise PrismaError(
                    f"hook {name!r} did not fire at steps {missing} of the {half} half "
                    "(the uncond half exists only with guidance > 1)"
                )
            acts[name] = torch.stack([got[s] for s in wanted], dim=1)
        return images, acts


def cache_prompts(
    hp: HookedPipeline,
    records: list[dict[str, Any]],
    reasons: list[str | None],
    items: Sequence[Mapping[str, Any]],
    hooks: Sequence[str],
    generation: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[str | None], dict[str, Tensor]]:
    """The cache writer's step for a batch of prompt inputs: generate (cond rows) and return
    ``(records, reasons, acts)`` with each readable record expanded into one per denoising
    step (key ``<key>-sNNN``; ``meta`` = prompt, seed, step, timestep; the generated image as
    a ``png`` member of step 0 when ``generation["keep_images"]``) and ``acts[hook]``
    ``[n_readable * n_steps, tokens, d]`` in that order. ``items``: ``{prompt, seed}`` of each
    readable record, in order."""
    steps, guidance = generation["steps"], generation["guidance"]
    images, acts = hp.run_with_cache(
        [item["prompt"] for item in items], list(hooks), seeds=[int(i["seed"]) for i in items],
        steps=steps, guidance=guidance, size=generation["size"],
    )  # fmt: skip
    timesteps = [float(t) for t in hp.pipe.scheduler.timesteps]
    expanded: list[dict[str, Any]] = []
    expanded_reasons: list[str | None] = []
    readable = iter(zip(items, images))
    for record, reason in zip(records, reasons):
        if reason is not None:
            expanded.append(record)
            expanded_reasons.append(reason)
            continue
        item, image = next(readable)
        first_key = f"{record['key']}-s000"
        for step in range(steps):
            sample = {**record, "key": f"{record['key']}-s{step:03d}", "more": step < steps - 1}
            sample["meta"] = {
                "prompt": item["prompt"],
                "seed": int(item["seed"]),
                "step": step,
                "timestep": timesteps[step],
                "image": first_key if generation.get("keep_images") else None,
            }
            if step < steps - 1:
                sample.pop("tar_shard", None)  # a tar shard ends with its input's last sample
            if step == 0 and generation.get("keep_images"):
                sample["members"] = {"png": _png_bytes(image)}
            expanded.append(sample)
            expanded_reasons.append(None)
    flat = {name: act.flatten(0, 1) for name, act in acts.items()}
    return expanded, expanded_reasons, flat


def to_pil(image: Tensor) -> Any:
    """A PIL image of ``image [3, H, W]`` float in [0, 1] (as ``HookedPipeline.generate``
    returns them), rounded to uint8."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels.cpu().numpy()))


def _png_bytes(image: Tensor) -> bytes:
    """A ``[3, H, W]`` image in [0, 1] as PNG bytes (deterministic: no metadata)."""
    import io

    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_steps(steps: int | Sequence[int] | None) -> frozenset[int] | None:
    if steps is None:
        return None
    values = [steps] if isinstance(steps, int) else list(steps)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
        raise PrismaError(f"steps={steps!r}: give step indices 0, 1, … (0 is the first step)")
    return frozenset(values)


def _seeds(seeds: int | Sequence[int] | None, n: int) -> list[int]:
    if seeds is None:
        seeds = 0
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return [seeds] * n
    values = list(seeds)
    if len(values) != n or any(isinstance(s, bool) or not isinstance(s, int) for s in values):
        raise PrismaError(f"seeds: give one integer for all prompts or one per prompt ({n})")
    return [int(s) for s in values]


def _call_defaults(pipe: Any) -> dict[str, Any]:
    """The pipeline class's own defaults for steps and guidance."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    return {
        "num_inference_steps": parameters["num_inference_steps"].default,
        "guidance_scale": parameters["guidance_scale"].default,
    }


# ----- loading -------------------------------------------------------------------------------
def _hf_cache_dir() -> str:
    """The HF hub cache as the environment says now (HF_HUB_CACHE, HF_HOME/hub, default)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE


def _from_pretrained(source: str, card: Any, dtype: torch.dtype | None) -> Any:
    """The native pipeline from a ``save_pretrained`` folder or a hub repo (offline: the HF
    cache); safetensors only, never a pickle."""
    from diffusers import DiffusionPipeline

    from prisma_mm.zoo.registry import hub_offline

    local = Path(source).expanduser()
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    variant = (getattr(card, "kwargs", None) or {}).get("variant")
    if variant and dtype == torch.float16:
        kwargs["variant"] = variant
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise PrismaError(
                f"{str(local)!r} is not a diffusers pipeline folder (no model_index.json): "
                "give a folder written by pipeline.save_pretrained"
            )
        target = str(local)
    else:
        target = source
        kwargs.update(cache_dir=_hf_cache_dir(), local_files_only=hub_offline())
    try:
        return DiffusionPipeline.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as error:
        if local.is_dir():
            raise PrismaError(
                f"cannot load the pipeline in {str(local)!r}: {error.__class__.__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}"
            ) from error
        where = "the hub is offline" if hub_offline() else "the hub could not be reached"
        raise PrismaError(
            f"pretrained weights of {getattr(card, 'name', source)!r} ({source}) are not in the "
            f"Hugging Face cache ({_hf_cache_dir()}) and {where}: fetch them with "
            f"`huggingface-cli download {source}` on a machine with network access, then copy "
            "the cache folder here"
        ) from error


def _folder_card(path: Path, pipe: Any) -> Any:
    from prisma_mm.zoo.registry import ModelCard

    return ModelCard(
        name=path.name,
        family="diffusers",
        arch=type(pipe).__name__,
        source=str(path),
        task="text-to-image",
        description="a diffusers pipeline loaded from a save_pretrained folder",
    )


def _apply_scheduler(pipe: Any, card: Any) -> None:
    """The card's scheduler settings (``generate.scheduler``: overrides of its config)."""
    overrides = dict((getattr(card, "generate", None) or {}).get("scheduler") or {})
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)


def load_pipeline(
    name: str | Path | Any,
    weights: str | Path | None = "pretrained",
    device: Any = "cpu",
    dtype: Any = None,
    *,
    size: Any = None,
    seed: int = 0,
) -> HookedPipeline:
    """A :class:`HookedPipeline` from a diffusion card name (``model_zoo/diffusion.yaml``) or
    a ``save_pretrained`` folder.

    ``weights``: ``"pretrained"`` (the card's hub repo; offline from the HF cache, else one
    line naming what to fetch), ``"hf-hub:org/repo"``, a ``save_pretrained`` folder, or None
    (random init of the card's architecture, seeded by ``seed``: SDXL-Turbo-sized random
    weights for benchmarks; its tokenizer is the tiny offline one). Tiny cards always build
    random weights seeded by ``seed``.
    ``size``: default image size (pixels) instead of the card's.
    """
    from prisma_mm.zoo.registry import get_card, resolve_device, resolve_dtype

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if isinstance(name, Path) or (isinstance(name, str) and Path(name).expanduser().is_dir()):
        path = Path(name).expanduser()
        pipe = _from_pretrained(str(path), None, torch_dtype)
        card = _folder_card(path, pipe)
    else:
        card = get_card(name) if isinstance(name, str) else name
        if card.family != "diffusers":
            raise PrismaError(
                f"model {card.name!r} is a {card.family} card, not a diffusion pipeline: use "
                "load_model, or a diffusion card (`prisma-mm zoo list --family diffusers`)"
            )
        if isinstance(weights, Path):
            weights = str(weights)
        if torch_dtype is None and device.type == "cuda" and card.kwargs.get("variant"):
            torch_dtype = torch.float16  # a card with fp16 weight files runs in fp16 on a GPU
        if card.is_tiny and weights in (None, "pretrained"):
            from prisma_mm.zoo.tiny_diffusion import build_tiny_pipeline

            pipe = build_tiny_pipeline(seed=seed, **card.kwargs)
        elif weights is None:
            if not card.config_file:
                raise PrismaError(
                    f"weights=None (random init) needs the card's architecture (config_file); "
                    f"{card.name!r} loads 'pretrained', 'hf-hub:org/repo' or a folder"
                )
            # the card's full-size architecture with seeded random weights (benchmarks)
            pipe = build_from_config(card, device=device, dtype=torch_dtype, seed=seed)
        elif weights == "pretrained":
            pipe = _from_pretrained(card.source, card, torch_dtype)
        elif isinstance(weights, str) and weights.startswith("hf-hub:"):
            pipe = _from_pretrained(weights.removeprefix("hf-hub:"), card, torch_dtype)
        elif isinstance(weights, str):
            path = Path(weights).expanduser()
            if not path.is_dir():
                raise PrismaError(
                    f"weights {weights!r} is not a folder: give a save_pretrained folder, "
                    "'pretrained' or 'hf-hub:org/repo'"
                )
            pipe = _from_pretrained(str(path), card, torch_dtype)
        else:
            raise PrismaError(
                f"weights={weights!r}: use 'pretrained', 'hf-hub:org/repo', a folder or None"
            )
        _apply_scheduler(pipe, card)
    pipe.set_progress_bar_config(disable=True)
    if torch_dtype is not None:
        pipe.to(torch_dtype)
    pipe.to(device)
    return HookedPipeline(pipe, card, size=size)


def _architecture(card: Any) -> dict[str, Any]:
    from prisma_mm.zoo.registry import zoo_dir

    if not card.config_file:
        raise PrismaError(f"card {card.name!r} has no config_file: its architecture is unknown")
    import json

    return json.loads((zoo_dir() / card.config_file).read_text())


def build_from_config(card: Any, device: Any = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """The native pipeline of ``card``'s architecture (its ``config_file``) with random
    weights seeded by ``seed`` (on ``"meta"``: no weights, no memory), and the tiny offline
    tokenizer (ids within the real vocabulary). For sizing, benchmarks and ``zoo show``
    without a download; its images are noise."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from prisma_mm.zoo.registry import resolve_dtype
    from prisma_mm.zoo.tiny_diffusion import tiny_tokenizer

    config = _architecture(card)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype)
    scheduler_config = dict(config["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_config.pop("class"))
    parts: dict[str, Any] = {
        "scheduler": scheduler_class.from_config(scheduler_config),
        "tokenizer": tiny_tokenizer(),
    }
    # only the networks are built on the device (the scheduler's tables stay on the CPU)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts["unet"] = diffusers.UNet2DConditionModel.from_config(config["unet"])
        parts["vae"] = diffusers.AutoencoderKL.from_config(config["vae"])
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        if "text_encoder_2" in config:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**config["text_encoder_2"])
            )
            parts["tokenizer_2"] = tiny_tokenizer()
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline_class = getattr(diffusers, card.arch)
    pipe = pipeline_class(**parts)
    if torch_dtype is not None:
        pipe.to(torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_on_meta(card: Any, size: Any = None) -> HookedPipeline:
    """``card``'s pipeline with no weights (the tiny card: its random weights), hooked: its
    hook names, grids and widths without a download."""
    if card.is_tiny:
        return load_pipeline(card, None, size=size)
    from prisma_mm.zoo.registry import _SkipInitOnMeta

    with _SkipInitOnMeta():
        pipe = build_from_config(card, device="meta")
    return HookedPipeline(pipe, card, size=size)


def save_hf_cache(folder: str | Path, cache_dir: str | Path, repo_id: str,
                  revision: str = "0" * 40) -> Path:  # fmt: skip
    """Lay a ``save_pretrained`` folder out as the HF hub cache does (``models--org--name/``
    with ``blobs/`` named by sha256, ``snapshots/<revision>/`` of relative symlinks and
    ``refs/main``), so that an offline ``from_pretrained(repo_id)`` finds it. Returns the
    snapshot folder."""
    import hashlib
    import shutil

    folder = Path(folder)
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


__all__ = [
    "DiffusionContext",
    "build_from_config",
    "build_on_meta",
    "HookedPipeline",
    "build_tiny_pipeline",
    "cache_prompts",
    "load_pipeline",
    "save_hf_cache",
]


def build_tiny_pipeline(seed: int = 0, **kwargs: Any) -> Any:
    """The tiny SDXL-structured native pipeline (see :mod:`prisma_mm.zoo.tiny_diffusion`)."""
    from prisma_mm.zoo.tiny_diffusion import build_tiny_pipeline as build

    return build(seed=seed, **kwargs)
