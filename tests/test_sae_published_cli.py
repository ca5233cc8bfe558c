"""Published SAEs by name through every stage that takes a dictionary: `prisma-mm index`,
`browse`, `eval` and `steer` given only a card's name, with the weights in an offline Hugging
Face cache written in the releases' real layouts (the fixture helpers of test_sae_published).
The card supplies the model, the hook, the tokens (a CLS-only SAE indexes one token per image,
from a cache that keeps every token or from a model run) and the input size (the model runs
at the card's img_size); default outputs go to ./sae-<name>/ (names may hold '/' or ':')."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from bad_input import error_line
from test_sae_published import _prisma_folder, _saev_file, _saev_state, _sdxl_folder, hf_cache
from test_viz_index import _image_tree

import prisma_mm
from prisma_mm.cli import main
from prisma_mm.sae import published
from prisma_mm.sae.published import get_sae_card, load_sae, output_home
from prisma_mm.viz.index import FeatureIndex

HOOK = "blocks.0.hook_resid_post"  # tiny-vit: CLS + 16 patches of d 32 at 32 px
UP = "unet.up.0.0.hook_update"  # tiny-sdxl: 32 channels
N_IMAGES = 6  # _image_tree(root, 2): three class folders of two 32 px images


def _cards() -> dict[str, published.SAECard]:
    """Real cards turned into tiny ones (tiny-vit / tiny-sdxl), hosted on test repos."""
    saev = get_sae_card("saev-clip-b16-in1k-24k")
    tiny = {"model": "tiny-vit", "hook": HOOK, "d_in": 32, "n_latents": 64}
    cards = [
        dataclasses.replace(
            saev, name="tiny-saev-cls", repo="test-org/tiny-saev-cls", tokens="cls", **tiny
        ),
        dataclasses.replace(
            saev,
            name="tiny/saev:48",
            repo="test-org/tiny-saev-48",
            tokens="patches",
            img_size=48,
            **tiny,
        ),
        dataclasses.replace(
            get_sae_card("unbox-sdxl-turbo-up.0.0"),
            name="tiny-unbox",
            repo="github:test-org/tiny-unbox",  # a GitHub-only release, as sdxl-unbox is
            subfolder="checkpoints/final",
            model="tiny-sdxl",
            hook=UP,
            d_in=32,
            n_latents=64,
            k=4,
            img_size=16,
        ),
        dataclasses.replace(
            get_sae_card("prisma-clip-b32-vanilla-x64-l0-resid-post"),
            name="tiny-prisma-ln",
            repo="test-org/tiny-prisma-ln",
            **tiny,
        ),
    ]
    return {c.name: c for c in cards}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The cards' weights in an offline HF cache (and a clone of a GitHub release), a labelled
    image tree, and tiny-vit caches of it at 32 px (every token) and at 48 px (patches)."""
    from huggingface_hub import constants

    from prisma_mm.cache import write_cache

    root = tmp_path_factory.mktemp("published-cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cards = _cards()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(published, "_cards", lambda: cards)
        for name in ("tiny-saev-cls", "tiny/saev:48"):
            snapshot = hf_cache(root / "hub", cards[name].repo, {})
            _saev_file(snapshot / "sae.pt", {"d_vit": 32, "exp_factor": 2}, _saev_state(32, 64))
        _sdxl_folder(root / "clone" / "checkpoints" / "final", d=32, n=64, k=4)
        # ViT-Prisma: config.json (per-token layer norm) + a checkpoint pickling its config class
        state = _saev_state(32, 64)
        cfg = {"d_in": 32, "expansion_factor": 2, "activation_fn_str": "relu",
               "hook_point_layer": 0, "layer_subtype": "hook_resid_post",
               "normalize_activations": "layer_norm"}  # fmt: skip
        snapshot = hf_cache(root / "hub", cards["tiny-prisma-ln"].repo, {})
        _prisma_folder(snapshot, patch, cfg, state)
        images = _image_tree(root / "images", 2)
        for size, tokens in ((32, "all"), (48, "patches")):
            write_cache("tiny-vit", str(images), root / f"cache{size}", [HOOK], weights=None,
                        img_size=size, tokens=tokens, progress=False)  # fmt: skip
        yield {"root": root, "clone": root / "clone", "images": images, "cache32": root / "cache32",
               "cache48": root / "cache48"}  # fmt: skip
    torch.set_num_threads(threads)


def _cls_rows(cache) -> torch.Tensor:
    """The CLS activation ``[images, d]`` of every sample of a cache keeping all tokens."""
    from prisma_mm.cache import ActivationDataset

    rows = [(a, t) for a, _, t in ActivationDataset(cache, HOOK, shuffle_buffer=0,
                                                    provenance=True)]  # fmt: skip
    acts, tokens = torch.cat([a for a, _ in rows]), torch.cat([t for _, t in rows])
    return acts[tokens == 0]


def test_index_and_browse_a_cls_only_sae_by_name(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["index", "tiny-saev-cls", str(world["cache32"]), "--top-n", "3", "--no-progress"]
    assert main(argv) == 0
    index = FeatureIndex.load(tmp_path / "sae-tiny-saev-cls" / "index")  # the default out
    assert index.meta["n_inputs"] == N_IMAGES and index.meta["n_tokens"] == N_IMAGES
    assert (index.layout.n_tokens, index.layout.n_prefix) == (1, 1)
    assert index.meta["score"] == "prefix" and index.meta["cache"]["rows"] == [0]
    assert index.meta["dictionary"]["published"] == "tiny-saev-cls"
    cls = _cls_rows(world["cache32"])
    assert cls.shape == (N_IMAGES, 32)
    with torch.no_grad():
        code = load_sae("tiny-saev-cls").encode(cls)  # [images, 64]: only the CLS token
    assert torch.allclose(index.max_value.float(), code.max(0).values, atol=1e-5)
    assert torch.allclose(index.freq_token.float(), (code > 0).float().mean(0))

    out = tmp_path / "browser"
    assert main(["browse", "tiny-saev-cls", "--out", str(out), "--quiet"]) == 0
    assert (out / "index.html").is_file()
    assert any(p.suffix in (".png", ".jpg", ".webp") for p in out.rglob("*"))  # thumbnails
    sae_cls = tmp_path / "sae-tiny-saev-cls"
    assert sorted(p.name for p in sae_cls.iterdir()) == ["index"]  # nothing else written there


def test_index_of_a_per_token_normalised_sae_ranks_by_its_encode(world, tmp_path):
    """ViT-Prisma's layer_norm SAEs standardise each token inside encode: the index's sparse
    path must see the same code as encode (which the views draw)."""
    out = tmp_path / "index"
    assert main(["index", "tiny-prisma-ln", str(world["cache32"]), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    index = FeatureIndex.load(out)
    from prisma_mm.cache import ActivationDataset

    x = torch.cat(list(ActivationDataset(world["cache32"], HOOK, shuffle_buffer=0)))
    with torch.no_grad():
        code = load_sae("tiny-prisma-ln").encode(x)  # [images x 17 tokens, 64]
    assert index.meta["n_tokens"] == N_IMAGES * 17 == code.shape[0]
    assert torch.allclose(index.max_value.float(), code.max(0).values, atol=1e-4)
    assert torch.allclose(index.freq_token.float(), (code > 0).float().mean(0))


@pytest.mark.parametrize(
    ("name", "tokens", "per_image", "size"),
    [("tiny-saev-cls", "cls", 1, 32), ("tiny/saev:48", "patches", 36, 48)],
)
def test_index_from_data_keeps_the_card_tokens_at_its_img_size(
    world, tmp_path, name, tokens, per_image, size
):
    out = tmp_path / "index"
    argv = ["index", name, str(world["images"]), "--weights", "none", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["tokens"] == tokens and manifest["layout"]["input_size"] == [size, size]
    assert manifest["shapes"][HOOK] == [per_image, 32]  # 48 px: 6 x 6 patches, 32 px: the CLS
    index = FeatureIndex.load(out)
    assert index.meta["n_tokens"] == N_IMAGES * per_image


def test_eval_by_name_runs_the_model_at_the_card_img_size(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sizes = []
    load_model = prisma_mm.load_model

    def spy(*args, **kwargs):
        sizes.append(kwargs.get("img_size"))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(prisma_mm, "load_model", spy)
    argv = ["eval", "tiny/saev:48", "--cache", str(world["cache48"]), "--split", "all",
            "--data", str(world["images"]), "--class-names", "cat,dog,eel", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert sizes == [48]
    report = json.loads((tmp_path / "sae-tiny_saev_48" / "eval.json").read_text())
    assert report["dictionary"] == "tiny/saev:48" and report["hooks"] == [HOOK]
    assert report["spliced"]["model"] == "tiny-vit"
    assert output_home("tiny/saev:48").name == "sae-tiny_saev_48"
    assert not (tmp_path / "tiny").exists()  # the name is not taken for a folder
    # a cache of the model at another size is refused before any work, by eval and index
    line = error_line(["eval", "tiny/saev:48", "--cache", str(world["cache32"]), "--split", "all",
                       "--out", str(tmp_path / "e.json"), "--quiet"], capsys)  # fmt: skip
    assert re.search(r"trained at 48 px but cache .* ran its model at 32x32", line)
    line = error_line(["index", "tiny/saev:48", str(world["cache32"]), "--out",
                       str(tmp_path / "i")], capsys)  # fmt: skip
    assert "--img-size 48" in line
    # and eval measures only the tokens a card was trained on: a cache keeping more is refused
    line = error_line(["eval", "tiny-saev-cls", "--cache", str(world["cache32"]), "--split",
                       "all", "--out", str(tmp_path / "e.json"), "--quiet"], capsys)  # fmt: skip
    assert "trained on cls tokens" in line and "--tokens cls" in line
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "i").exists()


def test_steer_by_name_at_a_clone_uses_the_release_scale_and_the_card_size(world, tmp_path, capsys):
    out = tmp_path / "grid"
    common = ["--latent", "3", "--prompt", "a cat", "--strengths", "0,2", "--steps", "1",
              "--weights", "none", "--out", str(out), "--quiet"]  # fmt: skip
    line = error_line(["steer", "tiny-unbox", *common], capsys)  # GitHub-only: where is it?
    assert "clone https://github.com/test-org/tiny-unbox" in line and "tiny-unbox@<clone>" in line
    spec = f"tiny-unbox@{world['clone']}"  # NAME@FOLDER: the release's files in a clone
    assert main(["steer", spec, *common]) == 0
    settings = json.loads((out / "settings.json").read_text())
    sae = load_sae("tiny-unbox", path=world["clone"])
    assert settings["model"] == "tiny-sdxl" and settings["hook"] == UP
    assert settings["dictionary"] == spec
    assert settings["generation"]["size"] == [16, 16]  # the card's img_size, not tiny-sdxl's 32
    assert settings["mean_active"] == pytest.approx([float(sae.latent_mean[3])])
    assert settings["mean_active_from"] == "the release's latent_mean"
    assert output_home(spec).name == "sae-tiny-unbox"
