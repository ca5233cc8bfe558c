"""Bad input to ``prisma-mm steer``: one error line, before any image is generated, and a
folder already written (a foreign one, or a previous grid) is left as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bad_input import Case, check_case

HOOK = "unet.up.0.0.hook_update"  # 32 channels on tiny-sdxl
GRID = ("--model", "tiny-sdxl", "--weights", "none", "--prompt", "a cat", "--quiet")


def steer(dictionary: str, *extra: str, out: str = "{tmp}/o") -> tuple[str, ...]:
    return ("steer", f"{{tmp}}/{dictionary}", "--latent", "3", *GRID, "--out", out, *extra)


CASES = [
    Case("not-a-dictionary", steer("prompts.txt"), "not a saved dictionary"),
    Case("no-prompt", ("steer", "{tmp}/sae", "--latent", "3", "--mode", "scale", "--out",
                       "{tmp}/o"), "no prompt"),
    Case("prompts-file-missing", steer("sae", "--prompts", "{tmp}/nowhere.txt"), "does not exist"),
    Case("strengths-not-numbers", steer("sae", "--strengths", "1,big"), "comma-separated"),
    Case("seeds-not-integers", steer("sae", "--seeds", "0.5"), "--seeds"),
    Case("seed-twice", steer("sae", "--seeds", "1,1"), "lists a seed twice"),
    Case("latent-out-of-range", ("steer", "{tmp}/sae", "--latent", "99", *GRID, "--mode", "scale",
                                 "--out", "{tmp}/o"), "outside 0..31"),
    Case("no-index-for-add", steer("sae"), "no feature index"),
    Case("latent-never-fired", ("steer", "{tmp}/sae", "--latent", "5", *GRID, "--index",
                                "{tmp}/index", "--out", "{tmp}/o"), "never fired"),
    Case("index-of-another-dictionary", steer("sae", "--index", "{tmp}/index16"), "16 latents"),
    Case("another-hook-than-trained", steer("sae", "--mode", "scale", "--hook",
                                            "unet.mid.0.hook_update"), "was trained on"),
    Case("unknown-hook", steer("lost", "--mode", "scale"), "unet.up.7.0.hook_update"),
    Case("width-mismatch", steer("narrow", "--mode", "scale"), "d_in=16"),
    Case("unknown-model", steer("sae", "--mode", "scale", "--model", "no-such-pipe"),
         "no-such-pipe"),
    Case("a-classifier-card", steer("sae", "--mode", "scale", "--model", "tiny-vit"),
         "not a diffusion pipeline"),
    Case("at-steps-past-the-run", steer("sae", "--mode", "scale", "--steps", "2",
                                        "--at-steps", "2"), "steps 0..1"),
    Case("uncond-without-guidance", steer("sae", "--mode", "scale", "--half", "uncond"),
         "no unconditional half"),
    Case("box-outside-the-image", steer("sae", "--mode", "scale", "--box", "0,0,40,8"),
         "0 <= left < right <= 32"),
    Case("box-of-three-numbers", steer("sae", "--mode", "scale", "--box", "0,0,8"),
         "left,top,right,bottom"),
    Case("mask-not-an-image", steer("sae", "--mode", "scale", "--mask", "{tmp}/prompts.txt"),
         "not a readable image"),
    Case("box-and-mask", steer("sae", "--mode", "scale", "--box", "0,0,8,8", "--mask",
                               "{tmp}/mask.png"), "not both"),
    Case("bad-size", steer("sae", "--mode", "scale", "--size", "31"), "multiple of"),
    Case("size-vae-multiple-not-8", steer("sae", "--mode", "scale", "--size", "30"), "multiple of 8"),
    Case("bad-mode", steer("sae", "--mode", "paint"), "invalid choice"),
    Case("out-is-a-foreign-folder", steer("sae", "--mode", "scale", out="{tmp}/busy"),
         "not a steering grid", ("busy",)),
    Case("out-is-a-file", steer("sae", "--mode", "scale", out="{tmp}/prompts.txt"), "is a file",
         ("prompts.txt",)),
    Case("bad-input-keeps-a-previous-grid", steer("sae", "--strengths", "x", out="{tmp}/done"),
         "comma-separated", ("done",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    from PIL import Image

    from prisma_mm.sae import TopKSAE
    from prisma_mm.viz.index import IndexOptions, IndexState, _finish

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_steer")
    torch.manual_seed(0)
    for name, d, n, hook in (("sae", 32, 32, HOOK), ("narrow", 16, 32, HOOK),
                             ("lost", 32, 32, "unet.up.7.0.hook_update"),
                             ("sae16", 32, 16, HOOK)):  # fmt: skip
        sae = TopKSAE(d_in=d, n_latents=n, k=2)
        sae.metadata.update(hook=hook, model="tiny-sdxl")
        sae.save(root / name)
    # feature indexes written as build_index finishes one: latent 3 fired, latent 5 never
    for name, n in (("index", 32), ("index16", 16)):
        state = IndexState(n, IndexOptions())
        state.fire_tokens[3], state.sum_active[3] = 4, 6.0
        manifest = {"source": {}, "shards": []}
        layout = __import__("prisma_mm.hooks", fromlist=["TokenLayout"]).TokenLayout(
            0, (1, 4, 4), (8, 8), (32, 32)
        )
        dictionary = TopKSAE(d_in=32, n_latents=n, k=2)
        (root / "cache").mkdir(exist_ok=True)
        (root / "cache" / "manifest.json").write_text("{}")
        index = _finish(state, dictionary, {}, {**manifest, "token_index": {HOOK: []}},
                        root / "cache", HOOK, layout, {})  # fmt: skip
        index.save(root / name)
    (root / "prompts.txt").write_text("a cat\n")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "mask.png")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    (root / "done").mkdir()
    (root / "done" / "settings.json").write_text(json.dumps({"format": "prisma-mm-steer"}))
    (root / "done" / "grid.png").write_bytes(b"a previous grid")
    yield root
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp, capsys):
    check_case(case, tmp, capsys)
