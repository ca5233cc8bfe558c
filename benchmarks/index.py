"""Feature-index throughput and memory: a random-init 32k-latent TopK SAE at d=768.

Synthetic ViT-B/16-shaped activations (197 tokens per image: CLS + 14 x 14 patches) go
through the index's own streaming code (``_sparse_code`` then ``IndexState.add_batch``, what
``build_index`` runs per batch of a shard; reading the tar shards is the cache reader's cost
and is measured by benchmarks/cache.py). Prints tokens/s (encode and index update apart),
the extrapolated time for 100k latents over 1M images, and peak RSS at two data sizes, each
in its own process.

    python benchmarks/index.py                 # 32k latents, 48 and 192 images
    python benchmarks/index.py --images 64 256 --latents 32768 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TOKENS = 197  # ViT-B/16 at 224 px: CLS + 14 x 14 patches
D = 768


def run_once(n_images: int, n_latents: int, k: int, batch: int, threads: int) -> dict:
    """Index ``n_images`` synthetic images; returns timings, state bytes and peak RSS."""
    import torch

    from prisma_mm.hooks import TokenLayout
    from prisma_mm.sae import TopKSAE
    from prisma_mm.viz.index import IndexOptions, IndexState, _sparse_code

    torch.set_num_threads(threads)
    layout = TokenLayout(1, (1, 14, 14), (16, 16), (224, 224))
    sae = TopKSAE(d_in=D, n_latents=n_latents, k=k, seed=0).eval()
    options = IndexOptions(batch_samples=batch)
    state = IndexState(n_latents, options)
    generator = torch.Generator().manual_seed(0)
    encode_s = update_s = 0.0
    per_batch = []
    with torch.inference_mode():
        for first in range(0, n_images, batch):
            count = min(batch, n_images - first)
            x = torch.randn(count * TOKENS, D, generator=generator)
            ids = torch.arange(first, first + count)
            hashes = torch.randint(0, 1 << 62, (count,), generator=generator)
            start = time.perf_counter()
            rows, latents, values = _sparse_code(sae, x)
            middle = time.perf_counter()
            state.add_batch(ids, hashes, rows, latents, values, TOKENS, layout)
            end = time.perf_counter()
            encode_s += middle - start
            update_s += end - middle
            per_batch.append((count * TOKENS, middle - start, end - middle))
    tokens = n_images * TOKENS
    late = per_batch[len(per_batch) // 2 :]  # once most latents hold N samples, few enter
    late_tokens = sum(b[0] for b in late)
    return {
        "late_tokens_per_s": late_tokens / sum(b[1] + b[2] for b in late),
        "late_update_share": sum(b[2] for b in late) / sum(b[1] + b[2] for b in late),
        "images": n_images,
        "tokens": tokens,
        "encode_s": encode_s,
        "update_s": update_s,
        "tokens_per_s": tokens / (encode_s + update_s),
        "state_bytes": state.nbytes(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def state_bytes(n_latents: int) -> int:
    """The index state's size at ``n_latents`` with default options (no data needed)."""
    from prisma_mm.viz.index import IndexOptions, IndexState

    return IndexState(n_latents, IndexOptions()).nbytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs=2, default=[48, 192])
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="images per encode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_once(args.child, args.latents, args.k, args.batch, args.threads)))
        return
    results = []
    for n_images in args.images:
        command = [sys.executable, __file__, "--child", str(n_images), "--latents",
                   str(args.latents), "--k", str(args.k), "--batch", str(args.batch),
                   "--threads", str(args.threads)]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print(f"TopK SAE d={D}, {args.latents} latents, k={args.k}, {TOKENS} tokens/image, "
          f"{args.batch} images/encode, {args.threads} threads")  # fmt: skip
    print(f"{'images':>7} {'tokens':>9} {'tok/s':>8} {'late tok/s':>10} {'encode s':>9} "
          f"{'update s':>9} {'state MB':>9} {'peak RSS MB':>12}")  # fmt: skip
    for r in results:
        print(f"{r['images']:>7} {r['tokens']:>9} {r['tokens_per_s']:>8.0f} "
              f"{r['late_tokens_per_s']:>10.0f} {r['encode_s']:>9.1f} "
              f"{r['update_s']:>9.1f} {r['state_bytes'] / 2**20:>9.1f} {r['peak_rss_mb']:>12.0f}")  # fmt: skip
    big = results[-1]
    share = big["late_update_share"]
    # encode FLOPs and the touched-latent updates both grow linearly in the latent count
    rate_100k = big["late_tokens_per_s"] * args.latents / 100_000
    hours = 1_000_000 * TOKENS / rate_100k / 3600
    print(f"index update share of the time (second half of the larger run): {100 * share:.0f}%")
    print(f"peak RSS difference between the two sizes: "
          f"{results[-1]['peak_rss_mb'] - results[0]['peak_rss_mb']:+.0f} MB")  # fmt: skip
    print(f"extrapolated: 100k latents x 1M images x {TOKENS} tokens = {hours:,.0f} h on this "
          f"CPU at {rate_100k:,.0f} tok/s (state {state_bytes(100_000) / 2**20:,.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
