"""The moving toy world's user mistakes: a bad `--data toyclips:...` spec for `prisma-mm
cache`, and bad `--temporal` scores for `prisma-mm browse`, refused in one line before any
work (nothing written, a previous browser kept)."""

from __future__ import annotations

import hashlib
import json

import pytest

from prisma_mm.sae import TopKSAE
from tests.bad_input import Case, check_case
from tests.test_viz_browser import synthetic_index

N = 12
CACHE = ("cache", "--model", "tiny-videomae", "--hooks", "blocks.0.hook_resid_post", "--out")
BROWSE = ("browse", "{tmp}/sae", "--no-images")
CASES = [
    Case("toyclips-no-count", (*CACHE, "{tmp}/c", "--data", "toyclips:many"), "whole numbers"),
    Case("toyclips-zero", (*CACHE, "{tmp}/c", "--data", "toyclips:0"), "N >= 1"),
    Case(
        "toyclips-unknown-option",
        (*CACHE, "{tmp}/c", "--data", "toyclips:8,fps=4"),
        "unknown option 'fps'",
    ),
    Case(
        "toyclips-too-small",
        (*CACHE, "{tmp}/c", "--data", "toyclips:8,size=16"),
        "outside 32..1024",
    ),
    Case("toyclips-one-frame", (*CACHE, "{tmp}/c", "--data", "toyclips:8,frames=1"), "2 frames"),
    Case(
        "toyclips-into-a-file",
        (*CACHE, "{tmp}/notes.txt", "--data", "toyclips:8,frames=4"),
        "notes.txt",
        ("notes.txt",),
    ),
    Case(
        "temporal-not-json",
        (*BROWSE, "--out", "{tmp}/o", "--temporal", "{tmp}/notes.txt"),
        "not readable JSON",
    ),
    Case(
        "temporal-of-other-size",
        (*BROWSE, "--out", "{tmp}/old", "--temporal", "{tmp}/temporal30.json"),
        "12 numbers",
        ("old",),
    ),
    Case(
        "temporal-without-scores",
        (*BROWSE, "--out", "{tmp}/o", "--temporal", "{tmp}/other.json"),
        "'score'",
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_toyclips")
    sae = TopKSAE(d_in=32, n_latents=N, k=3, seed=0)
    sae.save(tmp / "sae")
    index = synthetic_index(n_latents=N)
    weights = (tmp / "sae" / "weights.safetensors").read_bytes()
    index.meta["dictionary"]["sha256"] = hashlib.sha256(weights).hexdigest()
    index.save(tmp / "sae" / "index")
    (tmp / "notes.txt").write_text("not json")
    scores = {key: [0.5] * 30 for key in ("score", "frozen", "order")}
    (tmp / "temporal30.json").write_text(json.dumps(scores))
    (tmp / "other.json").write_text(json.dumps({"values": []}))
    (tmp / "old").mkdir()  # a previous browser, which a refused run must leave as it was
    (tmp / "old" / "prisma-browser.json").write_text("{}")
    (tmp / "old" / "index.html").write_text("previous")
    return tmp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_toyclips_and_temporal_refused(case, inputs, capsys):
    check_case(case, inputs, capsys)
    assert not (inputs / "o").exists() and not (inputs / "c").exists()  # nothing written
