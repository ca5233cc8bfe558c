"""Published SAEs by name: the cards, each release format read from fixtures written in the
release's real layout (file names, key names, shapes, header line) and checked against the
release's own encode / decode math, the Hugging Face cache offline, ``prisma-mm sae`` and
``prisma-mm eval NAME``, and per family that the card's model and hook give activations of the
SAE's ``d_in`` and token count (models on the meta device: no weights)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from bad_input import Payload, RandomImages

import prisma_mm
from prisma_mm.cli import main
from prisma_mm.errors import PrismaError
from prisma_mm.sae import published
from prisma_mm.sae.published import (
    apply_dataset_scaling,
    card_activation_shape,
    estimate_dataset_scaling,
    from_clip_scope,
    from_saev,
    from_sdxl_unbox,
    from_vit_prisma_folder,
    get_sae_card,
    list_saes,
    load_sae,
)

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hf_cache(root: Path, repo: str, files: dict[str, object]) -> Path:
    """A Hugging Face hub cache entry as ``huggingface_hub`` lays it out: ``models--org--name``
    with ``refs/main`` naming a commit and ``snapshots/<commit>/<files>``. Values are bytes,
    or callables writing the file at the path they are given."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)
    (entry / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = entry / "snapshots" / commit / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(target)
        else:
            target.write_bytes(content)  # type: ignore[arg-type]
    return entry / "snapshots" / commit


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------


def test_cards_cover_the_releases_and_name_zoo_models():
    from prisma_mm.zoo.registry import get_card

    names = list_saes()
    families = {get_sae_card(n).family: 0 for n in names}
    for n in names:
        card = get_sae_card(n)
        families[card.family] += 1
        get_card(card.model)  # an existing zoo card, or PrismaError
        assert card.hook.split(".")[0] in ("blocks", "unet")
        assert card.tokens in ("all", "patches", "cls")
    assert families == {"clip_scope": 8, "saev": 2, "sdxl_unbox": 4, "vit_prisma": 73}
    tc = get_sae_card("prisma-clip-b32-transcoder-topk1024-l10")
    assert (tc.hook, tc.hook_out, tc.k) == (
        "blocks.10.ln2.hook_normalized",
        "blocks.10.hook_mlp_out",
        1024,
    )
    assert tc.repo == "Prisma-Multimodal/CLIP-transcoder-topk-1024-x64-all_patches_10-mlp-97"
    assert get_sae_card("saev-dinov2-b14-reg-in1k-24k").normalization == "dataset-scale"
    assert len(list_saes("vit_prisma")) == 73
    with pytest.raises(PrismaError, match="did you mean 'prisma-clip-b32-vanilla-x64-l1-mlp-out'"):
        get_sae_card("prisma-clip-b32-vanila-x64-l1-mlp-out")


@pytest.mark.parametrize(
    ("name", "tokens", "d"),
    [
        ("prisma-clip-b32-vanilla-x64-l3-mlp-out", 50, 768),
        ("prisma-clip-b32-topk64-cls-l5-resid-post", 1, 768),
        ("prisma-clip-b32-vanilla-x64-patches-l2-resid-post", 49, 768),
        ("prisma-clip-b32-transcoder-topk1024-l10", 50, 768),
        ("saev-clip-b16-in1k-24k", 196, 768),
        ("saev-dinov2-b14-reg-in1k-24k", 256, 768),
        ("clipscope-l14-l22-resid-post", 257, 1024),
        ("unbox-sdxl-turbo-down.2.1", 256, 1280),
    ],
)
def test_card_model_and_hook_give_the_sae_width_and_tokens(name, tokens, d):
    card = get_sae_card(name)
    assert card_activation_shape(card) == (tokens, d)
    assert card.d_in == d


# --------------------------------------------------------------------------------------------
# ViT-Prisma
# --------------------------------------------------------------------------------------------


def _prisma_config_module(monkeypatch):
    """ViT-Prisma's config class, importable under its real path while a fixture is pickled."""
    module = types.ModuleType("vit_prisma.sae.config")

    @dataclasses.dataclass
    class VisionModelSAERunnerConfig:
        d_in: int = 8
        expansion_factor: int = 4
        normalize_activations: str = "layer_norm"
        _dtype: str = "float32"

    VisionModelSAERunnerConfig.__module__ = "vit_prisma.sae.config"
    VisionModelSAERunnerConfig.__qualname__ = "VisionModelSAERunnerConfig"
    module.VisionModelSAERunnerConfig = VisionModelSAERunnerConfig
    for name in ("vit_prisma", "vit_prisma.sae"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vit_prisma.sae.config", module)
    return VisionModelSAERunnerConfig


def _prisma_folder(root: Path, monkeypatch, cfg: dict, state: dict, name="n_images_2600058.pt"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    config_class = _prisma_config_module(monkeypatch)
    torch.save({"cfg": config_class(), "state_dict": OrderedDict(state)}, root / name)
    for key in ("vit_prisma", "vit_prisma.sae", "vit_prisma.sae.config"):
        monkeypatch.delitem(sys.modules, key)  # the loader must not need ViT-Prisma
    return root


def _layer_norm_in(x: torch.Tensor):
    mu = x.mean(-1, keepdim=True)
    centred = x - mu
    std = centred.std(-1, keepdim=True)
    return centred / (std + 1e-5), mu, std


def test_vit_prisma_pickled_config_and_layer_norm_match_vit_prisma(tmp_path, monkeypatch):
    d, n = 8, 32
    state = {
        "W_enc": _rand(d, n, seed=1),
        "b_enc": _rand(n, seed=2) * 0.1,
        "W_dec": _rand(n, d, seed=3),
        "b_dec": _rand(d, seed=4) * 0.1,
    }
    cfg = {
        "d_in": d,
        "expansion_factor": 4,
        "activation_fn_str": "relu",
        "architecture": "standard",
        "hook_point_layer": 3,
        "layer_subtype": "hook_resid_post",
        "normalize_activations": "layer_norm",
        "cls_token_only": False,
    }
    folder = _prisma_folder(tmp_path / "p", monkeypatch, cfg, state)
    sae = from_vit_prisma_folder(folder)
    x = _rand(5, d, seed=5) * 3 + 1
    x_in, mu, std = _layer_norm_in(x)  # ViT-Prisma's run_time_activation_ln_in
    code = torch.relu((x_in - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    recon = (code @ state["W_dec"] + state["b_dec"]) * std + mu
    assert torch.allclose(sae.encode(x), code, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x)), recon, atol=1e-5)
    assert torch.allclose(sae(x).recon, recon, atol=1e-5)
    assert sae.metadata["hook"] == "blocks.3.hook_resid_post"
    assert sae.metadata["normalization"]["per_token"] == "layer_norm"
    sae.encode(x[:2])
    with pytest.raises(PrismaError, match="statistics of the rows last encoded"):
        sae.decode(code)  # five rows, but the kept statistics are of two


def test_vit_prisma_transcoder_with_skip_matches_vit_prisma(tmp_path, monkeypatch):
    from prisma_mm.analysis.spliced import reconstruct

    d, n, k = 8, 32, 4
    state = {
        "W_skip": _rand(d, d, seed=6) * 0.2,
        "W_dec": _rand(n, d, seed=7),
        "W_enc": _rand(d, n, seed=8),
        "b_enc": _rand(n, seed=9) * 0.1,
        "b_dec": _rand(d, seed=10) * 0.1,
        "b_dec_out": _rand(d, seed=11) * 0.1,
    }
    cfg = {
        "d_in": d,
        "expansion_factor": 4,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k},
        "is_transcoder": True,
        "transcoder_with_skip_connection": True,
        "d_out": d,
        "hook_point_layer": 1,
        "layer_subtype": "ln2.hook_normalized",
        "out_hook_point_layer": 1,
        "layer_out_subtype": "hook_mlp_out",
        "normalize_activations": "layer_norm",
    }
    sae = from_vit_prisma_folder(
        _prisma_folder(tmp_path / "t", monkeypatch, cfg, state, "weights.pt")
    )
    x = _rand(6, d, seed=12) * 2
    x_in, mu, std = _layer_norm_in(x)
    pre = (x_in - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    top = torch.topk(pre, k, dim=-1)
    code = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    out = code @ state["W_dec"] + state["b_dec_out"] + x @ state["W_skip"].mT
    recon = out * std + mu  # ViT-Prisma: skip on the raw input, then un-normalised
    assert torch.allclose(sae.encode(x), code, atol=1e-5)
    assert torch.allclose(sae(x, x).recon, recon, atol=1e-5)
    assert torch.allclose(reconstruct(sae, x), recon, atol=1e-5)
    assert sae.metadata["hook_out"] == "blocks.1.hook_mlp_out"


class _System:
    """Unpickles as ``os.system(command)``: the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_in": 8, "expansion_factor": 4}))
    torch.save({"state_dict": {"W_enc": Payload(str(marker))}}, folder / "weights.pt")
    with pytest.raises(PrismaError, match="refused") as err:
        from_vit_prisma_folder(folder)
    assert "\n" not in str(err.value) and not marker.exists()
    torch.save({"state_dict": {"W_enc": _System(f"touch {marker}")}}, folder / "weights.pt")
    with pytest.raises(PrismaError, match="refused"):
        from_vit_prisma_folder(folder)
    assert not marker.exists()
    torch.save({"state_dict": {"pre_bias": Payload(str(marker))}}, folder / "state_dict.pth")
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": 4, "d_model": 2, "k": 1}))
    with pytest.raises(PrismaError, match="refused"):
        from_sdxl_unbox(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# sdxl-unbox, saev, CLIP-Scope
# --------------------------------------------------------------------------------------------


def _sdxl_folder(folder: Path, d: int = 8, n: int = 32, k: int = 3) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "encoder.weight": _rand(n, d, seed=20),
        "decoder.weight": _rand(d, n, seed=21),
        "pre_bias": _rand(d, seed=22) * 0.1,
        "latent_bias": _rand(n, seed=23) * 0.1,
        "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
    }
    cfg = {"n_dirs_local": n, "d_model": d, "k": k, "auxk": 256, "dead_steps_threshold": 2441}
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({"state_dict": state}, folder / "state_dict.pth")
    torch.save(torch.rand(n, generator=torch.Generator().manual_seed(24)) + 1, folder / "mean.pt")
    torch.save(torch.rand(n, generator=torch.Generator().manual_seed(25)), folder / "std.pt")
    return state


def test_sdxl_unbox_checkpoint_matches_its_topk_and_keeps_latent_stats(tmp_path):
    folder = tmp_path / "checkpoints" / "unet.mid_block.attentions.0_k10_hidden5120" / "final"
    state = _sdxl_folder(folder)
    sae = from_sdxl_unbox(folder)
    x = _rand(7, 8, seed=26)
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    top = torch.topk(pre, 3, dim=-1)
    code = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    recon = code @ state["decoder.weight"].T + state["pre_bias"]
    assert torch.allclose(sae.encode(x), code, atol=1e-5)
    assert torch.allclose(sae(x).recon, recon, atol=1e-5)
    assert torch.equal(sae.latent_mean, torch.load(folder / "mean.pt"))
    assert sae.latent_std.shape == (32,)


def _saev_file(path: Path, header: dict, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())


def _saev_state(d: int, n: int, bias: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "W_dec": _rand(n, d, seed=30),
        "b_dec": _rand(d, seed=31) * 0.1,
        "W_enc": _rand(d, n, seed=32),
        "b_enc": _rand(n, seed=33) * 0.1 + bias,
    }


def test_saev_pre_schema_and_schema_5_headers_match_saev(tmp_path):
    d, n = 8, 32
    legacy = _saev_state(d, n)
    header = {"d_vit": d, "exp_factor": 4, "sparsity_coeff": 4e-4, "n_reinit_samples": 524288,
              "ghost_grads": False, "remove_parallel_grads": True, "normalize_w_dec": True,
              "seed": 0}  # fmt: skip
    _saev_file(tmp_path / "sae.pt", header, legacy)
    sae = from_saev(tmp_path / "sae.pt")
    x = _rand(5, d, seed=34)
    f_x = torch.relu((x - legacy["b_dec"]) @ legacy["W_enc"] + legacy["b_enc"])
    assert torch.allclose(sae.encode(x), f_x, atol=1e-5)
    assert torch.allclose(sae(x).recon, f_x @ legacy["W_dec"] + legacy["b_dec"], atol=1e-5)

    modern = _saev_state(d, n, bias=6.0)  # positive pre-activations: saev's TopK keeps them as is
    activation = {"cls": "TopK", "params": {"key": "top-k", "top_k": 3,
                  "sparsity": {"cls": "NoSparsity", "params": {}},
                  "aux": {"cls": "AuxK", "params": {}}}}  # fmt: skip
    header = {"schema": 5, "cfg": {"d_model": d, "d_sae": n, "activation": activation,
              "reinit_blend": 0.8}, "commit": "abc", "lib": "1.1"}  # fmt: skip
    _saev_file(tmp_path / "sae5.pt", header, modern)
    sae = from_saev(tmp_path / "sae5.pt")
    h_x = x @ modern["W_enc"] + modern["b_enc"]
    mask = torch.zeros_like(h_x).scatter(-1, torch.topk(h_x, 3, dim=-1).indices, 1.0)
    assert torch.allclose(sae.encode(x), mask * h_x, atol=1e-5)
    assert torch.allclose(sae(x).recon, (mask * h_x) @ modern["W_dec"] + modern["b_dec"], atol=1e-4)
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02not json\n")
    with pytest.raises(PrismaError, match="first line must be a JSON header"):
        from_saev(tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """8 random images through tiny-vit at blocks.0.hook_resid_post: 17 tokens (CLS + 16
    patches) of d 32."""
    from prisma_mm.cache import write_cache

    out = tmp_path_factory.mktemp("cache") / "tiny-vit"
    write_cache("tiny-vit", RandomImages(8), out, [HOOK], weights=None, progress=False)
    return out


def test_saev_scaling_is_estimated_from_the_cache_patches_and_folded(tiny_cache, tmp_path):
    from prisma_mm.cache import ActivationDataset

    rows = [(a, t) for a, _, t in ActivationDataset(tiny_cache, HOOK, shuffle_buffer=0,
                                                    provenance=True)]  # fmt: skip
    acts = torch.cat([a for a, _ in rows]).double()
    tokens = torch.cat([t for _, t in rows])
    patches = acts[tokens >= 1]  # tiny-vit: one CLS token first
    assert patches.shape == (8 * 16, 32)
    mean = patches.mean(0)
    scale = float((patches - mean).norm(dim=1).mean()) / math.sqrt(32)
    got_mean, got_scale = estimate_dataset_scaling(tiny_cache, HOOK, "patches")
    assert torch.allclose(got_mean.double(), mean, atol=1e-5)
    assert got_scale == pytest.approx(scale, rel=1e-6)

    state = _saev_state(32, 64)
    _saev_file(tmp_path / "sae.pt", {"d_vit": 32, "exp_factor": 2}, state)
    sae = from_saev(tmp_path / "sae.pt")
    sae.metadata.update(hook=HOOK, tokens="patches")
    apply_dataset_scaling(sae, tiny_cache)
    x = patches[:6].float()
    scaled = (x - mean.float()) / scale
    f_x = torch.relu((scaled - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    recon = (f_x @ state["W_dec"] + state["b_dec"]) * scale + mean.float()
    # folded as the library folds a scalar scale: codes in raw units (saev's times scale)
    assert torch.allclose(sae.encode(x), f_x * scale, atol=1e-4)
    assert torch.allclose(sae(x).recon, recon, atol=1e-4)
    assert sae.metadata["normalization"]["folded"] is True


def _clip_scope_file(path: Path, d: int = 8, n: int = 32, k: int = 4) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"pre_b": _rand(d, seed=40) * 0.1, "enc": _rand(d, n, seed=41),
             "dec": _rand(n, d, seed=42)}  # fmt: skip
    torch.save({"d_in": d, "n_features": n, "k": k, "model_state_dict": state}, path)
    return state


def test_clip_scope_checkpoint_matches_clipscope(tmp_path):
    state = _clip_scope_file(tmp_path / "22_resid" / "1200013184.pt")
    sae = from_clip_scope(tmp_path / "22_resid" / "1200013184.pt")
    x = _rand(6, 8, seed=43)
    pre = (x - state["pre_b"]) @ state["enc"]
    top = torch.topk(pre, 4, dim=-1)
    assert bool((top.values > 0).all())  # where clipscope's TopK and ours agree
    latent = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert torch.allclose(sae.encode(x), latent, atol=1e-5)
    assert torch.allclose(sae(x).recon, latent @ state["dec"] + state["pre_b"], atol=1e-5)


# --------------------------------------------------------------------------------------------
# By name: the HF cache offline, a local folder, the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_cards(monkeypatch):
    """Real cards shrunk to test sizes (and one on tiny-vit for eval), in place of the zoo's."""
    cards = {
        "prisma-clip-b32-vanilla-x64-l3-mlp-out": dataclasses.replace(
            get_sae_card("prisma-clip-b32-vanilla-x64-l3-mlp-out"), d_in=8, n_latents=32
        ),
        "clipscope-l14-l2-resid-post": dataclasses.replace(
            get_sae_card("clipscope-l14-l2-resid-post"), d_in=8, n_latents=32
        ),
        "unbox-sdxl-turbo-mid.0": dataclasses.replace(
            get_sae_card("unbox-sdxl-turbo-mid.0"), d_in=8, n_latents=32
        ),
        "tiny-saev": dataclasses.replace(
            get_sae_card("saev-clip-b16-in1k-24k"),
            name="tiny-saev",
            model="tiny-vit",
            hook=HOOK,
            d_in=32,
            n_latents=64,
        ),  # fmt: skip
        "tiny-sdxl-unbox": dataclasses.replace(
            get_sae_card("unbox-sdxl-turbo-mid.0"),
            name="tiny-sdxl-unbox",
            model="tiny-vit",
            hook=HOOK,
            d_in=32,
            n_latents=64,
            subfolder="",
        ),  # fmt: skip
    }
    monkeypatch.setattr(published, "_cards", lambda: cards)
    return cards


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_load_by_name_offline_from_the_hf_cache_picks_the_final_checkpoint(
    small_cards, offline_cache, tmp_path, monkeypatch
):
    card = small_cards["prisma-clip-b32-vanilla-x64-l3-mlp-out"]
    state = {"W_enc": _rand(8, 32, seed=50), "W_dec": _rand(32, 8, seed=51),
             "b_enc": torch.zeros(32), "b_dec": torch.zeros(8)}  # fmt: skip
    cfg = {"d_in": 8, "expansion_factor": 4, "activation_fn_str": "relu",
           "hook_point_layer": 3, "layer_subtype": "hook_mlp_out",
           "normalize_activations": "none"}  # fmt: skip
    snapshot = hf_cache(offline_cache, card.repo, {"config.json": json.dumps(cfg).encode()})
    torch.save({"state_dict": state}, snapshot / "n_images_2600058.pt")
    torch.save({"state_dict": {**state, "W_dec": torch.zeros(32, 8)}}, snapshot / "n_images_5.pt")
    sae = prisma_mm.load_sae(card.name)
    assert torch.equal(sae.W_dec.detach(), state["W_dec"])  # n_images_2600058, the final one
    assert sae.metadata["hook"] == "blocks.3.hook_mlp_out"
    assert (sae.metadata["model"], sae.metadata["published"]) == ("clip-b32-datacomp-xl", card.name)

    scope = small_cards["clipscope-l14-l2-resid-post"]
    snapshot = hf_cache(offline_cache, scope.repo, {})
    _clip_scope_file(snapshot / "2_resid" / "100663296.pt")
    final = _clip_scope_file(snapshot / "2_resid" / "1200013184.pt")
    assert torch.equal(load_sae(scope.name).W_enc.detach(), final["enc"])

    unbox = small_cards["unbox-sdxl-turbo-mid.0"]
    clone = tmp_path / "sdxl-unbox"
    _sdxl_folder(clone / unbox.subfolder)
    sae = load_sae(unbox.name, path=clone)  # a clone of the GitHub repo
    assert sae.metadata["hook"] == "unet.mid.0.hook_update" and sae.cfg.k == 3


def test_missing_offline_weights_name_what_to_fetch(small_cards, offline_cache):
    with pytest.raises(PrismaError) as err:
        load_sae("prisma-clip-b32-vanilla-x64-l3-mlp-out")
    line = str(err.value)
    assert "\n" not in line and "weights not found offline" in line
    assert "huggingface-cli download Prisma-Multimodal/sparse-autoencoder-clip-b-32" in line
    with pytest.raises(PrismaError, match="clone https://github.com/surkovv/sdxl-unbox"):
        load_sae("unbox-sdxl-turbo-mid.0")


def test_sae_list_and_show(capsys, offline_cache):
    assert main(["sae", "list", "--family", "saev"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "model", "hook"]
    assert lines[-1] == "2 published SAEs"
    assert lines[1].split()[:5] == [
        "saev-clip-b16-in1k-24k", "clip-b16-openai", "blocks.10.hook_resid_post", "patches",
        "24576",
    ]  # fmt: skip
    assert main(["sae", "show", "saev-clip-b16-in1k-24k"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["repo"] == "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K"
    assert shown["activations"] == {"tokens": 196, "d": 768}
    assert shown["in_hf_cache"] is None


def test_eval_takes_a_published_name(small_cards, tiny_cache, tmp_path, monkeypatch):
    from prisma_mm.cache import ActivationDataset

    clone = tmp_path / "clone"
    _sdxl_folder(clone, d=32, n=64, k=4)
    resolve = published.resolve_files
    # eval gets the name only: the card's files come from the clone, as from a cache
    monkeypatch.setattr(
        published, "resolve_files", lambda card, path=None, **kw: resolve(card, clone, **kw)
    )
    out = tmp_path / "eval.json"
    argv = ["eval", "tiny-sdxl-unbox", "--cache", str(tiny_cache), "--split", "all"]
    argv += ["--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["hooks"] == [HOOK] and report["architecture"] == "topk"
    sae = load_sae("tiny-sdxl-unbox")
    x = torch.cat(list(ActivationDataset(tiny_cache, HOOK, shuffle_buffer=0)))
    with torch.no_grad():
        recon = sae(x).recon
    fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert report["metrics"]["fvu"] == pytest.approx(fvu, rel=1e-4)


def test_docs_table_is_the_cards():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "published_saes.md").read_text()
    table = doc.split("<!-- cards:start -->\n", 1)[1].split("<!-- cards:end -->", 1)[0]
    assert table == published.markdown_table()
    assert table.count("\n| `") == len(list_saes())


def test_constant_norm_rescale_matches_vit_prisma():
    from prisma_mm.sae import ReLUSAE
    from prisma_mm.sae.published import standardize_tokens

    sae = ReLUSAE(d_in=8, n_latents=32)
    with torch.no_grad():
        for name, seed in (("W_enc", 60), ("W_dec", 61), ("b_enc", 62), ("b_dec", 63)):
            getattr(sae, name).copy_(_rand(*getattr(sae, name).shape, seed=seed) * 0.5)
    standardize_tokens(sae, "constant_norm_rescale")
    x = _rand(4, 8, seed=64) * 5
    coeff = math.sqrt(8) / x.norm(dim=-1, keepdim=True)  # ViT-Prisma's x_norm_coeff
    code = torch.relu((x * coeff - sae.b_dec) @ sae.W_enc + sae.b_enc)
    recon = (code @ sae.W_dec + sae.b_dec) / coeff
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), code, atol=1e-5)
        assert torch.allclose(sae(x).recon, recon, atol=1e-4)
    assert sae.metadata["normalization"]["per_token"] == "constant_norm_rescale"


def test_load_by_name_estimates_saev_scaling_from_a_cache(small_cards, offline_cache, tiny_cache):
    state = _saev_state(32, 64)
    snapshot = hf_cache(offline_cache, small_cards["tiny-saev"].repo, {})
    _saev_file(snapshot / "sae.pt", {"d_vit": 32, "exp_factor": 2}, state)
    raw = load_sae("tiny-saev")
    scaled = load_sae("tiny-saev", scaling_cache=tiny_cache)
    mean, scale = estimate_dataset_scaling(tiny_cache, HOOK, "patches")
    x = _rand(3, 32, seed=70)
    with torch.no_grad():
        assert torch.allclose(scaled.encode(x), raw.encode((x - mean) / scale) * scale, atol=1e-4)
    assert scaled.metadata["normalization"]["estimated_from"] == str(tiny_cache.resolve())
    with pytest.raises(PrismaError, match="dataset-scale cards only"):
        load_sae("tiny-sdxl-unbox", scaling_cache=tiny_cache)
