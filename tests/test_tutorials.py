"""Every tutorial (jupytext percent-format) executes as a notebook in a fresh directory, and
what it wrote there is checked: files present and non-empty, numbers in the ranges a working
pipeline gives (a broken stage lands outside them)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("*.py"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, path


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def check_hooked_models(out: Path, text: str) -> None:
    assert "per-patch norm grid: (4, 1, 4, 4)" in text  # 4 images; tiny-vit: 32 px, 8 px patches
    change = float(text.split("logit change from ablating block 0's MLP:")[1].split()[0])
    assert change > 0  # zeroing an MLP branch changes the logits


def check_cache_and_train(out: Path, text: str) -> None:
    r = results(out)
    manifest = json.loads((out / "cache-l3" / "manifest.json").read_text())
    assert manifest["n_samples"] == r["n_samples"] == 400 and r["n_shards"] == 2
    assert manifest["shapes"]["blocks.3.hook_resid_post"] == [65, 128]
    assert len(list((out / "images").glob("toyworld-*.tar"))) == 2
    dictionary = out / r["dictionary"]
    assert (dictionary / "weights.safetensors").stat().st_size > 100_000  # 2 x 256 x 128 floats
    cfg = json.loads((dictionary / "cfg.json").read_text())
    assert cfg["config"]["n_latents"] == r["n_latents"] == 256 and cfg["config"]["k"] == 8
    assert r["dictionary_hook"] == "blocks.3.hook_resid_post"
    assert 0.0 < r["heldout_fvu"] < 0.4  # 200 steps already reconstruct most of the variance
    assert r["l0"] == pytest.approx(8.0)
    assert 0.0 <= r["dead_fraction"] < 0.5
    assert r["train_fvu_last"] < 0.6 * r["train_fvu_first"]  # training really lowered the FVU
    assert 0.0 < r["val_fvu_last"] < 0.4
    assert list((dictionary.parent / "checkpoints").glob("*.ckpt"))
    assert_png(out / "training_curve.png")


def check_patch_features(out: Path, text: str) -> None:
    import re

    from prisma_mm.viz.index import FeatureIndex

    r = results(out)
    index = FeatureIndex.load(out / "sae" / "index")
    assert index.n_latents == r["n_latents"] == 128 and r["n_inputs"] == 300
    assert index.meta["complete"] and index.meta["n_tokens"] == 300 * 65
    assert set(r["label_names"]) <= {"red", "orange", "yellow", "green", "cyan", "blue",
                                     "purple", "white"} and len(r["label_names"]) >= 6  # fmt: skip
    latent = r["latent"]
    top = r["latent_top_values"]
    assert len(top) == 8 and top == sorted(top, reverse=True) and top[0] > 0
    assert r["latent_purity"] >= 0.75  # its top images mostly share one colour label
    assert r["latent_mean_active"] == pytest.approx(float(index.mean_active[latent]), rel=1e-6)
    assert r["latent_top_label"] == index.label_names[int(index.label_mix[latent].argmax())]
    assert 1 <= len(r["feature_map_latents"]) <= 4
    for name in ("latent_grid.png", "latent_interval.png", "feature_map.png"):
        assert_png(out / name, min_bytes=20_000)
    assert (out / "latent_grid_per_image.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    site = out / "browser"
    assert r["n_thumbnails"] > 100 and len(list((site / "thumbs").rglob("*.png"))) > 100
    for page in ("index.html", "latent.html"):
        html = (site / page).read_text()
        # offline: every script and stylesheet is a relative file of the folder
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert not re.match(r"[a-z]+:", ref) and (site / ref).is_file(), ref
    assert (site / "data" / "meta.js").stat().st_size > 100


def check_stitching_and_meta_saes(out: Path, text: str) -> None:
    from prisma_mm.analysis.families import PlateauCriterion

    r = results(out)
    assert r["sizes"] == [64, 128, 256] and r["shared_data_order"] is True
    report = json.loads((out / "family" / "family_report.json").read_text())
    assert [m["name"] for m in report["members"]] == [m["name"] for m in r["members"]]
    assert (out / "family" / "family_report.md").read_text().startswith("# SAE family report")
    criterion = PlateauCriterion(window=2, rel_eps=0.05)  # the tutorial's criterion
    for m in r["members"]:
        fvus = [f for _, f in m["curve"]]
        assert fvus[-1] < fvus[0]  # training lowered the held-out FVU
        # the criterion applied to the recorded curve says where training stopped
        if m["plateaued"]:
            assert criterion.first(fvus) == len(fvus) - 1  # it stopped where it plateaued
            assert m["tokens_trained"] == m["plateau_tokens"] < 100_000
        else:
            assert criterion.first(fvus) is None and m["tokens_trained"] >= 100_000 - 512
        assert 0.0 < m["fvu"] < 0.4 and 0.0 < m["l0"] <= 16 and 0.0 <= m["dead_fraction"] < 0.5
        assert m["spliced_accuracy"] > 0.8  # the spliced SAE keeps most of the task
    for p, (small, large) in zip(r["pairs"], zip(r["members"], r["members"][1:])):
        assert (p["small"], p["large"]) == (small["name"], large["name"])
        n = int(large["name"].split("-")[1])
        assert p["n_novel_test"] + p["n_reconstruction_test"] + p["n_inactive"] == n
        assert p["n_novel_test"] >= 1 and p["n_reconstruction_test"] >= 1
        curve = p["curve_mse"]
        assert curve[0] == pytest.approx(small["mse"], rel=1e-5)  # the chain starts at S ...
        assert curve[-1] == pytest.approx(large["mse"], rel=1e-5)  # ... and ends at L
        assert p["monotone"] == all(b <= a * (1 + 1e-4) for a, b in zip(curve, curve[1:]))
        assert 0 <= p["n_novel_labelled"] <= p["n_novel_test"] and 0.0 <= p["agreement"] <= 1.0
        assert_png(Path(p["plot"]) if Path(p["plot"]).is_absolute() else out / p["plot"])
    assert r["n_meta"] == 64 and 0.0 < r["meta_fvu"] < 0.8
    if r["n_conjunction_latents"]:
        assert 0.0 <= r["decomposition_score"] <= 1.0 and 0.0 <= r["shuffled_score"] <= 1.0
    assert (out / "family" / "meta_sae").is_dir() and any((out / "family" / "meta_sae").iterdir())
    assert "meta-SAE of batchtopk-256: FVU" in text


def check_splicing_and_steering(out: Path, text: str) -> None:
    r = results(out)
    modes = r["spliced"]["modes"]
    assert r["spliced"]["task"] == "multilabel" and r["spliced"]["n_images"] == 200
    assert modes["clean"]["accuracy"] > 0.95  # toyvit's held-out per-value accuracy is 0.99
    assert modes["clean"]["accuracy"] - modes["spliced"]["accuracy"] < 0.05
    assert modes["mean"]["accuracy"] < modes["spliced"]["accuracy"] - 0.1
    assert r["spliced"]["max_abs_error_with_error"] < 1e-3  # error term kept: the clean model
    assert 0.8 < r["spliced"]["score_mean"] <= 1.01
    assert r["red_correlation"] > 0.8 and r["mean_active"] > 0
    sweep = {row["strength"]: row for row in r["sweep"]}
    assert sweep[0.0]["red_logit_delta"] == 0.0  # strength 0 changes nothing
    assert sweep[0.0]["predicted_red"] < 0.1  # images without red are not called red ...
    assert sweep[2.0]["predicted_red"] > 0.8  # ... until the red feature is added
    deltas = [sweep[s]["red_logit_delta"] for s in sorted(sweep)]
    assert all(b > a for a, b in zip(deltas, deltas[1:]))  # stronger steering, larger change
    assert sweep[2.0]["top_class"] == "colour=red"
    assert sweep[2.0]["accuracy"] < sweep[0.0]["accuracy"]
    assert r["ablation_red_logit_delta"] < -1.0
    before, after = r["ablation_predicted_red"]
    assert before > 0.8 and after < before - 0.3
    assert r["quadrant_red_logit_delta"] > 0
    assert (out / "index").is_dir() and (out / "sae" / "weights.safetensors").is_file()
    assert_png(out / "steering.png")


def check_circuits(out: Path, text: str) -> None:
    r = results(out)
    assert r["n_pairs"] >= 8 and r["clean_metric"] > 5 > -5 > r["corrupt_metric"]
    assert r["lens_red_minus_blue"][-1] == pytest.approx(r["clean_metric"], abs=1e-4)
    assert r["lens_alignment"][-1] == pytest.approx(1.0) and r["dla_max_error"] < 1e-4
    assert r["head_rank_correlation"] >= 0.8  # attribution patching ranks heads as patching does
    restored = r["head_patch_restored"]  # the most attributed heads move the difference ...
    assert restored["top"] > 1.0 and restored["top"] > 5 * abs(restored["bottom"])
    drops = r["head_ablation_drop"]  # ... though the model need not depend on them (see 08)
    assert math.isfinite(drops["top"]) and abs(drops["bottom"]) < 1.0
    nodes = r["circuit"]["nodes"]
    assert len(nodes) == 8 and len(r["circuit"]["edges"]) == 16
    drops = r["latent_ablation_drop"]
    assert drops["circuit"] > 1.0 and drops["circuit"] > 5 * abs(drops["quiet"])
    page = (out / "circuit.html").read_text()
    assert page.count('href="browser/latent.html?id=') == 4  # the block-4 nodes link in
    assert (out / "browser" / "latent.html").is_file()
    for name in ("heads_patching", "heads_attribution", "stream_patching"):
        assert_png(out / f"{name}.png")
    assert "rank correlation over the 24 heads" in text


def check_diffusion(out: Path, text: str) -> None:
    import numpy as np
    from PIL import Image

    from prisma_mm.viz.index import FeatureIndex

    r = results(out)
    assert r["n_samples"] == 64 and r["shape"] == [64, 32]  # 32 prompts x 2 steps; 8 x 8 tokens
    assert r["fvu_last"] < min(0.2, 0.5 * r["fvu_first"])  # the SAE learned the update
    index = FeatureIndex.load(out / "sae" / "index")
    assert r["mean_active"] == pytest.approx(float(index.mean_active[r["latent"]]))
    assert r["mean_active"] > 0
    prompts = set((out / "prompts.txt").read_text().splitlines())
    assert set(r["top_prompts"]) <= prompts and set(r["top_steps"]) <= {0, 1}
    change = r["change"]
    assert change[0] == 0.0 and all(b > a for a, b in zip(change, change[1:]))  # stronger, more
    assert r["box_inside"] > 1.2 * r["box_outside"] > 0  # a box steers most where it is
    assert r["ablation_change"] > 0
    grid, settings = r["grid"], json.loads((out / "grid" / "settings.json").read_text())
    assert (grid["rows"], grid["cols"], grid["cell"]) == (4, 4, [64, 64])
    picture = Image.open(out / "grid" / "grid.png")
    for c, name in enumerate(settings["unsteered"]):  # the strength-0 row is the unsteered one
        cell = np.asarray(picture.crop(tuple(grid["boxes"][0][c])))
        assert np.array_equal(cell, np.asarray(Image.open(out / "grid" / name)))
    for name in r["heatmaps"]:
        assert_png(out / name, min_bytes=10_000)
    assert (out / "top_generation.png").is_file()


def check_video(out: Path, text: str) -> None:
    from PIL import Image

    r = results(out)
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert r["n_clips_cached"] == manifest["n_samples"] == 400
    assert manifest["source"]["type"] == "toyclips" and manifest["layout"]["tubelet"] == 2
    assert r["direction"]["value"].startswith("direction=") and r["direction"]["motion"]
    assert r["speed"]["value"] in ("speed=slow", "speed=fast") and r["speed"]["motion"]
    # a static value is found, kept without motion, and its top clips peak on it
    colour = r["colour"]
    assert colour["heldout_auroc"] > 0.85 and colour["temporal_score"] < 0.2
    assert r["peak_precision"]["colour"] >= 0.5
    # motion values are scored above chance on clips the SAE never saw
    assert r["direction"]["heldout_auroc"] > 0.6 and r["speed"]["heldout_auroc"] > 0.6
    for name in ("direction", "speed", "colour"):
        assert 0.0 <= r["peak_precision"][name] <= 1.0
        assert 0.0 <= r[name]["temporal_score"] <= 1.0
        assert_png(out / f"{name}_strips.png", min_bytes=20_000)
        assert Image.open(out / f"{name}.gif").n_frames == 8
    assert_png(out / "moving_world.png", min_bytes=1_000)
    assert_png(out / "temporal_strips.png", min_bytes=20_000)
    assert 0.0 <= r["temporal_latent_score"] <= 1.0
    assert 0.0 <= r["summary"]["motion_recovery"] <= 1.0
    temporal = json.loads((out / "temporal.json").read_text())
    assert len(temporal["score"]) == r["n_latents"] == 192
    table = (out / "browser" / "data" / "table" / "00000.js").read_text()
    assert '"temporal"' in table and list((out / "browser" / "thumbs").rglob("*.gif"))
    assert "latents lose over half their activation without motion" in text


CHECKS: dict[str, Callable[[Path, str], None]] = {
    "01_hooked_models": check_hooked_models,
    "02_cache_and_train": check_cache_and_train,
    "03_patch_features": check_patch_features,
    "04_stitching_and_meta_saes": check_stitching_and_meta_saes,
    "05_splicing_and_steering": check_splicing_and_steering,
    "06_diffusion": check_diffusion,
    "07_video": check_video,
    "08_circuits": check_circuits,
}


def test_every_tutorial_has_a_checker():
    assert {p.stem for p in TUTORIALS} == set(CHECKS)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_and_writes_what_it_says(path, tmp_path):
    notebook = jupytext.read(path)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert text
    CHECKS[path.stem](tmp_path, text)
