"""Views of a latent over space and time: frame strips and animated heatmaps.

- :func:`render_frame_strips`: a latent's top clips, one row each, every input frame with
  the heatmap of the token frame that covers it (a token of a tubelet of 2 frames lights
  both), one colour scale for all rows (the latent's own maximum, stated on the colour bar),
  the score and label under each row and the temporal score in the title;
- :func:`heatmap_gif`: one clip's heatmap over its frames as an animated GIF (pillow);
- :func:`latent_frame_strips` / :func:`latent_gif` build both from a FeatureIndex.

Token values come from :func:`prisma_mm.viz.index.token_scores` (through
:func:`~prisma_mm.viz.index.latent_token_maps`), the function that ranks, and map to
``(frame, row, col)`` through the layout, whatever the family's token order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import Normalize
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.viz.grids import GridEntry, render_latent_grid
from prisma_mm.viz.heatmaps import DEFAULT_CMAP, get_cmap, overlay_rgba, token_map

GIF_MS_PER_FRAME = 250


def input_frames(layout: TokenLayout) -> int:
    """Input frames a clip of ``layout`` has: token frames times the tubelet."""
    return layout.grid[0] * layout.tubelet


def frame_layout(layout: TokenLayout) -> TokenLayout:
    """The layout of one token per input frame (tubelet 1, frame-major): what a strip draws."""
    frames, height, width = layout.grid
    return TokenLayout(
        layout.n_prefix, (frames * layout.tubelet, height, width), layout.patch_size,
        layout.input_size,
    )  # fmt: skip


def per_frame_values(values: Any, layout: TokenLayout) -> Tensor:
    """Token values ``[tokens]`` of ``layout`` as values of :func:`frame_layout` ``[prefix +
    input frames * h * w]``: each token frame's values repeated for the input frames of its
    tubelet, prefix tokens kept."""
    values = torch.as_tensor(np.asarray(values, dtype=np.float32)).flatten()
    if values.numel() != layout.n_tokens:
        raise PrismaError(
            f"{values.numel()} token values for a layout of {layout.n_tokens} tokens "
            f"({layout.n_prefix} prefix + {layout.n_patches} patches)"
        )
    grid = layout.patch_map(values).repeat_interleave(layout.tubelet, dim=0)  # [T, h, w]
    return torch.cat([values[: layout.n_prefix], grid.flatten()])


def clip_frames(clip: Any) -> list[np.ndarray]:
    """RGB uint8 frames ``[H, W, 3]`` of a clip: an array ``[T, H, W, 3]`` or a list of PIL
    images / arrays."""
    items = list(clip) if not isinstance(clip, np.ndarray) or clip.ndim == 4 else [clip]
    return [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in items]


def render_frame_strips(
    entries: Sequence[GridEntry],
    layout: TokenLayout,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    temporal_score: float | None = None,
    normalize: str = "latent",
    cmap: Any = DEFAULT_CMAP,
    alpha: float = 0.8,
    cell_inches: float = 1.3,
    dpi: int = 110,
) -> Any:
    """Draw clips as frame strips with a heatmap per frame, one clip a row.

    ``entries[i].image`` is a clip (``[T, H, W, 3]`` or a list of T frames, T = the layout's
    token frames x tubelet) and ``entries[i].values`` its token values ``[layout.n_tokens]``.
    Saves to ``path`` (.png / .svg) and returns it, or returns the open Figure.
    """
    strips = []
    frames = input_frames(layout)
    for entry in entries:
        clip = clip_frames(entry.image)
        if len(clip) != frames:
            raise PrismaError(
                f"clip {entry.key or ''!s} has {len(clip)} frames; the layout covers {frames} "
                f"({layout.grid[0]} token frames x tubelet {layout.tubelet})"
            )
        strips.append(replace(entry, image=clip, values=per_frame_values(entry.values, layout)))
    heading = title or ""
    if temporal_score is not None:
        score = "n/a" if np.isnan(temporal_score) else f"{temporal_score:.2f}"
        heading = f"{heading}  ·  temporal score {score}".strip(" ·")
    return render_latent_grid(
        strips, frame_layout(layout), path, title=heading or None, ncols=1,
        normalize=normalize, cmap=cmap, alpha=alpha, cell_inches=cell_inches, dpi=dpi,
    )  # fmt: skip


def heatmap_frames(clip: Any, values: Any, layout: TokenLayout, vmax: float | None = None,
                   scale: int = 4, cmap: Any = DEFAULT_CMAP, alpha: float = 0.8) -> list[Any]:  # fmt: skip
    """The PIL frames of a clip with its heatmap blended in, ``scale`` times larger (nearest).

    ``vmax``: the value drawn at full colour (default: the clip's maximum; pass the latent's
    maximum to compare clips). Frame ``t`` shows the token frame ``t // tubelet``.
    """
    from PIL import Image

    frames = clip_frames(clip)
    if len(frames) != input_frames(layout):
        raise PrismaError(
            f"clip has {len(frames)} frames; the layout covers {input_frames(layout)}"
        )
    height, width = frames[0].shape[:2]
    display = frame_layout(layout)
    tmap = token_map(per_frame_values(values, layout), display, size=(height, width))
    top = vmax if vmax is not None and vmax > 0 else (tmap.vmax or 1.0)
    colormap = get_cmap(cmap)
    out = []
    for frame, pixels in zip(frames, tmap.pixels, strict=True):
        rgba = overlay_rgba(pixels, Normalize(0, top), colormap, alpha)
        weight = rgba[..., 3:4]
        blend = frame.astype(np.float32) / 255 * (1 - weight) + rgba[..., :3] * weight
        image = Image.fromarray((blend * 255).round().astype(np.uint8))
        out.append(image.resize((width * scale, height * scale), Image.NEAREST))
    return out


def heatmap_gif(clip: Any, values: Any, layout: TokenLayout, path: str | Path, *,
                vmax: float | None = None, scale: int = 4, cmap: Any = DEFAULT_CMAP,
                alpha: float = 0.8, ms_per_frame: int = GIF_MS_PER_FRAME) -> Path:  # fmt: skip
    """Write one clip's heatmap over its frames as a looping animated GIF (see
    :func:`heatmap_frames`); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise PrismaError(f"{path}: an animated heatmap is written as a .gif file")
    images = heatmap_frames(clip, values, layout, vmax, scale, cmap, alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame,
                   loop=0, disposal=2, optimize=False)  # fmt: skip
    return path


def _top_clips(index: Any, dictionary: Any, latent: int, k: int, cache_dir: Any,
               dataset: Any) -> list[GridEntry]:  # fmt: skip
    from prisma_mm.viz.index import SampleImages, latent_token_maps

    images = SampleImages(index, dataset)
    position = {key: i for i, key in enumerate(index.keys)}
    entries = []
    for key, label, value, values in latent_token_maps(index, dictionary, cache_dir, latent)[:k]:
        entries.append(GridEntry(images(position[key]), values, value, label, key))
    if not entries:
        raise PrismaError(f"latent {latent} never fired in the indexed clips: nothing to draw")
    return entries


def latent_frame_strips(index: Any, dictionary: Any, latent: int, path: str | Path | None = None,
                        *, k: int = 6, cache_dir: Any = None, dataset: Any = None,
                        temporal_score: float | None = None, **kwargs: Any) -> Any:  # fmt: skip
    """:func:`render_frame_strips` of a latent's top ``k`` clips in a FeatureIndex (clips
    re-read through their recorded sources, token values re-encoded from the cache)."""
    entries = _top_clips(index, dictionary, latent, k, cache_dir, dataset)
    return render_frame_strips(entries, index.layout, path, title=f"latent {latent}",
                               temporal_score=temporal_score, **kwargs)  # fmt: skip


def latent_gif(index: Any, dictionary: Any, latent: int, path: str | Path, *, rank: int = 0,
               cache_dir: Any = None, dataset: Any = None, **kwargs: Any) -> Path:  # fmt: skip
    """:func:`heatmap_gif` of a latent's ``rank``-th top clip, coloured up to the latent's
    maximum over the index (so GIFs of one latent compare)."""
    entries = _top_clips(index, dictionary, latent, rank + 1, cache_dir, dataset)
    if rank >= len(entries):
        raise PrismaError(f"latent {latent} has {len(entries)} top clips; rank {rank} is beyond")
    entry = entries[rank]
    vmax = float(index.max_value[latent])
    return heatmap_gif(entry.image, entry.values, index.layout, path, vmax=vmax, **kwargs)


__all__ = [
    "clip_frames",
    "frame_layout",
    "heatmap_frames",
    "heatmap_gif",
    "input_frames",
    "latent_frame_strips",
    "latent_gif",
    "per_frame_values",
    "render_frame_strips",
]
