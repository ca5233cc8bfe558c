"""Saving, loading and converting dictionaries: exact round trips and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import prisma_mm.sae as S
from prisma_mm.errors import PrismaError
from prisma_mm.sae.io import detect_format, prepare_hub_folder


def _randomise(d: S.Dictionary, seed: int = 0) -> S.Dictionary:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(
                torch.rand(p.shape, generator=gen) * 0.5 + 0.05
                if "threshold" in name
                else torch.randn(p.shape, generator=gen) * 0.3
            )
    if isinstance(getattr(d, "activation", None), S.batchtopk.BatchTopKActivation):
        d.activation.threshold.fill_(0.25)
    return d.eval()


EXAMPLES = {
    "topk": lambda: S.TopKSAE(d_in=6, n_latents=20, k=3, multi_topk=True),
    "batchtopk": lambda: S.BatchTopKSAE(d_in=6, n_latents=20, k=3),
    "relu": lambda: S.ReLUSAE(d_in=6, n_latents=20, l1_coefficient=3.0),
    "jumprelu": lambda: S.JumpReLUSAE(d_in=6, n_latents=20, target_l0=5.0),
    "matryoshka": lambda: S.MatryoshkaSAE(d_in=6, n_latents=20, k=3, group_sizes=[4, 6, 10]),
    "matryoshka-k": lambda: S.MatryoshkaSAE(d_in=6, n_latents=20, nesting="k", ks=[2, 4]),
    "transcoder": lambda: S.Transcoder(d_in=6, n_latents=20, d_out=4, activation="relu", skip=True),
    "crosscoder": lambda: S.Crosscoder(d_in=6, n_sources=3, n_latents=20, k=3),
}


def _inputs(d: S.Dictionary):
    gen = torch.Generator().manual_seed(7)
    if d.architecture == "crosscoder":
        return torch.randn(9, 3, 6, generator=gen), None
    target = torch.randn(9, 4, generator=gen) if d.architecture == "transcoder" else None
    return torch.randn(9, 6, generator=gen), target


def _assert_same(a: S.Dictionary, b: S.Dictionary) -> None:
    assert type(a) is type(b) and a.cfg == b.cfg
    sa, sb = a.inference_state_dict(), b.inference_state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x, target = _inputs(a)
    assert torch.equal(a.eval()(x, target).recon, b.eval()(x, target).recon)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_save_load_round_trip_is_exact(tmp_path, name):
    d = _randomise(EXAMPLES[name]())
    d.metadata = {"hook": "blocks.3.hook_resid_post", "model": "tiny-vit"}
    d.tracker.update(torch.ones(2, 20))  # training state: not in the saved weights
    d.save(tmp_path / "dict")
    cfg = json.loads((tmp_path / "dict" / "cfg.json").read_text())
    assert cfg["architecture"] == d.architecture and cfg["metadata"] == d.metadata
    assert not any(
        k.startswith("tracker.") for k in load_file(tmp_path / "dict" / "weights.safetensors")
    )
    loaded = S.load(tmp_path / "dict")
    _assert_same(d, loaded)
    assert loaded.metadata == d.metadata and not loaded.training
    assert type(d).load(tmp_path / "dict").cfg == d.cfg


def test_load_reports_wrong_shapes_missing_keys_and_wrong_class(tmp_path):
    d = _randomise(EXAMPLES["topk"]())
    d.save(tmp_path / "a")
    weights = tmp_path / "a" / "weights.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "W_dec": torch.zeros(20, 7)}, weights)
    with pytest.raises(
        PrismaError,
        match=r"weights.safetensors: tensor 'W_dec' has shape \(20, 7\), expected \(20, 6\)",
    ):
        S.load(tmp_path / "a")
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, weights)
    with pytest.raises(PrismaError, match=r"weights.safetensors: missing tensor\(s\) 'b_enc'"):
        S.load(tmp_path / "a")
    save_file({**tensors, "extra": torch.zeros(1)}, weights)
    with pytest.raises(PrismaError, match="unexpected tensor.*'extra'"):
        S.load(tmp_path / "a")
    save_file(tensors, weights)
    with pytest.raises(PrismaError, match="holds a 'topk' dictionary, not a 'relu'"):
        S.ReLUSAE.load(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text('{"architecture": "gated", "config": {}}')
    with pytest.raises(PrismaError, match="unknown architecture 'gated'"):
        S.load(tmp_path / "a")
    with pytest.raises(PrismaError, match="file not found"):
        S.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka", "matryoshka-k", "transcoder"]
)
def test_saelens_round_trip_is_exact(tmp_path, name):
    d = _randomise(EXAMPLES[name]())
    d.metadata = {"hook": "blocks.1.hook_resid_post", "model": "tiny-vit"}
    S.to_saelens(d, tmp_path / "sl")
    assert detect_format(tmp_path / "sl") == "saelens"
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    want = {
        "topk": "topk",
        "batchtopk": "jumprelu",
        "relu": "standard",
        "jumprelu": "jumprelu",
        "matryoshka": "jumprelu",
        "matryoshka-k": "topk",
        "transcoder": "skip_transcoder",
    }[name]
    assert cfg["architecture"] == want and cfg["d_sae"] == 20 and cfg["d_in"] == 6
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    tensors = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (6, 20) and tensors["W_dec"].shape[0] == 20
    assert ("threshold" in tensors) == (want == "jumprelu")
    back = S.from_saelens(tmp_path / "sl")
    _assert_same(d, back)
    assert back.metadata == d.metadata


def _write_saelens(path, arch, tensors, **cfg):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"architecture": arch, **cfg}))
    save_file(tensors, path / "sae_weights.safetensors")


def test_reads_native_saelens_files_with_reference_encoding(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w_enc, w_dec = torch.randn(6, 20, generator=gen), torch.randn(20, 6, generator=gen)
    b_enc, b_dec = torch.randn(20, generator=gen) * 0.1, torch.randn(6, generator=gen)
    threshold = torch.rand(20, generator=gen)
    base = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
    x = torch.randn(5, 6, generator=gen)
    pre = (x - b_dec) @ w_enc + b_enc
    _write_saelens(
        tmp_path / "j",
        "jumprelu",
        {**base, "threshold": threshold},
        d_in=6,
        d_sae=20,
        metadata={"hook_name": "blocks.0.hook_resid_pre", "model_name": "m"},
    )
    sae = S.from_pretrained(tmp_path / "j")
    assert isinstance(sae, S.JumpReLUSAE) and sae.metadata == {
        "hook": "blocks.0.hook_resid_pre",
        "model": "m",
    }
    torch.testing.assert_close(sae.encode(x), pre.relu() * (pre > threshold))
    _write_saelens(tmp_path / "t", "topk", base, d_in=6, d_sae=20, k=4, apply_b_dec_to_input=False)
    sae = S.from_pretrained(tmp_path / "t")
    assert isinstance(sae, S.TopKSAE) and sae.cfg.k == 4 and not sae.apply_b_dec_to_input
    vals, idx = (x @ w_enc + b_enc).topk(4, dim=1)
    torch.testing.assert_close(sae.encode(x), torch.zeros(5, 20).scatter(1, idx, vals.relu()))
    _write_saelens(
        tmp_path / "b",
        "batchtopk",
        {**base, "topk_threshold": torch.tensor(0.3, dtype=torch.float64)},
        d_in=6,
        d_sae=20,
        k=3.0,
    )
    sae = S.from_pretrained(tmp_path / "b")
    assert isinstance(sae, S.BatchTopKSAE) and float(sae.activation.threshold) == pytest.approx(0.3)
    _write_saelens(
        tmp_path / "bad", "standard", {**base, "W_enc": torch.zeros(6, 21)}, d_in=6, d_sae=20
    )
    with pytest.raises(
        PrismaError,
        match=r"sae_weights.safetensors: tensor 'W_enc' has shape \(6, 21\), expected \(6, 20\)",
    ):
        S.from_saelens(tmp_path / "bad")
    _write_saelens(
        tmp_path / "ln", "standard", base, d_in=6, d_sae=20, normalize_activations="layer_norm"
    )
    with pytest.raises(PrismaError, match="normalize_activations='layer_norm'"):
        S.from_saelens(tmp_path / "ln")
    with pytest.raises(PrismaError, match="crosscoder"):
        S.to_saelens(EXAMPLES["crosscoder"](), tmp_path / "cc")


def test_sparsify_round_trip_and_native_layout(tmp_path):
    d = _randomise(EXAMPLES["topk"]())
    S.to_sparsify(d, tmp_path / "sp")
    tensors = load_file(tmp_path / "sp" / "sae.safetensors")
    assert tensors["encoder.weight"].shape == (20, 6) and tensors["W_dec"].shape == (20, 6)
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg["k"] == 3 and cfg["num_latents"] == 20 and cfg["d_in"] == 6 and cfg["multi_topk"]
    back = S.from_pretrained(tmp_path / "sp")
    _assert_same(d, back)
    # a sparsify transcoder (transcode: no b_dec subtraction) with a skip connection
    gen = torch.Generator().manual_seed(1)
    native = {
        "encoder.weight": torch.randn(12, 6, generator=gen),
        "encoder.bias": torch.randn(12, generator=gen),
        "W_dec": torch.randn(12, 6, generator=gen),
        "b_dec": torch.randn(6, generator=gen),
        "W_skip": torch.randn(6, 6, generator=gen),
    }
    (tmp_path / "tc").mkdir()
    save_file(native, tmp_path / "tc" / "sae.safetensors")
    (tmp_path / "tc" / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 2,
                "num_latents": 0,
                "k": 2,
                "transcode": True,
                "skip_connection": True,
                "normalize_decoder": True,
                "multi_topk": False,
                "d_in": 6,
            }
        )
    )
    tc = S.from_sparsify(tmp_path / "tc")
    assert isinstance(tc, S.Transcoder) and tc.cfg.n_latents == 12 and tc.cfg.skip
    x = torch.randn(4, 6, generator=gen)
    vals, idx = (x @ native["encoder.weight"].T + native["encoder.bias"]).relu().topk(2, dim=1)
    code = torch.zeros(4, 12).scatter(1, idx, vals)
    want = code @ native["W_dec"] + native["b_dec"] + x @ native["W_skip"].T
    torch.testing.assert_close(tc(x, torch.zeros(4, 6)).recon, want)
    save_file({**native, "encoder.bias": torch.zeros(13)}, tmp_path / "tc" / "sae.safetensors")
    with pytest.raises(
        PrismaError,
        match=r"sae.safetensors: tensor 'encoder.bias' has shape \(13,\), expected \(12,\)",
    ):
        S.from_sparsify(tmp_path / "tc")


def test_vit_prisma_state_dict_is_read_without_unpickling(tmp_path):
    gen = torch.Generator().manual_seed(2)
    state = {
        "W_enc": torch.randn(6, 24, generator=gen),
        "W_dec": torch.randn(24, 6, generator=gen),
        "b_enc": torch.randn(24, generator=gen),
        "b_dec": torch.randn(6, generator=gen),
    }
    cfg = {
        "d_in": 6,
        "expansion_factor": 4,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
        "architecture": "standard",
        "hook_point_layer": 9,
        "layer_subtype": "hook_resid_post",
        "model_name": "open-clip:laion/CLIP-ViT-B-32",
        "normalize_activations": "none",
    }
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    torch.save({"state_dict": state}, tmp_path / "p" / "weights.pt")
    sae = S.from_pretrained(tmp_path / "p")
    assert isinstance(sae, S.TopKSAE) and sae.cfg.k == 5 and sae.cfg.n_latents == 24
    assert sae.metadata["hook"] == "blocks.9.hook_resid_post"
    for key, value in state.items():
        assert torch.equal(getattr(sae, key).detach(), value)
    torch.save(state, tmp_path / "p" / "weights.pt")  # a bare state dict works too
    relu_cfg = {**cfg, "activation_fn_str": "relu"}
    (tmp_path / "p" / "config.json").write_text(json.dumps(relu_cfg))
    assert isinstance(S.from_vit_prisma(tmp_path / "p"), S.ReLUSAE)
    (tmp_path / "p" / "config.json").write_text(
        json.dumps({**relu_cfg, "normalize_activations": "layer_norm"})
    )
    with pytest.raises(PrismaError, match="layer_norm"):
        S.from_vit_prisma(tmp_path / "p")
    assert (
        S.from_vit_prisma(tmp_path / "p", ignore_normalization=True).metadata[
            "unapplied_normalization"
        ]
        == "layer_norm"
    )
    (tmp_path / "p" / "config.json").write_text(json.dumps(relu_cfg))
    torch.save({"cfg": _Pickled(), "state_dict": state}, tmp_path / "p" / "weights.pt")
    with pytest.raises(PrismaError, match="weights_only=True"):
        S.from_vit_prisma(tmp_path / "p")
    torch.save({**state, "W_dec": torch.zeros(24, 5)}, tmp_path / "p" / "weights.pt")
    with pytest.raises(
        PrismaError, match=r"weights.pt: tensor 'W_dec' has shape \(24, 5\), expected \(24, 6\)"
    ):
        S.from_vit_prisma(tmp_path / "p")


class _Pickled:
    """An arbitrary object: loading it would need unpickling code."""


def test_from_pretrained_reads_the_hugging_face_cache_offline(tmp_path):
    d = _randomise(EXAMPLES["topk"]())
    cache = tmp_path / "hub"
    repo = cache / "models--org--saes"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    d.save(snapshot / "blocks.3.hook_resid_post")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    got = S.from_pretrained(
        "org/saes", subfolder="blocks.3.hook_resid_post", cache_dir=cache, local_files_only=True
    )
    _assert_same(d, got)
    with pytest.raises(PrismaError, match="could not get 'org/missing'"):
        S.from_pretrained("org/missing", cache_dir=cache, local_files_only=True)
    with pytest.raises(PrismaError, match="neither an existing directory nor a hub repo id"):
        S.from_pretrained("not-a-dir-or-repo")


def test_prepare_hub_folder_holds_what_push_to_hub_uploads(tmp_path):
    d = _randomise(EXAMPLES["matryoshka"]())
    d.metadata = {"hook": "blocks.5.hook_resid_post", "model": "clip-vit-b-32"}
    folder = prepare_hub_folder(d, tmp_path / "up", repo_id="me/saes", subfolder="layer5")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "layer5/cfg.json",
        "layer5/weights.safetensors",
    ]
    card = (folder / "README.md").read_text()
    assert "library_name: prisma-mm" in card and "matryoshka" in card
    assert 'from_pretrained("me/saes", subfolder="layer5")' in card
    _assert_same(d, S.from_pretrained(folder, subfolder="layer5"))


@pytest.mark.parametrize(
    "name", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka", "matryoshka-k", "transcoder"]
)
def test_saelens_export_reads_back_as_saelens_wrote_it(tmp_path, name):
    """Without the embedded ``prisma_mm`` key (a file as SAELens itself writes it), the
    import still encodes and reconstructs exactly as the exported dictionary."""
    d = _randomise(EXAMPLES[name]())
    S.to_saelens(d, tmp_path / "sl")
    cfg_path = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["prisma_mm"]
    cfg_path.write_text(json.dumps(cfg))
    back = S.from_saelens(tmp_path / "sl")
    assert back.architecture == {"batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(
        name, {"matryoshka-k": "topk"}.get(name, d.architecture)
    )
    x, target = _inputs(d)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), d.encode(x), rtol=0, atol=0)
        # Matryoshka sums its nested prefixes: equal up to float rounding
        torch.testing.assert_close(back(x, target).recon, d(x, target).recon)
        code = d.encode(x)
        torch.testing.assert_close(back.decode(code), d.decode(code), rtol=0, atol=0)


def _saelens_rescaled(path, arch, **extra):
    """A SAELens TopK/BatchTopK file trained with rescale_acts_by_decoder_norm (decoder rows of
    norms 0.25..2.75) and SAELens' encode/decode on it, computed by hand."""
    gen = torch.Generator().manual_seed(5)
    w_enc = torch.randn(6, 20, generator=gen) * 0.5
    rows = torch.randn(20, 6, generator=gen)
    norms = torch.rand(20, generator=gen) * 2.5 + 0.25
    w_dec = rows / rows.norm(dim=1, keepdim=True) * norms[:, None]
    b_enc, b_dec = torch.randn(20, generator=gen) * 0.1, torch.randn(6, generator=gen) * 0.5
    tensors = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
    tensors.update(extra.pop("tensors", {}))
    _write_saelens(
        path, arch, tensors, d_in=6, d_sae=20, rescale_acts_by_decoder_norm=True, **extra
    )

    def encode(x, select):
        hidden_pre = ((x - b_dec) @ w_enc + b_enc) * w_dec.norm(dim=-1)  # SAELens' encode
        return select(hidden_pre)

    def decode(acts):
        return (acts / w_dec.norm(dim=-1)) @ w_dec + b_dec  # SAELens' act_times_W_dec + b_dec

    return encode, decode


def test_saelens_rescale_acts_by_decoder_norm_is_folded_on_import(tmp_path):
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(6)) * 2

    def topk(pre):
        vals, idx = pre.topk(4, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    encode, decode = _saelens_rescaled(tmp_path / "t", "topk", k=4)
    sae = S.from_saelens(tmp_path / "t")
    with torch.no_grad():
        z = sae.encode(x)
        torch.testing.assert_close(z, encode(x, topk), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(z), decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).recon, decode(encode(x, topk)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(20))  # folded: unit rows

    encode, decode = _saelens_rescaled(
        tmp_path / "b", "batchtopk", k=4.0, tensors={"topk_threshold": torch.tensor(0.4)}
    )
    sae = S.from_saelens(tmp_path / "b")
    with torch.no_grad():
        z = sae.encode(x)
        torch.testing.assert_close(z, encode(x, lambda p: p * (p > 0.4)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(z), decode(z), rtol=1e-5, atol=1e-5)

    _saelens_rescaled(tmp_path / "j", "jumprelu", tensors={"threshold": torch.full((20,), 0.1)})
    with pytest.raises(
        PrismaError, match="rescale_acts_by_decoder_norm with architecture 'jumprelu'"
    ):
        S.from_saelens(tmp_path / "j")
    # our TopK exports say they are not rescaled
    S.to_saelens(_randomise(EXAMPLES["topk"]()), tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert ours["rescale_acts_by_decoder_norm"] is False


def _sparsify_reference(folder, x):
    """sparsify's SparseCoder.encode/decode on the files in ``folder``, by hand: it subtracts
    b_dec before encoding unless ``transcode``, relu, top-k, decode + b_dec (+ W_skip)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae.safetensors")
    x_in = x if cfg["transcode"] else x - w["b_dec"]
    pre = (x_in @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    vals, idx = pre.topk(cfg["k"], dim=-1)
    code = torch.zeros_like(pre).scatter(-1, idx, vals)
    out = code @ w["W_dec"] + w["b_dec"]
    if cfg["skip_connection"]:
        out = out + x @ w["W_skip"].T
    return code, out


@pytest.mark.parametrize("centred", [True, False])
def test_sparsify_export_encodes_in_sparsify_as_here_both_ways(tmp_path, centred):
    d = _randomise(S.TopKSAE(d_in=6, n_latents=20, k=3, apply_b_dec_to_input=centred))
    with torch.no_grad():
        d.b_dec.mul_(5)  # a large b_dec: centring or not changes the supports
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(8))
    S.to_sparsify(d, tmp_path / "sp")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg["transcode"] is (not centred)  # sparsify's "do not subtract b_dec"
    code, out = _sparsify_reference(tmp_path / "sp", x)
    with torch.no_grad():
        assert torch.equal(code, d.encode(x))
        torch.testing.assert_close(out, d(x).recon)
    back = S.from_sparsify(tmp_path / "sp")  # ours: exactly the exported dictionary
    _assert_same(d, back)
    assert back.apply_b_dec_to_input is centred
    # as sparsify writes it (no prisma_mm key): sparsify's semantics, whatever the class
    del cfg["prisma_mm"]
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps(cfg))
    native = S.from_sparsify(tmp_path / "sp")
    assert native.apply_b_dec_to_input is centred
    with torch.no_grad():
        assert torch.equal(native.encode(x), code)
        torch.testing.assert_close(native(x).recon, out)
