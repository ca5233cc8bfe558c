"""Tiny tricky videos written with PyAV for the video tests: every frame draws its own index
as a 4x4 grid of big blocks (16 bits, robust to lossy coding), so a test reads back which
frame it got; FFV1 files are lossless, for bit-exact checks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BACKGROUND = (40, 0, 90)  # coloured, so a channel swap shows in bit-exact checks
OPEN_GOP = "open-gop=1:keyint=8:min-keyint=8:bframes=3:scenecut=0"
# irregular timestamps in ms: a variable-frame-rate file
VFR_PTS = [0, 40, 80, 200, 220, 240, 500, 520, 560, 600, 900, 940, 980, 1000, 1010, 1020,
           1400, 1440, 1480, 1520]  # fmt: skip


def pattern(index: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame ``index`` as ``uint8 [height, width, 3]``: white blocks for its set bits."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    block_h, block_w = height // 4, width // 4
    for bit in range(16):
        if (index >> bit) & 1:
            row, col = divmod(bit, 4)
            image[row * block_h : (row + 1) * block_h, col * block_w : (col + 1) * block_w] = 255
    return image


def frame_index(image: np.ndarray) -> int:
    """The index a :func:`pattern` frame draws (block centres, thresholded)."""
    height, width = image.shape[:2]
    block_h, block_w = height // 4, width // 4
    gray = image.astype(np.float32).mean(-1)
    value = 0
    for bit in range(16):
        row, col = divmod(bit, 4)
        centre = gray[row * block_h + 1 : (row + 1) * block_h - 1,
                      col * block_w + 1 : (col + 1) * block_w - 1]  # fmt: skip
        value |= int(centre.mean() > 150) << bit
    return value


def write_video(path: Path, n: int, codec: str = "libx264", *, container: str | None = None,
                options: dict | None = None, container_options: dict | None = None,
                pix_fmt: str = "yuv420p", rate: int | Fraction = 25, pts: list[int] | None = None,
                size: tuple[int, int] = (32, 32), rotation: int = 0,
                first: int = 0) -> Path:  # fmt: skip
    """``n`` pattern frames (indices ``first..first+n-1``) encoded into ``path``; ``pts``:
    explicit timestamps in ms (a VFR file)."""
    out = av.open(str(path), "w", format=container, options=container_options or {})
    stream = out.add_stream(codec, rate=rate, options=options or {})
    stream.height, stream.width = size
    stream.pix_fmt = pix_fmt
    if pts is not None:
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
    if rotation:
        stream.set_display_rotation(rotation)
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(pattern(first + i, *size), format="rgb24")
        if pts is not None:
            frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def truncate_inside(path: Path, out: Path, sample: int) -> Path:
    """``path`` (an mp4 with its index at the front) cut a few bytes into sample ``sample``:
    the index survives, the data after the cut is gone."""
    with av.open(str(path)) as container:
        entries = container.streams.video[0].index_entries
        cut = entries[sample].pos + 3
    out.write_bytes(path.read_bytes()[:cut])
    return out


def tricky_files(folder: Path) -> dict[str, tuple[Path, int]]:
    """The decoding test set: name -> (file, frames a correct reader finds)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "h264-mp4": (write_video(folder / "h264.mp4", 24, options={"bf": "3", "g": "8"}), 24),
        "open-gop-mp4": (
            write_video(folder / "open.mp4", 30, options={"x264-params": OPEN_GOP}),
            30,
        ),  # fmt: skip
        "mpeg-ts": (
            write_video(
                folder / "open.ts", 30, container="mpegts", options={"x264-params": OPEN_GOP}
            ),
            30,
        ),  # fmt: skip
        "avi-bframes": (
            write_video(folder / "bf.avi", 24, "mpeg4", options={"bf": "2", "g": "8"}),
            24,
        ),  # fmt: skip
        "avi-h264-bframes": (
            write_video(folder / "h264.avi", 24, options={"bf": "2", "g": "8"}),
            24,
        ),  # fmt: skip
        "avi-h264-open-gop": (
            write_video(folder / "open.avi", 30, options={"x264-params": OPEN_GOP}),
            30,
        ),  # fmt: skip
        "ffv1-mkv": (
            write_video(folder / "lossless.mkv", 20, "ffv1", pix_fmt="bgr0", options={"g": "12"}),
            20,
        ),  # fmt: skip
        "av1-mp4": (
            write_video(
                folder / "av1.mp4",
                16,
                "libsvtav1",
                options={"preset": "12", "svtav1-params": "lp=1"},
            ),
            16,
        ),  # fmt: skip
        "vp9-webm-no-cues": (
            write_video(
                folder / "vp9.webm",
                20,
                "libvpx-vp9",
                options={"g": "8"},
                container_options={"live": "1"},
            ),
            20,
        ),  # fmt: skip
        "vp8-webm-no-cues": (
            write_video(
                folder / "vp8.webm",
                20,
                "libvpx",
                options={"g": "8"},
                container_options={"live": "1"},
            ),
            20,
        ),  # fmt: skip
        "vfr-mp4": (
            write_video(folder / "vfr.mp4", 20, options={"bf": "2", "g": "6"}, pts=VFR_PTS),
            20,
        ),  # fmt: skip
    }
    whole = write_video(folder / "whole.mp4", 30, options={"bf": "2", "g": "8"},
                        container_options={"movflags": "faststart"})  # fmt: skip
    # cut inside sample 15 (decode order): frames presented up to the last complete packet's
    # decode time survive (13 of them with this B-frame layout)
    files["truncated-mp4"] = (truncate_inside(whole, folder / "truncated.mp4", 15), 13)
    return files
