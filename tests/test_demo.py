"""A shortened `prisma-mm demo`, end to end through the CLI: toy world, toyvit cache, three
SAEs trained by the Lightning trainer, evaluation, stitching and a meta-SAE."""

from __future__ import annotations

import json

import pytest

from prisma_mm.cli import main
from prisma_mm.demo import meta_purity


def test_meta_purity_by_hand():
    factors = ["shape", "shape", "colour", None, "colour", "size"]
    # group 1: shape, shape, colour -> 2/3; group 2: colour, size -> 1/2; group 3: one named only
    assert meta_purity([[0, 1, 2, 3], [4, 5], [3, 0]], factors) == pytest.approx(
        (2 / 3 + 1 / 2) / 2
    )


def test_short_demo_end_to_end(tmp_path, monkeypatch):
    import prisma_mm.demo as demo

    original = demo.DemoConfig

    def short(**kwargs):
        kwargs.update(
            batch_size=512,
            n_latents=256,
            small_latents=64,
            k=8,
            meta_steps=150,
            stitch_points=6,
            progress=False,
        )
        return original(**kwargs)

    monkeypatch.setattr(demo, "DemoConfig", short)
    out = tmp_path / "demo"
    code = main(
        ["demo", "--out", str(out), "--n-train", "200", "--n-eval", "40", "--train-tokens", "15000"]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text().startswith("toyvit accuracy")
    assert summary["model"]["clean_accuracy"] > 0.9  # the shipped toyvit really learned the world
    saes = summary["saes"]
    assert set(saes) == {"topk", "matryoshka", "topk-small"}
    for name, result in saes.items():
        assert 0.0 < result["fvu"] < 1.0, name
        assert 0.0 <= result["dead_fraction"] < 1.0
        assert 0.0 <= result["ground_truth"]["score"] <= 1.0
        assert 0.0 < result["spliced_accuracy"] <= 1.0
    assert saes["topk"]["l0"] == pytest.approx(8.0)
    assert saes["topk"]["n_latents"] == 256 and saes["topk-small"]["n_latents"] == 64
    stitching = summary["stitching"]
    assert stitching["points"] >= 2 and stitching["mse_small"] > 0
    assert (out / "stitching.png").stat().st_size > 1000
    meta = summary["meta_sae"]
    assert meta["n_meta"] == 64 and 0.0 <= meta["fvu"] <= 1.5
    # a second run reuses the cache and the trained dictionaries
    weights = (out / "runs" / "topk" / "dictionary" / "weights.safetensors").read_bytes()
    manifest = (out / "cache" / "manifest.json").read_text()
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--n-train",
                "200",
                "--n-eval",
                "40",
                "--train-tokens",
                "15000",
            ]
        )
        == 0
    )
    assert (out / "runs" / "topk" / "dictionary" / "weights.safetensors").read_bytes() == weights
    assert (
        json.loads((out / "cache" / "manifest.json").read_text())["n_samples"]
        == json.loads(manifest)["n_samples"]
    )
