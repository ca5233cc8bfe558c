"""The shard sink of the cache writer: samples -> tar shards (hashed on the way, published by
rename) -> manifest commits, with the running statistics as of the last complete shard; run
off the main thread by :class:`BackgroundSink`, so the forward never waits on the disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import tarfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from torch import Tensor

from prisma_mm.cache import manifest as fmt
from prisma_mm.cache.stats import RunningMoments, sample_moments_numpy


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
    """Appends samples in visiting order to shards of ``shard_size`` samples and commits each
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
            h: RunningMoments.from_dict(manifest["stats"][h])
            if h in manifest.get("stats", {})
            else RunningMoments(int(manifest["shapes"][h][1]))
            for h in self.hooks
        }
        self.pending = {h: m.copy() for h, m in self.committed.items()}
        self.pending_skips: list[dict[str, Any]] = []
        # tar shards of the source read to their end: [shard, first position, end position]
        self.pending_tar: list[list[int]] = []
        manifest.setdefault("tar_shards_done", [])
        self.shard: ShardFile | None = None
        self.shard_keys: set[str] = set()
        self.last_position = manifest["inputs_done"] - 1
        tokens = {h: manifest["token_index"][h] for h in self.hooks}
        first = tokens[self.hooks[0]]
        self.meta_tokens = first if all(t == first for t in tokens.values()) else tokens

    # -- inputs
    def _note_tar_shard(self, record: Mapping[str, Any]) -> None:
        tar_shard = record.get("tar_shard")
        if tar_shard is not None and tar_shard[2]:  # the last input of its tar shard
            self.pending_tar.append([int(tar_shard[0]), int(tar_shard[1]), record["position"] + 1])

    def skip(self, record: Mapping[str, Any], reason: str) -> None:
        self._note_tar_shard(record)
        self.pending_skips.append(
            {
                "index": record["index"],
                "position": record["position"],
                "source": record["source"],
                "reason": reason,
            }
        )

    def add(
        self,
        record: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        moments: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """One sample: ``record`` = {position, index, key, source, label} (``position``: its
        place in the visiting order; ``index``: in the source's own order; optional ``meta``:
        more provenance, ``members``: more tar members ``{ext: bytes}``, ``more``: more
        samples of this input follow); ``arrays[hook]`` is its
        ``[tokens, d]`` storage array (see :func:`~prisma_mm.cache.manifest.to_storage`);
        ``moments[hook]`` its :func:`~prisma_mm.cache.stats.sample_moments` (computed
        here when None)."""
        key = record["key"]
        if key in self.shard_keys:
            self.skip(record, "duplicate key: same identity as an earlier input")
            return
        meta = {
            "source": record["source"],
            "label": record.get("label"),
            "index": record["index"],
            "position": record["position"],
            "tokens": record.get("tokens", self.meta_tokens),
            **record.get("meta", {}),  # e.g. a generated sample's prompt, seed, step
        }
        sample: dict[str, Any] = {"__key__": key, "meta.json": json.dumps(meta).encode()}
        sample.update(record.get("members", {}))  # extra members, e.g. a generated image
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
                one = sample_moments_numpy(arrays[hook][None], self.dtype)
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
        self.last_position = record["position"]
        self._note_tar_shard(record)
        # an input with several samples (a prompt's steps) is never split over two shards
        if self.shard.samples >= self.shard_size and not record.get("more"):
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
                "inputs": [inputs_from, self.last_position + 1],
                "bytes": size,
                "sha256": digest,
            }
        )
        self.manifest["n_samples"] += shard.samples
        self.manifest["inputs_done"] = self.last_position + 1
        self._commit_skips(self.last_position + 1)
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
        done = [s for s in self.pending_skips if s["position"] < end]
        self.pending_skips = [s for s in self.pending_skips if s["position"] >= end]
        self.manifest["skipped"] += done
        self.manifest["n_skipped"] = len(self.manifest["skipped"])
        finished = [t for t in self.pending_tar if t[2] <= end]
        self.pending_tar = [t for t in self.pending_tar if t[2] > end]
        self.manifest["tar_shards_done"] += finished

    def _write(self) -> None:
        manifest = self.manifest
        manifest["n_shards"] = len(manifest["shards"])
        manifest["stats"] = {h: m.to_dict() for h, m in self.committed.items()}
        manifest["updated"] = fmt.utc_now()
        fmt.write_manifest(self.dir, manifest)


# ----- background writing -----------------------------------------------------------------------
@dataclass
class Job:
    """One forward's worth of samples for the background writer."""

    records: list[dict[str, Any]]
    reasons: list[str | None]
    arrays: dict[str, Tensor]  # hook -> [n_ok, tokens, d] on the CPU, in the cache dtype
    moments: dict[str, dict[str, Tensor]] | None  # computed on the device, or None
    ready: Any = None  # a CUDA event to wait on before reading ``arrays``


class BackgroundSink(threading.Thread):
    """Runs :class:`CacheSink` off the main thread; the first error stops it and is re-raised
    in the main thread on its next :meth:`put`."""

    def __init__(self, sink: CacheSink) -> None:
        super().__init__(name="prisma-mm-cache-writer", daemon=True)
        self.sink = sink
        self.jobs: queue.Queue[Job | tuple[int, bool] | None] = queue.Queue(maxsize=3)
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

    def _write(self, job: Job) -> None:
        if job.ready is not None:
            job.ready.synchronize()
        dtype = self.sink.dtype
        arrays = {h: fmt.to_storage(a, dtype) for h, a in job.arrays.items()}
        if job.moments is None:
            per_hook = {h: sample_moments_numpy(a, dtype) for h, a in arrays.items()}
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

    def put(self, job: Job | tuple[int, bool] | None) -> None:
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
