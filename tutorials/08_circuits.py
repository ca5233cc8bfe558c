# %% [markdown]
# # Circuits: which heads and which SAE latents make toyvit call an object red
#
# The toy ViT (`toyvit`) predicts every toy-world factor value with one sigmoid each. Here we
# take one-object scenes with a **red** object (clean) and the very same scenes with the
# object **blue** (corrupted), and ask which parts of the model carry the difference between
# the `colour=red` and `colour=blue` logits:
#
# 1. the **logit lens** (each block's stream read through the final head) and **direct logit
#    attribution** (the last stream split into embedding, heads and MLPs);
# 2. **activation patching** (clean activations patched into the corrupted run, one head or
#    one patch at a time) and **attribution patching** (its first-order estimate for every
#    hook and head at once, from one forward and one backward), and how well they agree;
# 3. the same down to **SAE latents** spliced in at two layers: the latent circuit, drawn as a
#    graph whose nodes link into the feature browser;
# 4. checks by **patching and ablation**: patching the heads the tools point at into the
#    corrupted run must restore far more of the red-vs-blue logit difference than patching
#    others, and removing the latents they point at must hurt it far more than removing others.
#
# About half a minute on CPU; outputs (`cache/`, `sae-*/`, `browser/`, `*.png`,
# `circuit.html`, `results.json`) land in the working directory.
#
# **On real pretrained weights**: the same calls take any timm classifier card (e.g.
# `prisma_mm.load_model("vit-b16-augreg2-in21k-ft-in1k")`) or a CLIP card with class prompts
# (`readout(model, ["a photo of a cat", "a photo of a dog"])`), a published SAE from
# `prisma_mm.load_sae(NAME)` in place of the ones trained here, and clean / corrupted image
# pairs of your own (the same photo with the object edited or masked out).

# %%
import dataclasses
import json

import matplotlib

matplotlib.use("Agg")
import torch

import prisma_mm
from prisma_mm.analysis import circuits as C
from prisma_mm.cache import write_cache
from prisma_mm.cache.reader import ActivationDataset
from prisma_mm.data.toyworld import VALUE_INDEX, ToyWorld, render_scene
from prisma_mm.demo import IndexedToyWorld
from prisma_mm.sae import TopKSAE, fit_simple
from prisma_mm.steer import ablate, steer
from prisma_mm.viz import circuits as V
from prisma_mm.viz.browser import build_browser
from prisma_mm.viz.index import build_index

torch.set_num_threads(1)  # tiny tensors: one thread is faster than two that contend
model = prisma_mm.load_model("toyvit")
RED, BLUE = VALUE_INDEX["colour=red"], VALUE_INDEX["colour=blue"]
metric = C.logit_diff(RED, BLUE)  # per image: logit(colour=red) - logit(colour=blue)

# %% [markdown]
# ## 1. Clean and corrupted pairs
# Every one-object scene with a red object, and the same scene with that object blue: shape,
# size, position, texture and background stay; only the colour changes.

# %%
world = ToyWorld(600, seed=3)
clean_images, corrupt_images = [], []
for i in range(len(world)):
    scene = world.scene(i)
    if scene.count == 1 and scene.objects[0].colour == "red":
        blue = dataclasses.replace(scene.objects[0], colour="blue")
        clean_images.append(render_scene(scene)[0])
        corrupt_images.append(render_scene(dataclasses.replace(scene, objects=(blue,)))[0])
clean_images, corrupt_images = clean_images[:12], corrupt_images[:12]
clean, corrupt = model.preprocess(clean_images), model.preprocess(corrupt_images)
head = C.readout(model)
with torch.no_grad():
    clean_metric = float(metric(model(clean)).mean())
    corrupt_metric = float(metric(model(corrupt)).mean())
print(f"{len(clean_images)} pairs; metric clean {clean_metric:.2f}, corrupted {corrupt_metric:.2f}")

# %% [markdown]
# ## 2. Logit lens and direct logit attribution
# The lens reads each block's output stream through the final pooling, norm and head. The
# direct logit attribution splits the last stream into the embedding, each head (through
# `hook_z` and the output projection), each layer's attention bias and each MLP; with the
# final norm's scale frozen, the parts add up to the logits exactly (up to the head's bias).

# %%
lens = C.logit_lens(model, clean, head)
lens_diff = (lens.logits[:, :, RED] - lens.logits[:, :, BLUE]).mean(1)
for layer, value in enumerate(lens_diff):
    print(f"lens after block {layer}: red - blue = {float(value):6.2f}  "
          f"(alignment with the output {float(lens.alignment[layer]):.2f})")  # fmt: skip
dla = C.direct_logit_attribution(model, clean, head)
dla_error = float((dla.values.sum(0) + dla.bias - dla.logits).abs().max())
diff = dla.values[:, :, RED] - dla.values[:, :, BLUE]  # [components, images]
top_components = sorted(zip(dla.names, diff.mean(1).tolist()), key=lambda r: -abs(r[1]))[:6]
print(f"DLA parts sum to the logits within {dla_error:.1e}; largest direct effects on red - blue:")
for name, value in top_components:
    print(f"  {name:>14}: {value:+.2f}")

# %% [markdown]
# ## 3. Heads: activation patching against attribution patching
# Activation patching runs the corrupted images once per head with that head's clean output
# patched in (`kind="z", by="head"`): 24 forwards of the batch. Attribution patching estimates
# all of them, and every hook per patch, from one clean forward and one corrupted forward and
# backward.

# %%
exact = C.activation_patching(model, clean, corrupt, metric, kind="z", by="head", head=head)
estimate = C.attribution_patching(model, clean, corrupt, metric, head=head)
heads_exact = exact.values - exact.corrupt  # [layers, heads]: metric gained by the patch
heads_estimate = estimate.head_matrix(model)
rho = C.rank_correlation(heads_exact, heads_estimate)
print(f"rank correlation over the 24 heads, attribution vs activation patching: {rho:.3f}")
V.head_matrix(exact.normalized(), "heads_patching.png", title="activation patching (z, by head)",
              label="share of the clean metric restored")  # fmt: skip
V.head_matrix(heads_estimate, "heads_attribution.png", title="attribution patching (z, by head)")
stream = C.activation_patching(model, clean[:1], corrupt[:1], metric, chunk=65, head=head)
V.patching_heatmap(stream.normalized(), clean_images[0], model.layout, "stream_patching.png",
                   title="resid_pre patched one token at a time (share restored)")  # fmt: skip

# %% [markdown]
# ### Check by patching, and by ablation
# Take the three heads whose clean output restores the most of the red-vs-blue difference by
# attribution, and the three with the least |attribution|. Patch each trio's clean outputs
# into the corrupted run together, and measure how much of the difference comes back. Then
# mean-ablate each trio on the clean images (replace its outputs by their mean over clean and
# corrupted images), and measure how much of the difference goes. The two questions differ:
# patching asks whether the heads are *enough* to move the difference, ablation whether the
# model *needs* them. The logit lens and DLA above already show colour reaching the logits
# from the embedding and the MLPs, so the model may not need any head for it.

# %%
n_heads = model.spec.blocks[0].attn.num_heads


def heads_set_to(heads: list[int], source: torch.Tensor, run_on: torch.Tensor, mean: bool) -> float:
    """The metric on ``run_on`` with ``heads``' outputs (hook_z) taken from a run on ``source``
    (image by image, or their mean over ``source`` when ``mean``)."""
    names = {f"blocks.{h // n_heads}.attn.hook_z" for h in heads}
    with torch.no_grad():
        _, cache = model.run_with_cache(source, list(names))
    values = {name: cache[name].mean(0) if mean else cache[name] for name in names}

    def replace(value, point):
        layer = int(point.name.split(".")[1])
        value = value.clone()
        for h in heads:
            if h // n_heads == layer:
                value[..., h % n_heads, :] = values[point.name][..., h % n_heads, :]
        return value

    with torch.no_grad(), model.hooks({name: replace for name in names}):
        return float(metric(model(run_on)).mean())


def patch_heads(heads: list[int]) -> float:  # clean outputs into the corrupted run
    return heads_set_to(heads, clean, corrupt, mean=False)


def ablate_heads(heads: list[int]) -> float:  # the mean over clean and corrupted, on clean
    return heads_set_to(heads, torch.cat([clean, corrupt]), clean, mean=True)


top_heads = torch.argsort(heads_estimate.flatten(), descending=True)[:3].tolist()
bottom_heads = torch.argsort(heads_estimate.abs().flatten())[:3].tolist()
restored_top = patch_heads(top_heads) - corrupt_metric
restored_bottom = patch_heads(bottom_heads) - corrupt_metric
drop_top = clean_metric - ablate_heads(top_heads)
drop_bottom = clean_metric - ablate_heads(bottom_heads)
label = [f"L{h // n_heads}H{h % n_heads}" for h in top_heads]
print(f"patching heads {label} into the corrupted run: red - blue rises by {restored_top:.2f}; "
      f"the 3 least attributed heads: {restored_bottom:.2f}")  # fmt: skip
print(f"mean-ablating heads {label}: red - blue drops by {drop_top:.2f}; "
      f"the 3 least attributed heads: {drop_bottom:.2f}")  # fmt: skip

# %% [markdown]
# ## 4. Down to SAE latents
# Two small TopK SAEs on toyvit's residual stream after blocks 2 and 4, trained on a cache of
# 400 toy-world images. Spliced in with their error term kept, the model computes exactly what
# it did; attribution patching then scores every latent, and the latent circuit adds the edges
# between the top latents of the two layers. The layer-4 SAE gets a feature browser, and the
# circuit's nodes link into it.

# %%
hooks = ["blocks.2.hook_resid_post", "blocks.4.hook_resid_post"]
write_cache(model, IndexedToyWorld(ToyWorld(400, seed=0)), "cache", hooks, batch_size=100,
            shard_size=200, progress=False)  # fmt: skip
saes = {}
for hook in hooks:
    torch.manual_seed(0)
    sae = TopKSAE(d_in=model.d_model, n_latents=256, k=8)
    rows = ActivationDataset("cache", hook, batch_size=512, shuffle_buffer=8192, seed=0)
    fit_simple(sae, rows, steps=250, lr=2e-3, progress=False)
    sae.metadata.update(hook=hook, model="toyvit")
    saes[hook] = sae.eval()
    sae.save(f"sae-{hook.split('.')[1]}")
index = build_index(saes[hooks[1]], "cache", "index", progress=False)
build_browser(index, "browser", title="toyvit block 4 SAE", progress=False)
circuit = C.latent_circuit(model, clean, corrupt, metric, saes, per_layer=4, head=head)
V.circuit_graph(circuit, "circuit.html", browsers={hooks[1]: "browser"},
                title="latents behind red vs blue")  # fmt: skip
for hook, latent, value in circuit.nodes:
    print(f"  {hook}: latent {latent:3d}  attribution {value:+.3f}")

# %% [markdown]
# ### Check by ablation, through the SAE
# Zero-ablate (error term kept) the four latents the circuit found at block 4, then four
# latents that fire on the same images but had the smallest attribution.

# %%
layer4 = hooks[1]
latents = [latent for hook, latent, _ in circuit.nodes if hook == layer4]
scores = C.attribution_patching(
    model, clean, corrupt, metric, hooks=[], saes={layer4: saes[layer4]}, head=head
).latents[layer4]
with torch.no_grad():
    _, cache = model.run_with_cache(clean, layer4)
    fires = (saes[layer4].encode(cache[layer4]) > 0).flatten(0, 1).any(0)
candidates = [i for i in torch.argsort(scores.abs()).tolist() if fires[i] and i not in latents]
quiet = candidates[:4]


def ablate_latents(chosen: list[int]) -> float:
    with torch.no_grad(), steer(model, ablate(saes[layer4], chosen)):
        return float(metric(model(clean)).mean())


latent_drop = clean_metric - ablate_latents(latents)
quiet_drop = clean_metric - ablate_latents(quiet)
print(f"ablating circuit latents {latents}: red - blue drops by {latent_drop:.2f}; "
      f"4 active latents with the least attribution {quiet}: {quiet_drop:.2f}")  # fmt: skip

results = {
    "n_pairs": len(clean_images),
    "clean_metric": clean_metric,
    "corrupt_metric": corrupt_metric,
    "lens_red_minus_blue": lens_diff.tolist(),
    "lens_alignment": lens.alignment.tolist(),
    "dla_max_error": dla_error,
    "dla_top": top_components,
    "head_rank_correlation": rho,
    "top_heads": label,
    "head_patch_restored": {"top": restored_top, "bottom": restored_bottom},
    "head_ablation_drop": {"top": drop_top, "bottom": drop_bottom},
    "circuit": circuit.to_dict(),
    "latent_ablation_drop": {"circuit": latent_drop, "quiet": quiet_drop},
}
with open("results.json", "w") as f:
    json.dump(results, f, indent=1)
print("wrote results.json, heads_*.png, stream_patching.png, circuit.html, browser/")
