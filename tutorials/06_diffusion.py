# %% [markdown]
# # SAEs on a diffusion U-Net: cache from prompts, train, index, steer generation
#
# The flow of Surkov et al., "Unpacking SDXL Turbo" on the tiny SDXL-structured pipeline
# (`tiny-sdxl`: random weights, three U-Net levels, two CLIP text encoders, 64 px here), small
# enough for a CPU (under half a minute): generate from prompts and cache the residual
# update of the transformer block `unet.down.2.1` at every denoising step, train a TopK SAE
# on it, index its features (each sample keeps its prompt, seed and step), then steer
# generation with one feature (everywhere, in a box, at one step) and look at its heatmaps
# over the generated images. Outputs (`cache/`, `sae/`, `grid/`, `heatmaps/`, `results.json`)
# land in the working directory. The random pipeline's features mean nothing; the mechanics
# are the ones a real model uses.
#
# **On SDXL-Turbo** (a GPU, the weights in the Hugging Face cache) the same steps are:
#
# ```bash
# # training rows: every prompt once, a quarter of each image's 256 tokens
# prisma-mm cache --model sdxl-turbo --data prompts.txt --hooks unet.down.2.1.hook_update \
#     --tokens random:64 --device cuda --out caches/turbo-down21
# prisma-mm train fit --config trainers/sdxl-turbo-topk-down-2-1.yaml \
#     --data.cache_dir caches/turbo-down21
# # views: a few thousand prompts with every token and the images kept, then the index
# prisma-mm cache --model sdxl-turbo --data prompts.txt --limit 5000 --keep-images \
#     --hooks unet.down.2.1.hook_update --device cuda --out caches/turbo-views
# DICT=runs/sdxl-turbo-topk-down-2-1/version_0/dictionary
# prisma-mm index $DICT caches/turbo-views --device cuda
# prisma-mm browse $DICT --out browser-down21
# prisma-mm steer $DICT --latent 4021 --prompt "a photo of a cat" --seeds 0,1,2,3 \
#     --strengths 0,2,4,8 --device cuda --dtype float16 --out grids/latent-4021
# ```
#
# (the index maps tokens through the block's grid, so it reads a cache of every token.) In
# Python, `load_pipeline("sdxl-turbo", device="cuda", dtype="float16")` replaces
# `load_pipeline("tiny-sdxl", size=SIZE)` below; everything else is unchanged.

# %%
import json
from pathlib import Path

import torch

from prisma_mm.cache import write_cache
from prisma_mm.cache.reader import ActivationDataset
from prisma_mm.sae import TopKSAE, fit_simple
from prisma_mm.steer import AddFeature, RegionMask, ablate, steer
from prisma_mm.steer.diffusion import feature_heatmaps, steering_grid
from prisma_mm.viz.index import SampleImages, build_index
from prisma_mm.zoo.diffusion import load_pipeline

torch.set_num_threads(1)  # tiny tensors: one thread is faster than two that contend
HOOK = "unet.down.2.1.hook_update"
SIZE = 64  # pixels: the block's grid is 8 x 8
pipe = load_pipeline("tiny-sdxl", size=SIZE)
print(f"{HOOK}: grid {pipe.grid(HOOK)}, {pipe.d(HOOK)} channels; "
      f"defaults: {pipe.default_steps} step(s), guidance {pipe.default_guidance}")  # fmt: skip

# %% [markdown]
# ## 1. Cache from prompts
# Each (prompt, seed) is generated once; every denoising step becomes one sample of
# `[h*w, channels]` tokens with its prompt, seed, step and timestep as provenance, and the
# generated image is kept in the shard (`keep_images`) for the views. Two steps here, with
# classifier-free guidance (the cache keeps the conditional half).

# %%
subjects = ["cat", "dog", "car", "house", "tree", "city street", "mountain", "sea"]
styles = ["a photo of a", "a painting of a", "a red", "a blue"]
prompts = [f"{style} {subject}" for style in styles for subject in subjects]
Path("prompts.txt").write_text("\n".join(prompts) + "\n")
generation = {"steps": 2, "guidance": 3.0, "keep_images": True}
manifest = write_cache(pipe, "prompts.txt", "cache", [HOOK], generation=generation,
                       batch_size=16, device="cpu", progress=False)  # fmt: skip
print(f"cached {manifest['n_samples']} samples ({len(prompts)} prompts x 2 steps), "
      f"shape {manifest['shapes'][HOOK]}")  # fmt: skip

# %% [markdown]
# ## 2. A TopK SAE on the block's update

# %%
rows = ActivationDataset("cache", HOOK, batch_size=256, shuffle_buffer=4096, seed=0)
torch.manual_seed(0)
sae = TopKSAE(d_in=pipe.d(HOOK), n_latents=128, k=4)
log = fit_simple(sae, rows, steps=300, lr=3e-3, progress=False, log_every=100)
sae.metadata.update(hook=HOOK, model="tiny-sdxl")
sae.eval().save("sae")
print(f"training FVU {log[0]['fvu']:.3f} -> {log[-1]['fvu']:.3f}")

# %% [markdown]
# ## 3. The feature index
# Steering strengths are in units of a feature's `mean_active` (its mean value when it
# fires); the index over a prompt cache also records each sample's prompt, seed and step.

# %%
index = build_index("sae", "cache", "sae/index", progress=False)
alive = index.freq_token > 0.02
latent = int(torch.where(alive, index.max_value, torch.zeros_like(index.max_value)).argmax())
top = [index.sample_generated[s] for s, _, _ in index.top(latent)[:4]]
print(f"latent {latent}: fires on {float(index.freq_token[latent]):.1%} of tokens, "
      f"mean active {float(index.mean_active[latent]):.3f}")  # fmt: skip
for item in top:
    print(f"  top sample: {item['prompt']!r} seed {item['seed']} step {item['step']}")
SampleImages(index)(index.top(latent)[0][0]).save("top_generation.png")

# %% [markdown]
# ## 4. Steering generation
# `AddFeature` adds `strength x mean_active x W_dec[latent]` to the block's update (so the
# block's output moves by exactly that); strength 0 changes no bit. `steering_grid` writes a
# grid: rows are strengths, columns prompts x seeds, beside the unsteered images.

# %%
grid_prompts, grid_seeds, strengths = ["a photo of a cat", "a blue sea"], [0, 1], [0, 4, 8, 16]


def add(strength):
    return AddFeature(sae, latent, strength, scale=index)


grid = steering_grid(pipe, add, strengths, grid_prompts, grid_seeds, steps=2, guidance=3.0)
grid.save("grid")
change = [float((row - grid.unsteered).abs().mean()) for row in grid.images]
print("mean |steered - unsteered| per strength:", [f"{c:.4f}" for c in change])

# inside a box (the top-left quarter), at the first step only, on the cond half only
box = RegionMask(box=(0, 0, SIZE // 2, SIZE // 2), size=(SIZE, SIZE))
local = AddFeature(sae, latent, 16, scale=index, mask=box, steps=[0], half="cond")
with steer(pipe, local):
    boxed = pipe.generate(grid_prompts, seeds=[0, 0], steps=2, guidance=3.0)
moved = (boxed - grid.unsteered[[0, 2]]).abs().mean(1)  # [2, H, W]
half_size = SIZE // 2
inside = float(moved[:, :half_size, :half_size].mean())
outside = float(moved[:, half_size:, half_size:].mean())  # the opposite quarter
print(f"boxed steering: mean change {inside:.4f} inside the box, {outside:.4f} in the far quarter")

# ablating the feature through the SAE (error term kept) where it fires
with steer(pipe, ablate(sae, latent)):
    ablated = pipe.generate(grid_prompts, seeds=[0, 0], steps=2, guidance=3.0)
ablation_change = float((ablated - grid.unsteered[[0, 2]]).abs().mean())
print(f"ablating latent {latent}: mean change {ablation_change:.4f}")

# %% [markdown]
# ## 5. Heatmaps per step
# The feature's code over the image generated from its top prompt, one panel per denoising
# step, on one colour scale (the colour bar is in activation units).

# %%
maps = feature_heatmaps(pipe, [(sae, latent)], top[0]["prompt"], seed=top[0]["seed"],
                        steps=2, guidance=3.0, out="heatmaps")  # fmt: skip
paths = [m.output for m in maps]
print("heatmaps:", [str(p) for p in paths], "peak per step:", maps[0].values.amax(1).tolist())

# %%
results = {
    "n_samples": manifest["n_samples"],
    "shape": manifest["shapes"][HOOK],
    "fvu_first": log[0]["fvu"],
    "fvu_last": log[-1]["fvu"],
    "latent": latent,
    "mean_active": float(index.mean_active[latent]),
    "top_prompts": [item["prompt"] for item in top],
    "top_steps": [item["step"] for item in top],
    "strengths": strengths,
    "change": change,
    "box_inside": inside,
    "box_outside": outside,
    "ablation_change": ablation_change,
    "grid": json.loads(Path("grid/settings.json").read_text())["grid"],
    "heatmaps": [str(p) for p in paths],
}
Path("results.json").write_text(json.dumps(results, indent=2))
print(json.dumps({k: v for k, v in results.items() if k != "grid"}, indent=2))
