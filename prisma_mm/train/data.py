"""``ActivationDataModule``: batches of cached activations for training and evaluating a dictionary.

Training reads an endless, resumable stream: pass ``p`` over the train split is the reader's
epoch ``p`` (shuffled from ``seed`` and ``p``). A checkpoint records the pass and each DataLoader
worker's batches in it; a resumed run starts the reader there (the samples before are passed
over on their tar headers, only the shuffle buffer's rows are read) and sees the same batches in
the same order as an uninterrupted run. Training
length is set by ``trainer.max_steps`` (or ``SAEModule.total_tokens``), never by epochs.

``batch_size`` is the global batch (rows per optimizer step over all processes): under DDP each
of the ``world_size`` processes reads ``batch_size // world_size`` rows from its own disjoint
part of the cache, so a recipe trains on the same number of tokens per step on any hardware.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prisma_mm.errors import PrismaError

__all__ = ["ActivationDataModule"]


def _dist_world() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed, or (0, 1) outside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Tagged(IterableDataset):
    """A dataset's batches as ``(DataLoader worker, batch)``, then ``(worker, None)`` when the
    worker's part ends: the train stream keeps an uninterrupted loader's order and records
    each worker's position for a checkpoint."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[int, Tensor | None]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        for batch in self.dataset:
            yield worker, batch
        yield worker, None


def _in_worker_order(
    tagged: Iterator[tuple[int, Tensor | None]], start: list[int]
) -> Iterator[tuple[int, Tensor]]:
    """``(worker, batch)`` in the order of an uninterrupted DataLoader: round-robin over the
    workers whose part has not ended, continuing from ``start`` (each worker's batches so far).
    A resumed loader restarts its round at worker 0, so batches arriving early wait (at most
    about one per worker)."""
    counts = list(start)
    waiting: list[deque[Tensor]] = [deque() for _ in counts]
    finished = [False] * len(counts)
    while True:
        live = [w for w in range(len(counts)) if waiting[w] or not finished[w]]
        if not live:
            return
        turn = min(live, key=lambda w: (counts[w], w))
        while not waiting[turn] and not finished[turn]:
            worker, batch = next(tagged)  # the loader ends only after every worker's end mark
            if batch is None:
                finished[worker] = True
            else:
                waiting[worker].append(batch)
        if waiting[turn]:
            counts[turn] += 1
            yield turn, waiting[turn].popleft()


@dataclass
class _Pass:
    """One pass of this process's train stream: its number, the global index of its first
    batch, each worker's batches before this stream took it over (a resumed pass), the
    worker of every batch handed out since, and its length once it is complete."""

    number: int
    first_batch: int
    start: list[int]
    workers: array = field(default_factory=lambda: array("H"))
    length: int | None = None

    def position(self, batches: int) -> list[int]:
        """Each worker's batches among the pass's first ``batches``."""
        import numpy as np

        seen = np.frombuffer(self.workers, np.uint16)[: batches - sum(self.start)]
        counts = np.bincount(seen, minlength=len(self.start))
        return [int(a + b) for a, b in zip(self.start, counts)]


class TrainStream:
    """Endless iterable of this process's train batches, continuing across ``iter()`` calls.

    Lightning calls ``iter()`` once per epoch; the stream carries on where it was, so an
    ``limit_train_batches``-sized epoch never restarts the data. ``batches`` makes the one
    iterator, on the first ``iter()`` (for a cache: from the datamodule's resume position).
    """

    def __init__(self, batches: Callable[[], Iterator[Tensor]]) -> None:
        self._make = batches
        self._batches: Iterator[Tensor] | None = None

    def __iter__(self) -> Iterator[Tensor]:
        if self._batches is None:
            self._batches = self._make()
        return self._batches

    def close(self) -> None:
        """Stop the iterator (and the DataLoader workers behind it)."""
        if self._batches is not None:
            self._batches.close()  # type: ignore[attr-defined]
            self._batches = None


class EndlessTrainData:
    """``train_dataloader`` / ``teardown`` of a datamodule whose ``_train_batches()`` makes its
    endless train iterator: a fresh :class:`TrainStream` per ``fit``, closed at its end."""

    _train_stream: TrainStream | None = None
    _train_batches: Callable[[], Iterator[Tensor]]  # each datamodule's own

    def train_dataloader(self) -> TrainStream:
        """The endless train stream of this process (a fresh one per ``fit``)."""
        self._train_stream = TrainStream(self._train_batches)
        return self._train_stream

    def teardown(self, stage: str) -> None:
        """Close the train stream at the end of ``fit`` (stops its DataLoader workers)."""
        if stage == "fit" and self._train_stream is not None:
            self._train_stream.close()


class ActivationDataModule(EndlessTrainData, pl.LightningDataModule):
    """Train / eval batches of one or several hooks of an activation cache.

    Args:
        cache_dir: directory written by ``prisma-mm cache`` (manifest.json + shards).
        hooks: one hook name (batches ``[batch, d]``), or several (``[batch, n_hooks, d]``, in
            the given order): ``[input_hook, output_hook]`` for a transcoder, the layers of a
            crosscoder.
        batch_size: rows per optimizer step, over all processes.
        num_workers: DataLoader worker processes per training process.
        shuffle_buffer: rows held in the shuffle buffer (0: read in cache order).
        seed: seed of the shuffle (pass ``p`` over the data is the reader's epoch ``p``).
        eval_fraction: fraction of the cache's inputs held out for validation (0: none).
        normalize: train on ``(x - mean) * scale`` from the cache's statistics: ``True`` /
            ``center_scale`` (per-dimension mean removed, E||x||^2 = d after) or ``scale``
            (no centring); the saved dictionary has it folded in and takes raw activations.
        eval_batch_size: rows per validation batch per process (default ``batch_size``).
    """

    def __init__(
        self,
        cache_dir: str,
        hooks: str | list[str],
        batch_size: int = 4096,
        num_workers: int = 2,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        eval_fraction: float = 0.01,
        normalize: bool | Literal["center_scale", "scale"] = True,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hooks, str):
            hooks = [hooks]
        if not hooks:
            raise PrismaError("data.hooks is empty: give one hook name or a list of them")
        if batch_size <= 0:
            raise PrismaError(f"data.batch_size must be positive, got {batch_size}")
        if int(num_workers) < 0:
            raise PrismaError(f"data.num_workers must be 0 or more, got {num_workers}")
        if not 0.0 <= eval_fraction < 1.0:
            raise PrismaError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
        self.cache_dir = str(cache_dir)
        self.hooks = list(hooks)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.eval_fraction = float(eval_fraction)
        self.normalize = normalize
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self._probe: Any = None
        # resumable stream state: where the stream starts (pass, first batch's global index,
        # each worker's batches in it), this process's batch count of every completed pass, and
        # the passes handed out lately (the trained position may lag behind the prefetch)
        self._start = _Pass(0, 0, [0] * max(1, self.num_workers))
        self._pass_lengths: list[int] = []
        self._resume_pass_lengths: list[int] = []
        self._passes: deque[_Pass] = deque(maxlen=3)
        self._handed_out = 0

    # ---- what the cache holds --------------------------------------------------------------
    def _dataset(self, split: str | None, batch_size: int, **kwargs: Any) -> Any:
        from prisma_mm.cache import ActivationDataset

        if not (Path(self.cache_dir) / "manifest.json").is_file():
            raise PrismaError(
                f"data.cache_dir {self.cache_dir!r} holds no manifest.json: write the cache first "
                "with `prisma-mm cache ...` (see docs/training.md) or fix the path"
            )
        return ActivationDataset(
            self.cache_dir,
            hooks=self.hooks if len(self.hooks) > 1 else self.hooks[0],
            batch_size=batch_size,
            seed=self.seed,
            split=split,
            eval_fraction=self.eval_fraction,
            normalize=self.normalize,
            **kwargs,
        )

    @property
    def probe(self) -> Any:
        """An ActivationDataset over the train split, for its sizes, manifest and statistics."""
        if self._probe is None:
            self._probe = self._dataset("train", self.batch_size)
        return self._probe

    @property
    def d_in(self) -> int:
        """Feature size of every hook (linked into the dictionary's ``d_in``)."""
        return int(self.probe.d)

    @property
    def n_sources(self) -> int:
        """Number of hooks read together (crosscoder sources; 2 for a transcoder)."""
        return len(self.hooks)

    @property
    def manifest(self) -> dict[str, Any]:
        """The cache's manifest."""
        return dict(self.probe.manifest)

    @property
    def normalization(self) -> dict[str, dict[str, Any]]:
        """Per hook ``{"mean": ndarray [d], "scale": float}``: the model trains on
        ``(x - mean) * scale``. Empty when ``normalize`` is off."""
        return dict(self.probe.normalization) if self.normalize else {}

    @property
    def n_train_rows(self) -> int:
        """Token rows in the train split (over all processes)."""
        return int(self.probe.n_rows)

    # ---- batch sizes under DDP -------------------------------------------------------------
    def _world_size(self) -> int:
        trainer = self.trainer
        return int(trainer.world_size) if trainer is not None else _dist_world()[1]

    def per_process_batch_size(self) -> int:
        """Rows per batch read by each process: ``batch_size // world_size``."""
        world = self._world_size()
        if self.batch_size % world:
            raise PrismaError(
                f"data.batch_size {self.batch_size} is not divisible by the {world} training "
                "processes; make it a multiple so every step trains on the same rows"
            )
        return self.batch_size // world

    def _loader(self, dataset: Any) -> DataLoader:
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=pin)

    # ---- training stream -------------------------------------------------------------------
    def _train_batches(self) -> Iterator[Tensor]:
        """Endless batches of this process, starting at the resume position."""
        start = self._start
        self._pass_lengths = list(self._resume_pass_lengths[: start.number])
        self._passes.clear()
        batch_size = self.per_process_batch_size()
        current = _Pass(start.number, start.first_batch, list(start.start))
        while True:
            dataset = self._dataset(
                "train", batch_size, shuffle_buffer=self.shuffle_buffer, drop_last=True
            )
            dataset.set_epoch(current.number)
            dataset.set_position(current.start)
            self._passes.append(current)
            tagged = iter(self._loader(_Tagged(dataset)))
            for worker, batch in _in_worker_order(tagged, current.start):
                current.workers.append(worker)
                self._handed_out += 1
                yield batch
            length = sum(current.start) + len(current.workers)
            if length == 0:
                raise PrismaError(
                    f"cache {self.cache_dir!r} gave no train batch of {batch_size} rows for this "
                    "process: use a smaller data.batch_size or a larger cache"
                )
            current.length = length
            self._pass_lengths.append(length)
            current = _Pass(
                current.number + 1, current.first_batch + length, [0] * len(start.start)
            )

    def _position(self, trained: int) -> _Pass:
        """The pass holding the stream's batch number ``trained`` (the next to train on), with
        each worker's batches in it before that."""
        for handed in reversed(self._passes):
            if handed.first_batch <= trained:
                within = trained - handed.first_batch
                if handed.length is not None and within >= handed.length:
                    return _Pass(handed.number + 1, trained, [0] * len(handed.start))
                return _Pass(handed.number, handed.first_batch, handed.position(within))
        return self._start

    def val_dataloader(self) -> DataLoader | list:
        """The eval split, read once in cache order (empty when ``eval_fraction`` is 0)."""
        if self.eval_fraction == 0:
            return []
        dataset = self._dataset("eval", self.eval_batch_size, shuffle_buffer=0, drop_last=False)
        return self._loader(dataset)

    def sample(self, n_rows: int) -> Tensor:
        """The first ``n_rows`` rows of the train split in a single-process read (the same on
        every process; fewer if the split is smaller): ``[n, d]`` or ``[n, n_hooks, d]``.
        Used to initialise a dictionary."""
        dataset = self._dataset(
            "train",
            min(n_rows, self.batch_size),
            shuffle_buffer=self.shuffle_buffer,
            drop_last=False,
            rank=0,
            world_size=1,
        )
        parts, total = [], 0
        for batch in dataset:
            parts.append(batch)
            total += batch.shape[0]
            if total >= n_rows:
                break
        if not parts:
            raise PrismaError(f"cache {self.cache_dir!r} has no train rows to initialise from")
        return torch.cat(parts)[:n_rows]

    # ---- export ----------------------------------------------------------------------------
    def dictionary_metadata(self) -> dict[str, Any]:
        """Metadata recorded in the saved dictionary's cfg.json: hook(s), model, cache."""
        model = self.manifest.get("model")
        if isinstance(model, dict):
            model = model.get("name")
        return {
            "hook": self.hooks[0] if len(self.hooks) == 1 else list(self.hooks),
            "model": model,
            "cache_dir": str(Path(self.cache_dir).resolve()),
        }

    # ---- checkpoint state ----------------------------------------------------------------
    def _order_settings(self) -> dict[str, Any]:
        """What the order of the train batches depends on, besides the cache."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": _dist_world()[1],
            "num_workers": self.num_workers,
            "shuffle_buffer": self.shuffle_buffer,
            "eval_fraction": self.eval_fraction,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the train stream is: batches trained so far, each process's pass lengths, and
        each process's position (its pass and every DataLoader worker's batches in it).

        Called on every process when a checkpoint is written (it gathers the positions)."""
        trainer = self.trainer
        trained = self._handed_out
        if trainer is not None:
            trained = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        at = self._position(trained)
        mine = {"pass": at.number, "batches": at.start}
        lengths: list[list[int]] = [list(self._pass_lengths[: at.number])]
        positions: list[dict[str, Any]] = [mine]
        world = _dist_world()[1]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, (lengths[0], mine))
            lengths = [g[0] for g in gathered]
            positions = [g[1] for g in gathered]
        return {
            **self._order_settings(),
            "trained_batches": trained,
            "pass_lengths": lengths,
            "positions": positions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the train stream right after the checkpoint's trained batches: the reader
        starts at this process's recorded pass and per-worker position, reading no batch twice.

        With another seed, batch size, number of processes or workers, shuffle buffer or
        held-out fraction the order cannot be reproduced: the stream then starts a fresh pass
        after the passes every process had completed."""
        rank = _dist_world()[0]
        trained = int(state["trained_batches"])
        settings = self._order_settings()
        saved = {name: state.get(name) for name in settings}
        if saved == settings and "positions" in state:
            at = state["positions"][rank]
            self._resume_pass_lengths = [int(n) for n in state["pass_lengths"][rank]]
            batches = [int(b) for b in at["batches"]]
            self._start = _Pass(int(at["pass"]), trained - sum(batches), batches)
            self._handed_out = trained
            return
        completed = min(len(lengths) for lengths in state["pass_lengths"])
        differs = ", ".join(
            f"{name}={settings[name]} (checkpoint: {saved[name]})"
            for name in settings
            if saved[name] != settings[name]
        )
        rank_zero_warn(
            f"resuming with {differs or 'a checkpoint without reader positions'}: the data "
            "order differs from an uninterrupted run; training continues with pass "
            f"{completed} over the cache"
        )
        self._resume_pass_lengths = [0] * completed
        self._start = _Pass(completed, trained, [0] * max(1, self.num_workers))
        self._handed_out = trained
