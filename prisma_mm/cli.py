"""``prisma-mm``: one subcommand per stage, each the same function the Python API exposes.

User mistakes (:class:`~prisma_mm.errors.PrismaError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from prisma_mm.errors import PrismaError

# Subcommands whose parsers live beside the stage they run: (module, function adding the parser).
STAGE_PARSERS: list[tuple[str, str]] = [
    ("prisma_mm.cache.cli", "add_cache_parser"),
    ("prisma_mm.cli", "_add_toyworld_parser"),
    ("prisma_mm.analysis.cli", "add_analysis_parsers"),
    ("prisma_mm.analysis.families", "add_family_parser"),
    ("prisma_mm.demo", "add_demo_parser"),
    ("prisma_mm.viz.cli", "add_index_parser"),
    ("prisma_mm.viz.browser", "add_browse_parser"),
    ("prisma_mm.steer.cli", "add_steer_parser"),
    ("prisma_mm.sae.published", "add_sae_parser"),
]


def _add_toyworld_parser(subparsers) -> None:
    from prisma_mm.data.toyworld import add_toyworld_arguments, run_toyworld

    parser = subparsers.add_parser("toyworld", help="render the toy world with ground-truth labels")
    add_toyworld_arguments(parser).set_defaults(handler=run_toyworld)


def _zoo_list(args: argparse.Namespace) -> int:
    from prisma_mm.zoo.registry import get_card, list_models

    names = list_models(args.family)
    if args.json:
        print(json.dumps([get_card(n).to_dict() for n in names], indent=2))
        return 0
    rows = [(n, get_card(n)) for n in names]
    width = max(len(n) for n, _ in rows)
    family = max(len("family"), *(len(card.family) for _, card in rows))
    task = max(len("task"), *(len(card.task) for _, card in rows))
    print(f"{'name':<{width}}  {'family':<{family}}  {'task':<{task}}  source")
    for name, card in rows:
        print(f"{name:<{width}}  {card.family:<{family}}  {card.task:<{task}}  {card.source}")
    print(f"{len(rows)} models")
    return 0


def _zoo_show(args: argparse.Namespace) -> int:
    from prisma_mm.zoo.registry import build_on_meta, get_card

    card = get_card(args.name)
    info = card.to_dict()
    model = build_on_meta(args.name)
    info["layout"] = model.layout.to_dict()
    info["d_model"] = model.d_model
    info["n_layers"] = model.n_layers
    spec = getattr(model, "spec", None)  # a diffusion pipeline has blocks, not one spec
    if spec is not None and spec.block_layouts is not None:  # grids that shrink (video)
        info["grid_after_each_block"] = [list(a.grid) for _, a in spec.block_layouts]
    info["hooks"] = {
        "per block": sorted(
            {n.split(".", 2)[2] for n in model.hook_names if n.startswith("blocks.")}
        ),
        "model": [n for n in model.hook_names if not n.startswith("blocks.")],
    }
    try:
        text = model.text
    except PrismaError:  # no text tower on this card
        text = None
    if text is not None:
        info["hooks"]["text tower"] = {
            "per block": sorted(
                {n.split(".", 3)[3] for n in text.hook_names if n.startswith("text.blocks.")}
            ),
            "model": [n for n in text.hook_names if not n.startswith("text.blocks.")],
            "n_layers": text.n_layers,
        }
    print(json.dumps(info, indent=2))
    return 0


def _add_zoo_parser(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="list and inspect carded models")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    listing = zoo_sub.add_parser("list", help="list the model cards")
    listing.add_argument(
        "--family",
        default=None,
        help="only this family (timm, open_clip, transformers_video, torchvision_video, diffusers)",
    )
    listing.add_argument("--json", action="store_true", help="print the cards as JSON")
    listing.set_defaults(handler=_zoo_list)
    show = zoo_sub.add_parser("show", help="show one card with its layout and hook names")
    show.add_argument("name")
    show.set_defaults(handler=_zoo_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prisma-mm",
        description="Mechanistic interpretability for vision models: hooks, activation caches, "
        "sparse dictionaries, evaluation.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_zoo_parser(subparsers)
    # Listed for --help only: main() hands `train ...` to LightningCLI before argparse runs.
    subparsers.add_parser(
        "train", help="train a dictionary through LightningCLI: prisma-mm train fit --config R.yaml"
    )
    for module_name, function_name in STAGE_PARSERS:
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def _version() -> str:
    from prisma_mm import __version__

    return f"prisma-mm {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `prisma-mm train ...` hands its arguments to LightningCLI untouched.
    if argv and argv[0] == "train":
        from prisma_mm.train.cli import run_train_cli

        try:
            return run_train_cli(argv[1:]) or 0
        except PrismaError as error:
            print(f"prisma-mm: error: {error}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PrismaError as error:
        print(f"prisma-mm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prisma-mm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
