# %% [markdown]
# # Hooked models
#
# Load a carded model, look at its token layout, cache activations, and edit one.
# This tutorial runs on the tiny random-init card so it works anywhere; swap in any name from
# `prisma-mm zoo list` (e.g. `"dinov2-b14-reg"` with `weights="pretrained"`) for real work.

# %%
import numpy as np
import torch

import prisma_mm

model = prisma_mm.load_model("tiny-vit", weights=None)
print(model.layout)
print(len(model.hook_names), "hook points, e.g.", model.hook_names[:4])

# %% [markdown]
# `preprocess` takes PIL images, numpy arrays or tensors in any mode and applies the card's
# own transform.

# %%
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8) for _ in range(4)]
x = model.preprocess(images)
print(x.shape)

# %% [markdown]
# `run_with_cache` returns `[batch, tokens, d]` per hook. Asking only for early hooks stops
# the forward right after them (the output is then `None`).

# %%
out, cache = model.run_with_cache(
    x, names=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]
)
print(out, {k: tuple(v.shape) for k, v in cache.items()})
patch_norms = model.layout.patch_map(cache["blocks.0.hook_resid_post"].norm(dim=-1))
print("per-patch norm grid:", tuple(patch_norms.shape))

# %% [markdown]
# Edit an activation with a hook function: here we zero-ablate the first block's MLP.

# %%
with torch.no_grad():
    clean = model(x)
    with model.hooks({"blocks.0.hook_mlp_out": lambda act, hook: torch.zeros_like(act)}):
        ablated = model(x)
print("logit change from ablating block 0's MLP:", float((clean - ablated).abs().max()))
assert not torch.equal(clean, ablated)
