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
    progress: bool = True
    sae_names: list[str] = field(default_factory=lambda: ["topk", "matryoshka", "topk-small"])


class IndexedToyWorld(torch.utils.data.Dataset):
    """Toy-world images labelled by their index (the key back to every ground-truth label)."""

    def __init__(self, world: Any) -> None:
        self.world = world

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image, labels = self.world[i]
        return image, int(labels["index"])


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


@torch.no_grad()
def eval_activations(model: Any, world: Any, hook: str, batch: int = 100) -> dict[str, Tensor]:
    """Activations at ``hook`` ``[n, tokens, d]``, logits ``[n, n_values]`` and labels."""
    from prisma_mm.data.toyworld import collate

    acts, logits, image_labels, patch_labels = [], [], [], []
    for start in range(0, len(world), batch):
        images, labels = collate([world[i] for i in range(start, min(start + batch, len(world)))])
        x = model.preprocess(list(images.numpy()))
        out, cache = model.run_with_cache(x, names_filter=[hook])
        acts.append(cache[hook].float())
        logits.append(out.float())
        image_labels.append(labels["multi_hot"])
        patch_labels.append(labels["patches"])
    return {
        "acts": torch.cat(acts),
        "logits": torch.cat(logits),
        "image_labels": torch.cat(image_labels).float(),
        "patch_labels": torch.cat(patch_labels).float(),
    }


def label_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Mean over images and factor values of ``(sigmoid(logit) > 0.5) == label``."""
    return float(((logits > 0) == (labels > 0.5)).float().mean())


@torch.no_grad()
def spliced_logits(model: Any, world: Any, hook: str, replace: Any, batch: int = 100) -> Tensor:
    """Model logits with ``replace(act [b, tokens, d]) -> act`` applied at ``hook``."""
    from prisma_mm.data.toyworld import collate

    logits = []
    for start in range(0, len(world), batch):
        images, _ = collate([world[i] for i in range(start, min(start + batch, len(world)))])
        with model.hooks({hook: lambda act, _hook: replace(act)}):
            logits.append(model(model.preprocess(list(images.numpy()))).float())
    return torch.cat(logits)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage of the demo; returns (and writes) the summary."""
    import prisma_mm
    from prisma_mm.analysis.ground_truth import score_ground_truth
    from prisma_mm.cache import write_cache
    from prisma_mm.data.toyworld import VALUE_NAMES, ToyWorld
    from prisma_mm.sae import load as load_dictionary

    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = prisma_mm.load_model(config.model)
    grid = model.layout.grid[1]

    print(f"[1/4] caching {config.model} {config.hook} over {config.n_train} toy-world images")
    cache_dir = config.out / "cache"
    write_cache(
        model,
        IndexedToyWorld(ToyWorld(config.n_train, seed=config.seed)),
        cache_dir,
        hooks=[config.hook],
        batch_size=100,
        shard_size=1000,
        progress=config.progress,
    )

    print(f"[2/4] training {', '.join(config.sae_names)} SAEs (prisma-mm train)")
    saved = {name: train_sae(config, name, cache_dir) for name in config.sae_names}

    print(f"[3/4] evaluating on {config.n_eval} held-out images")
    eval_world = ToyWorld(config.n_eval, seed=config.seed, start=config.n_train, patch_grid=grid)
    data = eval_activations(model, eval_world, config.hook)
    acts = data["acts"]
    n_images, n_tokens, d = acts.shape
    flat = acts.reshape(-1, d)
    total_var = float(((flat - flat.mean(0)) ** 2).sum())
    clean_accuracy = label_accuracy(data["logits"], data["image_labels"])
    mean_act = flat.mean(0)
    ablated_accuracy = label_accuracy(
        spliced_logits(model, eval_world, config.hook, lambda a: mean_act.expand_as(a).to(a.dtype)),
        data["image_labels"],
    )
    results: dict[str, Any] = {}
    for name, path in saved.items():
        sae = load_dictionary(path).eval()
        with torch.no_grad():
            code = sae.encode(flat)
            recon = sae.decode(code)
        l0 = float((code != 0).float().sum(-1).mean())
        fired = (code != 0).any(0)
        accuracy = label_accuracy(
            spliced_logits(
                model,
                eval_world,
                config.hook,
                lambda a, s=sae: (
                    s.decode(s.encode(a.reshape(-1, d).float())).reshape(a.shape).to(a.dtype)
                ),
            ),
            data["image_labels"],
        )
        patch_code = code.reshape(n_images, n_tokens, -1)[:, model.layout.n_prefix :]
        report = score_ground_truth(
            VALUE_NAMES,
            patch_codes=patch_code,
            patch_labels=data["patch_labels"].reshape(n_images, -1, len(VALUE_NAMES)),
            image_labels=data["image_labels"],
        )
        results[name] = {
            "n_latents": int(code.shape[1]),
            "fvu": float(((flat - recon) ** 2).sum()) / total_var,
            "l0": l0,
            "dead_fraction": float(1 - fired.float().mean()),
            "spliced_accuracy": accuracy,
            "ground_truth": report.summary(),
            "path": str(path),
        }
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "model": {"clean_accuracy": clean_accuracy, "mean_ablated_accuracy": ablated_accuracy},
        "saes": results,
    }
    if "topk" in saved and "topk-small" in saved:
        print("[3b] stitching topk-small into topk, and a meta-SAE of topk")
        small, large = load_dictionary(saved["topk-small"]), load_dictionary(saved["topk"])
        summary["stitching"] = stitching_stage(config, small, large, flat)
        patch_flat = acts[:, model.layout.n_prefix :].reshape(-1, d)
        summary["meta_sae"] = meta_sae_stage(
            config, large, patch_flat, data["patch_labels"].reshape(-1, len(VALUE_NAMES))
        )

    print("[4/4] writing the summary")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = summary_table(summary)
    (config.out / "summary.md").write_text(table + "\n")
    print(table)
    return summary


def stitching_stage(config: DemoConfig, small: Any, large: Any, rows: Tensor) -> dict[str, Any]:
    """Stitch the small TopK SAE into the large one; plot MSE against size."""
    from prisma_mm.analysis.stitching import plot_stitching, stitch

    sample = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:8192]]
    result = stitch(small, large, sample, max_points=config.stitch_points)
    plot_stitching(result, config.out / "stitching.png")
    (config.out / "stitching.json").write_text(
        json.dumps(result.to_dict(per_latent=False), indent=1)
    )
    classes = result.classes
    return {
        "n_novel_test": int(classes.novel_test.sum()),
        "n_novel_proxy": int(classes.novel_proxy.sum()),
        "test_proxy_agreement": float((classes.novel_test == classes.novel_proxy).mean()),
        "monotone": bool(result.monotone),
        "n_increases": int(result.n_increases),
        "mse_small": float(classes.mse_small),
        "mse_large": float(result.mse_large),
        "points": len(result.curve),
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
            f"over {st['points']} points, monotone: {st['monotone']} ({st['n_increases']} increases); "
            f"novel latents: {st['n_novel_test']} by the exact test, {st['n_novel_proxy']} by the "
            f"cosine proxy (agreement {st['test_proxy_agreement']:.2f})",
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
    if args.n_train < 100 or args.n_eval < 10 or args.train_tokens < 1000:
        raise PrismaError("demo needs --n-train >= 100, --n-eval >= 10 and --train-tokens >= 1000")
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
