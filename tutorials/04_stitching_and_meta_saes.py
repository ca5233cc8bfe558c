# %% [markdown]
# # Stitching and meta-SAEs: how the latents of two SAEs relate, and what latents are made of
#
# Two TopK SAEs of different sizes on the same hook of the toy ViT (`toyvit`): **stitching**
# (Leask et al., ICLR 2025) sorts each latent of the large SAE into *novel* (it adds what the
# small one lacks), *reconstruction* (a copy or a refinement of small-SAE latents) or
# *inactive*, and walks a chain of stitched SAEs from the small to the large one; a
# **meta-SAE** decomposes the large SAE's decoder rows into a few shared meta-latents. Both
# run here on the toy world in about a minute on CPU; outputs land in the working directory
# (`stitching.png`, `stitching.json`, `meta_sae/`, `results.json`).
#
# **On real pretrained weights**: train the two SAEs with `prisma-mm train fit` on a cache of
# a real model (see tutorial 02; e.g. `--config dinov2-b14-topk-l8` with
# `--model.dictionary.init_args.n_latents` 8192 and 32768), then
# `prisma-mm stitch SMALL LARGE --cache CACHE` and `prisma-mm meta-sae LARGE`, or the same
# Python calls as below with the two saved dictionaries (`prisma_mm.sae.load(path)`).

# %%
import json
from pathlib import Path

import numpy as np
import torch

import prisma_mm
from prisma_mm.analysis.meta_sae import train_meta_sae
from prisma_mm.analysis.stitching import plot_stitching, stitch
from prisma_mm.data.toyworld import ToyWorld, collate
from prisma_mm.demo import factor_of_latents, meta_purity
from prisma_mm.sae import TopKSAE, fit_simple

torch.set_num_threads(1)  # tiny tensors: one thread is faster than two that contend
HOOK = "blocks.3.hook_resid_post"

# %% [markdown]
# ## 1. Activations and two SAEs
# 400 toy-world images through `toyvit`, every token of `blocks.3.hook_resid_post`; a 64- and
# a 256-latent TopK SAE (k = 8) trained with the plain loop `fit_simple` (the Lightning
# trainer of tutorial 02 makes the same calls).

# %%
model = prisma_mm.load_model("toyvit")
world = ToyWorld(400, seed=0, patch_grid=model.layout.grid[1:])
images, labels = collate([world[i] for i in range(len(world))])
with torch.no_grad():
    _, cache = model.run_with_cache(model.preprocess(list(images.numpy())), HOOK)
acts = cache[HOOK]  # [400, 65, 128]
rows = acts.reshape(-1, model.d_model)
patch_rows = acts[:, model.layout.n_prefix :].reshape(-1, model.d_model)
patch_labels = labels["patches"].reshape(-1, labels["patches"].shape[-1]).float()
print("rows", tuple(rows.shape), "patch labels", tuple(patch_labels.shape))


def train(n_latents: int, seed: int) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield rows[torch.randint(0, rows.shape[0], (512,), generator=gen)]

    torch.manual_seed(seed)
    sae = TopKSAE(d_in=model.d_model, n_latents=n_latents, k=8)
    fit_simple(sae, batches(), steps=300, lr=2e-3, progress=False)
    sae.metadata["hook"] = HOOK
    return sae.eval()


small, large = train(64, seed=1), train(256, seed=2)

# %% [markdown]
# ## 2. Stitching the small SAE into the large one
# The curve starts at the small SAE's MSE and ends at the large one's. Inserting novel latents
# lowers it a little; swapping groups of reconstruction latents is where these short-trained
# TopK pairs bump up: a stitched TopK SAE makes latents of two encoders compete for the same
# k slots. Leask et al.'s monotone curves come from well-trained pairs; `monotone` and
# `n_increases` say what this pair does, and the figure shows it.

# %%
sample = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:8192]]
result = stitch(small, large, sample, max_points=12, progress=False)
plot_stitching(result, "stitching.png", title="stitching 64 -> 256 latents (toyvit blocks.3)")
Path("stitching.json").write_text(json.dumps(result.to_dict(per_latent=False), indent=1))
classes = result.classes
n_novel = int(classes.novel_test.sum())
n_recon = int(classes.reconstruction_test.sum())
n_inactive = int(classes.inactive.sum())
print(f"large-SAE latents: {n_novel} novel, {n_recon} reconstruction, {n_inactive} inactive")
print(f"exact test vs cosine proxy agreement: {classes.agreement:.2f}")
for point in result.curve:
    print(f"  step {point['step']:4d}  latents {point['n_latents']:4d}  MSE {point['mse']:.4f}")
print("monotone:", result.monotone, f"({result.n_increases} increases)")

# %% [markdown]
# A novel latent has no close partner among the small SAE's decoder rows; a reconstruction
# latent usually has one.

# %%
cos = classes.max_cosine
print("median max-cosine with the small SAE: novel", float(np.median(cos[classes.novel_test])),
      "| reconstruction", float(np.median(cos[classes.reconstruction_test])))  # fmt: skip

# %% [markdown]
# ## 3. A meta-SAE of the large SAE
# A BatchTopK SAE (4 meta-latents per row on average) trained on the large SAE's unit decoder
# rows. If meta-latents capture shared structure, latents grouped under one meta-latent tend
# to detect the same toy-world factor (shape, colour, ...): we compare that purity with the
# same groups after shuffling the factors.

# %%
meta = train_meta_sae(large, k=4, steps=600, seed=0, progress=False)
meta.save("meta_sae")
with torch.no_grad():
    patch_codes = large.encode(patch_rows)
factors = factor_of_latents(patch_codes, patch_labels)
members = [[i for i, _ in meta.members(m)] for m in range(meta.n_meta)]
purity = meta_purity(members, factors)
rng = np.random.default_rng(0)
shuffled = float(
    np.mean(
        [
            meta_purity(members, list(rng.permutation(np.array(factors, dtype=object))))
            for _ in range(50)
        ]
    )
)
print(f"meta-SAE: {meta.n_meta} meta-latents, FVU {meta.fvu:.3f}")
print(f"latents with a factor: {sum(f is not None for f in factors)} / {len(factors)}")
print(f"factor purity of meta-latent groups {purity:.3f} vs {shuffled:.3f} shuffled")
biggest = max(range(meta.n_meta), key=lambda m: len(members[m]))
print(f"meta-latent {biggest}: members", [(i, factors[i]) for i in members[biggest][:8]])

# %%
results = {
    "n_latents_small": small.cfg.n_latents,
    "n_latents_large": large.cfg.n_latents,
    "n_novel": n_novel,
    "n_reconstruction": n_recon,
    "n_inactive": n_inactive,
    "agreement": float(classes.agreement),
    "mse_small": float(classes.mse_small),
    "mse_large": float(result.mse_large),
    "curve_mse": [float(p["mse"]) for p in result.curve],
    "monotone": bool(result.monotone),
    "n_meta": int(meta.n_meta),
    "meta_fvu": float(meta.fvu),
    "latents_with_factor": int(sum(f is not None for f in factors)),
    "factor_purity": float(purity),
    "shuffled_purity": shuffled,
}
Path("results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
