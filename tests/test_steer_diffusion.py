"""Steering generation on the tiny SDXL pipeline: no-ops and the error-kept reconstruction are
bit-identical; a box mask leaves the block's output outside it untouched at the first steered
step and changes it inside; steps and CFG halves gate; several blocks at once; region masks
resized by hand; the heatmap view; `prisma-mm steer` writes its grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prisma_mm.cli import main
from prisma_mm.errors import PrismaError
from prisma_mm.sae import TopKSAE
from prisma_mm.steer import AddFeature, EditFeatures, Reconstruct, RegionMask, steer
from prisma_mm.steer.diffusion import feature_heatmaps, steering_grid

DOWN = "unet.down.1.0.hook_update"  # 8 x 8 grid, 16 channels at 32 px
UP = "unet.up.0.0.hook_update"  # 4 x 4 grid, 32 channels
PROMPTS = ["a photo of a cat", "a red car on the street"]
CFG = {"steps": 2, "guidance": 3.0}  # two steps with classifier-free guidance

pytestmark = pytest.mark.usefixtures("one_thread")


def sae_at(hook: str, d: int, seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d_in=d, n_latents=32, k=4)
    sae.metadata.update(hook=hook, model="tiny-sdxl")
    return sae.eval()


@pytest.fixture(scope="module")
def tiny():
    from prisma_mm.zoo.diffusion import load_pipeline

    hp = load_pipeline("tiny-sdxl")
    down, up = sae_at(DOWN, hp.d(DOWN), 0), sae_at(UP, hp.d(UP), 1)
    clean = hp.generate(PROMPTS, seeds=[0, 1], **CFG)
    return hp, down, up, clean


def generate(hp, interventions=()):
    with steer(hp, list(interventions)):
        return hp.generate(PROMPTS, seeds=[0, 1], **CFG)


def read_outputs(hp, hook, interventions=(), steps=None):
    """The block's output ``{step: [batch, tokens, d]}`` (whole CFG batch) under steering."""
    seen = {}
    out_hook = hook.replace("hook_update", "hook_out")

    def read(act, ctx):
        seen[ctx.step] = act.clone()

    with steer(hp, list(interventions)), hp.hooks({out_hook: read}, steps=steps):
        hp.generate(PROMPTS, seeds=[0, 1], **CFG)
    return seen


def test_strength_zero_and_factor_one_are_bit_identical(tiny):
    hp, down, up, clean = tiny
    nothing = [
        AddFeature(down, [1, 2], 0.0, scale=1.5),
        EditFeatures(up, {3: 1.0}),
        AddFeature(up, 4, 0.0, scale=2.0, steps=[1], half="cond"),
    ]
    assert torch.equal(generate(hp, nothing), clean)
    assert all(item.calls == 0 for item in nothing)
    nudged = generate(hp, [AddFeature(up, 4, 1.0, scale=2.0)])
    assert not torch.equal(nudged, clean)  # the same path with a strength does change them


def test_reconstruction_with_the_error_term_kept_is_bit_identical(tiny):
    hp, down, up, clean = tiny
    kept = [Reconstruct(down, keep_error=True), Reconstruct(up, keep_error=True)]
    assert torch.equal(generate(hp, kept), clean)
    assert [item.calls for item in kept] == [2, 2]  # it ran at both steps, through the SAE
    spliced = generate(hp, [Reconstruct(up)])
    assert (spliced - clean).abs().max() > 1e-4  # the bare reconstruction changes the images


def test_box_mask_changes_the_block_output_inside_only_at_the_first_steered_step(tiny):
    hp, down, _, _ = tiny
    box = RegionMask(box=(0, 0, 16, 12), size=(32, 32))  # left half of the top 3/8
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:3, :4] = True  # cells of 4 x 4 px whose area is at least half in the box
    assert torch.equal(box.tokens((8, 8)), inside.flatten())
    add = AddFeature(down, 5, 3.0, scale=1.0, steps=[1], mask=box)
    clean = read_outputs(hp, DOWN)
    steered = read_outputs(hp, DOWN, [add])
    assert torch.equal(steered[0], clean[0])  # step 0 is not steered
    diff = (steered[1] - clean[1]).abs().amax(-1)  # [batch, 64]
    assert torch.equal(diff[:, ~inside.flatten()], torch.zeros_like(diff[:, ~inside.flatten()]))
    assert bool((diff[:, inside.flatten()] > 0).all())  # every token inside moved, every row
    direction = 3.0 * down.W_dec[5].detach()
    change = steered[1][:, inside.flatten()] - clean[1][:, inside.flatten()]
    assert torch.allclose(change, direction.expand_as(change), atol=1e-5)  # exactly the row


def test_cond_half_only_leaves_the_uncond_rows_untouched(tiny):
    hp, _, up, _ = tiny
    add = AddFeature(up, 7, 4.0, scale=1.0, half="cond")
    clean = read_outputs(hp, UP)
    steered = read_outputs(hp, UP, [add])
    # rows [uncond x 2; cond x 2] at step 0 (the block's first steered call)
    assert torch.equal(steered[0][:2], clean[0][:2])
    assert not torch.equal(steered[0][2:], clean[0][2:])
    uncond = read_outputs(hp, UP, [AddFeature(up, 7, 4.0, scale=1.0, half="uncond")])
    assert torch.equal(uncond[0][2:], clean[0][2:]) and not torch.equal(uncond[0][:2], clean[0][:2])
    with pytest.raises(PrismaError, match="half="):
        AddFeature(up, 7, 1.0, scale=1.0, half="positive")
    # attached by hand to the cond rows only (ctx.rows is that half): the same images
    with hp.hooks({UP: AddFeature(up, 7, 4.0, scale=1.0, half="cond")}, half="cond"):
        by_hand = hp.generate(PROMPTS, seeds=[0, 1], **CFG)
    assert torch.equal(by_hand, generate(hp, [add]))


def test_several_blocks_at_once(tiny):
    hp, down, up, clean = tiny
    at_down = AddFeature(down, 5, 3.0, scale=1.0)
    at_up = EditFeatures(up, {int(i): 0.0 for i in range(32)})  # ablate every latent
    both = [at_down, at_up]
    images = generate(hp, both)
    assert [item.calls for item in both] == [2, 2]
    only_down = generate(hp, [AddFeature(down, 5, 3.0, scale=1.0)])
    assert not torch.equal(images, only_down) and not torch.equal(images, clean)
    # the down block runs before the up block: at step 0 its output is the same either way
    down_both = read_outputs(hp, DOWN, [AddFeature(down, 5, 3.0, scale=1.0), at_up], steps=[0])
    down_only = read_outputs(hp, DOWN, [AddFeature(down, 5, 3.0, scale=1.0)], steps=[0])
    assert torch.equal(down_both[0], down_only[0])


def test_steps_and_halves_need_a_pipeline():
    import prisma_mm

    model = prisma_mm.load_model("tiny-vit", weights=None)
    sae = sae_at("blocks.0.hook_resid_post", model.d_model, 0)
    with (
        pytest.raises(PrismaError, match="diffusion pipeline"),
        steer(model, AddFeature(sae, 1, 1.0, scale=1.0, steps=[0])),
    ):
        pass


def test_region_mask_from_an_image_and_soft_coverage():
    pixels = np.zeros((32, 48), dtype=np.uint8)
    pixels[:, :12] = 255  # the left quarter
    mask = RegionMask(Image.fromarray(pixels))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:, :2] = True  # 8 px cells: column 0 fully covered, column 1 half (0.5 >= 0.5)
    assert torch.equal(mask.tokens((4, 6)), expected.flatten())
    soft = RegionMask(Image.fromarray(pixels), soft=True).tokens((1, 4, 6)).reshape(4, 6)
    assert torch.allclose(soft[0], torch.tensor([1.0, 0.5, 0, 0, 0, 0]))
    with pytest.raises(PrismaError, match="box"):
        RegionMask(box=(0, 0, 40, 8), size=(32, 32))


def test_feature_heatmaps_draw_the_code_per_block_and_step(tiny, tmp_path):
    hp, down, up, _ = tiny
    _, acts = hp.run_with_cache([PROMPTS[0]], [DOWN, UP], seeds=[0], **CFG)
    with torch.no_grad():
        codes = {h: s.encode(acts[h][0]) for h, s in ((DOWN, down), (UP, up))}  # [steps, T, L]
    chosen = {h: int(c.amax((0, 1)).argmax()) for h, c in codes.items()}  # the most active
    features = [(down, chosen[DOWN]), (up, chosen[UP])]
    maps = feature_heatmaps(hp, features, PROMPTS[0], seed=0, out=tmp_path, **CFG)
    assert [m.output.name for m in maps] == [f"{h}-latent{chosen[h]}.png" for h in (DOWN, UP)]
    for m in maps:
        assert m.output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and m.output.stat().st_size > 2_000
        h, w = hp.grid(m.hook)
        assert m.steps == [0, 1] and m.values.shape == (2, h * w)
        expected = codes[m.hook][..., m.latent]  # [steps, tokens] of the cond row
        assert torch.allclose(m.values, expected, atol=1e-6) and m.values.max() > 0
        assert not torch.equal(m.values[0], m.values[1])  # one panel per step, each its own


def test_steering_grid_rows_are_strengths(tiny):
    hp, _, up, _ = tiny

    def rows(strength):
        return AddFeature(up, 7, strength, scale=1.0)

    grid = steering_grid(hp, rows, [0.0, 3.0], PROMPTS, seeds=[0, 1], **CFG)
    assert grid.images.shape == (2, 4, 3, 32, 32) and grid.unsteered.shape == (4, 3, 32, 32)
    assert grid.columns == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert torch.equal(grid.images[0], grid.unsteered)
    with steer(hp, rows(3.0)):
        direct = hp.generate([p for p, _ in grid.columns], [s for _, s in grid.columns], **CFG)
    assert torch.equal(grid.images[1], direct) and not torch.equal(direct, grid.unsteered)


def test_cli_writes_the_grid_beside_the_unsteered_images(tiny, tmp_path, capsys):
    hp, _, up, _ = tiny
    up.save(tmp_path / "sae")
    out = tmp_path / "grid"
    argv = ["steer", str(tmp_path / "sae"), "--mode", "scale", "--latent", "7", "--latent", "9",
            "--strengths", "1,0,3", "--prompt", PROMPTS[0], "--seeds", "0,1,2", "--steps", "2",
            "--guidance", "3", "--at-steps", "0", "--half", "cond", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["format"] == "prisma-mm-steer" and settings["mode"] == "scale"
    assert settings["rows"] == {"name": "factor", "values": [1.0, 0.0, 3.0]}
    assert settings["columns"] == [{"prompt": PROMPTS[0], "seed": s} for s in (0, 1, 2)]
    assert settings["generation"] == {"steps": 2, "guidance": 3.0, "size": [32, 32]}
    grid = settings["grid"]
    assert (grid["rows"], grid["cols"], grid["cell"]) == (3, 3, [32, 32])
    picture = Image.open(out / "grid.png")
    right, bottom = grid["boxes"][-1][-1][2:]
    assert picture.width > right and picture.height > bottom
    cells = [[np.asarray(picture.crop(tuple(b))) for b in row] for row in grid["boxes"]]
    unsteered = [np.asarray(Image.open(out / name)) for name in settings["unsteered"]]
    assert len(unsteered) == 3 and unsteered[0].shape == (32, 32, 3)
    assert all(np.array_equal(cells[0][c], unsteered[c]) for c in range(3))  # factor 1: nothing
    assert not any(np.array_equal(cells[1][c], unsteered[c]) for c in range(3))  # ablated
    edit = EditFeatures(up, {7: 3.0, 9: 3.0}, steps=[0], half="cond")
    with steer(hp, edit):
        direct = hp.generate([PROMPTS[0]] * 3, seeds=[0, 1, 2], steps=2, guidance=3.0)
    from prisma_mm.steer.diffusion import to_pil

    assert all(np.array_equal(cells[2][c], np.asarray(to_pil(direct[c]))) for c in range(3))


HOSTILE = 'a cat <img src=x onerror="alert(1)"> & "dog"'


@pytest.fixture(scope="module")
def indexed(tiny, tmp_path_factory):
    """A prompt cache of DOWN (2 prompts, 2 steps, CFG, images kept), the down SAE saved and
    its feature index."""
    from prisma_mm.cache import write_cache
    from prisma_mm.viz.index import FeatureIndex, build_index

    hp, down, _, _ = tiny
    root = tmp_path_factory.mktemp("prompt_index")
    (root / "prompts.txt").write_text(f"{PROMPTS[0]}\n{HOSTILE}\n")
    generation = {"steps": 2, "guidance": 3.0, "keep_images": True}
    write_cache(hp, str(root / "prompts.txt"), root / "cache", [DOWN], progress=False,
                generation=generation, device="cpu")  # fmt: skip
    down.save(root / "sae")
    build_index(root / "sae", root / "cache", root / "sae" / "index", progress=False)
    return root, FeatureIndex.load(root / "sae" / "index")


def test_cli_add_mode_steers_by_the_index_mean_activation_inside_a_box(tiny, indexed, tmp_path):
    hp, down, _, _ = tiny
    root, index = indexed
    latent = int(index.mean_active.argmax())
    argv = ["steer", str(root / "sae"), "--latent", str(latent), "--strengths", "0,6",
            "--prompt", PROMPTS[1], "--seeds", "3,4", "--steps", "2", "--guidance", "3",
            "--box", "8,8,32,32", "--at-steps", "1", "--out", str(tmp_path / "g"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((tmp_path / "g" / "settings.json").read_text())
    assert settings["mode"] == "add" and settings["latents"] == [latent]
    assert settings["mean_active"] == [pytest.approx(float(index.mean_active[latent]))]
    box = RegionMask(box=(8, 8, 32, 32), size=(32, 32))
    with steer(hp, AddFeature(down, latent, 6.0, scale=index, mask=box, steps=[1])):
        direct = hp.generate([PROMPTS[1]] * 2, seeds=[3, 4], **CFG)
    from prisma_mm.steer.diffusion import to_pil

    picture = Image.open(tmp_path / "g" / "grid.png")
    for c in range(2):
        cell = np.asarray(picture.crop(tuple(settings["grid"]["boxes"][1][c])))
        assert np.array_equal(cell, np.asarray(to_pil(direct[c])))
        unsteered = np.asarray(Image.open(tmp_path / "g" / settings["unsteered"][c]))
        assert not np.array_equal(cell, unsteered)


def test_browser_shows_a_latents_top_generations_with_heatmaps_and_escaped_prompts(tiny, indexed):
    from prisma_mm.viz.browser import CacheSamples, build_browser
    from prisma_mm.viz.index import SampleImages

    hp, down, _, _ = tiny
    root, index = indexed
    hostile = HOSTILE
    # the index carries each generated sample's prompt, seed and step as provenance
    assert {(g["prompt"], g["step"]) for g in index.sample_generated} == {
        (p, s) for p in (PROMPTS[0], hostile) for s in (0, 1)
    }
    images = SampleImages(index)
    first = index.sample_generated.index(next(g for g in index.sample_generated if g["step"] == 1))
    clean = hp.generate([index.sample_generated[first]["prompt"]], seeds=[0], **CFG)
    from prisma_mm.steer.diffusion import to_pil

    drawn = np.asarray(images(first)).astype(int) - np.asarray(to_pil(clean[0])).astype(int)
    assert np.abs(drawn).max() <= 1  # its own image (another batch: float rounding may differ)
    site = root / "browser"
    build_browser(index, site, source=CacheSamples(index, down), top_images=4, interval_images=0,
                  progress=False)  # fmt: skip
    latent = int(index.top_value[:, 0].nan_to_num(-1).argmax())
    text = (site / f"data/latents/000/{latent:06d}.js").read_text()
    assert "<img" not in text and "onerror" in text  # the prompt is data: no markup survives
    data = json.loads(text[text.index(",") + 1 : text.rindex(")")])
    top = data["top"]
    assert top and all(s["prompt"] in (PROMPTS[0], hostile) and s["step"] in (0, 1) for s in top)
    assert all((site / s["img"]).is_file() for s in top if s["img"])  # heatmap thumbnails
    assert sum(1 for s in top if s["img"]) == min(4, len(top))


def test_a_bare_diffusers_pipeline_is_steered_when_called_itself(tiny):
    hp, _, up, clean = tiny
    add = AddFeature(up, 4, 1.0, scale=2.0)
    with steer(hp, add):
        through_generate = hp.generate(PROMPTS, seeds=[0, 1], **CFG)
    with torch.inference_mode(), steer(hp.pipe, add) as hooked:
        assert hooked.pipe is hp.pipe  # wrapped, not copied
        native = hp.pipe(prompt=PROMPTS, num_inference_steps=2, guidance_scale=3.0, height=32,
                         width=32, output_type="pt",
                         generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images  # fmt: skip
    assert add.calls == 2  # both steps of the bare call went through the intervention
    assert torch.equal(native.float(), through_generate)
    assert not torch.equal(through_generate, clean)
