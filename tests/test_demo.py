"""A shortened `prisma-mm demo`, end to end through the CLI: toy world, toyvit cache, a
BatchTopK family of three sizes trained until its FVU plateaus, the family report (stitching,
novel latents against ground truth, a meta-SAE and its decomposition score) and the browser.
Its numbers are checked against each other (summary.json, summary.md, family_report.json, the
browser's data files), against a re-computation by hand from the held-out images, and against
ranges a broken stage misses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from prisma_mm.cli import main

HOOK = "blocks.3.hook_resid_post"
ARGV = ["--n-train", "200", "--n-eval", "40", "--train-tokens", "40000"]
SIZES = [64, 128, 256]
K = 8
SHORT = dict(batch_size=512, sizes=SIZES, k=K, eval_every_tokens=4096, meta_steps=150,
             stitch_points=6, progress=False)  # fmt: skip


def _short_demo(demo):
    original = demo.DemoConfig

    def short(**kwargs):
        kwargs.update(SHORT)
        return original(**kwargs)

    return short


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The shortened demo, run once for the module (one thread: tiny tensors)."""
    import prisma_mm.demo as demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "DemoConfig", _short_demo(demo))
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), *ARGV]) == 0
    yield out
    patch.undo()
    torch.set_num_threads(threads)


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _family_table(markdown: str) -> dict[str, list[str]]:
    """The member rows of the family table: name -> its cells."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and re.fullmatch(r"batchtopk-\d+", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def _close(text: str, value: float, digits: int) -> bool:
    return abs(float(text) - value) <= 0.5 * 10**-digits + 1e-12


def test_summary_files_agree(demo_run):
    summary = _summary(demo_run)
    markdown = (demo_run / "summary.md").read_text()
    report = json.loads((demo_run / "family" / "family_report.json").read_text())
    model = summary["model"]
    assert markdown.startswith(
        f"toyvit accuracy: clean {model['clean_accuracy']:.3f}, "
        f"mean-ablated {model['mean_ablated_accuracy']:.3f} (on 40 held-out images)"
    )
    # the family report the demo wrote is the one it summarises
    assert report["pairs"] == summary["pairs"] and report["meta_sae"] == summary["meta_sae"]
    assert [m["name"] for m in report["members"]] == list(summary["saes"])
    table = _family_table(markdown)
    assert list(table) == [f"batchtopk-{n}" for n in SIZES] == list(summary["saes"])
    for name, r in summary["saes"].items():
        cells = table[name]
        assert int(cells[0]) == r["n_latents"]
        assert _close(cells[1], r["fvu"], 3) and _close(cells[2], r["l0"], 1), name
        assert _close(cells[3], r["dead_fraction"], 3), name
        assert _close(cells[4], r["spliced_accuracy"], 3), name
        assert cells[5] == ("yes" if r["plateaued"] else "no")
        assert cells[6] == str(r["plateau_tokens"] or "-") and int(cells[7]) == r["tokens_trained"]
        assert cells[8] == f"{r['values_with_latent']} / {r['values_scorable']}"
    scores = re.search(r"Ground-truth score per member \(docs/toyworld.md\): (.*)\.", markdown)
    printed = dict(item.rsplit(" ", 1) for item in scores.group(1).split(", "))
    for name, r in summary["saes"].items():
        assert _close(printed[name], r["ground_truth"]["score"], 3), name
    for pair in summary["pairs"]:
        section = markdown.split(f"## {pair['small']} -> {pair['large']}")[1].split("##")[0]
        curve = re.search(r"MSE (.*?); monotone: (True|False) \((\d+) increases\)", section)
        mses = [float(v) for v in curve.group(1).split(" -> ")]
        np.testing.assert_allclose(mses, [p["mse"] for p in pair["curve"]], rtol=5e-4)
        assert (
            curve.group(2) == str(pair["monotone"]) and int(curve.group(3)) == pair["n_increases"]
        )
        counts = re.search(
            r"(\d+) novel, (\d+) reconstruction, (\d+) inactive; (\d+) novel", section
        )
        assert [int(c) for c in counts.groups()] == [pair["n_novel_test"],
            pair["n_reconstruction_test"], pair["n_inactive"], pair["n_novel_proxy"]]  # fmt: skip
        gt = pair["novel_ground_truth"]
        assert f"{gt['n_labelled']} of {gt['n_novel']} detect a label" in section
    ms = summary["meta_sae"]
    assert f"FVU {ms['fvu']:.3f} (paper: about 0.45)" in markdown
    d = ms["decomposition"]
    line = next(li for li in markdown.splitlines() if "Decomposition score" in li)
    assert f"{ms['n_conjunction_latents']} latents detect a conjunction" in line
    if d["n_targets"]:
        assert f"score {d['score']:.3f} vs {d['shuffled_score']:.3f}" in line


def test_numbers_match_a_recomputation_by_hand(demo_run):
    """FVU, L0, dead fraction and the accuracies, recomputed from the held-out images with
    plain tensor code (no analysis function), equal the summary's."""
    import prisma_mm
    from prisma_mm.cache import read_manifest
    from prisma_mm.data.toyworld import ToyWorld, collate
    from prisma_mm.sae import load

    summary = _summary(demo_run)
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
        sae = load(demo_run / "family" / "members" / name / "dictionary").eval()
        assert r["path"] == str(demo_run / "family" / "members" / name / "dictionary")
        with torch.no_grad():
            code = sae.encode(acts.float())
            recon = sae.decode(code).double()
        fvu = float(((acts - recon) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
        assert r["fvu"] == pytest.approx(fvu, rel=1e-5), name
        assert r["mse"] == pytest.approx(float(((acts - recon) ** 2).mean()), rel=1e-5), name
        assert r["l0"] == pytest.approx(float((code != 0).sum(1).double().mean()), rel=1e-9)
        assert r["dead_fraction"] == pytest.approx(
            float((code != 0).any(0).logical_not().double().mean())
        )

        def spliced(act, sae=sae):
            flat = act.reshape(-1, act.shape[-1])
            return sae.decode(sae.encode(flat)).reshape(act.shape).to(act.dtype)

        assert r["spliced_accuracy"] == pytest.approx(accuracy(spliced), abs=1e-9), name


def test_numbers_lie_where_working_stages_put_them(demo_run):
    from prisma_mm.analysis.families import PlateauCriterion

    summary = _summary(demo_run)
    model = summary["model"]
    clean, ablated = model["clean_accuracy"], model["mean_ablated_accuracy"]
    assert clean > 0.9  # the shipped toyvit really learned the world
    assert ablated < clean - 0.1  # the layer matters to the task
    assert summary["shared_data_order"] is True  # one data order for the whole family
    saes = summary["saes"]
    assert [r["n_latents"] for r in saes.values()] == SIZES
    config = summary["config"]
    criterion = PlateauCriterion(window=config["plateau_window"], rel_eps=config["plateau_eps"])
    assert summary["criterion"] == criterion.describe()
    for name, r in saes.items():
        assert 0.0 < r["fvu"] < 0.5, name
        assert 0.0 <= r["dead_fraction"] < 0.5, name
        assert 0.0 < r["ground_truth"]["score"] <= 1.0, name
        assert 0.0 < r["l0"] <= 2 * K, name  # BatchTopK: k per row on average in training
        # splicing keeps most of what the layer carries, and far more than its mean
        assert clean - 0.15 <= r["spliced_accuracy"] <= clean + 0.02, name
        assert r["spliced_accuracy"] > ablated + 0.1, name
        assert r["splice_identity_error"] < 1e-4, name
        # the stated criterion, applied to the recorded curve, says where training stopped
        fvus = [f for _, f in r["curve"]]
        first = criterion.first(fvus)
        if r["plateaued"]:
            assert first == len(fvus) - 1 and r["plateau_tokens"] == r["curve"][-1][0], name
            assert r["tokens_trained"] == r["plateau_tokens"] < 40000, name
        else:
            assert first is None and r["tokens_trained"] >= 40000 - 512, name

    names = list(saes)
    assert len(summary["pairs"]) == 2
    for pair, (small, large) in zip(summary["pairs"], zip(names, names[1:])):
        assert (pair["small"], pair["large"]) == (small, large) and pair["family"] == "jumprelu"
        # the curve runs from the small SAE to the large one: its ends are their MSEs
        assert pair["curve"][0]["mse"] == pytest.approx(saes[small]["mse"], rel=1e-5)
        assert pair["curve"][-1]["mse"] == pytest.approx(saes[large]["mse"], rel=1e-5)
        mses = [p["mse"] for p in pair["curve"]]
        increases = sum(b > a * (1 + 1e-4) for a, b in zip(mses, mses[1:]))
        assert pair["n_increases"] == increases and pair["monotone"] == (increases == 0)
        n_large = saes[large]["n_latents"]
        assert pair["n_novel_test"] + pair["n_reconstruction_test"] + pair["n_inactive"] == n_large
        assert pair["n_inactive"] == round(n_large * saes[large]["dead_fraction"])
        assert 0.0 <= pair["agreement"] <= 1.0
        gt = pair["novel_ground_truth"]
        assert gt["n_novel"] == pair["n_novel_test"] == len(gt["latents"])
        assert gt["n_labelled"] == gt["n_value"] + gt["n_conjunction"] <= gt["n_novel"]
        assert gt["n_labelled"] == sum(row["label"] is not None for row in gt["latents"])
    ms = summary["meta_sae"]
    assert ms["of"] == names[-1] and ms["n_meta"] == SIZES[-1] // 4 and 0.0 < ms["fvu"] < 1.0
    d = ms["decomposition"]
    assert d["n_targets"] == ms["n_conjunction_latents"] and d["n_shuffles"] == 200
    if d["n_targets"]:
        assert 0.0 <= d["score"] <= 1.0 and 0.0 <= d["shuffled_score"] <= 1.0
        assert 0.0 < d["p_value"] <= 1.0


def _script_payload(path):
    """The JSON object a browser data script hands to its callback: ``PRISMA.x(k, {...})``."""
    text = path.read_text()
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def test_demo_writes_the_index_and_browser_of_its_largest_member(demo_run):
    from prisma_mm.viz.index import FeatureIndex

    summary = _summary(demo_run)
    browser = summary["browser"]
    assert browser["sae"] == "batchtopk-256"
    index = FeatureIndex.load(browser["index"])
    assert index.n_latents == browser["n_latents"] == 256 and index.meta["complete"]
    assert index.meta["n_inputs"] == 200 and index.meta["n_tokens"] == 200 * 65
    # labels are the images' first objects, so a label mix reads as objects
    assert index.label_names and all(len(name.split()) == 2 for name in index.label_names)
    html = demo_run / "browser" / "index.html"
    assert browser["index_html"] == str(html) and html.is_file()
    table = _script_payload(demo_run / "browser" / "data" / "table" / "00000.js")
    assert table["count"] == 256
    # the stitching classes shown are the last pair's: 0 novel, 1 reconstruction, 2 inactive
    pair = summary["pairs"][-1]
    counts = [table["stitch"].count(c) for c in range(3)]
    assert counts == [pair["n_novel_test"], pair["n_reconstruction_test"], pair["n_inactive"]]
    # novel latents show the ground-truth label the family report gives them, others none
    labels = {row["latent"]: row["label"] for row in pair["novel_ground_truth"]["latents"]}
    shown = {i: v for i, v in enumerate(table["novel_label"]) if v is not None}
    assert shown == {i: v for i, v in labels.items() if v is not None}
    assert all(table["stitch"][i] == 0 for i in shown)
    if shown:
        latent = min(shown)
        page = _script_payload(
            demo_run / "browser" / "data" / "latents" / "000" / f"{latent:06d}.js"
        )
        row = next(r for r in pair["novel_ground_truth"]["latents"] if r["latent"] == latent)
        assert page["stitch"]["label"] == row["label"]
        assert page["stitch"]["new"] == (not row["small_has_label"])
    # every latent that fires has a page with thumbnails that exist; meta-SAE ids are in range
    fired = int((index.freq_token > 0).sum())
    assert fired == 256 - browser["latents_never_fired"] and fired > 128
    latent = int(index.freq_token.argmax())
    page = _script_payload(demo_run / "browser" / "data" / "latents" / "000" / f"{latent:06d}.js")
    assert page["id"] == latent and page["thumbs"] and page["max"] > 0
    assert page["max"] == pytest.approx(float(index.max_value[latent]), rel=1e-3)
    meta = json.loads((demo_run / "family" / "meta_sae" / "meta_sae.json").read_text())
    assert [m["m"] for m in page.get("meta", [])] == [m for m, _ in meta["latents"][latent]["meta"]]
    assert all(0 <= m["m"] < 64 for m in page.get("meta", []))
    assert len(list((demo_run / "browser" / "thumbs").rglob("*.png"))) >= 8 * fired // 2


def test_rerun_reuses_and_other_settings_are_refused(demo_run, capsys):
    import prisma_mm.demo as demo

    member = demo_run / "family" / "members" / "batchtopk-256" / "dictionary"
    weights = (member / "weights.safetensors").read_bytes()
    manifest = json.loads((demo_run / "cache" / "manifest.json").read_text())
    summary = _summary(demo_run)
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "DemoConfig", _short_demo(demo))
    try:
        assert main(["demo", "--out", str(demo_run), *ARGV]) == 0
        # the same run: the cache and the family are reused, the numbers are the same
        again = _summary(demo_run)
        capsys.readouterr()
        code = main(["demo", "--out", str(demo_run), "--n-train", "300", "--n-eval", "40"])
    finally:
        patch.undo()
    assert (member / "weights.safetensors").read_bytes() == weights
    assert (
        json.loads((demo_run / "cache" / "manifest.json").read_text())["n_samples"]
        == manifest["n_samples"]
    )
    assert again["saes"]["batchtopk-256"]["fvu"] == summary["saes"]["batchtopk-256"]["fvu"]
    assert [p["curve"] for p in again["pairs"]] == [p["curve"] for p in summary["pairs"]]
    assert code == 2
    assert "other settings (n_train 200 there, 300 now)" in capsys.readouterr().err
