"""The feature index: its tables equal a brute-force computation over a small tiny-vit cache,
its state does not grow with the data, a SIGKILLed run resumes bit for bit, and the score
that ranks a sample is the one its heatmap values give."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import prisma_mm
from prisma_mm.cli import main
from prisma_mm.errors import PrismaError
from prisma_mm.sae import TopKSAE
from prisma_mm.viz.index import (
    STATE_FILE,
    FeatureIndex,
    IndexOptions,
    build_index,
    key_hash,
    latent_token_maps,
    octave,
    token_scores,
)
from tests.cache_helpers import read_samples

HOOK = "blocks.0.hook_resid_post"
OPTIONS = dict(top_n=3, n_bins=3, interval_n=2, hist_bins=8, n_neighbours=4, batch_samples=1)


def _image_tree(root, n_per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for label in ("cat", "dog", "eel"):
        (root / label).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _cache(root, n_per_class: int, shard_size: int = 4):
    from prisma_mm.cache import write_cache

    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    images = _image_tree(root / "images", n_per_class)
    write_cache(model, str(images), root / "cache", [HOOK], progress=False, shard_size=shard_size)
    return root / "cache"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("viz_index")
    cache = _cache(root, 5)
    sae = TopKSAE(d_in=32, n_latents=12, k=3, seed=3)
    sae.metadata["hook"] = HOOK
    sae.save(root / "sae")
    yield {"root": root, "cache": cache, "sae": sae}
    torch.set_num_threads(threads)


def brute_force(sae, cache, score: str, layout):
    """Every table the index keeps, from the whole code matrix held in memory."""
    samples = read_samples(cache)  # shard order, tar order: the index's stream order
    keys = list(samples)
    with torch.no_grad():
        codes = torch.stack([sae.encode(torch.from_numpy(samples[k][HOOK])) for k in keys])
    n, t, n_latents = codes.shape
    sample_score, peak, _ = token_scores(codes, score, layout)  # [n, L]
    labels = [samples[k]["meta"]["label"] for k in keys]
    out = {"top": [], "interval": [], "keys": keys, "labels": labels, "codes": codes}
    b, m = OPTIONS["n_bins"], OPTIONS["interval_n"]
    for latent in range(n_latents):
        s = sample_score[:, latent]
        fired = [i for i in range(n) if s[i] > 0]
        ranked = sorted(fired, key=lambda i: (-float(s[i]), i))[: OPTIONS["top_n"]]
        out["top"].append([(keys[i], int(peak[i, latent]), float(s[i])) for i in ranked])
        bins = [[] for _ in range(b)]
        if fired:
            top = int(octave(s[fired].max().reshape(1)))
            for i in fired:
                o = int(octave(s[i].reshape(1)))
                bins[max(0, b - 1 - (top - o))].append(i)
        out["interval"].append(
            [
                [
                    (keys[i], int(peak[i, latent]), float(s[i]))
                    for i in sorted(group, key=lambda i: (key_hash(keys[i]), i))[:m]
                ]
                for group in bins
            ]
        )
    return out


@pytest.mark.parametrize("score", ["max", "mean", "prefix"])
def test_tables_equal_brute_force(world, tmp_path, score):
    sae = world["sae"]
    index = build_index(
        sae, world["cache"], tmp_path / "index", IndexOptions(score=score, **OPTIONS),
        progress=False,
    )  # fmt: skip
    expected = brute_force(sae, world["cache"], score, index.layout)
    assert index.meta["n_inputs"] == 15 and index.layout.n_prefix == 1
    n_top = 0
    for latent in range(index.n_latents):
        got = [(index.keys[s], t, v) for s, t, v in index.top(latent)]
        assert got == expected["top"][latent]
        n_top += len(got)
        got_bins = [[(index.keys[s], t, v) for s, t, v in g] for g in index.intervals(latent)]
        assert got_bins == expected["interval"][latent]
    assert n_top > (index.n_latents if score != "prefix" else 3)  # the tables are not empty
    assert sum(len(g) for lat in expected["interval"] for g in lat) >= 4
    codes = expected["codes"]  # [n, T, L]
    fired = codes > 0
    torch.testing.assert_close(index.freq_token, fired.double().mean(dim=(0, 1)))
    torch.testing.assert_close(index.freq_input, fired.any(dim=1).double().mean(dim=0))
    active_sum = (codes.double() * fired).sum(dim=(0, 1))
    torch.testing.assert_close(index.mean_active, active_sum / fired.sum(dim=(0, 1)).double())
    assert torch.equal(index.max_value, codes.amax(dim=(0, 1)))
    for latent in range(index.n_latents):
        values = codes[..., latent][fired[..., latent]].double()
        edges = index.hist_edges[latent].double()
        assert edges[-1] > values.max() >= edges[-1] / 2  # the top octave holds the maximum
        counts = torch.histogram(values, bins=edges).hist.long()
        assert torch.equal(index.hist_counts[latent], counts)
    # label mix: the labels of each latent's top samples
    assert index.label_names == ["cat", "dog", "eel"]
    for latent in range(index.n_latents):
        top_labels = [
            expected["labels"][expected["keys"].index(k)] for k, _, _ in expected["top"][latent]
        ]
        want = [top_labels.count(name) for name in index.label_names]
        assert index.label_mix[latent].tolist() == want


def test_neighbours_are_decoder_cosine(world, tmp_path):
    index = build_index(
        world["sae"], world["cache"], tmp_path / "i", IndexOptions(**OPTIONS), progress=False
    )
    w = torch.nn.functional.normalize(world["sae"].W_dec.detach(), dim=1)
    cos = w @ w.T
    cos.fill_diagonal_(-2)
    top = cos.topk(4, dim=1)
    assert torch.equal(index.neighbours, top.indices)
    torch.testing.assert_close(index.neighbour_cos, top.values)


def test_saved_index_loads_identically(world, tmp_path):
    index = build_index(
        world["root"] / "sae", world["cache"], tmp_path / "i", IndexOptions(**OPTIONS),
        progress=False,
    )  # fmt: skip
    loaded = FeatureIndex.load(tmp_path / "i")
    assert loaded.keys == index.keys and loaded.sample_labels == index.sample_labels
    assert loaded.meta == index.meta
    for name in ("top_value", "interval_value", "hist_counts", "label_mix", "neighbours"):
        assert getattr(loaded, name).numpy().tobytes() == getattr(index, name).numpy().tobytes()
    assert not list(tmp_path.glob("i/*.tmp")) and not (tmp_path / "i" / STATE_FILE).exists()
    sha = index.meta["dictionary"]["sha256"]
    import hashlib

    assert (
        sha == hashlib.sha256((world["root"] / "sae/weights.safetensors").read_bytes()).hexdigest()
    )


def test_ranking_score_is_the_heatmap_score(world, tmp_path):
    """latent_token_maps returns token values whose score is the ranked value, exactly."""
    index = build_index(
        world["sae"], world["cache"], tmp_path / "i", IndexOptions(**OPTIONS), progress=False
    )
    checked = 0
    for latent in range(index.n_latents):
        maps = latent_token_maps(index, world["sae"], None, latent)
        for (key, label, value, values), (sample, token, _) in zip(
            maps, index.top(latent), strict=True
        ):
            score, peak, drawn = token_scores(values.unsqueeze(0), "max", index.layout)
            assert float(score[0]) == value and int(peak[0]) == token
            assert torch.equal(drawn[0], values)
            assert key == index.keys[sample] and label == index.sample_labels[sample]
            checked += 1
    assert checked > index.n_latents


def _state_bytes(cache, sae, out) -> tuple[int, int, int]:
    """Largest state (bytes, referenced samples) over the checkpoints, and inputs seen."""
    seen = []
    options = IndexOptions(top_n=2, n_bins=2, interval_n=1, batch_samples=4)
    index = build_index(
        sae, cache, out, options, progress=False,
        on_checkpoint=lambda s: seen.append((s.nbytes(), len(s.samples))),
    )  # fmt: skip
    return max(b for b, _ in seen), max(n for _, n in seen), index.meta["n_inputs"]


def test_state_does_not_grow_with_the_data(world, tmp_path):
    sae = TopKSAE(d_in=32, n_latents=6, k=2, seed=5)
    big_cache = _cache(tmp_path / "big", 20)  # 60 inputs against the fixture's 15
    small = _state_bytes(world["cache"], sae, tmp_path / "small_index")
    big = _state_bytes(big_cache, sae, tmp_path / "big_index")
    assert (small[2], big[2]) == (15, 60)
    bound = 6 * (2 + 2 * 1) + 4  # latents x (top + bins x interval) + one shard of new samples
    assert big[1] <= bound and small[1] <= bound
    # equal tensors; the strings of at most `bound` referenced samples
    assert big[0] <= small[0] + bound * 200


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from prisma_mm.viz.index import IndexOptions, build_index
    def die(state):
        os.kill(os.getpid(), signal.SIGKILL)
    build_index(sys.argv[1], sys.argv[2], sys.argv[3],
                IndexOptions(top_n=3, n_bins=3, interval_n=2, batch_samples=2,
                             checkpoint_every=2), progress=False, on_checkpoint=die)
    """
)


def test_resume_after_sigkill_is_bit_identical(world, tmp_path):
    sae_dir, cache = str(world["root"] / "sae"), str(world["cache"])
    killed = tmp_path / "killed"
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, sae_dir, cache, str(killed)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == -9, result.stderr
    assert (killed / STATE_FILE).is_file() and not (killed / "index.json").exists()
    argv = ["index", sae_dir, cache, "--out", str(killed), "--top-n", "3", "--n-bins", "3",
            "--interval-n", "2", "--batch-samples", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    straight = tmp_path / "straight"
    assert main([*argv[:4], str(straight), *argv[5:]]) == 0
    a, b = FeatureIndex.load(killed), FeatureIndex.load(straight)
    assert a.keys == b.keys and a.sample_labels == b.sample_labels
    from prisma_mm.viz.index import _TABLES

    for name in (*_TABLES, "label_mix"):
        assert getattr(a, name).numpy().tobytes() == getattr(b, name).numpy().tobytes(), name
    assert {k: v for k, v in a.meta.items() if k != "created"} == {
        k: v for k, v in b.meta.items() if k != "created"
    }
    # a run killed while writing its first checkpoint leaves only a partial .tmp: resumable
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / (STATE_FILE + ".tmp")).write_bytes(b"partial")
    assert main([*argv[:4], str(torn), *argv[5:]]) == 0
    assert FeatureIndex.load(torn).top_value.numpy().tobytes() == b.top_value.numpy().tobytes()
    # re-running a finished index does no work and changes nothing
    before = (killed / "index.safetensors").read_bytes()
    assert main(argv) == 0
    assert (killed / "index.safetensors").read_bytes() == before


def test_token_scores_definitions():
    from prisma_mm.hooks import TokenLayout

    layout = TokenLayout(1, (1, 2, 2), (8, 8), (16, 16))
    code = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])
    assert token_scores(code, "max", layout)[0].tolist() == [3.0, 2.0]
    assert token_scores(code, "max", layout)[1].tolist() == [2, 4]  # first of tied maxima
    assert token_scores(code, "mean", layout)[0].tolist() == [1.75, 0.5]
    assert token_scores(code, "prefix", layout)[0].tolist() == [5.0, 0.0]
    assert token_scores(code, "prefix", layout)[1].tolist() == [0, 0]
    with pytest.raises(PrismaError, match="needs prefix"):
        token_scores(code[:, 1:], "prefix", TokenLayout(0, (1, 2, 2), (8, 8), (16, 16)))
    assert math.isfinite(float(token_scores(code, "mean", layout)[0][0]))


def test_entry_scores_equal_a_dense_reduction():
    """The sparse reduction the index streams equals plain dense max / argmax / mean."""
    from prisma_mm.hooks import TokenLayout

    layout = TokenLayout(2, (1, 3, 3), (8, 8), (24, 24))
    generator = torch.Generator().manual_seed(0)
    code = torch.rand(7, 11, 5, generator=generator).sub(0.6).clamp(min=0)
    code[0, :, 0] = 0  # a latent silent on a sample
    code[1, 4, 1] = code[1, 7, 1] = 2.0  # a tie: the first token wins
    patches = code[:, 2:]
    score, peak, _ = token_scores(code, "max", layout)
    assert torch.equal(score, patches.amax(dim=1))
    assert torch.equal(peak, patches.argmax(dim=1) + 2) and peak[1, 1] == 4
    mean = token_scores(code, "mean", layout)[0]
    assert torch.equal(mean, patches.double().mean(dim=1).float())
    prefix, prefix_peak, _ = token_scores(code, "prefix", layout)
    assert torch.equal(prefix, code[:, :2].amax(dim=1))
    assert torch.equal(prefix_peak, code[:, :2].argmax(dim=1))


def test_index_of_a_data_source_equals_the_index_of_its_cache(world, tmp_path):
    """`prisma-mm index DICT IMAGES --model M` caches through the model, then indexes."""
    from prisma_mm.cache import write_cache

    images = str(world["root"] / "images")
    out = tmp_path / "from_source"
    argv = ["index", str(world["root"] / "sae"), images, "--model", "tiny-vit", "--weights",
            "none", "--out", str(out), "--no-progress", "--top-n", "3"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "cache" / "manifest.json").is_file()
    write_cache("tiny-vit", images, tmp_path / "cache", [HOOK], weights=None, progress=False)
    direct = build_index(world["root"] / "sae", tmp_path / "cache", tmp_path / "direct",
                         IndexOptions(top_n=3), progress=False)  # fmt: skip
    via = FeatureIndex.load(out)
    assert via.keys == direct.keys and via.meta["n_inputs"] == 15
    for name in ("top_value", "top_sample", "interval_sample", "hist_counts"):
        assert getattr(via, name).numpy().tobytes() == getattr(direct, name).numpy().tobytes()
