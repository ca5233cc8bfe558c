"""``prisma-mm cache``: write an activation cache (or part i/N of one); ``prisma-mm cache
verify DIR``: check one; ``prisma-mm cache merge --out DIR``: merge a cache written in parts.

The same functions as :func:`prisma_mm.cache.write_cache` and
:func:`prisma_mm.cache.verify_cache`. Also runnable alone: ``python -m prisma_mm.cache.cli``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prisma_mm.errors import PrismaError


def _write(args: argparse.Namespace) -> int:
    from prisma_mm.cache.writer import write_cache

    missing = [flag for flag in ("model", "hooks", "data", "out") if getattr(args, flag) is None]
    if missing:
        args.cache_parser.error(
            "writing a cache needs "
            + ", ".join(f"--{m}" for m in missing)
            + " (or `prisma-mm cache verify DIR` to check one)"
        )
    weights = None if args.weights.lower() in ("none", "random") else args.weights
    manifest = write_cache(
        args.model,
        args.data,
        args.out,
        args.hooks,
        weights=weights,
        tokens=args.tokens,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        shard_size=args.shard_size,
        device=args.device,
        limit=args.limit,
        order_seed=args.order_seed,
        img_size=args.img_size,
        progress=not args.quiet,
        part=args.part,
        clip=args.clip,
        video_backend=args.video_backend,
        generation={
            "steps": args.steps,
            "guidance": args.guidance,
            "seeds": args.seeds,
            "prompt_column": args.prompt_column,
            "keep_images": args.keep_images,
        },
    )
    _summary(args.out, manifest)
    return 0


def _summary(out: str, manifest: dict) -> None:
    shapes = ", ".join(f"{h} {manifest['shapes'][h]}" for h in manifest["hooks"])
    part = manifest.get("part")
    what = f"part {part['index']}/{part['count']} of " if part else ""
    merged = f" (merged from {len(manifest['parts'])} parts)" if "parts" in manifest else ""
    print(
        f"{what}cache {out}: {manifest['n_samples']} samples in {manifest['n_shards']} shards"
        f"{merged}, {manifest['n_skipped']} inputs skipped; {manifest['dtype']} {shapes}"
    )


def _merge(args: argparse.Namespace) -> int:
    from prisma_mm.cache.parts import merge_parts

    _summary(args.out, merge_parts(args.out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from prisma_mm.cache.manifest import verify_cache

    report = verify_cache(args.dir)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"DAMAGED: {problem}")
    if report.ok:
        print(f"OK {args.dir}: {report.n_shards} shards, {report.n_samples} samples")
        return 0
    print(f"{args.dir}: {len(report.problems)} problem(s) found", file=sys.stderr)
    return 1


def add_cache_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cache`` (write) and ``cache verify DIR`` to a ``prisma-mm`` subparsers object;
    each sets ``handler`` (called with the parsed args, returns the exit code)."""
    parser = subparsers.add_parser(
        "cache",
        help="cache a model's activations over a data set (resumable webdataset shards)",
        description="Stream a data set through a model and cache the activations at --hooks. "
        "Re-running the same command resumes an interrupted cache.",
    )
    parser.add_argument("--model", help="model card name (see `prisma-mm zoo list`)")
    parser.add_argument(
        "--weights",
        default="pretrained",
        help="pretrained (default), none (random init), hf-hub:org/repo or a local path",
    )
    parser.add_argument(
        "--hooks", help="comma-separated hook names, e.g. blocks.11.hook_resid_post"
    )
    parser.add_argument(
        "--data",
        help="image or video folder, class-folder tree, list file, tar shards "
        "(train-{000..099}.tar or a URL); prefix folder:/classes:/list:/tar:/videos: to choose "
        "explicitly; for a diffusion card, prompts (.txt, .csv, .jsonl) or caption tar shards",
    )
    parser.add_argument("--out", help="output directory (created; resumed if it holds this cache)")
    parser.add_argument(
        "--tokens",
        default="all",
        help="all (default), cls, patches, random:K (K patch tokens per input, seeded by its "
        "key), or indices like 0,5,9",
    )
    parser.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 or float32")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="inputs per forward (256 on a GPU, 32 on CPU; prompts: 16, 4)",
    )
    parser.add_argument(
        "--workers", "--num-workers", type=int, default=4, help="DataLoader decode workers (4)"
    )
    parser.add_argument("--shard-size", type=int, default=256, help="inputs per shard (256)")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default: a GPU when there is one), cpu, cuda, cuda:1, …; a part on cuda "
        "takes cuda:LOCAL_RANK",
    )
    parser.add_argument(
        "--part",
        default=None,
        help="write part i/N (0-based) of N cooperating processes into OUT/parts/ (default: "
        "the launcher's RANK/WORLD_SIZE or srun's SLURM_PROCID/SLURM_STEP_NUM_TASKS)",
    )
    parser.add_argument("--limit", type=int, default=None, help="read at most this many inputs")
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="run the model at this input size in pixels (default: the card's), e.g. 224; "
        "for a diffusion card, the size of the generated images",
    )
    parser.add_argument(
        "--order-seed",
        default="0",
        help="seed of the random order the inputs are visited in (0), or none for the "
        "source's own order",
    )
    parser.add_argument(
        "--clip",
        default=None,
        help="video data: clips per video, uniform:T, stride:T:S, windows:T:S[:HOP] or card "
        "(default: the card's own), +pad to repeat the last frame of short videos",
    )
    parser.add_argument(
        "--video-backend",
        default="auto",
        choices=("auto", "pyav", "decord", "torchcodec"),
        help="video decoder: auto (default: PyAV, decord where measured exact), pyav, decord, "
        "torchcodec",
    )
    prompts = parser.add_argument_group(
        "diffusion cards (--data: a prompts .txt / .csv / .jsonl file or caption tar shards)"
    )
    prompts.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the card's)"
    )
    prompts.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the card's)"
    )
    prompts.add_argument(
        "--seeds", default=None, help="generate each prompt with each seed: 0,1,2 or 0-3 (0)"
    )
    prompts.add_argument(
        "--prompt-column", default=None, help="CSV / JSONL column or tar json key of the prompt "
        "(default: prompt, caption or text)",
    )  # fmt: skip
    prompts.add_argument(
        "--keep-images", action="store_true",
        help="store each generated image as a png member of its step-0 sample",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_write, cache_parser=parser)
    actions = parser.add_subparsers(dest="cache_command", required=False, metavar="{verify,merge}")
    verify = actions.add_parser(
        "verify", help="recompute checksums and counts of a cache and report any damage"
    )
    verify.add_argument("dir", help="cache directory")
    verify.set_defaults(handler=_verify)
    merge = actions.add_parser(
        "merge", help="merge the manifests of a cache written in parts (--part i/N, launchers)"
    )
    merge.add_argument("--out", required=True, help="the cache directory the parts wrote to")
    merge.set_defaults(handler=_merge)
    return parser


def main_cache(argv: Sequence[str] | None = None) -> int:
    """``prisma-mm cache ...`` on its own: one line and exit 2 on a user mistake."""
    parser = argparse.ArgumentParser(prog="prisma-mm")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except PrismaError as error:
        print(f"prisma-mm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main_cache())
