"""`prisma-mm eval`, `stitch`, `meta-sae`, `compare`, `demo` and `toyworld` refuse bad input
in one line, before any work, and leave what is already written as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bad_input import Case, check_case
from PIL import Image
from safetensors.torch import save_file

import prisma_mm
from prisma_mm.sae import TopKSAE

HOOK = "blocks.0.hook_resid_post"
CACHE = ("--cache", "{tmp}/cache")
EVAL = ("eval", "{tmp}/small", *CACHE, "--split", "all", "--quiet")
STITCH = ("stitch", "{tmp}/small", "{tmp}/large", *CACHE, "--split", "all", "--quiet")
META = ("meta-sae", "{tmp}/large", "--steps", "5", "--quiet")
DATA = ("--data", "{tmp}/images", "--weights", "{tmp}/tiny-vit.safetensors")
WORLD = ("toyworld", "write", "{tmp}/world_new", "--n", "3")
DEMO = ("demo", "--out", "{tmp}/demo_new")
INPUTS = ("small", "large", "cache")  # every row leaves the inputs as they were

CASES = [
    # ----- eval
    Case("eval-out-is-a-directory", (*EVAL, "--out", "{tmp}/folder"), "is a directory",
         ("folder", *INPUTS)),
    Case("eval-out-under-a-file", (*EVAL, "--out", "{tmp}/afile/eval.json"), "is a file",
         ("afile", *INPUTS)),
    Case("eval-out-overwrites-the-dictionary", (*EVAL, "--out", "{tmp}/small/cfg.json"),
         "would overwrite a saved dictionary", INPUTS),
    Case("eval-histogram-is-a-directory", (*EVAL, "--histogram", "{tmp}/folder"),
         "--histogram", ("folder", *INPUTS)),
    Case("eval-other-width", ("eval", "{tmp}/wide", *CACHE, "--split", "all"),
         "d_in=64 but cache", ("wide", "cache")),
    Case("eval-dictionary-missing", ("eval", "{tmp}/nowhere", *CACHE), "does not exist",
         INPUTS),
    Case("eval-dictionary-not-saved", ("eval", "{tmp}/folder", *CACHE),
         "not a saved dictionary", INPUTS),
    Case("eval-cache-missing", ("eval", "{tmp}/small", "--cache", "{tmp}/nocache"),
         "does not exist", INPUTS),
    Case("eval-cache-not-a-cache", ("eval", "{tmp}/small", "--cache", "{tmp}/folder"),
         "not a prisma-mm cache", INPUTS),
    Case("eval-hook-unknown", (*EVAL, "--hook", "blocks.0.hook_resid_postt"), "unknown hook",
         INPUTS),
    Case("eval-max-tokens-0", (*EVAL, "--max-tokens", "0"), "integer >= 1", INPUTS),
    Case("eval-batch-size-negative", (*EVAL, "--batch-size", "-5"), "integer >= 1", INPUTS),
    Case("eval-eval-fraction-1", (*EVAL, "--eval-fraction", "1"), "[0, 1)", INPUTS),
    Case("eval-dense-threshold-negative", (*EVAL, "--dense-threshold", "-0.1"), "[0, 1]",
         INPUTS),
    Case("eval-device-gpu", (*EVAL, "--device", "gpu"), "unknown device 'gpu'", INPUTS),
    Case("eval-device-cuda-absent", (*EVAL, "--device", "cuda:7"), "cuda", INPUTS),
    Case("eval-data-missing", (*EVAL, "--data", "{tmp}/noimages", "--weights",
                               "{tmp}/tiny-vit.safetensors"), "does not exist", INPUTS),
    Case("eval-template-without-braces", (*EVAL, *DATA, "--template", "a photo"),
         "has no '{}'", INPUTS),
    Case("eval-max-images-0", (*EVAL, *DATA, "--max-images", "0"), "integer >= 1", INPUTS),
    Case("eval-model-unknown", (*EVAL, *DATA, "--model", "tiny-vitt"), "unknown model", INPUTS),
    # ----- stitch
    Case("stitch-other-d-in", ("stitch", "{tmp}/small", "{tmp}/wide", *CACHE),
         "different sizes (32 vs 64)", ("small", "wide", "cache")),
    Case("stitch-pair-reversed", ("stitch", "{tmp}/large", "{tmp}/small", *CACHE),
         "pass the smaller SAE first", INPUTS),
    Case("stitch-out-is-a-file", (*STITCH, "--out", "{tmp}/afile"), "is a file",
         ("afile", *INPUTS)),
    Case("stitch-large-missing", ("stitch", "{tmp}/small", "{tmp}/nowhere", *CACHE),
         "does not exist", INPUTS),
    Case("stitch-max-points-1", (*STITCH, "--max-points", "1"), "integer >= 2", INPUTS),
    Case("stitch-max-tokens-0", (*STITCH, "--max-tokens", "0"), "integer >= 1", INPUTS),
    Case("stitch-threshold-0", (*STITCH, "--threshold", "0"), "(0, 1]", INPUTS),
    Case("stitch-threshold-text", (*STITCH, "--threshold", "high"), "expected a number",
         INPUTS),
    Case("stitch-seed-negative", (*STITCH, "--seed", "-1"), "integer >= 0", INPUTS),
    Case("stitch-cache-other-width", ("stitch", "{tmp}/wide_small", "{tmp}/wide", *CACHE),
         "d_in=64 but cache", ("wide", "cache")),
    # ----- meta-sae
    Case("meta-out-is-a-file", (*META, "--out", "{tmp}/afile"), "is a file",
         ("afile", *INPUTS)),
    Case("meta-k-0", (*META, "--k", "0"), "integer >= 1", INPUTS),
    Case("meta-k-above-n-meta", (*META, "--k", "9", "--n-meta", "8"), "k must be in 1..n_meta",
         INPUTS),
    Case("meta-batch-size-above-latents", (*META, "--batch-size", "33"), "batch_size must be",
         INPUTS),
    Case("meta-steps-negative", (*META, "--steps", "-3"), "integer >= 1", INPUTS),
    Case("meta-lr-0", (*META, "--lr", "0"), "(0, 1]", INPUTS),
    Case("meta-dictionary-missing", ("meta-sae", "{tmp}/nowhere"), "does not exist", INPUTS),
    # ----- compare
    Case("compare-out-is-a-directory", ("compare", "{tmp}/small", "{tmp}/large", "--out",
                                        "{tmp}/folder"), "is a directory", ("folder", *INPUTS)),
    Case("compare-threshold-2", ("compare", "{tmp}/small", "{tmp}/large", "--threshold", "2"),
         "[-1, 1]", INPUTS),
    Case("compare-other-d-in", ("compare", "{tmp}/small", "{tmp}/wide"), "differ in size",
         INPUTS),
    # ----- toyworld
    Case("toyworld-size-4", (*WORLD, "--size", "4"), "outside 32..1024", ("world_new",)),
    Case("toyworld-size-huge", (*WORLD, "--size", "5000"), "outside 32..1024", ("world_new",)),
    Case("toyworld-out-is-a-file", ("toyworld", "write", "{tmp}/afile"), "is a file",
         ("afile",)),
    Case("toyworld-n-0", (*WORLD[:3], "--n", "0"), "n > 0", ("world_new",)),
    Case("toyworld-shard-size-0", (*WORLD, "--shard-size", "0"), "shard_size > 0",
         ("world_new",)),
    Case("toyworld-seed-negative", (*WORLD, "--seed", "-1"), "seed >= 0", ("world_new",)),
    Case("toyworld-patch-grid-5", (*WORLD, "--patch-grid", "5"), "does not tile",
         ("world_new",)),
    Case("toyworld-other-world-there", ("toyworld", "write", "{tmp}/world", "--n", "3",
                                        "--seed", "1"), "other parameters (seed 0 there, 1 now)",
         ("world",)),
    # ----- demo
    Case("demo-out-is-a-file", ("demo", "--out", "{tmp}/afile"), "is a file", ("afile",)),
    Case("demo-n-train-5", (*DEMO, "--n-train", "5"), "--n-train >= 100", ("demo_new",)),
    Case("demo-train-tokens-0", (*DEMO, "--train-tokens", "0"), "--train-tokens >= 16384",
         ("demo_new",)),
    Case("demo-sizes-two", (*DEMO, "--sizes", "256", "512"), "at least 3 distinct sizes",
         ("demo_new",)),
    Case("demo-seed-negative", (*DEMO, "--seed", "-2"), "seed >= 0", ("demo_new",)),
    Case("demo-hook-unknown", (*DEMO, "--hook", "blocks.9.hook_resid_post"),
         "the model has blocks 0-5", ("demo_new",)),
    Case("demo-hook-not-cacheable", (*DEMO, "--hook", "blocks.0.attn.hook_pattern"),
         "attention pattern", ("demo_new",)),
    Case("demo-run-with-other-settings", ("demo", "--out", "{tmp}/demo_old", "--n-train", "300"),
         "other settings (n_train 200 there, 300 now)", ("demo_old",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A tiny-vit cache of a labelled image tree, saved TopK SAEs (16 and 32 latents of width
    32; 16 and 32 of width 64), a folder, a file, a toy world and a demo folder of one run."""
    from prisma_mm.cache import write_cache
    from prisma_mm.data.toyworld import write_shards

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_input_analysis")
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    state = {k: v.contiguous() for k, v in model.module.state_dict().items()}
    save_file(state, str(root / "tiny-vit.safetensors"))
    write_cache(model, str(root / "images"), root / "cache", [HOOK], progress=False)
    for name, d_in, n_latents in [("small", 32, 16), ("large", 32, 32), ("wide_small", 64, 16),
                                  ("wide", 64, 32)]:  # fmt: skip
        sae = TopKSAE(d_in=d_in, n_latents=n_latents, k=4, seed=n_latents)
        sae.metadata.update({"hook": HOOK, "model": "tiny-vit"})
        sae.save(root / name)
    (root / "folder").mkdir()
    (root / "afile").write_text("keep me\n")
    write_shards(root / "world", 3, seed=0, progress=False)
    (root / "demo_old").mkdir()
    settings = {"model": "toyvit", "n_train": 200, "hook": "blocks.3.hook_resid_post", "seed": 0,
                "train_tokens": 300000, "batch_size": 1024, "n_latents": 1536,
                "small_latents": 384, "k": 16}  # fmt: skip
    (root / "demo_old" / "demo_run.json").write_text(json.dumps(settings))
    yield root
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp, capsys):
    check_case(case, tmp, capsys)
