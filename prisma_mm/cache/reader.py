"""Read an activation cache as a stream of token-row batches for training.

:class:`ActivationDataset` is an ``IterableDataset``: it keeps ``open_shards`` shards open
and reads their samples interleaved at random (a random merge), keeps at most
``shuffle_buffer`` rows in memory, draws each batch uniformly from them, and yields
``[batch, d]`` (one hook) or ``[batch, n_hooks, d]`` (several hooks, rows aligned: the same
input and token for every hook). Rows are split disjointly across DataLoader workers and
distributed ranks: by shard when there are at least as many shards as
``world_size * num_workers``, else by row, so every row is read once per epoch. See
docs/cache.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from prisma_mm.cache import manifest as fmt
from prisma_mm.errors import PrismaError

DEFAULT_SHUFFLE_BUFFER = 1 << 17  # rows; at d=768 fp16 that is 192 MiB
DEFAULT_OPEN_SHARDS = 16  # shards read interleaved, per reader (DataLoader worker)
SPLITS = (None, "train", "eval")
NORMALIZATIONS = (False, True, "center_scale", "scale")


def eval_score(key: str) -> float:
    """A key's place in [0, 1): samples with ``eval_score(key) < eval_fraction`` are held out."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def normalization(
    manifest: dict[str, Any], hook: str, mode: bool | str = True
) -> tuple[np.ndarray, float]:
    """``(mean [d], scale)`` with normalized rows ``(x - mean) * scale``.

    ``center_scale`` (or True): mean = the cache's per-dimension mean μ and
    scale = sqrt(d / Σ_j var_j), so E||x - μ||² · scale² = d. ``scale``: mean = 0 and
    scale = sqrt(d / E||x||²), so E||x · scale||² = d.
    """
    stats = manifest.get("stats", {}).get(hook)
    if not stats or not stats.get("count"):
        raise PrismaError(f"the cache has no statistics for {hook!r}: it holds no samples yet")
    mean = np.asarray(stats["mean"], np.float64)
    d = mean.size
    if mode == "scale":
        return np.zeros(d), float(np.sqrt(d / stats["mean_sq_norm"]))
    total_var = float(np.sum(stats["var"]))
    if total_var <= 0:
        raise PrismaError(f"hook {hook!r} has zero variance in this cache: cannot normalize")
    return mean, float(np.sqrt(d / total_var))


class RowBuffer:
    """Rows ``[capacity, n_hooks, d]`` in storage dtype, with their sample id and their place
    in the sample (row offset).

    A random batch leaves by one gather; the positions it frees are refilled by the next
    samples' rows (one scatter), so every row is copied once in and once out, and no Python
    runs per row. Rows ``[0, n)`` are valid except the free positions in ``holes``.
    """

    def __init__(self, capacity: int, n_hooks: int, d: int, dtype: np.dtype) -> None:
        self.data = np.empty((capacity, n_hooks, d), dtype)
        self.data.fill(0)  # fault the pages in bulk: first writes row by row can be far slower
        # each row as one opaque element: gathers and scatters become one memcpy per row
        self.row_type = np.dtype((np.void, n_hooks * d * self.data.itemsize))
        self.rows = self._as_rows(self.data)
        self.sample = np.zeros(capacity, np.int64)
        self.token = np.zeros(capacity, np.int64)
        self.holes = np.zeros(0, np.int64)
        self.scratch: np.ndarray | None = None
        self.n = 0

    def _as_rows(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(len(array), -1).view(self.row_type).reshape(len(array))

    @property
    def size(self) -> int:
        """Rows held."""
        return self.n - len(self.holes)

    def _block(self, arrays: Sequence[np.ndarray], rows: np.ndarray | None) -> np.ndarray:
        picked = [a if rows is None else a[rows] for a in arrays]
        block = np.stack(picked, axis=1) if len(picked) > 1 else picked[0][:, None]
        return self._as_rows(np.ascontiguousarray(block))

    def append(self, arrays: Sequence[np.ndarray] | None, rows: np.ndarray | None, sample: int,
               offsets: np.ndarray) -> None:  # fmt: skip
        """Add one sample's rows (``arrays``: ``[tokens, d]`` per hook, or None to track only
        which rows are where, as when skipping to a position; ``rows``: the subset kept;
        ``offsets``: every row's place in its sample, ``arange(tokens)``)."""
        block = None if arrays is None else self._block(arrays, rows)
        offsets = offsets if rows is None else offsets[rows]
        fill = min(len(offsets), len(self.holes))
        if fill:
            where, self.holes = self.holes[:fill], self.holes[fill:]
            if block is not None:
                self.rows[where] = block[:fill]
            self.sample[where] = sample
            self.token[where] = offsets[:fill]
        end = self.n + len(offsets) - fill
        if block is not None:
            self.rows[self.n : end] = block[fill:]
        self.sample[self.n : end] = sample
        self.token[self.n : end] = offsets[fill:]
        self.n = end

    def valid(self) -> np.ndarray:
        """Positions of the rows held."""
        mask = np.ones(self.n, bool)
        mask[self.holes] = False
        return np.flatnonzero(mask)

    def put(self, positions: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
        """Fill ``positions`` (rows of one sample) from the sample's ``arrays``."""
        self.rows[positions] = self._block(arrays, self.token[positions])

    def _compact(self, data: bool = True) -> None:
        """Move tail rows into the holes so that rows ``[0, size)`` are all valid."""
        rest = self.size
        holes = self.holes[self.holes < rest]
        tail = np.ones(self.n - rest, bool)
        tail[self.holes[self.holes >= rest] - rest] = False
        movers = rest + np.flatnonzero(tail)
        if data:
            self.rows[holes] = self.rows[movers]
        self.sample[holes] = self.sample[movers]
        self.token[holes] = self.token[movers]
        self.n, self.holes = rest, self.holes[:0]

    def take(self, count: int, rng: np.random.Generator | None,
             data: bool = True) -> tuple[np.ndarray, ...]:  # fmt: skip
        """Remove ``count`` rows (uniformly at random with ``rng``, else the oldest) and return
        ``(rows [count, n_hooks, d], sample ids, row offsets)``; ``rows`` is a scratch array
        reused by the next call, so copy it out before taking again. ``data=False``: the
        same draw, moving ids only (the rows are not held: skipping to a position)."""
        if len(self.holes):
            self._compact(data)
        n = self.n
        if self.scratch is None or len(self.scratch) < count:
            self.scratch = np.zeros((count, *self.data.shape[1:]), self.data.dtype)
        rows = self.scratch[:count]
        if rng is None:
            if data:
                rows[...] = self.data[:count]
            out = (rows, self.sample[:count].copy(), self.token[:count].copy())
            rest = n - count
            if data:
                self.rows[:rest] = self.rows[count:n]
            self.sample[:rest] = self.sample[count:n]
            self.token[:rest] = self.token[count:n]
            self.n = rest
            return out
        chosen = rng.choice(n, size=count, replace=False)
        if data:
            np.take(self.rows, chosen, out=self._as_rows(rows), mode="clip")
        out = (rows, self.sample[chosen], self.token[chosen])
        if count == n:
            self.n = 0
        else:
            self.holes = chosen
        return out


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty tensor; inside a DataLoader worker it is allocated in shared memory, so
    handing it to the main process needs no further copy (as torch's default_collate does)."""
    if get_worker_info() is not None:
        try:
            storage = (
                torch.empty(0, dtype=dtype)
                ._typed_storage()
                ._new_shared(math.prod(shape), device="cpu")
            )
            return torch.empty(0, dtype=dtype).new(storage).view(shape)
        except (AttributeError, RuntimeError):  # a torch without this private API
            pass
    return torch.empty(shape, dtype=dtype)


class ActivationDataset(IterableDataset):
    """Token rows of one or several hooks of a cache, in batches.

    Yields ``Tensor [batch, d]`` when ``hooks`` is one name, ``[batch, n_hooks, d]`` when it
    is a list (hook order kept), in ``dtype``; with ``provenance=True`` yields
    ``(acts, keys: list[str], token_index: LongTensor [batch])``. Use it with
    ``DataLoader(ds, batch_size=None, num_workers=...)``.

    ``open_shards`` shards are read at once, their samples interleaved at random; their rows
    enter a buffer of ``shuffle_buffer`` rows and batches are drawn from it at random
    (``shuffle_buffer=0``: read in order, one shard at a time); the order is a function of
    ``seed``, the epoch (:meth:`set_epoch`), the rank and the worker. ``split``: None (all rows), ``"train"`` or ``"eval"`` (the
    samples whose key hash falls below ``eval_fraction``). ``normalize``: False, True /
    ``"center_scale"`` or ``"scale"`` (see :func:`normalization`). ``rank`` /
    ``world_size`` default to torch.distributed or the RANK / WORLD_SIZE variables.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        hooks: str | Sequence[str] | None = None,
        batch_size: int = 4096,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        seed: int = 0,
        open_shards: int = DEFAULT_OPEN_SHARDS,
        split: str | None = None,
        eval_fraction: float = 0.01,
        normalize: bool | str = False,
        provenance: bool = False,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.manifest = fmt.read_manifest(self.cache_dir)
        cached = list(self.manifest["hooks"])
        if hooks is None:
            if len(cached) != 1:
                raise PrismaError(f"the cache holds hooks {cached}: pass hooks= to choose")
            hooks = cached[0]
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.hooks:
            raise PrismaError("hooks is an empty list: name at least one cached hook")
        for hook in self.hooks:
            if hook not in cached:
                raise _unknown_hook(hook, cached)
        shapes = {tuple(self.manifest["shapes"][h]) for h in self.hooks}
        if len(shapes) != 1:
            detail = {h: self.manifest["shapes"][h] for h in self.hooks}
            raise PrismaError(
                f"hooks {self.hooks} have different [tokens, d] shapes {detail}: rows can only "
                "be aligned across hooks of the same shape"
            )
        self.n_tokens, self.d = next(iter(shapes))
        if split not in SPLITS:
            raise PrismaError(f"split={split!r}: use None, 'train' or 'eval'")
        if not 0.0 <= eval_fraction < 1.0:
            raise PrismaError(f"eval_fraction={eval_fraction}: use a fraction in [0, 1)")
        if normalize not in NORMALIZATIONS:
            raise PrismaError(
                f"normalize={normalize!r}: use False, True, 'center_scale' or 'scale'"
            )
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("open_shards", open_shards, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PrismaError(f"{name}={value!r}: give an integer >= {low}")
        self.batch_size = batch_size
        self.open_shards = open_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split = split
        self.eval_fraction = eval_fraction
        self.provenance = provenance
        self.drop_last = drop_last
        self.dtype = dtype
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position: list[int] = []  # batches per DataLoader worker to start after
        self.normalize = normalize
        self.normalization: dict[str, dict[str, Any]] = {}
        if normalize:
            for hook in self.hooks:
                mean, scale = normalization(self.manifest, hook, normalize)
                self.normalization[hook] = {"mean": mean, "scale": scale}
            self._mean = torch.tensor(
                np.stack([self.normalization[h]["mean"] for h in self.hooks]), dtype=dtype
            )
            self._scale = torch.tensor(
                [[self.normalization[h]["scale"]] for h in self.hooks], dtype=dtype
            )
        self._members = [f"{self.manifest['hook_keys'][h]}.npy" for h in self.hooks]
        self._token_index = np.asarray(self.manifest["token_index"][self.hooks[0]], np.int64)
        if provenance and (self._token_index < 0).any():
            raise PrismaError(
                f"cache {str(self.cache_dir)!r} keeps tokens {self.manifest.get('tokens')!r}, "
                "chosen per sample (in each sample's meta.json): provenance=True cannot name "
                "their token indices; read it without provenance"
            )
        self._storage = np.dtype(self.manifest["storage_dtype"])
        # each shard's first sample in the manifest's order, so that a sample's number (which
        # splits rows across readers) does not depend on the order shards are read in
        counts = [int(shard["samples"]) for shard in self.manifest["shards"]]
        names = [shard["name"] for shard in self.manifest["shards"]]
        self._shard_samples_count = dict(zip(names, counts))
        self._first_sample = dict(zip(names, np.cumsum([0, *counts[:-1]]).tolist()))

    # ----- sizes and partitions -------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """Token rows in the chosen split: exact for ``split=None``, expected (by the held-out
        fraction) for ``train`` / ``eval``."""
        total = int(self.manifest["n_samples"]) * self.n_tokens
        if self.split == "eval":
            return round(total * self.eval_fraction)
        if self.split == "train":
            return total - round(total * self.eval_fraction)
        return total

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call before iterating, in every process)."""
        self.epoch = int(epoch)

    def partition(self) -> tuple[int, int]:
        """``(index, count)`` of this reader among all ranks × DataLoader workers."""
        from webdataset.utils import pytorch_worker_info

        rank, world_size, worker, n_workers = pytorch_worker_info()
        rank = rank if self.rank is None else self.rank
        world_size = world_size if self.world_size is None else self.world_size
        if not 0 <= rank < world_size:
            raise PrismaError(f"rank {rank} is outside 0..{world_size - 1}")
        return rank * n_workers + worker, world_size * n_workers

    def shard_plan(self, part: int, n_parts: int) -> tuple[list[str], bool]:
        """Shard names this partition reads, and whether it splits them by row (when there are
        fewer shards than partitions) rather than taking whole shards."""
        names = [s["name"] for s in self.manifest["shards"]]
        if self.shuffle_buffer:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(names))
            names = [names[i] for i in order]
        if len(names) >= n_parts:
            return names[part::n_parts], False
        return names, n_parts > 1

    # ----- iteration ----------------------------------------------------------------------------
    def _shard_samples(self, names: list[str], rng: np.random.Generator | None):
        """``(number, key, locations, shard)`` of every sample of ``names`` (``locations``:
        ``{extension: (offset, size)}`` from its tar headers; nothing else is read yet): in
        order, one shard after another, without ``rng``; with it, ``open_shards`` shards at a
        time, each next sample taken from an open shard chosen with probability proportional
        to the samples it has left (a uniformly random merge of the open shards). ``number``
        is the sample's place in the manifest's order, whatever order it is read in."""
        if rng is None or self.open_shards == 1:
            for name in names:
                shard = _Shard(self.cache_dir / name)
                for position, (key, locations) in enumerate(shard.samples()):
                    yield self._first_sample[name] + position, key, locations, shard
            return
        pending = iter(names)
        shards: list[_Shard] = []
        readers: list[Iterator[tuple[str, dict[str, tuple[int, int]]]]] = []
        left: list[int] = []  # samples each open shard still holds, as the manifest says
        numbers: list[int] = []  # the number of each open shard's next sample
        draws: list[float] = []
        while True:
            while len(readers) < self.open_shards and (name := next(pending, None)) is not None:
                shards.append(_Shard(self.cache_dir / name))
                readers.append(shards[-1].samples())
                left.append(self._shard_samples_count[name])
                numbers.append(self._first_sample[name])
            if not readers:
                return
            if not draws:
                draws = rng.random(1024).tolist()[::-1]  # one generator call per 1024 samples
            target = draws.pop() * sum(max(n, 1) for n in left)
            which = 0
            while which < len(left) - 1 and target >= max(left[which], 1):
                target -= max(left[which], 1)
                which += 1
            sample = next(readers[which], None)
            if sample is None:  # this shard is done: the next one in the plan takes its place
                for column in (readers, left, numbers, shards):
                    del column[which]
                continue
            yield numbers[which], sample[0], sample[1], shards[which]
            numbers[which] += 1
            left[which] -= 1

    def _samples(self, names: list[str], part: int, n_parts: int, by_row: bool,
                 rng: np.random.Generator | None):  # fmt: skip
        """``(number, key, locations, shard, rows kept or None)`` of this partition's samples.
        The held-out split is decided by the key, from the tar header, before any payload is
        read: the other split's samples cost their headers only."""
        n_tokens = self.n_tokens
        offsets = np.arange(n_tokens)
        for number, key, locations, shard in self._shard_samples(names, rng):
            if self.split is not None:
                held_out = eval_score(key) < self.eval_fraction
                if held_out != (self.split == "eval"):
                    continue
            rows = None
            if by_row:
                rows = np.flatnonzero((number * n_tokens + offsets) % n_parts == part)
                if rows.size == 0:
                    continue
            for member in self._members:
                if member not in locations:
                    raise PrismaError(
                        f"{shard.path}: sample {key} lacks {member}: the cache is damaged "
                        "(run `prisma-mm cache verify`)"
                    )
            yield number, key, locations, shard, rows

    def set_position(self, batches: Sequence[int]) -> None:
        """Start the epoch after ``batches[w]`` batches of DataLoader worker ``w`` (one entry
        without workers), as an uninterrupted read would continue. The samples before are
        passed over by their tar headers (the same seeded order and draws, no payload read);
        only the samples with rows still in the shuffle buffer are read. Call after
        :meth:`set_epoch`; iterating again starts from the same position."""
        batches = [int(b) for b in batches]
        if any(b < 0 for b in batches):
            raise PrismaError(f"set_position({batches}): batch counts must be 0 or more")
        self.position = batches

    def _refill(self, buffer: RowBuffer, replay: dict[int, tuple[Path, Any]]) -> None:
        """Read the rows that a skipped stretch left in the buffer: each sample with rows there
        is read once, in manifest order (one open per shard)."""
        positions = buffer.valid()
        samples = buffer.sample[positions]
        order = np.argsort(samples, kind="stable")
        positions, samples = positions[order], samples[order]
        bounds = np.flatnonzero(np.diff(samples)) + 1
        shard: _Shard | None = None
        handle = None
        try:
            for group in np.split(positions, bounds) if len(positions) else []:
                path, locations = replay[int(buffer.sample[group[0]])]
                if shard is None or shard.path != path:
                    if handle is not None:
                        handle.close()
                    shard, handle = _Shard(path), _open_shard(path)
                views = shard.read(locations, self._members, handle)
                buffer.put(group, [fmt.decode_npy(v) for v in views])
        except OSError as error:
            raise _damaged(shard.path if shard else self.cache_dir, error) from error
        finally:
            if handle is not None:
                handle.close()

    def __iter__(self) -> Iterator[Any]:
        part, n_parts = self.partition()
        names, by_row = self.shard_plan(part, n_parts)
        shuffle = self.shuffle_buffer > 0
        rng = np.random.default_rng([self.seed, self.epoch, part]) if shuffle else None
        merge = np.random.default_rng([self.seed, self.epoch, part, 1]) if shuffle else None
        threshold = max(self.shuffle_buffer, self.batch_size) if shuffle else self.batch_size
        buffer = RowBuffer(threshold + self.n_tokens, len(self.hooks), self.d, self._storage)
        info = get_worker_info()
        worker = 0 if info is None else info.id
        skip = self.position[worker] if worker < len(self.position) else 0
        # while skipping: where each sample whose rows entered the buffer lies, to read it after
        replay: dict[int, tuple[Path, dict[str, tuple[int, int]]]] = {}
        keys: dict[int, str] = {}
        key_limit = 2 * (threshold // max(self.n_tokens, 1) + 64)
        offsets = np.arange(self.n_tokens)
        for number, key, locations, shard, rows in self._samples(
            names, part, n_parts, by_row, merge
        ):
            if self.provenance:
                keys[number] = key
            if skip:
                replay[number] = (shard.path, locations)
                buffer.append(None, rows, number, offsets)
            else:
                views = shard.read(locations, self._members)
                buffer.append([fmt.decode_npy(v) for v in views], rows, number, offsets)
            while buffer.size >= threshold:
                if not skip:
                    yield self._emit(*buffer.take(self.batch_size, rng), keys)
                    continue
                buffer.take(self.batch_size, rng, data=False)
                skip -= 1
                if not skip:
                    self._refill(buffer, replay)
                    replay = {}
            if len(keys) > key_limit or len(replay) > key_limit:
                alive = set(np.unique(buffer.sample[: buffer.n]).tolist())
                keys = {k: v for k, v in keys.items() if k in alive or k == number}
                replay = {k: v for k, v in replay.items() if k in alive}
        while buffer.size > 0:
            count = min(self.batch_size, buffer.size)
            if count < self.batch_size and self.drop_last:
                break
            if not skip:
                yield self._emit(*buffer.take(count, rng), keys)
                continue
            buffer.take(count, rng, data=False)
            skip -= 1
            if not skip:
                self._refill(buffer, replay)

    def _emit(self, rows: np.ndarray, sample: np.ndarray, offset: np.ndarray,
              keys: dict[int, str]) -> Any:  # fmt: skip
        stored = fmt.to_torch(rows, self.manifest["dtype"])
        if self.single:
            stored = stored[:, 0]
        acts = _new_tensor(tuple(stored.shape), self.dtype)
        acts.copy_(stored)  # one pass: out of the scratch rows, converted to the output dtype
        if self.normalize:
            mean, scale = (
                (self._mean[0], self._scale[0]) if self.single else (self._mean, self._scale)
            )
            acts.sub_(mean).mul_(scale)
        if not self.provenance:
            return acts
        tokens = torch.from_numpy(self._token_index[offset])
        return acts, [keys[s] for s in sample.tolist()], tokens


def _open_shard(path: Path) -> BinaryIO:
    """A shard opened unbuffered: a tar header costs its 512 bytes, a payload one
    ``readinto``, and a payload passed over costs nothing (no read-ahead into it)."""
    return open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller


def _damaged(path: Path, error: BaseException) -> PrismaError:
    return PrismaError(
        f"cannot read shard {path} ({error.__class__.__name__}: {error}): the cache is "
        "damaged or incomplete (run `prisma-mm cache verify`)"
    )


class _Shard:
    """A local shard, read sample by sample: keys and member locations from the tar headers
    (:meth:`samples`), payloads only when asked (:meth:`read`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO | None = None
        self.buffers: dict[str, bytearray] = {}

    def samples(self) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
        """``(key, {extension: (offset, size)})`` of every sample, from the headers alone;
        the shard stays open for :meth:`read` until the next sample is asked for."""
        import tarfile

        key: str | None = None
        locations: dict[str, tuple[int, int]] = {}
        try:
            with _open_shard(self.path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
                self.handle = handle
                for member in tar:
                    if not member.isreg():
                        continue
                    name, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
                    if name != key:
                        if key is not None:
                            yield key, locations
                        key, locations = name, {}
                    locations[extension] = (member.offset_data, member.size)
                    tar.members = []  # tarfile keeps every header otherwise
                if key is not None:
                    yield key, locations
        except (tarfile.TarError, OSError) as error:
            raise _damaged(self.path, error) from error
        finally:
            self.handle = None

    def read(self, locations: dict[str, tuple[int, int]], extensions: Sequence[str],
             handle: BinaryIO | None = None) -> list[memoryview]:  # fmt: skip
        """The payloads of ``extensions``, each read with ``readinto`` into a buffer reused
        from sample to sample: valid until this shard's next read (copy to keep)."""
        handle = handle or self.handle
        views = []
        try:
            for extension in extensions:
                offset, size = locations[extension]
                buffer = self.buffers.get(extension)
                if buffer is None or len(buffer) < size:
                    buffer = self.buffers[extension] = bytearray(size)
                view = memoryview(buffer)[:size]
                handle.seek(offset)  # tarfile seeks back to its next header itself
                done = 0
                while done < size and (got := handle.readinto(view[done:])):
                    done += got
                if done != size:
                    raise OSError(f"member {extension} at byte {offset} is cut short")
                views.append(view)
        except OSError as error:
            raise _damaged(self.path, error) from error
        return views


def _unknown_hook(hook: str, cached: list[str]) -> PrismaError:
    from prisma_mm.errors import unknown

    return unknown("hook", hook, cached, hint=" in this cache")
