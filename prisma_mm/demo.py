"""``prisma-mm demo``: the whole toolkit on the built-in toy world, no download needed.

Renders the toy world, caches ``toyvit`` activations at a middle layer, trains SAEs through
the same Lightning code as ``prisma-mm train``, evaluates them (FVU, L0, dead fraction, the
model's accuracy with each SAE spliced in, ground-truth recovery), compares them (stitching a
small SAE into the large one, a meta-SAE of the large one) and writes everything to
``./prisma-demo/`` with a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_mm.errors import PrismaError


@dataclass
class DemoConfig:
    """Sizes of the demo run; the defaults take a few minutes on 2 CPU cores."""

    out: Path = Path("prisma-demo")
    model: str = "toyvit"
    n_train: int = 4000
    n_eval: int = 400
    hook: str = "blocks.3.hook_resid_post"
    seed: int = 0
    train_tokens: int = 300_000
    batch_size: int = 1024
    n_latents: int = 1536
    small_latents: int = 384
    k: int = 16
    meta_steps: int = 1000
    stitch_points: int = 24
    browser: bool = True  # index the large TopK SAE and write its feature browser
    top_images: int = 8  # browser thumbnails per latent: top samples ...
    interval_images: int = 2  # ... and samples per interval bin
    progress: bool = True
    sae_names: list[str] = field(default_factory=lambda: ["topk", "matryoshka", "topk-small"])


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


def _recipes(config: DemoConfig) -> dict[str, list[str]]:
    """Command-line overrides of the shipped toyvit recipes for each demo SAE."""
    large = [f"--model.dictionary.init_args.n_latents={config.n_latents}"]
    return {
        "topk": ["--config", "toyvit-topk", *large],
        "matryoshka": ["--config", "toyvit-matryoshka", *large],
        "topk-small": [
            "--config",
            "toyvit-topk",
            f"--model.dictionary.init_args.n_latents={config.small_latents}",
        ],
    }


def train_sae(config: DemoConfig, name: str, cache_dir: Path) -> Path:
    """Train one demo SAE through ``prisma-mm train fit``; returns the saved dictionary dir."""
    from prisma_mm.train.cli import train_cli

    run_root = config.out / "runs"
    saved = run_root / name / "dictionary"
    if (saved / "weights.safetensors").is_file():
        return saved  # finished in an earlier run of the demo
    steps = max(1, config.train_tokens // config.batch_size)
    argv = [
        "fit",
        *_recipes(config)[name],
        f"--model.dictionary.init_args.k={config.k}",
        f"--model.total_tokens={steps * config.batch_size}",
        f"--data.cache_dir={cache_dir}",
        f"--data.hooks={config.hook}",
        f"--data.batch_size={config.batch_size}",
        f"--data.seed={config.seed}",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={run_root}",
        f"--trainer.enable_progress_bar={str(config.progress).lower()}",
        f"--run_name={name}",
    ]
    cli = train_cli(argv)
    produced = Path(cli.trainer.log_dir) / "dictionary"
    saved.parent.mkdir(parents=True, exist_ok=True)
    if saved.exists():
        raise PrismaError(f"{saved} exists but holds no weights: delete it and run the demo again")
    produced.rename(saved)
    return saved


RUN_FILE = "demo_run.json"


def _run_settings(config: DemoConfig) -> dict[str, Any]:
    """The settings that decide the cache and the trained SAEs (what a re-run reuses)."""
    keys = ("model", "n_train", "hook", "seed", "train_tokens", "batch_size", "n_latents",
            "small_latents", "k")  # fmt: skip
    return {key: getattr(config, key) for key in keys}


def check_config(config: DemoConfig) -> None:
    """Refuse, before any work, settings that cannot run, and an ``out`` that is a file or
    holds a demo run made with other settings (a re-run reuses its cache and SAEs)."""
    if config.n_train < 100 or config.n_eval < 10 or config.train_tokens < 1000:
        raise PrismaError(
            f"demo needs --n-train >= 100, --n-eval >= 10 and --train-tokens >= 1000; got "
            f"{config.n_train}, {config.n_eval} and {config.train_tokens}"
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


@dataclass
class HeldOut:
    """The held-out images as the analysis functions take them: ``batches`` of
    ``(images [B, 3, H, W] preprocessed, multi-hot labels [B, n_values])``, the activations at
    the hook ``acts [n, tokens, d]`` and the patch labels ``[n, n_patches, n_values]``."""

    batches: list[tuple[Tensor, Tensor]]
    acts: Tensor
    patch_labels: Tensor

    @property
    def image_labels(self) -> Tensor:
        """``[n, n_values]`` float multi-hot labels of the images."""
        return torch.cat([labels for _, labels in self.batches]).float()


@torch.no_grad()
def held_out(model: Any, world: Any, hook: str, batch: int = 100) -> HeldOut:
    """Preprocess ``world`` once and read the activations at ``hook`` (one pass)."""
    from prisma_mm.data.toyworld import collate

    batches, acts, patch_labels = [], [], []
    for start in range(0, len(world), batch):
        images, labels = collate([world[i] for i in range(start, min(start + batch, len(world)))])
        x = model.preprocess(list(images.numpy()))
        _, cache = model.run_with_cache(x, [hook])
        batches.append((x, labels["multi_hot"]))
        acts.append(cache[hook].float())
        patch_labels.append(labels["patches"].flatten(1, 2))
    return HeldOut(batches, torch.cat(acts), torch.cat(patch_labels).float())


def evaluate_sae(
    model: Any,
    sae: Any,
    data: HeldOut,
    hook: str,
    means: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Any], Any, Any]:
    """Reconstruction metrics (analysis.metrics), spliced-in accuracy (analysis.spliced, on
    toyvit's multi-label task) and ground-truth recovery of one SAE on the held-out images.
    Returns the summary row, the spliced result (with ``means`` ({hook: [d]}), also the
    mean-ablated run) and the ground-truth report."""
    from prisma_mm.analysis.ground_truth import score_ground_truth
    from prisma_mm.analysis.metrics import evaluate
    from prisma_mm.analysis.spliced import spliced_eval
    from prisma_mm.data.toyworld import VALUE_NAMES

    n_images, n_tokens, d = data.acts.shape
    flat = data.acts.reshape(-1, d)
    metrics = evaluate(sae, [flat], progress=False)
    spliced = spliced_eval(
        model,
        sae,
        data.batches,
        hooks=[hook],
        task="multilabel",
        means=means,
        modes=("spliced", "with_error") + (("mean",) if means is not None else ()),
        progress=False,
    )
    with torch.no_grad():
        codes = sae.encode(flat).reshape(n_images, n_tokens, -1)
    report = score_ground_truth(
        VALUE_NAMES,
        patch_codes=codes[:, model.layout.n_prefix :],
        patch_labels=data.patch_labels,
        image_labels=data.image_labels,
    )
    row = {
        "n_latents": metrics.n_latents,
        "fvu": metrics.fvu,
        "mse": metrics.mse,
        "l0": metrics.l0,
        "dead_fraction": metrics.dead_fraction,
        "spliced_accuracy": spliced.modes["spliced"].accuracy,
        "splice_identity_error": spliced.max_abs_error_with_error,
        "ground_truth": report.summary(),
    }
    return row, spliced, report


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage of the demo; returns (and writes) the summary."""
    import prisma_mm
    from prisma_mm.cache import read_manifest, write_cache
    from prisma_mm.data.toyworld import VALUE_NAMES, ToyWorld
    from prisma_mm.sae import load as load_dictionary

    started = time.perf_counter()
    check_config(config)
    torch.manual_seed(config.seed)
    model = prisma_mm.load_model(config.model)
    model.hook_point(config.hook)  # an unknown hook fails here, before anything is written
    grid = model.layout.grid[1]

    print(f"[1/4] caching {config.model} {config.hook} over {config.n_train} toy-world images")
    cache_dir = config.out / "cache"
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

    print(f"[2/4] training {', '.join(config.sae_names)} SAEs (prisma-mm train)")
    saved = {name: train_sae(config, name, cache_dir) for name in config.sae_names}

    print(f"[3/4] evaluating on {config.n_eval} held-out images")
    eval_world = ToyWorld(config.n_eval, seed=config.seed, start=config.n_train, patch_grid=grid)
    data = held_out(model, eval_world, config.hook)
    d = data.acts.shape[-1]
    # mean ablation sets the layer to its mean over the training cache, as `prisma-mm eval` does
    stats = read_manifest(cache_dir)["stats"][config.hook]
    means = {config.hook: torch.tensor(stats["mean"], dtype=torch.float64)}
    results: dict[str, Any] = {}
    accuracy: dict[str, float] = {}
    for name, path in saved.items():
        sae = load_dictionary(path).eval()
        # the clean and mean-ablated runs do not depend on the SAE: measured with the first
        results[name], spliced, report = evaluate_sae(
            model, sae, data, config.hook, None if accuracy else means
        )
        results[name]["path"] = str(path)
        # per-value best latents, for the browser's ground-truth column
        (config.out / f"ground_truth_{name}.json").write_text(json.dumps(report.to_dict()))
        if not accuracy:
            accuracy = {
                "clean_accuracy": spliced.modes["clean"].accuracy,
                "mean_ablated_accuracy": spliced.modes["mean"].accuracy,
            }
    summary: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "model": accuracy,
        "saes": results,
    }
    if "topk" in saved and "topk-small" in saved:
        print("[3b] stitching topk-small into topk, and a meta-SAE of topk")
        small, large = load_dictionary(saved["topk-small"]), load_dictionary(saved["topk"])
        summary["stitching"] = stitching_stage(config, small, large, data.acts.reshape(-1, d))
        patch_flat = data.acts[:, model.layout.n_prefix :].reshape(-1, d)
        summary["meta_sae"] = meta_sae_stage(
            config, large, patch_flat, data.patch_labels.reshape(-1, len(VALUE_NAMES))
        )

    if config.browser and "topk" in saved:
        print("[3c] indexing the TopK SAE's latents and writing its feature browser")
        summary["browser"] = browser_stage(config, saved["topk"], cache_dir, "stitching" in summary)

    print("[4/4] writing the summary")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = summary_table(summary)
    (config.out / "summary.md").write_text(table + "\n")
    print(table)
    if "browser" in summary:
        print(f"feature browser: open {summary['browser']['index_html']} in a web browser")
    return summary


def browser_stage(
    config: DemoConfig, sae_path: Path, cache_dir: Path, with_stitching: bool
) -> dict[str, Any]:
    """The feature index of the large TopK SAE over the training cache (beside the SAE), and
    its offline browser in ``out/browser`` with stitching classes, meta-SAE membership and
    the best ground-truth factor of each latent."""
    from prisma_mm.data.toyworld import ToyWorld
    from prisma_mm.sae import load as load_dictionary
    from prisma_mm.viz.browser import (
        BrowserExtras,
        CacheSamples,
        build_browser,
        read_ground_truth,
        read_meta_sae,
        read_stitching,
    )
    from prisma_mm.viz.index import build_index

    sae = load_dictionary(sae_path).eval()
    index = build_index(sae, cache_dir, sae_path / "index", progress=config.progress)
    n = index.n_latents
    extras = BrowserExtras(
        stitching=read_stitching(config.out / "stitching.json", n) if with_stitching else None,
        meta_sae=read_meta_sae(config.out / "meta_sae", n) if with_stitching else None,
        ground_truth=read_ground_truth(config.out / "ground_truth_topk.json", n),
    )
    world = IndexedToyWorld(ToyWorld(config.n_train, seed=config.seed))
    html = build_browser(
        index,
        config.out / "browser",
        source=CacheSamples(index, sae, cache_dir, dataset=world),
        extras=extras,
        top_images=config.top_images,
        interval_images=config.interval_images,
        title=f"prisma-mm demo · TopK SAE ({n} latents) on toyvit {config.hook}",
        progress=config.progress,
    )
    return {
        "index": str(sae_path / "index"),
        "index_html": str(html),
        "n_latents": n,
        "latents_never_fired": int((index.freq_token == 0).sum()),
    }


def stitching_stage(config: DemoConfig, small: Any, large: Any, rows: Tensor) -> dict[str, Any]:
    """Stitch the small TopK SAE into the large one on the held-out rows ``[n, d]`` (all of
    them: the held-out images are already a uniform sample); plot MSE against size."""
    from prisma_mm.analysis.stitching import plot_stitching, stitch

    result = stitch(small, large, rows, max_points=config.stitch_points, progress=config.progress)
    plot_stitching(result, config.out / "stitching.png")
    (config.out / "stitching.json").write_text(json.dumps(result.to_dict(per_latent=True)))
    classes = result.classes
    return {
        **classes.counts(),
        "test_proxy_agreement": classes.agreement,
        "monotone": bool(result.monotone),
        "n_increases": int(result.n_increases),
        "mse_small": float(classes.mse_small),
        "mse_large": float(result.mse_large),
        "curve_mse_first": float(result.curve[0]["mse"]),
        "curve_mse_last": float(result.curve[-1]["mse"]),
        "n_steps": len(result.steps),
        "points": len(result.curve),
        "n_tokens": int(classes.n_tokens),
    }


def factor_of_latents(codes: Tensor, labels: Tensor, min_auroc: float = 0.75) -> list[str | None]:
    """Each latent's factor (shape, colour …): that of the value it detects best by AUROC
    over patches, or None when no value reaches ``min_auroc``."""
    from prisma_mm.analysis.ground_truth import auroc
    from prisma_mm.data.toyworld import VALUE_NAMES

    scores = auroc(codes, labels)  # [n_latents, n_values]
    best, value = scores.max(dim=1)
    return [
        VALUE_NAMES[v].split("=")[0] if b >= min_auroc else None
        for b, v in zip(best.tolist(), value.tolist())
    ]


def meta_purity(members: list[list[int]], factors: list[str | None]) -> float:
    """Mean over meta-latents (with >= 2 members that have a factor) of the share of those
    members whose factor is the meta-latent's most common one."""
    from collections import Counter

    shares = []
    for group in members:
        named = [factors[i] for i in group if factors[i] is not None]
        if len(named) >= 2:
            shares.append(Counter(named).most_common(1)[0][1] / len(named))
    return float(np.mean(shares)) if shares else float("nan")


def meta_sae_stage(config: DemoConfig, large: Any, rows: Tensor, labels: Tensor) -> dict[str, Any]:
    """A meta-SAE of the large SAE, and whether its meta-latents group latents by factor
    (purity against the same latents with their factors shuffled)."""
    from prisma_mm.analysis.meta_sae import train_meta_sae

    result = train_meta_sae(
        large, k=4, steps=config.meta_steps, seed=config.seed, progress=config.progress
    )
    result.save(config.out / "meta_sae")
    with torch.no_grad():
        codes = large.encode(rows)
    factors = factor_of_latents(codes, labels)
    members = [[i for i, _ in result.members(m)] for m in range(result.n_meta)]
    purity = meta_purity(members, factors)
    rng = np.random.default_rng(config.seed)
    shuffled = [
        meta_purity(members, list(rng.permutation(np.array(factors, dtype=object))))
        for _ in range(20)
    ]
    return {
        "n_meta": int(result.n_meta),
        "fvu": float(result.fvu),
        "latents_with_factor": int(sum(f is not None for f in factors)),
        "factor_purity": purity,
        "shuffled_purity": float(np.mean(shuffled)),
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's results as a Markdown table."""
    model = summary["model"]
    lines = [
        f"toyvit accuracy: clean {model['clean_accuracy']:.3f}, "
        f"mean-ablated {model['mean_ablated_accuracy']:.3f}",
        "",
        "| SAE | latents | FVU | L0 | dead | spliced acc. | GT score |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["saes"].items():
        lines.append(
            f"| {name} | {r['n_latents']} | {r['fvu']:.3f} | {r['l0']:.1f} | "
            f"{r['dead_fraction']:.3f} | {r['spliced_accuracy']:.3f} | "
            f"{r['ground_truth']['score']:.3f} |"
        )
    if "stitching" in summary:
        st = summary["stitching"]
        lines += [
            "",
            f"stitching topk-small -> topk: MSE {st['mse_small']:.4f} -> {st['mse_large']:.4f} "
            f"over {st['points']} points, monotone: {st['monotone']} ({st['n_increases']} "
            f"increases); latents fired on {st['n_tokens']} held-out tokens: "
            f"{st['n_fired_small']} / {st['n_small']} (small), {st['n_fired_large']} / "
            f"{st['n_large']} (large); the large SAE's latents by the exact test: "
            f"{st['n_novel_test']} novel, {st['n_reconstruction_test']} reconstruction, "
            f"{st['n_inactive']} inactive; {st['n_novel_proxy']} novel by the cosine proxy "
            f"(agreement {st['test_proxy_agreement']:.2f} on the active ones)",
        ]
    if "meta_sae" in summary:
        ms = summary["meta_sae"]
        lines.append(
            f"meta-SAE of topk: {ms['n_meta']} meta-latents, FVU {ms['fvu']:.3f}; factor purity "
            f"{ms['factor_purity']:.3f} vs {ms['shuffled_purity']:.3f} with factors shuffled"
        )
    return "\n".join(lines)


def add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="run the whole toolkit on the built-in toy world")
    defaults = DemoConfig()
    parser.add_argument("--out", type=Path, default=defaults.out, help="output directory")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="training images")
    parser.add_argument("--n-eval", type=int, default=defaults.n_eval, help="held-out images")
    parser.add_argument("--train-tokens", type=int, default=defaults.train_tokens)
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
            hook=args.hook,
            seed=args.seed,
        )
    )
    return 0
