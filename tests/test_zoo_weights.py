"""Every weights path of load_model, fed checkpoints written here in the real on-disk layouts:
safetensors files, timm save_pretrained folders, open_clip .bin/.pt checkpoints, and Hugging
Face cache folders read offline (HF_HUB_OFFLINE=1), plus the errors for each bad case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

import prisma_mm
from prisma_mm import PrismaError
from prisma_mm.zoo.registry import get_card, list_models


def _seeded(name: str, seed: int = 3):
    return prisma_mm.load_model(name, weights=None, seed=seed)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def write_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache folder as huggingface_hub itself lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def _safetensors_bytes(state: dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.read_bytes()


def _run_offline(cache: Path, code: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_safetensors_file(tmp_path):
    source = _seeded("tiny-vit")
    path = tmp_path / "tiny.safetensors"
    save_file(source.module.state_dict(), str(path))
    loaded = prisma_mm.load_model("tiny-vit", weights=path)
    assert _same_weights(loaded.module, source.module)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))


def test_timm_save_pretrained_folder(tmp_path):
    source = _seeded("tiny-eva02")
    save_for_hf(source.module, str(tmp_path / "saved"), safe_serialization=True)
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    loaded = prisma_mm.load_model("tiny-eva02", weights=str(tmp_path / "saved"))
    assert _same_weights(loaded.module, source.module)


def test_open_clip_checkpoints_bin_and_pt(tmp_path):
    source = _seeded("tiny-clip")
    state = source.module.state_dict()
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    # a training checkpoint: nested under state_dict with DDP's module. prefix
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
        tmp_path / "epoch_3.pt",
    )
    for path in (tmp_path / "open_clip_pytorch_model.bin", tmp_path / "epoch_3.pt", tmp_path):
        loaded = prisma_mm.load_model("tiny-clip", weights=path)
        assert _same_weights(loaded.module, source.module), path


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Path("/etc")}, path)
    with pytest.raises(PrismaError, match="pickled objects are refused"):
        prisma_mm.load_model("tiny-vit", weights=path)


def test_wrong_architecture_and_missing_path(tmp_path):
    other = _seeded("tiny-eva02")
    path = tmp_path / "eva.safetensors"
    save_file(other.module.state_dict(), str(path))
    with pytest.raises(PrismaError, match="do not fit this model.*missing keys"):
        prisma_mm.load_model("tiny-vit", weights=path)
    with pytest.raises(PrismaError, match="does not exist"):
        prisma_mm.load_model("tiny-vit", weights=tmp_path / "nope.safetensors")
    with pytest.raises(PrismaError, match="weights="):
        prisma_mm.load_model("tiny-vit", weights=3)


def test_hf_cache_folders_offline_timm_and_open_clip(tmp_path):
    cache = tmp_path / "hub"
    vit = _seeded("tiny-vit")
    write_hf_cache(
        cache,
        "prisma-test/tiny-vit",
        {
            "model.safetensors": _safetensors_bytes(vit.module.state_dict(), tmp_path),
            "config.json": json.dumps({"architecture": "vit_tiny_patch16_224"}).encode(),
        },
    )
    clip = _seeded("tiny-clip")
    config = json.loads(
        (
            Path(prisma_mm.__file__).parent.parent / "model_zoo/open_clip_configs/tiny-clip.json"
        ).read_text()
    )
    write_hf_cache(
        cache,
        "prisma-test/tiny-clip",
        {
            "open_clip_model.safetensors": _safetensors_bytes(clip.module.state_dict(), tmp_path),
            "open_clip_config.json": json.dumps(
                {"model_cfg": config, "preprocess_cfg": {}}
            ).encode(),
        },
    )
    torch.save({k: v.sum() for k, v in vit.module.state_dict().items()}, tmp_path / "vit_sums.pt")
    torch.save({k: v.sum() for k, v in clip.module.state_dict().items()}, tmp_path / "clip_sums.pt")
    result = _run_offline(
        cache,
        f"""
        import torch, prisma_mm
        for name, repo, sums in [("tiny-vit", "prisma-test/tiny-vit", "vit_sums.pt"),
                                 ("tiny-clip", "prisma-test/tiny-clip", "clip_sums.pt")]:
            model = prisma_mm.load_model(name, weights="hf-hub:" + repo)
            expected = torch.load({str(tmp_path)!r} + "/" + sums, weights_only=True)
            got = {{k: v.sum() for k, v in model.module.state_dict().items()}}
            assert got.keys() == expected.keys(), name
            assert all(torch.equal(got[k], expected[k]) for k in got), name
            print("loaded", name)
    """,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["loaded", "tiny-vit", "loaded", "tiny-clip"]


def _real_card(arch: str, tag: str) -> str:
    for name in list_models():
        card = get_card(name)
        if card.arch == arch and card.pretrained == tag:
            return name
    pytest.fail(f"no card for {arch}.{tag}")


def test_real_card_pretrained_from_populated_hf_cache(tmp_path):
    """The real card's own loader (timm, pretrained=True) reading a populated offline cache."""
    name = _real_card("vit_tiny_patch16_224", "augreg_in21k_ft_in1k")
    model = prisma_mm.zoo.registry.build_on_meta(name)
    import timm

    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()
    cache = tmp_path / "hub"
    write_hf_cache(
        cache, get_card(name).source, {"model.safetensors": _safetensors_bytes(state, tmp_path)}
    )
    checksum = float(sum(v.double().sum() for v in state.values()))
    result = _run_offline(
        cache,
        f"""
        import prisma_mm
        model = prisma_mm.load_model({name!r}, weights="pretrained")
        print(float(sum(v.double().sum() for v in model.module.state_dict().values())))
    """,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) == pytest.approx(checksum, rel=1e-9)
    assert model.d_model == 192


def test_pretrained_missing_offline_names_the_files(tmp_path):
    name = _real_card("vit_tiny_patch16_224", "augreg_in21k_ft_in1k")
    clip_names = [n for n in list_models("open_clip") if not n.startswith("tiny-")]
    result = _run_offline(
        tmp_path / "empty",
        f"""
        import prisma_mm
        for name in [{name!r}, {clip_names[0]!r}]:
            try:
                prisma_mm.load_model(name, weights="pretrained")
            except prisma_mm.PrismaError as error:
                print(error)
    """,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "model.safetensors" in lines[0] and get_card(name).source in lines[0]
    assert "open_clip_model.safetensors" in lines[1] and "HF cache" in lines[1]


TINY = [name for name in list_models() if get_card(name).is_tiny]


@pytest.mark.parametrize("name", TINY)
def test_random_init_is_seeded_and_leaves_the_global_rng_alone(name):
    state = torch.get_rng_state()
    first = prisma_mm.load_model(name, weights=None)
    again = prisma_mm.load_model(name, weights="pretrained")  # tiny: random init too
    assert torch.equal(torch.get_rng_state(), state)
    assert _same_weights(first.module, again.module)
    other = prisma_mm.load_model(name, weights=None, seed=1)
    assert not _same_weights(first.module, other.module)


def test_img_size_runs_dinov2_style_cards_at_another_size_with_resampled_weights(tmp_path):
    native = _seeded("tiny-dinov2-reg")  # 28 px, patch 7: 4 x 4 patches
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in native.module.state_dict().items()}, str(path))
    same = prisma_mm.load_model("tiny-dinov2-reg", weights=str(path), img_size=28)
    assert _same_weights(same.module, native.module)
    bigger = prisma_mm.load_model("tiny-dinov2-reg", weights=str(path), img_size=42)
    assert bigger.layout.grid == (1, 6, 6) and bigger.layout.input_size == (42, 42)
    assert bigger.module.pos_embed.shape[1] == native.module.pos_embed.shape[1] * 36 // 16
    state = bigger.module.state_dict()
    for key, value in native.module.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(state[key], value), key
    x = bigger.preprocess(torch.zeros(3, 50, 60))
    _, cache = bigger.run_with_cache(x, "blocks.1.hook_resid_post")
    assert cache["blocks.1.hook_resid_post"].shape == (1, 5 + 36, 32)


def test_img_size_open_clip(tmp_path):
    native = _seeded("tiny-clip")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in native.module.state_dict().items()}, str(path))
    model = prisma_mm.load_model("tiny-clip", weights=str(path), img_size=48)
    assert model.layout.grid == (1, 6, 6) and model.preprocess(torch.zeros(3, 9, 9)).shape[-1] == 48
    assert torch.equal(model.module.token_embedding.weight, native.module.token_embedding.weight)


@pytest.mark.parametrize(
    ("img_size", "message"),
    [
        (0, "positive number"),
        (-14, "positive number"),
        ("224", "positive number"),
        (30, "not a multiple of 'tiny-vit'.s patch size 8: use e.g. 32"),
    ],
)
def test_bad_img_size(img_size, message):
    with pytest.raises(PrismaError, match=message):
        prisma_mm.load_model("tiny-vit", weights=None, img_size=img_size)


def test_bad_devices():
    with pytest.raises(PrismaError, match="unknown device 'gpu'"):
        prisma_mm.load_model("tiny-vit", weights=None, device="gpu")
    with pytest.raises(PrismaError, match="does not exist|no CUDA GPU"):
        prisma_mm.load_model("tiny-vit", weights=None, device="cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(PrismaError, match="no CUDA GPU"):
            prisma_mm.load_model("tiny-vit", weights=None, device="cuda")


def test_corrupt_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 7 + b"not safetensors at all")
    with pytest.raises(PrismaError, match="not a valid safetensors file"):
        prisma_mm.load_model("tiny-vit", weights=str(path))
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(PrismaError, match="cannot read weights"):
        prisma_mm.load_model("tiny-vit", weights=str(text))
