"""``ModelActivationDataModule``: train a dictionary straight from a model, with no cache.

A :class:`~prisma_mm.hooks.HookedModel` runs over a data source (anything
:func:`~prisma_mm.data.sources.open_source` opens: folders, class trees, list files, tar
shards, torch Datasets) in the training process, on the training device; the token rows of its
hooks enter a bounded shuffle buffer (the cache reader's row buffer) that is refilled from new
inputs as batches drain it. Batches are what :class:`~prisma_mm.train.data.ActivationDataModule`
gives :class:`~prisma_mm.train.module.SAEModule`: ``[batch, d]`` (one hook) or
``[batch, n_hooks, d]``, normalized as ``(x - mean) * scale`` with the statistics of the first
``stats_inputs`` train inputs (the same formula as a cache's statistics).

Inputs are split with no duplicates: held-out inputs (``eval_score(key) < eval_fraction``, the
cache reader's rule) never train; train inputs are dealt to ranks, then to each rank's
DataLoader workers (which decode and preprocess; the forward stays in the training process).
Pass ``p`` over the data visits the inputs in a permutation seeded by ``(seed, p)``; tar
sources are split by shard (webdataset's ``split_by_node`` / ``split_by_worker`` rule) when
there are enough shards, else by input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prisma_mm.cache import manifest as fmt
from prisma_mm.cache.inputs import PREPARERS
from prisma_mm.cache.reader import RowBuffer, eval_score, normalization
from prisma_mm.cache.stats import RunningMoments, sample_moments
from prisma_mm.cache.writer import parse_hooks, parse_tokens, token_index, token_rows
from prisma_mm.data.images import BadImage
from prisma_mm.data.sources import Labeled, Source, open_source
from prisma_mm.errors import PrismaError
from prisma_mm.train.data import EndlessTrainData

__all__ = ["ModelActivationDataModule", "ModelInputs"]


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ModelInputs(IterableDataset):
    """Prepared input batches of one rank's share of a source's split, for one pass.

    Yields ``{"keys": list[str], "pixels": Tensor [n, 3, H, W]}`` (inputs that fail to decode
    are dropped). Train inputs of pass ``epoch`` are visited in a permutation seeded by
    ``(seed, epoch)``; ``split="eval"`` visits the held-out inputs in source order. Rank
    ``rank`` of ``world_size`` takes every ``world_size``-th input, and DataLoader worker ``w``
    of ``W`` every ``W``-th of the rank's batches; a tar source with at least
    ``world_size * W`` shards gives each worker of each rank whole shards of its own (with at
    least ``world_size``, each rank), so no process reads another's shards.
    """

    def __init__(
        self,
        source: Source,
        prepare: Any,
        split: Literal["train", "eval"],
        eval_fraction: float,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        limit: int | None = None,
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.split = split
        self.eval_fraction = eval_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.limit = limit  # at most this many inputs of this rank (the statistics' sample)

    def _wanted(self, key: str) -> bool:
        return (eval_score(key) < self.eval_fraction) == (self.split == "eval")

    def _records(self, worker: int, n_workers: int) -> Iterator[tuple[str, Any, bool]]:
        """``(key, load, split_by_batch)`` of this rank's inputs: ``split_by_batch`` when the
        workers still share them batch by batch (False: this worker's own tar shards)."""
        shuffle = self.split == "train"
        if self.source.random_access:
            n = self.source.count() or 0
            order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n)
                if shuffle
                else np.arange(n)
            )
            mine = 0
            for index in order.tolist():
                record = self.source.record(index)
                if not self._wanted(record.key):
                    continue
                mine += 1
                if (mine - 1) % self.world_size == self.rank:
                    yield record.key, (lambda i=index: self.source.load(i)), True
            return
        parts = list(range(self.source.n_parts()))
        if shuffle:
            parts = np.random.default_rng([self.seed, self.epoch]).permutation(parts).tolist()
        # webdataset's split_by_node, then split_by_worker: no worker reads another's shards
        by_worker = len(parts) >= self.world_size * n_workers
        by_shard = len(parts) >= self.world_size
        if by_worker:
            parts = parts[self.rank * n_workers + worker :: self.world_size * n_workers]
        elif by_shard:
            parts = parts[self.rank :: self.world_size]
        mine = 0
        for record, load in self.source.stream(parts):
            if not self._wanted(record.key):
                continue
            mine += 1
            if by_shard or (mine - 1) % self.world_size == self.rank:
                yield record.key, load, not by_worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        keys: list[str] = []
        pixels: list[Tensor] = []
        batch = taken = 0
        for key, load, by_batch in self._records(worker, n_workers):
            if self.limit is not None and taken >= self.limit:
                break
            taken += 1
            # batch b of this rank goes to worker b % W (unless the worker has its own shards)
            mine = not by_batch or batch % n_workers == worker
            if mine:
                try:
                    raw = load()
                    pixels.append(self.prepare(raw.value if isinstance(raw, Labeled) else raw))
                    keys.append(key)
                except (BadImage, PrismaError, OSError, ValueError):
                    pass  # an unreadable input is skipped, as the cache writer skips it
            if taken % self.batch_size == 0:
                if keys:
                    yield {"keys": keys, "pixels": torch.stack(pixels)}
                keys, pixels = [], []
                batch += 1
        if keys:
            yield {"keys": keys, "pixels": torch.stack(pixels)}


class _EvalStream:
    """The eval split, one pass per ``iter()`` (so each validation runs the model again)."""

    def __init__(self, datamodule: ModelActivationDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[Tensor]:
        dm = self.datamodule
        rank, world = dm._rank_world()
        return dm._rows_stream("eval", dm.eval_batch_size, rank, world, False, False)


class ModelActivationDataModule(EndlessTrainData, pl.LightningDataModule):
    """Train / eval batches of activations computed by a model on the fly (no cache).

    Args:
        model: a model card name (``prisma-mm zoo list``), built with ``weights`` / ``model_seed``
            / ``img_size`` on the training device; or a :class:`~prisma_mm.hooks.HookedModel`.
        data: what ``prisma-mm cache --data`` takes (a folder, class tree, list file, tar
            pattern; in Python also a torch Dataset or a Source).
        hooks: one hook (batches ``[batch, d]``) or several of the same width
            (``[batch, n_hooks, d]``, rows aligned): several dictionaries from one forward,
            a transcoder's input and output, a crosscoder's layers.
        tokens: ``all``, ``cls``, ``patches`` or token indices, as the cache's ``--tokens``.
        batch_size: rows per optimizer step, over all processes.
        input_batch_size: inputs per model forward.
        num_workers: DataLoader workers decoding inputs, per training process.
        shuffle_buffer: rows held in the shuffle buffer (rows of many inputs mix in it).
        seed: seed of the input order (pass ``p``: ``(seed, p)``) and of the row draws.
        eval_fraction: inputs held out for validation, by key hash (the cache reader's rule).
        normalize: ``True`` / ``center_scale``, ``scale`` or False (see
            :func:`~prisma_mm.cache.reader.normalization`).
        stats_inputs: train inputs whose activations give the normalization statistics.
        buffer_dtype: storage of the shuffle buffer (``float32``, ``float16``, ``bfloat16``).
        eval_batch_size: rows per validation batch per process (default ``batch_size``).
    """

    def __init__(
        self,
        model: Any,
        data: Any,
        hooks: str | list[str],
        weights: str | None = "pretrained",
        model_seed: int = 0,
        img_size: int | None = None,
        tokens: str | list[int] = "all",
        batch_size: int = 4096,
        input_batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        eval_fraction: float = 0.01,
        normalize: bool | Literal["center_scale", "scale"] = True,
        stats_inputs: int = 256,
        buffer_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.hooks = parse_hooks([hooks] if isinstance(hooks, str) else hooks)
        self.single = isinstance(hooks, str)
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("input_batch_size", input_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("stats_inputs", stats_inputs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PrismaError(f"data.{name}={value!r}: give an integer >= {low}")
        if not 0.0 <= eval_fraction < 1.0:
            raise PrismaError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
        if normalize not in (False, True, "center_scale", "scale"):
            raise PrismaError(
                f"data.normalize={normalize!r}: use true, center_scale, scale or false"
            )
        self.model_spec = model
        self.weights = weights
        self.model_seed = int(model_seed)
        self.img_size = img_size
        self.token_spec = parse_tokens(tokens)
        self.batch_size = batch_size
        self.input_batch_size = input_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = int(seed)
        self.eval_fraction = float(eval_fraction)
        self.normalize = normalize
        self.stats_inputs = stats_inputs
        self.buffer_dtype = fmt.canonical_dtype(buffer_dtype)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.source = open_source(data)
        if self.source.kind not in PREPARERS:
            raise PrismaError(
                f"training from a model cannot prepare {self.source.kind!r} inputs yet "
                f"(known: {sorted(PREPARERS)})"
            )
        self._model: Any = None
        self._index: dict[str, list[int]] = {}
        self._d: int | None = None
        self._normalization: dict[str, dict[str, Any]] | None = None
        self._start_pass = 0
        self._passes = 0
        self.forward_calls = 0  # model forwards run (training, statistics, samples, eval)
        # set to a list to record the keys of the train inputs this process runs (checks)
        self.seen_keys: list[str] | None = None

    # ---- the model ---------------------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    @property
    def model(self) -> Any:
        """The HookedModel, built on first use and probed once; on the trainer's device once
        there is a trainer (the CLI builds it before, for ``d_in``)."""
        if self._model is not None and self._model.device != self._device():
            self._model.module.to(self._device())
        if self._model is None:
            spec = self.model_spec
            if isinstance(spec, str):
                from prisma_mm.zoo.registry import load_model

                spec = load_model(
                    spec,
                    weights=self.weights,
                    device=self._device(),
                    img_size=self.img_size,
                    seed=self.model_seed,
                )
            elif spec.device != self._device():
                spec.module.to(self._device())
            for hook in self.hooks:
                spec.hook_point(hook)  # an unknown hook: one line, before any work
            self._model = spec
            self._probe()
        return self._model

    def _probe(self) -> None:
        model = self._model
        height, width = model.layout.input_size
        with torch.inference_mode():
            probe = torch.zeros(1, 3, height, width, device=model.device, dtype=model.dtype)
            _, cache = model.run_with_cache(probe, self.hooks, stop_at_layer="auto")
        widths = set()
        for hook in self.hooks:
            act = token_rows(cache[hook])
            self._index[hook] = token_index(self.token_spec, hook, int(act.shape[1]), model.layout)
            widths.add((len(self._index[hook]), int(act.shape[2])))
        if len(widths) != 1:
            raise PrismaError(
                f"hooks {self.hooks} give [tokens, d] of different shapes {sorted(widths)}: rows "
                "are aligned across hooks of one shape; train them from separate data modules"
            )
        self._n_tokens, self._d = next(iter(widths))

    def _forward(self, pixels: Tensor) -> np.ndarray:
        """Activations of one input batch: ``[n, tokens, n_hooks, d]`` in buffer storage."""
        model = self.model
        with torch.inference_mode():
            _, cache = model.run_with_cache(
                pixels.to(model.device, model.dtype), self.hooks, stop_at_layer="auto"
            )
        self.forward_calls += 1
        acts = []
        for hook in self.hooks:
            act = token_rows(cache[hook])
            if len(self._index[hook]) != act.shape[1]:
                act = act[:, self._index[hook]]
            acts.append(act)
        stacked = torch.stack(acts, dim=2).to("cpu", fmt.TORCH_DTYPES[self.buffer_dtype])
        return fmt.to_storage(stacked.contiguous(), self.buffer_dtype)

    # ---- what the data is --------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        """Feature size of every hook (linked into the dictionary's ``d_in``)."""
        self.model  # noqa: B018 - builds and probes the model
        return int(self._d)  # type: ignore[arg-type]

    @property
    def n_sources(self) -> int:
        """Number of hooks read together."""
        return len(self.hooks)

    @property
    def normalization(self) -> dict[str, dict[str, Any]]:
        """Per hook ``{"mean": ndarray [d], "scale": float}`` (empty when ``normalize`` is off),
        from the first ``stats_inputs`` train inputs (the same on every process)."""
        if not self.normalize:
            return {}
        if self._normalization is None:
            moments = {h: RunningMoments(self.d_in) for h in self.hooks}
            left = self.stats_inputs  # workers with their own shards each stop at the limit
            for _, rows in self._input_rows("train", 0, 0, 1, limit=self.stats_inputs):
                if left <= 0:
                    break
                x = fmt.to_torch(rows[:left], self.buffer_dtype)
                left -= x.shape[0]
                for i, hook in enumerate(self.hooks):
                    parts = sample_moments(x[:, :, i].float())
                    for s in range(x.shape[0]):
                        moments[hook].merge(
                            self._n_tokens,
                            parts["mean"][s].numpy(),
                            parts["m2"][s].numpy(),
                            float(parts["norm_sum"][s]),
                            float(parts["sq_norm_sum"][s]),
                        )
            stats = {"stats": {h: m.to_dict() for h, m in moments.items()}}
            self._normalization = {}
            for hook in self.hooks:
                mean, scale = normalization(stats, hook, self.normalize)
                self._normalization[hook] = {"mean": mean, "scale": scale}
        return self._normalization

    def _normalizer(self) -> tuple[Tensor, Tensor] | None:
        norm = self.normalization
        if not norm:
            return None
        mean = torch.tensor(np.stack([norm[h]["mean"] for h in self.hooks]), dtype=torch.float32)
        scale = torch.tensor([[norm[h]["scale"]] for h in self.hooks], dtype=torch.float32)
        return mean, scale

    # ---- streams -----------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return _dist_world()

    def _input_rows(
        self, split: Literal["train", "eval"], epoch: int, rank: int, world: int,
        limit: int | None = None, workers: int | None = None,
    ) -> Iterator[tuple[list[str], np.ndarray]]:  # fmt: skip
        """``(keys, rows [n, tokens, n_hooks, d])`` per forward over one pass of a split."""
        self.model  # noqa: B018 - built in this process before workers start
        inputs = ModelInputs(
            self.source,
            PREPARERS[self.source.kind](self.model),
            split,
            self.eval_fraction,
            self.input_batch_size,
            self.seed,
            epoch,
            rank,
            world,
            limit,
        )
        workers = self.num_workers if workers is None else workers
        loader = DataLoader(inputs, batch_size=None, num_workers=workers)
        for batch in loader:
            yield batch["keys"], self._forward(batch["pixels"])

    def _emit(self, rows: np.ndarray, normalizer: tuple[Tensor, Tensor] | None) -> Tensor:
        # a copy: the rows are the buffer's scratch, reused by its next take
        acts = fmt.to_torch(rows, self.buffer_dtype).to(torch.float32, copy=True)
        if normalizer is not None:
            acts.sub_(normalizer[0]).mul_(normalizer[1])
        return acts[:, 0] if self.single else acts

    def _rows_stream(
        self, split: Literal["train", "eval"], batch_size: int, rank: int, world: int,
        shuffle: bool, endless: bool, record_keys: list[str] | None = None,
    ) -> Iterator[Tensor]:  # fmt: skip
        """Batches ``[batch, d]`` / ``[batch, n_hooks, d]`` through the shuffle buffer."""
        normalizer = self._normalizer()
        threshold = max(self.shuffle_buffer, batch_size) if shuffle else batch_size
        n_hooks, d = len(self.hooks), self.d_in
        buffer = RowBuffer(
            threshold + self.input_batch_size * self._n_tokens,
            n_hooks,
            d,
            np.dtype(fmt.STORAGE_DTYPES[self.buffer_dtype]),
        )
        rng = np.random.default_rng([self.seed, rank, 2]) if shuffle else None
        tokens = np.arange(self._n_tokens)
        epoch = self._start_pass
        while True:
            got = False
            for keys, rows in self._input_rows(split, epoch, rank, world):
                got = True
                if record_keys is not None:
                    record_keys.extend(keys)
                for sample in range(rows.shape[0]):
                    buffer.append(list(rows[sample].transpose(1, 0, 2)), None, 0, tokens)
                while buffer.size >= threshold:
                    yield self._emit(buffer.take(batch_size, rng)[0], normalizer)
            if split == "train":
                self._passes = epoch + 1
            if not got and split == "train":
                raise PrismaError(
                    f"data source {self.source.describe()} gave process {rank} of {world} no "
                    f"{split} input: use a larger source or fewer processes"
                )
            if not endless:
                break
            epoch += 1
        while buffer.size > 0:
            yield self._emit(buffer.take(min(batch_size, buffer.size), rng)[0], normalizer)

    def per_process_batch_size(self) -> int:
        """Rows per batch of each process: ``batch_size // world_size``."""
        world = self._rank_world()[1]
        if self.batch_size % world:
            raise PrismaError(
                f"data.batch_size {self.batch_size} is not divisible by the {world} training "
                "processes; make it a multiple so every step trains on the same rows"
            )
        return self.batch_size // world

    def _train_batches(self) -> Iterator[Tensor]:
        rank, world = self._rank_world()
        yield from self._rows_stream(
            "train", self.per_process_batch_size(), rank, world, shuffle=True, endless=True,
            record_keys=self.seen_keys,
        )  # fmt: skip

    def val_dataloader(self) -> _EvalStream | list:
        """The held-out inputs of this process, every row once, in order, run through the
        model at each validation (empty when ``eval_fraction`` is 0)."""
        if self.eval_fraction == 0:
            return []
        return _EvalStream(self)

    def sample(self, n_rows: int) -> Tensor:
        """``n_rows`` rows of the train split through the shuffle buffer, read as one process
        (the same on every process): ``[n, d]`` or ``[n, n_hooks, d]``. Initialises a dictionary."""
        parts, total = [], 0
        stream = self._rows_stream("train", min(n_rows, self.batch_size), 0, 1, True, False)
        for batch in stream:
            parts.append(batch)
            total += batch.shape[0]
            if total >= n_rows:
                break
        stream.close()
        return torch.cat(parts)[:n_rows]

    # ---- export and checkpoints --------------------------------------------------------------
    def dictionary_metadata(self) -> dict[str, Any]:
        """Metadata recorded in the saved dictionary's cfg.json: hook(s), model, data."""
        card = getattr(self.model, "card", None)
        return {
            "hook": self.hooks[0] if len(self.hooks) == 1 else list(self.hooks),
            "model": getattr(card, "name", None),
            "data": self.source.describe(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The passes over the data begun so far (a resume starts the next one)."""
        return {"seed": self.seed, "passes": max(self._passes, self._start_pass + 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume with a fresh pass after those the checkpoint had begun (the rows of a
        half-finished pass are not replayed: the order differs from an uninterrupted run)."""
        self._start_pass = int(state.get("passes", 0))
        rank_zero_warn(
            f"training from a model resumes with pass {self._start_pass} over the data: the "
            "rows differ from an uninterrupted run's (a cache resumes exactly)"
        )
