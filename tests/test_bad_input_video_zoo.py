"""Bad input to the video zoo through the CLI: misspelt video cards and families, weights of
another video architecture, folders that are not checkpoints, a pickle as a torchvision
checkpoint, an hf-hub repo for a torchvision card, an input size for a video card, hooks
a video family does not offer, and hooks of two stages with different grids in one cache. Each row fails with one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from bad_input import Case, Payload, check_case
from safetensors.torch import save_file

import prisma_mm

OUT = ("out",)


def _cache(*extra: str, model: str, hooks: str = "blocks.0.hook_resid_post"):
    """``prisma-mm cache`` on a folder with one 8-frame video, writing to {tmp}/out."""
    argv = ("cache", "--model", model, "--hooks", hooks, "--data", "{tmp}/videos")
    return (*argv, "--out", "{tmp}/out", "--quiet", *extra)


CASES = [
    Case("zoo-show-misspelt-video-card", ("zoo", "show", "tiny-videomea"), "'tiny-videomae'"),
    Case(
        "zoo-list-misspelt-video-family",
        ("zoo", "list", "--family", "torchvision-video"),
        "'torchvision_video'",
    ),
    Case(
        "cache-video-weights-of-another-architecture",
        _cache("--weights", "{tmp}/vivit.safetensors", model="tiny-videomae"),
        "do not fit this model",
        ("out", "vivit.safetensors"),
    ),
    Case(
        "cache-video-weights-folder-without-config",
        _cache("--weights", "{tmp}/empty-folder", model="tiny-vjepa2"),
        "has no config.json",
        OUT,
    ),
    Case(
        "cache-torchvision-weights-folder",
        _cache("--weights", "{tmp}/empty-folder", model="tiny-mvit"),
        "is a directory",
        OUT,
    ),
    Case(
        "cache-torchvision-weights-pickled-object",
        _cache("--weights", "{tmp}/pickled.pth", model="tiny-swin3d"),
        "pickled objects are refused",
        ("out", "pickled.pth"),
    ),
    Case(
        "cache-torchvision-hf-hub",
        _cache("--weights", "hf-hub:org/swin", model="tiny-swin3d"),
        "loads torchvision checkpoints",
        OUT,
    ),
    Case(
        "cache-video-img-size",
        _cache("--img-size", "64", model="tiny-vivit"),
        "img_size is not supported",
        OUT,
    ),
    Case(
        "cache-timesformer-attn-out",
        _cache(model="tiny-timesformer", hooks="blocks.0.hook_attn_out"),
        "divided attention",
        OUT,
    ),
    Case(
        "cache-swin3d-windowed-q",
        _cache(model="tiny-swin3d", hooks="blocks.1.attn.hook_q"),
        "shifted 3D windows",
        OUT,
    ),
    Case(
        "cache-mvit-hooks-of-two-stages",
        _cache(model="tiny-mvit", hooks="blocks.0.hook_resid_pre,blocks.1.hook_resid_post"),
        "different token grids",
        OUT,
    ),
    Case(
        "cache-videomae-no-final-norm",
        _cache(model="tiny-videomae", hooks="ln_final.hook_normalized"),
        "unknown hook 'ln_final.hook_normalized'",
        OUT,
    ),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_input_video_zoo")
    (tmp / "videos").mkdir()
    with av.open(str(tmp / "videos" / "clip.mkv"), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(8):
            pixels = np.full((32, 32, 3), index * 30, np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    vivit = prisma_mm.load_model("tiny-vivit", weights=None)
    save_file(vivit.module.state_dict(), str(tmp / "vivit.safetensors"))
    torch.save({"state_dict": Payload(str(tmp / "unpickled"))}, tmp / "pickled.pth")
    (tmp / "empty-folder").mkdir()
    return tmp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_case(case, inputs, capsys)
    assert not (inputs / "unpickled").exists()  # no row ran the pickle's payload
