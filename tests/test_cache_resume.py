"""Kill the cache writer with SIGKILL at several moments, re-run it, and get exactly the
cache of an uninterrupted run: same keys in the same order, same arrays, no duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from cache_helpers import HOOKS, SlowImages, image_folder, kill_when, read_samples, seeded_tiny_vit

from prisma_mm.cache import read_manifest, verify_cache, write_cache

SHARD_SIZE = 3
OPTIONS = {"dtype": "float32", "batch_size": 2, "shard_size": SHARD_SIZE, "progress": False}

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from cache_helpers import HOOKS, SlowImages, seeded_tiny_vit
from prisma_mm.cache import write_cache
write_cache(seeded_tiny_vit(0), SlowImages({folder!r}, {delay}), {out!r}, HOOKS, **{options!r})
"""


def _n_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _partial_shard(out: Path) -> bool:
    """A shard beyond the committed ones is being written (its .tmp holds data)."""
    name = f"shard-{_n_shards(out):06d}.tar.tmp"
    try:
        return (out / name).stat().st_size > 0
    except OSError:
        return False


def _run_and_kill(folder: Path, out: Path, condition, delay: float = 0.05) -> None:
    script = SCRIPT.format(
        tests=str(Path(__file__).parent), folder=str(folder), delay=delay, out=str(out),
        options=OPTIONS,
    )  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    kill_when(process, lambda: condition(out), "the writer")


def test_sigkill_at_several_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    folder = tmp_path / "images"
    image_folder(folder, 24)
    reference_dir = tmp_path / "reference"
    reference = write_cache(
        seeded_tiny_vit(0), SlowImages(str(folder)), reference_dir, HOOKS, **OPTIONS
    )
    assert reference["n_shards"] == 8

    out = tmp_path / "killed"
    # 1: once two shards are committed, in the middle of the next one (a partial .tmp on disk)
    _run_and_kill(folder, out, lambda d: _n_shards(d) >= 2 and _partial_shard(d))
    assert list(out.glob("*.tmp")), "killed mid-shard: a partial shard is left"
    first = _n_shards(out)
    assert first >= 2 and verify_cache(out).ok
    # 2: the re-run, the moment it has committed two more shards (its manifest just replaced)
    _run_and_kill(folder, out, lambda d: _n_shards(d) >= first + 2)
    assert _n_shards(out) >= first + 2 and verify_cache(out).ok
    # the same call, run to the end
    final = write_cache(seeded_tiny_vit(0), SlowImages(str(folder)), out, HOOKS, **OPTIONS)
    assert final["complete"] and final["n_samples"] == 24 and final["inputs_done"] == 24
    assert not list(out.glob("*.tmp"))
    assert [s["inputs"] for s in final["shards"]] == [s["inputs"] for s in reference["shards"]]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        s["name"] for s in reference["shards"]
    ]
    expected, got = read_samples(reference_dir), read_samples(out)
    assert list(got) == list(expected)  # same keys, same order, none twice
    for key, sample in expected.items():
        assert got[key]["meta"] == sample["meta"]
        for hook in HOOKS:
            np.testing.assert_allclose(got[key][hook], sample[hook], atol=1e-5)
    for hook in HOOKS:
        np.testing.assert_allclose(
            final["stats"][hook]["var"], reference["stats"][hook]["var"], rtol=1e-6
        )
    assert verify_cache(out).ok and read_manifest(out)["n_samples"] == 24
