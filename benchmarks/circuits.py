"""Attribution patching over every hook and head, against one forward pass.

Side by side in one run, on toyvit (the shipped 6-block model at 64 px) and on a
ViT-B/16-shaped model at 224 px (random weights): one plain forward of the clean batch, and
attribution patching over every block's resid_pre, attn.hook_z (every head), attn_out and
mlp_out (one clean forward with caching, one corrupted forward + backward). Target: at most
3 forward passes. For scale, activation patching by head costs one forward per head
(144 on ViT-B), so it is timed on toyvit only.

On CPU it times process time with one thread (steady on a shared machine); on CUDA, wall time.

Usage: python benchmarks/circuits.py [--batch 16] [--reps 3] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import prisma_mm
from prisma_mm.analysis import circuits as C
from prisma_mm.hooks import HookedModel
from prisma_mm.zoo.timm_vit import vit_spec


def best_of(fn, reps: int, sync, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return min(times)


def measure(name: str, model: HookedModel, batch: int, reps: int, device: str, heads: bool):
    torch.manual_seed(0)
    size = model.layout.input_size
    clean = torch.randn(batch, 3, *size, device=device)
    corrupt = torch.randn(batch, 3, *size, device=device)
    metric = C.logit_diff(0, 1)
    head = C.readout(model)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # on a shared CPU, process time (one thread) is steadier than the wall clock
    clock = time.perf_counter if device.startswith("cuda") else time.process_time

    def forward():
        with torch.no_grad():
            model(clean)

    forward_s = best_of(forward, reps, sync, clock)
    attribution_s = best_of(
        lambda: C.attribution_patching(model, clean, corrupt, metric, head=head), reps, sync, clock
    )
    n_hooks = len(C.default_attribution_hooks(model))
    print(f"{name}: batch {batch}, {n_hooks} hooks, {model.n_layers} blocks")
    print(f"  one forward               {forward_s * 1e3:9.1f} ms")
    print(f"  attribution patching      {attribution_s * 1e3:9.1f} ms  "
          f"= {attribution_s / forward_s:.2f} forwards (target <= 3)")  # fmt: skip
    if heads:
        patch_s = best_of(
            lambda: C.activation_patching(
                model, clean, corrupt, metric, kind="z", by="head", head=head
            ),
            1,
            sync,
            clock,
        )
        print(f"  activation patching/head  {patch_s * 1e3:9.1f} ms  "
              f"= {patch_s / forward_s:.1f} forwards")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    toyvit = prisma_mm.load_model("toyvit", device=args.device)
    measure("toyvit", toyvit, args.batch, args.reps, args.device, heads=True)
    torch.manual_seed(0)
    native = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(args.device)
    vit_b = HookedModel(vit_spec(native))
    measure("ViT-B/16 224 px", vit_b, max(1, args.batch // 4), args.reps, args.device, heads=False)


if __name__ == "__main__":
    main()
