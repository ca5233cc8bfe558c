"""Interventions with a dictionary's features at a hook: one API for every model.

An :class:`Intervention` is a small object attached to one hook of a
:class:`~prisma_mm.hooks.HookedModel`. It computes an additive change ``delta`` of the
activation ``x [batch, tokens, d]`` and applies it inside an optional token mask:

* :class:`AddFeature`: ``x' = x + sum_i strength_i * scale_i * W_dec[i]`` — a feature's decoder
  row added at ``strength`` times its typical activation ``scale_i`` (a
  :class:`~prisma_mm.viz.index.FeatureIndex`'s ``mean_active``, or a number you give);
* :class:`EditFeatures`: through the SAE with its error term kept,
  ``x' = x + decode(edit(code)) - decode(code)`` with ``code = encode(x)``, computed as
  ``sum_i (edit(c)_i - c_i) W_dec[i]`` over the edited latents only, so an edit that changes
  no code value changes nothing, bit for bit;
* :class:`Reconstruct`: ``x' = decode(encode(x))`` (the SAE spliced in), or with the error
  term kept ``x' = x + decode(c) - decode(c)``, the identity computed through the SAE.

:func:`steer` attaches a list of interventions (several features, several hooks) for the
duration of a ``with`` block and removes them in ``finally``. An intervention that does
nothing (strength 0, scale factor 1) returns None from its hook, so the model's outputs are
bit-identical to an unsteered run. Each intervention keeps explicit state (``calls``: how
many activations it has edited) that :meth:`Intervention.reset` clears; :func:`steer`
resets it on entry.

On a diffusion pipeline the same objects gate themselves: ``steps=`` (denoising step
indices) and ``half=`` (``"cond"``, ``"uncond"`` or ``"both"`` rows of a classifier-free
guidance batch) are read from the hook's context (``ctx.step``, ``ctx.halves``), and a
:class:`RegionMask` (an image or a box) is resized to each block's grid (``ctx.grid``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import HookPoint, TokenLayout
from prisma_mm.sae.base import Dictionary, SparseAutoencoder

__all__ = [
    "HALVES",
    "AddFeature",
    "EditFeatures",
    "Intervention",
    "Reconstruct",
    "RegionMask",
    "ablate",
    "feature_scale",
    "steer",
    "token_mask",
]

HALVES = ("both", "cond", "uncond")


def token_mask(layout: TokenLayout, patches: Tensor | None = None, prefix: bool = False) -> Tensor:
    """A ``[tokens]`` bool mask from a patch-grid mask and whether to include prefix tokens.

    ``patches``: bool ``[h, w]`` or ``[frames, h, w]`` over ``layout.grid`` (None: no patch
    token); ``prefix``: include the CLS / register tokens. ``token_mask(layout, prefix=True)``
    selects the CLS token (and registers) only.
    """
    mask = torch.zeros(layout.n_tokens, dtype=torch.bool)
    mask[: layout.n_prefix] = prefix
    if patches is not None:
        grid = torch.as_tensor(patches).bool()
        if grid.dim() == 2:
            grid = grid.unsqueeze(0)
        if tuple(grid.shape) != tuple(layout.grid):
            raise PrismaError(
                f"patch mask has shape {tuple(torch.as_tensor(patches).shape)}; the layout's "
                f"patch grid is {layout.grid[1:] if layout.grid[0] == 1 else layout.grid}"
            )
        mask[layout.n_prefix :] = layout.grid_to_tokens(grid)  # the family's token order
    return mask


class RegionMask:
    """A spatial mask in image coordinates, resized to whatever grid a hook has: ``pixels
    [H, W]`` in [0, 1] (an image: bool, float or uint8 / 255) or a box ``(left, top, right,
    bottom)`` in pixels of an image of ``size (H, W)``.

    :meth:`tokens` gives the ``[h * w]`` mask of a ``(h, w)`` grid (row-major, as feature
    maps become tokens): each cell's coverage, the mean of the pixels it spans (area
    resampling; cells need not divide the image), as a bool ``coverage >= 0.5`` or, with
    ``soft=True``, the float coverage (a weighted edit).
    """

    def __init__(self, pixels: Any = None, *, box: Sequence[float] | None = None,
                 size: tuple[int, int] | None = None, soft: bool = False) -> None:  # fmt: skip
        if (pixels is None) == (box is None):
            raise PrismaError("a region mask takes an image or a box (one of them)")
        if box is not None:
            if size is None:
                raise PrismaError("a box mask needs the image size (H, W) its pixels refer to")
            height, width = (int(v) for v in size)
            left, top, right, bottom = (float(v) for v in box)
            if not (0 <= left < right <= width and 0 <= top < bottom <= height):
                raise PrismaError(
                    f"box {tuple(box)} must satisfy 0 <= left < right <= {width} and "
                    f"0 <= top < bottom <= {height} (pixels of a {width}x{height} image)"
                )
            rows = torch.arange(height, dtype=torch.float32) + 0.5
            cols = torch.arange(width, dtype=torch.float32) + 0.5
            inside_r = (rows > top) & (rows < bottom)
            inside_c = (cols > left) & (cols < right)
            grid = (inside_r[:, None] & inside_c[None, :]).float()
        else:
            array = pixels.convert("L") if hasattr(pixels, "convert") else pixels
            grid = torch.as_tensor(np.array(array))  # a copy: PIL's buffer is read-only
            if grid.dim() == 3:  # an RGB(A) array: any channel set marks the region
                grid = grid.amax(-1)
            if grid.dim() != 2:
                raise PrismaError(f"a mask image is [H, W]; got shape {tuple(grid.shape)}")
            grid = grid.float() / 255.0 if grid.dtype == torch.uint8 else grid.float()
            if grid.numel() and not 0.0 <= float(grid.min()) <= float(grid.max()) <= 1.0:
                raise PrismaError("a float mask image must hold values in [0, 1]")
        self.pixels = grid  # [H, W] float in [0, 1]
        self.soft = soft
        self._tokens: dict[tuple[int, int], Tensor] = {}  # per grid: hooks fire every step

    def tokens(self, grid: Sequence[int]) -> Tensor:
        """``[h * w]`` mask of a ``(h, w)`` (or ``(1, h, w)``) grid: bool, or float if soft."""
        h, w = (int(v) for v in tuple(grid)[-2:])
        if (h, w) not in self._tokens:
            coverage = torch.nn.functional.adaptive_avg_pool2d(self.pixels[None, None], (h, w))
            coverage = coverage.reshape(h * w)
            self._tokens[h, w] = coverage if self.soft else coverage >= 0.5
        return self._tokens[h, w]


def _steerable(dictionary: Dictionary) -> SparseAutoencoder:
    if not isinstance(dictionary, SparseAutoencoder) or dictionary.architecture in (
        "transcoder",
        "crosscoder",
    ):
        kind = getattr(dictionary, "architecture", "") or type(dictionary).__name__
        raise PrismaError(
            f"steering reads and writes one hook through an SAE; a {kind} dictionary "
            "reconstructs another hook (use an SAE trained on the hook you steer)"
        )
    return dictionary


def _resolve_hook(dictionary: Dictionary, hook: str | None) -> str:
    recorded = dictionary.metadata.get("hook")
    if hook is None:
        if not isinstance(recorded, str):
            raise PrismaError(
                "the dictionary does not record its hook (cfg.json metadata 'hook'): pass hook="
            )
        return recorded
    if isinstance(recorded, str) and recorded != hook:
        raise PrismaError(
            f"the dictionary was trained on {recorded!r}; steering it at {hook!r} would add "
            f"directions of another space (pass hook={recorded!r})"
        )
    return hook


def _latent_list(dictionary: Dictionary, latents: int | Sequence[int]) -> list[int]:
    items = [latents] if isinstance(latents, int) else [int(i) for i in latents]
    if not items:
        raise PrismaError("no latents given: pass a latent id or a list of them")
    n = dictionary.cfg.n_latents
    bad = [i for i in items if not 0 <= i < n]
    if bad:
        raise PrismaError(f"latent(s) {bad} outside 0..{n - 1} of this {n}-latent dictionary")
    return items


def _per_latent(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise PrismaError(f"{what} has {len(values)} values for {n} latents")
    return values


def feature_scale(
    scale: Any, latents: Sequence[int], n_latents: int, hook: str | None = None
) -> list[float]:
    """The typical activation of each latent: from a feature index (anything with
    ``mean_active [n_latents]``; its ``meta["cache"]["hook"]`` must match ``hook``), a
    ``[n_latents]`` tensor, or a number / one number per latent."""
    table = getattr(scale, "mean_active", None)
    if table is not None:
        meta = getattr(scale, "meta", {}) or {}
        indexed_hook = (meta.get("cache") or {}).get("hook")
        if hook is not None and indexed_hook is not None and indexed_hook != hook:
            raise PrismaError(
                f"the feature index was built at {indexed_hook!r}, not at {hook!r}: its mean "
                "activations belong to another hook"
            )
        scale = table
    if isinstance(scale, Tensor):
        if scale.dim() != 1 or scale.shape[0] != n_latents:
            raise PrismaError(
                f"scale table has shape {tuple(scale.shape)}; expected [{n_latents}] "
                "(one mean activation per latent of the dictionary)"
            )
        values = [float(scale[i]) for i in latents]
    else:
        values = _per_latent(scale, len(latents), "scale")
    dead = [i for i, v in zip(latents, values) if not v > 0]  # also catches NaN
    if dead:
        raise PrismaError(
            f"latent(s) {dead} have no positive mean activation (they never fired in the "
            "index): pass an explicit scale= for them"
        )
    return values


class Intervention:
    """An additive edit of the activation at one hook, inside an optional token mask.

    ``mask``: None (every token), ``[tokens]`` / ``[batch, tokens]``: bool (tokens outside
    keep their exact values) or float weights (``x + w * delta``), or a :class:`RegionMask`
    (resized to the hook's grid; diffusion blocks). ``steps``: denoising step indices to act
    at (None: every step); ``half``: the CFG rows to edit, ``"cond"``, ``"uncond"`` or
    ``"both"`` (without CFG every row is ``cond``); both only on a diffusion pipeline.
    Subclasses implement :meth:`delta` and :meth:`is_noop`. State: ``calls``, the number of
    activations edited since the last :meth:`reset`.
    """

    hook: str

    def __init__(self, hook: str, mask: Any = None, *, steps: Sequence[int] | None = None,
                 half: str = "both") -> None:  # fmt: skip
        self.hook = hook
        self.mask = mask if mask is None or isinstance(mask, RegionMask) else torch.as_tensor(mask)
        if half not in HALVES:
            raise PrismaError(f"half={half!r}: use one of {', '.join(HALVES)}")
        if steps is not None:
            steps = [steps] if isinstance(steps, int) else [int(s) for s in steps]
            if not steps or min(steps) < 0:
                raise PrismaError(f"steps={steps}: give non-negative step indices (or None)")
        self.steps = None if steps is None else frozenset(steps)
        self.half = half
        self.calls = 0

    @property
    def gated(self) -> bool:
        """Whether it acts at some denoising steps or CFG halves only (diffusion pipelines)."""
        return self.steps is not None or self.half != "both" or isinstance(self.mask, RegionMask)

    def reset(self) -> None:
        """Clear the state kept between forwards."""
        self.calls = 0

    def is_noop(self) -> bool:
        """Whether this intervention changes nothing (its hook then returns None)."""
        raise NotImplementedError

    def delta(self, act: Tensor) -> Tensor:
        """The change of ``act [batch, tokens, d]``: ``[batch, tokens, d]`` or ``[d]``."""
        raise NotImplementedError

    def _rows_for(self, act: Tensor, point: Any) -> Tensor | None | bool:
        """The CFG rows to edit at this call: None (all), a bool ``[batch]``, or False (none:
        another step, or the uncond half of a batch without CFG)."""
        if self.steps is not None:
            step = getattr(point, "step", None)
            if step is None:
                raise PrismaError(
                    f"steering at {self.hook!r} with steps= needs a diffusion pipeline (its "
                    "hooks know the denoising step)"
                )
            if int(step) not in self.steps:
                return False
        if self.half == "both":
            return None
        if not hasattr(point, "halves"):
            raise PrismaError(
                f"steering at {self.hook!r} with half={self.half!r} needs a diffusion pipeline"
            )
        halves = point.halves
        if self.half not in halves:  # no classifier-free guidance: every row is conditional
            return None if self.half == "cond" else False
        whole = max(part.stop for part in halves.values())
        rows = torch.zeros(whole, dtype=torch.bool, device=act.device)
        rows[halves[self.half]] = True
        return rows[getattr(point, "rows", slice(None))]  # the rows handed to this hook

    def _mask_for(self, act: Tensor, point: Any = None) -> Tensor | None:
        mask = self.mask
        if mask is None:
            return None
        if isinstance(mask, RegionMask):
            grid = getattr(point, "grid", None)
            if grid is None:
                raise PrismaError(
                    f"a RegionMask at {self.hook!r} needs the hook's grid (diffusion blocks); "
                    "on a ViT pass token_mask(layout, patches=...) or RegionMask(...).tokens("
                    "layout.grid) with the prefix tokens added"
                )
            mask = mask.tokens(grid)
        batch, tokens = act.shape[:2]
        if mask.shape not in (torch.Size([tokens]), torch.Size([batch, tokens])):
            raise PrismaError(
                f"steering mask at {self.hook!r} has shape {tuple(mask.shape)}; the activation "
                f"has {tokens} tokens (use [tokens] or [batch, tokens], e.g. token_mask(layout))"
            )
        mask = mask.to(act.device)
        return mask.expand(batch, tokens)[..., None]

    def __call__(self, act: Tensor, point: HookPoint | Any = None) -> Tensor | None:
        """The hook function: ``act [batch, tokens, d]`` -> the edited activation, or None.
        ``point``: the HookPoint, or a diffusion hook's context (step, CFG halves, grid)."""
        if self.is_noop():
            return None
        rows = self._rows_for(act, point)
        if rows is False:
            return None
        mask = self._mask_for(act, point)
        if isinstance(rows, Tensor):
            rows = rows[:, None, None]
            if mask is None:
                mask = rows.expand(*act.shape[:2], 1)
            else:
                mask = mask & rows if mask.dtype == torch.bool else mask * rows.to(mask.dtype)
        change = self.delta(act).to(act.dtype)
        self.calls += 1
        if mask is None:
            return act + change
        if mask.dtype == torch.bool:
            return torch.where(mask, act + change, act)
        return act + mask.to(act.dtype) * change


class AddFeature(Intervention):
    """Add features' decoder rows: ``x' = x + sum_i strength_i * scale_i * W_dec[i]``.

    ``scale``: each latent's typical activation (a feature index, whose ``mean_active`` is
    used; a ``[n_latents]`` tensor; or numbers), so ``strength=1`` adds what one typical firing
    of the feature contributes to the SAE's reconstruction and ``strength=-1`` removes it.
    ``hook``: default the dictionary's recorded hook.
    """

    def __init__(
        self,
        dictionary: Dictionary,
        latents: int | Sequence[int],
        strength: float | Sequence[float] = 1.0,
        *,
        scale: Any,
        hook: str | None = None,
        mask: Any = None,
        steps: Sequence[int] | None = None,
        half: str = "both",
    ) -> None:
        sae = _steerable(dictionary)
        hook = _resolve_hook(sae, hook)
        super().__init__(hook, mask, steps=steps, half=half)
        self.latents = _latent_list(sae, latents)
        self.strength = _per_latent(strength, len(self.latents), "strength")
        self.scale = feature_scale(scale, self.latents, sae.cfg.n_latents, hook)
        rows = sae.W_dec.detach().reshape(sae.cfg.n_latents, -1)[self.latents].float()
        weights = torch.tensor(
            [s * m for s, m in zip(self.strength, self.scale)], dtype=torch.float32
        ).to(rows.device)
        self.direction = weights @ rows  # [d]: the whole change, computed once

    def is_noop(self) -> bool:
        return all(s == 0.0 for s in self.strength)

    def delta(self, act: Tensor) -> Tensor:
        if act.shape[-1] != self.direction.shape[0]:
            raise PrismaError(
                f"activation at {self.hook!r} has d={act.shape[-1]}; the dictionary's decoder "
                f"rows have d={self.direction.shape[0]}"
            )
        return self.direction.to(act.device)


class EditFeatures(Intervention):
    """Scale latents through the SAE, error term kept: ``x' = x + decode(c') - decode(c)``
    where ``c = encode(x)`` and ``c'_i = factor_i * c_i`` for ``{latent: factor}`` in
    ``edits`` (0 ablates, 2 doubles; every other latent keeps its value).

    Only the edited latents' decoder rows enter: ``delta = sum_i (c'_i - c_i) W_dec[i]``, so
    the SAE's reconstruction error and the untouched latents pass through unchanged.
    """

    def __init__(
        self,
        dictionary: Dictionary,
        edits: Mapping[int, float],
        *,
        hook: str | None = None,
        mask: Any = None,
        steps: Sequence[int] | None = None,
        half: str = "both",
    ) -> None:
        sae = _steerable(dictionary)
        super().__init__(_resolve_hook(sae, hook), mask, steps=steps, half=half)
        self.dictionary = sae
        self.latents = _latent_list(sae, list(edits))
        self.factors = [float(edits[i]) for i in self.latents]

    def is_noop(self) -> bool:
        return all(f == 1.0 for f in self.factors)

    @torch.no_grad()
    def delta(self, act: Tensor) -> Tensor:
        sae = self.dictionary
        param = sae.W_dec
        code = _inference_code(sae, act, self.hook)[:, self.latents]  # [n, edited]
        factors = torch.tensor(self.factors, dtype=code.dtype, device=code.device)
        rows = param.detach().reshape(sae.cfg.n_latents, -1)[self.latents]
        change = (code * factors - code) @ rows  # exact zeros where no code value changes
        return change.reshape(act.shape).to(act.device)


def _inference_code(sae: SparseAutoencoder, act: Tensor, hook: str) -> Tensor:
    """``encode`` of ``act [..., d]`` as rows ``[n, n_latents]``, in eval mode (the inference
    encoding, e.g. BatchTopK's learned threshold), on the SAE's device and dtype."""
    if act.shape[-1] != sae.cfg.d_in:
        raise PrismaError(
            f"activation at {hook!r} has d={act.shape[-1]}; the dictionary reads "
            f"d_in={sae.cfg.d_in}"
        )
    param = sae.W_dec
    flat = act.reshape(-1, act.shape[-1]).to(param.device, param.dtype)
    was_training = sae.training
    sae.eval()
    try:
        return sae.encode(flat)
    finally:
        sae.train(was_training)


class Reconstruct(Intervention):
    """Replace the activation by the SAE's reconstruction, ``x' = decode(encode(x))``, or with
    ``keep_error=True`` add the error term back, ``x' = x + (decode(c) - decode(c))``: the
    identity computed through the whole SAE path, so the output must stay bit-identical (a
    check of the plumbing; an edit of the code is :class:`EditFeatures`)."""

    def __init__(
        self,
        dictionary: Dictionary,
        *,
        keep_error: bool = False,
        hook: str | None = None,
        mask: Any = None,
        steps: Sequence[int] | None = None,
        half: str = "both",
    ) -> None:
        sae = _steerable(dictionary)
        super().__init__(_resolve_hook(sae, hook), mask, steps=steps, half=half)
        self.dictionary = sae
        self.keep_error = keep_error

    def is_noop(self) -> bool:
        return False

    @torch.no_grad()
    def delta(self, act: Tensor) -> Tensor:
        sae = self.dictionary
        recon = sae.decode(_inference_code(sae, act, self.hook))  # [n, d]
        flat = act.reshape(-1, act.shape[-1]).to(recon.device, recon.dtype)
        change = recon - recon if self.keep_error else recon - flat
        return change.reshape(act.shape).to(act.device)


def ablate(
    dictionary: Dictionary,
    latents: int | Sequence[int],
    *,
    hook: str | None = None,
    mask: Any = None,
    steps: Sequence[int] | None = None,
    half: str = "both",
) -> EditFeatures:
    """Zero-ablate latents through the SAE with the error term kept (``EditFeatures`` with
    factor 0)."""
    return EditFeatures(
        dictionary, dict.fromkeys(_latent_list(dictionary, latents), 0.0), hook=hook, mask=mask,
        steps=steps, half=half,
    )  # fmt: skip


@contextlib.contextmanager
def steer(model: Any, interventions: Intervention | Sequence[Intervention]) -> Iterator[Any]:
    """Within the block, ``model`` runs with ``interventions`` attached; removed on exit, also
    on error. Interventions at the same hook apply in the order given, each to the output of
    the one before. Hook names are checked before anything is attached; each intervention's
    state is reset on entry.

    ``model``: a :class:`~prisma_mm.hooks.HookedModel`, a
    :class:`~prisma_mm.zoo.diffusion.HookedPipeline`, or a bare diffusers pipeline (wrapped in
    a HookedPipeline; calling the pipeline itself inside the block is steered too). Yields
    the hooked model."""
    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if not hasattr(model, "hook_point") and hasattr(model, "unet"):  # a bare diffusers pipeline
        from prisma_mm.zoo.diffusion import HookedPipeline

        model = HookedPipeline(model)
    by_hook: dict[str, list[Any]] = {}
    for item in items:
        if not isinstance(item, Intervention):
            raise PrismaError(f"steer takes Intervention objects, got {type(item).__name__}")
        model.hook_point(item.hook)  # unknown names fail here, before the forward
        if item.gated and not hasattr(model, "pipe"):
            raise PrismaError(
                f"steering at {item.hook!r} with steps=, half= or a RegionMask needs a "
                "diffusion pipeline (its hooks know the step, CFG half and grid)"
            )
        by_hook.setdefault(item.hook, []).append(item)
        item.reset()

    with model.hooks(by_hook):  # several at one hook: each sees the one before's output
        yield model
