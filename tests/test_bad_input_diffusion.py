"""`prisma-mm cache` from prompts refuses bad input in one line, before any work, and leaves an
existing prompt cache as it was."""

from __future__ import annotations

import pytest
from bad_input import Case, check_case

from prisma_mm.cache import write_cache

HOOK = "unet.down.2.1.hook_update"
WRITE = ("cache", "--model", "tiny-sdxl", "--workers", "0", "--quiet")
GOOD = (*WRITE, "--hooks", HOOK, "--data", "{tmp}/prompts.txt")
NEW = (*GOOD, "--out", "{tmp}/new")
CSV = (*WRITE, "--hooks", HOOK, "--out", "{tmp}/new", "--data", "{tmp}/prompts.csv")

CASES = [
    Case(
        "prompts-missing",
        (*WRITE, "--hooks", HOOK, "--data", "{tmp}/nope.txt", "--out", "{tmp}/new"),
        "prompts file",
    ),  # fmt: skip
    Case(
        "prompts-empty",
        (*WRITE, "--hooks", HOOK, "--data", "{tmp}/empty.txt", "--out", "{tmp}/new"),
        "has no prompts",
    ),  # fmt: skip
    Case(
        "hook-unknown",
        (
            *WRITE,
            "--hooks",
            "unet.down.2.2.hook_update",
            "--data",
            "{tmp}/prompts.txt",
            "--out",
            "{tmp}/new",
        ),
        "unknown hook 'unet.down.2.2.hook_update'",
    ),  # fmt: skip
    Case(
        "hook-on-text-encoder",
        (
            *WRITE,
            "--hooks",
            "text.blocks.0.hook_resid_post",
            "--data",
            "{tmp}/prompts.txt",
            "--out",
            "{tmp}/new",
        ),
        "is on a text encoder",
    ),  # fmt: skip
    Case(
        "hooks-on-two-grids",
        (
            *WRITE,
            "--hooks",
            f"{HOOK},unet.up.1.0.hook_update",
            "--data",
            "{tmp}/prompts.txt",
            "--out",
            "{tmp}/new",
        ),
        "have different grids",
    ),  # fmt: skip
    Case("column-unknown", (*CSV, "--prompt-column", "text"), "--prompt-column 'text' is not a"),
    Case("column-absent", CSV, "has no prompt, caption or text column"),
    Case("column-on-text-file", (*NEW, "--prompt-column", "caption"), "applies to CSV / JSONL"),
    Case("steps-0", (*NEW, "--steps", "0"), "give a positive number of denoising steps"),
    Case("guidance-negative", (*NEW, "--guidance", "-1"), "give a finite number >= 0"),
    Case("seeds-garbage", (*NEW, "--seeds", "one,two"), "--seeds 'one,two'"),
    Case("seeds-twice", (*NEW, "--seeds", "1,1"), "lists a seed twice"),
    Case("size-not-a-vae-multiple", (*NEW, "--img-size", "33"), "multiple of 8"),
    Case("tokens-cls", (*NEW, "--tokens", "cls"), "no CLS token"),
    Case(
        "steps-on-an-image-model",
        (
            "cache",
            "--model",
            "tiny-vit",
            "--weights",
            "none",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            "{tmp}/prompts.txt",
            "--out",
            "{tmp}/new",
            "--steps",
            "2",
        ),
        "--steps applies to diffusion cards",
    ),  # fmt: skip
    Case(
        "prompts-for-an-image-model",
        (
            "cache",
            "--model",
            "tiny-vit",
            "--weights",
            "none",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            "prompts:{tmp}/prompts.txt",
            "--out",
            "{tmp}/new",
        ),
        "needs a diffusion card",
    ),  # fmt: skip
    Case(
        "resume-with-other-steps",
        (*GOOD, "--out", "{tmp}/cache", "--steps", "2"),
        "already holds a different cache: generation",
        untouched=("cache",),
    ),  # fmt: skip
    Case(
        "pretrained-missing-offline",
        (
            "cache",
            "--model",
            "sdxl-turbo",
            "--hooks",
            HOOK,
            "--data",
            "{tmp}/prompts.txt",
            "--out",
            "{tmp}/new",
        ),
        "huggingface-cli download stabilityai/sdxl-turbo",
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prompt files (good, empty, CSV without a prompt column) and a finished tiny prompt
    cache (1 step) that the resume row must leave untouched."""
    tmp = tmp_path_factory.mktemp("bad-diffusion")
    (tmp / "prompts.txt").write_text("a photo of a cat\na red car\n")
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "prompts.csv").write_text("id,words\n0,a cat\n")
    write_cache("tiny-sdxl", tmp / "prompts.txt", tmp / "cache", [HOOK], workers=0,
                progress=False)  # fmt: skip
    return tmp


@pytest.fixture(autouse=True)
def offline_empty_hub(inputs, monkeypatch):
    # no network and an empty HF cache: a pretrained card cannot be found (and nothing hangs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(inputs / "empty-hub"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_prompt_cache_input_is_one_line_before_any_work(case, inputs, capsys):
    check_case(case, inputs, capsys)
    assert not (inputs / "new" / "manifest.json").exists()
