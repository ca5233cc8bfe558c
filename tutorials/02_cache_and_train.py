# %% [markdown]
# # Cache activations and train an SAE through the Lightning CLI
#
# The two commands of the training flow, `prisma-mm cache` and `prisma-mm train fit`, run here
# on the built-in toy world and the shipped toy ViT (`toyvit`), small enough for a laptop CPU
# (about a minute). Every output lands in the working directory: the images, the cache, the
# run (logs, checkpoint, the trained dictionary), a training-curve PNG and `results.json`.
#
# **On real pretrained weights** the same two commands do the work, e.g. on a GPU:
#
# ```bash
# prisma-mm cache --model dinov2-b14-reg --weights pretrained --data /data/imagenet/train \
#     --hooks blocks.8.hook_resid_post --out caches/dinov2-l8 --device cuda
# prisma-mm train fit --config dinov2-b14-topk-l8 --data.cache_dir caches/dinov2-l8
# ```
#
# (`prisma-mm zoo list` names the models, `trainers/` holds the recipes.) Below we call the
# CLI's own entry point, `prisma_mm.cli.main(argv)`, which is exactly what the shell runs.

# %%
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import prisma_mm
from prisma_mm.cli import main

torch.set_num_threads(1)  # tiny tensors: one thread is faster than two that contend
HOOK = "blocks.3.hook_resid_post"
N_IMAGES = 400

# %% [markdown]
# ## 1. Data: toy-world shards
# `prisma-mm toyworld write` renders labelled scenes into webdataset tar shards, the same
# format `prisma-mm cache` reads for any image data set.

# %%
assert main(["toyworld", "write", "images", "--n", str(N_IMAGES), "--shard-size", "200"]) == 0
print(sorted(p.name for p in Path("images").iterdir()))

# %% [markdown]
# ## 2. `prisma-mm cache`
# Streams the images through `toyvit` and stores the activations at the hook (`[tokens, d]`
# per image, fp16) in shards with a manifest. Re-running the command resumes a killed run.

# %%
argv = [
    "cache",
    "--model", "toyvit",
    "--data", "images/toyworld-{000000..000001}.tar",
    "--hooks", HOOK,
    "--out", "cache-l3",
    "--batch-size", "100",
    "--shard-size", "200",
    "--quiet",
]  # fmt: skip
assert main(argv) == 0
assert main(["cache", "verify", "cache-l3"]) == 0
manifest = json.loads(Path("cache-l3/manifest.json").read_text())
print(manifest["n_samples"], "samples;", manifest["shapes"], manifest["dtype"])

# %% [markdown]
# ## 3. `prisma-mm train fit`
# A shipped recipe (`trainers/toyvit-topk.yaml`) with command-line overrides: a smaller
# dictionary and a short run. `--print_config` shows every setting the recipe leaves at its
# default.

# %%
STEPS, BATCH = 200, 256
argv = [
    "train", "fit",
    "--config", "toyvit-topk",
    "--model.dictionary.init_args.n_latents=256",
    "--model.dictionary.init_args.k=8",
    f"--model.total_tokens={STEPS * BATCH}",
    "--model.lr_warmup_steps=10",
    "--model.init_sample_rows=2048",
    "--data.cache_dir=cache-l3",
    f"--data.hooks={HOOK}",
    f"--data.batch_size={BATCH}",
    "--data.shuffle_buffer=8192",
    f"--trainer.max_steps={STEPS}",
    "--trainer.val_check_interval=100",
    "--trainer.default_root_dir=runs",
    "--trainer.enable_progress_bar=false",
    "--run_name=toyvit-topk",
]  # fmt: skip
assert main(argv) == 0
run = sorted(Path("runs/toyvit-topk").glob("version_*"))[-1]
print("run directory:", run, sorted(p.name for p in run.iterdir()))

# %% [markdown]
# ## 4. The trained dictionary
# It takes raw activations (the training normalization is folded into its weights) and
# records its hook and model. We measure it on held-out toy-world images it never saw.

# %%
from prisma_mm.data.toyworld import ToyWorld, collate
from prisma_mm.sae import fvu, load

sae = load(run / "dictionary")
print(type(sae).__name__, sae.cfg.n_latents, "latents; metadata hook:", sae.metadata.get("hook"))

model = prisma_mm.load_model("toyvit")
held_out = ToyWorld(100, seed=0, start=50_000)
images, _ = collate([held_out[i] for i in range(len(held_out))])
with torch.no_grad():
    _, cache = model.run_with_cache(model.preprocess(list(images.numpy())), HOOK)
    rows = cache[HOOK].reshape(-1, model.d_model)
    code = sae.encode(rows)
    heldout_fvu = float(fvu(sae.decode(code), rows))
l0 = float((code > 0).sum(-1).float().mean())
dead = float(((code > 0).sum(0) == 0).float().mean())
print(f"held-out FVU {heldout_fvu:.3f}, L0 {l0:.1f}, dead fraction {dead:.3f}")

# %% [markdown]
# ## 5. The training curve, from the run's `metrics.csv`

# %%
import csv

with open(run / "metrics.csv") as handle:
    log = list(csv.DictReader(handle))
train = [(int(r["step"]), float(r["train/fvu"])) for r in log if r.get("train/fvu")]
val = [(int(r["step"]), float(r["val/fvu"])) for r in log if r.get("val/fvu")]
fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
ax.plot(*zip(*train), label="train FVU")
ax.plot(*zip(*val), "o", label="validation FVU")
ax.set_xlabel("step")
ax.set_ylabel("FVU")
ax.set_title("TopK SAE (256 latents, k=8) on toyvit blocks.3")
ax.legend()
fig.tight_layout()
fig.savefig("training_curve.png")
print("train FVU", train[0][1], "->", train[-1][1], "; last validation FVU", val[-1][1])

# %%
results = {
    "hook": HOOK,
    "n_samples": manifest["n_samples"],
    "n_shards": manifest["n_shards"],
    "dictionary": str(run / "dictionary"),
    "dictionary_hook": sae.metadata.get("hook"),
    "n_latents": sae.cfg.n_latents,
    "heldout_fvu": heldout_fvu,
    "l0": l0,
    "dead_fraction": dead,
    "train_fvu_first": train[0][1],
    "train_fvu_last": train[-1][1],
    "val_fvu_last": val[-1][1],
}
Path("results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
