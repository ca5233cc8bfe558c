"""Bad input to the zoo and to model loading, through the CLI: unknown cards and families,
weights files that are corrupt, not checkpoints, pickles, missing or of another
architecture, devices that do not exist here, and hooks a model does not have. Each row
fails with one line before anything is written (the cache's --out stays absent)."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input import Case, check_case
from PIL import Image
from safetensors.torch import save_file

import prisma_mm

OUT = ("out",)


def _cache(*extra: str, model: str = "tiny-vit", hooks: str = "blocks.0.hook_resid_post"):
    """``prisma-mm cache`` on the folder of two images, writing to {tmp}/out."""
    argv = ("cache", "--model", model, "--hooks", hooks, "--data", "{tmp}/images")
    return (*argv, "--out", "{tmp}/out", "--quiet", *extra)


CASES = [
    Case("zoo-show-unknown-card", ("zoo", "show", "tiny-vitt"), "unknown model 'tiny-vitt'"),
    Case("zoo-list-unknown-family", ("zoo", "list", "--family", "timmm"), "unknown model family"),
    Case("cache-unknown-card", _cache(model="vit-b17-nope"), "unknown model 'vit-b17-nope'", OUT),
    Case(
        "cache-weights-corrupt-safetensors",
        _cache("--weights", "{tmp}/corrupt.safetensors"),
        "not a valid safetensors file",
        OUT,
    ),
    Case(
        "cache-weights-not-a-checkpoint",
        _cache("--weights", "{tmp}/notes.txt"),
        "cannot read weights",
        OUT,
    ),
    Case(
        "cache-weights-pickled-object",
        _cache("--weights", "{tmp}/pickled.pt"),
        "pickled objects are refused",
        ("out", "pickled.pt"),
    ),
    Case(
        "cache-weights-missing-path",
        _cache("--weights", "{tmp}/missing.safetensors"),
        "does not exist",
        OUT,
    ),
    Case(
        "cache-weights-other-architecture",
        _cache("--weights", "{tmp}/clip.safetensors"),
        "do not fit this model",
        ("out", "clip.safetensors"),
    ),
    Case(
        "cache-weights-folder-without-model",
        _cache("--weights", "{tmp}/empty-folder"),
        "has no model.safetensors",
        OUT,
    ),
    Case("cache-device-gpu", _cache("--weights", "none", "--device", "gpu"), "unknown device", OUT),
    Case(
        "cache-device-cuda-99", _cache("--weights", "none", "--device", "cuda:99"), "cuda:99", OUT
    ),
    pytest.param(
        Case("cache-device-cuda-no-gpu", _cache("--device", "cuda"), "no CUDA GPU", OUT),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    Case(
        "cache-hook-beyond-the-blocks",
        _cache(hooks="blocks.9.hook_resid_post"),
        "the model has blocks 0-1",
        OUT,
    ),
    Case(
        "cache-hook-not-offered",
        _cache(model="tiny-clip", hooks="blocks.0.attn.hook_z"),
        "not offered on this model",
        OUT,
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_input_zoo")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    (tmp / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp / "notes.txt").write_text("these are not weights\n")
    torch.save({"when": datetime.date(2020, 1, 1)}, tmp / "pickled.pt")
    clip = prisma_mm.load_model("tiny-clip", weights=None)
    state = {k: v.contiguous() for k, v in clip.module.state_dict().items()}
    save_file(state, str(tmp / "clip.safetensors"))
    (tmp / "empty-folder").mkdir()
    return tmp


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: c.id if isinstance(c, Case) else c.values[0].id
)
def test_bad_input(case: Case, inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_case(case, inputs, capsys)
