"""Circuit tools: logit lens, direct logit attribution, activation and attribution patching
(also over SAE latents), latent circuits and their views, on toyvit and the tiny cards."""

from __future__ import annotations

import dataclasses
import html
import re

import pytest
import torch
from sae_helpers import exact_sae

import prisma_mm
from prisma_mm.analysis import circuits as C
from prisma_mm.data.toyworld import VALUE_INDEX, ToyWorld, render_scene
from prisma_mm.errors import PrismaError
from prisma_mm.sae import TopKSAE
from prisma_mm.viz import circuits as V

RED, BLUE = VALUE_INDEX["colour=red"], VALUE_INDEX["colour=blue"]


@pytest.fixture(scope="module")
def toy():
    """toyvit, 6 one-object scenes with a red object (clean) and the same scenes with it blue
    (corrupted), and the red-vs-blue logit difference."""
    torch.set_num_threads(1)
    model = prisma_mm.load_model("toyvit")
    world = ToyWorld(300, seed=0)
    clean, corrupt = [], []
    for i in range(len(world)):
        scene = world.scene(i)
        if scene.count == 1 and scene.objects[0].colour == "red":
            blue = dataclasses.replace(scene.objects[0], colour="blue")
            clean.append(render_scene(scene)[0])
            corrupt.append(render_scene(dataclasses.replace(scene, objects=(blue,)))[0])
    assert len(clean) >= 6
    return model, model.preprocess(clean[:6]), model.preprocess(corrupt[:6]), clean[:6]


@pytest.fixture(scope="module")
def tiny_models():
    return {name: prisma_mm.load_model(name) for name in ("tiny-vit", "tiny-clip", "tiny-eva02")}


def _head(model, name):
    return C.readout(model, ["a red circle", "a blue square", "a star"] if "clip" in name else None)


def test_logit_lens_at_the_last_layer_is_the_models_logits(toy, tiny_models):
    model, clean, _, _ = toy
    lens = C.logit_lens(model, clean)
    with torch.no_grad():
        logits = model(clean)
    assert torch.equal(lens.logits[-1], logits)
    assert lens.per_token.shape == (6, 6, model.layout.n_tokens, 44)
    # toyvit max-pools: the pooled logit is at least each patch's own, per channel of the pool,
    # and the last layer aligns perfectly with itself while the first does not
    assert lens.alignment[-1] == pytest.approx(1.0) and lens.alignment[0] < 0.99
    for name, tiny in tiny_models.items():
        x = torch.randn(2, 3, *tiny.layout.input_size, generator=torch.Generator().manual_seed(0))
        tl = C.logit_lens(tiny, x, _head(tiny, name))
        assert torch.allclose(tl.logits[-1], tl.final, atol=1e-6), name


def test_direct_logit_attribution_sums_to_the_logits(toy, tiny_models):
    model, clean, _, _ = toy
    dla = C.direct_logit_attribution(model, clean)
    assert dla.values.shape == (1 + 6 * (4 + 2), 6, 44)  # embed + per layer 4 heads, bias, mlp
    assert (dla.values.sum(0) + dla.bias - dla.logits).abs().max() < 1e-4
    # the bias is the head's and fc_norm's, computed on its own
    vit = model.module
    expected_bias = vit.head.bias + vit.head.weight @ vit.fc_norm.bias
    assert torch.allclose(dla.bias, expected_bias.expand_as(dla.bias), atol=1e-5)
    # leaving out any one component breaks the sum
    assert (dla.values[1:].sum(0) + dla.bias - dla.logits).abs().max() > 1e-3
    for name, tiny in tiny_models.items():
        x = torch.randn(2, 3, *tiny.layout.input_size, generator=torch.Generator().manual_seed(1))
        d = C.direct_logit_attribution(tiny, x, _head(tiny, name))
        scale = d.logits.abs().max()
        assert (d.values.sum(0) + d.bias - d.logits).abs().max() <= 1e-4 * max(1.0, scale), name


def test_heads_add_up_to_the_attention_branch(toy):
    model, clean, _, _ = toy
    names = ["blocks.2.attn.hook_z", "blocks.2.hook_attn_out"]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names)
        heads = C.head_outputs(model, 2, cache)
    bias = model.spec.blocks[2].attn.proj.bias
    assert torch.allclose(heads.sum(2) + bias, cache["blocks.2.hook_attn_out"], atol=1e-5)


def test_patching_clean_into_clean_changes_nothing(toy):
    model, clean, _, _ = toy
    metric = C.logit_diff(RED, BLUE)
    kinds = (("resid_pre", "position"), ("z", "head"), ("mlp_out", "position"),
             ("mlp.hook_post", "all"))  # fmt: skip
    for kind, by in kinds:
        result = C.activation_patching(
            model, clean[:2], clean[:2], metric, kind=kind, by=by, layers=[0, 5], chunk=65
        )
        assert result.clean == result.corrupt
        assert torch.allclose(result.values, torch.full_like(result.values, result.clean),
                              atol=1e-5), kind  # fmt: skip


def test_patching_the_whole_stream_restores_the_clean_metric(toy):
    model, clean, corrupt, _ = toy
    metric = C.logit_diff(RED, BLUE)
    result = C.activation_patching(model, clean, corrupt, metric, kind="resid_pre", by="all")
    assert result.clean > 5 > -5 > result.corrupt  # toyvit tells red from blue
    assert torch.allclose(result.values, torch.full_like(result.values, result.clean), atol=1e-4)
    assert torch.allclose(result.normalized(), torch.ones(6, 1), atol=1e-5)
    # one token of the stream at the first block restores only a part
    single = C.activation_patching(model, clean, corrupt, metric, kind="resid_pre", layers=[0])
    assert single.values.shape == (1, model.layout.n_tokens)
    assert single.values.max() < result.clean


def test_attribution_patching_agrees_with_activation_patching_over_heads(toy):
    model, clean, corrupt, _ = toy
    metric = C.logit_diff(RED, BLUE)
    exact = C.activation_patching(model, clean, corrupt, metric, kind="z", by="head")
    estimate = C.attribution_patching(model, clean, corrupt, metric)
    assert estimate.clean == pytest.approx(exact.clean, abs=1e-4)
    assert estimate.corrupt == pytest.approx(exact.corrupt, abs=1e-4)
    rho = C.rank_correlation(exact.values - exact.corrupt, estimate.head_matrix(model))
    assert rho >= 0.8  # measured 0.99 on these pairs
    # every default hook is attributed, per position
    assert set(estimate.positions) == set(C.default_attribution_hooks(model))
    assert estimate.positions["blocks.0.hook_resid_pre"].shape == (model.layout.n_tokens,)


def test_latent_attributions_add_up_to_the_hook_attribution(toy):
    """An SAE whose reconstruction is exact (relu(x) - relu(-x) = x): the attributions of its
    latents sum to the attribution of the activation itself."""
    model, clean, corrupt, _ = toy
    d = model.d_model
    sae = exact_sae(d)
    hook = "blocks.3.hook_resid_post"
    metric = C.logit_diff(RED, BLUE)
    result = C.attribution_patching(model, clean, corrupt, metric, hooks=[hook], saes={hook: sae})
    assert result.latents[hook].shape == (2 * d,)
    total = result.positions[hook].sum()
    assert result.latents[hook].sum() == pytest.approx(float(total), rel=1e-4, abs=1e-4)
    assert result.latent_positions[hook].sum() == pytest.approx(float(total), rel=1e-4, abs=1e-4)


def test_latent_circuit_and_its_graph(toy, tmp_path):
    model, clean, corrupt, _ = toy
    torch.manual_seed(0)
    saes = {f"blocks.{i}.hook_resid_post": TopKSAE(d_in=model.d_model, n_latents=64, k=8)
            for i in (1, 4)}  # fmt: skip
    metric = C.logit_diff(RED, BLUE)
    circuit = C.latent_circuit(model, clean, corrupt, metric, saes, per_layer=3)
    assert [n[0] for n in circuit.nodes] == ["blocks.1.hook_resid_post"] * 3 + [
        "blocks.4.hook_resid_post"
    ] * 3
    assert len(circuit.edges) == 9 and all(s < 3 <= t for s, t, _ in circuit.edges)
    browser = tmp_path / "browser-l4"
    page = V.circuit_graph(
        circuit, tmp_path / "out" / "circuit.html", browsers={"blocks.4.hook_resid_post": browser},
        title="<red> & blue",
    )  # fmt: skip
    text = page.read_text()
    assert html.escape("<red> & blue") in text and "<red>" not in text
    links = re.findall(r'href="([^"]+)"', text)
    assert len(links) == 3 and all(
        link.startswith("../browser-l4/latent.html?id=") for link in links
    )
    assert (tmp_path / "out" / "circuit.json").is_file()


def test_views_render(toy, tmp_path):
    model, clean, corrupt, images = toy
    pattern, png = V.attention_patterns(model, clean[:1], images[0], 5, tmp_path / "attn.png")
    assert pattern.shape == (4, model.layout.n_tokens)
    assert torch.allclose(pattern.sum(-1), torch.ones(4), atol=1e-5)  # softmax rows
    assert png.stat().st_size > 5_000
    metric = C.logit_diff(RED, BLUE)
    result = C.activation_patching(model, clean[:1], corrupt[:1], metric, chunk=65)
    out = V.patching_heatmap(result.normalized(), images[0], model.layout, tmp_path / "p.png")
    assert out.stat().st_size > 5_000
    heads = C.activation_patching(model, clean[:2], corrupt[:2], metric, kind="z", by="head")
    assert V.head_matrix(heads.normalized(), tmp_path / "h.png").stat().st_size > 3_000


def test_bad_inputs_are_one_line_errors(toy, tiny_models):
    model, clean, corrupt, _ = toy
    metric = C.logit_diff(RED)
    with pytest.raises(PrismaError, match="same shape"):
        C.activation_patching(model, clean, corrupt[:2], metric)
    with pytest.raises(PrismaError, match="by head needs kind='z'"):
        C.activation_patching(model, clean, corrupt, metric, kind="resid_pre", by="head")
    with pytest.raises(PrismaError, match="patching kind"):
        C.activation_patching(model, clean, corrupt, metric, kind="nope")
    with pytest.raises(PrismaError, match="outside 0..5"):
        C.activation_patching(model, clean, corrupt, metric, layers=[6])
    with pytest.raises(PrismaError, match="class_prompts"):
        C.readout(tiny_models["tiny-clip"])
    with pytest.raises(PrismaError, match="no classifier head"):
        C.readout(prisma_mm.load_model("tiny-dinov2-reg"))
