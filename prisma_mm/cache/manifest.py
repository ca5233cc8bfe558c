"""The on-disk format of an activation cache: manifest.json, shard samples, .npy members,
and the checks that ``verify`` runs (running statistics: :mod:`prisma_mm.cache.stats`).

A cache directory holds ``manifest.json`` and webdataset shards ``shard-000000.tar`` … Each
sample is one input: ``__key__`` (stable id), ``<hook_key>.npy`` per hook holding
``[tokens, d]`` and ``meta.json`` (source, label, index, kept token indices). See
docs/cache.md for every manifest field.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_mm.errors import PrismaError

FORMAT = "prisma-mm-cache"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
TMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"

# How each dtype is stored in .npy members: numpy has no bfloat16, so bf16 values are kept
# bit for bit as uint16 and the manifest's "dtype" says how to read them back.
STORAGE_DTYPES = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def canonical_dtype(dtype: Any) -> str:
    """``"float16"``, ``"bfloat16"`` or ``"float32"`` from any common spelling or torch dtype."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise PrismaError(
            f"unknown cache dtype {dtype!r}: use float16 (default), bfloat16 or float32"
        )
    return name


# ----- hook names inside tar member names ---------------------------------------------------
def hook_key(hook: str) -> str:
    """The member name of a hook (``blocks.3.hook_resid_post`` -> ``blocks_3_hook_resid_post``):
    webdataset splits a member name at its first dot, so hook names lose theirs."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", hook)


def hook_keys(hooks: Iterable[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for hook in hooks:
        key = hook_key(hook)
        clash = [h for h, k in keys.items() if k == key]
        if clash:
            raise PrismaError(
                f"hooks {clash[0]!r} and {hook!r} map to the same member name {key!r}"
            )
        keys[hook] = key
    return keys


# ----- .npy members ---------------------------------------------------------------------------
_HEADERS: dict[tuple[tuple[int, ...], str], bytes] = {}


def encode_npy(array: np.ndarray) -> bytes:
    """The .npy file of a C-contiguous array; the header is built once per shape and dtype."""
    array = np.ascontiguousarray(array)
    signature = (array.shape, array.dtype.str)
    header = _HEADERS.get(signature)
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, np.lib.format.header_data_from_array_1_0(array)
        )
        header = _HEADERS[signature] = buffer.getvalue()
    return b"".join((header, array.data.cast("B")))


_PARSED: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """A read-only array viewing the bytes of a .npy file, without copying them."""
    # version 1.0 header: magic (6) + version (2) + little-endian uint16 length + header text
    head_len = 10 + int.from_bytes(data[8:10], "little")
    head = bytes(data[:head_len])
    parsed = _PARSED.get(head)
    if parsed is None:
        stream = io.BytesIO(head)
        version = np.lib.format.read_magic(stream)
        if version != (1, 0):  # not written by us; let numpy read it (copies)
            return np.load(io.BytesIO(data), allow_pickle=False)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        if fortran or dtype.hasobject:
            raise PrismaError("cache member is not a plain C-order numeric array")
        parsed = _PARSED[head] = (dtype, shape, head_len)
    dtype, shape, offset = parsed
    count = math.prod(shape)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def npy_shape_dtype(data: bytes) -> tuple[tuple[int, ...], str]:
    """Shape and dtype name of a .npy file, from its header only."""
    stream = io.BytesIO(bytes(data[:4096]))
    version = np.lib.format.read_magic(stream)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = reader(stream)
    return tuple(shape), dtype.name


def to_torch(array: np.ndarray, dtype_name: str) -> Tensor:
    """Stored rows as a tensor of the cache's dtype (bf16 reinterpreted from its uint16 bits)."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_storage(tensor: Tensor, dtype_name: str) -> np.ndarray:
    """A CPU tensor already cast to the cache dtype, as the numpy array written to disk."""
    if dtype_name == "bfloat16":
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


# ----- manifest I/O ---------------------------------------------------------------------------
def _dump(value: Any, indent: int = 0) -> str:
    """JSON with nested objects indented but lists of numbers kept on one line."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_dump(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        items = [f"{pad}{_dump(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(value)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(cache_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Replace manifest.json atomically: write a temporary file, fsync it, rename it."""
    cache_dir = Path(cache_dir)
    final = cache_dir / MANIFEST
    tmp = cache_dir / (MANIFEST + TMP_SUFFIX)
    with open(tmp, "w") as handle:
        handle.write(_dump(dict(manifest)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(cache_dir)


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a cache directory, checked to be a prisma-mm cache of a known version."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not cache_dir.exists():
        raise PrismaError(f"cache directory {str(cache_dir)!r} does not exist")
    if not path.is_file():
        raise PrismaError(
            f"{str(cache_dir)!r} has no {MANIFEST}: not a prisma-mm cache "
            "(write one with `prisma-mm cache`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrismaError(f"{path} is not valid JSON ({error}): the cache is damaged") from error
    except OSError as error:
        raise PrismaError(f"cannot read {path} ({error.strerror or error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrismaError(f"{path} is not a prisma-mm cache manifest")
    if manifest.get("version") != VERSION:
        raise PrismaError(
            f"{path} has cache format version {manifest.get('version')}; this prisma-mm reads "
            f"version {VERSION} (re-write the cache or upgrade prisma-mm)"
        )
    _check_fields(path, manifest)
    return manifest


# Fields every reader of a manifest relies on, with their JSON types.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "hooks": list,
    "hook_keys": dict,
    "key_hooks": dict,
    "dtype": str,
    "storage_dtype": str,
    "token_index": dict,
    "shapes": dict,
    "shards": list,
    "skipped": list,
    "stats": dict,
    "inputs_done": int,
    "n_samples": int,
    "n_skipped": int,
}
SHARD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "samples": int,
    "inputs": list,
    "bytes": int,
    "sha256": str,
}


def _check_fields(path: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse, in one line, a manifest that lacks a field or holds one of the wrong type."""
    damaged = "the cache is damaged: re-write it with `prisma-mm cache` into a new --out"
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        raise PrismaError(f"{path} lacks the field(s) {missing}: {damaged}")
    for name, kind in REQUIRED_FIELDS.items():
        if not isinstance(manifest[name], kind) or isinstance(manifest[name], bool):
            raise PrismaError(f"{path}: field {name!r} is not a JSON {kind.__name__}: {damaged}")
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise PrismaError(f"{path}: unknown dtype {manifest['dtype']!r}: {damaged}")
    for hook in manifest["hooks"]:
        for table in ("hook_keys", "token_index", "shapes"):
            if hook not in manifest[table]:
                raise PrismaError(f"{path}: hook {hook!r} is missing from {table!r}: {damaged}")
    for number, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise PrismaError(f"{path}: shards[{number}] is not an object: {damaged}")
        lacking = [k for k, kind in SHARD_FIELDS.items() if not isinstance(shard.get(k), kind)]
        if lacking:
            raise PrismaError(f"{path}: shards[{number}] lacks or mistypes {lacking}: {damaged}")


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (the manifest's timestamps)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----- verify -----------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """What ``verify`` found: ``problems`` (damage) make ``ok`` false; ``notes`` do not."""

    cache_dir: str
    n_shards: int = 0
    n_samples: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check_samples(path: Path, manifest: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Count the samples of a shard and check each has every hook with the manifest's shape."""
    keys = manifest["hook_keys"]
    shapes = {keys[h]: tuple(manifest["shapes"][h]) for h in manifest["hooks"]}
    storage = STORAGE_DTYPES[manifest["dtype"]]
    wanted = {f"{k}.npy" for k in shapes} | {"meta.json"}
    problems: list[str] = []
    members: dict[str, set[str]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                key, _, extension = base.partition(".")
                if key not in members:
                    members[key] = set()
                    order.append(key)
                members[key].add(extension)
                if extension.endswith(".npy") and extension[:-4] in shapes:
                    handle = tar.extractfile(member)
                    head = handle.read(4096) if handle else b""
                    shape, dtype = npy_shape_dtype(head)
                    expected = shapes[extension[:-4]]
                    if shape != expected or dtype != storage:
                        problems.append(
                            f"{path.name}: sample {key} {extension} is {dtype} {list(shape)}, "
                            f"expected {storage} {list(expected)}"
                        )
    except (tarfile.TarError, OSError, ValueError, EOFError) as error:
        problems.append(f"{path.name}: unreadable tar ({error.__class__.__name__}: {error})")
    for key in order:
        missing = wanted - members[key]
        if missing:
            problems.append(f"{path.name}: sample {key} lacks {sorted(missing)}")
    return len(order), problems


def verify_cache(cache_dir: str | Path) -> VerifyReport:
    """Recompute every shard's sha256, size and sample count and compare with the manifest;
    check every sample holds each hook with the recorded shape and dtype."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    report = VerifyReport(str(cache_dir))
    listed = set()
    total = 0
    for shard in manifest["shards"]:
        name = shard["name"]
        listed.add(name)
        path = cache_dir / name
        report.n_shards += 1
        if not path.is_file():
            report.problems.append(f"{name}: missing")
            continue
        digest, size = _sha256_file(path)
        if size != shard["bytes"]:
            report.problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
        if digest != shard["sha256"]:
            report.problems.append(f"{name}: sha256 mismatch (the shard's bytes changed)")
        count, problems = _check_samples(path, manifest)
        report.problems += problems
        if count != shard["samples"]:
            report.problems.append(f"{name}: {count} samples, manifest says {shard['samples']}")
        total += count
    report.n_samples = total
    if total != manifest["n_samples"]:
        report.problems.append(f"{total} samples in shards, manifest says {manifest['n_samples']}")
    for path in sorted(cache_dir.iterdir()):
        if SHARD_RE.match(path.name) and path.name not in listed:
            report.notes.append(f"{path.name}: not in the manifest (left by an interrupted run)")
        elif path.name.endswith(TMP_SUFFIX):
            report.notes.append(f"{path.name}: partial file of an interrupted run")
    if not manifest.get("complete"):
        report.notes.append(
            f"the cache is incomplete ({manifest['inputs_done']} inputs done): re-run the same "
            "`prisma-mm cache` command to finish it"
        )
    return report
