"""Views of circuit results: attention patterns over the image, patching results as
layer x position heatmaps over the image, head matrices, and a latent circuit as a small
graph whose nodes link into the feature browser (see docs/circuits.md)."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import Normalize, TwoSlopeNorm
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import HookedModel, TokenLayout
from prisma_mm.viz.heatmaps import (
    clear_axes,
    draw_token_map,
    frames_of,
    get_cmap,
    save_figure,
    token_map,
)

__all__ = [
    "attention_patterns",
    "circuit_graph",
    "head_matrix",
    "patching_heatmap",
]


def _as_rgb(image: Any, layout: TokenLayout) -> np.ndarray:
    return frames_of(image, layout)[0]


def attention_patterns(
    model: HookedModel,
    x: Tensor,
    image: Any,
    layer: int,
    path: str | Path | None = None,
    *,
    query: int = 0,
) -> tuple[Tensor, Path | None]:
    """Where each head of block ``layer`` looks from token ``query`` (0: CLS) in the one input
    ``x [1, 3, H, W]``: one panel per head, the pattern over the patches drawn on ``image``
    (the RGB picture of ``x``). Returns the pattern rows ``[heads, tokens]`` and the file."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise PrismaError(f"attention_patterns takes one input [1, 3, H, W], got {tuple(x.shape)}")
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(x, name)
    pattern = cache[name][0, :, query]  # [heads, keys]
    layout = model.layout
    heads = pattern.shape[0]
    figure, axes = plt.subplots(1, heads, figsize=(2.1 * heads, 2.4), squeeze=False)
    cmap = get_cmap("inferno")
    for h, ax in enumerate(axes[0]):
        tmap = token_map(pattern[h], layout, size=_as_rgb(image, layout).shape[:2])
        draw_token_map(ax, image, tmap, layout, Normalize(0, max(tmap.vmax, 1e-8)), cmap)
        ax.set_xlabel(f"head {h}: {float(pattern[h, : layout.n_prefix].sum()):.2f} on prefix",
                      fontsize=7)  # fmt: skip
    figure.suptitle(f"block {layer}: attention from token {query}", fontsize=9)
    return pattern, save_figure(figure, path)


def patching_heatmap(
    values: Tensor,
    image: Any,
    layout: TokenLayout,
    path: str | Path | None = None,
    *,
    title: str = "",
    layer_names: Sequence[str] | None = None,
) -> Path | None:
    """Patching (or attribution) results ``values [layers, tokens]`` as one heatmap over the
    image per layer, red where patching the clean token raises the metric, blue where it lowers
    it; prefix tokens' values are written under each panel."""
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.dim() != 2 or values.shape[1] != layout.n_tokens:
        raise PrismaError(
            f"patching values must be [layers, {layout.n_tokens} tokens], got {tuple(values.shape)}"
        )
    rgb = _as_rgb(image, layout)
    layers = values.shape[0]
    limit = float(values.abs().max()) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    columns = min(layers, 6)
    rows = -(-layers // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        clear_axes(ax)
        if i >= layers:
            ax.set_visible(False)
            continue
        tmap = token_map(values[i], layout, size=rgb.shape[:2])
        ax.imshow(rgb, interpolation="nearest")
        pixels = tmap.pixels[0]
        rgba = get_cmap("RdBu_r")(norm(np.nan_to_num(pixels)))
        # opacity follows |value|: where patching does nothing, the image shows through
        rgba[..., 3] = np.where(np.isfinite(pixels), 0.15 + 0.8 * np.abs(pixels) / limit, 0)
        ax.imshow(rgba, interpolation="nearest")
        name = layer_names[i] if layer_names else f"block {i}"
        prefix = ", ".join(f"{v:+.2f}" for v in tmap.prefix)
        ax.set_xlabel(f"{name}" + (f"  CLS {prefix}" if prefix else ""), fontsize=7)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap="RdBu_r")
    figure.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)


def head_matrix(
    values: Tensor, path: str | Path | None = None, *, title: str = "", label: str = "metric"
) -> Path | None:
    """A ``[layers, heads]`` matrix of head effects as a diverging heatmap with its numbers."""
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.dim() != 2:
        raise PrismaError(f"head values must be [layers, heads], got {tuple(values.shape)}")
    limit = float(values.abs().max()) or 1.0
    layers, heads = values.shape
    figure, ax = plt.subplots(figsize=(0.9 + 0.55 * heads, 0.7 + 0.42 * layers))
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    for (r, c), v in np.ndenumerate(values.numpy()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                color="white" if abs(v) > 0.6 * limit else "black")  # fmt: skip
    ax.set_xticks(range(heads), [f"H{h}" for h in range(heads)], fontsize=7)
    ax.set_yticks(range(layers), [f"L{layer}" for layer in range(layers)], fontsize=7)
    figure.colorbar(image, ax=ax, label=label, shrink=0.85)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(figure, path)


def _short_hook(hook: str) -> str:
    return hook.replace("blocks.", "L").replace(".hook_", " ")


def circuit_graph(
    circuit: Any,
    path: str | Path,
    *,
    browsers: Mapping[str, str | Path] | None = None,
    title: str = "latent circuit",
) -> Path:
    """Write ``circuit`` (a :class:`~prisma_mm.analysis.circuits.Circuit`) as one HTML page
    with an inline SVG: a column per SAE in forward order, a node per latent (area ~
    |attribution|, red raises the metric, blue lowers it), edges between consecutive columns
    (width ~ |weight|). A node links to its latent's page in ``browsers[hook]`` (a browser
    folder from ``prisma-mm browse``), relative to the page. Opens from file://."""
    path = Path(path)
    browsers = dict(browsers or {})
    hooks = list(dict.fromkeys(hook for hook, _, _ in circuit.nodes))
    if not hooks:
        raise PrismaError("the circuit has no nodes: nothing to draw")
    column = {hook: i for i, hook in enumerate(hooks)}
    per_column: dict[str, int] = {}
    xy: list[tuple[float, float]] = []
    for hook, _, _ in circuit.nodes:
        row = per_column.get(hook, 0)
        per_column[hook] = row + 1
        xy.append((90 + 180 * column[hook], 60 + 70 * row))
    width = 180 * len(hooks) + 20
    height = 70 * max(per_column.values()) + 60
    biggest = max(abs(a) for _, _, a in circuit.nodes) or 1.0
    heaviest = max((abs(w) for _, _, w in circuit.edges), default=0.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for i, hook in enumerate(hooks):
        parts.append(
            f'<text x="{90 + 180 * i}" y="22" text-anchor="middle" class="col">'
            f"{html.escape(_short_hook(hook))}</text>"
        )
    for source, target, weight in circuit.edges:
        (x1, y1), (x2, y2) = xy[source], xy[target]
        colour = "#c0392b" if weight > 0 else "#2e86c1"
        stroke = 0.5 + 5.5 * abs(weight) / heaviest
        parts.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{colour}" '
            f'stroke-width="{stroke:.2f}" stroke-opacity="0.6"><title>'
            f"{weight:+.4g}</title></line>"
        )
    here = path.parent.resolve()
    for (hook, latent, attribution), (x, y) in zip(circuit.nodes, xy, strict=True):
        radius = 6 + 16 * (abs(attribution) / biggest) ** 0.5
        colour = "#e74c3c" if attribution > 0 else "#3498db"
        label = html.escape(f"#{latent}  {attribution:+.3g}")
        node = (
            f'<circle cx="{x}" cy="{y}" r="{radius:.1f}" fill="{colour}" stroke="#333">'
            f"<title>{html.escape(hook)} latent {latent}: {attribution:+.4g}</title></circle>"
            f'<text x="{x}" y="{y + radius + 12:.1f}" text-anchor="middle">{label}</text>'
        )
        if hook in browsers:
            target = Path(browsers[hook]).resolve() / "latent.html"
            href = html.escape(f"{Path(os.path.relpath(target, here)).as_posix()}?id={latent}")
            node = f'<a href="{href}">{node}</a>'
        parts.append(node)
    parts.append("</svg>")
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title><style>body{{font:13px sans-serif;margin:16px}}"
        "text{font:11px sans-serif}.col{font-weight:bold}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>metric clean {circuit.clean:.4g}, corrupted "
        f"{circuit.corrupt:.4g}. Node area ~ |attribution|: red where setting the latent to its "
        "clean value raises the metric, blue where it lowers it. Edges: the same estimate for "
        "a latent's effect on a latent of the next SAE (red: raises its activation).</p>"
        + "".join(parts)
        + "</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    path.with_suffix(".json").write_text(json.dumps(circuit.to_dict(), indent=1))
    return path
