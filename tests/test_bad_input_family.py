"""`prisma-mm family` refuses bad input in one line, before any work, and leaves the cache and
what is already written as they were."""

from __future__ import annotations

import json

import pytest
import torch
from bad_input import Case, RandomImages, check_case

import prisma_mm

HOOK = "blocks.0.hook_resid_post"
FAMILY = ("family", "--cache", "{tmp}/cache", "--base-latents", "16", "--k", "4", "--quiet")
NEW = ("--out", "{tmp}/new")
INPUTS = ("cache",)

CASES = [
    Case("family-cache-missing", ("family", "--cache", "{tmp}/nocache", *NEW),
         "holds no manifest.json", INPUTS),
    Case("family-cache-not-a-cache", ("family", "--cache", "{tmp}/folder", *NEW),
         "holds no manifest.json", ("folder",)),
    Case("family-hook-not-in-cache", (*FAMILY, *NEW, "--hook", "blocks.1.hook_resid_post"),
         "is not in cache", INPUTS),
    Case("family-one-size", (*FAMILY, *NEW, "--n-sizes", "1"), "integer >= 2", INPUTS),
    Case("family-sizes-repeat", (*FAMILY, *NEW, "--sizes", "32", "32"), "2 distinct", INPUTS),
    Case("family-k-above-smallest", (*FAMILY, *NEW, "--k", "32"), "exceeds the smallest",
         INPUTS),
    Case("family-architecture-transcoder", (*FAMILY, *NEW, "--architecture", "transcoder"),
         "not an SAE family", INPUTS),
    Case("family-architecture-unknown", (*FAMILY, *NEW, "--architecture", "topkk"),
         "not an SAE family", INPUTS),
    Case("family-budget-below-a-batch", (*FAMILY, *NEW, "--max-tokens", "100"),
         "less than one batch", INPUTS),
    Case("family-eval-below-a-batch", (*FAMILY, *NEW, "--eval-every-tokens", "100"),
         "less than one batch", INPUTS),
    Case("family-plateau-eps-1", (*FAMILY, *NEW, "--plateau-eps", "1"), "(0, 1)", INPUTS),
    Case("family-eval-fraction-0", (*FAMILY, *NEW, "--eval-fraction", "0"), "(0, 1)", INPUTS),
    Case("family-accelerator-gpu", (*FAMILY, *NEW, "--accelerator", "gpu"), "no CUDA GPU",
         INPUTS),
    Case("family-accelerator-unknown", (*FAMILY, *NEW, "--accelerator", "tpuu"),
         "unknown accelerator", INPUTS),
    Case("family-out-is-a-file", (*FAMILY, "--out", "{tmp}/afile"), "is a file",
         ("afile", *INPUTS)),
    Case("family-out-under-a-file", (*FAMILY, "--out", "{tmp}/afile/family"), "is a file",
         ("afile", *INPUTS)),
    Case("family-out-other-settings", (*FAMILY, "--out", "{tmp}/old"), "other settings",
         ("old", *INPUTS)),
    Case("family-out-damaged-record", (*FAMILY, "--out", "{tmp}/damaged"), "is damaged",
         ("damaged", *INPUTS)),
]  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A tiny-vit cache of 4 random images, a folder, a file, a family folder trained with
    other settings (k 8) and one whose record is damaged."""
    from prisma_mm.cache import write_cache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_input_family")
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    write_cache(model, RandomImages(4), root / "cache", [HOOK], progress=False)
    (root / "folder").mkdir()
    (root / "afile").write_text("keep me\n")
    (root / "old" / "members").mkdir(parents=True)
    (root / "old" / "family_run.json").write_text(json.dumps({"k": 8, "hook": HOOK}))
    (root / "damaged").mkdir()
    (root / "damaged" / "family_run.json").write_text("{not json")
    yield root
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp, capsys):
    check_case(case, tmp, capsys)
    assert not (tmp / "new").exists()  # nothing was started
