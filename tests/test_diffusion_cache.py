"""Caching from prompts on the tiny SDXL-structured card: one sample per prompt x step with its
provenance, the generated images kept as members, every prompt format, parts and random:K as
for image caches, a kill mid-run resumed to the uninterrupted result, and training a recipe
from the cache through the CLI."""

from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import kill_when, read_samples
from PIL import Image

from prisma_mm.cache import read_manifest, verify_cache, write_cache
from prisma_mm.cli import main
from prisma_mm.zoo.diffusion import HookedPipeline, load_pipeline

PROMPTS = ["a photo of a cat", "a red car", "a blue house", "a dog on the street",
           "a green tree", "a city at night"]  # fmt: skip
HOOKS = ["unet.down.2.1.hook_update", "unet.up.0.0.hook_update"]
TWO_STEPS = {"steps": 2, "guidance": 0.0}
OPTIONS = {"dtype": "float32", "shard_size": 3, "progress": False, "workers": 0}


class Forked:
    """``target()`` in a forked child, which inherits the loaded pipeline (no second import of
    diffusers), with the part of ``subprocess.Popen`` that :func:`kill_when` uses."""

    def __init__(self, target) -> None:
        self.process = multiprocessing.get_context("fork").Process(target=target, daemon=True)
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self) -> None:
        self.process.join()


@pytest.fixture(scope="module")
def hp() -> HookedPipeline:
    torch.set_num_threads(1)
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")
    return path


def test_cli_caches_prompt_x_step_samples_with_provenance_images_and_trains_a_recipe(
    hp, tmp_path, capsys
):
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text("id,caption\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    out = tmp_path / "cache"
    argv = ["cache", "--model", "tiny-sdxl", "--data", str(csv_file), "--prompt-column",
            "caption", "--hooks", ",".join(HOOKS), "--out", str(out), "--steps", "2",
            "--guidance", "5", "--seeds", "0,1", "--keep-images", "--dtype", "float32",
            "--shard-size", "3", "--batch-size", "4", "--workers", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    manifest = read_manifest(out)
    assert manifest["n_samples"] == len(PROMPTS) * 2 * 2  # prompts x seeds x steps
    assert manifest["generation"] == {"steps": 2, "guidance": 5.0, "size": [32, 32],
                                      "keep_images": True}  # fmt: skip
    assert manifest["layout"]["grid"] == [1, 4, 4]
    assert manifest["shapes"] == {h: [16, 32] for h in HOOKS}
    assert manifest["source"]["column"] == "caption" and manifest["source"]["seeds"] == [0, 1]
    # shards close at input boundaries: the two steps of an input share a shard
    assert all(s["samples"] % 2 == 0 for s in manifest["shards"])
    assert verify_cache(out).ok
    samples = read_samples(out)
    metas = {key: s["meta"] for key, s in samples.items()}
    assert {(m["prompt"], m["seed"]) for m in metas.values()} == {
        (p, seed) for p in PROMPTS for seed in (0, 1)
    }
    schedule = [999.0, 499.0]  # trailing spacing, 2 steps
    assert sorted({(m["step"], m["timestep"]) for m in metas.values()}) == list(
        zip(range(2), schedule)
    )
    # the values are the pipeline's own cond-half activations at that prompt, seed and step
    key, meta = next((k, m) for k, m in metas.items() if m["prompt"] == "a red car"
                     and m["seed"] == 1 and m["step"] == 1)  # fmt: skip
    images, acts = hp.run_with_cache("a red car", HOOKS, seeds=1, steps=2, guidance=5.0)
    for hook in HOOKS:
        np.testing.assert_allclose(samples[key][hook], acts[hook][0, 1].numpy(),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    # the image is a member of the input's step-0 sample
    assert meta["image"] == key.replace("-s001", "-s000")
    png = _member(out, meta["image"], "png")
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    expected = (images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1

    # the tiny recipe trains from this cache through the CLI's training path
    from prisma_mm.train.cli import train_cli

    cli = train_cli(["fit", "--config", "tiny-sdxl-topk", f"--data.cache_dir={out}",
                     f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.max_steps=3",
                     "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false"])  # fmt: skip
    assert cli.trainer.global_step == 3 and cli.model.dictionary.cfg.d_in == 32
    assert cli.model.dictionary.cfg.k == 4
    import prisma_mm.sae

    saved = prisma_mm.sae.load(tmp_path / "runs" / "tiny-sdxl-topk" / "version_0" / "dictionary")
    assert saved.metadata["model"] == "tiny-sdxl"
    assert saved.metadata["hook"] == "unet.down.2.1.hook_update"


def _member(cache: Path, key: str, extension: str) -> bytes:
    for shard in read_manifest(cache)["shards"]:
        with tarfile.open(cache / shard["name"]) as tar:
            try:
                return tar.extractfile(f"{key}.{extension}").read()
            except KeyError:
                continue
    raise AssertionError(f"no member {key}.{extension}")


def test_jsonl_and_caption_tars_parts_and_random_tokens_match_one_process(hp, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "n": i}) + "\n" for i, p in
                             enumerate(PROMPTS)))  # fmt: skip
    options = {**OPTIONS, "tokens": "random:5", "batch_size": 2}
    whole = write_cache(hp, jsonl, tmp_path / "whole", HOOKS, generation=TWO_STEPS, **options)
    for part in ("1/2", "0/2"):
        merged = write_cache(hp, jsonl, tmp_path / "parts", HOOKS, part=part,
                             generation=TWO_STEPS, **options)  # fmt: skip
    assert merged["n_samples"] == whole["n_samples"] == len(PROMPTS) * 2
    assert merged["shapes"] == {h: [5, 32] for h in HOOKS}
    one, parts = read_samples(tmp_path / "whole"), read_samples(tmp_path / "parts")
    assert sorted(one) == sorted(parts)
    tokens = {key: tuple(sample["meta"]["tokens"]) for key, sample in one.items()}
    assert len(set(tokens.values())) > 1  # each sample its own 5 of the 16 tokens
    for key, sample in one.items():
        assert parts[key]["meta"]["tokens"] == sample["meta"]["tokens"]
        for hook in HOOKS:
            # other batches, so float sums in another order: equal to rounding
            np.testing.assert_allclose(parts[key][hook], sample[hook], rtol=1e-4, atol=1e-5)

    # webdataset captions: a txt member per sample, generated as the text file would be
    shard = tmp_path / "captions-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, prompt in enumerate(PROMPTS[:2]):
            data = prompt.encode()
            info = tarfile.TarInfo(f"sample{i:03d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    captions = write_cache(hp, str(shard), tmp_path / "captions", HOOKS[:1],
                           generation={"steps": 1}, **{**OPTIONS, "batch_size": 2})  # fmt: skip
    assert captions["source"]["type"] == "tar-prompts" and captions["n_samples"] == 2
    got = {s["meta"]["prompt"]: s for s in read_samples(tmp_path / "captions").values()}
    assert sorted(got) == sorted(PROMPTS[:2])
    _, acts = hp.run_with_cache(PROMPTS[0], HOOKS[:1], steps=1)
    np.testing.assert_allclose(got[PROMPTS[0]][HOOKS[0]], acts[HOOKS[0]][0, 0].numpy(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def _n_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _partial_shard(out: Path) -> bool:
    try:
        return (out / f"shard-{_n_shards(out):06d}.tar.tmp").stat().st_size > 0
    except OSError:
        return False


def test_killed_prompt_cache_resumes_to_the_uninterrupted_result(hp, prompts_file, tmp_path):
    reference = write_cache(hp, prompts_file, tmp_path / "reference", HOOKS, batch_size=1,
                            generation=TWO_STEPS, **OPTIONS)  # fmt: skip
    assert reference["n_shards"] == 3  # 3 samples per shard, closed after each input's 2 steps
    out = tmp_path / "killed"
    process = Forked(
        lambda: write_cache(
            hp, prompts_file, out, HOOKS, batch_size=1, generation=TWO_STEPS, **OPTIONS
        )  # fmt: skip
    )
    kill_when(process, lambda: _n_shards(out) >= 1 and _partial_shard(out), "the prompt cache")
    assert list(out.glob("*.tmp")) and verify_cache(out).ok
    assert 1 <= _n_shards(out) < 3
    final = write_cache(hp, prompts_file, out, HOOKS, batch_size=1, generation=TWO_STEPS,
                        **OPTIONS)  # fmt: skip
    assert final["complete"] and final["n_samples"] == reference["n_samples"] == 12
    assert [s["inputs"] for s in final["shards"]] == [s["inputs"] for s in reference["shards"]]
    expected, got = read_samples(tmp_path / "reference"), read_samples(out)
    assert list(got) == list(expected)
    for key in expected:
        assert got[key]["meta"] == expected[key]["meta"]
        for hook in HOOKS:
            assert np.array_equal(got[key][hook], expected[key][hook]), key
