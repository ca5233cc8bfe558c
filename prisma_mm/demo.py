"""``prisma-mm demo``: the whole toolkit on the built-in toy world, no download needed.

Renders the toy world, caches ``toyvit`` activations at a middle layer and trains a family of
BatchTopK SAEs of doubling size on that cache, each until its held-out FVU has plateaued
(:mod:`prisma_mm.analysis.families`, through the same Lightning module as ``prisma-mm train``).
Then the family report on held-out images: per size FVU, L0, dead fraction, the model's
accuracy with the SAE spliced in and ground-truth recovery; per adjacent pair the stitching
curve, the novel / reconstruction / inactive latents and what the novel ones detect; a
meta-SAE of the largest member and whether it splits conjunction latents ("red circle") into
meta-latents for their parts, against a shuffled control. Last, the feature browser of the
largest member with all of that per latent. Everything goes to ``./prisma-demo/``, with a
summary in ``summary.md`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prisma_mm.errors import PrismaError


@dataclass
class DemoConfig:
    """Sizes of the demo run; the defaults take under 10 minutes on 2 CPU cores.

    ``sizes``: the family's numbers of latents (at least three); ``train_tokens``: each
    member's budget when its FVU has not plateaued by then (FVU measured every
    ``eval_every_tokens`` on the cache's held-out split; plateau criterion
    ``(plateau_window, plateau_eps)`` of :class:`~prisma_mm.analysis.families.PlateauCriterion`).
    """

    out: Path = Path("prisma-demo")
    model: str = "toyvit"
    n_train: int = 4000
    n_eval: int = 400
    hook: str = "blocks.3.hook_resid_post"
    seed: int = 0
    sizes: list[int] = field(default_factory=lambda: [256, 512, 1024])
    k: int = 16
    batch_size: int = 1024
    lr: float = 2e-3  # constant after the warm-up, for every member (the toyvit recipes' rate)
    train_tokens: int = 600_000
    eval_every_tokens: int = 16384
    plateau_window: int = 4
    plateau_eps: float = 0.05
    meta_steps: int = 1000
    stitch_points: int = 24
    browser: bool = True  # index the largest member and write its feature browser
    top_images: int = 8  # browser thumbnails per latent: top samples ...
    interval_images: int = 2  # ... and samples per interval bin
    progress: bool = True


class IndexedToyWorld(torch.utils.data.Dataset):
    """Toy-world images labelled by their first object (``"red circle"``), so that a feature
    index's label mix reads as objects; the source ``IndexedToyWorld[i]`` keeps the index
    back to every ground-truth label."""

    def __init__(self, world: Any) -> None:
        self.world = world

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        image, labels = self.world[i]
        first = labels["objects"][0]
        return image, f"{first['colour']} {first['shape']}"


RUN_FILE = "demo_run.json"


def _run_settings(config: DemoConfig) -> dict[str, Any]:
    """The settings that decide the cache and the trained family (what a re-run reuses)."""
    keys = ("model", "n_train", "hook", "seed", "sizes", "k", "batch_size", "lr",
            "train_tokens", "eval_every_tokens", "plateau_window", "plateau_eps")  # fmt: skip
    return {key: getattr(config, key) for key in keys}


def family_config(config: DemoConfig) -> Any:
    """The :class:`~prisma_mm.analysis.families.FamilyConfig` of the demo's BatchTopK family."""
    from prisma_mm.analysis.families import FamilyConfig

    return FamilyConfig(
        cache_dir=Path(config.out) / "cache",
        out=Path(config.out) / "family",
        hook=config.hook,
        architecture="batchtopk",
        sizes=list(config.sizes),
        k=config.k,
        batch_size=config.batch_size,
        lr=config.lr,
        eval_every_tokens=config.eval_every_tokens,
        max_tokens=config.train_tokens,
        plateau_window=config.plateau_window,
        plateau_rel_eps=config.plateau_eps,
        seed=config.seed,
        progress=config.progress,
    )


def check_config(config: DemoConfig) -> None:
    """Refuse, before any work, settings that cannot run, and an ``out`` that is a file or
    holds a demo run made with other settings (a re-run reuses its cache and SAEs)."""
    if config.n_train < 100 or config.n_eval < 10:
        raise PrismaError(
            f"demo needs --n-train >= 100 and --n-eval >= 10; got {config.n_train} and "
            f"{config.n_eval}"
        )
    need = max(config.batch_size, config.eval_every_tokens)
    if config.train_tokens < need:
        raise PrismaError(
            f"demo needs --train-tokens >= {need} (one evaluation interval: the plateau "
            f"criterion needs evaluations), got {config.train_tokens}"
        )
    sizes = sorted(int(s) for s in config.sizes)
    if len(set(sizes)) < 3 or sizes[0] < config.k:
        raise PrismaError(
            f"--sizes {config.sizes}: the demo's family needs at least 3 distinct sizes, each "
            f">= k = {config.k}"
        )
    if config.seed < 0:
        raise PrismaError(f"--seed {config.seed}: use a seed >= 0")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PrismaError(f"--out {str(out)!r} is a file: give a directory for the demo's outputs")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PrismaError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a folder")
            break
    recorded = out / RUN_FILE
    if not recorded.is_file():
        return
    try:
        earlier = json.loads(recorded.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        earlier = None
    if not isinstance(earlier, dict):
        raise PrismaError(f"{recorded} is damaged: delete {str(out)!r} or use another --out")
    now = _run_settings(config)
    changed = [key for key in now if earlier.get(key) != now[key]]
    if changed:
        key = changed[0]
        raise PrismaError(
            f"--out {str(out)!r} holds a demo run with other settings ({key} {earlier.get(key)} "
            f"there, {now[key]} now): use another --out or delete it"
        )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage of the demo; returns (and writes) the summary."""
    import prisma_mm
    from prisma_mm.analysis.cli import _jsonable
    from prisma_mm.analysis.families import (
        family_report,
        toy_held_out,
        train_family,
        write_family_report,
    )
    from prisma_mm.cache import read_manifest, write_cache
    from prisma_mm.data.toyworld import ToyWorld

    started = time.perf_counter()
    check_config(config)
    torch.manual_seed(config.seed)
    model = prisma_mm.load_model(config.model)
    model.hook_point(config.hook)  # an unknown hook fails here, before anything is written
    family = family_config(config)

    print(f"[1/4] caching {config.model} {config.hook} over {config.n_train} toy-world images")
    cache_dir = family.cache_dir
    write_cache(  # checks the hook (and makes the folders) before it writes anything
        model,
        IndexedToyWorld(ToyWorld(config.n_train, seed=config.seed)),
        cache_dir,
        hooks=[config.hook],
        batch_size=100,
        shard_size=1000,
        progress=config.progress,
    )
    # recorded once the cache exists, so that a refused first run does not bar the next one
    (config.out / RUN_FILE).write_text(json.dumps(_run_settings(config), indent=1))

    names = ", ".join(family.member_name(n) for n in family.member_sizes)
    print(f"[2/4] training the BatchTopK family {names}, each until its FVU plateaus")
    members = train_family(family)

    print(f"[3/4] the family report on {config.n_eval} held-out images")
    data = toy_held_out(model, config.hook, config.n_eval, seed=config.seed, start=config.n_train)
    # mean ablation sets the layer to its mean over the training cache, as `prisma-mm eval` does
    stats = read_manifest(cache_dir)["stats"][config.hook]
    report = family_report(
        members,
        held_out=data,
        model=model,
        hook=config.hook,
        criterion=family.criterion,
        stitch_points=config.stitch_points,
        meta_steps=config.meta_steps,
        seed=config.seed,
        out=family.out,
        progress=config.progress,
        means={config.hook: torch.tensor(stats["mean"], dtype=torch.float64)},
    )
    report["settings"] = {**family.settings(), "sizes": family.member_sizes}
    write_family_report(report, family.out)
    saes = {row["name"]: row for row in report["members"]}
    accuracy = {
        "clean_accuracy": report["clean_accuracy"],
        "mean_ablated_accuracy": report["mean_ablated_accuracy"],
    }
    summary: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "model": accuracy,
        "criterion": report["criterion_text"],
        "shared_data_order": report["shared_data_order"],
        "saes": saes,
        "pairs": report["pairs"],
        "meta_sae": report["meta_sae"],
        "family_report": str(family.out / "family_report.json"),
    }

    if config.browser:
        print(f"[3b] indexing {members[-1].name}'s latents and writing its feature browser")
        summary["browser"] = browser_stage(config, members[-1], report, family.out)

    print("[4/4] writing the summary")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (config.out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    text = summary_markdown(summary, report)
    (config.out / "summary.md").write_text(text)
    print(text)
    if "browser" in summary:
        print(f"feature browser: open {summary['browser']['index_html']} in a web browser")
    return summary


def browser_stage(
    config: DemoConfig, member: Any, report: dict[str, Any], family_dir: Path
) -> dict[str, Any]:
    """The feature index of the family's largest ``member`` over the training cache (beside
    its dictionary) and its offline browser in ``out/browser``: per latent its stitching class
    against the next smaller member (the family report's last pair) and, for a novel latent,
    the ground-truth label it detects (value or conjunction) and whether the smaller member
    had a latent for it; its meta-SAE decomposition; the factor value it detects best."""
    from prisma_mm.data.toyworld import ToyWorld
    from prisma_mm.viz.browser import (
        BrowserExtras,
        CacheSamples,
        build_browser,
        read_ground_truth,
        read_meta_sae,
        read_novel_labels,
        read_stitching,
    )
    from prisma_mm.viz.index import build_index

    cache_dir = Path(config.out) / "cache"
    sae = member.load()
    index = build_index(sae, cache_dir, member.path / "index", progress=config.progress)
    n = index.n_latents
    pair = report["pairs"][-1]  # the largest member is the larger SAE of the last pair
    stitching = read_stitching(pair["stitch_json"], n)
    novel = read_novel_labels(family_dir / "family_report.json", member.name, n)
    stitching = dataclasses.replace(stitching, other=pair["small"], **novel)
    extras = BrowserExtras(
        stitching=stitching,
        meta_sae=read_meta_sae(family_dir / "meta_sae", n),
        ground_truth=read_ground_truth(report["members"][-1]["ground_truth_json"], n),
    )
    world = IndexedToyWorld(ToyWorld(config.n_train, seed=config.seed))
    html = build_browser(
        index,
        config.out / "browser",
        source=CacheSamples(index, sae, cache_dir, dataset=world),
        extras=extras,
        top_images=config.top_images,
        interval_images=config.interval_images,
        title=f"prisma-mm demo · {member.name} on toyvit {config.hook}",
        progress=config.progress,
    )
    return {
        "sae": member.name,
        "index": str(member.path / "index"),
        "index_html": str(html),
        "n_latents": n,
        "latents_never_fired": int((index.freq_token == 0).sum()),
    }


def summary_markdown(summary: dict[str, Any], report: dict[str, Any]) -> str:
    """The demo's results as Markdown: toyvit's accuracy, the family report (its table, one
    paragraph per pair, the meta-SAE) and each member's ground-truth score."""
    from prisma_mm.analysis.families import family_markdown

    model = summary["model"]
    scores = ", ".join(
        f"{name} {row['ground_truth']['score']:.3f}" for name, row in summary["saes"].items()
    )
    lines = [
        f"toyvit accuracy: clean {model['clean_accuracy']:.3f}, "
        f"mean-ablated {model['mean_ablated_accuracy']:.3f} "
        f"(on {summary['config']['n_eval']} held-out images)",
        f"demo wall time: {summary['seconds']:.0f} s",
        "",
        family_markdown(report).rstrip("\n"),
        "",
        f"Ground-truth score per member (docs/toyworld.md): {scores}.",
    ]
    return "\n".join(lines) + "\n"


def add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="run the whole toolkit on the built-in toy world")
    defaults = DemoConfig()
    parser.add_argument("--out", type=Path, default=defaults.out, help="output directory")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="training images")
    parser.add_argument("--n-eval", type=int, default=defaults.n_eval, help="held-out images")
    parser.add_argument(
        "--train-tokens",
        type=int,
        default=defaults.train_tokens,
        help="each family member's token budget if its FVU has not plateaued by then",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=defaults.sizes,
        help="the family's numbers of latents (at least 3)",
    )
    parser.add_argument("--hook", default=defaults.hook)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.set_defaults(handler=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    run_demo(
        DemoConfig(
            out=args.out,
            n_train=args.n_train,
            n_eval=args.n_eval,
            train_tokens=args.train_tokens,
            sizes=list(args.sizes),
            hook=args.hook,
            seed=args.seed,
        )
    )
    return 0
