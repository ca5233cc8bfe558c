"""HookedModel on every tiny card: hook shapes, identities between hooks, bit-identical
outputs against the native libraries, editing, attention patterns, early stopping, errors."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch

import prisma_mm
from prisma_mm import PrismaError
from prisma_mm.hooks import BLOCK_HOOKS

TINY = ["tiny-vit", "tiny-dinov2-reg", "tiny-eva02", "tiny-siglip", "tiny-clip", "tiny-clip-siglip"]


@pytest.fixture(scope="module", params=TINY)
def model(request):
    torch.manual_seed(0)
    return prisma_mm.load_model(request.param, weights=None)


def _input(model, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.layout.input_size, generator=generator)


def _native(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The same architecture built straight from timm / open_clip, with the same weights."""
    card = prisma_mm.model_card(name)
    if card.family == "timm":
        native = timm.create_model(card.arch, pretrained=False, **card.kwargs)
    else:
        native = open_clip.create_model(card.arch, pretrained=None)
    native.load_state_dict(state)
    return native.eval()


def test_every_hook_fires_with_token_shape(model):
    x = _input(model)
    out, cache = model.run_with_cache(x, model.hook_names)
    assert out is not None and set(cache) == set(model.hook_names)
    n_tokens, d = model.layout.n_tokens, model.d_model
    n_heads = None
    for name, value in cache.items():
        if name.endswith("attn.hook_pattern"):
            assert value.shape[0] == 2 and value.shape[2:] == (n_tokens, n_tokens)
            n_heads = value.shape[1]
            torch.testing.assert_close(value.sum(-1), torch.ones_like(value.sum(-1)))
        elif name.endswith(("mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear")):
            assert value.shape[:2] == (2, n_tokens) and value.shape[2] > d
        elif name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")):
            assert value.shape == (2, n_tokens, 2, d // 2), name  # [batch, tokens, heads, d_head]
        elif name == "hook_output":
            assert value.shape == (2, 1, out.shape[-1])
            assert torch.equal(value[:, 0], out)
        else:
            assert value.shape == (2, n_tokens, d), name
    assert n_heads == 2


def test_residual_identities(model):
    x = _input(model)
    _, cache = model.run_with_cache(x)
    for i in range(model.n_layers):
        pre, mid, post = (
            cache[f"blocks.{i}.{h}"]
            for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
        )
        assert torch.equal(mid, pre + cache[f"blocks.{i}.hook_attn_out"])
        assert torch.equal(post, mid + cache[f"blocks.{i}.hook_mlp_out"])
        if i + 1 < model.n_layers:
            assert torch.equal(post, cache[f"blocks.{i + 1}.hook_resid_pre"])
    last = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"]
    assert torch.equal(cache["ln_final.hook_normalized"], model.spec.final_norm(last))


def test_outputs_bit_identical_to_native_library(model):
    native = _native(model.card.name, model.module.state_dict())
    x = _input(model)
    with torch.no_grad():
        expected = native(x) if model.card.family == "timm" else native.encode_image(x)
        plain = model(x)
        with_patterns, _ = model.run_with_cache(x, model.hook_names[:-1])
    assert torch.equal(plain, expected)
    # the patterns need timm's unfused attention path: equal to float32 rounding, not bits
    torch.testing.assert_close(with_patterns, expected, rtol=0, atol=1e-5)
    # every hook but the patterns only reads: still bit-identical
    pattern_free = [n for n in model.hook_names if not n.endswith("hook_pattern")]
    with torch.no_grad():
        cached, _ = model.run_with_cache(x, pattern_free)
    assert torch.equal(cached, expected)


def test_attention_pattern_path_matches_fused_within_1e5(model):
    x = _input(model)
    with torch.no_grad():
        clean = model(x)
        patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(model.n_layers)]
        qk = [f"blocks.{i}.attn.hook_{h}" for i in range(model.n_layers) for h in "qk"]
        out, cache = model.run_with_cache(x, patterns + qk)
    assert (out - clean).abs().max() < 1e-5
    if model.card.name == "tiny-eva02":
        return  # rotary embeddings act on q and k after their hooks
    for i, name in enumerate(patterns):
        # the pattern is softmax(q k^T / sqrt(d_head)) per head, from the same forward
        q, k = (cache[f"blocks.{i}.attn.hook_{h}"].transpose(1, 2) for h in "qk")
        expected = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        torch.testing.assert_close(cache[name], expected, rtol=0, atol=1e-6)
    if model.spec.block_spec.pattern_style == "timm":
        assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in model.spec.blocks)


def test_patching_the_stream_from_another_input_reproduces_its_output(model):
    x_a, x_b = _input(model, seed=1), _input(model, seed=2)
    with torch.no_grad():
        out_b, cache_b = model.run_with_cache(x_b)
        for name, atol in [
            ("blocks.0.hook_resid_pre", 0.0),
            ("blocks.1.hook_resid_mid", 1e-5),
            ("blocks.1.hook_resid_post", 0.0),
            ("ln_final.hook_normalized", 0.0),
        ]:
            with model.hooks({name: lambda act, hook: cache_b[hook.name]}):
                patched = model(x_a)
            assert (patched - out_b).abs().max() <= atol, name


def test_editing_a_branch_changes_downstream_exactly(model):
    x = _input(model)
    with torch.no_grad():
        _, clean = model.run_with_cache(x)
        seen = {}

        def zero(act, hook):
            return torch.zeros_like(act)

        def keep(act, hook):
            seen[hook.name] = act.clone()

        with model.hooks({"blocks.0.hook_mlp_out": zero, "blocks.0.hook_resid_post": keep}):
            model(x)
    assert torch.equal(seen["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_mid"])


def test_mlp_hidden_edit_feeds_the_output_projection(model):
    x = _input(model)
    with torch.no_grad():
        _, clean = model.run_with_cache(x)
        with model.hooks({"blocks.1.mlp.hook_post": lambda a, h: torch.zeros_like(a)}):
            _, edited = model.run_with_cache(x, ["blocks.1.hook_mlp_out"])
    proj = model.spec.blocks[1].get_submodule(model.spec.block_spec.mlp_proj)
    expected = proj(torch.zeros_like(clean["blocks.1.mlp.hook_post"]))
    if model.spec.block_spec.mlp_branch == "drop_path2" and hasattr(model.spec.blocks[1], "ls2"):
        expected = model.spec.blocks[1].ls2(expected)
    elif getattr(model.spec.blocks[1], "gamma_2", None) is not None:
        expected = model.spec.blocks[1].gamma_2 * expected
    elif hasattr(model.spec.blocks[1], "ls_2"):
        expected = model.spec.blocks[1].ls_2(expected)
    torch.testing.assert_close(edited["blocks.1.hook_mlp_out"], expected)


def test_pattern_edit(model):
    x = _input(model)
    name = "blocks.0.attn.hook_pattern"
    if model.spec.block_spec.pattern_style == "mha":
        with (
            pytest.raises(PrismaError, match="read but not replaced"),
            model.hooks({name: lambda a, h: torch.full_like(a, 1.0 / a.shape[-1])}),
        ):
            model(x)
        return
    branch = ["blocks.0.hook_attn_out"]
    with torch.no_grad():
        _, clean = model.run_with_cache(x, branch)
        with model.hooks({name: lambda a, h: torch.full_like(a, 1.0 / a.shape[-1])}):
            _, uniform = model.run_with_cache(x, branch)
    # a uniform pattern averages the values: every query then gets the same attention output
    clean, uniform = clean[branch[0]], uniform[branch[0]]
    torch.testing.assert_close(uniform, uniform[:, :1].expand_as(uniform))
    assert (clean - uniform).norm() > 0.01 * clean.norm()


def test_hooks_removed_on_exit_and_on_exception(model):
    def count() -> int:
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.module.modules()
        )

    before = count()
    with model.hooks({n: (lambda a, h: None) for n in model.hook_names}):
        assert count() > before
    assert count() == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        model.hooks({"blocks.0.hook_resid_post": lambda a, h: None}),
    ):
        raise RuntimeError("boom")
    assert count() == before

    def fail(act, hook):
        raise ValueError("inside hook")

    with pytest.raises(ValueError), model.hooks({"blocks.1.hook_resid_pre": fail}):
        model(_input(model))
    assert count() == before


def test_early_stop_gives_same_activations_and_skips_later_blocks(model):
    x = _input(model)
    calls = []
    handle = model.spec.blocks[-1].register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        _, full = model.run_with_cache(x)
        assert len(calls) == 1
        out, early = model.run_with_cache(
            x, ["hook_embed", "blocks.0.hook_resid_post"], stop_at_layer="auto"
        )
        assert out is None and len(calls) == 1
        assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
        out, explicit = model.run_with_cache(x, ["blocks.0.ln2.hook_normalized"], stop_at_layer=1)
        assert out is None and len(calls) == 1
        assert torch.equal(
            explicit["blocks.0.ln2.hook_normalized"], full["blocks.0.ln2.hook_normalized"]
        )
    finally:
        handle.remove()
    with pytest.raises(PrismaError, match="fire at or after block 1"):
        model.run_with_cache(x, ["blocks.1.hook_resid_pre"], stop_at_layer=1)


def test_unknown_hook_lists_nearest_and_block_range(model):
    with pytest.raises(PrismaError) as error:
        model.run_with_cache(_input(model), ["blocks.7.hook_resid_post"])
    message = str(error.value)
    assert "blocks 0-1" in message and "blocks.1.hook_resid_post" in message
    with pytest.raises(PrismaError, match="did you mean 'blocks.0.hook_resid_pre'"):
        model.hooks({"blocks.0.hook_resid_pree": lambda a, h: None}).__enter__()


def test_bad_input_messages(model):
    height, width = model.layout.input_size
    with pytest.raises(
        PrismaError, match=rf"expected a float tensor \[batch, 3, {height}, {width}\]"
    ):
        model(torch.zeros(2, 1, height, width))
    with pytest.raises(PrismaError, match="has shape"):
        model(torch.zeros(3, height, width))
    with pytest.raises(PrismaError, match="dtype torch.uint8"):
        model(torch.zeros(1, 3, height, width, dtype=torch.uint8))
    with pytest.raises(PrismaError, match="is a list"):
        model([1, 2])
    with pytest.raises(PrismaError, match="must return None or a tensor"):
        with model.hooks({"blocks.0.hook_resid_post": lambda a, h: a[:, :1]}):
            model(_input(model))


# per-block hooks a family cannot offer (docs/hooks.md says why)
NOT_OFFERED = {
    "tiny-vit": {"mlp.hook_pre_linear"},
    "tiny-dinov2-reg": {"mlp.hook_pre_linear"},
    "tiny-eva02": set(),
    "tiny-siglip": {"mlp.hook_pre_linear"},
    "tiny-clip": {"attn.hook_z", "mlp.hook_pre_linear"},
    "tiny-clip-siglip": {"attn.hook_z", "mlp.hook_pre_linear"},
}


def test_block_hook_names_complete(model):
    offered = [h for h in BLOCK_HOOKS if h not in NOT_OFFERED[model.card.name]]
    expected = {f"blocks.{i}.{h}" for i in range(model.n_layers) for h in offered}
    expected |= {"hook_embed", "ln_final.hook_normalized", "hook_output"}
    assert set(model.hook_names) == expected


def test_layout_matches_token_count(model):
    layout = model.layout
    _, cache = model.run_with_cache(_input(model), ["hook_embed"])
    assert cache["hook_embed"].shape[1] == layout.n_tokens
    assert layout.grid[1] * layout.patch_size[0] == layout.input_size[0]
    assert layout.token_to_patch(layout.n_prefix) == (0, 0, 0)
    assert layout.token_to_patch(layout.n_tokens - 1) == (0, layout.grid[1] - 1, layout.grid[2] - 1)
    assert layout.patch_map(torch.arange(layout.n_tokens)).shape == layout.grid


def test_prefix_tokens_per_family():
    expected = {
        "tiny-vit": 1,
        "tiny-dinov2-reg": 5,
        "tiny-eva02": 1,
        "tiny-siglip": 0,
        "tiny-clip": 1,
        "tiny-clip-siglip": 1,
    }
    for name, n_prefix in expected.items():
        assert prisma_mm.zoo.registry.build_on_meta(name).layout.n_prefix == n_prefix


def test_encode_text_zero_shot_offline():
    model = prisma_mm.load_model("tiny-clip", weights=None)
    text = model.encode_text(["a photo of a cat", "a photo of a dog", "a photo of a cat"])
    assert text.shape == (3, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    assert torch.equal(text[0], text[2]) and not torch.equal(text[0], text[1])
    with pytest.raises(PrismaError, match="has no text tower"):
        prisma_mm.load_model("tiny-vit", weights=None).encode_text(["x"])


def test_dtype_bfloat16():
    model = prisma_mm.load_model("tiny-vit", weights=None, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    out, cache = model.run_with_cache(_input(model), ["blocks.1.hook_resid_post"])
    assert out.dtype == torch.bfloat16 and cache["blocks.1.hook_resid_post"].dtype == torch.bfloat16


def test_run_with_cache_returns_output_and_stops_only_when_asked():
    model = prisma_mm.load_model("tiny-vit", weights=None)
    x = _input(model)
    with torch.no_grad():
        expected = model(x)
        out, cache = model.run_with_cache(x, "blocks.0.hook_resid_post")
        assert torch.equal(out, expected) and list(cache) == ["blocks.0.hook_resid_post"]
        out, by_list = model.run_with_cache(x, ["blocks.0.hook_resid_post", "hook_embed"])
        assert torch.equal(out, expected) and list(by_list) == [
            "blocks.0.hook_resid_post",
            "hook_embed",
        ]
        out, by_filter = model.run_with_cache(x, lambda name: name.endswith("hook_resid_post"))
        assert sorted(by_filter) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
        assert torch.equal(by_filter["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])
        out, auto = model.run_with_cache(x, "blocks.0.hook_resid_post", stop_at_layer="auto")
        assert out is None
        assert torch.equal(auto["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])
    with pytest.raises(PrismaError, match="selected no hook"):
        model.run_with_cache(x, lambda name: False)
    with pytest.raises(PrismaError, match="stop_at_layer='soon'"):
        model.run_with_cache(x, "hook_embed", stop_at_layer="soon")
    with pytest.raises(TypeError):
        model.run_with_cache(x, names=["hook_embed"])  # one way: names_filter
    with pytest.raises(TypeError):
        model.run_with_cache(x, full_forward=True)


def test_run_with_hooks_like_transformer_lens():
    model = prisma_mm.load_model("tiny-vit", weights=None)
    x = _input(model)

    def zero(act, hook):
        return torch.zeros_like(act)

    with torch.no_grad():
        clean = model(x)
        with model.hooks({"blocks.0.hook_mlp_out": zero, "blocks.1.hook_mlp_out": zero}):
            expected = model(x)
        both = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_mlp_out"), zero)])
        assert torch.equal(both, expected) and not torch.equal(both, clean)
        assert torch.equal(model(x), clean)  # removed at the end
        kept = model.run_with_hooks(
            x, fwd_hooks=[("blocks.0.hook_mlp_out", zero)], reset_hooks_end=False
        )
        assert torch.equal(model(x), kept) and not torch.equal(kept, clean)
        model.reset_hooks()
        assert torch.equal(model(x), clean)


def _attn_scale(block, branch: torch.Tensor) -> torch.Tensor:
    """The attention output ``[batch, tokens, d]`` through the block's layer scale."""
    if hasattr(block, "ls1"):
        return block.ls1(branch)
    if getattr(block, "gamma_1", None) is not None:
        return block.gamma_1 * branch
    return block.ls_1(branch) if hasattr(block, "ls_1") else branch


@pytest.mark.parametrize("edit_first", [True, False], ids=["edit-first", "read-first"])
def test_hooks_fire_in_forward_order_whatever_the_dict_order(model, edit_first):
    # the case: {resid_mid: read, attn_out: edit} read a stale resid_mid
    x = _input(model)
    mid, out = "blocks.1.hook_resid_mid", "blocks.1.hook_attn_out"
    with torch.no_grad():
        _, clean = model.run_with_cache(x, ["blocks.1.hook_resid_pre", out])
        seen = {}

        def read(act, hook):
            seen[hook.name] = act.clone()

        def double(act, hook):
            return 2 * act

        fns = {out: double, mid: read} if edit_first else {mid: read, out: double}
        with model.hooks(fns):
            model(x)
    expected = clean["blocks.1.hook_resid_pre"] + 2 * clean[out]
    assert torch.equal(seen[mid], expected)
    assert not torch.equal(seen[mid], clean["blocks.1.hook_resid_pre"] + clean[out])


def test_z_through_the_output_projection_is_attn_out(model):
    x = _input(model)
    block = model.spec.blocks[0]
    if model.spec.block_spec.pattern_style == "mha":
        with pytest.raises(PrismaError, match="not offered on this model: nn.MultiheadAttention"):
            model.run_with_cache(x, ["blocks.0.attn.hook_z"])
        return
    with torch.no_grad():
        _, cache = model.run_with_cache(x, ["blocks.0.attn.hook_z", "blocks.0.hook_attn_out"])
        z = cache["blocks.0.attn.hook_z"]
        attn = block.attn
        through = _attn_scale(block, attn.proj(attn.norm(z.flatten(-2))))
    assert z.shape[2:] == (attn.num_heads, attn.head_dim)
    assert torch.equal(through, cache["blocks.0.hook_attn_out"])


def test_qkv_recomputed_from_ln1_and_weights(model):
    x = _input(model)
    names = [f"blocks.0.{h}" for h in ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k")]
    names += ["blocks.0.attn.hook_v", "blocks.0.hook_attn_out", "blocks.0.hook_resid_pre"]
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names)
        ln1 = cache["blocks.0.ln1.hook_normalized"]
        block = model.spec.blocks[0]
        norm1 = block.get_submodule(model.spec.block_spec.norm1)
        assert torch.equal(ln1, norm1(cache["blocks.0.hook_resid_pre"]))
        attn = block.get_submodule(model.spec.block_spec.attn)
        if isinstance(attn, torch.nn.MultiheadAttention):
            weight, bias, heads = attn.in_proj_weight, attn.in_proj_bias, attn.num_heads
        elif getattr(attn, "q_bias", None) is not None:
            weight, heads = attn.qkv.weight, attn.num_heads
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            weight, bias, heads = attn.qkv.weight, attn.qkv.bias, attn.num_heads
        q, k, v = (
            torch.nn.functional.linear(ln1, weight, bias).unflatten(-1, (3, heads, -1)).unbind(2)
        )
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], q, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache["blocks.0.attn.hook_k"], k, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache["blocks.0.attn.hook_v"], v, rtol=0, atol=1e-6)
    if model.card.name == "tiny-eva02":
        return  # rotary embeddings act on q and k after their hooks
    # softmax(q k^T / sqrt(d_head)) v through the output projection is the attention branch
    pattern = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1) * q.shape[-1] ** -0.5
    z = (pattern.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).flatten(-2)
    if isinstance(attn, torch.nn.MultiheadAttention):
        branch = attn.out_proj(z)
    else:
        branch = attn.proj(attn.norm(z))
    torch.testing.assert_close(
        _attn_scale(block, branch), cache["blocks.0.hook_attn_out"], rtol=0, atol=1e-5
    )


def test_editing_v_and_q(model):
    x = _input(model)
    attn = model.spec.blocks[0].get_submodule(model.spec.block_spec.attn)
    zero = {"blocks.0.attn.hook_v": lambda a, h: torch.zeros_like(a)}
    if isinstance(attn, torch.nn.MultiheadAttention) or getattr(attn, "q_bias", None) is not None:
        with pytest.raises(PrismaError, match="can be read but not replaced"), model.hooks(zero):
            model(x)
    else:
        with torch.no_grad(), model.hooks(zero):
            _, cache = model.run_with_cache(x, ["blocks.0.attn.hook_z"])
        assert torch.equal(
            cache["blocks.0.attn.hook_z"], torch.zeros_like(cache["blocks.0.attn.hook_z"])
        )
    if isinstance(attn, torch.nn.MultiheadAttention):
        return
    with torch.no_grad():
        _, clean = model.run_with_cache(x, ["blocks.0.attn.hook_z"])
        with model.hooks({"blocks.0.attn.hook_q": lambda a, h: torch.zeros_like(a)}):
            _, edited = model.run_with_cache(x, ["blocks.0.attn.hook_z"])
    # q = 0 gives a uniform pattern: every query gets the mean of the values
    z = edited["blocks.0.attn.hook_z"]
    if model.card.name != "tiny-eva02":  # rotary embeddings of 0 are 0: still uniform
        torch.testing.assert_close(z, z[:, :1].expand_as(z))
    assert (z - clean["blocks.0.attn.hook_z"]).norm() > 0.01 * z.norm()


def test_mlp_pre_activation(model):
    x = _input(model)
    mlp = model.spec.blocks[0].get_submodule(model.spec.block_spec.mlp)
    names = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]
    gated = "blocks.0.mlp.hook_pre_linear" in model.hook_names
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names + ["blocks.0.mlp.hook_pre_linear"] * gated)
        act = mlp.act if hasattr(mlp, "act") else mlp.gelu
        expected = act(cache["blocks.0.mlp.hook_pre"])
        if gated:
            expected = expected * cache["blocks.0.mlp.hook_pre_linear"]
        assert torch.equal(expected, cache["blocks.0.mlp.hook_post"])
        with model.hooks({"blocks.0.mlp.hook_pre": lambda a, h: torch.zeros_like(a)}):
            _, edited = model.run_with_cache(x, ["blocks.0.mlp.hook_post"])
    # GELU(0) = SiLU(0) = 0: the MLP hidden is zero
    assert torch.equal(edited["blocks.0.mlp.hook_post"], torch.zeros_like(expected))


@pytest.fixture(scope="module", params=["tiny-clip", "tiny-clip-siglip"])
def clip(request):
    return prisma_mm.load_model(request.param, weights=None)


# prompts of one token length: the pooled position (EOT / last) is the same in both
PROMPT_A, PROMPT_B = "a photo of a cat", "a photo of a dog"


def test_text_tower_outputs_bit_identical_with_hooks(clip):
    tokens = clip.text.preprocess([PROMPT_A, PROMPT_B])
    assert tokens.shape == (2, clip.text.layout.n_tokens) and tokens.dtype == torch.long
    readable = [n for n in clip.text.hook_names if not n.endswith("hook_pattern")]
    with torch.no_grad():
        native = clip.module.encode_text(tokens)
        plain = clip.text(tokens)
        out, cache = clip.run_with_cache(tokens, readable)
    assert torch.equal(plain, native) and torch.equal(out, native)
    assert torch.equal(cache["text.hook_output"][:, 0], native)
    n_ctx, d = clip.text.layout.n_tokens, clip.text.d_model
    assert clip.text.layout.n_prefix == 0 and clip.text.layout.grid == (1, 1, n_ctx)
    assert cache["text.blocks.1.hook_resid_post"].shape == (2, n_ctx, d)
    torch.testing.assert_close(
        clip.encode_text([PROMPT_A, PROMPT_B]), torch.nn.functional.normalize(native, dim=-1)
    )


def test_text_hook_values(clip):
    tokens = clip.text.preprocess([PROMPT_A, PROMPT_B])
    tower = clip.module.text if hasattr(clip.module, "text") else clip.module
    with torch.no_grad():
        _, cache = clip.text.run_with_cache(tokens)
        embed = tower.token_embedding(tokens) + tower.positional_embedding
    assert torch.equal(cache["text.hook_embed"], embed)
    assert torch.equal(cache["text.blocks.0.hook_resid_pre"], embed)
    for i in range(clip.text.n_layers):
        pre, mid, post = (
            cache[f"text.blocks.{i}.{h}"]
            for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
        )
        assert torch.equal(mid, pre + cache[f"text.blocks.{i}.hook_attn_out"])
        assert torch.equal(post, mid + cache[f"text.blocks.{i}.hook_mlp_out"])
    assert torch.equal(cache["text.ln_final.hook_normalized"], tower.ln_final(post))
    # the two prompts differ in one token: before it, a causal tower's streams agree
    first = int((tokens[0] != tokens[1]).nonzero()[0])
    same = torch.equal(post[0, :first], post[1, :first])
    assert same == (clip.card.name == "tiny-clip")


def test_patching_a_text_resid_reproduces_the_other_prompts_embedding(clip):
    with torch.no_grad():
        _, cache_b = clip.run_with_cache([PROMPT_B], ["text.blocks.0.hook_resid_post"])
        b = clip.encode_text([PROMPT_B])
        a = clip.encode_text([PROMPT_A])
        patch = {"text.blocks.0.hook_resid_post": lambda act, hook: cache_b[hook.name]}
        with clip.hooks(patch):  # the parent model routes text. names to its text tower
            patched = clip.encode_text([PROMPT_A])
    assert torch.equal(patched, b) and not torch.equal(a, b)
    assert torch.equal(clip.encode_text([PROMPT_A]), a)  # removed on exit


def test_text_errors(clip):
    with pytest.raises(PrismaError, match="different inputs"):
        clip.run_with_cache(
            [PROMPT_A], ["text.blocks.0.hook_resid_post", "blocks.0.hook_resid_post"]
        )
    with pytest.raises(PrismaError, match="integer tokens"):
        clip.text(torch.zeros(1, clip.text.layout.n_tokens))
    with pytest.raises(PrismaError, match="integer tokens"):
        clip.text(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(PrismaError, match="expected a prompt"):
        clip.text([])
    with pytest.raises(PrismaError, match="unknown hook 'text.blocks.5.hook_resid_post'"):
        clip.text.run_with_cache([PROMPT_A], ["text.blocks.5.hook_resid_post"])
    with pytest.raises(PrismaError, match="has no text tower"):
        _ = prisma_mm.load_model("tiny-vit", weights=None).text


def test_functions_on_one_hook_point_fire_in_the_order_given():
    model = prisma_mm.load_model("tiny-vit", weights=None)
    x = _input(model)
    name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, clean = model.run_with_cache(x, [name, "blocks.1.hook_resid_pre"])
        seen = {}

        def add_one(act, hook):
            return act + 1

        def double(act, hook):
            return act * 2

        def read(act, hook):
            seen[hook.name] = act.clone()

        with model.hooks({"blocks.1.hook_resid_pre": read, name: [add_one, double]}):
            model(x)
        assert torch.equal(seen["blocks.1.hook_resid_pre"], (clean[name] + 1) * 2)
        model.run_with_hooks(
            x, fwd_hooks=[(name, double), (name, add_one), ("blocks.1.hook_resid_pre", read)]
        )
        assert torch.equal(seen["blocks.1.hook_resid_pre"], clean[name] * 2 + 1)
