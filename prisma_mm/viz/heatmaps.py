"""Per-token values as pictures: patch heatmaps through a TokenLayout, prefix-token chips,
and the matplotlib drawing both the latent grids and the image feature maps share.

:func:`token_map` turns ``values [T]`` into a pixel map ``[frames, H, W]`` (nearest
upsampling by default, so each patch's pixels carry exactly its value; bilinear as an option)
plus the prefix tokens' values, which are drawn as separate chips beside the image. Pixels
that no patch covers are NaN. Everything draws with matplotlib's Agg backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import Colormap, Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from prisma_mm.errors import PrismaError  # noqa: E402
from prisma_mm.hooks import TokenLayout  # noqa: E402

UPSAMPLING = ("nearest", "bilinear")
NORMALIZATIONS = ("latent", "image")
FORMATS = (".png", ".svg")
DEFAULT_CMAP = "inferno"
FRAME_GAP = 4  # pixels between the frames of a clip drawn in one row


@dataclass
class TokenMap:
    """``pixels [frames, H, W]`` (float32; NaN where no patch covers the input) and
    ``prefix [n_prefix]``: the values of the prefix tokens (CLS, registers)."""

    pixels: np.ndarray
    prefix: np.ndarray

    @property
    def vmax(self) -> float:
        """The largest value anywhere in the map (0 when nothing is positive)."""
        values = np.concatenate([self.pixels[np.isfinite(self.pixels)], self.prefix])
        return float(max(values.max(initial=0.0), 0.0))


def prefix_names(layout: TokenLayout) -> list[str]:
    """Chip labels of the prefix tokens: ``CLS`` then ``reg1``, ``reg2``, ..."""
    return ["CLS", *[f"reg{i}" for i in range(1, layout.n_prefix)]][: layout.n_prefix]


def token_map(values: Any, layout: TokenLayout, size: tuple[int, int] | None = None,
              upsample: str = "nearest") -> TokenMap:  # fmt: skip
    """The heatmap of per-token ``values [T]`` (T = ``layout.n_tokens``) at ``size``
    ``(H, W)`` pixels (default ``layout.input_size``).

    Patch ``(f, r, c)`` covers input pixels ``[r * ph, (r + 1) * ph) x [c * pw, (c + 1) * pw)``
    of frame ``f`` (scaled to ``size``); with ``nearest`` those pixels hold exactly its value.
    """
    if upsample not in UPSAMPLING:
        raise PrismaError(f"upsample={upsample!r}: use one of {', '.join(UPSAMPLING)}")
    values = torch.as_tensor(np.asarray(values, dtype=np.float32)).flatten()
    if values.numel() != layout.n_tokens:
        raise PrismaError(
            f"{values.numel()} token values for a layout of {layout.n_tokens} tokens "
            f"({layout.n_prefix} prefix + {layout.n_patches} patches)"
        )
    prefix = values[: layout.n_prefix].numpy().copy()
    frames, rows, cols = layout.grid
    height, width = size or layout.input_size
    pixels = np.full((frames, height, width), np.nan, np.float32)
    if layout.n_patches == 0:
        return TokenMap(pixels, prefix)
    grid = layout.patch_map(values).float()  # [frames, rows, cols]
    in_h, in_w = layout.input_size
    patch_h, patch_w = layout.patch_size
    cover_h = min(height, round(rows * patch_h * height / in_h))
    cover_w = min(width, round(cols * patch_w * width / in_w))
    if upsample == "nearest":
        row_of = np.minimum(np.arange(cover_h) * in_h // (height * patch_h), rows - 1)
        col_of = np.minimum(np.arange(cover_w) * in_w // (width * patch_w), cols - 1)
        pixels[:, :cover_h, :cover_w] = grid.numpy()[:, row_of][:, :, col_of]
    else:
        scaled = torch.nn.functional.interpolate(
            grid.unsqueeze(1), size=(cover_h, cover_w), mode="bilinear", align_corners=False
        )
        pixels[:, :cover_h, :cover_w] = scaled[:, 0].numpy()
    return TokenMap(pixels, prefix)


def frames_of(image: Any, layout: TokenLayout) -> list[np.ndarray]:
    """RGB uint8 arrays ``[H, W, 3]`` of an image (PIL, array) or a clip (a list of them),
    one per frame of the layout."""
    items = list(image) if isinstance(image, list | tuple) else [image]
    arrays = [
        np.asarray(item.convert("RGB") if hasattr(item, "convert") else item) for item in items
    ]
    frames = layout.grid[0]
    if len(arrays) == 1 and frames > 1:
        arrays = arrays * frames
    if len(arrays) != frames:
        raise PrismaError(f"{len(arrays)} frames given for a layout of {frames} frames")
    return arrays


def _row(arrays: list[np.ndarray], fill: float) -> np.ndarray:
    """Frames side by side with a gap, as one array."""
    if len(arrays) == 1:
        return arrays[0]
    shape = (arrays[0].shape[0], FRAME_GAP, *arrays[0].shape[2:])
    gap = np.full(shape, fill, arrays[0].dtype)
    parts = [part for a in arrays for part in (a, gap)][:-1]
    return np.concatenate(parts, axis=1)


def overlay_rgba(pixels: np.ndarray, norm: Normalize, cmap: Colormap, alpha: float) -> np.ndarray:
    """RGBA ``[H, W, 4]`` of a value map: the colormap's colour, opacity rising with the value
    (transparent at zero and where NaN), so the image shows through where the latent is off."""
    scaled = np.clip(np.nan_to_num(norm(pixels), nan=0.0), 0.0, 1.0)
    rgba = cmap(scaled)
    rgba[..., 3] = np.where(np.isfinite(pixels) & (pixels > 0), alpha * (0.35 + 0.65 * scaled), 0)
    return rgba


def draw_token_map(ax: Any, image: Any, tmap: TokenMap, layout: TokenLayout, norm: Normalize,
                   cmap: Colormap, alpha: float = 0.7, chips: bool = True) -> None:  # fmt: skip
    """Draw an image (or a clip's frames in one row) with its heatmap on ``ax``, aspect
    ratio kept, and the prefix tokens as chips to the right of it (``chips=False`` leaves
    their space empty, so panels with and without chips line up)."""
    base = _row(frames_of(image, layout), 255)
    height, width = base.shape[:2]
    heat = _row(list(tmap.pixels), np.nan)
    if heat.shape != (height, width):
        raise PrismaError(
            f"image is {width}x{height} pixels but the heatmap is {heat.shape[1]}x{heat.shape[0]}"
        )
    extent = (0, width, height, 0)
    ax.imshow(base, extent=extent, interpolation="nearest")
    ax.imshow(overlay_rgba(heat, norm, cmap, alpha), extent=extent, interpolation="nearest")
    right = panel_right(width, height, len(tmap.prefix))
    side = height / max(4, len(tmap.prefix))
    gap = side * 0.25
    if chips and len(tmap.prefix):
        for i, (name, value) in enumerate(zip(prefix_names(layout), tmap.prefix, strict=True)):
            top = i * (side + gap) if len(tmap.prefix) > 1 else 0
            colour = cmap(float(np.clip(norm(value), 0, 1))) if value > 0 else (0.92,) * 3
            ax.add_patch(Rectangle((width + gap, top), side, side, facecolor=colour,
                                   edgecolor="0.35", linewidth=0.6))  # fmt: skip
            shade = "white" if value > 0 and norm(value) < 0.6 else "black"
            ax.text(width + gap + side / 2, top + side / 2, name, ha="center", va="center",
                    fontsize=6.5, color=shade)  # fmt: skip
    ax.set_xlim(0, right)
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    clear_axes(ax)


def panel_right(width: int, height: int, n_prefix: int) -> float:
    """Right edge of a panel: the image plus, with prefix tokens, a column of chips."""
    if not n_prefix:
        return float(width)
    side = height / max(4, n_prefix)
    return width + side * 0.25 + side * 1.04  # a hair wider: the chip's edge is not clipped


def clear_axes(ax: Any) -> None:
    """No ticks or frame; unlike ``set_axis_off`` the x label (the caption) stays visible."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_figure(figure: Any, path: str | Path | None, dpi: int = 110) -> Path | None:
    """Save to ``path`` (PNG or SVG by its suffix) and close the figure; None keeps it open."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise PrismaError(f"{path}: write a .png or .svg file")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white",
                   metadata={"Date": None} if path.suffix.lower() == ".svg" else None)  # fmt: skip
    plt.close(figure)
    return path


def get_cmap(cmap: str | Colormap) -> Colormap:
    """A matplotlib colormap by name (perceptual defaults: inferno, viridis, magma...)."""
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError as error:
        raise PrismaError(f"unknown colormap {cmap!r}: try inferno, viridis or magma") from error


__all__ = [
    "DEFAULT_CMAP",
    "TokenMap",
    "clear_axes",
    "draw_token_map",
    "frames_of",
    "get_cmap",
    "overlay_rgba",
    "panel_right",
    "prefix_names",
    "save_figure",
    "token_map",
]
