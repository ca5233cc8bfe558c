"""The analysis subcommands end to end through their handlers: a tiny-vit cache of a labelled
image tree, two small SAEs trained on it, then eval (with spliced-in evaluation), stitch,
meta-sae and compare."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import prisma_mm
from prisma_mm.analysis.cli import add_analysis_parsers, load_cache_rows
from prisma_mm.analysis.metrics import evaluate
from prisma_mm.errors import PrismaError
from prisma_mm.sae import TopKSAE, fit_simple, load

HOOK = "blocks.0.hook_resid_post"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prisma-mm")
    add_analysis_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    args = parse(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from prisma_mm.cache import write_cache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis_cli")
    rng = np.random.default_rng(0)
    images = root / "images"
    for label in ("0", "1", "2"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / label / f"{i}.png")
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    weights = root / "tiny-vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, str(weights))
    cache = root / "cache"
    write_cache(model, str(images), cache, [HOOK], progress=False)
    rows = load_cache_rows(str(cache), [HOOK], 10_000, split="all")
    saes = {}
    for name, n_latents in (("small", 16), ("large", 32)):
        sae = TopKSAE(d_in=32, n_latents=n_latents, k=4, seed=n_latents)
        fit_simple(sae, list(rows.split(64)), steps=60, lr=3e-3, progress=False)
        sae.metadata.update({"hook": HOOK, "model": "tiny-vit"})
        sae.save(root / name)
        saes[name] = sae
    yield {"root": root, "images": images, "weights": weights, "cache": cache, "rows": rows}
    torch.set_num_threads(threads)


def test_stitch_sample_is_uniform_over_the_whole_cache(world, tmp_path):
    """The stitching sample draws every row of the split with the same chance: from a cache of
    6 shards (2 images, 34 rows each), a 60-row sample takes rows from every shard, about
    10 each, not the first 60 rows (which all lie in the first two shards)."""
    from prisma_mm.cache import ActivationDataset, write_cache

    cache = tmp_path / "sharded"
    model = prisma_mm.load_model("tiny-vit", weights=str(world["weights"]))
    write_cache(model, str(world["images"]), cache, [HOOK], shard_size=2, progress=False)
    ds = ActivationDataset(cache, HOOK, batch_size=7, shuffle_buffer=0)
    full = torch.cat(list(ds))  # cache order: shard by shard
    sizes = [s["samples"] * 17 for s in ds.manifest["shards"]]
    assert len(sizes) == 6 and sum(sizes) == full.shape[0] == 204
    shard_of = np.repeat(np.arange(6), sizes)
    position = {row.numpy().tobytes(): i for i, row in enumerate(full)}
    assert len(position) == 204  # every row is distinct, so each sampled row has one origin

    sample = load_cache_rows(str(cache), [HOOK], 60, split="all")
    drawn = [position[row.numpy().tobytes()] for row in sample]
    assert len(set(drawn)) == 60  # without replacement
    per_shard = np.bincount(shard_of[drawn], minlength=6)
    assert per_shard.min() >= 3 and per_shard.max() <= 20, per_shard
    assert max(drawn) >= 150  # the old reader took rows 0..59 only
    again = load_cache_rows(str(cache), [HOOK], 60, split="all")
    other = load_cache_rows(str(cache), [HOOK], 60, split="all", seed=1)
    assert torch.equal(again, sample) and not torch.equal(other, sample)
    everything = load_cache_rows(str(cache), [HOOK], 10**12, split="all")  # no 10^12-row buffer
    assert sorted(position[r.numpy().tobytes()] for r in everything) == list(range(204))


def test_eval_writes_report_with_spliced_results(world, capsys):
    root = world["root"]
    out = root / "report.json"
    code = run(
        [
            "eval",
            str(root / "small"),
            "--cache",
            str(world["cache"]),
            "--split",
            "all",
            "--out",
            str(out),
            "--data",
            str(world["images"]),
            "--weights",
            str(world["weights"]),
            "--quiet",
        ]  # fmt: skip
    )
    assert code == 0
    report = json.loads(out.read_text())
    want = evaluate(load(root / "small"), [world["rows"]], progress=False)
    assert report["metrics"]["n_tokens"] == world["rows"].shape[0] == 12 * 17
    assert report["metrics"]["fvu"] == pytest.approx(want.fvu, rel=1e-6)
    assert report["metrics"]["l0"] == pytest.approx(want.l0)
    spliced = report["spliced"]
    assert spliced["n_images"] == 12 and spliced["task"] == "classifier"
    assert spliced["max_abs_error_with_error"] < 1e-5
    assert spliced["mean_source"] == "cache"
    assert (root / "report_density.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    assert "fvu" in captured.out and "spliced into tiny-vit" in captured.out
    assert "warning" not in captured.err  # the same weights as the cache's


def test_eval_split_and_mistakes(world):
    root = world["root"]
    code = run(
        [
            "eval",
            str(root / "large"),
            "--cache",
            str(world["cache"]),
            "--split",
            "eval",
            "--eval-fraction",
            "0.5",
            "--quiet",
        ]  # fmt: skip
    )
    assert code == 0
    report = json.loads((root / "large" / "eval.json").read_text())
    assert 0 < report["metrics"]["n_tokens"] < 12 * 17
    with pytest.raises(PrismaError, match="try --split all"):
        run(["eval", str(root / "large"), "--cache", str(world["cache"]), "--split", "eval",
             "--eval-fraction", "0.0", "--quiet"])  # fmt: skip
    with pytest.raises(PrismaError, match="not a saved dictionary"):
        run(["eval", str(root), "--cache", str(world["cache"])])
    with pytest.raises(PrismaError, match="hook"):
        run(["eval", str(root / "small"), "--cache", str(world["cache"]), "--hook", "nope"])


def test_stitch_meta_sae_compare(world, capsys):
    root = world["root"]
    assert run(
        ["stitch", str(root / "small"), str(root / "large"), "--cache", str(world["cache"]),
         "--split", "all", "--out", str(root / "stitch"), "--max-points", "4", "--quiet",
         "--data", str(world["images"]), "--weights", str(world["weights"])]
    ) == 0  # fmt: skip
    report = json.loads((root / "stitch" / "stitch.json").read_text())
    confusion = report["classes"]["confusion"]
    assert sum(confusion.values()) == 32
    classes = report["classes"]
    assert classes["n_tokens"] == 12 * 17  # the default sample is larger than this cache
    assert classes["n_novel_test"] + classes["n_reconstruction_test"] + classes["n_inactive"] == 32
    assert classes["n_fired_large"] == 32 - classes["n_inactive"]
    assert 0 < classes["n_fired_small"] <= classes["n_small"] == 16
    assert "fired on the sample" in capsys.readouterr().out
    assert report["curve"][0]["n_latents"] == 16 and report["curve"][-1]["n_latents"] == 32
    assert isinstance(report["monotone"], bool)
    assert len(report["curve"]) == 4 and all(row["loss"] > 0 for row in report["curve"])
    assert (root / "stitch" / "stitch.png").is_file()

    assert run(["meta-sae", str(root / "large"), "--steps", "30", "--quiet"]) == 0
    meta = json.loads((root / "large" / "meta_sae" / "meta_sae.json").read_text())
    assert meta["meta"]["n_meta"] == 8 and len(meta["latents"]) == 32
    assert load(root / "large" / "meta_sae" / "meta_sae").cfg.n_latents == 8

    out = root / "compare.json"
    assert run(["compare", str(root / "large"), str(root / "large"), "--out", str(out)]) == 0
    compared = json.loads(out.read_text())
    assert compared["fraction_shared"] == 1.0 and compared["n_matched"] == 32
    assert run(["compare", str(root / "small"), str(root / "large")]) == 0
    assert "fraction shared" in capsys.readouterr().out
