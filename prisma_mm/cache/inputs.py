"""The inputs of the cache writer: the seeded visiting order, and batches of prepared inputs
decoded in DataLoader workers.

The writer visits a source's inputs in a seeded random order, so that consecutive inputs (and
hence shards) of a class-sorted data set are already mixed:

- a random-access source (folder, class tree, list file, torch Dataset) is visited in one
  random permutation of all its inputs, ``numpy.random.default_rng(seed).permutation(n)``;
  the manifest records the seed and the permutation's sha256, so a resume on a machine whose
  numpy would permute differently is refused rather than silently mixing two orders;
- a streaming source (webdataset tar shards, whose inputs can only be read front to back) is
  read shard by shard in a seeded random shard order, each shard through a shuffle buffer of
  ``STREAM_BUFFER`` inputs seeded by (seed, shard) (webdataset's ``shuffle`` stage, made
  reproducible), so a tar shard's inputs take consecutive positions and a resumed run skips
  the tar shards it finished without opening them (the reader mixes across shards);
- ``seed=None`` keeps the source's own order.

Position ``p`` of the visiting order is what the manifest counts (``inputs_done``, shard
``inputs`` ranges); every sample also keeps its ``index`` in the source's own order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from prisma_mm.data.images import BadImage, to_pil_rgb
from prisma_mm.data.sources import InputRecord, Labeled, Loader, Source
from prisma_mm.errors import PrismaError

DEFAULT_ORDER_SEED = 0
# Inputs held by the shuffle buffer of a streaming source, per DataLoader worker (raw bytes:
# about 100 MB of JPEGs at ImageNet sizes).
STREAM_BUFFER = 1000

# Input kinds the writer can prepare for a model; video and prompt sources add theirs.
PREPARERS: dict[str, Callable[[Any], Callable[[Any], Tensor]]] = {}


def _image_preparer(model: Any) -> Callable[[Any], Tensor]:
    transform = model.spec.transform

    def prepare(raw: Any) -> Tensor:
        return transform(to_pil_rgb(raw))

    return prepare


PREPARERS["image"] = _image_preparer


def _video_preparer(model: Any) -> Callable[[Any], Tensor]:
    """A decoded clip ``uint8 [T, H, W, 3]`` through the card's clip transform to
    ``[3, T, H, W]``; a float ``[3, T, H, W]`` clip is already model input (in-memory clips)."""
    transform = model.spec.transform

    def prepare(raw: Any) -> Tensor:
        if isinstance(raw, Tensor) and raw.is_floating_point() and raw.dim() == 4:
            if raw.shape[0] == 3 and raw.shape[-1] != 3:
                return raw
        return transform(raw)

    return prepare


PREPARERS["video"] = _video_preparer


def _prompt_preparer(model: Any) -> Callable[[Any], dict[str, Any]]:
    """A prompt input ``{"prompt", "seed"}`` is generated from as it is (by the pipeline)."""

    def prepare(raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str):
            raise PrismaError(f"a prompt input must be {{'prompt': str, 'seed': int}}, not {raw!r}")
        return {"prompt": raw["prompt"], "seed": int(raw.get("seed", 0))}

    return prepare


PREPARERS["prompt"] = _prompt_preparer


def probe_input(model: Any) -> Tensor:
    """A zero input of the model's shape (``[1, 3, H, W]``, or ``[1, 3, frames, H, W]`` for a
    video model) to find the hooks' shapes with."""
    height, width = model.layout.input_size
    frames = getattr(model.spec, "frames", None)
    shape = (1, 3, height, width) if frames is None else (1, 3, frames, height, width)
    return torch.zeros(shape, device=model.device, dtype=model.dtype)


# ----- the visiting order ---------------------------------------------------------------------
def parse_order_seed(seed: int | str | None) -> int | None:
    """``--order-seed``: a non-negative integer, or ``none`` for the source's own order."""
    if seed is None or (isinstance(seed, str) and seed.strip().lower() in ("none", "source")):
        return None
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise PrismaError(
            f"--order-seed {seed!r}: give a non-negative integer, or none for the source's order"
        ) from None
    if value < 0 or isinstance(seed, bool):
        raise PrismaError(f"--order-seed {seed!r}: give a non-negative integer (or none)")
    return value


def _permutation(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def describe_order(source: Source, seed: int | None) -> dict[str, Any]:
    """The manifest's ``order``: how the inputs of ``source`` are visited for this seed."""
    if seed is None:
        return {"method": "source", "seed": None}
    if source.random_access:
        n = source.count() or 0
        digest = hashlib.sha256(_permutation(seed, n).astype("<i8").tobytes()).hexdigest()
        return {"method": "permutation", "seed": seed, "sha256": digest}
    return {"method": "shards+shard-buffer", "seed": seed, "buffer": STREAM_BUFFER}


def part_shards(source: Source, seed: int | None, part: int = 0, n_parts: int = 1) -> list[int]:
    """The tar shards (indices into the source's urls) part ``part`` of ``n_parts`` reads, in
    its visiting order: the seeded shard order, split as webdataset's ``split_by_node``
    splits a shard list (``order[part::n_parts]``)."""
    n = source.n_parts()
    order = list(range(n)) if seed is None else [int(i) for i in _permutation(seed, n)]
    return order[part::n_parts]


def stream_in_order(
    source: Source,
    seed: int | None,
    buffer: int = STREAM_BUFFER,
    part: int = 0,
    n_parts: int = 1,
    done: Mapping[int, int] | None = None,
) -> Iterator[tuple[InputRecord, Loader, tuple[int, int, bool]]]:
    """A streaming source's inputs in its visiting order (the same sequence on every call):
    the tar shards of :func:`part_shards`, each read through a shuffle buffer of ``buffer``
    inputs seeded by (seed, shard), so that a tar shard's inputs occupy consecutive positions.

    ``done`` = {shard index: inputs}: tar shards a resumed run finished, skipped without being
    opened (their positions still counted). Each record's ``index`` counts inputs in the order
    visited; ``tar_shard`` = (shard index, first position, last input of the shard?)."""
    from webdataset.filters import shuffle

    position = 0
    for shard in part_shards(source, seed, part, n_parts):
        if done and shard in done:
            position += int(done[shard])
            continue
        items: Iterator[tuple[InputRecord, Loader]] = iter(source.stream([shard]))
        if seed is not None:
            # webdataset's own shuffle stage, seeded per shard: every worker and every resume
            # sees one order, and a finished shard can be skipped unread
            items = shuffle(bufsize=buffer, initial=buffer, seed=f"{seed}/{shard}")(items)
        first = position
        pending = next(items, None)
        while pending is not None:
            following = next(items, None)
            record, load = pending
            record = replace(record, index=position)
            yield record, load, (shard, first, following is None)
            position += 1
            pending = following


# ----- inputs in worker processes -------------------------------------------------------------
class InputBatches(IterableDataset):
    """Batches of prepared inputs at visiting positions ``start, start+1, …`` (up to ``stop``).

    Batches are split over DataLoader workers by webdataset's ``split_by_worker`` (worker
    ``w`` of ``W`` takes batches ``w, w+W, …``); the DataLoader takes batches from its workers
    in turn, so the main process sees every input in visiting order whatever the number of
    workers. Each item is either a prepared tensor or a skip reason; each record carries its
    ``position`` (visiting order) and ``index`` (source order). A streaming source is read
    as part ``part`` of ``n_parts`` (see :func:`stream_in_order`), skipping the tar shards in
    ``done``.
    """

    def __init__(
        self,
        source: Source,
        prepare: Callable[[Any], Tensor],
        start: int,
        stop: int | None,
        batch_size: int,
        order_seed: int | None = DEFAULT_ORDER_SEED,
        part: int = 0,
        n_parts: int = 1,
        done: Mapping[int, int] | None = None,
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.start = start
        self.stop = stop
        self.batch_size = batch_size
        self.order_seed = order_seed
        self.part, self.n_parts = part, n_parts
        self.done = dict(done or {})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.shardlists import split_by_worker

        batches = self._indexed() if self.source.random_access else self._streamed()
        for items in split_by_worker(batches):
            yield self._prepare(items() if callable(items) else items)

    def _indexed(self) -> Iterator[Callable[[], list[tuple[int, InputRecord, Loader, Any]]]]:
        n = self.source.count() or 0
        end = n if self.stop is None else min(n, self.stop)
        order = None if self.order_seed is None else _permutation(self.order_seed, n)

        def items(low: int, high: int) -> list[tuple[int, InputRecord, Loader, Any]]:
            chosen = []
            for position in range(low, high):
                index = position if order is None else int(order[position])
                load = lambda i=index: self.source.load(i)  # noqa: E731 - bound per input
                chosen.append((position, self.source.record(index), load, None))
            return chosen

        for low in range(self.start, end, self.batch_size):
            # built only by the worker that takes the batch
            yield lambda low=low: items(low, min(low + self.batch_size, end))

    def _streamed(self) -> Iterator[list[tuple[int, InputRecord, Loader, Any]]]:
        items: list[tuple[int, InputRecord, Loader, Any]] = []
        stream = stream_in_order(
            self.source, self.order_seed, part=self.part, n_parts=self.n_parts, done=self.done
        )
        for record, load, tar_shard in stream:
            position = record.index
            if self.stop is not None and position >= self.stop:
                break
            if position < self.start:
                continue
            items.append((position, record, load, tar_shard))
            if len(items) == self.batch_size:
                yield items
                items = []
        if items:
            yield items

    def _prepare(self, items: Sequence[tuple[int, InputRecord, Loader, Any]]) -> dict[str, Any]:
        records, reasons, tensors = [], [], []
        for position, record, load, tar_shard in items:
            entry = {**record.to_dict(), "position": position}
            if tar_shard is not None:
                entry["tar_shard"] = list(tar_shard)
            try:
                raw = load()
                if isinstance(raw, Labeled):
                    raw, entry["label"] = raw.value, raw.label
                tensors.append(self.prepare(raw))
                reasons.append(None)
            except (BadImage, PrismaError, OSError, ValueError) as error:
                reasons.append(str(error) or error.__class__.__name__)
            records.append(entry)
        pixels = None
        if tensors:  # tensors are stacked; prompts stay a list of {prompt, seed}
            pixels = torch.stack(tensors) if isinstance(tensors[0], Tensor) else tensors
        return {"records": records, "reasons": reasons, "pixels": pixels}
