"""Train the toy video model (`toyvideo`): a small transformers VideoMAE classifier predicting
every value of the moving toy world, motion included.

Multi-label (one sigmoid per value of ``prisma_mm.data.toyworld.CLIP_VALUE_NAMES``: the image
factors plus direction, speed, appears and disappears), BCE loss, from scratch, reproducibly
from ``--seed`` on CPU with one thread. The training set is clips ``0 .. n_train-1`` of the
moving world of ``--seed``, rendered once into memory; the held-out set is the next
``--n-val`` clips, which training never sees.

The checkpoint is a plain ``VideoMAEForVideoClassification`` (mean pooling, ``fc_norm``, a
linear head): the clip's labels come from the mean of its tokens. As for ``toyvit``, the same
head also predicts each token's labels from that token (the union of the labels of the
``tubelet`` frames and the patch it covers), weighted by ``--patch-loss``: dense supervision
from the world's exact labels, without changing the architecture.

    python scripts/train_toyvideo.py        # writes assets/toyvideo.safetensors + .json

The JSON record beside the weights holds the configuration, seed, hyper-parameters, timing and
the held-out average precision per factor (clip and token level) of the weights as saved, and
the same on the two motion controls (frame-repeated, frame-shuffled clips scored against the
original labels: motion values should fall to chance there, static values should not).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from prisma_mm.analysis.ground_truth import average_precision
from prisma_mm.data.toyworld import (
    CLIP_FACTORS,
    CLIP_OBJECTS,
    CLIP_VALUE_FACTORS,
    CLIP_VALUE_NAMES,
    MOTION_FACTORS,
    render_clip_arrays,
    repeat_frame,
    shuffle_frames,
)

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def model_config(
    size: int, n_frames: int, patch: int, tubelet: int, width: int, depth: int, heads: int
) -> dict:
    """The ``VideoMAEConfig`` keyword arguments of the toy video model (also its card's)."""
    return {
        "image_size": size,
        "patch_size": patch,
        "num_channels": 3,
        "num_frames": n_frames,
        "tubelet_size": tubelet,
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": 4 * width,
        "use_mean_pooling": True,
        "num_labels": len(CLIP_VALUE_NAMES),
        "problem_type": "multi_label_classification",
    }


def to_input(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> normalised float ``[B, T, 3, H, W]`` (VideoMAE's order)."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 1, 4, 2, 3).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 1, 3, 1, 1)
    return (x - mean) / std


def logits(model: VideoMAEForVideoClassification, x: torch.Tensor):
    """Clip logits ``[B, V]`` and token logits ``[B, tokens, V]`` (the head on each token)."""
    tokens = model.videomae(pixel_values=x).last_hidden_state  # [B, tokens, width]
    clip = model.classifier(model.fc_norm(tokens.mean(1)))
    return clip, model.classifier(model.fc_norm(tokens))


@torch.no_grad()
def predict(model, clips: np.ndarray, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores for uint8 clips ``[n, T, H, W, 3]``: clip ``[n, V]``, token ``[n, P, V]``."""
    model.eval()
    clip_scores, token_scores = [], []
    for i in range(0, len(clips), batch_size):
        clip, token = logits(model, to_input(clips[i : i + batch_size]))
        clip_scores.append(clip.sigmoid())
        token_scores.append(token.sigmoid())
    return torch.cat(clip_scores), torch.cat(token_scores)


def per_factor_ap(scores: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict, list[str]]:
    """Mean AP per factor and AP per value for ``scores, labels [n, V]``; and the values that
    cannot be scored (no positive in the held-out set)."""
    ap = average_precision(scores.double(), labels.double())
    factors = {
        f: float(ap[[i for i, g in enumerate(CLIP_VALUE_FACTORS) if g == f]].nanmean())
        for f in CLIP_FACTORS
    }
    values = {n: float(a) for n, a in zip(CLIP_VALUE_NAMES, ap) if not math.isnan(float(a))}
    return factors, values, [n for n, a in zip(CLIP_VALUE_NAMES, ap) if math.isnan(float(a))]


def evaluate(model, val: dict) -> dict:
    """Held-out AP per factor at clip and token level, plus clip-level AP on both controls."""
    clip_scores, token_scores = predict(model, val["clips"])
    labels = torch.from_numpy(val["labels"])
    factors, values, unscorable = per_factor_ap(clip_scores, labels)
    n_values = len(CLIP_VALUE_NAMES)
    token_factors, _, _ = per_factor_ap(
        token_scores.reshape(-1, n_values), torch.from_numpy(val["patches"]).reshape(-1, n_values)
    )
    controls = {}
    for name, clips in (
        ("repeated_frame", repeat_frame(val["clips"])),
        ("shuffled_frames", shuffle_frames(val["clips"])[0]),
    ):
        control_factors, _, _ = per_factor_ap(predict(model, clips)[0], labels)
        controls[name] = {f: control_factors[f] for f in MOTION_FACTORS}
    motion = [f for f in MOTION_FACTORS]
    return {
        "clip_mean_ap": float(np.nanmean(list(values.values()))),
        "clip_motion_mean_ap": float(np.mean([factors[f] for f in motion])),
        "clip_per_factor_ap": factors,
        "token_per_factor_ap": token_factors,
        "controls_clip_motion_ap": controls,
        "per_value_ap": values,
        "unscorable_values": unscorable,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=16_000)
    p.add_argument("--n-val", type=int, default=1_000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--tubelet", type=int, default=2)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--patch-loss", type=float, default=1.0, help="weight of the per-token BCE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=CLIP_OBJECTS, help="objects per clip")
    p.add_argument("--device", default="cpu", help="cpu (the shipped weights) or cuda")
    p.add_argument("--out", default="assets/toyvideo.safetensors")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    grid = args.size // args.patch
    common = dict(seed=args.seed, size=args.size, n_frames=args.frames, patch_grid=grid,
                  tubelet=args.tubelet, max_objects=args.max_objects)  # fmt: skip
    train = render_clip_arrays(args.n_train, start=0, **common)
    val = render_clip_arrays(args.n_val, start=args.n_train, **common)
    n_values = len(CLIP_VALUE_NAMES)
    train_tokens = train["patches"].reshape(args.n_train, -1, n_values)  # time-major, as VideoMAE
    render_s = time.time() - t0

    config = model_config(args.size, args.frames, args.patch, args.tubelet, args.width,
                          args.depth, args.heads)  # fmt: skip
    device = torch.device(args.device)
    model = VideoMAEForVideoClassification(VideoMAEConfig(**config)).to(device)
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )  # fmt: skip
    warmup = max(1, int(args.warmup * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(args.n_train, generator=gen)
    cursor = 0
    t1 = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train toyvideo", unit="step")
    for _ in bar:
        if cursor + args.batch_size > args.n_train:
            order = torch.randperm(args.n_train, generator=gen)
            cursor = 0
        idx = order[cursor : cursor + args.batch_size].numpy()
        cursor += args.batch_size
        clip_logits, token_logits = logits(model, to_input(train["clips"][idx]).to(device))
        y = torch.from_numpy(train["labels"][idx]).float().to(device)
        loss = F.binary_cross_entropy_with_logits(clip_logits, y)
        if args.patch_loss:
            y_tokens = torch.from_numpy(train_tokens[idx]).float().to(device)
            loss = loss + args.patch_loss * F.binary_cross_entropy_with_logits(
                token_logits, y_tokens
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_s = time.time() - t1

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        state, str(out), metadata={"arch": "VideoMAEForVideoClassification",
                                   "config": json.dumps(config)}
    )  # fmt: skip

    # held-out scores of the weights exactly as saved
    shipped = VideoMAEForVideoClassification(VideoMAEConfig(**config))
    shipped.load_state_dict(safetensors.torch.load_file(str(out)))
    metrics = evaluate(shipped, val)
    record = {
        "arch": "VideoMAEForVideoClassification",
        "config": config,
        "preprocess": {
            "size": args.size,
            "frames": args.frames,
            "mean": list(MEAN),
            "std": list(STD),
            "crop": False,
        },  # fmt: skip
        "value_names": CLIP_VALUE_NAMES,
        "seed": args.seed,
        "n_train": args.n_train,
        "heldout": {"first_index": args.n_train, "n": args.n_val},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "patch_loss": args.patch_loss,
        "threads": args.threads,
        "max_objects": args.max_objects,
        "device": args.device,
        "n_parameters": sum(v.numel() for v in state.values()),
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "heldout_metrics": metrics,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(
        f"saved {out}; held-out clip mAP {metrics['clip_mean_ap']:.4f}, motion "
        f"{metrics['clip_motion_mean_ap']:.4f}; train {train_s / 60:.1f} min"
    )
    for factor, ap in metrics["clip_per_factor_ap"].items():
        token_ap = metrics["token_per_factor_ap"][factor]
        print(f"  {factor:12s} clip AP {ap:.4f}  token AP {token_ap:.4f}")
    return record


if __name__ == "__main__":
    main()
