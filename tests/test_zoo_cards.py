"""Every model card in model_zoo/ is real and works with its adapter.

Each card's architecture is built on the ``meta`` device (no weights, no memory) and run
forward on a meta tensor with every hook attached, so hook names, token layout, widths and
the output shape are checked without downloading anything. Sources and tags are checked
against timm's and open_clip's own offline registries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from torchvision import transforms as T

from prisma_mm.errors import PrismaError
from prisma_mm.zoo import registry

REPO = Path(__file__).resolve().parent.parent
ALL_CARDS = registry.list_models()
# the image families; video cards are tested in test_zoo_video.py
IMAGE_CARDS = [n for n in ALL_CARDS if registry.get_card(n).family in ("timm", "open_clip")]
# checkpoints of the libraries; cards whose weights ship in assets/ (toyvit) are tested with them
REAL_CARDS = [
    name
    for name in ALL_CARDS
    if not registry.get_card(name).is_tiny and not registry.get_card(name).weights
]
IMAGENET_HEADS = {1000, 11821, 21841, 21843}  # in1k, in12k, in21k (fall11), in21k (winter21)

# What a card's name claims: width per size letter, then patch size and resolution.
WIDTHS = {
    "ti": {192},
    "s": {384},
    "m": {512},
    "b": {768},
    "l": {1024},
    "h": {1280},
    "g": {1408, 1536},  # OpenCLIP ViT-g / DINOv2 ViT-g
    "bigg": {1664},
    "so400m": {1152},
}
_SIZE_PATCH = re.compile(r"^(ti|s|m|b|l|h|g|bigg|so400m)(8|14|16|32)$")


def _name_claims(name: str) -> tuple[set[int], int, int, int]:
    """``(widths, patch, resolution, n_prefix)`` that a real card's name promises."""
    parts = name.split("-")
    index = next(i for i, part in enumerate(parts) if _SIZE_PATCH.match(part))
    size, patch = _SIZE_PATCH.match(parts[index]).groups()  # type: ignore[union-attr]
    following = parts[index + 1] if index + 1 < len(parts) else ""
    default = 518 if name.startswith("dinov2-") else 224
    resolution = int(following) if following.isdigit() else default
    if "siglip" in name:
        n_prefix = 0  # no CLS token; attention pooling
    elif name.endswith("-reg"):
        n_prefix = 5  # CLS + 4 registers
    elif "distilled" in name:
        n_prefix = 2  # CLS + distillation token
    else:
        n_prefix = 1
    return WIDTHS[size], int(patch), resolution, n_prefix


def _normalize(transform) -> T.Normalize:
    steps = transform.transforms if hasattr(transform, "transforms") else [transform]
    found = [step for step in steps if isinstance(step, T.Normalize)]
    assert len(found) == 1, f"expected one Normalize in {transform}"
    return found[0]


@contextlib.contextmanager
def _middle_blocks_pass_through(blocks) -> Iterator[None]:
    """Blocks 1..n-2 return their input, so a meta forward costs three blocks, not 48.

    Sound because they are built exactly like the first and last blocks (checked here),
    which run for real and carry all the block hooks under test."""
    middle = list(blocks)[1:-1]

    def structure(block: torch.nn.Module) -> list:
        params = [(n, tuple(p.shape)) for n, p in block.named_parameters()]
        return [type(block), [(n, type(m)) for n, m in block.named_modules()], params]

    for block in middle:
        assert structure(block) == structure(blocks[0])
        block.forward = lambda x, *args, **kwargs: x
    try:
        yield
    finally:
        for block in middle:
            del block.forward


@pytest.mark.parametrize("name", IMAGE_CARDS)
def test_card_builds_on_meta_and_every_hook_fires_with_the_layout_shapes(name: str) -> None:
    card = registry.get_card(name)
    model = registry.build_on_meta(name)
    assert all(p.device.type == "meta" for p in model.module.parameters())
    layout = model.layout
    frames, height, width = layout.grid
    assert frames == 1 and layout.tubelet == 1
    assert layout.n_tokens == layout.n_prefix + height * width
    assert layout.input_size == (height * layout.patch_size[0], width * layout.patch_size[1])

    # the adapter's width is the stream width of the native norms it hooks
    block_spec = model.spec.block_spec
    for block in (model.spec.blocks[0], model.spec.blocks[-1]):
        for norm in (block_spec.norm1, block_spec.ln2):
            assert tuple(block.get_submodule(norm).weight.shape) == (model.d_model,)

    if name in REAL_CARDS:
        widths, patch, resolution, n_prefix = _name_claims(name)
        assert model.d_model in widths, f"{name}: d_model {model.d_model}, name says {widths}"
        assert layout.patch_size == (patch, patch)
        assert layout.input_size == (resolution, resolution)
        assert layout.n_prefix == n_prefix

    # every hook name resolves to a module; the first and last blocks' hooks, the embedding,
    # the final norm and the output fire with [batch, tokens, d] shapes on a meta forward
    with model.hooks({hook: lambda value, point: None for hook in model.hook_names}):
        pass
    last = model.n_layers - 1
    names = [
        n
        for n in model.hook_names
        if not n.startswith("blocks.") or n.startswith(("blocks.0.", f"blocks.{last}."))
    ]
    x = torch.empty(1, 3, *layout.input_size, device="meta")
    with _middle_blocks_pass_through(model.spec.blocks):
        out, cache = model.run_with_cache(x, names)
    assert list(cache) == names
    n_heads = None
    for hook, value in cache.items():
        if hook.endswith("attn.hook_pattern"):
            n_heads = n_heads or value.shape[1]
            assert tuple(value.shape) == (1, n_heads, layout.n_tokens, layout.n_tokens), hook
        elif hook == "hook_output":
            assert value.shape[:2] == (1, 1)
        elif hook.endswith(("mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear")):
            assert value.shape[:2] == (1, layout.n_tokens) and value.shape[2] >= model.d_model
        elif hook.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")):
            assert value.shape[:2] == (1, layout.n_tokens), hook  # [batch, tokens, heads, d_head]
            assert value.shape[2] * value.shape[3] == model.d_model, hook
        else:
            assert tuple(value.shape) == (1, layout.n_tokens, model.d_model), hook
    assert model.d_model % n_heads == 0
    assert n_heads == cache[f"blocks.{last}.attn.hook_q"].shape[2]
    assert out is not None and out.dim() == 2 and out.shape[0] == 1
    if card.task == "classifier":
        expected = (
            card.kwargs.get("num_classes")
            or get_pretrained_cfg(f"{card.arch}.{card.pretrained}").num_classes
        )
        assert out.shape[1] == expected

    if card.task == "clip":  # a text tower for zero-shot
        text = model.text
        n_ctx = text.layout.n_tokens
        tokens = torch.zeros(1, n_ctx, dtype=torch.long, device="meta")
        text_names = [f"text.blocks.{text.n_layers - 1}.hook_resid_post", "text.hook_output"]
        with _middle_blocks_pass_through(text.spec.blocks):
            out, cache = model.run_with_cache(tokens, text_names)
        assert tuple(cache[text_names[0]].shape) == (1, n_ctx, text.d_model)
        assert out.dim() == 2 and tuple(cache["text.hook_output"].shape) == (1, 1, out.shape[1])
    else:
        with pytest.raises(PrismaError, match="no text tower"):
            model.encode_text(["a photo of a cat"])

    # preprocessing: any small image becomes exactly the model's input
    batch = model.preprocess(Image.fromarray(np.zeros((30, 41, 3), np.uint8)))
    assert tuple(batch.shape) == (1, 3, *layout.input_size)


@pytest.mark.parametrize("name", [n for n in REAL_CARDS if registry.get_card(n).family == "timm"])
def test_timm_card_matches_timm_registry(name: str) -> None:
    card = registry.get_card(name)
    full = f"{card.arch}.{card.pretrained}"
    assert full in timm.list_pretrained(full), f"{full} is not a timm pretrained tag"
    pretrained_cfg = get_pretrained_cfg(full)
    assert card.source == pretrained_cfg.hf_hub_id
    assert not card.kwargs and not card.preprocess
    has_head = pretrained_cfg.num_classes in IMAGENET_HEADS
    assert card.task == ("classifier" if has_head else "embedding")
    # tags trained with QuickGELU must be carded on timm's QuickGELU variant, as trained
    natively_quick_gelu = any("QuickGELU" in note for note in pretrained_cfg.notes or ())
    assert natively_quick_gelu == ("quickgelu" in card.arch)


@pytest.mark.parametrize(
    "name", [n for n in REAL_CARDS if registry.get_card(n).family == "open_clip"]
)
def test_open_clip_card_matches_open_clip_registry(name: str) -> None:
    card = registry.get_card(name)
    assert (card.arch, card.pretrained) in open_clip.list_pretrained()
    tag_cfg = open_clip.get_pretrained_cfg(card.arch, card.pretrained)
    assert card.source == tag_cfg["hf_hub"].rstrip("/")
    assert card.task == "clip" and not card.kwargs and not card.preprocess
    # open_clip only warns when a QuickGELU-trained tag is loaded into a GELU model
    model_cfg = open_clip.get_model_config(card.arch)
    assert bool(tag_cfg.get("quick_gelu", False)) == bool(model_cfg.get("quick_gelu", False))
    assert "vision_cfg" in model_cfg and "text_cfg" in model_cfg


@pytest.mark.parametrize(
    ("name", "mean", "std", "resize"),
    [
        # values from the tags' own configs: SigLIP squashes to 0.5-normalized inputs
        ("clip-siglip-b16-224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), T.Resize),
        ("clip-h14-dfn5b", open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, T.Resize),
        ("clip-b32-laion2b", open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, None),
        ("siglip2-b16-256", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None),
        ("vit-b16-augreg2-in21k-ft-in1k", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None),
        ("deit3-b16-in1k", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None),
        ("dinov2-b14-reg", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None),
    ],
)
def test_transform_uses_the_checkpoints_normalization_even_without_its_weights(
    name: str, mean, std, resize
) -> None:
    model = registry.build_on_meta(name)
    normalize = _normalize(model.spec.transform)
    assert tuple(normalize.mean) == pytest.approx(mean)
    assert tuple(normalize.std) == pytest.approx(std)
    if resize is not None:  # 'squash': a non-square image is resized to the full square
        first = model.spec.transform.transforms[0]
        assert isinstance(first, resize) and tuple(first.size) == model.layout.input_size
    # a wide white image fills the input with no padding border, normalized as the tag says
    white = Image.fromarray(np.full((20, 60, 3), 255, np.uint8))
    pixels = model.preprocess(white)[0]
    expected = torch.tensor([(1 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(pixels.amax(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(pixels.amin(dim=(1, 2)), expected, atol=1e-5)


def test_zoo_has_enough_real_cards_covering_every_family() -> None:
    assert len(REAL_CARDS) >= 60
    prefixes = {
        "vit-": 10,
        "deit-": 4,
        "deit3-": 4,
        "dinov2-": 8,
        "eva02-": 4,
        "siglip-": 4,
        "siglip2-": 4,
        "timm-clip-": 4,
        "clip-siglip": 2,
    }
    for prefix, at_least in prefixes.items():
        assert sum(n.startswith(prefix) for n in REAL_CARDS) >= at_least, prefix
    assert {n.removesuffix("-reg") for n in REAL_CARDS if n.startswith("dinov2-")} == {
        f"dinov2-{size}14" for size in "sblg"
    }
    open_clip_sources = [
        f"{c.arch}/{c.pretrained}"
        for c in map(registry.get_card, registry.list_models("open_clip"))
    ]
    for data in ("openai", "laion2b", "datacomp", "metaclip", "dfn", "SigLIP"):
        assert any(data in source for source in open_clip_sources), data
    for family in ("timm", "open_clip"):
        assert any(registry.get_card(n).is_tiny for n in registry.list_models(family))


def test_card_names_and_sources_are_unique_and_well_formed() -> None:
    cards = [registry.get_card(name) for name in ALL_CARDS]
    assert len({card.name for card in cards}) == len(cards)
    for card in cards:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", card.name), card.name
        assert card.description.strip(), f"{card.name} has no description"
    # one checkpoint, one card: a source may repeat only across libraries (the timm/ repos of
    # OpenAI CLIP hold both timm's and open_clip's weight files)
    real = [card for card in cards if not card.is_tiny]
    keys = [(card.family, card.source) for card in real]
    assert len(set(keys)) == len(keys)
    shared = {c.source for c in real if c.family == "timm"} & {
        c.source for c in real if c.family == "open_clip"
    }
    assert all(source.startswith("timm/") and "openai" in source for source in shared)


def test_list_models_filters_by_family() -> None:
    timm_names = registry.list_models("timm")
    clip_names = registry.list_models("open_clip")
    assert set(timm_names) | set(clip_names) == set(IMAGE_CARDS)
    assert not set(timm_names) & set(clip_names)
    assert all(registry.get_card(n).family == "timm" for n in timm_names)
    assert all(registry.get_card(n).family == "open_clip" for n in clip_names)
    assert "dinov2-b14-reg" in timm_names and "clip-b32-openai" in clip_names
    assert all(registry.get_card(n).task == "clip" for n in clip_names)
    assert not any(registry.get_card(n).task == "clip" for n in timm_names)


def test_unknown_family_and_model_name_the_nearest_valid_ones() -> None:
    with pytest.raises(PrismaError, match=r"unknown model family 'open-clip'.*'open_clip'"):
        registry.list_models("open-clip")
    with pytest.raises(PrismaError, match=r"unknown model 'dinov2-b14-regs'.*'dinov2-b14-reg'"):
        registry.get_card("dinov2-b14-regs")
    with pytest.raises(PrismaError, match=r"'clip-b32-openai'"):
        registry.build_on_meta("clip-b32-opena")
    with pytest.raises(PrismaError, match=r"'siglip2-b16-256'"):
        registry.load_model("siglip2-b16-265", weights=None)


def _zoo_table_module():
    spec = importlib.util.spec_from_file_location("zoo_table", REPO / "scripts" / "zoo_table.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_docs_zoo_table_is_up_to_date_and_lists_every_card() -> None:
    zoo_table = _zoo_table_module()
    text = zoo_table.render()
    assert (REPO / "docs" / "zoo.md").read_text() == text, "run python scripts/zoo_table.py"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(ALL_CARDS)
    for name in ALL_CARDS:
        card = registry.get_card(name)
        (row,) = [r for r in rows if r.startswith(f"| `{name}` |")]
        assert card.source in row and f"| {card.task} |" in row
    assert f"{len(REAL_CARDS)} pretrained checkpoints" in text
    assert zoo_table.main(["--check"]) == 0


@pytest.mark.parametrize(("img_size", "n_tokens"), [(None, 37 * 37 + 1), (224, 16 * 16 + 1)])
def test_dinov2_token_arithmetic_of_the_recipes(img_size, n_tokens):
    # trainers/dinov2-*.yaml cache at --img-size 224: 257 tokens; the card's 518 px: 1,370
    model = registry.build_on_meta("dinov2-b14", img_size=img_size)
    assert model.layout.n_tokens == n_tokens
    assert model.layout.input_size == ((img_size or 518),) * 2
    reg = registry.build_on_meta("dinov2-b14-reg", img_size=img_size)
    assert reg.layout.n_tokens == n_tokens + 4
    for recipe in sorted((registry.zoo_dir().parent / "trainers").glob("dinov2-*.yaml")):
        text = recipe.read_text()
        assert "--img-size 224" in text and "257 tokens" in text and "1,370 tokens" in text
