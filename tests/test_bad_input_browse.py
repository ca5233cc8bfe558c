"""`prisma-mm browse` refuses bad input in one line, before writing anything."""

from __future__ import annotations

import hashlib
import json

import pytest

from prisma_mm.sae import TopKSAE
from tests.bad_input import Case, check_case
from tests.test_viz_browser import synthetic_index

N = 12
BROWSE = ("browse", "{tmp}/sae", "--no-images")
CASES = [
    Case(
        "no-dictionary", ("browse", "{tmp}/nothing", "--out", "{tmp}/o"), "not a saved dictionary"
    ),
    Case("no-index", ("browse", "{tmp}/bare", "--out", "{tmp}/o"), "holds no feature index"),
    Case(
        "index-of-other-size",
        (*BROWSE, "--index", "{tmp}/index30", "--out", "{tmp}/o"),
        "has 30 latents but the dictionary has 12",
    ),
    Case(
        "index-of-other-weights",
        ("browse", "{tmp}/twin", "--index", "{tmp}/sae/index", "--out", "{tmp}/o", "--no-images"),
        "built for other weights",
    ),
    Case("out-is-a-file", (*BROWSE, "--out", "{tmp}/notes.txt"), "is a file", ("notes.txt",)),
    Case(
        "out-is-someone-elses-folder",
        (*BROWSE, "--out", "{tmp}/mine"),
        "not a prisma-mm browser",
        ("mine",),
    ),
    Case("cache-gone", ("browse", "{tmp}/sae", "--out", "{tmp}/o"), "is not there"),
    Case(
        "stitching-missing",
        (*BROWSE, "--out", "{tmp}/o", "--stitching", "{tmp}/none.json"),
        "not found",
    ),
    Case(
        "stitching-not-json",
        (*BROWSE, "--out", "{tmp}/o", "--stitching", "{tmp}/notes.txt"),
        "not readable JSON",
    ),
    Case(
        "stitching-summary-only",
        (*BROWSE, "--out", "{tmp}/old", "--stitching", "{tmp}/summary.json"),
        "no per-latent classes",
        ("old",),
    ),
    Case(
        "stitching-of-other-sae",
        (*BROWSE, "--out", "{tmp}/o", "--stitching", "{tmp}/stitch30.json"),
        "LARGE SAE",
    ),
    Case(
        "meta-sae-folder-without-export",
        (*BROWSE, "--out", "{tmp}/o", "--meta-sae", "{tmp}/mine"),
        "meta_sae.json",
    ),
    Case(
        "meta-sae-wrong-format",
        (*BROWSE, "--out", "{tmp}/o", "--meta-sae", "{tmp}/summary.json"),
        "not a meta-SAE export",
    ),
    Case(
        "ground-truth-without-values",
        (*BROWSE, "--out", "{tmp}/o", "--ground-truth", "{tmp}/summary.json"),
        "no 'values' rows",
    ),
    Case(
        "ground-truth-of-other-sae",
        (*BROWSE, "--out", "{tmp}/o", "--ground-truth", "{tmp}/gt_big.json"),
        "names latent 40",
    ),
    Case("negative-images", (*BROWSE, "--out", "{tmp}/o", "--top-images", "-1"), "non-negative"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_browse")
    sae = TopKSAE(d_in=32, n_latents=N, k=3, seed=0)
    sae.save(tmp / "sae")
    TopKSAE(d_in=32, n_latents=N, k=3, seed=1).save(tmp / "twin")
    sae.save(tmp / "bare")
    index = synthetic_index(n_latents=N)
    weights = (tmp / "sae" / "weights.safetensors").read_bytes()
    index.meta["dictionary"]["sha256"] = hashlib.sha256(weights).hexdigest()
    index.meta["cache"]["path"] = str(tmp / "no-cache")
    index.save(tmp / "sae" / "index")
    synthetic_index(n_latents=30).save(tmp / "index30")
    (tmp / "notes.txt").write_text("not json")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "keep.txt").write_text("mine")
    summary = {"classes": {"threshold": 0.7}, "format": "something else"}
    (tmp / "summary.json").write_text(json.dumps(summary))
    latents = {"max_cosine": [0.5] * 30, "best_match": [0] * 30, "delta_mse": [0.0] * 30,
               "active": [True] * 30, "novel_test": [False] * 30, "novel_proxy": [False] * 30}  # fmt: skip
    (tmp / "stitch30.json").write_text(json.dumps({"classes": {"latents": latents}}))
    gt = {"values": [{"value": "shape=circle", "patch_latent": 40, "patch_auroc": 0.9}]}
    (tmp / "gt_big.json").write_text(json.dumps(gt))
    # a previous browser, which a refused run must leave as it was
    (tmp / "old").mkdir()
    (tmp / "old" / "prisma-browser.json").write_text("{}")
    (tmp / "old" / "index.html").write_text("previous")
    return tmp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_browse_refuses(case, inputs, capsys):
    check_case(case, inputs, capsys)
    assert not (inputs / "o").exists()  # nothing written
