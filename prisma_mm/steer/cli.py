"""``prisma-mm steer DICT --prompt P --latent N --out DIR``: a grid of steered generations.

Rows are strengths (``--mode add``: ``AddFeature`` at strength x the feature's mean activation
from the index; ``--mode scale``: ``EditFeatures`` factors, 0 ablates); columns are every
prompt x seed. Writes ``grid.png``, the unsteered images and ``settings.json`` (see
:meth:`~prisma_mm.steer.diffusion.SteeringGrid.save`). Every argument is checked, and the
pipeline's hook and width, before the first image is generated.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from prisma_mm.data.prompts import parse_seeds, read_prompts
from prisma_mm.errors import PrismaError

MODES = ("add", "scale")
MARKER = "settings.json"


def _numbers(text: str, kind: type, what: str) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PrismaError(f"{what} {text!r}: give comma-separated numbers, e.g. 0,2,4") from None
    if not values:
        raise PrismaError(f"{what} {text!r}: give at least one number")
    return values


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:  # the same reader as prompt caching: text, CSV / TSV or JSONL
        prompts += read_prompts(args.prompts)[0]
    if not prompts:
        raise PrismaError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PrismaError(f"--out {str(out)!r} is a file: give a folder for the grid")
    if out.is_dir() and any(out.iterdir()):
        try:
            marker = json.loads((out / MARKER).read_text())
        except (OSError, ValueError):
            marker = None
        if not isinstance(marker, dict) or marker.get("format") != "prisma-mm-steer":
            raise PrismaError(
                f"--out {str(out)!r} is a non-empty folder that is not a steering grid: choose "
                "a new or empty folder (a previous grid there is replaced)"
            )


def _mask(args: argparse.Namespace, size: list[int]) -> Any:
    from prisma_mm.steer.base import RegionMask

    if args.box and args.mask:
        raise PrismaError("give --box or --mask, not both")
    if args.box:
        box = _numbers(args.box, float, "--box")
        if len(box) != 4:
            raise PrismaError(f"--box {args.box!r}: give left,top,right,bottom in pixels")
        return RegionMask(box=box, size=tuple(size), soft=args.soft_mask)
    if args.mask:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.mask) as image:
                return RegionMask(image.convert("L"), soft=args.soft_mask)
        except (OSError, UnidentifiedImageError) as error:
            raise PrismaError(f"--mask {args.mask!r} is not a readable image: {error}") from None
    return None


def run_steer(args: argparse.Namespace) -> int:
    """The handler of ``prisma-mm steer``."""
    from prisma_mm.sae.published import dictionary_label, output_home, resolve_dictionary
    from prisma_mm.steer.base import (
        AddFeature,
        EditFeatures,
        _latent_list,
        _resolve_hook,
        _steerable,
        feature_scale,
    )

    out = Path(args.out)
    _check_out(out)
    prompts = _prompts(args)
    strengths = _numbers(args.strengths, float, "--strengths")
    seeds = parse_seeds(args.seeds)
    at_steps = None if args.at_steps is None else _numbers(args.at_steps, int, "--at-steps")
    sae = _steerable(resolve_dictionary(args.dictionary))  # a saved folder or a published name
    hook = _resolve_hook(sae, args.hook)
    latents = _latent_list(sae, args.latent or [])
    scale = None
    scale_source = None
    if args.mode == "add":
        from prisma_mm.viz.index import INDEX_JSON, FeatureIndex

        index_dir = Path(args.index) if args.index else output_home(args.dictionary) / "index"
        release_mean = getattr(sae, "latent_mean", None)
        if (
            args.index is None
            and release_mean is not None
            and not (index_dir / INDEX_JSON).is_file()
        ):
            # no index yet: a release that ships each latent's mean activation (sdxl-unbox) has one
            scale = feature_scale(release_mean, latents, sae.cfg.n_latents, hook)
            scale_source = "the release's latent_mean"
        else:
            index = FeatureIndex.load(index_dir)
            if index.n_latents != sae.cfg.n_latents:
                raise PrismaError(f"the index has {index.n_latents} latents but the dictionary "
                                  f"has {sae.cfg.n_latents}: pass the index of this dictionary")  # fmt: skip
            scale = feature_scale(index, latents, sae.cfg.n_latents, hook)
            scale_source = str(index_dir.resolve())
    from prisma_mm.zoo.diffusion import load_pipeline

    model = args.model or sae.metadata.get("model")
    if not model:
        raise PrismaError("the dictionary records no model: pass --model CARD or a pipeline folder")
    weights = None if args.weights == "none" else args.weights
    # a published SAE trained at img_size generates at that size unless --size says otherwise
    pipeline = load_pipeline(model, weights=weights, device=args.device, dtype=args.dtype,
                             size=sae.metadata.get("img_size"))  # fmt: skip
    pipeline.hook_point(hook)
    sae.to(pipeline.device)  # the edit runs where the activations are
    if pipeline.d(hook) != sae.cfg.d_in:
        raise PrismaError(f"{hook!r} has d={pipeline.d(hook)} on {model!r}; the dictionary reads "
                          f"d_in={sae.cfg.d_in} (was it trained on another model?)")  # fmt: skip
    chosen = pipeline.settings(args.steps, args.guidance, args.size)
    if at_steps is not None and not all(0 <= s < chosen["steps"] for s in at_steps):
        raise PrismaError(f"--at-steps {args.at_steps!r}: this run has steps "
                          f"0..{chosen['steps'] - 1}")  # fmt: skip
    if args.half == "uncond" and chosen["guidance"] <= 1:
        raise PrismaError(f"--half uncond: guidance {chosen['guidance']:g} has no "
                          "unconditional half (classifier-free guidance needs guidance > 1)")  # fmt: skip
    mask = _mask(args, chosen["size"])
    where = {"hook": hook, "mask": mask, "steps": at_steps, "half": args.half}

    def interventions(strength: float) -> Any:
        if args.mode == "add":
            return AddFeature(sae, latents, strength, scale=scale, **where)
        return EditFeatures(sae, dict.fromkeys(latents, strength), **where)

    interventions(1.0)  # every setting checked here, before the first image
    from prisma_mm.steer.diffusion import steering_grid

    grid = steering_grid(pipeline, interventions, strengths, prompts, seeds, steps=chosen["steps"],
                         guidance=chosen["guidance"], size=chosen["size"],
                         progress=not args.quiet)  # fmt: skip
    grid.row_name = "strength" if args.mode == "add" else "factor"
    grid.extra = {
        "model": model,
        "weights": args.weights,
        "dictionary": dictionary_label(args.dictionary),
        "hook": hook,
        "mode": args.mode,
        "latents": latents,
        "mean_active": scale,
        "mean_active_from": scale_source,
        "at_steps": at_steps,
        "half": args.half,
        "box": _numbers(args.box, float, "--box") if args.box else None,
        "mask": str(Path(args.mask).resolve()) if args.mask else None,
        "soft_mask": args.soft_mask,
    }
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    grid.save(work)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    print(f"wrote {len(strengths)} x {len(grid.columns)} steered images: {out / 'grid.png'}")
    return 0


def add_steer_parser(subparsers: Any) -> None:
    """Register ``prisma-mm steer``."""
    parser = subparsers.add_parser(
        "steer",
        help="generate with a dictionary's features steered: a grid of strengths x prompts/seeds",
        description="Steer a diffusion pipeline with features of a saved SAE (trained on a U-Net "
        "block's hook) and write a grid: rows are strengths, columns every prompt x seed, beside "
        "the unsteered images and the settings that made them.",
    )
    parser.add_argument("dictionary", help="saved dictionary directory (cfg.json + weights), "
                        "or a published SAE's name (`prisma-mm sae list`)")  # fmt: skip
    parser.add_argument("--latent", type=int, action="append", help="latent to steer "
                        "(repeatable: several features at once)", required=True)  # fmt: skip
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts", default=None, help="a prompts file: text (one a line), CSV / TSV or JSONL"
    )
    parser.add_argument("--out", required=True, help="folder to write the grid into")
    parser.add_argument("--mode", choices=MODES, default="add",
                        help="add: + strength x mean activation x decoder row; scale: multiply "
                        "the code through the SAE, error term kept (0 ablates)")  # fmt: skip
    parser.add_argument("--strengths", default="0,1,2,4",
                        help="comma-separated strengths (add) or factors (scale), one row each")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="seeds (columns): 0,1,2 or a range 0-3")
    parser.add_argument("--index", default=None, help="feature index (default DICT/index, for "
                        "a published SAE ./sae-<NAME>/index; for --mode add, whose strengths are "
                        "in units of its mean activations)")  # fmt: skip
    parser.add_argument("--hook", default=None, help="hook to steer (default: the dictionary's)")
    parser.add_argument("--model", default=None,
                        help="diffusion card or pipeline folder (default: the dictionary's model)")  # fmt: skip
    parser.add_argument("--weights", default="pretrained",
                        help="pretrained, none (tiny cards: random), hf-hub:org/repo or a folder")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (card default)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance (card default)")
    parser.add_argument(
        "--size", type=int, default=None, help="image size in pixels (card default)"
    )
    parser.add_argument("--at-steps", default=None,
                        help="comma-separated denoising steps to steer at (default: all)")  # fmt: skip
    parser.add_argument("--half", choices=("both", "cond", "uncond"), default="both",
                        help="CFG half to steer (without CFG every row is cond)")  # fmt: skip
    parser.add_argument("--box", default=None,
                        help="steer inside left,top,right,bottom (pixels of the image) only")  # fmt: skip
    parser.add_argument("--mask", default=None,
                        help="steer inside a mask image only (white = inside; any size)")  # fmt: skip
    parser.add_argument("--soft-mask", action="store_true",
                        help="weight the edit by each cell's mask coverage instead of a 0.5 cut")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_steer)
