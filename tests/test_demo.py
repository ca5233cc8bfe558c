"""A shortened `prisma-mm demo`, end to end through the CLI: toy world, toyvit cache, three
SAEs trained by the Lightning trainer, evaluation, stitching and a meta-SAE. Its numbers are
checked against each other (summary.json, summary.md, stitching.json), against a
re-computation by hand from the held-out images, and against ranges a broken stage misses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from prisma_mm.cli import main
from prisma_mm.demo import meta_purity

HOOK = "blocks.3.hook_resid_post"
ARGV = ["--n-train", "200", "--n-eval", "40", "--train-tokens", "40000"]
K = 8


def test_meta_purity_by_hand():
    factors = ["shape", "shape", "colour", None, "colour", "size"]
    # group 1: shape, shape, colour -> 2/3; group 2: colour, size -> 1/2; group 3: one named only
    assert meta_purity([[0, 1, 2, 3], [4, 5], [3, 0]], factors) == pytest.approx(
        (2 / 3 + 1 / 2) / 2
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The shortened demo, run once for the module (one thread: tiny tensors)."""
    import prisma_mm.demo as demo

    original = demo.DemoConfig

    def short(**kwargs):
        kwargs.update(
            batch_size=512,
            n_latents=256,
            small_latents=64,
            k=K,
            meta_steps=150,
            stitch_points=6,
            progress=False,
        )
        return original(**kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "DemoConfig", short)
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), *ARGV]) == 0
    yield out
    patch.undo()
    torch.set_num_threads(threads)


def _table(markdown: str) -> dict[str, list[float]]:
    """The SAE rows of summary.md: name -> [latents, FVU, L0, dead, spliced acc., GT score]."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_summary_files_agree(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    markdown = (demo_run / "summary.md").read_text()
    model = summary["model"]
    assert markdown.startswith(
        f"toyvit accuracy: clean {model['clean_accuracy']:.3f}, "
        f"mean-ablated {model['mean_ablated_accuracy']:.3f}"
    )
    table = _table(markdown)
    assert set(table) == set(summary["saes"]) == {"topk", "matryoshka", "topk-small"}
    for name, r in summary["saes"].items():
        values = [r["n_latents"], r["fvu"], r["l0"], r["dead_fraction"], r["spliced_accuracy"],
                  r["ground_truth"]["score"]]  # fmt: skip
        printed = np.array([0.0, 5e-4, 0.05, 5e-4, 5e-4, 5e-4]) + 1e-9  # the digits shown
        assert (np.abs(np.array(table[name]) - np.array(values)) <= printed).all(), name
    st = summary["stitching"]
    line = next(li for li in markdown.splitlines() if li.startswith("stitching"))
    numbers = re.search(
        r"MSE ([\d.]+) -> ([\d.]+) over (\d+) points.*?(\d+) / (\d+) \(small\), (\d+) / (\d+) "
        r"\(large\).*?(\d+) novel, (\d+) reconstruction, (\d+) inactive; (\d+) novel",
        line,
    )
    assert numbers, line
    got = [float(g) for g in numbers.groups()]
    want = [st["mse_small"], st["mse_large"], st["points"], st["n_fired_small"], st["n_small"],
            st["n_fired_large"], st["n_large"], st["n_novel_test"], st["n_reconstruction_test"],
            st["n_inactive"], st["n_novel_proxy"]]  # fmt: skip
    np.testing.assert_allclose(got, want, atol=5.1e-5)
    written = json.loads((demo_run / "stitching.json").read_text())
    assert written["classes"]["n_inactive"] == st["n_inactive"]
    assert written["curve"][0]["mse"] == pytest.approx(st["curve_mse_first"])
    assert written["curve"][-1]["mse"] == pytest.approx(st["curve_mse_last"])


def test_numbers_match_a_recomputation_by_hand(demo_run):
    """FVU, L0, dead fraction and the accuracies, recomputed from the held-out images with
    plain tensor code (no analysis function), equal the summary's."""
    import prisma_mm
    from prisma_mm.cache import read_manifest
    from prisma_mm.data.toyworld import ToyWorld, collate
    from prisma_mm.sae import load

    summary = json.loads((demo_run / "summary.json").read_text())
    model = prisma_mm.load_model("toyvit")
    images, labels = collate(list(ToyWorld(40, seed=0, start=200)))
    x = model.preprocess(list(images.numpy()))
    y = labels["multi_hot"].bool()
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(x, [HOOK])
    acts = cache[HOOK].double().reshape(-1, 128)
    mean = torch.tensor(read_manifest(demo_run / "cache")["stats"][HOOK]["mean"])

    def accuracy(replace=None) -> float:
        with torch.no_grad():
            if replace is None:
                logits = model(x)
            else:
                with model.hooks({HOOK: lambda act, hook: replace(act)}):
                    logits = model(x)
        return float(((logits > 0) == y).double().mean())

    assert summary["model"]["clean_accuracy"] == pytest.approx(accuracy(), abs=1e-9)
    assert summary["model"]["clean_accuracy"] == pytest.approx(
        float(((clean_logits > 0) == y).double().mean()), abs=1e-9
    )
    ablated = accuracy(lambda act: mean.to(act.dtype).expand_as(act))
    assert summary["model"]["mean_ablated_accuracy"] == pytest.approx(ablated, abs=1e-9)
    for name, r in summary["saes"].items():
        sae = load(demo_run / "runs" / name / "dictionary")
        with torch.no_grad():
            code = sae.encode(acts.float())
            recon = sae.decode(code).double()
        fvu = float(((acts - recon) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
        assert r["fvu"] == pytest.approx(fvu, rel=1e-5), name
        assert r["l0"] == pytest.approx(float((code != 0).sum(1).double().mean()), rel=1e-9)
        assert r["dead_fraction"] == pytest.approx(
            float((code != 0).any(0).logical_not().double().mean())
        )

        def spliced(act, sae=sae):
            flat = act.reshape(-1, act.shape[-1])
            return sae.decode(sae.encode(flat)).reshape(act.shape).to(act.dtype)

        assert r["spliced_accuracy"] == pytest.approx(accuracy(spliced), abs=1e-9), name


def test_numbers_lie_where_working_stages_put_them(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    model = summary["model"]
    clean, ablated = model["clean_accuracy"], model["mean_ablated_accuracy"]
    assert clean > 0.9  # the shipped toyvit really learned the world
    assert ablated < clean - 0.1  # the layer matters to the task
    saes = summary["saes"]
    assert saes["topk"]["n_latents"] == 256 and saes["topk-small"]["n_latents"] == 64
    for name, r in saes.items():
        assert 0.0 < r["fvu"] < 0.5, name
        assert 0.0 <= r["dead_fraction"] < 0.5, name
        assert 0.0 < r["ground_truth"]["score"] <= 1.0, name
        # splicing keeps most of what the layer carries, and far more than its mean
        assert clean - 0.15 <= r["spliced_accuracy"] <= clean + 0.02, name
        assert r["spliced_accuracy"] > ablated + 0.1, name
        assert r["splice_identity_error"] < 1e-4, name
    assert saes["topk"]["l0"] == pytest.approx(K) and saes["topk-small"]["l0"] == pytest.approx(K)
    assert 0.0 < saes["matryoshka"]["l0"] <= 2 * K  # BatchTopK: k per row on average in training

    st = summary["stitching"]
    # the curve runs from the small SAE to the large one: its ends are their MSEs on the rows
    assert st["curve_mse_first"] == pytest.approx(saes["topk-small"]["mse"], rel=1e-5)
    assert st["curve_mse_last"] == pytest.approx(saes["topk"]["mse"], rel=1e-5)
    assert st["mse_small"] == pytest.approx(saes["topk-small"]["mse"], rel=1e-5)
    assert st["mse_large"] == pytest.approx(saes["topk"]["mse"], rel=1e-5)
    assert st["n_tokens"] == 40 * 65 and st["points"] == 6
    # the three classes cover the large SAE; the fired counts are the evaluated dead fractions
    assert st["n_novel_test"] + st["n_reconstruction_test"] + st["n_inactive"] == 256
    assert st["n_fired_large"] == 256 - st["n_inactive"]
    assert st["n_fired_large"] == round(256 * (1 - saes["topk"]["dead_fraction"]))
    assert st["n_fired_small"] == round(64 * (1 - saes["topk-small"]["dead_fraction"]))
    assert st["n_novel_proxy"] <= st["n_fired_large"]
    assert 0.0 <= st["test_proxy_agreement"] <= 1.0
    assert (demo_run / "stitching.png").stat().st_size > 1000

    meta = summary["meta_sae"]
    assert meta["n_meta"] == 64 and 0.0 < meta["fvu"] < 1.0
    assert 0.0 <= meta["factor_purity"] <= 1.0 and 0.0 <= meta["shuffled_purity"] <= 1.0


def _script_payload(path):
    """The JSON object a browser data script hands to its callback: ``PRISMA.x(k, {...})``."""
    text = path.read_text()
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def test_demo_writes_the_index_and_browser_of_its_topk_sae(demo_run):
    from prisma_mm.viz.index import FeatureIndex

    summary = json.loads((demo_run / "summary.json").read_text())
    browser = summary["browser"]
    index = FeatureIndex.load(browser["index"])
    assert index.n_latents == browser["n_latents"] == 256 and index.meta["complete"]
    assert index.meta["n_inputs"] == 200 and index.meta["n_tokens"] == 200 * 65
    # labels are the images' first objects, so a label mix reads as objects
    assert index.label_names and all(len(name.split()) == 2 for name in index.label_names)
    html = demo_run / "browser" / "index.html"
    assert browser["index_html"] == str(html) and html.is_file()
    table = _script_payload(demo_run / "browser" / "data" / "table" / "00000.js")
    assert table["count"] == 256
    # the stitching classes shown are the stitching's: 0 novel, 1 reconstruction, 2 inactive
    stitched = json.loads((demo_run / "stitching.json").read_text())["classes"]
    st = summary["stitching"]
    counts = [table["stitch"].count(c) for c in range(3)]
    assert sum(counts) == 256 and counts[2] == st["n_inactive"] == stitched["n_inactive"]
    # every latent that fires has a page with thumbnails that exist; meta-SAE ids are in range
    fired = int((index.freq_token > 0).sum())
    assert fired == 256 - browser["latents_never_fired"] and fired > 128
    latent = int(index.freq_token.argmax())
    page = _script_payload(demo_run / "browser" / "data" / "latents" / "000" / f"{latent:06d}.js")
    assert page["id"] == latent and page["thumbs"] and page["max"] > 0
    assert page["max"] == pytest.approx(float(index.max_value[latent]), rel=1e-3)
    assert all(0 <= m["m"] < 64 for m in page.get("meta", []))
    assert len(list((demo_run / "browser" / "thumbs").rglob("*.png"))) >= 8 * fired // 2


def test_rerun_reuses_and_other_settings_are_refused(demo_run, capsys):
    import prisma_mm.demo as demo

    original = demo.DemoConfig

    def short(**kwargs):
        kwargs.update(batch_size=512, n_latents=256, small_latents=64, k=K, meta_steps=150,
                      stitch_points=6, progress=False)  # fmt: skip
        return original(**kwargs)

    weights = (demo_run / "runs" / "topk" / "dictionary" / "weights.safetensors").read_bytes()
    manifest = json.loads((demo_run / "cache" / "manifest.json").read_text())
    summary = json.loads((demo_run / "summary.json").read_text())
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "DemoConfig", short)
    try:
        assert main(["demo", "--out", str(demo_run), *ARGV]) == 0
        # the same run: the cache and the dictionaries are reused, the numbers are the same
        again = json.loads((demo_run / "summary.json").read_text())
        capsys.readouterr()
        code = main(["demo", "--out", str(demo_run), "--n-train", "300", "--n-eval", "40"])
    finally:
        patch.undo()
    assert (
        demo_run / "runs" / "topk" / "dictionary" / "weights.safetensors"
    ).read_bytes() == weights
    assert (
        json.loads((demo_run / "cache" / "manifest.json").read_text())["n_samples"]
        == manifest["n_samples"]
    )
    assert again["saes"]["topk"]["fvu"] == summary["saes"]["topk"]["fvu"]
    assert again["stitching"] == summary["stitching"]
    assert code == 2
    assert "other settings (n_train 200 there, 300 now)" in capsys.readouterr().err
