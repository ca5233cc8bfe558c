"""Hooked diffusion pipelines on the tiny SDXL-structured card: block names, hook values,
step / timestep / CFG-half tags, bit-identical images with hooks that edit nothing, and loading
from a save_pretrained folder and from an offline HF cache."""

from __future__ import annotations

import json

import pytest
import torch

from prisma_mm.cli import main
from prisma_mm.errors import PrismaError
from prisma_mm.zoo.diffusion import HookedPipeline, load_pipeline, save_hf_cache
from prisma_mm.zoo.registry import load_model

PROMPTS = ["a photo of a cat", "a red car on the street"]
SEEDS = [0, 1]
CFG = {"steps": 2, "guidance": 5.0}  # two steps with classifier-free guidance
BLOCK = "unet.down.2.1"


@pytest.fixture(scope="module")
def hp() -> HookedPipeline:
    torch.set_num_threads(1)
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def plain(hp) -> torch.Tensor:
    """The plain pipeline's images (no hook attached), 2 steps with CFG."""
    return hp.generate(PROMPTS, seeds=SEEDS, **CFG)


def test_block_names_resolve_to_the_native_transformer_blocks(hp):
    unet = hp.pipe.unet
    assert hp.blocks["down.2.1"] is unet.down_blocks[2].attentions[1]
    assert hp.blocks["mid.0"] is unet.mid_block.attentions[0]
    assert hp.blocks["up.0.0"] is unet.up_blocks[0].attentions[0]
    assert hp.blocks["up.0.1"] is unet.up_blocks[0].attentions[1]
    assert list(hp.blocks) == [
        "down.1.0", "down.1.1", "down.2.0", "down.2.1", "mid.0",
        "up.0.0", "up.0.1", "up.0.2", "up.1.0", "up.1.1", "up.1.2",
    ]  # fmt: skip
    for suffix in ("hook_in", "hook_out", "hook_update"):
        assert f"{BLOCK}.{suffix}" in hp.hook_names
    text = [n for n in hp.hook_names if n.startswith("text")]
    assert text == [f"text.blocks.{i}.hook_resid_post" for i in range(2)] + [
        f"text2.blocks.{i}.hook_resid_post" for i in range(2)
    ]
    # grids follow the U-Net's levels at 32 px: latents 16x16, then 8x8, then 4x4
    assert hp.grid(f"{BLOCK}.hook_update") == (4, 4) and hp.d(f"{BLOCK}.hook_update") == 32
    assert hp.grid("unet.mid.0.hook_out") == (4, 4)
    assert hp.grid("unet.up.1.2.hook_in") == (8, 8) and hp.d("unet.up.1.2.hook_in") == 16
    assert hp.grid(f"{BLOCK}.hook_update", size=64) == (8, 8)
    layout = hp.layout_of(f"{BLOCK}.hook_update")
    assert (layout.n_prefix, layout.grid, layout.patch_size) == (0, (1, 4, 4), (8, 8))
    assert hp.d("text2.blocks.1.hook_resid_post") == 16
    with pytest.raises(PrismaError, match=r"unknown hook 'unet.down.2.2.hook_update'.*down\.2\.1"):
        hp.hook_point("unet.down.2.2.hook_update")
    with pytest.raises(PrismaError, match="multiple of 8"):
        hp.check_size(33)


def test_registry_and_zoo_show_serve_the_diffusion_card(hp, capsys):
    assert isinstance(load_model("tiny-sdxl"), HookedPipeline)
    capsys.readouterr()
    assert main(["zoo", "show", "tiny-sdxl"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generate"]["steps"] == 1 and shown["n_layers"] == 11
    assert f"{BLOCK}.hook_update" in shown["hooks"]["model"]


def test_hooks_that_edit_nothing_leave_images_bit_identical_and_update_is_out_minus_in(hp, plain):
    names = [f"{BLOCK}.hook_in", f"{BLOCK}.hook_out", f"{BLOCK}.hook_update",
             "text2.blocks.1.hook_resid_post"]  # fmt: skip
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def read(act, ctx):
        seen[ctx.name].append(act.clone())

    def same_update(act, ctx):
        return act.clone()  # an edit that changes nothing: out + (edited - update) == out

    with hp.hooks({name: read for name in names}), hp.hooks({f"{BLOCK}.hook_update": same_update}):
        hooked = hp.generate(PROMPTS, seeds=SEEDS, **CFG)
    assert torch.equal(hooked, plain)
    hooked.clamp_(0, 1)  # ordinary tensors (no inference-mode tensors handed back)
    assert len(seen[f"{BLOCK}.hook_update"]) == 2  # once per step, the whole CFG batch
    for step in range(2):
        update = seen[f"{BLOCK}.hook_update"][step]
        out_minus_in = seen[f"{BLOCK}.hook_out"][step] - seen[f"{BLOCK}.hook_in"][step]
        assert update.shape == (4, 16, 32)  # [2 halves x 2 prompts, 4*4 tokens, 32 channels]
        assert torch.equal(update, out_minus_in) and update.abs().max() > 0
    # nothing is left attached
    assert torch.equal(hp.generate(PROMPTS, seeds=SEEDS, **CFG), plain)

    # an edit of the update changes the images; the same edit at the cond half of step 1 only
    # leaves step 0 as it was
    def zero(act, ctx):
        return torch.zeros_like(act)

    with hp.hooks({f"{BLOCK}.hook_update": zero}):
        assert not torch.equal(hp.generate(PROMPTS, seeds=SEEDS, **CFG), plain)
    images, acts = hp.run_with_cache(PROMPTS, f"{BLOCK}.hook_out", seeds=SEEDS, **CFG)
    with hp.hooks({f"{BLOCK}.hook_update": zero}, steps=[1], half="cond"):
        _, edited = hp.run_with_cache(PROMPTS, f"{BLOCK}.hook_out", seeds=SEEDS, **CFG)
    assert torch.equal(images, plain)
    assert torch.equal(edited[f"{BLOCK}.hook_out"][:, 0], acts[f"{BLOCK}.hook_out"][:, 0])
    assert not torch.allclose(edited[f"{BLOCK}.hook_out"][:, 1], acts[f"{BLOCK}.hook_out"][:, 1])


def test_steps_timesteps_and_cfg_halves_are_tagged(hp):
    calls = []

    def read(act, ctx):
        calls.append((ctx, act.clone()))

    with hp.hooks({f"{BLOCK}.hook_in": read, "text.blocks.0.hook_resid_post": read}):
        hp.generate(PROMPTS, seeds=SEEDS, **CFG)
    schedule = [float(t) for t in hp.pipe.scheduler.timesteps]
    assert len(schedule) == 2 and schedule[0] != schedule[1]
    text = [c for c in calls if c[0].name.startswith("text")]
    unet = [c for c in calls if c[0].name.startswith("unet")]
    assert [c.step for c, _ in text] == [None] and text[0][0].half == "cond"
    assert [c.step for c, _ in unet] == [0, 1]
    assert [c.timestep for c, _ in unet] == schedule  # the U-Net's own timestep argument
    ctx, cfg_in = unet[0]
    assert ctx.cfg and ctx.halves == {"uncond": slice(0, 2), "cond": slice(2, 4)}
    assert ctx.prompt_index == [0, 1, 0, 1] and ctx.n_steps == 2

    # the cond rows are the prompts' rows: at step 0 (same noise, same timestep) they equal a
    # run without guidance, whose batch is the prompts alone; the uncond rows do not
    no_cfg = []
    with hp.hooks({f"{BLOCK}.hook_in": lambda act, ctx: no_cfg.append((ctx, act.clone()))}):
        hp.generate(PROMPTS, seeds=SEEDS, steps=2, guidance=0.0)
    plain_ctx, plain_in = no_cfg[0]
    assert not plain_ctx.cfg and plain_ctx.halves == {"cond": slice(0, 2)}
    assert plain_ctx.timestep == schedule[0]
    torch.testing.assert_close(cfg_in[2:], plain_in, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cfg_in[:2], plain_in, rtol=1e-2, atol=1e-3)

    # limited to a half and a step: the hook sees only those rows, told which they are
    limited = []
    with hp.hooks({f"{BLOCK}.hook_in": lambda a, c: limited.append((c, a.clone()))},
                  steps=[1], half="uncond"):  # fmt: skip
        hp.generate(PROMPTS, seeds=SEEDS, **CFG)
    ((ctx, rows),) = limited
    assert (ctx.step, ctx.half, ctx.rows, ctx.prompt_index) == (1, "uncond", slice(0, 2), [0, 1])
    assert rows.shape == (2, 16, 32) and torch.equal(rows, unet[1][1][:2])
    # without CFG an uncond-limited hook never fires
    never = []
    with hp.hooks({f"{BLOCK}.hook_in": lambda a, c: never.append(c)}, half="uncond"):
        hp.generate(PROMPTS[:1], steps=1, guidance=0.0)
    assert never == []


def test_pipeline_loads_from_save_pretrained_and_from_the_hf_cache_offline(
    hp, plain, tmp_path, monkeypatch
):
    folder = tmp_path / "saved"
    hp.pipe.save_pretrained(folder)
    from_folder = load_pipeline(folder)
    assert torch.equal(from_folder.generate(PROMPTS, seeds=SEEDS, **CFG), plain)
    assert from_folder.card.arch == "StableDiffusionXLPipeline"
    # a card with a folder of weights keeps the card's generation defaults
    assert load_pipeline("tiny-sdxl", weights=str(folder)).default_steps == 1

    cache = tmp_path / "hub"
    snapshot = save_hf_cache(folder, cache, "prisma-test/tiny-sdxl")
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_cache = load_pipeline("tiny-sdxl", weights="hf-hub:prisma-test/tiny-sdxl")
    assert torch.equal(from_cache.generate(PROMPTS, seeds=SEEDS, **CFG), plain)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PrismaError) as missing:
        load_pipeline("sdxl-turbo")
    message = str(missing.value)
    assert "\n" not in message and "`huggingface-cli download stabilityai/sdxl-turbo`" in message


def test_real_cards_have_the_papers_blocks_and_sd_cards_share_the_code():
    from prisma_mm.zoo.registry import build_on_meta

    turbo = build_on_meta("sdxl-turbo")  # from its architecture config: no download
    assert all(p.device.type == "meta" for p in turbo.pipe.unet.parameters())
    assert turbo.size == (512, 512) and turbo.default_steps == 1 and turbo.default_guidance == 0
    assert turbo.pipe.scheduler.config.timestep_spacing == "trailing"
    for block in ("down.2.1", "mid.0", "up.0.0", "up.0.1"):  # the paper's four, 16x16 x 1280
        name = f"unet.{block}.hook_update"
        assert turbo.grid(name) == (16, 16) and turbo.d(name) == 1280
    assert turbo.layout_of("unet.down.2.1.hook_update").patch_size == (32, 32)
    texts = [n for n in turbo.hook_names if n.startswith("text")]
    assert len(texts) == 12 + 32 and turbo.d("text2.blocks.31.hook_resid_post") == 1280
    sd15 = build_on_meta("sd-v1-5")  # four levels, one text encoder: the same hooks
    assert list(sd15.blocks)[:2] == ["down.0.0", "down.0.1"] and "up.0.0" not in sd15.blocks
    assert sd15.grid("unet.mid.0.hook_out") == (8, 8) and sd15.d("unet.up.3.2.hook_in") == 320
    assert not any(n.startswith("text2.") for n in sd15.hook_names)


def test_random_init_of_a_real_card_builds_its_architecture_seeded(monkeypatch):
    import prisma_mm.zoo.diffusion as diffusion

    full = diffusion._architecture

    def shrunk(card):  # SDXL-Turbo's structure at test size: the same code path as full size
        config = full(card)
        config["unet"].update(
            block_out_channels=[8, 16, 32], attention_head_dim=[1, 2, 4],
            transformer_layers_per_block=[1, 1, 2], cross_attention_dim=32,
            projection_class_embeddings_input_dim=6 * 256 + 16, norm_num_groups=4,
        )  # fmt: skip
        config["vae"].update(block_out_channels=[8, 16], norm_num_groups=4,
                             down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
        for encoder in ("text_encoder", "text_encoder_2"):
            config[encoder].update(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_hidden_layers=2, projection_dim=16)  # fmt: skip
        return config

    monkeypatch.setattr(diffusion, "_architecture", shrunk)
    state = torch.get_rng_state()
    first = load_pipeline("sdxl-turbo", weights=None, size=32)
    again = load_pipeline("sdxl-turbo", weights=None, size=32)
    other = load_pipeline("sdxl-turbo", weights=None, size=32, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    weights = [hp.pipe.unet.state_dict() for hp in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert type(first.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert first.pipe.scheduler.config.timestep_spacing == "trailing"
    assert first.generate("a cat").shape == (1, 3, 32, 32)
