"""Activation cache throughput and memory, side by side in one run.

1. Writing, on a ViT-B/16-shaped model (random init) at 224 px: bare forward images/s vs
   cache-writing images/s (JPEG folder -> DataLoader decode -> forward -> 12 resid_post
   hooks in fp16 -> shards, stats, manifest); target ratio >= 0.9.
2. Reading: token rows/s at d=768 fp16 through a DataLoader with one worker, 4096-row
   batches, with and without the shuffle buffer; target >= 200,000 rows/s.
3. Memory: peak RSS of a process reading a ~4 GB cache vs a ~1 GB cache (written
   synthetically with the writer's own sink); target: within 100 MB of each other.
4. The sink alone (shards, sha256, statistics; no model): synthetic d=768 fp16 activations
   through cache/shards.py's CacheSink vs writing the same bytes sequentially to the same
   disk (one file, fsynced); target ratio >= 0.7.
5. Validation at 1% held out: bytes the eval split reads against the cache's size.

Usage: python benchmarks/cache.py [--images 64] [--batch-size 16] [--small-gb 1] [--big-gb 4]
Caches are written to a temporary directory (--tmp) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prisma_mm.cache import ActivationDataset, write_cache
from prisma_mm.cache.manifest import write_manifest
from prisma_mm.cache.shards import CacheSink
from prisma_mm.cache.stats import sample_moments_numpy
from prisma_mm.cache.writer import new_manifest
from prisma_mm.zoo.registry import load_model

VIT_B16_CARD = "vit-b16-augreg2-in21k-ft-in1k"  # vit_base_patch16_224; weights=None: random init
RESID_POST = [f"blocks.{i}.hook_resid_post" for i in range(12)]
N_TOKENS, D = 197, 768


def make_jpegs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def bench_writing(tmp: Path, n_images: int, batch_size: int, workers: int, rounds: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(VIT_B16_CARD, weights=None, device=device)
    folder = tmp / "jpegs"
    make_jpegs(folder, n_images)
    images = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]
    batches = [model.preprocess(images[i : i + batch_size]) for i in range(0, n_images, batch_size)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                model(x.to(device))
        sync()
        return n_images / (time.perf_counter() - start)

    def cached(round_: int, limit: int | None = None) -> float:
        """Seconds to write a cache of ``limit`` images (all by default), setup included."""
        out = tmp / f"cache-{round_}-{limit}"
        start = time.perf_counter()
        write_cache(
            model, str(folder), out, RESID_POST, batch_size=batch_size, workers=workers,
            shard_size=64, progress=False, limit=limit,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        shutil.rmtree(out)
        return seconds

    bare()  # warm-up
    bare_rates, cache_rates, steady_rates, setups = [], [], [], []
    for round_ in range(rounds):  # interleaved, so a load spike on the machine hits both
        bare_rates.append(bare())
        whole = cached(round_)
        one_batch = cached(round_, limit=batch_size)
        cache_rates.append(n_images / whole)
        # the difference cancels the fixed setup (weights fingerprint, probe forward, workers)
        steady_rates.append((n_images - batch_size) / (whole - one_batch))
        setups.append(one_batch - batch_size / bare_rates[-1])
    best_bare = max(bare_rates)
    print(f"[write] device {device}, {n_images} JPEGs 256px -> 224px, batch {batch_size}, "
          f"{workers} decode worker(s), 12 resid_post hooks fp16, best of {rounds}")  # fmt: skip
    print(f"  bare forward                  {best_bare:8.2f} images/s")
    for label, rates in (("cache writing, end to end", cache_rates),
                         ("cache writing, steady state", steady_rates)):  # fmt: skip
        best = max(rates)
        print(f"  {label:29s} {best:8.2f} images/s = {best / best_bare:.3f} x bare "
              f"({best * N_TOKENS * 12:,.0f} token rows/s over 12 hooks)")  # fmt: skip
    print(f"  (setup per run: about {min(setups):.1f} s; target ratio >= 0.9)")


def synthetic_cache(out: Path, gigabytes: float, shard_size: int = 256,
                    precomputed: bool = True) -> int:  # fmt: skip
    """A single-hook d=768 fp16 cache of about ``gigabytes``, written by the writer's sink
    (``precomputed``: with each sample's moments given, as the GPU computes them; else the
    sink computes them on the CPU, as without a GPU)."""
    out.mkdir(parents=True)
    hook = "blocks.11.hook_resid_post"
    manifest = new_manifest({"name": "synthetic"}, [hook], {hook: [N_TOKENS, D]})
    write_manifest(out, manifest)
    sink = CacheSink(out, manifest, shard_size)
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((N_TOKENS, D)).astype(np.float16) for _ in range(8)]
    moments = [{k: v[0] for k, v in sample_moments_numpy(p[None], "float16").items()} for p in pool]
    n_samples = int(gigabytes * 1e9 / (N_TOKENS * D * 2))
    for i in range(n_samples):
        record = {"index": i, "position": i, "key": f"{i:08d}", "source": "synthetic"}
        sink.add(record, {hook: pool[i % 8]}, {hook: moments[i % 8]} if precomputed else None)
    sink.finish(n_samples, True)
    return n_samples


class _Ceiling(torch.utils.data.IterableDataset):
    """Ready-made batches with no reading at all: what a DataLoader worker can hand over."""

    def __init__(self, n_batches: int, dtype: torch.dtype) -> None:
        self.n_batches, self.dtype = n_batches, dtype

    def __iter__(self):
        from prisma_mm.cache.reader import _new_tensor

        source = torch.zeros(4096, D, dtype=torch.float16)
        for _ in range(self.n_batches):
            batch = _new_tensor((4096, D), self.dtype)  # handed over exactly as the reader does
            batch.copy_(source)
            yield batch


def _rate(dataset) -> tuple[int, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    start = time.perf_counter()
    rows = sum(len(batch) for batch in loader)
    return rows, rows / (time.perf_counter() - start)


def bench_reading(cache: Path) -> None:
    print("[read] d=768 fp16 cache, batches of 4096 rows, DataLoader with 1 worker")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside a DataLoader worker
    ds = ActivationDataset(cache, batch_size=4096)
    start = time.perf_counter()
    rows = sum(len(batch) for batch in ds)
    rate = rows / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    print(f"  {'float32, shuffled, in-process':34s} {rate:12,.0f} rows/s (no worker hand-over)")
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for buffer in (1 << 17, 0):
            ds = ActivationDataset(cache, batch_size=4096, shuffle_buffer=buffer, dtype=dtype)
            rows, rate = _rate(ds)
            label = f"{name}, shuffle buffer {buffer:,}" if buffer else f"{name}, no shuffling"
            print(f"  {label:34s} {rate:12,.0f} rows/s ({rows:,} rows; target >= 200,000)")
        _, ceiling = _rate(_Ceiling(100, dtype))
        print(
            f"  {name + ', worker hand-over only':34s} {ceiling:12,.0f} rows/s (no reading: the ceiling)"
        )


def sequential_write(path: Path, n_bytes: int, chunk: int = N_TOKENS * D * 2) -> float:
    """Seconds to write ``n_bytes`` to one file in ``chunk``-sized writes and fsync it."""
    data = np.random.default_rng(1).integers(0, 256, chunk, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(n_bytes // chunk):
            handle.write(data)
        handle.write(data[: n_bytes % chunk])
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def bench_sink(tmp: Path, gigabytes: float, rounds: int) -> None:
    print(f"[sink] {gigabytes:.1f} GB of d=768 fp16 [197, 768] samples, shards of 256, no model")
    results: dict[str, list[float]] = {"sequential": [], "sink": [], "sink_cpu_stats": []}
    size = 0
    for round_ in range(rounds):  # interleaved, so a load spike on the machine hits every one
        for label, precomputed in (("sink", True), ("sink_cpu_stats", False)):
            out = tmp / f"sink-{round_}-{label}"
            start = time.perf_counter()
            synthetic_cache(out, gigabytes, precomputed=precomputed)
            seconds = time.perf_counter() - start
            size = int(sum(p.stat().st_size for p in out.iterdir()))
            shutil.rmtree(out)
            results[label].append(size / seconds)
        results["sequential"].append(size / sequential_write(tmp / "sequential.bin", size))
    best = {k: max(v) for k, v in results.items()}
    print(f"  sequential write + fsync        {best['sequential'] / 1e6:8.0f} MB/s")
    print(f"  sink, moments given (GPU path)  {best['sink'] / 1e6:8.0f} MB/s = "
          f"{best['sink'] / best['sequential']:.2f} x sequential (target >= 0.7)")  # fmt: skip
    print(f"  sink, moments on the CPU        {best['sink_cpu_stats'] / 1e6:8.0f} MB/s = "
          f"{best['sink_cpu_stats'] / best['sequential']:.2f} x sequential")  # fmt: skip


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar")).split()[1])


def bench_validation(cache: Path) -> None:
    print("[validation] eval split at eval_fraction 0.01, read in order")
    start = _bytes_read()
    rows = sum(len(b) for b in ActivationDataset(cache, split="eval", eval_fraction=0.01,
                                                 shuffle_buffer=0))  # fmt: skip
    read = _bytes_read() - start
    total = sum(p.stat().st_size for p in cache.glob("shard-*.tar"))
    used = rows * D * 2
    print(f"  read {read / 1e6:,.1f} MB of a {total / 1e6:,.0f} MB cache = {read / total:.2%} "
          f"({rows:,} rows, {used / 1e6:,.1f} MB of rows used: {read / used:.2f} x)")  # fmt: skip


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process.
RSS_SCRIPT = """
import sys, torch
from prisma_mm.cache import ActivationDataset
rows = 0
for batch in ActivationDataset(sys.argv[1], batch_size=4096):
    rows += len(batch)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(rows, int(status["VmHWM"].split()[0]))
"""


def peak_rss(cache: Path) -> tuple[int, float]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(cache)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows, kilobytes = result.stdout.split()
    return int(rows), int(kilobytes) / 1024


def cache_bytes(cache: Path) -> float:
    return sum(p.stat().st_size for p in cache.glob("shard-*.tar")) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small-gb", type=float, default=1.0)
    parser.add_argument("--big-gb", type=float, default=4.0)
    parser.add_argument("--tmp", default=None, help="where to write the temporary caches")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["write", "read", "rss", "sink", "validation"]
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="prisma-cache-bench-", dir=args.tmp))
    try:
        if "write" not in args.skip:
            bench_writing(tmp, args.images, args.batch_size, args.workers, args.rounds)
        if "sink" not in args.skip:
            bench_sink(tmp, args.small_gb, args.rounds)
        if {"read", "rss", "validation"} <= set(args.skip):
            return
        small = tmp / "small"
        start = time.perf_counter()
        synthetic_cache(small, args.small_gb)
        print(f"(wrote a {cache_bytes(small):.2f} GB cache in {time.perf_counter() - start:.1f} s)")
        if "read" not in args.skip:
            bench_reading(small)
        if "validation" not in args.skip:
            bench_validation(small)
        if "rss" not in args.skip:
            big = tmp / "big"
            synthetic_cache(big, args.big_gb)
            rows_small, rss_small = peak_rss(small)
            rows_big, rss_big = peak_rss(big)
            print(
                "[memory] peak RSS of one process reading every row (shuffle buffer 131,072 rows)"
            )
            print(
                f"  {cache_bytes(small):5.2f} GB cache  {rss_small:8.1f} MB  ({rows_small:,} rows)"
            )
            print(f"  {cache_bytes(big):5.2f} GB cache  {rss_big:8.1f} MB  ({rows_big:,} rows)")
            print(f"  difference     {rss_big - rss_small:8.1f} MB  (target: within 100 MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
