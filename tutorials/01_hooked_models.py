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
# `run_with_cache` runs the whole forward, as in TransformerLens, and returns the output and
# `[batch, tokens, d]` per hook (`names_filter`: a name, a list, or a callable `name -> bool`).

# %%
out, cache = model.run_with_cache(x, ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"])
print(tuple(out.shape), {k: tuple(v.shape) for k, v in cache.items()})
_, resid = model.run_with_cache(x, lambda name: name.endswith("hook_resid_post"))
print(sorted(resid))

# %% [markdown]
# Early stopping is opt-in: `stop_at_layer="auto"` stops right after the last requested hook
# fires, `stop_at_layer=n` runs blocks `0..n-1`; the output is then `None`.

# %%
out, early = model.run_with_cache(x, ["blocks.0.hook_resid_post"], stop_at_layer="auto")
assert out is None
assert torch.equal(early["blocks.0.hook_resid_post"], resid["blocks.0.hook_resid_post"])
patch_norms = model.layout.patch_map(cache["blocks.0.hook_resid_post"].norm(dim=-1))
print("per-patch norm grid:", tuple(patch_norms.shape))

# %% [markdown]
# Edit an activation with a hook function: here we zero-ablate the first block's MLP.

# %%
with torch.no_grad():
    clean = model(x)
    with model.hooks({"blocks.0.hook_mlp_out": lambda act, hook: torch.zeros_like(act)}):
        ablated = model(x)
    same = model.run_with_hooks(
        x, fwd_hooks=[("blocks.0.hook_mlp_out", lambda act, hook: torch.zeros_like(act))]
    )
print("logit change from ablating block 0's MLP:", float((clean - ablated).abs().max()))
assert not torch.equal(clean, ablated) and torch.equal(same, ablated)
