"""``prisma-mm index DICT CACHE --out DIR``: the feature index of a dictionary over a cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_index_parser(subparsers: Any) -> None:
    """Register ``prisma-mm index``."""
    from prisma_mm.viz.index import SCORES, IndexOptions

    defaults = IndexOptions()
    parser = subparsers.add_parser(
        "index",
        help="per-latent top samples, interval samples, frequencies, histograms and neighbours",
        description="Build the feature index of a saved dictionary over an activation cache in "
        "one streaming pass (resumable: re-run the same command after an interruption).",
    )
    parser.add_argument("dictionary", help="saved dictionary directory (cfg.json + weights), "
                        "or a published SAE's name (`prisma-mm sae list`)")  # fmt: skip
    parser.add_argument("source", help="an activation cache directory (manifest.json + "
                        "shards), or a data source (image folder, class tree, list, tar "
                        "shards) to run through the model first")  # fmt: skip
    parser.add_argument("--model", default=None,
                        help="for a data source: the model card (default: the dictionary's)")  # fmt: skip
    parser.add_argument("--weights", default="pretrained",
                        help="for a data source: pretrained, none (seeded random init) or a "
                        "path")  # fmt: skip
    parser.add_argument("--device", default="cpu",
                        help="where the dictionary (and, for a data source, the model) runs")  # fmt: skip
    parser.add_argument("--out", default=None, help="output directory (default: DICT/index; "
                        "for a published SAE ./sae-<NAME>/index)")  # fmt: skip
    parser.add_argument("--hook", default=None, help="cached hook (default: the dictionary's)")
    parser.add_argument("--score", choices=SCORES, default=defaults.score,
                        help="rank samples by the max or mean over patch tokens, or the prefix "
                        "(CLS) token (max becomes prefix where no patch token is indexed)")  # fmt: skip
    parser.add_argument("--top-n", type=int, default=defaults.top_n, help="top samples per latent")
    parser.add_argument("--n-bins", type=int, default=defaults.n_bins, help="interval bins")
    parser.add_argument("--interval-n", type=int, default=defaults.interval_n,
                        help="samples per interval bin")  # fmt: skip
    parser.add_argument("--hist-bins", type=int, default=defaults.hist_bins,
                        help="histogram bins (a power of two)")  # fmt: skip
    parser.add_argument("--neighbours", type=int, default=defaults.n_neighbours,
                        help="decoder-cosine neighbours per latent")  # fmt: skip
    parser.add_argument("--batch-samples", type=int, default=defaults.batch_samples,
                        help="inputs encoded per step")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="shards between checkpoints")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_index)


def run_index(args: argparse.Namespace) -> int:
    """The handler of ``prisma-mm index``."""
    from prisma_mm.sae.published import output_home
    from prisma_mm.viz.index import (
        IndexOptions,
        _load_dictionary,
        _Loaded,
        build_index,
        build_index_from_source,
    )

    options = IndexOptions(
        score=args.score,
        top_n=args.top_n,
        n_bins=args.n_bins,
        interval_n=args.interval_n,
        hist_bins=args.hist_bins,
        n_neighbours=args.neighbours,
        batch_samples=args.batch_samples,
        checkpoint_every=args.checkpoint_every,
    )
    # the dictionary first (a saved folder or a published name), loaded once for both paths
    dictionary = _Loaded(*_load_dictionary(args.dictionary))
    source = Path(args.source)
    out = Path(args.out) if args.out else output_home(args.dictionary) / "index"
    if (source / "manifest.json").is_file():
        index = build_index(
            dictionary, source, out, options, hook=args.hook,
            progress=not args.no_progress, device=args.device,
        )  # fmt: skip
    else:
        from prisma_mm.data.sources import open_source

        open_source(args.source)  # a path that is neither a cache nor a data source fails here
        weights = None if args.weights == "none" else args.weights
        index = build_index_from_source(
            dictionary, args.source, out, options, model=args.model, weights=weights,
            hook=args.hook, device=args.device, progress=not args.no_progress,
        )  # fmt: skip
    alive = int((index.freq_token > 0).sum())
    print(
        f"indexed {index.n_latents} latents ({alive} fired) over {index.meta['n_inputs']} "
        f"inputs, {index.meta['n_tokens']} tokens: {out}"
    )
    return 0
