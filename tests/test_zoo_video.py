"""The video zoo: every family's tiny card hooked over the native module.

For each family: every hook fires with the shape its layout says, the hooked forward is
bit-identical to the library's own call, random init is the library's own (seeded), the
layout maps a perturbed input patch at one frame back to exactly the tokens of that frame and
patch, stop_at_layer stops, and every weights path loads checkpoints written here (a
save_pretrained folder, a Hugging Face cache read offline, a state-dict file). The guards for
silent misuse (TimeSformer's clip length, V-JEPA 2's size) raise one line.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import prisma_mm
from prisma_mm import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.zoo import registry

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "tiny-videomae",
    "tiny-timesformer",
    "tiny-vivit",
    "tiny-vjepa2",
    "tiny-xclip",
    "tiny-mvit",
    "tiny-swin3d",
]
VIDEO_FAMILIES = ("transformers_video", "torchvision_video")


@functools.cache
def _model(name: str):
    return prisma_mm.load_model(name, weights=None, seed=0)


def _clip(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    frames = model.spec.frames
    height, width = model.layout.input_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, height, width, generator=generator)


def _native(model, x: torch.Tensor) -> torch.Tensor:
    """The library's own call on its own input order, without prisma-mm in the way."""
    module = model.module
    if model.card.family == "torchvision_video":
        return module(x)
    if module.config.model_type == "xclip":  # the video tower's embedding
        return module.get_video_features(pixel_values=x.transpose(1, 2)).pooler_output
    name = "pixel_values_videos" if module.config.model_type == "vjepa2" else "pixel_values"
    kwargs = {"skip_predictor": True} if type(module).__name__ == "VJEPA2Model" else {}
    out = module(**{name: x.transpose(1, 2)}, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _real(family: str) -> list[str]:
    """Cards of the libraries' checkpoints (not tiny, not shipped in assets/)."""
    cards = map(registry.get_card, registry.list_models(family))
    return [c.name for c in cards if not c.is_tiny and not c.weights]


def _torchvision_class(card) -> torch.nn.Module:
    """A tiny torchvision card's architecture built with torchvision's own classes."""
    from torchvision.models.video import mvit, swin_transformer

    kwargs = dict(card.kwargs)
    if card.arch == "MViT":
        kwargs["block_setting"] = [mvit.MSBlockConfig(**b) for b in kwargs["block_setting"]]
        kwargs["spatial_size"] = tuple(kwargs["spatial_size"])
        return mvit.MViT(**kwargs)
    return swin_transformer.SwinTransformer3d(**kwargs)


def test_every_video_card_is_in_a_video_family_with_a_tiny_card() -> None:
    video = [n for n in registry.list_models() if registry.get_card(n).family in VIDEO_FAMILIES]
    assert set(TINY) <= set(video)
    for name in video:
        card = registry.get_card(name)
        assert card.task in ("classifier", "embedding"), name
        assert int(card.preprocess.get("frames", 0)) > 0 or not card.is_tiny, name


@pytest.mark.parametrize("name", TINY)
def test_every_hook_fires_with_the_shape_its_layout_gives(name: str) -> None:
    model = _model(name)
    x = _clip(model)
    names = [n for n in model.hook_names]
    out, cache = model.run_with_cache(x, names)
    assert list(cache) == names
    for hook, value in cache.items():
        layout = model.layout_for(hook)
        if hook == "hook_output":  # pooled (classifiers, X-CLIP) or the encoder's tokens
            pooled = out.dim() == 2
            assert value.shape[:2] == (2, 1 if pooled else layout.n_tokens)
        elif hook.endswith("attn.hook_pattern"):  # [batch, heads, query, key]
            assert value.shape[2:] == (layout.n_tokens, layout.n_tokens), hook
        elif hook.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")):
            assert value.shape[:2] == (2, layout.n_tokens), hook
            assert value.dim() == 4, hook  # [batch, tokens, heads, d_head]
        elif hook.endswith(("mlp.hook_pre", "mlp.hook_post")):
            assert value.shape[:2] == (2, layout.n_tokens) and value.shape[2] > 0, hook
        else:
            assert value.shape[:2] == (2, layout.n_tokens), hook
    if model.card.task == "classifier":
        kwargs = model.card.kwargs
        assert out.shape == (2, kwargs.get("num_labels", kwargs.get("num_classes")))
    # zoo show's meta build agrees with the real one
    meta = registry.build_on_meta(name)
    assert meta.layout == model.layout and meta.hook_names == model.hook_names


@pytest.mark.parametrize("name", TINY)
def test_hooked_forward_is_bit_identical_to_the_library_and_init_is_the_librarys(name) -> None:
    model = _model(name)
    x = _clip(model, seed=1)
    with torch.no_grad():
        native = _native(model, x)
        # every hook but the patterns (those switch on the eager attention while hooked)
        names = [h for h in model.hook_names if not h.endswith("hook_pattern")]
        with model.hooks({hook: lambda value, point: None for hook in names}):
            hooked = model(x)
    assert torch.equal(native, hooked)
    # seeded random init is the library's own constructor under that seed
    card = model.card
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if card.family == "transformers_video":
            import transformers

            cls = getattr(transformers, card.arch)
            library = cls(cls.config_class(**card.kwargs)).eval()
        else:
            library = _torchvision_class(card).eval()
    own, theirs = model.module.state_dict(), library.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)


@pytest.mark.parametrize("name", TINY)
def test_one_perturbed_patch_maps_back_to_exactly_its_frame_and_patch(name: str) -> None:
    model = _model(name)
    layout = model.layout
    x = _clip(model, batch=1, seed=2)
    # one pixel: the first of grid frame 1, the top-left of patch (1, 2) (MViT's patches
    # overlap: its 7 px kernels at stride 4 reach that pixel from that patch only)
    frame, row, col = layout.tubelet, 1, 2
    (ph, pw) = layout.patch_size
    bumped = x.clone()
    bumped[:, :, frame, row * ph, col * pw] += 1.0
    _, before = model.run_with_cache(x, "hook_embed")
    _, after = model.run_with_cache(bumped, "hook_embed")
    changed = ((after["hook_embed"] - before["hook_embed"]).abs().amax(-1) > 1e-6)[0]
    tokens = changed.nonzero().flatten().tolist()
    assert len(tokens) == 1, tokens
    assert layout.token_to_patch(tokens[0]) == (frame // layout.tubelet, row, col)
    # and the patch map puts that token at that place in [frames, h, w]
    grid = layout.patch_map(changed.float())
    assert grid[frame // layout.tubelet, row, col] == 1 and grid.sum() == 1


@pytest.mark.parametrize("name", TINY)
def test_stop_at_layer_stops_and_keeps_the_earlier_activations(name: str) -> None:
    model = _model(name)
    x = _clip(model, seed=3)
    hook = "blocks.0.hook_resid_post"
    full_out, full = model.run_with_cache(x, hook)
    out, early = model.run_with_cache(x, hook, stop_at_layer=1)
    assert full_out is not None and out is None
    assert torch.equal(full[hook], early[hook])
    with pytest.raises(PrismaError, match="fire at or after block 1"):
        model.run_with_cache(x, "blocks.1.hook_resid_post", stop_at_layer=1)


@pytest.mark.parametrize("name", TINY)
def test_editing_the_stream_changes_the_output_and_an_identity_edit_does_not(name) -> None:
    model = _model(name)
    x = _clip(model, seed=4)
    with torch.no_grad():
        base = model(x)
        same = model.run_with_hooks(x, [("blocks.0.hook_resid_post", lambda v, p: v.clone())])
        zeroed = model.run_with_hooks(
            x, [("blocks.0.hook_resid_post", lambda v, p: torch.zeros_like(v))]
        )
    assert torch.equal(base, same)
    assert not torch.allclose(base, zeroed)


def test_timesformer_tokens_are_time_fastest_after_cls() -> None:
    layout = _model("tiny-timesformer").layout
    assert layout.order == "hwt" and layout.n_prefix == 1
    frames = layout.grid[0]
    assert layout.token_to_patch(1) == (0, 0, 0)
    assert layout.token_to_patch(2) == (1, 0, 0)  # the next token is the next frame
    assert layout.token_to_patch(1 + frames) == (0, 0, 1)
    assert layout.token_to_patch(0) is None


def test_token_layout_order_round_trips_and_refuses_a_bad_order() -> None:
    layout = TokenLayout(1, (2, 3, 4), (8, 8), (24, 32), tubelet=2, order="hwt")
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    assert (
        TokenLayout.from_dict({**layout.to_dict(), "order": None} | {"order": "thw"}).order == "thw"
    )
    values = torch.arange(layout.n_tokens)
    grid = layout.patch_map(values)
    for token in range(1, layout.n_tokens):
        assert grid[layout.token_to_patch(token)] == token
    assert torch.equal(layout.grid_to_tokens(grid), values[1:])  # the inverse of patch_map
    assert torch.equal(layout.grid_to_tokens(torch.stack([grid, -grid]))[1], -values[1:])
    with pytest.raises(PrismaError, match="permutation"):
        TokenLayout(0, (1, 2, 2), (8, 8), (16, 16), order="tth")


def test_timesformer_at_another_clip_length_or_size_is_refused_in_one_line() -> None:
    model = _model("tiny-timesformer")
    with pytest.raises(PrismaError, match=r"config\.num_frames=4") as error:
        model(torch.zeros(1, 3, 3, 32, 32))
    assert "\n" not in str(error.value)
    with pytest.raises(PrismaError, match="num_frames"):
        model(torch.zeros(1, 3, 4, 40, 40))


def test_vjepa2_at_a_size_other_than_crop_size_is_refused_in_one_line() -> None:
    model = _model("tiny-vjepa2")
    with pytest.raises(PrismaError, match=r"crop_size=32") as error:
        model(torch.zeros(1, 3, 4, 48, 48))
    assert "\n" not in str(error.value)


def test_wrong_input_shapes_and_dtypes_say_what_is_expected() -> None:
    model = _model("tiny-videomae")
    with pytest.raises(PrismaError, match=r"expected a float tensor \[batch, 3, 4, 32, 32\]"):
        model(torch.zeros(1, 4, 3, 32, 32))  # frames before channels
    with pytest.raises(PrismaError, match="dtype"):
        model(torch.zeros(1, 3, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(PrismaError, match="preprocess"):
        model(np.zeros((1, 3, 4, 32, 32), np.float32))


def test_timesformer_resid_mid_is_read_only_and_split_attention_hooks_say_why() -> None:
    model = _model("tiny-timesformer")
    x = _clip(model)
    with pytest.raises(PrismaError, match="can be read but not replaced"):
        model.run_with_hooks(x, [("blocks.0.hook_resid_mid", lambda v, p: v * 2)])
    with pytest.raises(PrismaError, match="divided attention"):
        model.hook_point("blocks.0.hook_attn_out")
    # resid_mid + the MLP branch is resid_post: the read is the stream the block adds to
    _, cache = model.run_with_cache(
        x, ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    )
    mid, mlp, post = cache.values()
    assert torch.allclose(mid + mlp, post, atol=1e-6)


def test_preprocess_resizes_crops_and_normalizes_uint8_clips() -> None:
    model = _model("tiny-videomae")
    clip = np.full((4, 40, 60, 3), 255, np.uint8)
    batch = model.preprocess([clip, clip])
    assert tuple(batch.shape) == (2, 3, 4, 32, 32)
    mean = torch.tensor((0.485, 0.456, 0.406))
    std = torch.tensor((0.229, 0.224, 0.225))
    assert torch.allclose(batch[0, :, 0, 0, 0], (1 - mean) / std, atol=1e-5)
    assert torch.equal(model.preprocess(np.stack([clip, clip])), batch)
    with pytest.raises(PrismaError, match="has 3 frames; this card takes 4"):
        model.preprocess(clip[:3])
    with pytest.raises(PrismaError, match=r"\[frames, H, W, 3\]"):
        model.preprocess(clip.transpose(0, 3, 1, 2))


# ----- weights paths -------------------------------------------------------------------------


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_folder_and_state_dict_file(tmp_path) -> None:
    source = prisma_mm.load_model("tiny-vivit", weights=None, seed=5)
    source.module.save_pretrained(tmp_path / "saved")
    loaded = prisma_mm.load_model("tiny-vivit", weights=tmp_path / "saved")
    assert _same(loaded.module, source.module)
    x = _clip(source, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    save_file(source.module.state_dict(), str(tmp_path / "vivit.safetensors"))
    from_file = prisma_mm.load_model("tiny-vivit", weights=tmp_path / "vivit.safetensors")
    assert _same(from_file.module, source.module)
    (tmp_path / "bare").mkdir()  # a folder with weights but no config.json: the card's config
    save_file(source.module.state_dict(), str(tmp_path / "bare" / "model.safetensors"))
    assert _same(
        prisma_mm.load_model("tiny-vivit", weights=tmp_path / "bare").module, source.module
    )
    with pytest.raises(PrismaError, match="do not fit this model"):
        prisma_mm.load_model("tiny-videomae", weights=tmp_path / "vivit.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrismaError, match="has no config.json"):
        prisma_mm.load_model("tiny-vivit", weights=tmp_path / "empty")
    # transformers only warns on these and initialises the missing weights at random
    with pytest.raises(PrismaError, match="not a transformers save_pretrained folder"):
        prisma_mm.load_model("tiny-videomae", weights=tmp_path / "saved")  # a ViViT folder
    encoder = source.module.vivit  # the encoder alone: the classifier's head is missing
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.raises(PrismaError, match="missing or mis-shaped keys"):
        prisma_mm.load_model("tiny-vivit", weights=tmp_path / "encoder")
    (tmp_path / "saved" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(PrismaError, match="SafetensorError"):
        prisma_mm.load_model("tiny-vivit", weights=tmp_path / "saved")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, read offline (as a machine without network)."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_cache_folder_offline(offline_hub, tmp_path) -> None:
    source = prisma_mm.load_model("tiny-videomae", weights=None, seed=7)
    source.module.save_pretrained(tmp_path / "export")
    repo = offline_hub / "models--test-org--tiny-videomae"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in (tmp_path / "export").iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    loaded = prisma_mm.load_model("tiny-videomae", weights="hf-hub:test-org/tiny-videomae")
    assert _same(loaded.module, source.module)


def test_missing_pretrained_weights_offline_name_what_to_fetch(offline_hub) -> None:
    name = _real("transformers_video")[0]
    target, weights, repo = name, "pretrained", registry.get_card(name).source
    with pytest.raises(PrismaError, match="could not be loaded") as error:
        prisma_mm.load_model(target, weights=weights)
    message = str(error.value)
    assert repo in message and "config.json" in message and "huggingface-cli download" in message
    assert "\n" not in message


def test_torchvision_hub_cache_checkpoint_and_state_dict_files(tmp_path, monkeypatch) -> None:
    import dataclasses

    source = prisma_mm.load_model("tiny-swin3d", weights=None, seed=8)
    url = "https://download.pytorch.org/models/tiny-swin3d-0123abcd.pth"
    card = dataclasses.replace(registry.get_card("tiny-swin3d"), name="hub-swin3d", source=url)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PrismaError, match="could not be loaded") as error:
        prisma_mm.load_model(card, weights="pretrained")
    assert url in str(error.value) and str(tmp_path / "hub" / "checkpoints") in str(error.value)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(source.module.state_dict(), tmp_path / "hub" / "checkpoints" / Path(url).name)
    assert _same(prisma_mm.load_model(card, weights="pretrained").module, source.module)
    torch.save(source.module.state_dict(), tmp_path / "swin.pth")
    assert _same(
        prisma_mm.load_model("tiny-swin3d", weights=tmp_path / "swin.pth").module, source.module
    )
    with pytest.raises(PrismaError, match="do not fit this model"):
        prisma_mm.load_model("tiny-mvit", weights=tmp_path / "swin.pth")


def test_mvit_and_swin3d_layouts_shrink_per_hook() -> None:
    mvit = _model("tiny-mvit")
    assert mvit.layout_for("blocks.0.hook_resid_pre").grid == (2, 8, 8)
    assert mvit.layout_for("blocks.0.ln1.hook_normalized").grid == (2, 8, 8)
    assert mvit.layout_for("blocks.0.hook_attn_out").grid == (2, 4, 4)  # pooled queries
    assert mvit.layout_for("blocks.0.hook_resid_post").grid == (2, 4, 4)
    assert mvit.layout_for("ln_final.hook_normalized").grid == (2, 4, 4)
    assert mvit.layout_for("hook_embed") == mvit.layout and mvit.layout.n_prefix == 1
    swin = _model("tiny-swin3d")
    assert swin.layout_for("blocks.0.hook_resid_post").grid == (2, 8, 8)
    assert swin.layout_for("blocks.1.hook_resid_pre").grid == (2, 4, 4)  # after patch merging
    assert swin.layout_for("blocks.1.hook_resid_pre").patch_size == (8, 8)
    # a perturbed input patch moves the merged stage's stream most at its own place
    x = _clip(swin, batch=1, seed=9)
    bumped = x.clone()
    bumped[:, :, 2:4, 24:32, 8:16] += 3.0  # grid frame 1, merged patch (3, 1)
    hook = "blocks.1.hook_resid_pre"
    _, before = swin.run_with_cache(x, hook, stop_at_layer="auto")
    _, after = swin.run_with_cache(bumped, hook, stop_at_layer="auto")
    moved = (after[hook] - before[hook]).norm(dim=-1)[0]
    layout = swin.layout_for(hook)
    assert layout.token_to_patch(int(moved.argmax())) == (1, 3, 1)
    assert layout.patch_map(moved)[1, 3, 1] == moved.max()


def test_torchvision_frames_and_size_are_checked_against_the_card() -> None:
    model = _model("tiny-mvit")
    with pytest.raises(PrismaError, match="takes 4 frames at"):
        model(torch.zeros(1, 3, 8, 32, 32))


# ----- the real cards: data checked against the libraries, one meta build per class ----------

SIZES = {"small": 384, "base": 768, "hr": 768, "large": 1024, "vitl": 1024, "vith": 1280}
SIZES |= {"vitg": 1408, "b": 768}
LABELS = {"kinetics": 400, "k400": 400, "kinetics400": 400, "k600": 600, "ssv2": 174}
LABELS |= {"diving48": 48}


@pytest.mark.parametrize("name", _real("transformers_video"))
def test_transformers_video_card_config_matches_its_name(name: str) -> None:
    import transformers

    card = registry.get_card(name)
    cls = getattr(transformers, card.arch)
    config = cls.config_class(**card.kwargs)
    config = getattr(config, "vision_config", config)  # X-CLIP: the video tower's
    parts = name.split("-")
    width = next(SIZES[p] for p in parts if p in SIZES)
    if name.startswith("timesformer-"):  # TimeSformer-HR and -L are ViT-B over more pixels
        width = 768
    assert config.hidden_size == width
    frames = getattr(config, "num_frames", None) or config.frames_per_clip
    assert card.preprocess["frames"] == frames
    labels = [LABELS[p] for p in parts if p in LABELS]
    if card.task == "classifier":
        assert "ForVideoClassification" in card.arch and config.num_labels == labels[-1]
    else:
        assert card.arch.endswith("Model")
    assert card.source.split("/")[1] == name or card.source.endswith(name)


@pytest.mark.parametrize("name", _real("torchvision_video"))
def test_torchvision_video_card_matches_torchvisions_weights(name: str) -> None:
    from prisma_mm.zoo.video_torchvision import weights_entry

    card = registry.get_card(name)
    entry = weights_entry(card)
    assert entry.url == card.source
    assert len(entry.meta["categories"]) == 400
    clip_len = int(entry.meta["_docs"].split("clip_len=")[1].split("`")[0])
    assert card.preprocess["frames"] == clip_len


@pytest.mark.parametrize(
    "name",
    [
        "timesformer-base-finetuned-k400",
        "vivit-b-16x2-kinetics400",
        "vjepa2-vitl-fpc16-256-ssv2",
        "mvit-v2-s-kinetics400",
        "swin3d-t-kinetics400",
        "xclip-base-patch32",
    ],
)
def test_real_cards_build_on_meta_with_the_papers_token_counts(name: str) -> None:
    model = registry.build_on_meta(name)
    assert all(p.device.type == "meta" for p in model.module.parameters())
    expected = {
        "timesformer-base-finetuned-k400": (1 + 8 * 14 * 14, 12),
        "vivit-b-16x2-kinetics400": (1 + 16 * 14 * 14, 12),
        "vjepa2-vitl-fpc16-256-ssv2": (8 * 16 * 16, 24),
        "mvit-v2-s-kinetics400": (1 + 8 * 56 * 56, 16),
        "swin3d-t-kinetics400": (16 * 56 * 56, 12),
        "xclip-base-patch32": (8 + 8 * 7 * 7, 12),  # every frame's CLS, then its patches
    }[name]
    assert (model.layout.n_tokens, model.n_layers) == expected
    last = model.layout_for(f"blocks.{model.n_layers - 1}.hook_resid_post")
    assert last.grid[1:] == {"mvit-v2-s-kinetics400": (7, 7), "swin3d-t-kinetics400": (7, 7)}.get(
        name, model.layout.grid[1:]
    )


def test_xclip_frames_folded_into_the_batch_are_one_clip_of_tokens_both_ways() -> None:
    model = _model("tiny-xclip")
    layout = model.layout
    frames, patches = layout.grid[0], layout.grid[1] * layout.grid[2]
    assert layout.n_prefix == frames and layout.token_to_patch(frames - 1) is None
    assert layout.token_to_patch(frames + patches) == (1, 0, 0)
    x = _clip(model, seed=10)
    hook = "blocks.0.hook_resid_pre"
    _, cache = model.run_with_cache(x, hook)
    native: dict[str, torch.Tensor] = {}
    block = model.spec.blocks[0]
    handle = block.register_forward_pre_hook(lambda mod, args: native.update(x=args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    per_frame = native["x"].unflatten(0, (2, frames))  # [batch, frames, 1 + patches, d]
    assert torch.equal(cache[hook][:, :frames], per_frame[:, :, 0])
    assert torch.equal(cache[hook][:, frames:], per_frame[:, :, 1:].flatten(1, 2))

    # an edit of frame 2's patch tokens through the layout is that edit in the native layout
    def zero_frame_2(value, point):
        value = value.clone()
        start = frames + 2 * patches
        value[:, start : start + patches] = 0
        return value

    def native_zero(mod, args):
        hidden = args[0].clone()
        hidden.unflatten(0, (2, frames))[:, 2, 1:] = 0
        return (hidden, *args[1:])

    with torch.no_grad():
        edited = model.run_with_hooks(x, [(hook, zero_frame_2)])
        handle = block.register_forward_pre_hook(native_zero)
        try:
            expected = model(x)
        finally:
            handle.remove()
    assert torch.equal(edited, expected)


@pytest.mark.parametrize("name", ["tiny-videomae", "tiny-vivit", "tiny-vjepa2"])
def test_attention_pattern_is_the_eager_softmax_read_only_and_switched_back(name: str) -> None:
    model = _model(name)
    x = _clip(model, seed=11)
    config = model.module.config
    before = config._attn_implementation
    hooks = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_pattern"]
    out, cache = model.run_with_cache(x, hooks)
    q, k, pattern = cache.values()
    assert config._attn_implementation == before  # the fused path is back
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    if name != "tiny-vjepa2":  # V-JEPA 2 rotates q and k after hook_q / hook_k
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        assert torch.allclose(scores.softmax(-1), pattern, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)
    with pytest.raises(PrismaError, match="can be read but not replaced"):
        model.run_with_hooks(x, [("blocks.0.attn.hook_pattern", lambda v, p: v * 0)])
    assert config._attn_implementation == before


def test_a_cache_of_a_later_stage_records_that_stages_grid(tmp_path) -> None:
    from prisma_mm.cache.writer import write_cache
    from prisma_mm.data.video import ClipArraySource

    model = _model("tiny-mvit")
    clips = [np.random.default_rng(i).integers(0, 256, (4, 32, 32, 3), np.uint8) for i in range(2)]
    hook = "blocks.1.hook_resid_post"
    manifest = write_cache(
        model, ClipArraySource(clips), tmp_path / "c", [hook], tokens="patches", progress=False
    )
    assert TokenLayout.from_dict(manifest["layout"]) == model.layout_for(hook)
    assert manifest["shapes"][hook] == [2 * 4 * 4, 32]  # the pooled grid's patches
    with pytest.raises(PrismaError, match="different token grids"):
        write_cache(
            model, ClipArraySource(clips), tmp_path / "d", ["blocks.0.hook_resid_pre", hook]
        )
    assert not (tmp_path / "d").exists()


def test_zoo_list_and_show_print_video_cards(capsys) -> None:
    import json

    from prisma_mm.cli import main

    assert main(["zoo", "list", "--family", "torchvision_video"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-mvit" in listing and "swin3d-b-kinetics400-in22k" in listing
    assert "videomae" not in listing
    assert main(["zoo", "show", "tiny-mvit"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["family"] == "torchvision_video" and shown["layout"]["grid"] == [2, 8, 8]
    assert shown["grid_after_each_block"] == [[2, 4, 4], [2, 4, 4]]
    assert main(["zoo", "show", "tiny-timesformer"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layout"]["order"] == "hwt" and "hook_attn_out" not in shown["hooks"]["per block"]
