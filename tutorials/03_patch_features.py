# %% [markdown]
# # Patch-level features: the feature index, latent grids, feature maps and the browser
#
# What a latent means is read off the images it fires on, patch by patch. Here, on the toy
# world and the shipped toy ViT (`toyvit`): cache activations, train a small SAE, build its
# **feature index** in one streaming pass (`prisma-mm index`), draw a **latent grid** (its top
# images with patch heatmaps) and an **image feature map** (one image, its top latents), and
# write the offline **feature browser** (`prisma-mm browse`), a static folder that opens from
# `file://` with no server. About a minute on CPU; everything lands in the working directory.
#
# **On real pretrained weights**: cache a real model over a labelled image folder
# (`prisma-mm cache --model dinov2-b14-reg --weights pretrained --data /data/imagenet/val
# --hooks blocks.8.hook_resid_post --out caches/dino-val`), train or load an SAE (tutorial 02,
# or `prisma_mm.sae.from_pretrained`), then the same two commands:
# `prisma-mm index SAE caches/dino-val` and `prisma-mm browse SAE --out browser`.

# %%
import json
from pathlib import Path

import torch
from PIL import Image

import prisma_mm
from prisma_mm.cache.reader import ActivationDataset
from prisma_mm.cli import main
from prisma_mm.data.toyworld import SIZES, ToyWorld
from prisma_mm.sae import TopKSAE, fit_simple
from prisma_mm.viz.grids import image_feature_map, latent_grid
from prisma_mm.viz.index import FeatureIndex

torch.set_num_threads(1)  # tiny tensors: one thread is faster than two that contend
HOOK = "blocks.3.hook_resid_post"

# %% [markdown]
# ## 1. A labelled image folder
# 300 toy-world images saved as PNGs in one folder per class; the class is the colour of the
# image's largest object, so the index can report each latent's label mix.

# %%
world = ToyWorld(300, seed=0)
for i in range(len(world)):
    image, labels = world[i]
    main_object = max(labels["objects"], key=lambda o: SIZES.index(o["size"]))
    folder = Path("images") / main_object["colour"]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{labels['index']:05d}.png")
print({p.name: len(list(p.iterdir())) for p in sorted(Path("images").iterdir())})

# %% [markdown]
# ## 2. Cache, SAE, and the feature index
# `prisma-mm index` streams the cache once: per latent its top images (by the max over patch
# tokens, the default score) with the token where each peaks, interval samples across its
# activation range, firing frequencies, a value histogram, `mean_active` (what steering
# scales by, tutorial 05), decoder-cosine neighbours and the label mix of its top images.

# %%
assert main(["cache", "--model", "toyvit", "--data", "images", "--hooks", HOOK, "--out", "cache",
             "--batch-size", "100", "--shard-size", "150", "--quiet"]) == 0  # fmt: skip
model = prisma_mm.load_model("toyvit")
torch.manual_seed(0)
sae = TopKSAE(d_in=model.d_model, n_latents=128, k=8)
fit_simple(sae, ActivationDataset("cache", HOOK, batch_size=512, shuffle_buffer=8192), steps=300,
           lr=2e-3, progress=False)  # fmt: skip
sae.metadata.update(hook=HOOK, model="toyvit")
sae.eval().save("sae")
assert main(["index", "sae", "cache", "--top-n", "8", "--no-progress"]) == 0
index = FeatureIndex.load("sae/index")
print(index.n_latents, "latents indexed over", index.meta["n_inputs"], "images;",
      "labels:", index.label_names)  # fmt: skip

# %% [markdown]
# The latents whose top images share one label most (among those with a full top-8):
# colour detectors, if the SAE found them.

# %%
mix = index.label_mix.float()
purity = mix.max(1).values / mix.sum(1).clamp_min(1)
full = mix.sum(1) >= index.top_value.shape[1]  # rare latents with 2 top images prove little
score = torch.where(full, purity + 1e-3 * index.freq_token.float(), -1.0)  # ties: the commoner
ranked = [int(i) for i in torch.argsort(score, descending=True)]
for latent in ranked[:6]:
    top_label = index.label_names[int(mix[latent].argmax())]
    print(f"latent {latent:3d}: top label {top_label:7s} ({float(purity[latent]):.0%} of its top "
          f"images), fires on {float(index.freq_token[latent]):.2%} of tokens, "
          f"mean active {float(index.mean_active[latent]):.2f}")  # fmt: skip
latent = ranked[0]

# %% [markdown]
# ## 3. A latent grid
# The latent's top images, each with the heatmap of the same per-token values that ranked
# it, one colour scale for the whole grid (comparable image to image), nearest upsampling so
# each patch stays a patch; the CLS token is a chip beside each image. `normalize="image"`
# gives each image its own scale; `.svg` paths write vector output.

# %%
latent_grid(index, "sae", latent, "latent_grid.png")
latent_grid(index, "sae", latent, "latent_grid_per_image.svg", normalize="image")
latent_grid(index, "sae", latent, "latent_interval.png", which="interval")

# %% [markdown]
# ## 4. An image feature map
# One image and its strongest latents, each as its own heatmap, plus a combined map where
# each patch takes the colour of the latent strongest there.

# %%
sample = int(index.top_sample[latent, 0])
feature_map = image_feature_map(index, "sae", sample, "feature_map.png", n_latents=4)
print("feature map of", index.keys[sample], "latents", feature_map.latents)

# %% [markdown]
# ## 5. The offline browser
# Open `browser/index.html` in any browser: a sortable, filterable table of every latent,
# and one page per latent with its grid, interval samples, histogram, neighbours and label mix.

# %%
assert main(["browse", "sae", "--out", "browser", "--top-images", "4", "--interval-images",
             "1", "--quiet"]) == 0  # fmt: skip
thumbs = list(Path("browser").rglob("*.png"))
print(len(thumbs), "thumbnails;", (Path("browser") / "index.html").resolve().as_uri())

# %%
results = {
    "n_latents": index.n_latents,
    "n_inputs": int(index.meta["n_inputs"]),
    "label_names": index.label_names,
    "latent": latent,
    "latent_top_label": index.label_names[int(mix[latent].argmax())],
    "latent_purity": float(purity[latent]),
    "latent_mean_active": float(index.mean_active[latent]),
    "latent_top_values": [float(v) for v in index.top_value[latent] if v == v],
    "feature_map_latents": [int(i) for i in feature_map.latents],
    "n_thumbnails": len(thumbs),
}
Path("results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
