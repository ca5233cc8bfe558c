"""Steered generation and prompt caching vs plain generation, side by side in one run.

Cases, repeated interleaved so that machine noise hits each alike (best of ``--reps``):

- plain ``HookedPipeline.generate`` of ``--batch`` prompts;
- the same with one steered block (``AddFeature`` at ``unet.down.2.1.hook_update``, a
  random TopK SAE, strength 1 at every step and both CFG halves): target <= 1.15x plain;
- ``run_with_cache`` of that hook (generation with the cache hook, cond half);
- prompt caching: ``write_cache`` of ``--n-prompts`` prompts into a fresh folder (generate,
  read the hook at every step, write shards and manifest), vs plain generation of the same
  prompts in the same batches: throughput target >= 0.9 of plain.

Pipelines: the tiny SDXL-structured one (``--size``, ``--channels``: a larger tiny size shows
the per-image cost once fixed per-call overhead no longer dominates), or ``--turbo``:
SDXL-Turbo's architecture with random weights (``build_from_config``; 512 px, fp16; for a
GPU). On the CPU the clock is this process's CPU time (``--clock cpu``, one thread), which a
shared machine does not skew; on a GPU the wall clock after a synchronise.

Usage: python benchmarks/steer.py [--size 32] [--channels 8,16,32] [--batch 4] [--reps 5]
       python benchmarks/steer.py --size 128 --channels 32,64,128
       python benchmarks/steer.py --turbo --device cuda --dtype float16 --batch 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prisma_mm.cache import write_cache
from prisma_mm.sae import TopKSAE
from prisma_mm.steer import AddFeature, steer
from prisma_mm.zoo.diffusion import HookedPipeline, build_tiny_pipeline, load_pipeline

HOOK = "unet.down.2.1.hook_update"
SUBJECTS = ("cat", "dog", "car", "house", "tree", "city street", "mountain", "sea")


def pipeline(args: argparse.Namespace) -> HookedPipeline:
    if args.turbo:
        from prisma_mm.zoo.diffusion import build_from_config
        from prisma_mm.zoo.registry import get_card

        card = get_card("sdxl-turbo")
        pipe = build_from_config(card, device=args.device, dtype=args.dtype)
        pipe.set_progress_bar_config(disable=True)
        return HookedPipeline(pipe, card)
    if args.size == 32 and args.channels == "8,16,32":
        return load_pipeline("tiny-sdxl", device=args.device, dtype=args.dtype)
    channels = tuple(int(c) for c in args.channels.split(","))
    pipe = build_tiny_pipeline(size=args.size, unet_channels=channels).to(args.device)
    if args.dtype:
        pipe.to(getattr(torch, args.dtype))
    from prisma_mm.zoo.registry import get_card

    return HookedPipeline(pipe, get_card("tiny-sdxl"), size=args.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="tiny pipeline: image size (px)")
    parser.add_argument("--channels", default="8,16,32", help="tiny pipeline: U-Net widths")
    parser.add_argument("--turbo", action="store_true", help="SDXL-Turbo-sized random weights")
    parser.add_argument("--batch", type=int, default=4, help="prompts per generation")
    parser.add_argument("--n-prompts", type=int, default=8, help="prompts per caching run")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (card's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance (card's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float16 / bfloat16 (default float32)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: this process's CPU time (default on the CPU); wall")  # fmt: skip
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    clock = args.clock or ("wall" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(1)
    now = time.perf_counter if clock == "wall" else time.process_time
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    hp = pipeline(args)
    chosen = hp.settings(args.steps, args.guidance)
    prompts = [f"a photo of a {SUBJECTS[i % len(SUBJECTS)]}" for i in range(args.n_prompts)]
    batch = prompts[: args.batch]
    seeds = list(range(len(batch)))
    torch.manual_seed(0)
    d = hp.d(HOOK)
    sae = TopKSAE(d_in=d, n_latents=4 * d, k=8).to(hp.device)
    sae.metadata["hook"] = HOOK
    add = AddFeature(sae.eval(), 0, 1.0, scale=1.0)
    work = Path(tempfile.mkdtemp(prefix="steer-bench-"))
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    runs = {"n": 0}

    def generate() -> None:
        hp.generate(batch, seeds, chosen["steps"], chosen["guidance"])

    def steered() -> None:
        with steer(hp, add):
            generate()

    def cached() -> None:
        hp.run_with_cache(batch, [HOOK], seeds, chosen["steps"], chosen["guidance"])

    def plain_all() -> None:
        for start in range(0, len(prompts), args.batch):
            part = prompts[start : start + args.batch]
            hp.generate(part, list(range(len(part))), chosen["steps"], chosen["guidance"])

    def caching() -> None:
        runs["n"] += 1
        out = work / f"cache-{runs['n']}"
        write_cache(hp, str(work / "prompts.txt"), out, [HOOK], batch_size=args.batch,
                    device=hp.device, progress=False, order_seed=None,
                    generation={"steps": chosen["steps"], "guidance": chosen["guidance"]})  # fmt: skip
        shutil.rmtree(out)

    cases = {
        "plain generate": generate,
        "one steered block": steered,
        "run_with_cache (1 hook)": cached,
        f"plain generate x {len(prompts)}": plain_all,
        f"write_cache x {len(prompts)}": caching,
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for name, fn in cases.items():
                sync()
                start = now()
                fn()
                sync()
                timings[name].append(now() - start)
    shutil.rmtree(work, ignore_errors=True)
    best = {name: min(times) for name, times in timings.items()}
    what = "SDXL-Turbo-sized random weights" if args.turbo else (
        f"tiny-sdxl {args.size} px, U-Net {args.channels}")  # fmt: skip
    print(f"{what}; {chosen['steps']} step(s), guidance {chosen['guidance']}, batch "
          f"{args.batch}, {args.device} {args.dtype or 'float32'}; {clock} clock, best of "
          f"{args.reps}")  # fmt: skip
    for name, seconds in best.items():
        print(f"  {name:<28} {seconds * 1000:9.1f} ms")
    plain = best["plain generate"]
    print(f"steered / plain generation:     {best['one steered block'] / plain:.3f}x"
          "   (target <= 1.15)")  # fmt: skip
    print(f"run_with_cache / plain:         {best['run_with_cache (1 hook)'] / plain:.3f}x")
    throughput = best[f"plain generate x {len(prompts)}"] / best[f"write_cache x {len(prompts)}"]
    print(f"prompt caching / plain (images/s): {throughput:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
