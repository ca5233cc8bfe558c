"""`prisma-mm eval DICT --cache CACHE` with a dictionary folder that cannot be loaded: each
ends in one clear line from the loader (``prisma_mm.sae``), a non-zero exit, and nothing in
the folder or the cache changes (no eval.json is written). A pickle in place of the weights
is refused without being unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from bad_input import Case, Payload, RandomImages, check_case
from safetensors.torch import load_file, save_file

HOOK = "blocks.1.hook_resid_post"
MARKER = "payload_ran"


def _variant(root: Path, name: str, cfg=None, weights=None, raw_cfg=None, raw_weights=None):
    """A copy of the good dictionary ``root/good`` with its cfg.json and/or weights replaced
    (``cfg``/``weights``: functions editing the parsed originals; ``raw_*``: bytes)."""
    folder = root / name
    folder.mkdir()
    good_cfg = json.loads((root / "good" / "cfg.json").read_text())
    good_weights = load_file(root / "good" / "weights.safetensors")
    if raw_cfg is not None:
        (folder / "cfg.json").write_bytes(raw_cfg)
    else:
        (folder / "cfg.json").write_text(json.dumps(cfg(good_cfg) if cfg else good_cfg))
    if raw_weights is not None:
        (folder / "weights.safetensors").write_bytes(raw_weights)
    elif weights is not False:
        save_file(
            weights(good_weights) if weights else good_weights, folder / "weights.safetensors"
        )


def _set(section: str, **fields):
    def edit(cfg):
        target = cfg if section == "" else cfg[section]
        target.update(fields)
        return cfg

    return edit


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    """A tiny-vit cache (width 32), a good TopK SAE on it, and one broken copy per row."""
    from prisma_mm.cache import write_cache
    from prisma_mm.sae import TopKSAE

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_sae")
    write_cache(
        "tiny-vit", RandomImages(8), root / "cache", [HOOK], weights=None, shard_size=1000,
        progress=False,
    )  # fmt: skip
    good = TopKSAE(d_in=32, n_latents=64, k=4)
    good.metadata = {"hook": HOOK, "model": "tiny-vit"}
    good.save(root / "good")
    narrow = TopKSAE(d_in=16, n_latents=64, k=4)
    narrow.metadata = {"hook": HOOK, "model": "tiny-vit"}
    narrow.save(root / "narrow")
    pickled = pickle.dumps({"W_enc": Payload(str(root / MARKER))})
    _variant(root, "not_json", raw_cfg=b"{architecture: topk,")
    _variant(root, "json_list", raw_cfg=b"[1, 2, 3]")
    _variant(root, "no_config", cfg=lambda c: {"architecture": "topk"})
    _variant(root, "unknown_class", cfg=_set("", architecture="gated"))
    _variant(root, "class_not_str", cfg=_set("", architecture=["topk"]))
    _variant(root, "config_list", cfg=_set("", config=[32, 64]))
    _variant(root, "k_string", cfg=_set("config", k="4"))
    _variant(root, "k_null", cfg=_set("config", k=None))
    _variant(root, "flag_string", cfg=_set("config", normalize_decoder="yes"))
    _variant(root, "unknown_field", cfg=_set("config", kk=4))
    _variant(root, "d_sae_disagrees", cfg=_set("config", d_sae=65))
    _variant(root, "negative_latents", cfg=_set("config", n_latents=-64))
    _variant(root, "metadata_list", cfg=_set("", metadata=["hook"]))
    _variant(root, "no_weights", weights=False)
    _variant(root, "corrupt_weights", raw_weights=b"\x00\x01 definitely not safetensors" * 9)
    _variant(root, "empty_weights", raw_weights=b"")
    _variant(root, "pickled_weights", raw_weights=pickled)
    _variant(root, "missing_tensor", weights=lambda w: {k: v for k, v in w.items() if k != "b_enc"})
    _variant(root, "wrong_shape", weights=lambda w: {**w, "W_dec": torch.zeros(64, 31)})
    _variant(root, "extra_tensor", weights=lambda w: {**w, "W_skip": torch.zeros(32, 32)})
    yield root
    assert not (root / MARKER).exists(), "a pickled payload ran"
    torch.set_num_threads(threads)


def _eval(name: str, expect: str) -> Case:
    return Case(
        name,
        ("eval", f"{{tmp}}/{name}", "--cache", "{tmp}/cache", "--quiet"),
        expect,
        (name, "cache"),
    )


CASES = [
    _eval("missing_dir", "missing_dir"),
    _eval("not_json", "cfg.json: not valid JSON"),
    _eval("json_list", "cfg.json: expected a JSON object, got list"),
    _eval("no_config", "cfg.json: missing key(s) 'config'"),
    _eval("unknown_class", "unknown architecture 'gated'"),
    _eval("class_not_str", "'architecture' must be a string"),
    _eval("config_list", "'config' must be an object of fields, got list"),
    _eval("k_string", "k must be int, got '4'"),
    _eval("k_null", "k must be int, got None"),
    _eval("flag_string", "normalize_decoder must be bool, got 'yes'"),
    _eval("unknown_field", "unknown argument(s) kk"),
    _eval("d_sae_disagrees", "n_latents=64 and d_sae=65 disagree"),
    _eval("negative_latents", "n_latents must be a positive integer, got -64"),
    _eval("metadata_list", "'metadata' must be an object"),
    _eval("no_weights", "weights.safetensors: file not found"),
    _eval("corrupt_weights", "weights.safetensors: not a readable safetensors file"),
    _eval("empty_weights", "weights.safetensors: not a readable safetensors file"),
    _eval("pickled_weights", "weights.safetensors: not a readable safetensors file"),
    _eval("missing_tensor", "missing tensor(s) 'b_enc'"),
    _eval("wrong_shape", "tensor 'W_dec' has shape (64, 31), expected (64, 32)"),
    _eval("extra_tensor", "unexpected tensor(s) 'W_skip'"),
    _eval("narrow", "d_in=16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_dictionary_ends_in_one_line(case: Case, tmp: Path, capsys) -> None:
    check_case(case, tmp, capsys)
