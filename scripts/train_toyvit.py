"""Train the toy-world ViT (`toyvit`): a small timm ViT predicting every toy-world factor value.

Multi-label (one sigmoid per value of ``prisma_mm.data.toyworld.VALUE_NAMES``), BCE loss, from
scratch, reproducibly from ``--seed`` on CPU. The training set is rendered once into memory
(images ``0 .. n_train-1`` of the world of ``--seed``); the held-out set is the next
``--n-val`` images of the same world, which training never sees.

The image labels are predicted by timm's own head from the maximum of the normalised patch
tokens (``--pool max``). Two choices make a from-scratch ViT learn shapes and positions within
a CPU budget, without changing the architecture (the checkpoint is a plain timm ViT): the
same head also predicts each patch's labels from its patch token (dense supervision from the
toy world's exact patch labels, weighted by ``--patch-loss``), and the learned position
embedding starts from 2-D sin-cos values instead of noise. With ``--hflip`` each sample is
mirrored left-right with probability 1/2: the mirror of a toy-world scene is a scene of the
same world (up to the checker texture's phase), with left and right positions swapped and
every other label kept (all shapes are mirror-symmetric when upright, and a mirrored turn is
still a turn; the gradient background runs top to bottom). ``--init`` continues from earlier
weights of the same architecture.

The defaults are the settings of the first of the three runs that made the shipped weights
(``assets/toyvit.json`` records each run of the chain; ``docs/toyworld.md`` gives the three
commands). ``--stop-after N`` ends a run after N steps of its ``--steps`` schedule, and so does
an interrupt (Ctrl-C, ``kill -INT``): the weights are saved as they are, with the steps done.

    python scripts/train_toyvit.py                      # writes assets/toyvit.safetensors + .json

Writes the weights as safetensors (float16 when larger than 5 MB) and a JSON record beside them
with the seed, steps, hyper-parameters, timing and held-out scores of the saved weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import time
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from tqdm.auto import tqdm

from prisma_mm.analysis.ground_truth import average_precision
from prisma_mm.data.toyworld import (
    FACTORS,
    POSITIONS,
    VALUE_FACTORS,
    VALUE_INDEX,
    VALUE_NAMES,
    render_arrays,
)

ARCH = "vit_tiny_patch16_224"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
FP16_ABOVE_BYTES = 5 * 2**20
PATCH = 8


def model_kwargs(size: int, depth: int, width: int, heads: int, pool: str) -> dict:
    """The timm ``create_model`` keyword arguments of the toy ViT (also written to the card)."""
    return {
        "img_size": size,
        "patch_size": PATCH,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "num_classes": len(VALUE_NAMES),
        "global_pool": pool,
    }


def patch_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The head applied to each patch token: ``[B, tokens, width]`` -> ``[B, patches, V]``.

    ``tokens`` from ``forward_features`` (final norm applied for CLS pooling; for pooled heads
    timm normalises after pooling, with ``fc_norm``, so it is applied here per patch).
    """
    return model.head(model.fc_norm(tokens[:, model.num_prefix_tokens :]))


def mirror_permutation() -> np.ndarray:
    """Label index of each value in the left-right mirror of a scene: ``[V]``.

    ``labels[..., perm]`` are the labels of the mirrored image: positions swap columns
    (``top_left`` <-> ``top_right`` ...), every other value stays.
    """
    perm = np.arange(len(VALUE_NAMES))
    for i, position in enumerate(POSITIONS):
        row, col = divmod(i, 3)
        mirrored = POSITIONS[3 * row + 2 - col]
        perm[VALUE_INDEX[f"position={position}"]] = VALUE_INDEX[f"position={mirrored}"]
    return perm


def mirror(
    images: np.ndarray, labels: np.ndarray, patches: np.ndarray, grid: int, flip: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror the samples where ``flip`` (bool ``[B]``) holds, labels included.

    ``images`` uint8 ``[B, H, W, 3]``, ``labels`` ``[B, V]``, ``patches`` ``[B, grid*grid, V]``
    (row-major patches); returns new arrays of the same shapes.
    """
    perm = mirror_permutation()
    images, labels, patches = images.copy(), labels.copy(), patches.copy()
    images[flip] = images[flip][:, :, ::-1]
    labels[flip] = labels[flip][:, perm]
    b, v = int(flip.sum()), len(VALUE_NAMES)
    patches[flip] = (
        patches[flip].reshape(b, grid, grid, v)[:, :, ::-1][..., perm].reshape(b, grid * grid, v)
    )
    return images, labels, patches


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, H, W]``."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores for uint8 images ``[n, H, W, 3]``: image ``[n, V]``, patch ``[n, P, V]``."""
    model.eval()
    image_scores, patch_scores = [], []
    for i in range(0, len(images), batch_size):
        tokens = model.forward_features(to_input(images[i : i + batch_size]))
        image_scores.append(model.forward_head(tokens).float().sigmoid())
        patch_scores.append(patch_logits(model, tokens).float().sigmoid())
    return torch.cat(image_scores), torch.cat(patch_scores)


def evaluate(
    scores: torch.Tensor, patch_scores: torch.Tensor, labels: np.ndarray, patch_labels: np.ndarray
) -> dict:
    """Held-out metrics per factor and overall from ``scores [n, V]`` and ``labels [n, V]``.

    Per factor: ``mean_ap`` (mean average precision over its values), ``value_accuracy`` (mean
    binary accuracy of its values at 0.5) and ``exact_accuracy`` (images whose whole set of
    values of that factor is predicted exactly).
    """
    y = torch.from_numpy(labels).double()
    pred = (scores >= 0.5).double()
    ap = average_precision(scores.double(), y)
    correct = pred == y
    per_factor = {}
    for factor in FACTORS:
        cols = [i for i, f in enumerate(VALUE_FACTORS) if f == factor]
        per_factor[factor] = {
            "mean_ap": float(ap[cols].nanmean()),
            "value_accuracy": float(correct[:, cols].double().mean()),
            "exact_accuracy": float(correct[:, cols].all(1).double().mean()),
        }
    extra = {}
    if patch_scores is not None:  # [n, P, V] against [n, rows, cols, V]
        patch_ap = average_precision(
            patch_scores.reshape(-1, len(VALUE_NAMES)).double(),
            torch.from_numpy(patch_labels.reshape(-1, len(VALUE_NAMES))).double(),
        )
        extra["patch_mean_ap"] = float(patch_ap.nanmean())
        extra["patch_per_factor_map"] = {
            f: float(patch_ap[[i for i, g in enumerate(VALUE_FACTORS) if g == f]].nanmean())
            for f in FACTORS
        }
    return {
        **extra,
        "mean_ap": float(ap.nanmean()),
        "value_accuracy": float(correct.double().mean()),
        "exact_accuracy_all_values": float(correct.all(1).double().mean()),
        "per_factor": per_factor,
        "per_value_ap": {name: float(a) for name, a in zip(VALUE_NAMES, ap)},
    }


def load_init(model: torch.nn.Module, path: Path, kwargs: dict) -> dict:
    """Load the weights at ``path`` (safetensors written by this script) into ``model``.

    Their recorded ``kwargs`` must equal ``kwargs``. Returns what the training record keeps
    of the start: the file's sha256 and, when a JSON record lies beside it, that record's
    steps, seed and held-out mean AP (so a chain of runs stays traceable)."""
    import hashlib

    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            recorded = json.loads((handle.metadata() or {}).get("kwargs", "null"))
    except (OSError, safetensors.SafetensorError, json.JSONDecodeError) as error:
        raise SystemExit(
            f"--init {path}: not readable as weights written by this script ({error}); give the "
            ".safetensors file of an earlier run"
        ) from None
    if recorded != kwargs:
        raise SystemExit(f"--init {path}: its architecture {recorded} is not {kwargs}")
    model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()})
    out = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    record = path.with_suffix(".json")
    if record.is_file():
        before = json.loads(record.read_text())
        out["record"] = {
            "seed": before.get("seed"),
            "steps": before.get("steps"),
            "n_train": before.get("n_train"),
            "init": before.get("init"),
            "heldout_mean_ap": (before.get("heldout_metrics") or {}).get("mean_ap"),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=30_000)
    p.add_argument("--n-val", type=int, default=1_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--pool", default="max", choices=["max", "token", "avg"], help="timm global_pool"
    )
    p.add_argument(
        "--factor-weight",
        action="append",
        default=[],
        metavar="FACTOR=W",
        help="loss weight of a factor's values (repeatable; default 1)",
    )
    p.add_argument("--patch-loss", type=float, default=1.0, help="weight of the per-patch BCE")
    p.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="mirror each sample left-right with probability 1/2 (labels mirrored with it)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="end after N steps, as an interrupt would (the lr schedule still spans --steps)",
    )
    p.add_argument(
        "--eval-every", type=int, default=0, help="steps between held-out checks (0: end only)"
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="SAFETENSORS",
        help="start from these weights (same architecture; e.g. the previous assets/toyvit)",
    )
    p.add_argument("--out", default="assets/toyvit.safetensors")
    args = p.parse_args(argv)
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        p.error(f"--stop-after {args.stop_after}: give a step count in 1..{args.steps} (--steps)")
    out = Path(args.out)
    if out.is_dir():
        p.error(f"--out {args.out}: is a folder; give the .safetensors file to write")
    try:  # an unwritable place fails now, not after training
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        p.error(f"--out {args.out}: cannot make its folder ({error.strerror})")
    if not os.access(out.parent, os.W_OK):
        p.error(f"--out {args.out}: cannot write into {out.parent}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    grid = args.size // PATCH
    kwargs = model_kwargs(args.size, args.depth, args.width, args.heads, args.pool)
    model = timm.create_model(ARCH, pretrained=False, **kwargs)
    init = None
    if args.init:
        init = load_init(model, Path(args.init), kwargs)
        seen = max((init.get("record") or {}).get("n_train") or 0, args.n_train)
        if seen > args.n_train:  # held-out images must be new to every run of the chain
            p.error(f"--n-train {args.n_train}: the --init run trained on images 0..{seen - 1}")
    else:
        with torch.no_grad():  # CLS position stays 0; patch positions start as 2-D sin-cos
            model.pos_embed[0, 1:] = build_sincos2d_pos_embed([grid, grid], args.width)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "pos_embed" not in n]
    no_decay = [
        p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "pos_embed" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    factor_weight = {f: 1.0 for f in FACTORS}
    for item in args.factor_weight:
        name, _, w = item.partition("=")
        if name not in FACTORS:
            p.error(f"--factor-weight {item!r}: unknown factor (choose from {', '.join(FACTORS)})")
        try:
            factor_weight[name] = float(w)
        except ValueError:
            p.error(f"--factor-weight {item!r}: give FACTOR=NUMBER, e.g. shape=4")
    value_weight = torch.tensor([factor_weight[f] for f in VALUE_FACTORS])
    value_weight = value_weight * len(VALUE_FACTORS) / value_weight.sum()  # mean weight 1
    # every argument is checked (the --init weights loaded) before the images are drawn
    t0 = time.time()
    train = render_arrays(args.n_train, seed=args.seed, size=args.size, start=0, patch_grid=grid)
    train_patches = train["patches"].reshape(args.n_train, grid * grid, len(VALUE_NAMES))
    val = render_arrays(
        args.n_val, seed=args.seed, size=args.size, start=args.n_train, patch_grid=grid
    )
    render_s = time.time() - t0
    warmup = max(1, int(args.warmup * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(args.n_train, generator=gen)
    cursor = 0
    history = []
    flip_rng = np.random.default_rng(args.seed)
    stop = {"asked": False}
    # an interrupt ends the run after the current step; the weights so far are saved
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(asked=True))
    steps_done = 0
    t1 = time.time()
    bar = tqdm(range(args.steps), desc="train toyvit", unit="step")
    for step in bar:
        if stop["asked"] or step == args.stop_after:
            why = "interrupted" if stop["asked"] else "--stop-after"
            tqdm.write(f"{why}: saving the weights after {steps_done} steps")
            break
        if cursor + args.batch_size > args.n_train:
            order = torch.randperm(args.n_train, generator=gen)
            cursor = 0
        idx = order[cursor : cursor + args.batch_size].numpy()
        cursor += args.batch_size
        model.train()
        images, labels, patches = train["images"][idx], train["labels"][idx], train_patches[idx]
        if args.hflip:
            flip = flip_rng.random(len(idx)) < 0.5
            images, labels, patches = mirror(images, labels, patches, grid, flip)
        x = to_input(images)
        y = torch.from_numpy(labels).float()
        tokens = model.forward_features(x)  # [B, 1 + grid*grid, width], final norm applied
        loss = F.binary_cross_entropy_with_logits(
            model.forward_head(tokens), y, weight=value_weight
        )
        if args.patch_loss:
            y_patch = torch.from_numpy(patches).float()
            loss = loss + args.patch_loss * F.binary_cross_entropy_with_logits(
                patch_logits(model, tokens), y_patch, weight=value_weight
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps_done = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate(*predict(model, val["images"]), val["labels"], val["patches"])
            history.append(
                {
                    "step": step + 1,
                    "loss": loss.item(),
                    "mean_ap": m["mean_ap"],
                    "per_factor_map": {f: v["mean_ap"] for f, v in m["per_factor"].items()},
                }
            )
            tqdm.write(
                f"  patch mAP {m['patch_mean_ap']:.4f} "
                + " ".join(f"{f}={v:.3f}" for f, v in m["patch_per_factor_map"].items())
            )
            tqdm.write(
                f"step {step + 1}: loss {loss.item():.4f} held-out mAP {m['mean_ap']:.4f} "
                + " ".join(f"{f}={v['mean_ap']:.3f}" for f, v in m["per_factor"].items())
            )
    signal.signal(signal.SIGINT, previous_handler)  # Ctrl-C works again while saving
    train_s = time.time() - t1

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    n_bytes = sum(v.numel() * v.element_size() for v in state.values())
    dtype = "float16" if n_bytes > FP16_ABOVE_BYTES else "float32"
    if dtype == "float16":
        state = {k: v.half() for k, v in state.items()}
    safetensors.torch.save_file(
        state, str(out), metadata={"arch": ARCH, "kwargs": json.dumps(kwargs)}
    )

    # held-out scores of the weights exactly as saved
    shipped = timm.create_model(ARCH, pretrained=False, **kwargs)
    shipped.load_state_dict(
        {k: v.float() for k, v in safetensors.torch.load_file(str(out)).items()}
    )
    metrics = evaluate(*predict(shipped, val["images"]), val["labels"], val["patches"])
    record = {
        "arch": ARCH,
        "kwargs": kwargs,
        "preprocess": {"size": args.size, "mean": list(MEAN), "std": list(STD), "crop": False},
        "value_names": VALUE_NAMES,
        "seed": args.seed,
        "n_train": args.n_train,
        "heldout": {"first_index": args.n_train, "n": args.n_val},
        "steps": steps_done,
        "steps_planned": args.steps,
        "hflip": args.hflip,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "patch_loss": args.patch_loss,
        "factor_weight": factor_weight,
        "init": init,
        "pos_embed_init": None if init else "2-D sin-cos (patch tokens), zeros (CLS)",
        "threads": args.threads,
        "dtype": dtype,
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "heldout_metrics": metrics,
        "history": history,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(
        f"saved {out} ({dtype}); held-out mAP {metrics['mean_ap']:.4f}, "
        f"value accuracy {metrics['value_accuracy']:.4f}; train {train_s / 60:.1f} min"
    )
    for factor, m in metrics["per_factor"].items():
        print(
            f"  {factor:12s} mAP {m['mean_ap']:.4f}  value acc {m['value_accuracy']:.4f}  "
            f"exact acc {m['exact_accuracy']:.4f}"
        )
    return record


if __name__ == "__main__":
    main()
