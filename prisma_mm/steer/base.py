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
  no code value changes nothing, bit for bit.

:func:`steer` attaches a list of interventions (several features, several hooks) for the
duration of a ``with`` block and removes them in ``finally``. An intervention that does
nothing (strength 0, scale factor 1) returns None from its hook, so the model's outputs are
bit-identical to an unsteered run. Each intervention keeps explicit state (``calls``: how
many activations it has edited) that :meth:`Intervention.reset` clears; :func:`steer`
resets it on entry. The diffusion pipelines gate the same objects by denoising step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import HookPoint, TokenLayout
from prisma_mm.sae.base import Dictionary, SparseAutoencoder

__all__ = [
    "AddFeature",
    "EditFeatures",
    "Intervention",
    "ablate",
    "feature_scale",
    "steer",
    "token_mask",
]


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
        mask[layout.n_prefix :] = grid.reshape(-1)
    return mask


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

    ``mask``: None (every token), or ``[tokens]`` / ``[batch, tokens]``: bool (tokens outside
    keep their exact values) or float weights (``x + w * delta``). Subclasses implement
    :meth:`delta` and :meth:`is_noop`. State: ``calls``, the number of activations edited
    since the last :meth:`reset`.
    """

    hook: str

    def __init__(self, hook: str, mask: Tensor | None = None) -> None:
        self.hook = hook
        self.mask = None if mask is None else torch.as_tensor(mask)
        self.calls = 0

    def reset(self) -> None:
        """Clear the state kept between forwards."""
        self.calls = 0

    def is_noop(self) -> bool:
        """Whether this intervention changes nothing (its hook then returns None)."""
        raise NotImplementedError

    def delta(self, act: Tensor) -> Tensor:
        """The change of ``act [batch, tokens, d]``: ``[batch, tokens, d]`` or ``[d]``."""
        raise NotImplementedError

    def _mask_for(self, act: Tensor) -> Tensor | None:
        mask = self.mask
        if mask is None:
            return None
        batch, tokens = act.shape[:2]
        if mask.shape not in (torch.Size([tokens]), torch.Size([batch, tokens])):
            raise PrismaError(
                f"steering mask at {self.hook!r} has shape {tuple(mask.shape)}; the activation "
                f"has {tokens} tokens (use [tokens] or [batch, tokens], e.g. token_mask(layout))"
            )
        mask = mask.to(act.device)
        return mask.expand(batch, tokens)[..., None]

    def __call__(self, act: Tensor, point: HookPoint | None = None) -> Tensor | None:
        """The hook function: ``act [batch, tokens, d]`` -> the edited activation, or None."""
        if self.is_noop():
            return None
        mask = self._mask_for(act)
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
        mask: Tensor | None = None,
    ) -> None:
        sae = _steerable(dictionary)
        hook = _resolve_hook(sae, hook)
        super().__init__(hook, mask)
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
        mask: Tensor | None = None,
    ) -> None:
        sae = _steerable(dictionary)
        super().__init__(_resolve_hook(sae, hook), mask)
        self.dictionary = sae
        self.latents = _latent_list(sae, list(edits))
        self.factors = [float(edits[i]) for i in self.latents]

    def is_noop(self) -> bool:
        return all(f == 1.0 for f in self.factors)

    @torch.no_grad()
    def delta(self, act: Tensor) -> Tensor:
        sae = self.dictionary
        if act.shape[-1] != sae.cfg.d_in:
            raise PrismaError(
                f"activation at {self.hook!r} has d={act.shape[-1]}; the dictionary reads "
                f"d_in={sae.cfg.d_in}"
            )
        param = sae.W_dec
        flat = act.reshape(-1, act.shape[-1]).to(param.device, param.dtype)
        was_training = sae.training
        sae.eval()  # the inference encoding (e.g. BatchTopK's learned threshold)
        try:
            code = sae.encode(flat)[:, self.latents]  # [n, edited]
        finally:
            sae.train(was_training)
        factors = torch.tensor(self.factors, dtype=code.dtype, device=code.device)
        rows = param.detach().reshape(sae.cfg.n_latents, -1)[self.latents]
        change = (code * factors - code) @ rows  # exact zeros where no code value changes
        return change.reshape(act.shape).to(act.device)


def ablate(
    dictionary: Dictionary,
    latents: int | Sequence[int],
    *,
    hook: str | None = None,
    mask: Tensor | None = None,
) -> EditFeatures:
    """Zero-ablate latents through the SAE with the error term kept (``EditFeatures`` with
    factor 0)."""
    return EditFeatures(
        dictionary, dict.fromkeys(_latent_list(dictionary, latents), 0.0), hook=hook, mask=mask
    )


@contextlib.contextmanager
def steer(model: Any, interventions: Intervention | Sequence[Intervention]) -> Iterator[Any]:
    """Within the block, ``model`` runs with ``interventions`` attached; removed on exit, also
    on error. Interventions at the same hook apply in the order given, each to the output of
    the one before. Hook names are checked before anything is attached; each intervention's
    state is reset on entry."""
    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    by_hook: dict[str, list[Any]] = {}
    for item in items:
        if not isinstance(item, Intervention):
            raise PrismaError(f"steer takes Intervention objects, got {type(item).__name__}")
        model.hook_point(item.hook)  # unknown names fail here, before the forward
        by_hook.setdefault(item.hook, []).append(item)
        item.reset()

    with model.hooks(by_hook):  # several at one hook: each sees the one before's output
        yield model
