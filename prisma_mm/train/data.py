"""``ActivationDataModule``: batches of cached activations for training and evaluating a dictionary.

Training reads an endless, resumable stream: pass ``p`` over the train split is the reader's
epoch ``p`` (shuffled from ``seed`` and ``p``), and a run resumed from a checkpoint skips exactly the batches it had already
trained on, so it sees the same batches in the same order as an uninterrupted run. Training
length is set by ``trainer.max_steps`` (or ``SAEModule.total_tokens``), never by epochs.

``batch_size`` is the global batch (rows per optimizer step over all processes): under DDP each
of the ``world_size`` processes reads ``batch_size // world_size`` rows from its own disjoint
part of the cache, so a recipe trains on the same number of tokens per step on any hardware.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError

__all__ = ["ActivationDataModule"]


def _dist_world() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed, or (0, 1) outside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _TrainStream:
    """Endless iterable of this process's train batches, continuing across ``iter()`` calls.

    Lightning calls ``iter()`` once per epoch; the stream carries on where it was, so an
    ``limit_train_batches``-sized epoch never restarts the data. The first iterator starts after
    ``datamodule._resume_batches`` batches (the ones a resumed run already trained on).
    """

    def __init__(self, datamodule: ActivationDataModule) -> None:
        self.datamodule = datamodule
        self._batches: Iterator[Tensor] | None = None

    def __iter__(self) -> Iterator[Tensor]:
        if self._batches is None:
            self._batches = self.datamodule._stream(self.datamodule._resume_batches)
        return self._batches


class ActivationDataModule(pl.LightningDataModule):
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
        # resumable stream state: batches already trained on, and this process's batch count of
        # every completed pass (so a resume skips whole passes without reading them)
        self._resume_batches = 0
        self._pass_lengths: list[int] = []
        self._resume_pass_lengths: list[int] = []
        self._train_stream: _TrainStream | None = None

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
    def _stream(self, skip: int) -> Iterator[Tensor]:
        """Endless batches of this process, starting after ``skip`` already-trained batches."""
        lengths = list(self._resume_pass_lengths)
        data_pass = 0
        while data_pass < len(lengths) and skip >= lengths[data_pass]:
            skip -= lengths[data_pass]
            data_pass += 1
        self._pass_lengths = lengths[:data_pass]
        batch_size = self.per_process_batch_size()
        rank = _dist_world()[0]
        while True:
            dataset = self._dataset(
                "train", batch_size, shuffle_buffer=self.shuffle_buffer, drop_last=True
            )
            dataset.set_epoch(data_pass)
            batches = iter(self._loader(dataset))
            count = 0
            if skip:
                bar = tqdm(
                    total=skip, desc="skipping trained batches", disable=rank != 0, leave=False
                )
                for _ in range(skip):
                    if next(batches, None) is None:
                        break
                    count += 1
                    bar.update()
                bar.close()
                skip = 0
            for batch in batches:
                count += 1
                yield batch
            if count == 0:
                raise PrismaError(
                    f"cache {self.cache_dir!r} gave no train batch of {batch_size} rows for this "
                    "process: use a smaller data.batch_size or a larger cache"
                )
            self._pass_lengths.append(count)
            data_pass += 1

    def train_dataloader(self) -> _TrainStream:
        """The endless train stream of this process (a fresh one per ``fit``)."""
        self._train_stream = _TrainStream(self)
        return self._train_stream

    def teardown(self, stage: str) -> None:
        """Close the train stream at the end of ``fit`` (stops its DataLoader workers)."""
        stream = self._train_stream
        if stage == "fit" and stream is not None and stream._batches is not None:
            stream._batches.close()  # type: ignore[attr-defined]
            stream._batches = None

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

    # ---- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the train stream is: batches trained so far, and each process's pass lengths.

        Called on every process when a checkpoint is written (it gathers the pass lengths)."""
        trainer = self.trainer
        trained = 0
        if trainer is not None:
            trained = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        lengths: list[list[int]] = [list(self._pass_lengths)]
        rank, world = _dist_world()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, list(self._pass_lengths))
            lengths = gathered
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": world,
            "trained_batches": trained,
            "pass_lengths": lengths,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the train stream right after the checkpoint's trained batches.

        With another seed, batch size or number of processes the order cannot be reproduced:
        the stream then starts a fresh pass after the passes every process had completed."""
        rank, world = _dist_world()
        saved = (state["seed"], state["batch_size"], state["world_size"])
        if saved == (self.seed, self.batch_size, world):
            self._resume_batches = int(state["trained_batches"])
            self._resume_pass_lengths = [int(n) for n in state["pass_lengths"][rank]]
            return
        completed = min(len(lengths) for lengths in state["pass_lengths"])
        rank_zero_warn(
            f"resuming with seed={self.seed}, batch_size={self.batch_size}, {world} process(es) "
            f"instead of the checkpoint's seed={saved[0]}, batch_size={saved[1]}, "
            f"{saved[2]} process(es): the data order differs from an uninterrupted run; "
            f"training continues with pass {completed} over the cache"
        )
        # zero-length passes make the stream skip straight to pass `completed`
        self._resume_pass_lengths = [0] * completed
        self._resume_batches = 0
