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


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory):
    """A TopK SAE on 24 toy clips through tiny-videomae, indexed: (index, sae dir, cache)."""
    from prisma_mm.cache import ActivationDataset, write_cache
    from prisma_mm.sae import TopKSAE, fit_simple
    from prisma_mm.viz.index import IndexOptions, build_index

    root = tmp_path_factory.mktemp("clips")
    hook = "blocks.1.hook_resid_post"
    write_cache("tiny-videomae", "toyclips:24,frames=4,seed=2", root / "cache", [hook],
                shard_size=12, progress=False)  # fmt: skip
    torch.manual_seed(0)
    sae = TopKSAE(d_in=32, n_latents=32, k=4)
    fit_simple(sae, ActivationDataset(root / "cache", hook, batch_size=128, shuffle_buffer=0),
               steps=20, lr=3e-3, progress=False)  # fmt: skip
    sae.metadata.update(hook=hook, model="tiny-videomae")
    sae.eval().save(root / "sae")
    index = build_index(root / "sae", root / "cache", root / "sae" / "index",
                        IndexOptions(top_n=4), progress=False)  # fmt: skip
    return index, root / "sae", root / "cache"


def test_index_views_and_browser_of_a_clip_cache(clip_index, tmp_path):
    """From a real index: the strip's rows are the latent's top clips drawn again from their
    provenance (lit where the index says the latent peaks), the GIF animates the top clip, and
    the browser shows clip thumbnails, animated top clips and the temporal score."""
    import json

    from prisma_mm.analysis.motion import TemporalScores
    from prisma_mm.data.toyworld import render_clip_source
    from prisma_mm.viz.browser import BrowserExtras, CacheSamples, build_browser, read_temporal
    from prisma_mm.viz.video import latent_frame_strips, latent_gif

    index, sae_dir, cache = clip_index
    assert index.layout.grid == (2, 4, 4) and index.layout.tubelet == 2
    latent = int(index.max_value.argmax())
    figure = latent_frame_strips(index, sae_dir, latent, k=2, temporal_score=0.5)
    assert len(figure.axes) == 3  # two strips and the colour bar
    top = int(index.top_sample[latent, 0])
    frame, row, col = index.layout.token_to_patch(int(index.top_token[latent, 0]))
    clip = render_clip_source(index.sample_sources[top])
    drawn = np.asarray(figure.axes[0].images[0].get_array())  # the strip's frames, side by side
    assert np.array_equal(drawn[:, :32], clip[0])
    overlay = np.asarray(figure.axes[0].images[1].get_array())
    x0 = frame * 2 * (32 + FRAME_GAP) + col * 8  # the peak's first input frame, its patch
    peak = overlay[row * 8 : row * 8 + 8, x0 : x0 + 8]
    assert (peak[..., 3] > 0).all()  # the peak token's patch is lit
    gif = Image.open(latent_gif(index, sae_dir, latent, tmp_path / "top.gif"))
    assert gif.n_frames == 4

    n = index.n_latents
    scores = TemporalScores(torch.ones(n), torch.full((n,), 0.25), torch.full((n,), 0.75))
    scores.moving[0] = 0.0  # a latent that never fired on moving clips: NaN, null in JSON
    extras = BrowserExtras(temporal=read_temporal(scores.save(tmp_path / "temporal.json"), n))
    assert np.isnan(extras.temporal.score[0]) and extras.temporal.score[1] == 0.5
    site = build_browser(index, tmp_path / "site", source=CacheSamples(index, sae_dir, cache),
                         extras=extras, top_images=2, interval_images=1, progress=False).parent  # fmt: skip
    page = (site / "data" / "latents" / "000" / f"{latent:06d}.js").read_text()
    data = json.loads(page[page.index("{") : page.rindex("}") + 1])
    assert data["temporal"] == {"score": 0.5, "frozen": 0.75, "order": 0.25}
    assert data["gifs"] and all((site / g).is_file() for g in data["gifs"])
    assert Image.open(site / data["gifs"][0]).n_frames == 4
    assert '"temporal"' in (site / "data" / "table" / "00000.js").read_text()
    with pytest.raises(PrismaError, match="one per latent"):
        read_temporal(scores.save(tmp_path / "short.json"), n + 1)
