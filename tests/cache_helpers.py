"""Shared helpers for the activation-cache tests: tiny images, a seeded tiny model, reading
a cache's samples back directly from its tar shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prisma_mm.cache.manifest import decode_npy, read_manifest, to_storage, to_torch

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def random_image(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def image_folder(root: Path, n: int, nested: bool = True) -> list[Path]:
    """``n`` small PNG images under ``root`` (every other one in a sub-folder)."""
    paths = []
    for i in range(n):
        folder = root / "sub" if nested and i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        random_image(i).save(path)
        paths.append(path)
    return paths


def seeded_tiny_vit(seed: int = 0):
    from prisma_mm.zoo.registry import load_model

    return load_model("tiny-vit", weights=None, seed=seed)


class SlowImages(torch.utils.data.Dataset):
    """Images from a folder, each load taking ``delay`` seconds (to kill a writer mid-way)."""

    def __init__(self, folder: str, delay: float = 0.0) -> None:
        self.paths = sorted(str(p) for p in Path(folder).rglob("*.png"))
        self.delay = delay

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import time

        time.sleep(self.delay)
        return Image.open(self.paths[index]).convert("RGB"), index % 3


def read_samples(cache_dir: Path) -> dict[str, dict]:
    """Every sample of a cache: ``{key: {"meta": dict, hook: float32 array [tokens, d]}}``."""
    manifest = read_manifest(cache_dir)
    out: dict[str, dict] = {}
    for shard in manifest["shards"]:
        with tarfile.open(cache_dir / shard["name"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = out.setdefault(key, {})
                if ext == "meta.json":
                    entry["meta"] = json.loads(data)
                elif ext.endswith(".npy"):  # other members (a generated image) are not hooks
                    hook = manifest["key_hooks"][ext.removesuffix(".npy")]
                    array = decode_npy(data)
                    entry[hook] = to_torch(array.copy(), manifest["dtype"]).float().numpy()
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


SYNTHETIC_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def synthetic_rows(sample: int, n_tokens: int, hook: int) -> np.ndarray:
    """Rows that say where they come from: [sample, token, hook, sample * n_tokens + token]."""
    rows = np.zeros((n_tokens, 4), np.float32)
    rows[:, 0] = sample
    rows[:, 1] = np.arange(n_tokens)
    rows[:, 2] = hook
    rows[:, 3] = sample * n_tokens + np.arange(n_tokens)
    return rows


def synthetic_cache(out: Path, n_samples: int = 40, n_tokens: int = 5, shard_size: int = 6,
                    dtype: str = "float32") -> Path:  # fmt: skip
    """A cache written by the writer's own sink, with rows from :func:`synthetic_rows`."""
    from prisma_mm.cache.manifest import write_manifest
    from prisma_mm.cache.writer import CacheSink, new_manifest

    out.mkdir(parents=True, exist_ok=True)
    shapes = {h: [n_tokens, 4] for h in SYNTHETIC_HOOKS}
    manifest = new_manifest({"name": "synthetic"}, SYNTHETIC_HOOKS, shapes, dtype=dtype)
    write_manifest(out, manifest)
    sink = CacheSink(out, manifest, shard_size)
    for i in range(n_samples):
        arrays = {}
        for h, hook in enumerate(SYNTHETIC_HOOKS):
            tensor = torch.from_numpy(synthetic_rows(i, n_tokens, h)).to(getattr(torch, dtype))
            arrays[hook] = to_storage(tensor, dtype)
        sink.add({"index": i, "position": i, "key": f"k{i:03d}", "source": f"s{i}"}, arrays)
    sink.finish(n_samples, True)
    return out


def batch_mixing(batches: list[np.ndarray], batch_size: int) -> tuple[float, float]:
    """Mean classes per full batch and mean share of its largest class, over ``batches``
    (each an int array of the class of every row)."""
    full = [b for b in batches if len(b) == batch_size]
    assert full, "no full batch to measure"
    classes = np.mean([len(np.unique(b)) for b in full])
    largest = np.mean([np.bincount(b).max() / batch_size for b in full])
    return float(classes), float(largest)


def uniform_mixing(labels: np.ndarray, batch_size: int, repeats: int = 40) -> tuple[float, float]:
    """:func:`batch_mixing` of uniform sampling: batches cut from random permutations of
    ``labels`` (every row's class), ``repeats`` times."""
    rng = np.random.default_rng(12345)
    batches = []
    for _ in range(repeats):
        shuffled = rng.permutation(labels)
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    return batch_mixing(batches, batch_size)


class ShardBytes:
    """Counts the bytes read through the shard files the cache reader opens, by patching
    ``reader._open_shard``. ``payload_only``: count ``readinto`` (the payload buffers) and not
    ``read`` (the tar headers)."""

    def __init__(self, monkeypatch, payload_only: bool = False) -> None:
        from prisma_mm.cache import reader as reader_module

        self.bytes = 0
        opened, counter = reader_module._open_shard, self

        class Counting:
            def __init__(self, path):
                self.raw = opened(path)

            def read(self, size=-1):
                data = self.raw.read(size)
                if not payload_only:
                    counter.bytes += len(data)
                return data

            def readinto(self, buffer):
                got = self.raw.readinto(buffer)
                counter.bytes += got
                return got

            def __getattr__(self, name):
                return getattr(self.raw, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.raw.close()

        monkeypatch.setattr(reader_module, "_open_shard", Counting)

    def take(self) -> int:
        """The bytes counted since the last call."""
        count, self.bytes = self.bytes, 0
        return count


def kill_when(process: subprocess.Popen, ready, what: str, patience_s: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true. Fails the test if the process ends
    first, or (so that a hung child cannot hang the suite) if ``ready()`` stays false for
    ``patience_s``: a guard against hanging, not a measurement."""
    give_up = time.monotonic() + patience_s
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"{what} finished before it could be killed")
            if time.monotonic() > give_up:
                pytest.fail(f"{what} made no progress")
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
