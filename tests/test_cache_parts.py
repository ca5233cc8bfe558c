"""A cache written by 2 cooperating CPU processes (``--part i/N`` by hand, or torchrun-style
RANK / WORLD_SIZE variables) equals the one-process cache: the same keys, bit-identical
float32 activations, the same statistics; a part SIGKILLed mid-way and re-run still merges
to the uninterrupted result; the merged cache verifies and trains a TopK SAE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import HOOKS, SlowImages, image_folder, kill_when, read_samples, seeded_tiny_vit

from prisma_mm.cache import read_manifest, verify_cache, write_cache
from prisma_mm.cache.parts import merge_parts, parse_part, resolve_part
from prisma_mm.errors import PrismaError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N_IMAGES = 20
OPTIONS = {"dtype": "float32", "batch_size": 2, "shard_size": 3, "progress": False}
CLI = ["--model", "tiny-vit", "--weights", "none", "--hooks", ",".join(HOOKS), "--dtype",
       "float32", "--batch-size", "2", "--shard-size", "3", "--workers", "0", "--quiet"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parts") / "images"
    image_folder(folder, N_IMAGES)
    return folder


@pytest.fixture(scope="module")
def reference(images) -> Path:
    """The one-process cache of the same command."""
    out = images.parent / "one"
    write_cache("tiny-vit", str(images), out, HOOKS, weights=None, device="cpu", **OPTIONS)
    return out


def _run_parts(images: Path, out: Path, envs: list[dict[str, str]], extra: list[list[str]]):
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prisma_mm.cli",
                "cache",
                *CLI,
                "--data",
                str(images),
                "--out",
                str(out),
                *args,
            ],
            env=_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for env, args in zip(envs, extra)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]


def _assert_equal_caches(parts: Path, reference: Path) -> None:
    merged, one = read_manifest(parts), read_manifest(reference)
    assert merged["complete"] and merged["n_samples"] == one["n_samples"] == N_IMAGES
    assert merged["inputs_done"] == N_IMAGES and len(merged["parts"]) == 2
    # shards of both parts, named relative to the cache dir, covering one visiting order
    assert [s["name"].split("/")[:2] for s in merged["shards"]][0] == ["parts", "part-0000-of-0002"]
    ranges = [s["inputs"] for s in merged["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == N_IMAGES
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    got, expected = read_samples(parts), read_samples(reference)
    assert sorted(got) == sorted(expected)
    for key, sample in expected.items():
        assert got[key]["meta"] == sample["meta"]  # same position, index, source
        for hook in HOOKS:
            np.testing.assert_array_equal(got[key][hook], sample[hook])  # bitwise, float32
    for hook in HOOKS:
        a, b = merged["stats"][hook], one["stats"][hook]
        assert a["count"] == b["count"] == N_IMAGES * 17
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a["var"], b["var"], rtol=1e-9)
        np.testing.assert_allclose(a["mean_sq_norm"], b["mean_sq_norm"], rtol=1e-12)
    report = verify_cache(parts)
    assert report.ok and report.n_samples == N_IMAGES, report.problems


def test_two_parts_by_hand_equal_the_one_process_cache(images, reference, tmp_path):
    out = tmp_path / "parts"
    _run_parts(images, out, [{}, {}], [["--part", "0/2"], ["--part", "1/2"]])
    _assert_equal_caches(out, reference)
    part0 = read_manifest(out / "parts" / "part-0000-of-0002")
    assert part0["part"]["inputs"] == [0, N_IMAGES // 2] and part0["inputs_done"] == 10
    # `cache merge` rebuilds the same manifest for parts run separately
    before = read_manifest(out)
    (out / "manifest.json").unlink()
    from prisma_mm.cli import main

    assert main(["cache", "merge", "--out", str(out)]) == 0
    after = read_manifest(out)
    assert {k: v for k, v in after.items() if k != "updated"} == {
        k: v for k, v in before.items() if k != "updated"
    }


def test_torchrun_variables_make_the_parts(images, reference, tmp_path):
    out = tmp_path / "ranks"
    envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)} for r in range(2)]
    _run_parts(images, out, envs, [[], []])
    _assert_equal_caches(out, reference)
    # a part re-run after the merge finds itself complete and leaves the merge as it was
    shards = read_manifest(out)["shards"]
    again = write_cache("tiny-vit", str(images), out, HOOKS, weights=None, device="cpu",
                        part="0/2", **OPTIONS)  # fmt: skip
    assert again["shards"] == shards and read_manifest(out)["shards"] == shards


def test_part_resolution_from_flags_and_launchers():
    assert parse_part("3/8") == (3, 8) and parse_part((0, 1)) == (0, 1)
    assert resolve_part(None, {}) == (0, 1, None)
    assert resolve_part(None, {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (5, 8, 1)
    slurm = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "16"}  # fmt: skip
    assert resolve_part(None, slurm) == (9, 16, 1)
    # an sbatch script's batch step (no srun): the job's task count alone makes no parts
    assert resolve_part(None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == (0, 1, None)
    assert resolve_part("2/4", {}) == (2, 4, None)  # by hand: the GPU is the part's index
    for bad in ("3/2", "x", "1/0", "-1/2", "2"):
        with pytest.raises(PrismaError, match="--part"):
            parse_part(bad)
    with pytest.raises(PrismaError, match="RANK=4 is outside"):
        resolve_part(None, {"RANK": "4", "WORLD_SIZE": "2"})


# ----- SIGKILL one part, re-run it, merge -----------------------------------------------------
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from cache_helpers import HOOKS, SlowImages, seeded_tiny_vit
from prisma_mm.cache import write_cache
write_cache(seeded_tiny_vit(0), SlowImages({folder!r}, {delay}), {out!r}, HOOKS,
            part={part!r}, **{options!r})
"""


def _part_script(folder: Path, out: Path, part: str, delay: float) -> list[str]:
    script = SCRIPT.format(tests=str(TESTS), folder=str(folder), delay=delay, out=str(out),
                           part=part, options=OPTIONS)  # fmt: skip
    return [sys.executable, "-c", textwrap.dedent(script)]


def _committed(part_dir: Path) -> int:
    try:
        return len(json.loads((part_dir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_part_killed_mid_way_and_re_run_merges_to_the_uninterrupted_cache(images, tmp_path):
    reference = tmp_path / "one"
    write_cache(seeded_tiny_vit(0), SlowImages(str(images)), reference, HOOKS, **OPTIONS)
    out = tmp_path / "parts"
    part0 = out / "parts" / "part-0000-of-0002"
    killed = subprocess.Popen(_part_script(images, out, "0/2", 0.05), env=_env())
    other = subprocess.Popen(_part_script(images, out, "1/2", 0.0), env=_env())
    kill_when(killed, lambda: _committed(part0) >= 1, "part 0")
    assert other.wait(timeout=300) == 0
    # part 1 finished alone: nothing merged yet, and `cache merge` refuses in one line
    assert not (out / "manifest.json").exists()
    assert not read_manifest(part0)["complete"]
    with pytest.raises(PrismaError, match="part 0/2 is incomplete"):
        merge_parts(out)
    # the same part, re-run: resumes and, being the last to finish, merges
    final = write_cache(seeded_tiny_vit(0), SlowImages(str(images)), out, HOOKS, part="0/2",
                        **OPTIONS)  # fmt: skip
    assert final["complete"] and len(final["parts"]) == 2 and final["n_samples"] == N_IMAGES
    _assert_equal_caches(out, reference)
    # the merged cache trains a TopK SAE for a few steps through the recipe
    from prisma_mm.train.cli import train_cli

    root = tmp_path / "run"
    train_cli(["fit", "--config", "tiny-vit-topk", f"--data.cache_dir={out}",
               f"--trainer.default_root_dir={root}", "--trainer.max_steps=3",
               "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", "--data.batch_size=32"])  # fmt: skip
    saved = list(root.rglob("weights.safetensors"))
    assert saved, "training saved no dictionary"
    from safetensors.torch import load_file

    weights = load_file(saved[0])
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_tar_shards_are_split_between_parts_each_opening_only_its_own(tmp_path, monkeypatch):
    import webdataset.tariterators as tariterators
    from test_cache_sources import _tar_shards

    from prisma_mm.cache.inputs import part_shards
    from prisma_mm.data.sources import open_source

    _tar_shards(tmp_path, n_shards=4, per_shard=5)
    pattern = str(tmp_path / "train-{000..003}.tar")
    model = seeded_tiny_vit(0)
    hook = HOOKS[1]
    one = write_cache(model, pattern, tmp_path / "one", hook, **OPTIONS)
    order = part_shards(open_source(pattern), 0)
    assert [part_shards(open_source(pattern), 0, i, 2) for i in range(2)] == [
        order[0::2],
        order[1::2],  # webdataset's split_by_node rule over the seeded order
    ]
    opened: list[int] = []
    real_opener = tariterators.url_opener

    def spy(data, *args, **kwargs):
        for item in real_opener(data, *args, **kwargs):
            opened.append(int(item["url"].rsplit("-", 1)[1][:3]))
            yield item

    monkeypatch.setattr(tariterators, "url_opener", spy)
    out = tmp_path / "parts"
    for part in range(2):
        opened.clear()
        manifest = write_cache(model, pattern, out, hook, part=f"{part}/2", **OPTIONS)
        assert sorted(opened) == sorted(order[part::2])  # no part reads another's shards
    assert manifest["complete"] and manifest["n_samples"] == 20 and len(manifest["parts"]) == 2
    ranges = [s["inputs"] for s in manifest["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 20
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    got, expected = read_samples(out), read_samples(tmp_path / "one")
    assert sorted(got) == sorted(expected) and one["n_samples"] == 20
    for key in expected:
        np.testing.assert_array_equal(got[key][hook], expected[key][hook])
    assert verify_cache(out).ok
    with pytest.raises(PrismaError, match="fewer than the 5 parts"):
        write_cache(model, pattern, tmp_path / "five", hook, part="0/5", **OPTIONS)
