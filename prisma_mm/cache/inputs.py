"""The inputs of the cache writer: the seeded visiting order, and batches of prepared inputs
decoded in DataLoader workers.

The writer visits a source's inputs in a seeded random order, so that consecutive inputs (and
hence shards) of a class-sorted data set are already mixed:

- a random-access source (folder, class tree, list file, torch Dataset) is visited in one
  random permutation of all its inputs, ``numpy.random.default_rng(seed).permutation(n)``;
  the manifest records the seed and the permutation's sha256, so a resume on a machine whose
  numpy would permute differently is refused rather than silently mixing two orders;
- a streaming source (webdataset tar shards, whose inputs can only be read front to back) is
  read shard by shard in a seeded random shard order, through a seeded shuffle buffer of
  ``STREAM_BUFFER`` inputs (webdataset's ``shuffle`` stage, made reproducible);
- ``seed=None`` keeps the source's own order.

Position ``p`` of the visiting order is what the manifest counts (``inputs_done``, shard
``inputs`` ranges); every sample also keeps its ``index`` in the source's own order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

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
    return {"method": "shards+buffer", "seed": seed, "buffer": STREAM_BUFFER}


def stream_in_order(
    source: Source, seed: int | None, buffer: int = STREAM_BUFFER
) -> Iterator[tuple[InputRecord, Loader]]:
    """A streaming source's inputs in its visiting order: shards in a seeded random order,
    then a seeded shuffle buffer of ``buffer`` inputs (the same sequence on every call)."""
    if seed is None:
        yield from source.stream()
        return
    from webdataset.filters import shuffle

    parts = [int(i) for i in _permutation(seed, source.n_parts())]
    # webdataset's own shuffle stage, seeded, so every worker and every resume sees one order
    yield from shuffle(bufsize=buffer, initial=buffer, seed=seed)(iter(source.stream(parts)))


# ----- inputs in worker processes -------------------------------------------------------------
class InputBatches(IterableDataset):
    """Batches of prepared inputs at visiting positions ``start, start+1, …`` (up to ``stop``).

    Worker ``w`` of ``W`` yields batches ``w, w+W, w+2W, …``; the DataLoader takes batches
    from its workers in turn, so the main process sees every input in visiting order whatever
    the number of workers. Each item is either a prepared tensor or a skip reason; each
    record carries its ``position`` (visiting order) and ``index`` (source order).
    """

    def __init__(
        self,
        source: Source,
        prepare: Callable[[Any], Tensor],
        start: int,
        stop: int | None,
        batch_size: int,
        order_seed: int | None = DEFAULT_ORDER_SEED,
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.start = start
        self.stop = stop
        self.batch_size = batch_size
        self.order_seed = order_seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.source.random_access:
            yield from self._indexed(worker, n_workers)
        else:
            yield from self._streamed(worker, n_workers)

    def _indexed(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        n = self.source.count() or 0
        end = n if self.stop is None else min(n, self.stop)
        order = None if self.order_seed is None else _permutation(self.order_seed, n)
        batch = worker
        while (low := self.start + batch * self.batch_size) < end:
            high = min(low + self.batch_size, end)
            items = []
            for position in range(low, high):
                index = position if order is None else int(order[position])
                load = lambda i=index: self.source.load(i)  # noqa: E731 - bound per input
                items.append((position, self.source.record(index), load))
            yield self._prepare(items)
            batch += n_workers

    def _streamed(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        items: list[tuple[int, InputRecord, Loader]] = []
        for position, (record, load) in enumerate(stream_in_order(self.source, self.order_seed)):
            if self.stop is not None and position >= self.stop:
                break
            offset = position - self.start
            if offset < 0 or (offset // self.batch_size) % n_workers != worker:
                continue
            items.append((position, record, load))
            if len(items) == self.batch_size:
                yield self._prepare(items)
                items = []
        if items:
            yield self._prepare(items)

    def _prepare(self, items: Sequence[tuple[int, InputRecord, Loader]]) -> dict[str, Any]:
        records, reasons, tensors = [], [], []
        for position, record, load in items:
            entry = {**record.to_dict(), "position": position}
            try:
                raw = load()
                if isinstance(raw, Labeled):
                    raw, entry["label"] = raw.value, raw.label
                tensors.append(self.prepare(raw))
                reasons.append(None)
            except (BadImage, PrismaError, OSError, ValueError) as error:
                reasons.append(str(error) or error.__class__.__name__)
            records.append(entry)
        pixels = torch.stack(tensors) if tensors else None
        return {"records": records, "reasons": reasons, "pixels": pixels}
