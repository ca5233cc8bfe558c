"""SAE families: the plateau criterion on curves with known answers, the Lightning callback
stopping a real run exactly where the criterion says (and not before the budget when it
cannot hold), and a tiny `prisma-mm family` run whose report is checked against the saved
members and against the stitching and ground-truth numbers recomputed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import prisma_mm
from prisma_mm.analysis.families import (
    PAPER_META_FVU,
    FamilyConfig,
    PlateauCriterion,
    family_markdown,
    toy_held_out,
    train_member,
)
from prisma_mm.cli import main
from prisma_mm.errors import PrismaError

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.3.hook_resid_post"
N_TRAIN, N_EVAL, BATCH = 60, 16, 256


# ----- the criterion on synthetic curves -----------------------------------------------------
def test_plateau_on_a_curve_that_flattens():
    values = [1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5]
    criterion = PlateauCriterion(window=3, rel_eps=0.01)
    # at index 5 the best before the window is 0.6 (a 17% gain); at 6 it is 0.5 (no gain)
    assert criterion.improvement(values[:6]) == pytest.approx(1 / 6)
    assert criterion.first(values) == 6
    assert not criterion.reached(values[:6]) and criterion.reached(values[:7])
    # one noisy evaluation neither stops nor prolongs training: minima, not last values
    noisy = [1.0, 0.8, 0.6, 0.9, 0.5, 0.5, 0.5, 0.5]
    assert criterion.first(noisy) == 7
    assert criterion.improvement(values[:3]) is None  # fewer values than window + 1


def test_plateau_on_exponential_decay_matches_the_closed_form():
    # f_n = 0.1 + 0.9 * 0.7**n falls monotonically: the gain at n is (f_{n-W} - f_n) / f_{n-W}
    n = np.arange(60)
    f = 0.1 + 0.9 * 0.7**n
    window, eps = 4, 0.02
    gain = (f[:-window] - f[window:]) / f[:-window]  # gain[i] is at index i + window
    expected = int(np.argmax(gain < eps)) + window
    assert PlateauCriterion(window, eps).first(f.tolist()) == expected
    assert 10 < expected < 40


def test_no_plateau_within_the_budget():
    # at n, 1 / (1 + n) has improved by 4 / (n + 1) over a window of 4: below 1% from n = 400
    curve = [1 / (1 + n) for n in range(50)]
    criterion = PlateauCriterion(window=4, rel_eps=0.01)
    assert criterion.first(curve) is None and not criterion.reached(curve)
    assert criterion.first([1 / (1 + n) for n in range(420)]) == 400


@pytest.mark.parametrize(
    ("window", "eps", "match"), [(0, 0.01, "window"), (2, 0.0, "rel_eps"), (2, 1.5, "rel_eps")]
)
def test_plateau_refuses_bad_settings(window, eps, match):
    with pytest.raises(PrismaError, match=match):
        PlateauCriterion(window, eps)


# ----- a tiny cache and a real family --------------------------------------------------------
@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    from prisma_mm.cache import write_cache
    from prisma_mm.data.toyworld import ToyWorld
    from prisma_mm.demo import IndexedToyWorld

    model = prisma_mm.load_model("toyvit")
    path = tmp_path_factory.mktemp("family") / "cache"
    write_cache(model, IndexedToyWorld(ToyWorld(N_TRAIN, seed=0)), path, hooks=[HOOK],
                batch_size=30, shard_size=30, progress=False)  # fmt: skip
    return model, path


ARGS = ["--base-latents", "32", "--n-sizes", "2", "--k", "4", "--batch-size", str(BATCH),
        "--eval-every-tokens", str(2 * BATCH), "--max-tokens", "6000", "--plateau-window", "1",
        "--plateau-eps", "0.9", "--eval-fraction", "0.1", "--n-eval", str(N_EVAL),
        "--meta-steps", "40", "--stitch-points", "4", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def family_run(toy_cache):
    """`prisma-mm family` on the tiny cache: window 1 at eps 0.9 plateaus at the second
    evaluation (the FVU would have to fall by 90% between two evaluations not to)."""
    _, cache = toy_cache
    out = cache.parent / "family"
    assert main(["family", "--cache", str(cache), "--out", str(out), *ARGS]) == 0
    return out, json.loads((out / "family_report.json").read_text())


def test_members_stop_where_the_criterion_holds(family_run):
    out, report = family_run
    assert [m["n_latents"] for m in report["members"]] == [32, 64]
    assert report["criterion"] == {"window": 1, "rel_eps": 0.9}
    assert report["shared_data_order"] is True
    for m in report["members"]:
        tokens = [t for t, _ in m["curve"]]
        assert tokens == [2 * BATCH, 4 * BATCH]  # evaluated every 2 steps, stopped at the 2nd
        assert m["plateaued"] is True and m["plateau_tokens"] == m["tokens_trained"] == 4 * BATCH
        first = PlateauCriterion(1, 0.9).first([f for _, f in m["curve"]])
        assert first == len(m["curve"]) - 1
        saved = json.loads((out / "members" / m["name"] / "training.json").read_text())
        assert saved["curve"] == m["curve"] and saved["plateau_tokens"] == m["plateau_tokens"]


def test_a_member_without_plateau_trains_its_whole_budget(toy_cache):
    _, cache = toy_cache
    config = FamilyConfig(cache_dir=cache, out=cache.parent / "budget", sizes=[32, 64], k=4,
                          batch_size=BATCH, eval_every_tokens=2 * BATCH, max_tokens=3 * BATCH,
                          plateau_window=1, plateau_rel_eps=0.9, eval_fraction=0.1,
                          progress=False)  # fmt: skip
    # 3 steps hold one evaluation (after step 2): the window of 1 needs two to plateau
    member = train_member(config, 32, HOOK)
    assert member.plateaued is False and member.plateau_tokens is None
    assert member.tokens_trained == 3 * BATCH and [t for t, _ in member.curve] == [2 * BATCH]
    assert (member.path / "weights.safetensors").is_file()
    again = train_member(config, 32, HOOK)  # a finished member is reused, not retrained
    assert again == member


def test_report_matches_the_saved_members(family_run, toy_cache):
    from prisma_mm.analysis.ground_truth import auroc
    from prisma_mm.analysis.metrics import evaluate
    from prisma_mm.analysis.stitching import classify_latents
    from prisma_mm.sae import load

    model, _ = toy_cache
    out, report = family_run
    held = toy_held_out(model, HOOK, N_EVAL, seed=0, start=N_TRAIN)
    assert report["n_rows"] == held.rows.shape[0] == N_EVAL * 65
    saes = [load(m["path"]) for m in report["members"]]
    for m, sae in zip(report["members"], saes):
        metrics = evaluate(sae, [held.rows], progress=False)
        assert m["fvu"] == pytest.approx(metrics.fvu, rel=1e-5)
        assert m["l0"] == pytest.approx(metrics.l0, rel=1e-5)
        assert m["dead_fraction"] == pytest.approx(metrics.dead_fraction)
        assert 0 <= m["spliced_accuracy"] <= 1
        assert m["values_with_latent"] <= m["values_scorable"] <= 44
    pair = report["pairs"][0]
    classes = classify_latents(saes[0], saes[1], held.rows)
    assert {k: pair[k] for k in classes.counts()} == classes.counts()
    assert pair["n_novel_test"] + pair["n_reconstruction_test"] + pair["n_inactive"] == 64
    assert pair["agreement"] == pytest.approx(classes.agreement)
    mse = [r["mse"] for r in pair["curve"]]
    assert pair["curve"][0]["n_latents"] == 32 and pair["curve"][-1]["n_latents"] == 64
    increases = sum((b - a) / a > 1e-4 for a, b in zip(mse, mse[1:]))
    assert pair["n_increases"] == increases and pair["monotone"] == (increases == 0)
    assert Path(pair["plot"]).is_file()
    from prisma_mm.viz.browser import read_stitching

    read_stitching(pair["stitch_json"], 64)  # per-latent classes in the browser's format
    novel = pair["novel_ground_truth"]
    assert novel["n_novel"] == pair["n_novel_test"] == len(novel["latents"])
    # each novel latent's best value, recomputed from the patch codes and labels
    with torch.no_grad():
        codes = saes[1].encode(held.patch_rows)
    labels = held.patch_labels.reshape(-1, 44)
    values_auroc = auroc(codes, labels)
    # values with fewer than 20 positive or negative patches in either half are not scored
    halves = labels.reshape(2, -1, 44)
    scorable = ((halves.sum(1) >= 20) & (halves.shape[1] - halves.sum(1) >= 20)).all(0)
    values_auroc[:, ~scorable] = -1.0
    assert report["members"][1]["values_scorable"] == int(scorable.sum())
    for row in novel["latents"]:
        assert row["value_auroc"] == pytest.approx(float(values_auroc[row["latent"]].max()))
        if row["kind"] == "value":
            assert row["value_auroc"] >= 0.9 and row["label"] == row["value"]
        if row["kind"] == "conjunction":
            assert row["conjunction_auroc"] >= 0.9 and row["label"] == row["conjunction"]
    meta = report["meta_sae"]
    assert meta["of"] == "batchtopk-64" and meta["n_meta"] == 16 and meta["k"] == 4
    assert meta["paper_fvu"] == PAPER_META_FVU and 0 < meta["fvu"] < 1.5
    assert meta["decomposition"]["n_targets"] == meta["n_conjunction_latents"]
    assert (out / "meta_sae" / "meta_sae.json").is_file()


def test_markdown_shows_the_json_numbers(family_run):
    out, report = family_run
    markdown = (out / "family_report.md").read_text()
    for m in report["members"]:
        assert (
            f"| {m['name']} | {m['n_latents']} | {m['fvu']:.3f} | {m['l0']:.1f} | "
            f"{m['dead_fraction']:.3f} | {m['spliced_accuracy']:.3f} | yes | "
            f"{m['plateau_tokens']} | {m['tokens_trained']} |"
        ) in markdown
    pair = report["pairs"][0]
    assert f"{pair['n_novel_test']} novel, {pair['n_reconstruction_test']} reconstruction" in (
        markdown
    )
    assert f"monotone: {pair['monotone']}" in markdown
    assert f"FVU {report['meta_sae']['fvu']:.3f} (paper: about 0.45)" in markdown


def test_report_without_ground_truth(family_run, toy_cache):
    """On held-out rows alone (`--held-out cache`): the same metrics and stitching, no ground
    truth, no spliced accuracy, no meta-SAE."""
    from prisma_mm.analysis.families import FamilyMember, family_report

    model, _ = toy_cache
    out, with_truth = family_run
    members = [FamilyMember.from_dict(json.loads((out / "members" / m["name"] / "training.json")
               .read_text())) for m in with_truth["members"]]  # fmt: skip
    held = toy_held_out(model, HOOK, N_EVAL, seed=0, start=N_TRAIN)
    report = family_report(members, rows=held.rows, stitch_points=4)
    assert [m["fvu"] for m in report["members"]] == [m["fvu"] for m in with_truth["members"]]
    assert "spliced_accuracy" not in report["members"][0] and "meta_sae" not in report
    assert "novel_ground_truth" not in report["pairs"][0]
    assert report["pairs"][0]["n_novel_test"] == with_truth["pairs"][0]["n_novel_test"]
    assert "conj. w/ latent" not in family_markdown(report)
    with pytest.raises(PrismaError, match="at least 2 members"):
        family_report(members[:1], rows=held.rows)
