"""Hook overhead and early stopping on a ViT-B/16-shaped model at 224 px.

Side by side in one run: the native timm forward, the hooked forward caching every block's
resid_post (target >= 0.95 of native), and run_with_cache stopping after block 3 of 12
(target >= 2.5x native). Usage: python benchmarks/hooks.py [--batch 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from prisma_mm.hooks import HookedModel
from prisma_mm.zoo.timm_vit import vit_spec


def best_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    native = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(args.device)
    model = HookedModel(vit_spec(native))
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    resid_post = [f"blocks.{i}.hook_resid_post" for i in range(12)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(fn):
        def timed():
            with torch.inference_mode():
                fn()
            sync()

        return timed

    cases = {
        "native forward": run(lambda: native(x)),
        "hooked, 12 resid_post cached": run(lambda: model.run_with_cache(x, resid_post)),
        "stop after block 3 of 12": run(
            lambda: model.run_with_cache(x, ["blocks.2.hook_resid_post"], stop_at_layer=3)
        ),
    }
    # interleave repetitions so machine noise hits every case alike
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            timings[name].append(best_time(fn, 1))
    native_time = min(timings["native forward"])
    print(
        f"ViT-B/16, 224 px, batch {args.batch}, {args.device}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'case':<32} {'images/s':>10} {'vs native':>10}  target")
    targets = {
        "native forward": "",
        "hooked, 12 resid_post cached": ">= 0.95",
        "stop after block 3 of 12": ">= 2.5",
    }
    for name, values in timings.items():
        best = min(values)
        print(f"{name:<32} {args.batch / best:>10.1f} {native_time / best:>10.2f}  {targets[name]}")


if __name__ == "__main__":
    main()
