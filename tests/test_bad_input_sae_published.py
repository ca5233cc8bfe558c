"""Bad input to published SAEs, through the CLI: unknown names and families (one line with the
nearest valid ones; in eval, index, browse and steer alike), weights missing from an offline Hugging Face cache (one line naming the
repo and the files to fetch) and a GitHub-only release (one line saying what to clone). No
report is written, and the cache is never opened."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_input import Case, check_case

OUT = ("out",)


def _eval(name: str) -> tuple[str, ...]:
    return ("eval", name, "--cache", "{tmp}/cache", "--split", "all", "--out", "{tmp}/out/e.json")


CASES = [
    Case(
        "sae-show-unknown-name",
        ("sae", "show", "prisma-clip-b32-vanila-x64-l1-mlp-out"),
        "did you mean 'prisma-clip-b32-vanilla-x64-l1-mlp-out'",
    ),
    Case(
        "sae-list-unknown-family",
        ("sae", "list", "--family", "vit-prisma"),
        "unknown SAE family 'vit-prisma' (did you mean 'vit_prisma'",
    ),
    Case("sae-show-no-name", ("sae", "show"), "the following arguments are required: name"),
    Case(
        "eval-published-weights-not-in-offline-cache",
        _eval("saev-clip-b16-in1k-24k"),
        "huggingface-cli download osunlp/SAE_CLIP_24K_ViT-B-16_IN1K --include 'sae.pt'",
        OUT,
    ),
    Case(
        "eval-published-github-release",
        _eval("unbox-sdxl-turbo-mid.0"),
        "clone https://github.com/surkovv/sdxl-unbox",
        OUT,
    ),
    Case(
        "eval-misspelt-published-name",
        _eval("saev-clip-b16-in1k-24"),
        "does not exist: check the path (or give a published SAE's name",
        OUT,
    ),
    Case(
        "index-misspelt-published-name",
        ("index", "saev-clip-b16-in1k-24", "{tmp}/cache", "--out", "{tmp}/out/i"),
        "did you mean 'saev-clip-b16-in1k-24k'",
        OUT,
    ),
    Case(
        "index-published-weights-not-in-offline-cache",
        ("index", "saev-clip-b16-in1k-24k", "{tmp}/cache", "--out", "{tmp}/out/i"),
        "huggingface-cli download osunlp/SAE_CLIP_24K_ViT-B-16_IN1K --include 'sae.pt'",
        OUT,
    ),
    Case(
        "browse-misspelt-published-name",
        ("browse", "prisma-clip-b32-vanila-x64-l1-mlp-out", "--out", "{tmp}/out/b"),
        "did you mean 'prisma-clip-b32-vanilla-x64-l1-mlp-out'",
        OUT,
    ),
    Case(
        "steer-misspelt-published-name",
        (
            "steer",
            "unbox-sdxl-turbo-mid0",
            "--latent",
            "1",
            "--prompt",
            "a cat",
            "--out",
            "{tmp}/out/s",
        ),  # fmt: skip
        "did you mean 'unbox-sdxl-turbo-mid.0'",
        OUT,
    ),
    Case(
        "steer-published-github-release",
        (
            "steer",
            "unbox-sdxl-turbo-mid.0",
            "--latent",
            "1",
            "--prompt",
            "a cat",
            "--out",
            "{tmp}/out/s",
        ),  # fmt: skip
        "clone https://github.com/surkovv/sdxl-unbox",
        OUT,
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """An empty folder: the name is refused before eval reads its cache."""
    return tmp_path_factory.mktemp("published")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, inputs, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_case(case, inputs, capsys)
    assert not (inputs / "out").exists()
