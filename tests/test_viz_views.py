"""Heatmaps, latent grids and image feature maps: patch placement through the layout, prefix
chips, normalisation, the combined map and its links, video frames, and an end-to-end grid
from a feature index of a tiny-vit cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import Normalize
from PIL import Image

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.viz.grids import (
    GridEntry,
    combined_map,
    image_feature_map,
    latent_grid,
    render_feature_map,
    render_latent_grid,
)
from prisma_mm.viz.heatmaps import get_cmap, overlay_rgba, token_map

LAYOUT = TokenLayout(n_prefix=1, grid=(1, 4, 4), patch_size=(8, 8), input_size=(32, 32))


def one_hot(layout: TokenLayout, token: int, value: float = 5.0) -> np.ndarray:
    values = np.zeros(layout.n_tokens, np.float32)
    values[token] = value
    return values


def test_one_patch_lights_exactly_its_pixels():
    token = LAYOUT.n_prefix + 2 * 4 + 3  # patch (row 2, col 3)
    tmap = token_map(one_hot(LAYOUT, token), LAYOUT)
    assert tmap.pixels.shape == (1, 32, 32)
    lit = np.argwhere(tmap.pixels[0] > 0)
    assert lit[:, 0].min() == 16 and lit[:, 0].max() == 23
    assert lit[:, 1].min() == 24 and lit[:, 1].max() == 31
    assert len(lit) == 64 and np.all(tmap.pixels[0][16:24, 24:32] == 5.0)
    assert tmap.prefix.tolist() == [0.0]
    # drawn at twice the input size the patch covers twice the pixels, still exactly
    big = token_map(one_hot(LAYOUT, token), LAYOUT, size=(64, 64))
    assert np.array_equal(np.argwhere(big.pixels[0] > 0).min(0), [32, 48])
    assert (big.pixels[0] > 0).sum() == 256
    # the overlay is transparent everywhere but on that patch
    rgba = overlay_rgba(tmap.pixels[0], Normalize(0, 5), get_cmap("inferno"), 0.7)
    assert np.array_equal(rgba[..., 3] > 0, tmap.pixels[0] > 0)


def test_cls_firing_lights_the_chip_only():
    tmap = token_map(one_hot(LAYOUT, 0, 3.0), LAYOUT)
    assert np.all(tmap.pixels == 0) and tmap.prefix.tolist() == [3.0]
    registers = TokenLayout(3, (1, 2, 2), (8, 8), (16, 16))
    tmap = token_map(one_hot(registers, 2, 1.5), registers)
    assert tmap.prefix.tolist() == [0.0, 0.0, 1.5] and np.all(tmap.pixels == 0)
    # the drawn chip takes the value's colour; the image pixels stay unpainted
    figure = render_latent_grid(
        [GridEntry(np.zeros((32, 32, 3), np.uint8), one_hot(LAYOUT, 0, 3.0), 3.0, "a")],
        LAYOUT,
    )
    cell = figure.axes[0]
    overlay = cell.get_images()[1].get_array()
    assert np.all(np.asarray(overlay)[..., 3] == 0)
    chip = cell.patches[0]
    assert np.allclose(chip.get_facecolor(), get_cmap("inferno")(1.0))


def test_uncovered_pixels_are_nan_and_bilinear_peaks_on_the_patch():
    layout = TokenLayout(0, (1, 3, 3), (10, 10), (32, 32))  # 30 of 32 pixels covered
    tmap = token_map(one_hot(layout, 4), layout)
    assert np.isnan(tmap.pixels[0, 30:, :]).all() and np.isnan(tmap.pixels[0, :, 30:]).all()
    assert np.isfinite(tmap.pixels[0, :30, :30]).all()
    smooth = token_map(one_hot(layout, 4), layout, upsample="bilinear").pixels[0, :30, :30]
    peak = np.unravel_index(smooth.argmax(), smooth.shape)
    assert 10 <= peak[0] < 20 and 10 <= peak[1] < 20
    assert (smooth > 0).sum() > 100  # spread beyond the patch's own pixels
    with pytest.raises(PrismaError, match="upsample"):
        token_map(one_hot(layout, 4), layout, upsample="cubic")
    with pytest.raises(PrismaError, match="token values"):
        token_map(np.zeros(5), layout)


def test_video_layout_lights_one_frame():
    clip = TokenLayout(1, (2, 2, 2), (8, 8), (16, 16))
    token = 1 + 4 + 2 + 1  # frame 1, row 1, col 1
    tmap = token_map(one_hot(clip, token), clip)
    assert tmap.pixels.shape == (2, 16, 16)
    assert np.all(tmap.pixels[0] == 0) and (tmap.pixels[1] > 0).sum() == 64
    assert np.all(tmap.pixels[1][8:, 8:] == 5.0)
    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(2)]
    figure = render_latent_grid([GridEntry(frames, one_hot(clip, token), 5.0, "clip")], clip)
    base = np.asarray(figure.axes[0].get_images()[0].get_array())
    assert base.shape[:2] == (16, 2 * 16 + 4)  # one row of frames with a gap


def entries(values: list[float]) -> list[GridEntry]:
    image = np.full((32, 32, 3), 128, np.uint8)
    return [
        GridEntry(image, one_hot(LAYOUT, 1 + i, v), v, f"label {i}") for i, v in enumerate(values)
    ]


def test_latent_normalisation_shares_one_scale_and_image_gives_each_its_own():
    cmap = get_cmap("viridis")
    shared = render_latent_grid(entries([2.0, 4.0]), LAYOUT, cmap="viridis")
    own = render_latent_grid(entries([2.0, 4.0]), LAYOUT, cmap="viridis", normalize="image")
    for figure, expected in ((shared, [0.5, 1.0]), (own, [1.0, 1.0])):
        for i, scaled in enumerate(expected):
            rgba = np.asarray(figure.axes[i].get_images()[1].get_array())
            lit = rgba[..., 3] > 0
            assert np.allclose(rgba[lit][:, :3], cmap(scaled)[:3])
    bar = shared.axes[-1]
    assert bar.get_ylim()[1] == pytest.approx(4.0)  # absolute units: the grid's maximum
    assert [t.get_text() for t in shared.axes[0].texts] == ["CLS", "2\nlabel 0"]
    with pytest.raises(PrismaError, match="normalize"):
        render_latent_grid(entries([1.0]), LAYOUT, normalize="global")
    with pytest.raises(PrismaError, match="colormap"):
        render_latent_grid(entries([1.0]), LAYOUT, cmap="no-such-map")


def test_grid_keeps_the_aspect_ratio(tmp_path):
    wide = TokenLayout(0, (1, 2, 4), (8, 8), (16, 32))
    image = np.zeros((16, 32, 3), np.uint8)
    figure = render_latent_grid([GridEntry(image, one_hot(wide, 3), 1.0)], wide)
    ax = figure.axes[0]
    assert ax.get_aspect() == 1.0 and ax.get_xlim() == (0.0, 32.0)
    assert ax.get_ylim() == (16.0, 0.0)
    path = render_latent_grid([GridEntry(image, one_hot(wide, 3), 1.0)], wide, tmp_path / "g.png")
    assert Image.open(path).size[0] > Image.open(path).size[1]
    with pytest.raises(PrismaError, match="png or .svg"):
        render_latent_grid([GridEntry(image, one_hot(wide, 3), 1.0)], wide, tmp_path / "g.jpg")


def test_combined_map_and_svg_legend_links(tmp_path):
    codes = np.zeros((LAYOUT.n_tokens, 2), np.float32)
    codes[1, 0] = 2.0  # latent 7 on patch (0, 0)
    codes[1 + 15, 1] = 9.0  # latent 11 on patch (3, 3)
    codes[1 + 15, 0] = 1.0  # weaker there, relative to its own peak (2.0)
    winner, strength = combined_map(codes, LAYOUT)
    assert np.all(winner[0, :8, :8] == 0) and np.all(winner[0, 24:, 24:] == 1)
    assert np.all(winner[0, 8:24, :] == -1) and strength[0, 0, 0] == 1.0
    image = np.full((32, 32, 3), 200, np.uint8)
    result = render_feature_map(image, codes, [7, 11], LAYOUT, tmp_path / "f.svg")
    assert result.latents == [7, 11] and len(set(result.colours)) == 2
    svg = (tmp_path / "f.svg").read_text()
    assert 'xlink:href="latents/7.html"' in svg and 'xlink:href="latents/11.html"' in svg
    png = render_feature_map(image, codes, [7, 11], LAYOUT, tmp_path / "f.png").output
    assert png.stat().st_size > 1000
    with pytest.raises(PrismaError, match="expected"):
        render_feature_map(image, codes, [7], LAYOUT)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    import prisma_mm
    from prisma_mm.cache import write_cache
    from prisma_mm.sae import TopKSAE
    from prisma_mm.viz.index import IndexOptions, build_index

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("viz_views")
    rng = np.random.default_rng(1)
    for label in ("<b>a</b>", "b"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    hook = "blocks.0.hook_resid_post"
    write_cache(model, str(root / "images"), root / "cache", [hook], progress=False)
    sae = TopKSAE(d_in=32, n_latents=8, k=2, seed=2)
    index = build_index(sae, root / "cache", root / "index", IndexOptions(top_n=4), progress=False)
    yield {"root": root, "sae": sae, "index": index}
    torch.set_num_threads(threads)


def test_grid_and_feature_map_from_an_index(indexed, tmp_path):
    from prisma_mm.viz.index import SampleImages

    index, sae = indexed["index"], indexed["sae"]
    images = SampleImages(index)
    first = images(int(index.top_sample[0, 0]))
    assert first.size == (32, 32)  # the card's resize and crop: the model's 32 px input
    latent = int(torch.argmax(index.freq_token))
    path = latent_grid(index, sae, latent, tmp_path / "grid.png", images=images)
    assert Image.open(path).size[0] > 200
    svg = latent_grid(index, sae, latent, tmp_path / "grid.svg", which="interval").read_text()
    labels = {index.sample_labels[s] for group in index.intervals(latent) for s, _, _ in group}
    assert "<b>" not in svg  # text from data is escaped in the SVG
    assert ("&lt;b&gt;a&lt;/b&gt;" in svg) == ("<b>a</b>" in labels)
    result = image_feature_map(index, sae, int(index.top_sample[latent, 0]), tmp_path / "f.svg")
    assert latent in result.latents and all(0 <= i < 8 for i in result.latents)
    assert f"latents/{result.latents[0]}.html" in (tmp_path / "f.svg").read_text()


def test_sample_images_resolve_tar_members(tmp_path):
    """Toy-world shards cached through tiny-vit: each sample's image is re-read from its
    `shard.tar#key` source and shown as the model saw it (resized to its 32 px input)."""
    import prisma_mm
    from prisma_mm.cache import write_cache
    from prisma_mm.data.toyworld import ToyWorld, write_shards
    from prisma_mm.sae import TopKSAE
    from prisma_mm.viz.index import IndexOptions, SampleImages, build_index

    write_shards(tmp_path / "world", 6, shard_size=3, progress=False)
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    shards = str(tmp_path / "world" / "toyworld-{000000..000001}.tar")
    write_cache(model, shards, tmp_path / "cache", ["blocks.0.hook_resid_post"], progress=False)
    sae = TopKSAE(d_in=32, n_latents=8, k=2, seed=0)
    index = build_index(sae, tmp_path / "cache", tmp_path / "index", IndexOptions(),
                        progress=False)  # fmt: skip
    images = SampleImages(index)
    world = ToyWorld(6, pil=True)
    for sample, source in enumerate(index.sample_sources):
        member = int(source.rsplit("#", 1)[1])
        raw = np.asarray(images.raw(sample))
        assert np.array_equal(raw, np.asarray(world[member][0]))  # the image of that key
        assert images(sample).size == (32, 32)
