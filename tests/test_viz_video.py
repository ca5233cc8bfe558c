"""Views over space and time: the frame strip and the animated heatmap light exactly the frame
and patch where a constructed latent fires, for frame-major tubelet tokens (VideoMAE) and for
CLS + time-fastest tokens (TimeSformer); the browser's clip thumbnail shows the peak frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prisma_mm.data.toyworld import render_clip_arrays
from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.viz.browser import render_thumbnail
from prisma_mm.viz.grids import GridEntry
from prisma_mm.viz.heatmaps import FRAME_GAP
from prisma_mm.viz.video import (
    heatmap_frames,
    heatmap_gif,
    per_frame_values,
    render_frame_strips,
)

pytestmark = pytest.mark.usefixtures("one_thread")
# VideoMAE-like: 8 frames in tubelets of 2, a 4 x 4 grid of 8 px patches, no CLS, frame-major
TUBELETS = TokenLayout(0, (4, 4, 4), (8, 8), (32, 32), tubelet=2)
FRAME, ROW, COL = 1, 2, 3  # the token frame and patch where the constructed latent fires


def _time_fastest() -> TokenLayout:
    """TimeSformer-like: CLS + 8 frames x 4 x 4 patches, time fastest."""
    return TokenLayout(1, (8, 4, 4), (8, 8), (32, 32), order="hwt")


def one_hot(layout: TokenLayout, frame: int, row: int, col: int) -> torch.Tensor:
    """Token values firing only at (frame, row, col): found through the layout itself."""
    values = torch.zeros(layout.n_tokens)
    hits = [t for t in range(layout.n_tokens) if layout.token_to_patch(t) == (frame, row, col)]
    assert len(hits) == 1
    values[hits[0]] = 2.5
    return values


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    return render_clip_arrays(2, seed=4, progress=False)["clips"]  # [2, 8, 32, 32, 3]


def _lit_pixels(rgba: np.ndarray) -> np.ndarray:
    return np.argwhere(rgba[..., 3] > 0)


@pytest.mark.parametrize("layout_name", ["tubelets", "time_fastest"])
def test_frame_strip_lights_the_known_frame_and_patch(layout_name, clips, tmp_path):
    layout = TUBELETS if layout_name == "tubelets" else _time_fastest()
    frame = FRAME if layout_name == "tubelets" else 5
    entries = [GridEntry(clips[0], one_hot(layout, frame, ROW, COL), 2.5, "east", "k0")]
    figure = render_frame_strips(entries, layout, None, title="latent 3", temporal_score=0.75)
    assert "temporal score 0.75" in figure._suptitle.get_text()
    ax = figure.axes[0]
    overlay = ax.images[1].get_array()  # RGBA of the heatmap over the strip of 8 frames
    assert overlay.shape[:2] == (32, 8 * 32 + 7 * FRAME_GAP)
    lit = _lit_pixels(np.asarray(overlay))
    # input frames covered: the tubelet's two frames, or the one frame
    first = frame * layout.tubelet
    expected = {
        (y, f * (32 + FRAME_GAP) + x)
        for f in range(first, first + layout.tubelet)
        for y in range(ROW * 8, ROW * 8 + 8)
        for x in range(COL * 8, COL * 8 + 8)
    }
    assert {tuple(p) for p in lit} == expected
    path = render_frame_strips(entries, layout, tmp_path / "strip.png")
    assert Image.open(path).size[0] > 4 * Image.open(path).size[1]  # one long row of frames


def test_gif_animates_the_heatmap_over_the_clip(clips, tmp_path):
    values = one_hot(TUBELETS, FRAME, ROW, COL)
    path = heatmap_gif(clips[0], values, TUBELETS, tmp_path / "latent.gif", scale=2)
    gif = Image.open(path)
    assert gif.n_frames == 8 and gif.size == (64, 64) and gif.info.get("loop") == 0
    plain = [Image.fromarray(f).resize((64, 64), Image.NEAREST) for f in clips[0]]
    frames = heatmap_frames(clips[0], values, TUBELETS, scale=2)
    for t, (drawn, raw) in enumerate(zip(frames, plain, strict=True)):
        changed = np.argwhere((np.asarray(drawn) != np.asarray(raw)).any(-1))
        if t in (2, 3):  # token frame 1 covers input frames 2 and 3
            assert changed.size and changed[:, 0].min() >= 2 * ROW * 8
            assert changed[:, 0].max() < 2 * (ROW + 1) * 8
            assert changed[:, 1].min() >= 2 * COL * 8 and changed[:, 1].max() < 2 * (COL + 1) * 8
        else:
            assert changed.size == 0
    with pytest.raises(PrismaError, match=".gif"):
        heatmap_gif(clips[0], values, TUBELETS, tmp_path / "latent.png")
    with pytest.raises(PrismaError, match="frames"):
        heatmap_gif(clips[0][:4], values, TUBELETS, tmp_path / "short.gif")


def test_per_frame_values_follow_the_token_order():
    layout = _time_fastest()
    values = torch.arange(layout.n_tokens, dtype=torch.float32)
    per_frame = per_frame_values(values, layout)
    assert per_frame[0] == 0  # CLS kept in front
    grid = per_frame[1:].reshape(8, 4, 4)
    for t, r, c in [(0, 0, 0), (5, 2, 3), (7, 3, 1)]:
        token = 1 + (r * 4 + c) * 8 + t  # time fastest
        assert layout.token_to_patch(token) == (t, r, c) and grid[t, r, c] == token
    with pytest.raises(PrismaError, match="tokens"):
        per_frame_values(values[:-1], layout)


def test_browser_thumbnail_of_a_clip_shows_the_peak_frame(clips):
    values = one_hot(TUBELETS, 3, 0, 0)  # input frames 6 and 7
    frames = [Image.fromarray(f) for f in clips[1]]
    thumb = np.asarray(render_thumbnail(frames, values, TUBELETS, vmax=2.5, size=32))
    seventh = np.asarray(frames[6])
    assert (thumb[8:, :] == seventh[8:, :]).all()  # outside the lit patch: frame 6 itself
    assert (thumb[:8, :8] != seventh[:8, :8]).any()
