"""`prisma-mm cache` on video data refuses bad input in one line, before any work (no model
is loaded for any row): a missing folder, no videos, a bad --clip, --clip on images, a card
without a clip sampling, an unknown or unavailable decoder."""

from __future__ import annotations

import pytest
from bad_input import Case, check_case
from cache_helpers import image_folder
from video_helpers import write_video

from prisma_mm.data.video import TorchCodecDecoder

VIDEO = (
    "cache", "--model", "tiny-videomae", "--weights", "none", "--hooks",
    "blocks.0.hook_resid_post", "--workers", "0", "--quiet", "--out", "{tmp}/new",
)  # fmt: skip
GOOD = (*VIDEO, "--data", "{tmp}/videos")

CASES = [
    Case("data-missing-folder", (*VIDEO, "--data", "videos:{tmp}/nowhere"), "does not exist"),
    Case(
        "data-folder-without-videos",
        (*VIDEO, "--data", "videos:{tmp}/no-videos"),
        "holds no video files",
        ("no-videos",),
    ),  # fmt: skip
    Case(
        "data-list-without-videos",
        (*VIDEO, "--data", "videos:{tmp}/empty.txt"),
        "lists no videos",
        ("empty.txt",),
    ),  # fmt: skip
    Case("clip-unknown-rule", (*GOOD, "--clip", "random:3"), "--clip 'random:3': use uniform:T"),
    Case("clip-missing-stride", (*GOOD, "--clip", "stride:4"), "use uniform:T"),
    Case("clip-zero-stride", (*GOOD, "--clip", "windows:4:0"), "must be positive integers"),
    Case("clip-pad-misspelt", (*GOOD, "--clip", "windows:4:2+padd"), "positive integers"),
    Case(
        "clip-on-image-data",
        (
            "cache",
            "--model",
            "tiny-vit",
            "--weights",
            "none",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            "{tmp}/images",
            "--out",
            "{tmp}/new",
            "--clip",
            "uniform:4",
        ),
        "applies to video data",
    ),  # fmt: skip
    Case(
        "card-without-clip-sampling",
        (
            "cache",
            "--model",
            "tiny-vit",
            "--weights",
            "none",
            "--hooks",
            "blocks.0.hook_resid_post",
            "--data",
            "{tmp}/videos",
            "--out",
            "{tmp}/new",
        ),
        "card 'tiny-vit' gives no clip sampling",
        ("videos",),
    ),  # fmt: skip
    Case("backend-unknown", (*GOOD, "--video-backend", "ffmpeg"), "invalid choice: 'ffmpeg'"),
]
if TorchCodecDecoder.unavailable() is not None:
    CASES.append(
        Case("backend-unavailable", (*GOOD, "--video-backend", "torchcodec"), "is unavailable")
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-video")
    (tmp / "videos").mkdir()
    write_video(tmp / "videos" / "a.mp4", 8)
    (tmp / "no-videos").mkdir()
    (tmp / "no-videos" / "readme.txt").write_text("no videos here")
    (tmp / "empty.txt").write_text("# nothing listed\n\n")
    image_folder(tmp / "images", 2, nested=False)
    return tmp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_video_input_is_one_line(case, inputs, capsys):
    check_case(case, inputs, capsys)
    assert not (inputs / "new").exists(), f"{case.id}: wrote an output before refusing"
