"""Training straight from a model vs training from a cache, side by side in one run.

On toyvit (d 128, 65 tokens) over toy-world images, a TopK SAE (1536 latents, k 16, batch
2048, the toyvit recipes' sizes) trains for ``--steps`` steps:

1. from a cache (ActivationDataModule; the cache is written first, its time reported apart);
2. straight from the model (ModelActivationDataModule, the same shuffle buffer);
3. the multi recipe's shape: three dictionaries from one forward (MultiSAEModule).

Printed: training rows/s of each, the ratio model / cache, the cache's writing time, and the
data streams alone (rows/s of batches with no training step). Not a test: no assertion.

Usage: python benchmarks/train_from_model.py [--images 600] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from prisma_mm.cache import write_cache
from prisma_mm.data.toyworld import ToyWorld
from prisma_mm.demo import IndexedToyWorld
from prisma_mm.sae import TopKSAE
from prisma_mm.train import (
    ActivationDataModule,
    ModelActivationDataModule,
    MultiSAEModule,
    SAEModule,
)

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


def _fit(module: pl.LightningModule, datamodule: pl.LightningDataModule, steps: int,
         root: Path) -> float:  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(root),
    )  # fmt: skip
    began = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - began


def _stream_rate(datamodule: pl.LightningDataModule, batches: int) -> float:
    stream = iter(datamodule.train_dataloader())
    next(stream)  # the model is built, the buffer filled
    began = time.perf_counter()
    rows = sum(next(stream).shape[0] for _ in range(batches))
    return rows / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--buffer", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = IndexedToyWorld(ToyWorld(args.images, seed=0))
    common = dict(batch_size=args.batch_size, shuffle_buffer=args.buffer, eval_fraction=0.02)
    rows = args.steps * args.batch_size

    def sae(d: int) -> SAEModule:
        return SAEModule(TopKSAE(d_in=d, n_latents=1536, k=16), lr=0.002, lr_warmup_steps=10,
                         init_sample_rows=4096)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        write_cache("toyvit", world, root / "cache", HOOKS[1:], batch_size=64, progress=False)
        write_s = time.perf_counter() - began
        cached = ActivationDataModule(str(root / "cache"), HOOKS[1], num_workers=1, **common)
        cache_s = _fit(sae(cached.d_in), cached, args.steps, root / "a")
        model = ModelActivationDataModule("toyvit", world, HOOKS[1], input_batch_size=64,
                                          stats_inputs=256, **common)  # fmt: skip
        model_s = _fit(sae(model.d_in), model, args.steps, root / "b")
        both = ModelActivationDataModule("toyvit", world, HOOKS, input_batch_size=64,
                                         stats_inputs=256, **common)  # fmt: skip
        multi = MultiSAEModule(
            TopKSAE(d_in=both.d_in, n_latents=1536, k=16),
            {"l1": {"hook": HOOKS[0]}, "l3": {"hook": HOOKS[1]},
             "l3-384": {"hook": HOOKS[1], "dictionary_args": {"n_latents": 384}}},
            defaults={"lr": 0.002, "lr_warmup_steps": 10, "init_sample_rows": 4096},
        )  # fmt: skip
        multi_s = _fit(multi, both, args.steps, root / "c")
        stream_cache = _stream_rate(
            ActivationDataModule(str(root / "cache"), HOOKS[1], num_workers=1, **common), 20
        )
        stream_model = _stream_rate(
            ModelActivationDataModule("toyvit", world, HOOKS[1], input_batch_size=64,
                                      stats_inputs=256, **common), 20,
        )  # fmt: skip
    print(f"toyvit, {args.images} images, TopK 1536/k16, batch {args.batch_size}, "
          f"{args.steps} steps, {args.threads} thread(s)")  # fmt: skip
    print(
        f"  cache written once:          {write_s:7.1f} s ({args.images / write_s:,.0f} images/s)"
    )
    print(f"  train from the cache:        {rows / cache_s:9,.0f} rows/s")
    print(f"  train from the model:        {rows / model_s:9,.0f} rows/s "
          f"(x{cache_s / model_s:.2f} of the cache)")  # fmt: skip
    print(f"  3 SAEs from one forward:     {3 * rows / multi_s:9,.0f} dictionary-rows/s "
          f"({rows / multi_s:,.0f} rows/s)")  # fmt: skip
    print(f"  data alone, cache stream:    {stream_cache:9,.0f} rows/s")
    print(f"  data alone, model stream:    {stream_model:9,.0f} rows/s")


if __name__ == "__main__":
    main()
