"""Bad input to ``prisma-mm index``: one error line, before any work, nothing written lost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bad_input import Case, check_case
from PIL import Image

HOOK = "blocks.0.hook_resid_post"

CASES = [
    Case("not-a-dictionary", ("index", "{tmp}/images", "{tmp}/cache", "--out", "{tmp}/o1"),
         "not a saved dictionary", ("cache",)),
    Case("source-missing", ("index", "{tmp}/sae", "{tmp}/nowhere", "--out", "{tmp}/o2"),
         "does not exist"),
    Case("source-without-model", ("index", "{tmp}/sae", "{tmp}/images", "--out", "{tmp}/o3"),
         "--model NAME", ("images",)),
    Case("width-mismatch", ("index", "{tmp}/narrow", "{tmp}/cache", "--out", "{tmp}/o4"),
         "d_in=16", ("cache",)),
    Case("unknown-hook", ("index", "{tmp}/sae", "{tmp}/cache", "--hook", "blocks.7.hook_x",
                          "--out", "{tmp}/o5"), "blocks.7.hook_x"),
    Case("hist-bins-not-power-of-two", ("index", "{tmp}/sae", "{tmp}/cache", "--hist-bins", "12",
                                        "--out", "{tmp}/o6"), "power of two"),
    Case("top-n-zero", ("index", "{tmp}/sae", "{tmp}/cache", "--top-n", "0", "--out", "{tmp}/o7"),
         "top_n must be >= 1"),
    Case("unknown-model", ("index", "{tmp}/sae", "{tmp}/images", "--model", "no-such-vit",
                           "--hook", HOOK, "--out", "{tmp}/o8"), "no-such-vit", ("images",)),
    Case("bad-score", ("index", "{tmp}/sae", "{tmp}/cache", "--score", "median"),
         "invalid choice"),
    Case("out-holds-other-files", ("index", "{tmp}/sae", "{tmp}/cache", "--out", "{tmp}/busy"),
         "non-empty directory", ("busy",)),
    Case("out-holds-another-partial-index", ("index", "{tmp}/sae", "{tmp}/cache", "--out",
                                             "{tmp}/partial", "--top-n", "5"),
         "partial index of another", ("partial",)),
    Case("out-holds-another-index", ("index", "{tmp}/sae", "{tmp}/cache", "--out", "{tmp}/done",
                                     "--top-n", "5"), "another dictionary", ("done",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    import prisma_mm
    from prisma_mm.cache import write_cache
    from prisma_mm.sae import TopKSAE
    from prisma_mm.viz.index import IndexOptions, build_index

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_index")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(3):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    write_cache(model, str(root / "images"), root / "cache", [HOOK], progress=False)
    TopKSAE(d_in=32, n_latents=8, k=2).save(root / "sae")
    TopKSAE(d_in=16, n_latents=8, k=2).save(root / "narrow")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    build_index(root / "sae", root / "cache", root / "done", IndexOptions(), progress=False)
    # a checkpoint left by a killed run of other options
    from prisma_mm.viz.index import STATE_FILE, IndexState, _atomic_bytes

    (root / "partial").mkdir()
    _atomic_bytes(root / "partial" / STATE_FILE, IndexState(8, IndexOptions()).to_bytes({"x": 1}))
    yield root
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp, capsys):
    check_case(case, tmp, capsys)
