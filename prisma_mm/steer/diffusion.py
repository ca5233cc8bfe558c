"""Steering generation: the interventions of :mod:`prisma_mm.steer.base` on a diffusion
pipeline, a grid of steered images, and a feature's heatmaps over a generated image.

The context manager is :func:`~prisma_mm.steer.base.steer` itself, over a
:class:`~prisma_mm.zoo.diffusion.HookedPipeline` (or a bare diffusers pipeline)::

    hp = load_pipeline("sdxl-turbo")
    add = AddFeature(sae, 4021, 6.0, scale=index, steps=[0], half="cond",
                     mask=RegionMask(box=(0, 0, 256, 256), size=(512, 512)))
    with steer(hp, [add, ablate(sae_up, [17])]):          # several features and blocks
        images = hp.generate(["a photo of a cat"], seeds=[0])

An intervention at ``unet.<block>.hook_update`` edits the block's residual update, so the
block's output becomes ``out + (edited - update)``: rows, tokens and steps it does not touch
keep their exact values. This module adds what generation needs around it:

- :func:`steering_grid`: images for several strengths (rows) and prompts x seeds (columns),
  beside the unsteered ones (:class:`SteeringGrid`, saved by ``prisma-mm steer``);
- :func:`feature_heatmaps`: a latent's code over a generated image, per block and step,
  drawn by :func:`~prisma_mm.viz.grids.render_latent_grid` (one colour scale per feature).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prisma_mm.errors import PrismaError
from prisma_mm.steer.base import Intervention, steer
from prisma_mm.zoo.diffusion import to_pil

__all__ = [
    "FeatureHeatmaps",
    "SteeringGrid",
    "feature_heatmaps",
    "steering_grid",
    "to_pil",
]


@dataclass
class SteeringGrid:
    """Images generated unsteered and at each strength.

    ``columns``: the ``(prompt, seed)`` of each column; ``unsteered [C, 3, H, W]`` and
    ``images [R, C, 3, H, W]`` (float in [0, 1]; row ``r`` at ``strengths[r]``);
    ``settings``: the generation settings (steps, guidance, size) used for every image.
    """

    strengths: list[float]
    columns: list[tuple[str, int]]
    unsteered: Tensor
    images: Tensor
    settings: dict[str, Any]
    row_name: str = "strength"  # "factor" for EditFeatures rows
    extra: dict[str, Any] = field(default_factory=dict)

    def column_labels(self) -> list[str]:
        prompts = {p for p, _ in self.columns}
        seeds = {s for _, s in self.columns}
        if len(prompts) == 1:
            return [f"seed {s}" for _, s in self.columns]
        if len(seeds) == 1:
            return [p for p, _ in self.columns]
        return [f"{p}\nseed {s}" for p, s in self.columns]  # two lines: the seed never cut

    def save(self, out: str | Path) -> Path:
        """Write ``out/grid.png`` (rows: strengths; columns: prompts x seeds), the unsteered
        images ``out/unsteered/NN.png`` and ``out/settings.json`` (everything that made them,
        with each grid cell's pixel box); returns the grid's path. JSON last."""
        from prisma_mm.viz.grids import image_grid

        out = Path(out)
        (out / "unsteered").mkdir(parents=True, exist_ok=True)
        grid = image_grid(
            [[to_pil(image) for image in row] for row in self.images],
            row_labels=[f"{self.row_name} {s:g}" for s in self.strengths],
            col_labels=self.column_labels(),
        )
        grid.image.save(out / "grid.png")
        files = []
        for c, image in enumerate(self.unsteered):
            name = f"unsteered/{c:02d}.png"
            to_pil(image).save(out / name)
            files.append(name)
        document = {
            "format": "prisma-mm-steer",
            "version": 1,
            **self.extra,
            "rows": {"name": self.row_name, "values": self.strengths},
            "columns": [{"prompt": p, "seed": s} for p, s in self.columns],
            "generation": self.settings,
            "grid": {
                "file": "grid.png",
                "rows": len(self.strengths),
                "cols": len(self.columns),
                "cell": list(self.images.shape[-2:]),
                "boxes": [[list(box) for box in row] for row in grid.boxes],
            },
            "unsteered": files,
        }
        (out / "settings.json").write_text(json.dumps(document, indent=1) + "\n")
        return out / "grid.png"


def steering_grid(
    pipeline: Any,
    interventions: Callable[[float], Intervention | Sequence[Intervention]],
    strengths: Sequence[float],
    prompts: str | Sequence[str],
    seeds: int | Sequence[int] = 0,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    size: Any = None,
    progress: bool = False,
) -> SteeringGrid:
    """Generate every prompt x seed unsteered and under ``interventions(strength)`` for each
    strength; one batch per row (each image's noise has its own generator, so a column's
    images differ only by the steering). Interventions that do nothing (strength 0) reuse the
    unsteered images, which they equal bit for bit."""
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not prompts or not seeds:
        raise PrismaError("steering_grid needs at least one prompt and one seed")
    if not strengths:
        raise PrismaError("steering_grid needs at least one strength")
    columns = [(p, s) for p in prompts for s in seeds]
    chosen = pipeline.settings(steps, guidance, size)
    rows = [interventions(float(s)) for s in strengths]  # built (and checked) before any work

    def generate() -> Tensor:
        return pipeline.generate([p for p, _ in columns], [s for _, s in columns],
                                 chosen["steps"], chosen["guidance"], chosen["size"])  # fmt: skip

    bar = tqdm(total=len(strengths) + 1, desc="steer", unit="row", disable=not progress)
    unsteered = generate()
    bar.update()
    images = []
    for items in rows:
        items = [items] if isinstance(items, Intervention) else list(items)
        if all(item.is_noop() for item in items):
            images.append(unsteered)
        else:
            with steer(pipeline, items):
                images.append(generate())
        bar.update()
    bar.close()
    return SteeringGrid([float(s) for s in strengths], columns, unsteered, torch.stack(images),
                        chosen)  # fmt: skip


@dataclass
class FeatureHeatmaps:
    """One feature's heatmaps: the saved file (or the open Figure), its hook and latent, the
    steps drawn and the values drawn, ``values [n_steps, h * w]`` (the cond row's code)."""

    output: Any
    hook: str
    latent: int
    steps: list[int]
    values: Tensor


def feature_heatmaps(
    pipeline: Any,
    features: Sequence[tuple[Any, int]],
    prompt: str,
    seed: int = 0,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    size: Any = None,
    at_steps: Sequence[int] | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> list[FeatureHeatmaps]:
    """A feature's heatmap over the image generated from ``prompt``, per block and step.

    ``features``: ``(dictionary, latent)`` pairs; each dictionary reads the hook its metadata
    records (several blocks at once). One generation (under any active steering) reads every
    hook at ``at_steps`` (default: all) of the cond half; each feature gets one grid, a
    column per step, the code ``[h * w]`` over the final image through the block's layout,
    on one colour scale per feature (``render_latent_grid``, ``normalize="latent"``).
    Returns one :class:`FeatureHeatmaps` per feature, whose ``output`` is the saved file
    (``out/<hook>-latent<N>.png``) or, without ``out``, the open figure. ``options`` go to
    ``render_latent_grid``.
    """
    from prisma_mm.steer.base import _inference_code, _resolve_hook, _steerable
    from prisma_mm.viz.grids import GridEntry, render_latent_grid

    if not features:
        raise PrismaError("feature_heatmaps: give at least one (dictionary, latent) pair")
    chosen = pipeline.settings(steps, guidance, size)
    resolved = []
    for dictionary, latent in features:
        sae = _steerable(dictionary)
        hook = _resolve_hook(sae, None)
        pipeline.hook_point(hook)
        if not 0 <= int(latent) < sae.cfg.n_latents:
            raise PrismaError(f"latent {latent} outside 0..{sae.cfg.n_latents - 1} at {hook!r}")
        if pipeline.d(hook) != sae.cfg.d_in:
            raise PrismaError(
                f"{hook!r} has d={pipeline.d(hook)}; the dictionary reads d_in={sae.cfg.d_in}"
            )
        resolved.append((sae, int(latent), hook))
    hooks = list(dict.fromkeys(hook for _, _, hook in resolved))
    wanted = list(range(chosen["steps"])) if at_steps is None else sorted(set(at_steps))
    images, acts = pipeline.run_with_cache([prompt], hooks, seeds=[seed], at_steps=wanted,
                                           **chosen)  # fmt: skip
    image = to_pil(images[0])
    title = options.pop("title", None)
    figures = []
    for sae, latent, hook in resolved:
        layout = pipeline.layout_of(hook, chosen["size"])
        with torch.no_grad():
            code = _inference_code(sae, acts[hook][0], hook)  # [n_steps * tokens, n_latents]
            values = code[:, latent].reshape(len(wanted), -1).float().cpu()  # [n_steps, tokens]
        entries = [
            GridEntry(image, values[i], float(values[i].max()), f"step {step}", key=str(step))
            for i, step in enumerate(wanted)
        ]
        heading = title or f"latent {latent} at {hook}  ·  {prompt!r}, seed {seed}"
        path = None if out is None else Path(out) / f"{hook}-latent{latent}.png"
        output = render_latent_grid(entries, layout, path, title=heading, ncols=len(entries),
                                    **options)  # fmt: skip
        figures.append(FeatureHeatmaps(output, hook, latent, wanted, values))
    return figures
