"""Latent grids and image feature maps (PNG or SVG, matplotlib Agg).

- :func:`render_latent_grid`: a latent's samples, each image with its patch heatmap, the
  prefix tokens as chips beside it, the score and the label under it, and a colour bar in
  absolute activation units. One colour scale for the whole grid by default
  (``normalize="latent"``: images are comparable); ``"image"`` gives each its own scale.
- :func:`render_feature_map`: one image with several latents, each as its own heatmap, and
  one combined map where each patch takes the colour of its strongest latent (relative to
  that latent's peak in the image); the legend names each colour's latent and, in SVG,
  links to ``latents/<id>.html``.
- :func:`latent_grid` / :func:`image_feature_map` build both from a FeatureIndex.

Heatmap values come from :func:`prisma_mm.viz.index.token_scores`, the function that ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_hex
from matplotlib.patches import Patch

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.viz.heatmaps import (
    DEFAULT_CMAP,
    FRAME_GAP,
    NORMALIZATIONS,
    clear_axes,
    draw_token_map,
    frames_of,
    get_cmap,
    panel_right,
    save_figure,
    token_map,
)

LINK = "latents/{}.html"


@dataclass
class GridEntry:
    """One cell of a latent grid: the image (PIL / array, or a clip's frames), its token
    values ``[T]`` (cached tokens), the score that ranked it, its label and key."""

    image: Any
    values: Any
    value: float
    label: str | None = None
    key: str = ""
    note: str = ""  # drawn after the value (e.g. an interval sample's bin)


def _figure(n_rows: int, n_cols: int, cell: float, aspect: float, extra_w: float = 0.0):
    import matplotlib.pyplot as plt

    width = n_cols * cell * aspect + extra_w
    height = n_rows * (cell + 0.45) + 0.4
    figure = plt.figure(figsize=(width, height), layout="constrained")
    figure.get_layout_engine().set(h_pad=0.04, w_pad=0.04, hspace=0.02, wspace=0.02)
    return figure


def _caption(entry: GridEntry) -> str:
    label = "" if entry.label is None else f"\n{_short(str(entry.label), 22)}"
    note = f"  {entry.note}" if entry.note else ""
    return f"{entry.value:.3g}{note}{label}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_latent_grid(
    entries: Sequence[GridEntry],
    layout: TokenLayout,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    ncols: int = 4,
    normalize: str = "latent",
    upsample: str = "nearest",
    cmap: Any = DEFAULT_CMAP,
    alpha: float = 0.8,
    cell_inches: float = 2.0,
    dpi: int = 110,
) -> Any:
    """Draw a latent grid; saves to ``path`` (.png / .svg) and returns the path, or returns
    the open matplotlib Figure when ``path`` is None."""
    if normalize not in NORMALIZATIONS:
        raise PrismaError(f"normalize={normalize!r}: use 'latent' or 'image'")
    if ncols < 1:
        raise PrismaError(f"ncols must be >= 1, got {ncols}")
    colormap = get_cmap(cmap)
    if not entries:
        raise PrismaError("no samples to draw: the latent never fired in the indexed data")
    first = _row_shape(entries[0].image, layout)
    maps = [token_map(e.values, layout, size=first, upsample=upsample) for e in entries]
    n_cols = min(ncols, len(entries))
    n_rows = math.ceil(len(entries) / n_cols)
    aspect = first[1] * layout.grid[0] / first[0] + (0.3 if layout.n_prefix else 0.0)
    figure = _figure(n_rows, n_cols, cell_inches, aspect, extra_w=0.9)
    grid = figure.add_gridspec(n_rows, n_cols + 1, width_ratios=[*([1.0] * n_cols), 0.05])
    shared = max((m.vmax for m in maps), default=0.0) or 1.0
    for i, (entry, tmap) in enumerate(zip(entries, maps, strict=True)):
        ax = figure.add_subplot(grid[i // n_cols, i % n_cols])
        vmax = shared if normalize == "latent" else (tmap.vmax or 1.0)
        draw_token_map(ax, entry.image, tmap, layout, Normalize(0, vmax), colormap, alpha)
        caption = _caption(entry)
        if normalize == "image":
            caption += f"  (max {vmax:.3g})"
        frames, height, width = tmap.pixels.shape
        middle = (frames * width + FRAME_GAP * (frames - 1)) / 2  # under the image, not the chips
        ax.text(middle, height * 1.03, caption, ha="center", va="top", fontsize=8.5,
                clip_on=False)  # fmt: skip
    bar_ax = figure.add_subplot(grid[:, n_cols])
    if normalize == "latent":
        scale, text = Normalize(0, shared), "activation"
    else:
        scale, text = Normalize(0, 1), "activation / the image's max (under each image)"
    bar = figure.colorbar(ScalarMappable(scale, colormap), cax=bar_ax)
    bar.set_label(text, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path, dpi) if path is not None else figure


def _row_shape(image: Any, layout: TokenLayout) -> tuple[int, int]:
    """``(H, W)`` of one frame of an image."""
    frame = frames_of(image, layout)[0]
    return int(frame.shape[0]), int(frame.shape[1])


@dataclass
class FeatureMap:
    """What :func:`render_feature_map` drew: the file (or Figure), the latents in legend order,
    their colours (hex) and the links the SVG legend carries."""

    output: Any
    latents: list[int]
    colours: list[str]
    links: list[str] = field(default_factory=list)


def combined_map(codes: Any, layout: TokenLayout, size: tuple[int, int] | None = None,
                 upsample: str = "nearest") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(winner [frames, H, W] int, strength [frames, H, W] float in [0, 1])`` of
    ``codes [T, K]``: each pixel's strongest latent relative to that latent's own peak in this
    image (-1 where none fires), and that relative strength."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.float32))
    maps = [token_map(codes[:, j], layout, size, upsample) for j in range(codes.shape[1])]
    stacked = np.stack(
        [np.nan_to_num(m.pixels, nan=0.0) / (m.vmax or 1.0) for m in maps]
    )  # [K, frames, H, W]
    winner = stacked.argmax(axis=0)
    strength = stacked.max(axis=0)
    winner[strength <= 0] = -1
    return winner, np.clip(strength, 0.0, 1.0)


def render_feature_map(
    image: Any,
    codes: Any,
    latents: Sequence[int],
    layout: TokenLayout,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    upsample: str = "nearest",
    cmap: Any = DEFAULT_CMAP,
    link: str = LINK,
    alpha: float = 0.8,
    cell_inches: float = 2.0,
    dpi: int = 110,
) -> FeatureMap:
    """Draw one image with ``codes [T, K]`` of latents ``latents`` (K of them): the image,
    the combined map, then each latent's heatmap on its own scale with its peak value."""
    codes = np.asarray(codes, dtype=np.float32)
    if codes.ndim != 2 or codes.shape[1] != len(latents):
        raise PrismaError(f"codes are {list(codes.shape)}; expected [tokens, {len(latents)}]")
    import matplotlib

    colormap = get_cmap(cmap)
    palette = matplotlib.colormaps["tab10" if len(latents) <= 10 else "tab20"]
    colours = [to_hex(palette(i % palette.N)) for i in range(len(latents))]
    size = _row_shape(image, layout)
    winner, strength = combined_map(codes, layout, size, upsample)
    panels = 2 + len(latents)
    n_cols = min(panels, 4)
    n_rows = math.ceil(panels / n_cols)
    aspect = size[1] * layout.grid[0] / size[0] + (0.3 if layout.n_prefix else 0.0)
    figure = _figure(n_rows, n_cols, cell_inches, aspect, extra_w=0.8)
    grid = figure.add_gridspec(n_rows, n_cols)
    axes = [figure.add_subplot(grid[i // n_cols, i % n_cols]) for i in range(panels)]
    empty = token_map(np.zeros(layout.n_tokens), layout, size)
    draw_token_map(axes[0], image, empty, layout, Normalize(0, 1), colormap, chips=False)
    axes[0].set_title("image", fontsize=8.5)
    _draw_combined(axes[1], image, winner, strength, colours, layout)
    axes[1].set_title("strongest latent per patch", fontsize=8.5)
    for j, latent in enumerate(latents):
        tmap = token_map(codes[:, j], layout, size, upsample)
        vmax = tmap.vmax or 1.0
        draw_token_map(axes[2 + j], image, tmap, layout, Normalize(0, vmax), colormap, alpha)
        axes[2 + j].set_title(f"latent {latent}  (max {vmax:.3g})", fontsize=8.5,
                              color=colours[j])  # fmt: skip
        axes[2 + j].patch.set_edgecolor(colours[j])
    links = [link.format(int(latent)) for latent in latents]
    handles = [
        Patch(facecolor=colour, edgecolor="0.3", label=f"latent {latent}")
        for latent, colour in zip(latents, colours, strict=True)
    ]
    legend = figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
                           fontsize=8.5, frameon=False)  # fmt: skip
    for text, patch, url in zip(legend.get_texts(), legend.get_patches(), links, strict=True):
        text.set_url(url)  # SVG: each legend entry is a link to the latent's page
        patch.set_url(url)
    figure.colorbar(ScalarMappable(Normalize(0, 1), colormap), ax=axes, shrink=0.6,
                    pad=0.02, label="activation / latent's max in this image").ax.tick_params(
        labelsize=7
    )  # fmt: skip
    if title:
        figure.suptitle(title, fontsize=10)
    output = save_figure(figure, path, dpi) if path is not None else figure
    return FeatureMap(output, [int(v) for v in latents], colours, links)


def _draw_combined(ax: Any, image: Any, winner: np.ndarray, strength: np.ndarray,
                   colours: list[str], layout: TokenLayout) -> None:  # fmt: skip
    from matplotlib.colors import to_rgb

    from prisma_mm.viz.heatmaps import _row

    base = _row(frames_of(image, layout), 255)
    rgb = np.array([to_rgb(c) for c in colours] or [(0, 0, 0)])
    win = _row(list(winner), -1)
    power = _row(list(strength), 0.0)
    rgba = np.zeros((*win.shape, 4))
    rgba[..., :3] = rgb[np.clip(win, 0, None)]
    rgba[..., 3] = np.where(win >= 0, 0.25 + 0.65 * power, 0.0)
    height, width = base.shape[:2]
    ax.imshow(base, extent=(0, width, height, 0), interpolation="nearest")
    ax.imshow(rgba, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, panel_right(width, height, layout.n_prefix))  # lines up with the others
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    clear_axes(ax)


# ----- from a feature index ---------------------------------------------------------------------
def latent_grid(index: Any, dictionary: Any, latent: int, path: str | Path | None = None, *,
                images: Any = None, which: str = "top", n: int | None = None,
                cache_dir: str | Path | None = None, **options: Any) -> Any:  # fmt: skip
    """The grid of a latent's ``top`` (or ``interval``) samples from a FeatureIndex;
    ``images`` a :class:`~prisma_mm.viz.index.SampleImages` (default: from the index)."""
    from prisma_mm.viz.index import SampleImages, latent_token_maps

    images = images or SampleImages(index)
    maps = latent_token_maps(index, dictionary, cache_dir, latent, which)[:n]
    position = {key: i for i, key in enumerate(index.keys)}
    edges = index.interval_edges[latent].tolist()

    def note(value: float) -> str:
        if which != "interval":
            return ""
        b = max(i for i in range(len(edges) - 1) if i == 0 or value >= edges[i])
        low = "0" if b == 0 else f"{edges[b]:.3g}"
        return f"bin [{low}, {edges[b + 1]:.3g})"

    entries = [
        GridEntry(images(position[key]), values, value, label, key, note(value))
        for key, label, value, values in maps
    ]
    if which == "interval":
        options.setdefault("ncols", int(index.interval_value.shape[2]))
    freq = float(index.freq_token[latent])
    title = options.pop("title", None) or (
        f"latent {latent}  ·  {which} by {index.meta['score']} over patches  ·  "
        f"fires on {100 * freq:.2g}% of tokens"
    )
    return render_latent_grid(entries, index.layout, path, title=title, **options)


def image_feature_map(index: Any, dictionary: Any, sample: int, path: str | Path | None = None,
                      *, images: Any = None, n_latents: int = 6,
                      cache_dir: str | Path | None = None, **options: Any) -> FeatureMap:  # fmt: skip
    """The feature map of sample ``sample`` (position in ``index.keys``) with its
    ``n_latents`` highest-scoring latents (by the index's score)."""
    from prisma_mm.viz.index import SampleImages, sample_codes, token_scores

    images = images or SampleImages(index)
    every = list(range(index.n_latents))
    codes = sample_codes(index, dictionary, [sample], every, cache_dir)[sample]  # [T, L]
    score, _, _ = token_scores(codes.unsqueeze(0), index.meta["score"], index.layout)
    order = torch.argsort(score[0], descending=True, stable=True)[:n_latents]
    chosen = [int(i) for i in order if score[0, i] > 0]
    if not chosen:
        raise PrismaError(f"no latent fires on sample {index.keys[sample]}")
    label = index.sample_labels[sample]
    title = options.pop("title", None) or (
        f"sample {index.keys[sample][:12]}" + (f"  ·  {label}" if label is not None else "")
    )
    return render_feature_map(images(sample), codes[:, chosen].numpy(), chosen, index.layout,
                              path, title=title, **options)  # fmt: skip


# ----- plain image grids (steered generations) ---------------------------------------------------
@dataclass
class ImageGrid:
    """What :func:`image_grid` drew: the picture and each cell's pixel box
    ``boxes[row][col] = (left, top, right, bottom)``, so a cell crops back to its image."""

    image: Any
    boxes: list[list[tuple[int, int, int, int]]]


def image_grid(rows: Sequence[Sequence[Any]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, *, gap: int = 4, font_size: int = 11,
               label_width: int = 96, header: int = 18) -> ImageGrid:  # fmt: skip
    """Images (PIL or uint8 ``[H, W, 3]`` arrays, all one size) in a grid, pixels unscaled, with
    a label left of each row and above each column (text drawn with PIL's own font; a column
    label's lines, split at newlines, each get ``header`` pixels, cut to the cell's width)."""
    from PIL import Image, ImageDraw, ImageFont

    cells = [[Image.fromarray(np.asarray(c)) if not hasattr(c, "convert") else c.convert("RGB")
              for c in row] for row in rows]  # fmt: skip
    if not cells or not cells[0] or any(len(r) != len(cells[0]) for r in cells):
        raise PrismaError("image_grid takes a non-empty rectangle of images (equal row lengths)")
    width, height = cells[0][0].size
    if any(c.size != (width, height) for r in cells for c in r):
        raise PrismaError("image_grid: every image must have the same size")
    for labels, n, what in ((row_labels, len(cells), "row"), (col_labels, len(cells[0]), "column")):
        if labels is not None and len(labels) != n:
            raise PrismaError(f"{len(labels)} {what} labels for {n} {what}s")
    left = gap + (label_width if row_labels is not None else 0)
    lines = max((len(str(label).split("\n")) for label in col_labels or []), default=0)
    top = gap + header * lines
    n_rows, n_cols = len(cells), len(cells[0])
    canvas = Image.new("RGB", (left + n_cols * (width + gap), top + n_rows * (height + gap)),
                       (255, 255, 255))  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(font_size)
    boxes = []
    for r, row in enumerate(cells):
        y = top + r * (height + gap)
        boxes.append([])
        for c, cell in enumerate(row):
            x = left + c * (width + gap)
            canvas.paste(cell, (x, y))
            boxes[-1].append((x, y, x + width, y + height))
        if row_labels is not None:
            text = _fit(draw, str(row_labels[r]), font, label_width - gap)
            draw.text((gap, y + height // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    for c, label in enumerate(col_labels or []):
        x = left + c * (width + gap)
        for i, line in enumerate(str(label).split("\n")):
            text = _fit(draw, line, font, width)
            draw.text((x + width // 2, gap + header * i + header // 2), text, fill=(0, 0, 0),
                      font=font, anchor="mm")  # fmt: skip
    return ImageGrid(canvas, boxes)


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


__all__ = [
    "FeatureMap",
    "GridEntry",
    "ImageGrid",
    "combined_map",
    "image_feature_map",
    "image_grid",
    "latent_grid",
    "render_feature_map",
    "render_latent_grid",
]
