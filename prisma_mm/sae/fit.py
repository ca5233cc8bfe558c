"""A plain training loop for small dictionaries (tests, meta-SAEs, quick experiments).

It makes the same calls, in the same order, as the Lightning trainer: ``init_from_sample`` on
the first batch, then per step ``set_progress`` -> forward -> backward ->
``remove_decoder_grad_parallel_`` -> (clip) -> optimizer step -> ``normalize_decoder_`` ->
``on_train_batch_end``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary

__all__ = ["adam", "fit_simple"]


def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fused implementation where this torch supports it (much faster on CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise PrismaError("fit_simple: batches must be tensors x or pairs (x, target)")


def fit_simple(
    dictionary: Dictionary,
    data: Iterable[Any],
    steps: int,
    lr: float = 1e-3,
    *,
    grad_clip: float | None = 1.0,
    init_from_first_batch: bool = True,
    progress: bool = True,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Train ``dictionary`` for ``steps`` Adam steps on batches from ``data``.

    ``data`` yields ``x [batch, d_in]`` or ``(x, target)`` pairs (transcoders); it is cycled if
    it runs out. Returns the logged losses (every ``log_every`` steps and the last one).
    """
    if steps <= 0:
        raise PrismaError(f"fit_simple: steps must be positive, got {steps}")
    source: Iterator[Any] = iter(data)

    def next_batch() -> Any:
        nonlocal source
        try:
            return next(source)
        except StopIteration:
            source = iter(data)
            try:
                return next(source)
            except StopIteration:
                raise PrismaError("fit_simple: data yielded no batches") from None

    dictionary.train()
    opt = adam(dictionary.parameters(), lr)
    history: list[dict[str, float]] = []
    bar = tqdm(range(steps), desc=f"fit {dictionary.architecture}", disable=not progress)
    for step in bar:
        x, target = _split(next_batch())
        if step == 0 and init_from_first_batch:
            dictionary.init_from_sample(x, target)
        dictionary.set_progress(step / steps)
        out = dictionary(x, target)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        dictionary.remove_decoder_grad_parallel_()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(dictionary.parameters(), grad_clip)
        opt.step()
        dictionary.normalize_decoder_()
        dictionary.on_train_batch_end(out)
        if (log_every and step % log_every == 0) or step == steps - 1:
            row = {"step": float(step), "loss": float(out.loss.detach())}
            row.update({k: float(v) for k, v in out.losses.items()})
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
    dictionary.eval()
    return history
