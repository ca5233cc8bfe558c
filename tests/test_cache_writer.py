"""The cache writer: contents equal the model's activations, manifest fields, token modes,
dtypes, statistics, refusal of a different cache, limits, errors, full disk, verify, CLI."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json

import numpy as np
import pytest
import torch
from cache_helpers import HOOKS, image_folder, read_samples, seeded_tiny_vit

from prisma_mm.cache import read_manifest, verify_cache, write_cache
from prisma_mm.cache import writer as writer_module
from prisma_mm.cache.cli import main_cache
from prisma_mm.data.images import load_image
from prisma_mm.errors import PrismaError


@pytest.fixture(scope="module")
def model():
    return seeded_tiny_vit(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    image_folder(root, 11)
    return root


def _write(model, images, out, **kwargs):
    options = {"dtype": "float32", "batch_size": 4, "shard_size": 3, "progress": False}
    options.update(kwargs)
    hooks = options.pop("hooks", HOOKS)
    return write_cache(model, str(images), out, hooks, **options)


def _expected(model, path, hooks=HOOKS):
    with torch.inference_mode():
        _, cache = model.run_with_cache(model.preprocess([load_image(path)]), hooks)
    return {h: cache[h][0].numpy() for h in hooks}


def test_cache_holds_the_models_activations_and_a_full_manifest(model, images, tmp_path):
    out = tmp_path / "cache"
    manifest = _write(model, images, out)
    assert manifest == read_manifest(out)
    assert manifest["complete"] and manifest["exhausted"]
    assert manifest["n_samples"] == 11 and manifest["inputs_done"] == 11
    assert manifest["n_shards"] == 4 and [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 2]
    assert [s["inputs"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 9], [9, 11]]
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == shard["bytes"]
    assert manifest["model"]["name"] == "tiny-vit"
    assert manifest["model"]["card"]["arch"] == "vit_tiny_patch16_224"
    assert manifest["model"]["fingerprint"] == writer_module.weights_fingerprint(model.module)
    assert manifest["hooks"] == HOOKS
    assert manifest["hook_keys"]["blocks.1.hook_resid_post"] == "blocks_1_hook_resid_post"
    assert manifest["key_hooks"]["blocks_0_hook_resid_post"] == "blocks.0.hook_resid_post"
    assert manifest["shapes"] == {h: [17, 32] for h in HOOKS}
    assert manifest["layout"]["n_prefix"] == 1 and manifest["layout"]["grid"] == [1, 4, 4]
    assert manifest["source"]["type"] == "folder" and manifest["source"]["count"] == 11
    assert manifest["dtype"] == manifest["storage_dtype"] == "float32"
    assert manifest["skipped"] == [] and manifest["n_skipped"] == 0
    samples = read_samples(out)
    assert len(samples) == 11
    for key, sample in samples.items():
        meta = sample["meta"]
        path = meta["source"]
        relative = path.split(str(images.resolve()) + "/")[1]
        assert key == hashlib.sha1(relative.encode()).hexdigest()
        assert meta["tokens"] == list(range(17)) and meta["label"] is None
        expected = _expected(model, path)
        for hook in HOOKS:
            np.testing.assert_allclose(sample[hook], expected[hook], atol=1e-5)


def test_per_head_hooks_are_stored_with_heads_concatenated(model, images, tmp_path):
    hooks = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_q"]
    manifest = _write(model, images, tmp_path / "cache", hooks=hooks)
    heads = model.run_with_cache(model.preprocess([load_image(next(images.iterdir()))]), hooks)[1]
    n_heads, d_head = heads["blocks.0.attn.hook_z"].shape[2:]
    assert n_heads > 1 and manifest["shapes"] == {h: [17, n_heads * d_head] for h in hooks}
    for sample in read_samples(tmp_path / "cache").values():
        expected = _expected(model, sample["meta"]["source"], hooks)
        for hook in hooks:
            flat = expected[hook].reshape(17, -1)  # [tokens, heads, d_head] -> [tokens, d]
            np.testing.assert_allclose(sample[hook], flat, atol=1e-5)


def test_statistics_match_numpy_on_the_written_rows(model, images, tmp_path):
    manifest = _write(model, images, tmp_path / "cache", dtype="float16", shard_size=4)
    samples = read_samples(tmp_path / "cache")
    for hook in HOOKS:
        rows = np.concatenate([s[hook] for s in samples.values()]).astype(np.float64)
        stats = manifest["stats"][hook]
        assert stats["count"] == len(rows) == 11 * 17
        np.testing.assert_allclose(stats["mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], rows.var(0), rtol=1e-5, atol=1e-6)
        norms = np.linalg.norm(rows, axis=1)
        assert stats["mean_norm"] == pytest.approx(norms.mean(), rel=1e-6)
        assert stats["mean_sq_norm"] == pytest.approx((norms**2).mean(), rel=1e-6)
        assert stats["nonfinite"] == 0


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [("cls", [0]), ("patches", list(range(1, 17))), ("0,5,16", [0, 5, 16]), ([3], [3])],
)
def test_token_selection(model, images, tmp_path, tokens, expected):
    manifest = _write(model, images, tmp_path / "c", tokens=tokens, hooks=HOOKS[1:], limit=3)
    assert manifest["token_index"] == {HOOKS[1]: expected}
    assert manifest["shapes"][HOOKS[1]] == [len(expected), 32]
    for sample in read_samples(tmp_path / "c").values():
        assert sample["meta"]["tokens"] == expected
        full = _expected(model, sample["meta"]["source"], HOOKS[1:])[HOOKS[1]]
        np.testing.assert_allclose(sample[HOOKS[1]], full[expected], atol=1e-5)


def test_bad_token_specs(model, images, tmp_path):
    for tokens, message in [
        ("firsts", "use all, cls, patches"),
        ("0,17", "outside 0..16"),
        ("2,2", "twice"),
    ]:
        with pytest.raises(PrismaError, match=message):
            _write(model, images, tmp_path / "c", tokens=tokens)
    with pytest.raises(PrismaError, match="pooled output"):
        _write(model, images, tmp_path / "c", tokens="patches", hooks=["hook_output"])
    with pytest.raises(PrismaError, match="attention pattern"):
        _write(model, images, tmp_path / "c", hooks=["blocks.0.attn.hook_pattern"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_store_the_cast_values(model, images, tmp_path, dtype):
    manifest = _write(model, images, tmp_path / "c", dtype=dtype, hooks=HOOKS[:1], limit=2)
    assert manifest["dtype"] == dtype
    assert manifest["storage_dtype"] == {"float16": "float16", "bfloat16": "uint16"}[dtype]
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for sample in read_samples(tmp_path / "c").values():
        exact = _expected(model, sample["meta"]["source"], HOOKS[:1])[HOOKS[0]]
        cast = torch.from_numpy(exact).to(torch_dtype).float().numpy()
        assert np.array_equal(sample[HOOKS[0]], cast)
    assert verify_cache(tmp_path / "c").ok


def test_workers_and_batch_size_do_not_change_the_cache(model, images, tmp_path):
    _write(model, images, tmp_path / "a", workers=0, batch_size=5)
    _write(model, images, tmp_path / "b", workers=2, batch_size=2)
    a, b = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    assert list(a) == list(b)  # same keys in the same order
    for key in a:
        for hook in HOOKS:
            np.testing.assert_allclose(a[key][hook], b[key][hook], atol=1e-5)


def test_a_different_cache_in_the_same_dir_is_refused(model, images, tmp_path):
    out = tmp_path / "c"
    first = _write(model, images, out, limit=4)
    changes = [
        ({"hooks": HOOKS[:1]}, "hooks"),
        ({"dtype": "float16"}, "dtype"),
        ({"tokens": "cls"}, "tokens"),
    ]
    for change, word in changes:
        with pytest.raises(PrismaError, match=f"already holds a different cache: {word}"):
            _write(model, images, out, limit=4, **change)
    with pytest.raises(PrismaError, match="the model weights differ"):
        _write(seeded_tiny_vit(1), images, out, limit=4)
    other = image_folder(out.parent / "other", 3)[0].parent
    with pytest.raises(PrismaError, match="the data source differs"):
        write_cache(model, str(other), out, HOOKS, dtype="float32", progress=False)
    # the same call again finds the cache complete and leaves it as it was
    again = _write(model, images, out, limit=4)
    assert again["shards"] == first["shards"] and again["n_samples"] == 4


def test_limit_then_extend_equals_one_run(model, images, tmp_path):
    _write(model, images, tmp_path / "once")
    part = _write(model, images, tmp_path / "grown", limit=5)
    assert part["n_samples"] == 5 and part["inputs_done"] == 5 and not part["exhausted"]
    grown = _write(model, images, tmp_path / "grown")
    assert grown["n_samples"] == 11 and grown["exhausted"]
    once, twice = read_samples(tmp_path / "once"), read_samples(tmp_path / "grown")
    assert sorted(once) == sorted(twice)
    for key in once:
        np.testing.assert_array_equal(once[key][HOOKS[1]], twice[key][HOOKS[1]])
    stats_once = read_manifest(tmp_path / "once")["stats"][HOOKS[1]]
    np.testing.assert_allclose(grown["stats"][HOOKS[1]]["var"], stats_once["var"], rtol=1e-12)


def _one_line_error(match, call, *args, **kwargs):
    with pytest.raises(PrismaError, match=match) as caught:
        call(*args, **kwargs)
    assert "\n" not in str(caught.value)


def test_user_errors_are_one_clear_line(model, images, tmp_path):
    _one_line_error("does not exist", _write, model, tmp_path / "missing", tmp_path / "c")
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.jpg").write_bytes(b"garbage")
    _one_line_error(
        r"no readable input .* all 3 inputs were skipped", _write, model, junk, tmp_path / "c"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error("has no inputs", _write, model, empty, tmp_path / "c2")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error("cannot write to output directory", _write, model, images, a_file / "sub")
    _one_line_error("is a file, not a directory", _write, model, images, a_file)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.pdf").write_text("precious")
    _one_line_error("not empty and holds no cache", _write, model, images, busy)
    assert (busy / "thesis.pdf").read_text() == "precious"
    locked = tmp_path / "locked"
    locked.mkdir()
    with open(locked / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _one_line_error("another `prisma-mm cache` is writing", _write, model, images, locked)
    _one_line_error(
        "unknown hook 'blocks.2.hook_resid_post'",
        _write,
        model,
        images,
        tmp_path / "h",
        hooks=["blocks.2.hook_resid_post"],
    )


def test_full_disk_keeps_complete_shards_valid_and_resumes(model, images, tmp_path, monkeypatch):
    out = tmp_path / "c"
    original = writer_module.ShardFile.add
    calls = {"n": 0}

    def add_until_full(self, sample):
        calls["n"] += 1
        if calls["n"] == 8:  # the second sample of the third shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, sample)

    monkeypatch.setattr(writer_module.ShardFile, "add", add_until_full)
    with pytest.raises(PrismaError) as caught:
        _write(model, images, out)
    message = str(caught.value)
    assert message.startswith("disk full while writing the cache") and "\n" not in message
    assert "2 complete shard(s) with 6 samples stay valid" in message
    manifest = read_manifest(out)
    assert manifest["n_shards"] == 2 and manifest["inputs_done"] == 6
    assert not list(out.glob("*.tmp"))
    report = verify_cache(out)
    assert report.ok and report.n_samples == 6
    monkeypatch.setattr(writer_module.ShardFile, "add", original)
    resumed = _write(model, images, out)
    assert resumed["n_samples"] == 11
    reference = _write(model, images, tmp_path / "ref")
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]


def test_verify_reports_a_flipped_byte_and_a_missing_shard(model, images, tmp_path, capsys):
    out = tmp_path / "c"
    _write(model, images, out)
    assert main_cache(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("4 shards, 11 samples")
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_cache(out)
    assert not report.ok
    assert report.problems == ["shard-000001.tar: sha256 mismatch (the shard's bytes changed)"]
    assert main_cache(["verify", str(out)]) == 1
    assert "DAMAGED: shard-000001.tar: sha256 mismatch" in capsys.readouterr().out
    (out / "shard-000003.tar").unlink()
    problems = verify_cache(out).problems
    assert "shard-000003.tar: missing" in problems
    assert "9 samples in shards, manifest says 11" in problems
    assert main_cache(["verify", str(tmp_path / "nothing")]) == 2


def test_progress_bar_shows_rates(model, images, tmp_path, capsys):
    write_cache(model, str(images), tmp_path / "c", HOOKS[0], progress=True, batch_size=4)
    err = capsys.readouterr().err
    assert "input/s" in err and "tok/s" in err and "11/11" in err


def test_cli_writes_a_cache_from_a_weights_file(model, images, tmp_path, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file(model.module.state_dict(), str(weights))
    argv = [
        "--model", "tiny-vit", "--weights", str(weights), "--hooks", ",".join(HOOKS),
        "--data", str(images), "--out", str(tmp_path / "c"), "--tokens", "cls",
        "--shard-size", "5", "--workers", "0", "--quiet",
    ]  # fmt: skip
    assert main_cache(argv) == 0
    printed = capsys.readouterr().out
    assert "11 samples in 3 shards, 0 inputs skipped; float16" in printed
    manifest = read_manifest(tmp_path / "c")
    assert manifest["model"]["weights"] == str(weights)
    assert manifest["model"]["fingerprint"] == writer_module.weights_fingerprint(model.module)
    # through the `prisma-mm` entry point: resuming a complete cache is a no-op
    from prisma_mm.cli import main

    assert main(["cache", *argv]) == 0
    assert read_manifest(tmp_path / "c")["shards"] == manifest["shards"]
    assert main(["cache", "verify", str(tmp_path / "c")]) == 0
    argv[argv.index("cls")] = "patches"
    assert main(["cache", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a different cache: tokens" in err[0]
    json.loads((tmp_path / "c" / "manifest.json").read_text())


def _visited_sources(out):
    return [s["meta"]["source"] for s in read_samples(out).values()]


def test_inputs_are_visited_in_the_seeded_order_recorded_in_the_manifest(model, images, tmp_path):
    from prisma_mm.data.sources import open_source

    source = open_source(str(images))
    in_source_order = [source.record(i).source for i in range(11)]
    manifest = _write(model, images, tmp_path / "seed0")
    permutation = np.random.default_rng(0).permutation(11)
    expected = hashlib.sha256(permutation.astype("<i8").tobytes()).hexdigest()
    assert manifest["order"] == {"method": "permutation", "seed": 0, "sha256": expected}
    visited = _visited_sources(tmp_path / "seed0")
    assert visited == [in_source_order[i] for i in permutation]
    assert visited != in_source_order and sorted(visited) == sorted(in_source_order)
    metas = [s["meta"] for s in read_samples(tmp_path / "seed0").values()]
    assert [m["position"] for m in metas] == list(range(11))
    assert [m["index"] for m in metas] == permutation.tolist()
    # another seed, another order; none keeps the source's order
    _write(model, images, tmp_path / "seed5", order_seed=5)
    assert _visited_sources(tmp_path / "seed5") == [
        in_source_order[i] for i in np.random.default_rng(5).permutation(11)
    ]
    plain = _write(model, images, tmp_path / "plain", order_seed=None)
    assert plain["order"] == {"method": "source", "seed": None}
    assert _visited_sources(tmp_path / "plain") == in_source_order
    # a limit takes the first inputs of the order, and growing it resumes the same order
    _write(model, images, tmp_path / "grown", limit=4)
    with pytest.raises(
        PrismaError, match="the visiting order differs .*--order-seed 0, this run 5"
    ):
        _write(model, images, tmp_path / "grown", order_seed=5)
    _write(model, images, tmp_path / "grown")
    assert _visited_sources(tmp_path / "grown") == visited


def test_the_writer_asks_run_with_cache_to_stop_after_the_last_hook(model, images, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    calls = []
    original = model.run_with_cache

    def spy(x, names_filter=None, **kwargs):
        calls.append(kwargs.get("stop_at_layer"))
        return original(x, names_filter, **kwargs)

    monkeypatch.setattr(model, "run_with_cache", spy)
    _write(model, images, tmp_path / "c", hooks=HOOKS[:1])
    assert len(calls) == 1 + 3 and set(calls) == {"auto"}  # the probe, then 3 batches of 4


def test_img_size_builds_the_card_at_that_input_size(images, tmp_path, capsys):
    manifest = write_cache("tiny-vit", str(images), tmp_path / "c48", HOOKS[:1], weights=None,
                           img_size=48, limit=2, progress=False)  # fmt: skip
    assert manifest["shapes"][HOOKS[0]] == [1 + 6 * 6, 32]  # 8 px patches on 48 px
    assert manifest["layout"]["input_size"] == [48, 48]
    from prisma_mm.cli import main

    argv = ["cache", "--model", "tiny-vit", "--weights", "none", "--hooks", HOOKS[0], "--data",
            str(images), "--out", str(tmp_path / "cli"), "--img-size", "48", "--limit", "2",
            "--workers", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert read_manifest(tmp_path / "cli")["shapes"] == manifest["shapes"]
    with pytest.raises(PrismaError, match="img_size applies to a model card name"):
        write_cache(seeded_tiny_vit(0), str(images), tmp_path / "x", HOOKS, img_size=48)


def test_random_tokens_are_k_distinct_patches_seeded_by_the_key(model, images, tmp_path):
    hook = HOOKS[1]
    manifest = _write(model, images, tmp_path / "r", tokens="random:5", hooks=[hook])
    assert manifest["tokens"] == "random:5" and manifest["shapes"][hook] == [5, 32]
    assert manifest["token_index"][hook] == [writer_module.RANDOM_TOKEN] * 5
    samples = read_samples(tmp_path / "r")
    chosen = {}
    for key, sample in samples.items():
        tokens = sample["meta"]["tokens"]
        assert len(set(tokens)) == 5 and all(1 <= t <= 16 for t in tokens)  # patches only
        assert tokens == writer_module.random_tokens(key, 5, 1, 17)
        full = _expected(model, sample["meta"]["source"], [hook])[hook]
        np.testing.assert_allclose(sample[hook], full[tokens], atol=1e-5)
        chosen[key] = tuple(tokens)
    assert len(set(chosen.values())) > 1  # differ across keys
    # another batch size, a part of two, a resume: the same tokens for the same key
    _write(model, images, tmp_path / "b", tokens="random:5", hooks=[hook], batch_size=3, limit=4)
    _write(model, images, tmp_path / "b", tokens="random:5", hooks=[hook], batch_size=3)
    for part in ("0/2", "1/2"):
        _write(model, images, tmp_path / "p", tokens="random:5", hooks=[hook], part=part)
    for other in ("b", "p"):
        again = read_samples(tmp_path / other)
        assert {k: tuple(s["meta"]["tokens"]) for k, s in again.items()} == chosen
        for key in chosen:
            np.testing.assert_array_equal(again[key][hook], samples[key][hook])
    for spec, message in [("random:0", "random:K"), ("random:x", "random:K"),
                          ("random:17", "16 patch tokens")]:  # fmt: skip
        with pytest.raises(PrismaError, match=message):
            _write(model, images, tmp_path / "bad", tokens=spec, hooks=[hook])
    # a caller with one token list for every input is refused random:K (never token -1)
    with pytest.raises(PrismaError, match="picks tokens per input"):
        writer_module.token_index("random:5", hook, 17, model.layout)
    # the reader serves its rows, but cannot name their tokens from the manifest
    from prisma_mm.cache import ActivationDataset

    rows = torch.cat(list(ActivationDataset(tmp_path / "r", batch_size=8, shuffle_buffer=0)))
    assert rows.shape == (11 * 5, 32)
    with pytest.raises(PrismaError, match="chosen per sample"):
        ActivationDataset(tmp_path / "r", batch_size=8, provenance=True)


def test_device_auto_and_the_batch_size_by_device(model, images, tmp_path, monkeypatch):
    pick = writer_module._pick_device
    if not torch.cuda.is_available():
        assert pick("auto", 0, 1, None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick("auto", 0, 1, None) == torch.device("cuda")
    assert pick("cuda", 5, 8, 1) == torch.device("cuda:1")  # LOCAL_RANK from the launcher
    assert pick("auto", 6, 8, None) == torch.device("cuda:2")  # by hand: part mod GPUs
    assert pick("cuda:3", 5, 8, 1) == torch.device("cuda:3")  # an explicit GPU is kept
    monkeypatch.undo()
    sizes = []
    real = writer_module.InputBatches

    def spy(*args, **kwargs):
        sizes.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "InputBatches", spy)
    _write(model, images, tmp_path / "c", batch_size=None, limit=2)
    assert sizes == [writer_module.DEFAULT_BATCH_SIZES["cpu"]] == [32]
