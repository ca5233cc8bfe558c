# %% [markdown]
# # Spliced-in evaluation, and steering a classifier with a feature
#
# An SAE is only useful if the model still works when its reconstruction replaces the
# activation (**spliced-in evaluation**), and a feature is only understood if moving it moves
# the model's output the way its meaning predicts (**steering**). Both run here on the toy
# ViT (`toyvit`), which predicts all 44 toy-world factor values with one sigmoid each: we
# train a small SAE, splice it in, index its features, find the one that detects red, and
# add, scale and ablate it. About a minute on CPU; outputs (`cache/`, `sae/`, `index/`,
# `steering.png`, `results.json`) land in the working directory.
#
# **On real pretrained weights**: use a saved dictionary trained on a real model's cache
# (tutorial 02), `prisma-mm index DICT CACHE --out INDEX` for its feature index, and a
# labelled image folder as the batches; `spliced_eval` and `steering_effect` take a
# classifier card's logits (single-label: integer labels) or a CLIP / SigLIP card's zero-shot
# logits (`class_names=`), e.g. `prisma_mm.load_model("clip-b32-openai", weights="pretrained")`.

# %%
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import prisma_mm
from prisma_mm.analysis.spliced import spliced_eval
from prisma_mm.cache import write_cache
from prisma_mm.cache.reader import ActivationDataset
from prisma_mm.data.toyworld import VALUE_INDEX, VALUE_NAMES, ToyWorld, collate
from prisma_mm.demo import IndexedToyWorld
from prisma_mm.sae import TopKSAE, fit_simple
from prisma_mm.steer import AddFeature, EditFeatures, steer, steering_effect, token_mask
from prisma_mm.viz.index import build_index

torch.set_num_threads(1)  # tiny tensors: one thread is faster than two that contend
HOOK = "blocks.3.hook_resid_post"
model = prisma_mm.load_model("toyvit")

# %% [markdown]
# ## 1. A cache and an SAE trained on it

# %%
write_cache(model, IndexedToyWorld(ToyWorld(400, seed=0)), "cache", [HOOK], batch_size=100,
            shard_size=200, progress=False)  # fmt: skip
rows = ActivationDataset("cache", HOOK, batch_size=512, shuffle_buffer=8192, seed=0)
torch.manual_seed(0)
sae = TopKSAE(d_in=model.d_model, n_latents=256, k=16)
fit_simple(sae, rows, steps=400, lr=2e-3, progress=False)
sae.metadata.update(hook=HOOK, model="toyvit")
sae.eval().save("sae")
print(sae)

# %% [markdown]
# ## 2. Spliced-in evaluation on held-out images
# Modes: the model with the SAE's reconstruction in place of the activation (`spliced`), the
# reconstruction plus its error term (`with_error`, which must give back the clean model), and
# zero / mean ablation of the layer. `score_mean` is the share of the mean-ablation loss gap
# the SAE closes (1 = as good as clean).

# %%
held_out = ToyWorld(200, seed=0, start=100_000)
images, labels = collate([held_out[i] for i in range(len(held_out))])
x = model.preprocess(list(images.numpy()))
y = labels["multi_hot"].float()  # [200, 44] multi-hot: one label per factor value
batches = [(x[i : i + 50], y[i : i + 50]) for i in range(0, len(x), 50)]
spliced = spliced_eval(model, sae, batches, task="multilabel", progress=False)
for name, value in spliced.rows():
    print(f"{name:>22}  {value}")

# %% [markdown]
# ## 3. The feature index and the red detector
# One streaming pass over the cache gives, per latent, its top images, firing frequency and
# `mean_active`, the mean code value when the latent fires: steering strengths are in units
# of it. The red detector is the latent whose strongest patch activation per image correlates
# best with the image's `colour=red` label.

# %%
index = build_index(sae, "cache", "index", progress=False)
red = VALUE_INDEX["colour=red"]
with torch.no_grad():
    _, cache = model.run_with_cache(x, HOOK)
    code = sae.encode(cache[HOOK])  # [200, 65, 256]
score = code[:, model.layout.n_prefix :].amax(1)  # [200, 256]: max over patches
s, lab = score - score.mean(0), y[:, red] - y[:, red].mean()
corr = (s * lab[:, None]).sum(0) / (s.norm(dim=0) * lab.norm()).clamp_min(1e-9)
latent = int(corr.argmax())
mean_active = float(index.mean_active[latent])
print(f"red detector: latent {latent}, correlation {float(corr[latent]):.3f}, "
      f"fires on {float(index.freq_token[latent]):.3%} of tokens, mean active {mean_active:.2f}")  # fmt: skip

# %% [markdown]
# ## 4. Steering: add the red feature to images with nothing red
# `AddFeature` adds `strength x mean_active x W_dec[latent]` at every patch token; strength 0
# leaves the model bit-identical. We sweep the strength and watch the red logit and the share
# of images the model now calls red.

# %%
patches = token_mask(model.layout, patches=torch.ones(model.layout.grid[1:], dtype=torch.bool))
not_red = y[:, red] == 0
clean_batch = [(x[not_red][:80], y[not_red][:80])]
with torch.no_grad():
    clean_logits = model(x[:20])
    with steer(model, AddFeature(sae, latent, 0.0, scale=index, mask=patches)):
        assert torch.equal(model(x[:20]), clean_logits)  # strength 0: bit-identical
sweep = []
for strength in [0.0, 0.25, 0.5, 1.0, 2.0]:
    add = AddFeature(sae, latent, strength, scale=index, mask=patches)
    effect = steering_effect(model, add, clean_batch, class_names=VALUE_NAMES)
    sweep.append(
        {
            "strength": strength,
            "red_logit_delta": float(effect.logit_delta[red]),
            "predicted_red": float(effect.predicted_steered[red]),
            "accuracy": effect.accuracy_steered,
            "top_class": (effect.top_classes(1) or [(None, 0.0)])[0][0],
        }
    )
    print(sweep[-1])
print("most moved classes at strength 2:", effect.top_classes(4))

fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
ax.plot([r["strength"] for r in sweep], [r["predicted_red"] for r in sweep], "o-", color="C3",
        label="images called red")  # fmt: skip
ax.plot([r["strength"] for r in sweep], [r["accuracy"] for r in sweep], "s--", color="C0",
        label="accuracy (all 44 values)")  # fmt: skip
ax.set_xlabel("strength (x mean activation)")
ax.set_ylabel("fraction")
ax.set_ylim(0, 1.05)
ax.set_title(f"adding latent {latent} (red) to non-red images")
ax.legend(loc="center right")
fig.tight_layout()
fig.savefig("steering.png")

# %% [markdown]
# ## 5. Ablating it through the SAE, error term kept
# `EditFeatures(sae, {latent: 0.0})` encodes the activation, sets the latent to 0 and adds
# back `decode(edited) - decode(code)`: the SAE's reconstruction error stays in, so only the
# feature changes. On images with red objects the red logit should fall. A token mask limits
# an edit to some patches: here the red feature is added in the top-left quadrant only.

# %%
is_red = [(x[~not_red][:60], y[~not_red][:60])]
ablation = steering_effect(model, EditFeatures(sae, {latent: 0.0}), is_red, class_names=VALUE_NAMES)
print(f"ablating on red images: red logit {float(ablation.logit_delta[red]):+.2f}, called red "
      f"{float(ablation.predicted_clean[red]):.2f} -> {float(ablation.predicted_steered[red]):.2f}")  # fmt: skip
quadrant = torch.zeros(model.layout.grid[1:], dtype=torch.bool)
quadrant[:4, :4] = True
local = AddFeature(sae, latent, 2.0, scale=index, mask=token_mask(model.layout, patches=quadrant))
local_effect = steering_effect(model, local, clean_batch, class_names=VALUE_NAMES)
print(f"red added in the top-left quadrant only: red logit "
      f"{float(local_effect.logit_delta[red]):+.2f}, called red "
      f"{float(local_effect.predicted_steered[red]):.2f}")  # fmt: skip

# %%
results = {
    "spliced": spliced.to_dict(),
    "red_latent": latent,
    "red_correlation": float(corr[latent]),
    "mean_active": mean_active,
    "sweep": sweep,
    "ablation_red_logit_delta": float(ablation.logit_delta[red]),
    "ablation_predicted_red": [
        float(ablation.predicted_clean[red]),
        float(ablation.predicted_steered[red]),
    ],
    "quadrant_red_logit_delta": float(local_effect.logit_delta[red]),
}
Path("results.json").write_text(json.dumps(results, indent=2))
print(json.dumps({k: v for k, v in results.items() if k != "spliced"}, indent=2))
