"""Write an activation cache: stream a data source through a hooked model into resumable
webdataset shards and a manifest.

Inputs are taken in the source's fixed order. DataLoader workers decode them (a damaged
input becomes a skip marker with its reason, never a crash); the main thread runs
``model.run_with_cache`` (which stops after the last hook needed); a background thread packs
samples into shards, so the forward never waits on the disk. A shard is written under a
temporary name and renamed when complete; the manifest is then rewritten atomically and
records that the first ``inputs_done`` inputs are in complete shards. Re-running the same
call after a crash at any moment discards partial shards and resumes from there, so the
finished cache holds exactly the inputs of an uninterrupted run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prisma_mm.cache import manifest as fmt
from prisma_mm.data.images import BadImage, to_pil_rgb
from prisma_mm.data.sources import InputRecord, Labeled, Source, open_source
from prisma_mm.errors import PrismaError

DEFAULT_SHARD_SIZE = 256
TOKEN_CHOICES = ("all", "cls", "patches")
# Input kinds the writer can prepare for a model; video and prompt sources add theirs.
PREPARERS: dict[str, Callable[[Any], Callable[[Any], Tensor]]] = {}


def _image_preparer(model: Any) -> Callable[[Any], Tensor]:
    transform = model.spec.transform

    def prepare(raw: Any) -> Tensor:
        return transform(to_pil_rgb(raw))

    return prepare


PREPARERS["image"] = _image_preparer


# ----- shard files ----------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)  # releases the GIL for large buffers, as does the write
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


class ShardFile:
    """One shard being written: samples go to ``<name>.tmp`` (sha256 computed on the way);
    :meth:`publish` fsyncs it and renames it to its final name.

    A plain (uncompressed, ustar) tar in webdataset layout, members ``<key>.<ext>``. Written
    with :mod:`tarfile` in block mode, one write per member, so the background thread holds
    the GIL as little as possible (stream mode copies large members in 10 kB slices)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + fmt.TMP_SUFFIX)
        self._handle = open(self.tmp, "wb")  # noqa: SIM115 - closed by publish / discard
        self._hashing = _HashingWriter(self._handle)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self._tar.copybufsize = 1 << 24
        self.samples = 0

    def add(self, sample: Mapping[str, Any]) -> None:
        """Append one sample: ``{"__key__": str, "<ext>": bytes, ...}`` (members sorted by
        extension, fixed mtime and owner, so equal data gives equal bytes)."""
        key = sample["__key__"]
        for extension in sorted(k for k in sample if k != "__key__"):
            data = sample[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mode = 0o644
            info.uname = info.gname = "prisma"
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def publish(self) -> tuple[str, int]:
        """Finish the tar, make it durable, rename it into place; returns (sha256, bytes)."""
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.tmp, self.path)
        fmt.fsync_dir(self.path.parent)
        return self._hashing.digest.hexdigest(), self._hashing.size

    def discard(self) -> None:
        """Drop the partial shard (after an error)."""
        try:
            self._handle.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


# ----- the sink: samples -> shards -> manifest ------------------------------------------------
class CacheSink:
    """Appends samples in input order to shards of ``shard_size`` samples and commits each
    complete shard to the manifest with its input range, skipped inputs and statistics.

    Statistics are merged one sample at a time, so they do not depend on batch boundaries;
    the committed state (as of the last complete shard) is what a resumed run starts from.
    """

    def __init__(self, cache_dir: str | Path, manifest: dict[str, Any], shard_size: int) -> None:
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.shard_size = shard_size
        self.hooks: list[str] = list(manifest["hooks"])
        self.keys = manifest["hook_keys"]
        self.dtype = manifest["dtype"]
        self.committed = {
            h: fmt.RunningMoments.from_dict(manifest["stats"][h])
            if h in manifest.get("stats", {})
            else fmt.RunningMoments(int(manifest["shapes"][h][1]))
            for h in self.hooks
        }
        self.pending = {h: m.copy() for h, m in self.committed.items()}
        self.pending_skips: list[dict[str, Any]] = []
        self.shard: ShardFile | None = None
        self.shard_keys: set[str] = set()
        self.last_index = manifest["inputs_done"] - 1
        tokens = {h: manifest["token_index"][h] for h in self.hooks}
        first = tokens[self.hooks[0]]
        self.meta_tokens = first if all(t == first for t in tokens.values()) else tokens

    # -- inputs
    def skip(self, record: Mapping[str, Any], reason: str) -> None:
        self.pending_skips.append(
            {"index": record["index"], "source": record["source"], "reason": reason}
        )

    def add(
        self,
        record: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        moments: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """One sample: ``record`` = {index, key, source, label}; ``arrays[hook]`` is its
        ``[tokens, d]`` storage array (see :func:`~prisma_mm.cache.manifest.to_storage`);
        ``moments[hook]`` its :func:`~prisma_mm.cache.manifest.sample_moments` (computed
        here when None)."""
        key = record["key"]
        if key in self.shard_keys:
            self.skip(record, "duplicate key: same identity as an earlier input")
            return
        meta = {
            "source": record["source"],
            "label": record.get("label"),
            "index": record["index"],
            "tokens": self.meta_tokens,
        }
        sample: dict[str, Any] = {"__key__": key, "meta.json": json.dumps(meta).encode()}
        for hook in self.hooks:
            sample[f"{self.keys[hook]}.npy"] = fmt.encode_npy(arrays[hook])
        if self.shard is None:
            name = fmt.SHARD_PATTERN.format(len(self.manifest["shards"]))
            self.shard = ShardFile(self.dir / name)
            self.shard_keys = set()
        self.shard.add(sample)
        self.shard_keys.add(key)
        for hook in self.hooks:
            if moments is None:
                one = fmt.sample_moments_numpy(arrays[hook][None], self.dtype)
                m = {k: v[0] for k, v in one.items()}
            else:
                m = moments[hook]
            self.pending[hook].merge(
                int(arrays[hook].shape[0]),
                m["mean"],
                m["m2"],
                float(m["norm_sum"]),
                float(m["sq_norm_sum"]),
                int(m["nonfinite"]),
            )
        self.last_index = record["index"]
        if self.shard.samples >= self.shard_size:
            self.publish()

    # -- commits
    def publish(self) -> None:
        """Finish the open shard and commit it (no-op when none is open)."""
        if self.shard is None:
            return
        shard = self.shard
        digest, size = shard.publish()
        self.shard = None
        inputs_from = self.manifest["inputs_done"]
        self.manifest["shards"].append(
            {
                "name": shard.path.name,
                "samples": shard.samples,
                "inputs": [inputs_from, self.last_index + 1],
                "bytes": size,
                "sha256": digest,
            }
        )
        self.manifest["n_samples"] += shard.samples
        self.manifest["inputs_done"] = self.last_index + 1
        self._commit_skips(self.last_index + 1)
        self.committed = {h: m.copy() for h, m in self.pending.items()}
        self._write()

    def finish(self, inputs_end: int, exhausted: bool) -> None:
        """End of input: commit the last (smaller) shard and the trailing skipped inputs."""
        self.publish()
        self.manifest["inputs_done"] = max(self.manifest["inputs_done"], inputs_end)
        self._commit_skips(self.manifest["inputs_done"])
        self.manifest["complete"] = True
        self.manifest["exhausted"] = exhausted
        self._write()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.discard()
            self.shard = None

    def _commit_skips(self, end: int) -> None:
        done = [s for s in self.pending_skips if s["index"] < end]
        self.pending_skips = [s for s in self.pending_skips if s["index"] >= end]
        self.manifest["skipped"] += done
        self.manifest["n_skipped"] = len(self.manifest["skipped"])

    def _write(self) -> None:
        manifest = self.manifest
        manifest["n_shards"] = len(manifest["shards"])
        manifest["stats"] = {h: m.to_dict() for h, m in self.committed.items()}
        manifest["updated"] = _now()
        fmt.write_manifest(self.dir, manifest)


# ----- inputs in worker processes -------------------------------------------------------------
class _InputBatches(IterableDataset):
    """Batches of prepared inputs ``start, start+1, …`` (up to ``stop``) in global order.

    Worker ``w`` of ``W`` yields batches ``w, w+W, w+2W, …``; the DataLoader takes batches
    from its workers in turn, so the main process sees every input in source order whatever
    the number of workers. Each item is either a prepared tensor or a skip reason.
    """

    def __init__(
        self,
        source: Source,
        prepare: Callable[[Any], Tensor],
        start: int,
        stop: int | None,
        batch_size: int,
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.start = start
        self.stop = stop
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.source.random_access:
            yield from self._indexed(worker, n_workers)
        else:
            yield from self._streamed(worker, n_workers)

    def _indexed(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        end = self.source.count() or 0
        if self.stop is not None:
            end = min(end, self.stop)
        batch = worker
        while (low := self.start + batch * self.batch_size) < end:
            high = min(low + self.batch_size, end)
            items = [
                (self.source.record(i), lambda i=i: self.source.load(i)) for i in range(low, high)
            ]
            yield self._prepare(items)
            batch += n_workers

    def _streamed(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        items: list[tuple[InputRecord, Callable[[], Any]]] = []
        for record, load in self.source.stream():
            if self.stop is not None and record.index >= self.stop:
                break
            offset = record.index - self.start
            if offset < 0 or (offset // self.batch_size) % n_workers != worker:
                continue
            items.append((record, load))
            if len(items) == self.batch_size:
                yield self._prepare(items)
                items = []
        if items:
            yield self._prepare(items)

    def _prepare(self, items: list[tuple[InputRecord, Callable[[], Any]]]) -> dict[str, Any]:
        records, reasons, tensors = [], [], []
        for record, load in items:
            entry = record.to_dict()
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


# ----- background writing -----------------------------------------------------------------------
@dataclass
class _Job:
    records: list[dict[str, Any]]
    reasons: list[str | None]
    arrays: dict[str, Tensor]  # hook -> [n_ok, tokens, d] on the CPU, in the cache dtype
    moments: dict[str, dict[str, Tensor]] | None  # computed on the device, or None
    ready: Any = None  # a CUDA event to wait on before reading ``arrays``


class _Background(threading.Thread):
    """Runs :class:`CacheSink` off the main thread; the first error stops it and is re-raised
    in the main thread on its next :meth:`put`."""

    def __init__(self, sink: CacheSink) -> None:
        super().__init__(name="prisma-mm-cache-writer", daemon=True)
        self.sink = sink
        self.jobs: queue.Queue[_Job | tuple[int, bool] | None] = queue.Queue(maxsize=3)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                if isinstance(job, tuple):
                    self.sink.finish(*job)
                else:
                    self._write(job)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self.error = error

    def _write(self, job: _Job) -> None:
        if job.ready is not None:
            job.ready.synchronize()
        dtype = self.sink.dtype
        arrays = {h: fmt.to_storage(a, dtype) for h, a in job.arrays.items()}
        if job.moments is None:
            per_hook = {h: fmt.sample_moments_numpy(a, dtype) for h, a in arrays.items()}
        else:
            per_hook = {h: {k: v.numpy() for k, v in m.items()} for h, m in job.moments.items()}
        row = 0
        for record, reason in zip(job.records, job.reasons):
            if reason is not None:
                self.sink.skip(record, reason)
                continue
            self.sink.add(
                record,
                {h: a[row] for h, a in arrays.items()},
                {h: {k: v[row] for k, v in m.items()} for h, m in per_hook.items()},
            )
            row += 1

    def put(self, job: _Job | tuple[int, bool] | None) -> None:
        while True:
            self.raise_error()
            if not self.is_alive():
                raise RuntimeError("the cache writer thread stopped unexpectedly")
            try:
                self.jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Finish pending jobs and stop (also after an error in the main thread)."""
        if self.is_alive() and self.error is None:
            try:
                self.put(None)
            except BaseException:  # noqa: BLE001 - closing after a failure
                pass
        self.join()


# ----- model, hooks, tokens ---------------------------------------------------------------------
def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and all bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.device.type == "meta":
            raise PrismaError(f"model tensor {name!r} is on the meta device: it has no weights")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def parse_hooks(hooks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (duplicates refused)."""
    names = [h.strip() for h in hooks.split(",")] if isinstance(hooks, str) else list(hooks)
    names = [h for h in names if h]
    if not names:
        raise PrismaError("no hooks given: pass --hooks, e.g. blocks.11.hook_resid_post")
    duplicates = sorted({h for h in names if names.count(h) > 1})
    if duplicates:
        raise PrismaError(f"hook {duplicates[0]!r} is listed twice in --hooks")
    return names


def parse_tokens(tokens: str | Sequence[int]) -> str | list[int]:
    """``all`` | ``cls`` | ``patches`` | an explicit list of token indices (``"0,5,9"``)."""
    if isinstance(tokens, str):
        spec = tokens.strip().lower()
        if spec in TOKEN_CHOICES:
            return spec
        try:
            return [int(t) for t in spec.replace(" ", "").split(",") if t]
        except ValueError:
            raise PrismaError(
                f"--tokens {tokens!r}: use all, cls, patches or a list of token indices like 0,5,9"
            ) from None
    indices = [int(t) for t in tokens]
    if not indices:
        raise PrismaError("tokens is an empty list: give at least one token index")
    return indices


def token_index(spec: str | list[int], hook: str, n_tokens: int, layout: Any) -> list[int]:
    """The token positions kept for a hook whose activation has ``n_tokens`` tokens."""
    if spec == "all":
        return list(range(n_tokens))
    if n_tokens != layout.n_tokens:
        raise PrismaError(
            f"hook {hook!r} has {n_tokens} token(s), not the layout's {layout.n_tokens} "
            f"(a pooled output): --tokens {spec} applies to token hooks; cache it with --tokens all"
        )
    if spec == "cls":
        if layout.n_prefix == 0:
            raise PrismaError(
                "--tokens cls: this model has no CLS token (no prefix tokens); use patches or all"
            )
        return [0]
    if spec == "patches":
        return list(range(layout.n_prefix, layout.n_tokens))
    bad = [t for t in spec if not 0 <= t < n_tokens]
    if bad:
        raise PrismaError(f"--tokens {bad[0]} is outside 0..{n_tokens - 1} for hook {hook!r}")
    if len(set(spec)) != len(spec):
        raise PrismaError("--tokens lists a token index twice")
    return list(spec)


def _model_card(model: Any) -> tuple[str, dict[str, Any]]:
    card = getattr(model, "card", None)
    if card is None:
        return type(model.module).__name__, {}
    return card.name, card.to_dict() if hasattr(card, "to_dict") else dict(vars(card))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----- the output directory -------------------------------------------------------------------
def _prepare_out(out: Path) -> Any:
    """Create ``out`` and take its lock; returns the open lock file (kept for the run)."""
    if out.exists() and not out.is_dir():
        raise PrismaError(f"--out {str(out)!r} is a file, not a directory: choose a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / fmt.LOCK_FILE, "a")  # noqa: SIM115 - held for the whole run
    except OSError as error:
        raise PrismaError(
            f"cannot write to output directory {str(out)!r} ({error.strerror or error}): "
            "choose a writable --out"
        ) from error
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.close()
        raise PrismaError(
            f"another `prisma-mm cache` is writing to {str(out)!r}: wait for it or choose "
            "another --out"
        ) from error
    return lock


def _clean_leftovers(out: Path, manifest: Mapping[str, Any] | None) -> None:
    """Remove partial files and shards that the manifest does not list (an interrupted run)."""
    listed = {s["name"] for s in manifest["shards"]} if manifest else set()
    foreign = []
    for path in out.iterdir():
        if path.name.endswith(fmt.TMP_SUFFIX) or (
            fmt.SHARD_RE.match(path.name) and path.name not in listed
        ):
            if manifest is None and not path.name.endswith(fmt.TMP_SUFFIX):
                foreign.append(path.name)
                continue
            path.unlink()
        elif path.name not in (fmt.MANIFEST, fmt.LOCK_FILE) and manifest is None:
            foreign.append(path.name)
    if foreign:
        raise PrismaError(
            f"--out {str(out)!r} is not empty and holds no cache ({foreign[0]!r} …): choose an "
            "empty or new directory"
        )


_IDENTITY = ("model", "fingerprint", "hooks", "dtype", "tokens", "source")


def _identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model": manifest["model"]["name"],
        "fingerprint": manifest["model"]["fingerprint"],
        "hooks": manifest["hooks"],
        "dtype": manifest["dtype"],
        "tokens": manifest["tokens"],
        "source": manifest["source"],
    }


def _check_same_cache(out: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    before, now = _identity(old), _identity(new)
    for field in _IDENTITY:
        if before[field] != now[field]:
            what = {
                "fingerprint": "the model weights differ",
                "source": "the data source differs",
            }.get(field, f"{field} {before[field]!r} differs from this run's {now[field]!r}")
            detail = ""
            if field == "fingerprint":
                detail = f" ({before[field][:19]}… vs {now[field][:19]}…)"
            elif field == "source":
                detail = f" ({before[field]} vs {now[field]})"
            raise PrismaError(
                f"{str(out)!r} already holds a different cache: {what}{detail}; write to a new "
                "--out directory (or delete the old cache)"
            )


# ----- the entry point ---------------------------------------------------------------------------
def new_manifest(
    model: Mapping[str, Any],
    hooks: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    dtype: str = "float16",
    tokens: str | list[int] = "all",
    token_index: Mapping[str, Sequence[int]] | None = None,
    layout: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    limit: int | None = None,
) -> dict[str, Any]:
    """The manifest of an empty cache: ``model`` = {name, card, weights, fingerprint};
    ``shapes[hook]`` = [tokens, d]. :class:`CacheSink` fills in shards and statistics."""
    from prisma_mm import __version__

    dtype = fmt.canonical_dtype(dtype)
    keys = fmt.hook_keys(hooks)
    if token_index is None:
        token_index = {h: list(range(int(shapes[h][0]))) for h in hooks}
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "prisma_mm_version": __version__,
        "model": dict(model),
        "hooks": list(hooks),
        "hook_keys": keys,
        "key_hooks": {k: h for h, k in keys.items()},
        "dtype": dtype,
        "storage_dtype": fmt.STORAGE_DTYPES[dtype],
        "tokens": tokens,
        "token_index": {h: [int(t) for t in token_index[h]] for h in hooks},
        "shapes": {h: [int(v) for v in shapes[h]] for h in hooks},
        "layout": dict(layout or {}),
        "source": dict(source or {}),
        "shard_size": shard_size,
        "created": _now(),
        "updated": _now(),
        "complete": False,
        "exhausted": False,
        "limit": limit,
        "inputs_done": 0,
        "n_samples": 0,
        "n_shards": 0,
        "n_skipped": 0,
        "shards": [],
        "skipped": [],
        "stats": {},
    }


def _to_host(moments: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.to("cpu", non_blocking=True) for k, v in moments.items()}


def _disk_error(error: OSError, out: Path, manifest: Mapping[str, Any]) -> PrismaError:
    kept = (
        f"{manifest['n_shards']} complete shard(s) with {manifest['n_samples']} samples stay "
        "valid; re-run the same command to resume"
    )
    if error.errno == errno.ENOSPC:
        return PrismaError(f"disk full while writing the cache in {str(out)!r}: free space; {kept}")
    name = f" {error.filename}" if error.filename else ""
    return PrismaError(f"cannot write{name} in {str(out)!r} ({error.strerror or error}); {kept}")


def write_cache(
    model: Any,
    data: Any,
    out: str | Path,
    hooks: str | Sequence[str],
    *,
    weights: str | None = "pretrained",
    tokens: str | Sequence[int] = "all",
    dtype: str = "float16",
    batch_size: int = 32,
    workers: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Stream ``data`` through ``model`` and cache the activations at ``hooks`` in ``out``.

    ``model``: a card name (built with ``weights`` on ``device``) or a
    :class:`~prisma_mm.hooks.HookedModel`. ``data``: anything :func:`open_source` accepts.
    Each input becomes one sample holding a ``[tokens, d]`` array per hook (``tokens``:
    ``all`` | ``cls`` | ``patches`` | index list) in ``dtype`` (float16, bfloat16, float32).
    ``shard_size`` inputs per shard; ``limit`` caps the number of inputs read.
    Re-running the same call resumes an interrupted cache. Returns the manifest.
    """
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise PrismaError("batch_size and shard_size must be >= 1 and workers >= 0")
    if limit is not None and limit < 1:
        raise PrismaError(f"--limit {limit}: give a positive number of inputs")
    hooks = parse_hooks(hooks)
    token_spec = parse_tokens(tokens)
    dtype_name = fmt.canonical_dtype(dtype)
    out = Path(out).expanduser()
    source = open_source(data)
    if source.kind not in PREPARERS:
        raise PrismaError(
            f"the cache writer cannot prepare {source.kind!r} inputs yet (known: "
            f"{sorted(PREPARERS)})"
        )
    if source.count() == 0:
        raise PrismaError(
            f"data source {_describe_short(source)} has no inputs (no image files found)"
        )
    model, new = _prepare_model(
        model, weights, device, hooks, token_spec, dtype_name, source, shard_size, limit
    )
    lock = _prepare_out(out)
    try:
        return _write(model, new, source, out, batch_size, workers, shard_size, limit, progress)
    finally:
        lock.close()


def _prepare_model(
    model: Any,
    weights: str | None,
    device: str | torch.device,
    hooks: list[str],
    token_spec: str | list[int],
    dtype_name: str,
    source: Source,
    shard_size: int,
    limit: int | None,
) -> tuple[Any, dict[str, Any]]:
    """Load the model, check the hooks, find their shapes; returns (model, new manifest)."""
    if isinstance(model, str):
        from prisma_mm.zoo.registry import load_model

        model = load_model(model, weights=weights, device=device)
        weights_label = weights
    else:
        weights_label = "object"
    for hook in hooks:
        model.hook_point(hook)
        if hook.endswith("hook_pattern"):
            raise PrismaError(
                f"hook {hook!r} is an attention pattern [heads, q, k], not [tokens, d]: the "
                "cache stores token activations; drop it from --hooks"
            )
    height, width = model.layout.input_size
    with torch.inference_mode():
        probe = torch.zeros(1, 3, height, width, device=model.device, dtype=model.dtype)
        _, probe_cache = model.run_with_cache(probe, names=hooks)
    index = {
        h: token_index(token_spec, h, int(probe_cache[h].shape[1]), model.layout) for h in hooks
    }
    shapes = {h: [len(index[h]), int(probe_cache[h].shape[2])] for h in hooks}
    name, card = _model_card(model)
    model_info = {
        "name": name,
        "card": card,
        "weights": weights_label,
        "fingerprint": weights_fingerprint(model.module),
    }
    new = new_manifest(
        model_info, hooks, shapes, dtype_name, token_spec, index, model.layout.to_dict(),
        source.describe(), shard_size, limit,
    )  # fmt: skip
    return model, new


def _write(
    model: Any,
    new: dict[str, Any],
    source: Source,
    out: Path,
    batch_size: int,
    workers: int,
    shard_size: int,
    limit: int | None,
    progress: bool,
) -> dict[str, Any]:
    device = model.device
    hooks: list[str] = new["hooks"]
    index: dict[str, list[int]] = new["token_index"]
    dtype_name: str = new["dtype"]
    manifest_path = out / fmt.MANIFEST
    if manifest_path.exists():
        manifest = fmt.read_manifest(out)
        _check_same_cache(out, manifest, new)
        _clean_leftovers(out, manifest)
        manifest["limit"] = limit
        manifest["shard_size"] = shard_size
    else:
        _clean_leftovers(out, None)
        manifest = new
        try:
            fmt.write_manifest(out, manifest)
        except OSError as error:
            raise _disk_error(error, out, manifest) from error

    start = manifest["inputs_done"]
    if manifest.get("exhausted") or (limit is not None and start >= limit):
        _check_some_written(manifest, source)
        if progress:
            print(f"cache {out} is complete: {manifest['n_samples']} samples", flush=True)
        return manifest
    manifest["complete"] = False

    n_inputs = source.count()
    stop = limit if n_inputs is None else min(n_inputs, limit if limit is not None else n_inputs)
    prepare = PREPARERS[source.kind](model)
    inputs = _InputBatches(source, prepare, start, stop, batch_size)
    loader = DataLoader(
        inputs,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    sink = CacheSink(out, manifest, shard_size)
    background = _Background(sink)
    background.start()
    total = None if stop is None else max(stop - start, 0)
    n_tokens = len(index[hooks[0]])
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, unit="input", desc=f"cache {out.name}", disable=not progress, smoothing=0.05
    )
    seen_end = start
    written = skipped = 0
    began = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                background.raise_error()
                records, reasons, pixels = batch["records"], batch["reasons"], batch["pixels"]
                arrays: dict[str, Tensor] = {}
                moments = None
                ready = None
                if pixels is not None:
                    _, cache = model.run_with_cache(pixels.to(device, non_blocking=True), hooks)
                    for hook in hooks:
                        act = cache[hook]
                        if len(index[hook]) != act.shape[1]:
                            act = act[:, index[hook]]
                        arrays[hook] = act.to(fmt.TORCH_DTYPES[dtype_name]).contiguous()
                    if device.type == "cuda":
                        moments = {h: _to_host(fmt.sample_moments(a)) for h, a in arrays.items()}
                        arrays = {h: a.to("cpu", non_blocking=True) for h, a in arrays.items()}
                        ready = torch.cuda.Event()
                        ready.record()
                background.put(_Job(records, reasons, arrays, moments, ready))
                seen_end = records[-1]["index"] + 1
                n_ok = 0 if pixels is None else len(pixels)
                written += n_ok
                bar.update(len(records))
                skipped += sum(reason is not None for reason in reasons)
                elapsed = max(time.perf_counter() - began, 1e-9)
                bar.set_postfix_str(
                    f"{written * n_tokens / elapsed:,.0f} tok/s, {skipped} skipped", refresh=False
                )
        exhausted = stop is None or seen_end < stop or (n_inputs is not None and stop >= n_inputs)
        background.put((seen_end, exhausted))
        background.close()
        background.raise_error()
    except BaseException as error:
        background.close()
        sink.abort()
        if isinstance(error, OSError) and background.error is error:
            raise _disk_error(error, out, sink.manifest) from error
        raise
    finally:
        bar.close()
    _check_some_written(sink.manifest, source)
    return sink.manifest


def _check_some_written(manifest: Mapping[str, Any], source: Source) -> None:
    if manifest["n_samples"] == 0:
        first = manifest["skipped"][0]["reason"] if manifest["skipped"] else "no inputs"
        raise PrismaError(
            f"no readable input in {_describe_short(source)}: all {manifest['n_skipped']} "
            f"inputs were skipped (first: {first})"
        )


def _describe_short(source: Source) -> str:
    info = source.describe()
    where = info.get("root") or info.get("file") or info.get("urls") or info.get("class")
    return f"{info['type']} {where!r}"
