"""Circuit tools for vision transformers: logit lens, direct logit attribution, activation
patching and attribution patching, down to the latents of SAEs spliced into the model.

Every tool reads the model through its hook points (``prisma_mm.hooks``), never a
re-implementation, and maps a residual stream to class logits through a :class:`Readout`
built from the native head:

- timm classifiers (``vit.norm`` -> pool -> ``vit.fc_norm`` -> ``vit.head``), with CLS, average
  or max pooling (the toy ViT pools by max);
- CLIP / SigLIP towers of open_clip and timm, zero-shot: the image embedding is normalised and
  compared with the normalised text embeddings of class prompts, times the logit scale.

A *metric* maps logits ``[batch, classes]`` to one value per example ``[batch]``
(:func:`logit_diff`, :func:`probability`, :func:`kl_divergence`); the tools average it over
the batch. See docs/circuits.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import HookedModel

Metric = Callable[[Tensor], Tensor]  # logits [batch, classes] -> [batch]
PATCH_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "z")
_SUFFIX = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
    "z": "attn.hook_z",
}

__all__ = [
    "AttributionResult",
    "Circuit",
    "DirectLogitAttribution",
    "LogitLens",
    "PatchingResult",
    "Readout",
    "activation_patching",
    "attribution_patching",
    "direct_logit_attribution",
    "head_outputs",
    "kl_divergence",
    "latent_circuit",
    "logit_diff",
    "logit_lens",
    "probability",
    "readout",
]


# ----- metrics -------------------------------------------------------------------------------
def logit_diff(target: int, baseline: int | None = None) -> Metric:
    """``logit[target] - logit[baseline]`` per example (just ``logit[target]`` without one)."""

    def metric(logits: Tensor) -> Tensor:
        value = logits[:, target]
        return value if baseline is None else value - logits[:, baseline]

    metric.__name__ = f"logit_diff({target}, {baseline})"
    return metric


def probability(target: int, multilabel: bool = False) -> Metric:
    """The probability of class ``target``: softmax over classes, or its own sigmoid for a
    multi-label head (one sigmoid per class, as the toy ViT)."""

    def metric(logits: Tensor) -> Tensor:
        if multilabel:
            return torch.sigmoid(logits[:, target])
        return torch.softmax(logits, dim=-1)[:, target]

    metric.__name__ = f"probability({target})"
    return metric


def kl_divergence(reference: Tensor, multilabel: bool = False) -> Metric:
    """KL(reference || patched) per example, from ``reference`` logits ``[batch, classes]``
    (multi-label: the sum over classes of each sigmoid's Bernoulli KL)."""
    reference = reference.detach()

    def metric(logits: Tensor) -> Tensor:
        ref = reference.to(logits.device, logits.dtype)
        if multilabel:
            p, q = torch.sigmoid(ref), torch.sigmoid(logits)
            eps = 1e-7
            p, q = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
            kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            return kl.sum(-1)
        log_p = torch.log_softmax(ref, -1)
        return (log_p.exp() * (log_p - torch.log_softmax(logits, -1))).sum(-1)

    metric.__name__ = "kl_divergence"
    return metric


# ----- readout: residual stream -> logits -----------------------------------------------------
def _layer_norm_frozen(norm: nn.Module, x: Tensor, scale: Tensor | None, bias: bool) -> Tensor:
    """``norm`` at a frozen scale: centring and ``weight / scale``, plus its bias when
    ``bias``. ``scale [..., 1]`` is the clean stream's ``sqrt(var + eps)``."""
    if isinstance(norm, nn.Identity):
        return x
    x = x - x.mean(-1, keepdim=True)
    x = x / scale * norm.weight if norm.weight is not None else x / scale
    return x + norm.bias if bias and norm.bias is not None else x


def _norm_scale(norm: nn.Module, x: Tensor) -> Tensor | None:
    if isinstance(norm, nn.Identity):
        return None
    return torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)


def _check_norm(norm: nn.Module, where: str) -> None:
    if not isinstance(norm, nn.Identity | nn.LayerNorm):
        raise PrismaError(
            f"{where} is a {type(norm).__name__}; direct logit attribution supports LayerNorm "
            "or no norm there"
        )


@dataclass
class Readout:
    """The map from the last residual stream ``[batch, tokens, d]`` to logits
    ``[batch, classes]`` that the model's own head computes, with its per-token form (the
    logit lens of each patch) and a linearisation at a clean stream (for attribution).

    ``kind`` is ``"timm"`` (a classifier head) or ``"clip"`` (zero-shot against ``text``,
    unit-norm class embeddings ``[classes, d_embed]``, times ``logit_scale``).
    """

    kind: str
    model: HookedModel
    text: Tensor | None = None
    logit_scale: float = 1.0
    class_names: list[str] | None = None

    @property
    def _vit(self) -> nn.Module:
        module = self.model.module
        return module.visual.trunk if hasattr(module, "visual") else module

    def __call__(self, resid: Tensor) -> Tensor:
        """Logits ``[batch, classes]`` from the stream after the last block."""
        if self.kind == "timm":
            vit = self._vit
            return vit.forward_head(vit.norm(resid))
        embedding = self._clip_embedding(resid)
        return self._clip_logits(embedding)

    def per_token(self, resid: Tensor) -> Tensor:
        """Logits ``[batch, tokens, classes]``: each token read as if it were the pooled one."""
        if self.kind == "timm":
            vit = self._vit
            return vit.head(vit.fc_norm(vit.norm(resid)))
        visual = self.model.module.visual
        if hasattr(visual, "trunk"):
            trunk = visual.trunk
            tokens = trunk.fc_norm(trunk.norm(resid))
            return self._clip_logits(visual.head(tokens))
        tokens = visual.ln_post(resid)
        return self._clip_logits(tokens @ visual.proj if visual.proj is not None else tokens)

    def _clip_embedding(self, resid: Tensor) -> Tensor:
        visual = self.model.module.visual
        if hasattr(visual, "trunk"):
            return visual.head(visual.trunk.forward_head(visual.trunk.norm(resid)))
        pooled, _ = visual._pool(resid)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def _clip_logits(self, embedding: Tensor) -> Tensor:
        unit = nn.functional.normalize(embedding, dim=-1)
        return self.logit_scale * unit @ self.text.to(unit.dtype).T

    def output_logits(self, output: Tensor) -> Tensor:
        """Logits from the model's own output (identity for classifiers; zero-shot for CLIP)."""
        return output if self.kind == "timm" else self._clip_logits(output)

    # ----- linearisation for direct logit attribution ----------------------------------------
    def linear_map(self, clean_resid: Tensor) -> Callable[..., Tensor]:
        """``f(component [batch, tokens, d], bias=False) -> [batch, classes]``: the head with
        every norm's scale, the max-pool's winning tokens and CLIP's embedding norm frozen at
        ``clean_resid``; linear in the component, and with ``bias=True`` the head's and norms'
        biases added. So ``sum(f(c) for c in components) + f(0, bias=True)`` is the logits
        (see :func:`direct_logit_attribution`)."""
        if self.kind == "timm":
            return self._timm_linear(self._vit, clean_resid, head=True)
        visual = self.model.module.visual
        if hasattr(visual, "trunk"):
            trunk = visual.trunk
            inner = self._timm_linear(trunk, clean_resid, head=False)
            if not isinstance(visual.head, nn.Identity | nn.Linear):
                raise PrismaError("this CLIP tower's projection head is not linear")
            weight = (
                visual.head.weight.T
                if isinstance(visual.head, nn.Linear)
                else torch.eye(trunk.embed_dim)
            )
            embedding = self._clip_embedding(clean_resid)

            def project(component: Tensor, bias: bool = False) -> Tensor:
                out = inner(component, bias) @ weight
                if bias and isinstance(visual.head, nn.Linear) and visual.head.bias is not None:
                    out = out + visual.head.bias
                return self._frozen_clip(out, embedding)

            return project
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise PrismaError(
                "direct logit attribution needs CLS-token or average pooling in the CLIP tower"
            )
        _check_norm(visual.ln_post, "ln_post")
        embedding = self._clip_embedding(clean_resid)
        proj = visual.proj

        def pool(x: Tensor) -> Tensor:
            return x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(1)

        if visual.final_ln_after_pool:
            scale = _norm_scale(visual.ln_post, pool(clean_resid))

            def clip_linear(component: Tensor, bias: bool = False) -> Tensor:
                pooled = _layer_norm_frozen(visual.ln_post, pool(component), scale, bias)
                return self._frozen_clip(pooled @ proj, embedding)

            return clip_linear
        token_scale = _norm_scale(visual.ln_post, clean_resid)

        def clip_linear_pre(component: Tensor, bias: bool = False) -> Tensor:
            normed = _layer_norm_frozen(visual.ln_post, component, token_scale, bias)
            return self._frozen_clip(pool(normed) @ proj, embedding)

        return clip_linear_pre

    def _frozen_clip(self, part: Tensor, embedding: Tensor) -> Tensor:
        norm = embedding.norm(dim=-1, keepdim=True)
        return self.logit_scale * (part / norm) @ self.text.to(part.dtype).T

    def _timm_linear(self, vit: nn.Module, clean: Tensor, head: bool) -> Callable:
        if getattr(vit, "attn_pool", None) is not None:
            raise PrismaError(
                "this model pools with attention (a MAP head), which is not linear in the "
                "stream: direct logit attribution needs CLS, average or max pooling"
            )
        _check_norm(vit.norm, "the final norm")
        _check_norm(vit.fc_norm, "fc_norm")
        pool_type = vit.global_pool
        n_prefix = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens
        token_scale = _norm_scale(vit.norm, clean)
        normed_clean = vit.norm(clean)
        winners = None
        if pool_type in ("max", "avgmax"):
            # max pooling picks one token per channel: freeze which, as the clean run chose
            winners = normed_clean[:, n_prefix:].argmax(dim=1, keepdim=True)

        def pool(x: Tensor) -> Tensor:
            if pool_type == "token":
                return x[:, 0]
            body = x[:, n_prefix:]
            if pool_type == "avg":
                return body.mean(1)
            picked = body.gather(1, winners).squeeze(1)
            return picked if pool_type == "max" else 0.5 * (picked + body.mean(1))

        if pool_type not in ("token", "avg", "max", "avgmax"):
            raise PrismaError(f"global_pool={pool_type!r} is not supported by attribution")
        pooled_scale = _norm_scale(vit.fc_norm, vit.pool(normed_clean))
        weight = vit.head.weight if head and isinstance(vit.head, nn.Linear) else None
        if head and weight is None:
            raise PrismaError("the classifier head is not one linear layer")

        def linear(component: Tensor, bias: bool = False) -> Tensor:
            normed = _layer_norm_frozen(vit.norm, component, token_scale, bias)
            pooled = _layer_norm_frozen(vit.fc_norm, pool(normed), pooled_scale, bias)
            if weight is None:
                return pooled
            out = pooled @ weight.T
            return out + vit.head.bias if bias and vit.head.bias is not None else out

        return linear


def readout(
    model: HookedModel,
    class_prompts: Sequence[str] | None = None,
    *,
    logit_scale: float | None = None,
) -> Readout:
    """The :class:`Readout` of ``model``: its classifier head, or for CLIP / SigLIP cards the
    zero-shot head over ``class_prompts`` (required there; e.g. ``"a photo of a {name}"``)."""
    module = model.module
    if hasattr(module, "visual"):  # open_clip
        if not class_prompts:
            raise PrismaError(
                "a CLIP / SigLIP model reads out onto text embeddings: pass class_prompts"
            )
        text = model.encode_text(list(class_prompts))
        if logit_scale is None:
            scale = getattr(module, "logit_scale", None)
            logit_scale = float(scale.detach().exp()) if isinstance(scale, Tensor) else 100.0
        return Readout("clip", model, text, logit_scale, list(class_prompts))
    for attribute in ("forward_head", "norm", "fc_norm", "head"):
        if not hasattr(module, attribute):
            raise PrismaError(
                f"{type(module).__name__} has no timm classifier head ({attribute!r} missing): "
                "circuit tools read out through timm classifiers or CLIP towers"
            )
    if isinstance(module.head, nn.Identity):
        raise PrismaError(
            "this card has no classifier head (an embedding model): use a classifier or a "
            "CLIP card with class prompts"
        )
    return Readout("timm", model)


def _last_resid(model: HookedModel) -> str:
    return f"blocks.{model.n_layers - 1}.hook_resid_post"


# ----- logit lens ----------------------------------------------------------------------------
@dataclass
class LogitLens:
    """``logits [layers, batch, classes]``: the readout applied to each block's output stream;
    ``per_token [layers, batch, tokens, classes]``: each token read on its own (the lens of
    each patch); ``alignment [layers]``: mean cosine between a layer's read-out embedding
    (or logits) and the final one's, which says how far intermediate layers live in the
    output space (CLIP's projection is trained only on the last layer)."""

    logits: Tensor
    per_token: Tensor
    alignment: Tensor
    final: Tensor  # the model's own logits [batch, classes]


def logit_lens(model: HookedModel, x: Tensor, head: Readout | None = None) -> LogitLens:
    """The logit lens of ``x [batch, 3, H, W]`` at every block (after its residual update)."""
    head = head or readout(model)
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)]
    with torch.no_grad():
        output, cache = model.run_with_cache(x, names)
        final = head.output_logits(output)
        logits = torch.stack([head(cache[n]) for n in names])
        per_token = torch.stack([head.per_token(cache[n]) for n in names])
    alignment = nn.functional.cosine_similarity(logits, final.unsqueeze(0), dim=-1).mean(-1)
    return LogitLens(logits, per_token, alignment, final)


# ----- direct logit attribution --------------------------------------------------------------
def head_outputs(model: HookedModel, layer: int, cache: Mapping[str, Tensor]) -> Tensor:
    """Each attention head's write into the stream ``[batch, tokens, heads, d]`` at ``layer``
    (without the output projection's bias), from a cache holding ``attn.hook_z`` (timm) or
    ``attn.hook_pattern`` and ``attn.hook_v`` (``nn.MultiheadAttention``)."""
    block = model.spec.blocks[layer]
    bs = model.spec.block_spec
    attn = block.get_submodule(bs.attn)
    prefix = f"blocks.{layer}.attn."
    if isinstance(attn, nn.MultiheadAttention):
        pattern, v = cache[prefix + "hook_pattern"], cache[prefix + "hook_v"]
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        weight = attn.out_proj.weight
    else:
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or (
            getattr(attn, "gate", None) is not None
        ):
            raise PrismaError(
                f"block {layer}'s attention normalises or gates z before its projection, so "
                "heads do not add up linearly"
            )
        z = cache[prefix + "hook_z"]
        weight = attn.proj.weight
    heads, d_head = z.shape[-2], z.shape[-1]
    w = weight.view(weight.shape[0], heads, d_head)  # [d, heads, d_head]
    out = torch.einsum("bthe,dhe->bthd", z, w)
    return _layer_scale(block, bs.attn_branch, out)


def _layer_scale(block: nn.Module, branch: str, out: Tensor) -> Tensor:
    """Apply the branch's LayerScale (timm ``ls1``, EVA's ``gamma_1``, open_clip ``ls_1``)
    to ``out [..., d]``."""
    if isinstance(getattr(block, "gamma_1", None), Tensor):
        return out * block.gamma_1
    names = {"drop_path1": "ls1", "ls_1": "ls_1"}
    scale = getattr(block, names.get(branch, ""), None)
    if scale is None or isinstance(scale, nn.Identity):
        return out
    gamma = getattr(scale, "gamma", None)
    if gamma is None:
        raise PrismaError(f"{type(scale).__name__} is not a LayerScale: heads cannot be split")
    return out * gamma


def _bias_of(model: HookedModel, layer: int, d: int) -> Tensor:
    block = model.spec.blocks[layer]
    attn = block.get_submodule(model.spec.block_spec.attn)
    proj = attn.out_proj if isinstance(attn, nn.MultiheadAttention) else attn.proj
    bias = proj.bias if proj.bias is not None else torch.zeros(d)
    return _layer_scale(block, model.spec.block_spec.attn_branch, bias)


def _head_cache_names(model: HookedModel, layer: int) -> list[str]:
    attn = model.spec.blocks[layer].get_submodule(model.spec.block_spec.attn)
    if isinstance(attn, nn.MultiheadAttention):
        return [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    return [f"blocks.{layer}.attn.hook_z"]


@dataclass
class DirectLogitAttribution:
    """``values [components, batch, classes]``: each component's direct effect on the logits,
    through the head's linear part with the clean run's norm scales frozen. ``names`` label
    the components: ``embed``, ``L{l}H{h}`` (heads), ``L{l}.attn_bias``, ``L{l}.mlp``.
    ``bias`` is the head's and norms' biases through the frozen head, computed on its own, so
    ``values.sum(0) + bias`` equals ``logits`` only if the decomposition is complete."""

    names: list[str]
    values: Tensor
    bias: Tensor  # [batch, classes]: the head's and norms' biases through the frozen head
    logits: Tensor  # [batch, classes]: the model's logits

    def of(self, target: int) -> dict[str, float]:
        """Mean attribution of each component to class ``target``, largest first."""
        means = self.values[:, :, target].mean(1)
        order = torch.argsort(means.abs(), descending=True)
        return {self.names[i]: float(means[i]) for i in order}

    def heads(self, model: HookedModel, target: int) -> Tensor:
        """``[layers, heads]``: mean attribution of each head to class ``target``."""
        rows = []
        for layer in range(model.n_layers):
            row = [
                self.values[self.names.index(f"L{layer}H{h}"), :, target].mean()
                for h in range(self.n_heads)
            ]
            rows.append(torch.stack(row))
        return torch.stack(rows)

    @property
    def n_heads(self) -> int:
        return sum(1 for n in self.names if n.startswith("L0H"))


def direct_logit_attribution(
    model: HookedModel, x: Tensor, head: Readout | None = None
) -> DirectLogitAttribution:
    """Decompose the last residual stream of ``x`` into the embedding, every attention head
    (through ``hook_z`` and the output projection, or pattern x v for
    ``nn.MultiheadAttention``), each layer's attention bias and each MLP, and project each
    onto every class through the head with the final norms' scales frozen."""
    head = head or readout(model)
    names = ["blocks.0.hook_resid_pre", _last_resid(model)]
    for layer in range(model.n_layers):
        names += [*_head_cache_names(model, layer), f"blocks.{layer}.hook_mlp_out"]
    with torch.no_grad():
        output, cache = model.run_with_cache(x, names)
        logits = head.output_logits(output)
        linear = head.linear_map(cache[_last_resid(model)])
        labels, values = ["embed"], [linear(cache["blocks.0.hook_resid_pre"])]
        for layer in range(model.n_layers):
            per_head = head_outputs(model, layer, cache)  # [b, t, heads, d]
            for h in range(per_head.shape[2]):
                labels.append(f"L{layer}H{h}")
                values.append(linear(per_head[:, :, h]))
            bias = _bias_of(model, layer, per_head.shape[-1]).to(per_head.dtype)
            labels.append(f"L{layer}.attn_bias")
            values.append(linear(bias.expand_as(per_head[:, :, 0])))
            labels.append(f"L{layer}.mlp")
            values.append(linear(cache[f"blocks.{layer}.hook_mlp_out"]))
        stacked = torch.stack(values)
        bias = linear(torch.zeros_like(cache[_last_resid(model)]), bias=True)
    return DirectLogitAttribution(labels, stacked, bias, logits)


# ----- activation patching -------------------------------------------------------------------
@dataclass
class PatchingResult:
    """``values [layers, units]``: the metric (mean over the batch) with one unit of the
    clean run patched into the corrupted run. ``kind`` says the hook (``resid_pre``, ...,
    ``z``); units are positions (tokens), heads, or ``1`` (the whole activation)."""

    kind: str
    by: str
    values: Tensor
    clean: float
    corrupt: float

    def normalized(self) -> Tensor:
        """``(value - corrupt) / (clean - corrupt)``: 1 = patching this unit restores the clean
        metric, 0 = no effect."""
        gap = self.clean - self.corrupt
        return (self.values - self.corrupt) / (gap if abs(gap) > 1e-12 else 1e-12)


def _hook_name(kind: str, layer: int, model: HookedModel | None = None) -> str:
    """The hook of ``kind`` at ``layer``: a short kind, or any per-block hook suffix the model
    offers (``ln2.hook_normalized``, ``mlp.hook_post``, ...) for generic patching."""
    if kind in PATCH_KINDS:
        return f"blocks.{layer}.{_SUFFIX[kind]}"
    if model is not None and f"blocks.{layer}.{kind}" in model.hook_names:
        return f"blocks.{layer}.{kind}"
    raise PrismaError(
        f"patching kind {kind!r}: choose one of {', '.join(PATCH_KINDS)} or a per-block hook "
        "suffix of model.hook_names (e.g. mlp.hook_post)"
    )


def _metric_value(model: HookedModel, head: Readout, metric: Metric, x: Tensor) -> Tensor:
    return metric(head.output_logits(model(x)))


def _check_pair(clean: Tensor, corrupt: Tensor) -> None:
    if clean.shape != corrupt.shape:
        raise PrismaError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupt.shape)} inputs must have "
            "the same shape (one corrupted image per clean image)"
        )


def activation_patching(
    model: HookedModel,
    clean: Tensor,
    corrupt: Tensor,
    metric: Metric,
    kind: str = "resid_pre",
    by: str = "position",
    *,
    head: Readout | None = None,
    layers: Sequence[int] | None = None,
    chunk: int = 16,
) -> PatchingResult:
    """Patch the clean run's activations into the corrupted run, one unit at a time, at every
    block (or ``layers``), and record the metric.

    ``kind``: ``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_post``, ``z`` (heads), or
    any per-block hook suffix the model offers (``mlp.hook_post``, ``ln2.hook_normalized``).
    ``by``: ``position`` (one token, every channel; for ``z`` all heads at that token),
    ``head`` (``z`` only: one head at every token), ``all`` (the whole activation).
    Patches run ``chunk`` at a time as one batch of copies of the corrupted input.
    """
    _check_pair(clean, corrupt)
    if by not in ("position", "head", "all"):
        raise PrismaError(f"by={by!r}: use position, head or all")
    if by == "head" and kind not in ("z", "attn.hook_z"):
        raise PrismaError("patching by head needs kind='z' (the heads' outputs before mixing)")
    head = head or readout(model)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise PrismaError(f"layers {bad} are outside 0..{model.n_layers - 1}")
    names = [_hook_name(kind, layer, model) for layer in layers]
    with torch.no_grad():
        output, cache = model.run_with_cache(clean, names)
        clean_value = float(metric(head.output_logits(output)).mean())
        corrupt_value = float(_metric_value(model, head, metric, corrupt).mean())
        rows = []
        batch = clean.shape[0]
        for name in names:
            act = cache[name]
            units = {"position": act.shape[1], "head": act.shape[2], "all": 1}[by]
            row = []
            for start in range(0, units, chunk):
                ids = list(range(start, min(units, start + chunk)))

                def patch(value: Tensor, _point, ids=ids, act=act) -> Tensor:
                    value = value.clone()
                    for i, unit in enumerate(ids):
                        rows_i = slice(i * batch, (i + 1) * batch)
                        if by == "position":
                            value[rows_i, unit] = act[:, unit]
                        elif by == "head":
                            value[rows_i, :, unit] = act[:, :, unit]
                        else:
                            value[rows_i] = act
                    return value

                copies = corrupt.repeat(len(ids), *([1] * (corrupt.dim() - 1)))
                with model.hooks({name: patch}):
                    values = _metric_value(model, head, metric, copies)
                row += [float(v) for v in values.view(len(ids), batch).mean(1)]
            rows.append(row)
    return PatchingResult(kind, by, torch.tensor(rows), clean_value, corrupt_value)


# ----- attribution patching ------------------------------------------------------------------
@dataclass
class AttributionResult:
    """First-order estimates of patching each unit from clean into corrupted:
    ``(a_clean - a_corrupt) . d metric / d a`` at the corrupted run, mean over the batch.

    ``positions[name] [tokens]`` per hook (for ``hook_z``: every head at a token);
    ``heads[name] [heads]`` for ``hook_z`` (a head at every token); ``latents[hook]
    [n_latents]`` and ``latent_positions[hook] [tokens, n_latents]`` for the SAEs spliced in.
    """

    positions: dict[str, Tensor]
    heads: dict[str, Tensor]
    latents: dict[str, Tensor]
    latent_positions: dict[str, Tensor]
    clean: float
    corrupt: float

    def head_matrix(self, model: HookedModel) -> Tensor:
        """``[layers, heads]`` head attributions."""
        return torch.stack(
            [self.heads[f"blocks.{layer}.attn.hook_z"] for layer in range(model.n_layers)]
        )

    def top_latents(self, n: int = 10) -> list[tuple[str, int, float]]:
        """The ``n`` latents with the largest |attribution|, over every spliced SAE."""
        rows = [
            (hook, int(i), float(v))
            for hook, values in self.latents.items()
            for i, v in enumerate(values)
        ]
        return sorted(rows, key=lambda r: -abs(r[2]))[:n]


def default_attribution_hooks(model: HookedModel) -> list[str]:
    """Every block's ``resid_pre``, ``attn.hook_z`` (where offered), ``attn_out`` and
    ``mlp_out``."""
    names = []
    for layer in range(model.n_layers):
        for kind in ("resid_pre", "z", "attn_out", "mlp_out"):
            name = _hook_name(kind, layer)
            if name in model.hook_names:
                names.append(name)
    return names


@contextlib.contextmanager
def _frozen_parameters(module: nn.Module) -> Iterator[None]:
    """No parameter gradients (only activations'), restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _encode(sae: Any, act: Tensor) -> Tensor:
    return sae.encode(act.reshape(-1, act.shape[-1])).view(*act.shape[:-1], -1)


def attribution_patching(
    model: HookedModel,
    clean: Tensor,
    corrupt: Tensor,
    metric: Metric,
    *,
    hooks: Sequence[str] | None = None,
    saes: Mapping[str, Any] | None = None,
    head: Readout | None = None,
) -> AttributionResult:
    """Attribution patching over every hook (default :func:`default_attribution_hooks`),
    every head, and the latents of ``saes`` (``{hook: dictionary}``, spliced in with their
    error term kept, so the model computes exactly what it did), from one clean forward and
    one corrupted forward + backward."""
    _check_pair(clean, corrupt)
    head = head or readout(model)
    hooks = default_attribution_hooks(model) if hooks is None else list(hooks)
    saes = dict(saes or {})
    for hook in saes:
        model.hook_point(hook)
    names = list(dict.fromkeys([*hooks, *saes]))
    with torch.no_grad():
        output, clean_cache = model.run_with_cache(clean, names)
        clean_value = float(metric(head.output_logits(output)).mean())
        clean_codes = {h: _encode(sae, clean_cache[h]) for h, sae in saes.items()}

    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    codes: dict[str, Tensor] = {}
    first = min(names, key=lambda n: model.hook_point(n).order)

    def record(value: Tensor, point) -> Tensor | None:
        name = point.name
        if name == first and not value.requires_grad:
            # the stream becomes the graph's leaf here, so every later activation has a grad
            value = value.detach().requires_grad_(True)
        if name in hooks:
            acts[name] = value
            value.register_hook(lambda g, name=name: grads.__setitem__(name, g))
        if name in saes:
            sae = saes[name]
            # the code is a leaf of its own: the stream reads decode(code) + error with the
            # error held fixed, so the gradient reaches the latents through the decoder while
            # upstream activations get exactly the unspliced model's gradient
            code = _encode(sae, value).detach().requires_grad_(True)
            code.register_hook(lambda g, name=name: grads.__setitem__("sae:" + name, g))
            codes[name] = code
            recon = sae.decode(code.reshape(-1, code.shape[-1])).view_as(value)
            return recon + (value - recon.detach())
        # handed back, so the forward continues from this very tensor (a view, as hook_z,
        # would otherwise be left out of the graph and get no gradient)
        return value

    with _frozen_parameters(model.module), torch.enable_grad():
        with contextlib.ExitStack() as stack:
            for sae in saes.values():
                stack.enter_context(_frozen_parameters(sae))
            with model.hooks({name: record for name in names}):
                values = metric(head.output_logits(model(corrupt)))
            corrupt_value = float(values.detach().mean())
            values.mean().backward()

    positions, heads = {}, {}
    for name in hooks:
        delta = (clean_cache[name] - acts[name].detach()) * grads[name]
        if delta.dim() == 4:  # hook_z: [batch, tokens, heads, d_head]
            heads[name] = delta.sum(-1).sum(1).mean(0)
            positions[name] = delta.sum((-1, -2)).mean(0)
        else:
            positions[name] = delta.sum(-1).mean(0)
    latents, latent_positions = {}, {}
    for name in saes:
        delta = (clean_codes[name] - codes[name].detach()) * grads["sae:" + name]
        latent_positions[name] = delta.mean(0)
        latents[name] = delta.sum(1).mean(0)
    return AttributionResult(
        positions, heads, latents, latent_positions, clean_value, corrupt_value
    )


# ----- latent circuits -----------------------------------------------------------------------
@dataclass
class Circuit:
    """A small graph of SAE latents behind a metric: ``nodes`` ``(hook, latent, attribution)``
    (the metric's attribution), ``edges`` ``(source, target, weight)`` between nodes of
    consecutive SAEs (indices into ``nodes``): the attribution of the source latent to the
    target latent's activation, summed over positions."""

    nodes: list[tuple[str, int, float]]
    edges: list[tuple[int, int, float]] = field(default_factory=list)
    clean: float = 0.0
    corrupt: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [{"hook": h, "latent": i, "attribution": a} for h, i, a in self.nodes],
            "edges": [{"source": s, "target": t, "weight": w} for s, t, w in self.edges],
            "clean": self.clean,
            "corrupt": self.corrupt,
        }


def latent_circuit(
    model: HookedModel,
    clean: Tensor,
    corrupt: Tensor,
    metric: Metric,
    saes: Mapping[str, Any],
    *,
    per_layer: int = 4,
    head: Readout | None = None,
) -> Circuit:
    """The ``per_layer`` latents of each spliced SAE with the largest |attribution| to the
    metric, and the edges between the nodes of consecutive SAEs (in forward order), each
    from one more backward of the downstream latent's activation."""
    head = head or readout(model)
    order = sorted(saes, key=lambda n: model.hook_point(n).order)
    result = attribution_patching(model, clean, corrupt, metric, hooks=[], saes=saes, head=head)
    nodes: list[tuple[str, int, float]] = []
    for hook in order:
        values = result.latents[hook]
        top = torch.argsort(values.abs(), descending=True)[:per_layer]
        nodes += [(hook, int(i), float(values[i])) for i in top]
    edges: list[tuple[int, int, float]] = []
    for upstream, downstream in zip(order, order[1:], strict=False):
        sources = [k for k, n in enumerate(nodes) if n[0] == upstream]
        for t in [k for k, n in enumerate(nodes) if n[0] == downstream]:
            store: dict[str, Tensor] = {}

            def keep(value: Tensor, _point, store=store, sae=saes[downstream]) -> None:
                store["code"] = _encode(sae, value)

            def activation(_logits: Tensor, store=store, latent=nodes[t][1]) -> Tensor:
                # the downstream latent's activation, summed over positions [batch]
                return store["code"][..., latent].sum(-1)

            with model.hooks({downstream: keep}):
                inner = attribution_patching(
                    model,
                    clean,
                    corrupt,
                    activation,
                    hooks=[],
                    saes={upstream: saes[upstream]},
                    head=head,
                )
            for s in sources:
                edges.append((s, t, float(inner.latents[upstream][nodes[s][1]])))
    return Circuit(nodes, edges, result.clean, result.corrupt)


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equally long sets of values."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.size != y.size or x.size < 2:
        raise PrismaError("rank correlation needs two sets of at least 2 equal-length values")
    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else 0.0
