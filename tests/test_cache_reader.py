"""ActivationDataset: every row once, deterministic shuffling, disjoint and complete splits
across workers and ranks, aligned multi-hook rows, held-out split, normalization, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helpers import (
    SYNTHETIC_HOOKS,
    ShardBytes,
    batch_mixing,
    synthetic_cache,
    uniform_mixing,
)

from prisma_mm.cache import ActivationDataset, read_manifest
from prisma_mm.cache import reader as reader_module
from prisma_mm.cache.reader import eval_score
from prisma_mm.errors import PrismaError

N_SAMPLES, N_TOKENS = 40, 5
ALL_ROWS = {(s, t) for s in range(N_SAMPLES) for t in range(N_TOKENS)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("synthetic"), N_SAMPLES, N_TOKENS, 6)


def _rows(batches) -> list[tuple[int, int]]:
    rows = torch.cat([b if isinstance(b, torch.Tensor) else b[0] for b in batches])
    if rows.dim() == 3:
        rows = rows[:, 0]
    return [(int(s), int(t)) for s, t in rows[:, :2].tolist()]


def test_sequential_read_gives_every_row_in_order(cache):
    ds = ActivationDataset(cache, SYNTHETIC_HOOKS[0], batch_size=16, shuffle_buffer=0)
    batches = list(ds)
    assert [len(b) for b in batches] == [16] * 12 + [8]
    assert batches[0].shape == (16, 4) and batches[0].dtype == torch.float32
    assert _rows(batches) == sorted(ALL_ROWS)
    assert ds.n_rows == 200 and ds.d == 4 and ds.n_tokens == N_TOKENS
    assert [
        len(b) for b in ActivationDataset(cache, SYNTHETIC_HOOKS[0], 16, 0, drop_last=True)
    ] == [16] * 12


def test_shuffle_is_a_permutation_deterministic_for_a_seed_and_epoch(cache):
    def order(seed, epoch=0, buffer=50):
        ds = ActivationDataset(
            cache, SYNTHETIC_HOOKS[0], batch_size=16, shuffle_buffer=buffer, seed=seed
        )
        ds.set_epoch(epoch)
        return _rows(ds)

    first = order(0)
    assert sorted(first) == sorted(ALL_ROWS) and len(first) == len(ALL_ROWS)
    assert order(0) == first
    assert order(1) != first and sorted(order(1)) == sorted(ALL_ROWS)
    assert order(0, epoch=1) != first and sorted(order(0, epoch=1)) == sorted(ALL_ROWS)
    # a buffer smaller than a batch still yields full batches of distinct rows
    small = order(3, buffer=4)
    assert sorted(small) == sorted(ALL_ROWS)


def _shard_mixing(cache, batch_size, **kwargs):
    """Classes per batch and largest share, a class being a shard (a class-sorted cache),
    over 2 epochs, and the same for uniform sampling of the same rows."""
    batches = []
    for epoch in range(2):
        ds = ActivationDataset(cache, SYNTHETIC_HOOKS[0], batch_size=batch_size, **kwargs)
        ds.set_epoch(epoch)
        batches += [(b[:, 0] // 8).long().numpy() for b in ds]
    return batch_mixing(batches, batch_size), uniform_mixing(np.concatenate(batches), batch_size)


def test_interleaving_open_shards_mixes_a_class_sorted_cache(tmp_path):
    # 60 shards of 8 one-row samples; a shard is a class; the buffer holds 4 shards' rows
    sorted_cache = synthetic_cache(tmp_path / "sorted", n_samples=480, n_tokens=1, shard_size=8)
    (classes, largest), (uniform_classes, uniform_largest) = _shard_mixing(
        sorted_cache, 8, shuffle_buffer=32
    )
    assert uniform_classes > 7.4 and uniform_largest < 0.2  # 8 rows of 60 classes
    # 16 open shards feed the buffer: close to uniform although it holds only 32 rows
    assert classes >= 0.8 * uniform_classes and largest <= 1.6 * uniform_largest
    # one shard at a time (a single sliding buffer): batches hold far fewer classes
    (one_classes, one_largest), _ = _shard_mixing(sorted_cache, 8, shuffle_buffer=32, open_shards=1)
    assert one_classes < 0.75 * uniform_classes and one_largest > 1.8 * uniform_largest
    assert classes > one_classes + 1.0


def test_buffer_memory_is_bounded(cache, monkeypatch):
    seen = []
    original = reader_module.RowBuffer.append

    def tracking(self, *args):
        original(self, *args)
        seen.append((self.n, len(self.data)))

    monkeypatch.setattr(reader_module.RowBuffer, "append", tracking)
    rows = _rows(ActivationDataset(cache, SYNTHETIC_HOOKS[0], batch_size=8, shuffle_buffer=20))
    assert sorted(rows) == sorted(ALL_ROWS)
    assert {capacity for _, capacity in seen} == {20 + N_TOKENS}
    assert max(n for n, _ in seen) <= 20 + N_TOKENS - 1


def test_several_hooks_give_aligned_rows_with_provenance(cache):
    ds = ActivationDataset(
        cache, SYNTHETIC_HOOKS, batch_size=32, shuffle_buffer=64, provenance=True
    )
    count = 0
    for acts, keys, tokens in ds:
        assert acts.shape[1:] == (2, 4) and len(keys) == len(acts) == len(tokens)
        assert tokens.dtype == torch.int64
        np.testing.assert_array_equal(acts[:, 1, 2].numpy(), 1.0)  # hook column
        np.testing.assert_array_equal(acts[:, 0, [0, 1, 3]], acts[:, 1, [0, 1, 3]])
        assert keys == [f"k{int(s):03d}" for s in acts[:, 0, 0]]
        assert tokens.tolist() == acts[:, 0, 1].long().tolist()
        count += len(acts)
    assert count == len(ALL_ROWS)
    single = next(iter(ActivationDataset(cache, [SYNTHETIC_HOOKS[1]], batch_size=4)))
    assert single.shape == (4, 1, 4)


def _partition_rows(cache, rank, world_size, worker, n_workers, monkeypatch, **kwargs):
    import webdataset.utils

    monkeypatch.setattr(
        webdataset.utils, "pytorch_worker_info", lambda group=None: (0, 1, worker, n_workers)
    )
    ds = ActivationDataset(
        cache, SYNTHETIC_HOOKS[0], batch_size=8, rank=rank, world_size=world_size, **kwargs
    )
    return _rows(ds)


@pytest.mark.parametrize(("world_size", "n_workers"), [(2, 2), (3, 1), (3, 3), (1, 8), (4, 5)])
def test_ranks_and_workers_read_disjoint_rows_covering_the_cache(
    cache, monkeypatch, world_size, n_workers
):
    # 7 shards: (2, 2), (3, 1) split by shard; (3, 3), (1, 8), (4, 5) split by row
    parts = [
        _partition_rows(cache, rank, world_size, worker, n_workers, monkeypatch, shuffle_buffer=30)
        for rank in range(world_size)
        for worker in range(n_workers)
    ]
    everything = [row for part in parts for row in part]
    assert len(everything) == len(set(everything)) == len(ALL_ROWS)
    assert set(everything) == ALL_ROWS
    assert all(part for part in parts)  # nobody idles on this cache
    by_shard = world_size * n_workers <= 7
    ds = ActivationDataset(cache, SYNTHETIC_HOOKS[0], rank=0, world_size=world_size)
    assert ds.shard_plan(0, world_size * n_workers)[1] is (not by_shard)


def test_real_dataloader_workers_and_ranks(cache):
    seen = []
    for rank in range(2):
        ds = ActivationDataset(
            cache, SYNTHETIC_HOOKS[0], batch_size=8, shuffle_buffer=16, rank=rank, world_size=2
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen += _rows(loader)
    assert len(seen) == len(ALL_ROWS) and set(seen) == ALL_ROWS
    with pytest.raises(PrismaError, match="rank 2 is outside 0..1"):
        list(ActivationDataset(cache, SYNTHETIC_HOOKS[0], rank=2, world_size=2))


def test_held_out_split_is_disjoint_and_keyed_by_sample(cache):
    fraction = 0.3
    expected_eval = {s for s in range(N_SAMPLES) if eval_score(f"k{s:03d}") < fraction}
    assert 0 < len(expected_eval) < N_SAMPLES
    train = _rows(
        ActivationDataset(cache, SYNTHETIC_HOOKS[0], split="train", eval_fraction=fraction)
    )
    held = _rows(ActivationDataset(cache, SYNTHETIC_HOOKS[0], split="eval", eval_fraction=fraction))
    assert {s for s, _ in held} == expected_eval
    assert not {s for s, _ in train} & expected_eval
    assert sorted(train + held) == sorted(ALL_ROWS)
    ds = ActivationDataset(cache, SYNTHETIC_HOOKS[0], split="eval", eval_fraction=fraction)
    assert ds.n_rows == round(200 * fraction)


def test_normalization_uses_the_manifest_statistics(cache):
    manifest = read_manifest(cache)
    stats = manifest["stats"][SYNTHETIC_HOOKS[0]]
    data = torch.cat(
        list(ActivationDataset(cache, SYNTHETIC_HOOKS[0], 64, shuffle_buffer=0))
    ).double()
    np.testing.assert_allclose(stats["mean"], data.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], data.var(0, unbiased=False).numpy(), rtol=1e-6)
    assert stats["mean_sq_norm"] == pytest.approx(float((data**2).sum(1).mean()), rel=1e-6)
    centred = torch.cat(
        list(ActivationDataset(cache, SYNTHETIC_HOOKS[0], 64, 0, normalize=True))
    ).double()
    assert centred.mean(0).abs().max() < 1e-5
    assert float((centred**2).sum(1).mean()) == pytest.approx(4.0, rel=1e-5)
    scaled = torch.cat(
        list(ActivationDataset(cache, SYNTHETIC_HOOKS[0], 64, 0, normalize="scale"))
    ).double()
    assert float((scaled**2).sum(1).mean()) == pytest.approx(4.0, rel=1e-5)
    scale = (4.0 / stats["mean_sq_norm"]) ** 0.5
    torch.testing.assert_close(scaled, data * scale, rtol=1e-6, atol=1e-6)  # no shift
    mean = torch.tensor(stats["mean"], dtype=torch.float64)
    centred_scale = (4.0 / sum(stats["var"])) ** 0.5
    torch.testing.assert_close(centred, (data - mean) * centred_scale, rtol=1e-5, atol=1e-5)
    ds = ActivationDataset(cache, SYNTHETIC_HOOKS, normalize=True)
    assert set(ds.normalization) == set(SYNTHETIC_HOOKS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_caches_read_back_exactly(tmp_path, dtype):
    cache = synthetic_cache(tmp_path / dtype, n_samples=9, n_tokens=3, shard_size=4, dtype=dtype)
    rows = torch.cat(
        list(ActivationDataset(cache, SYNTHETIC_HOOKS[1], batch_size=5, shuffle_buffer=0))
    )
    assert rows.dtype == torch.float32 and rows.shape == (27, 4)
    assert rows[:, 3].tolist() == list(range(27)) and set(rows[:, 2].tolist()) == {1.0}
    as_half = next(iter(ActivationDataset(cache, SYNTHETIC_HOOKS[1], dtype=torch.bfloat16)))
    assert as_half.dtype == torch.bfloat16


def test_reader_errors(cache, tmp_path):
    with pytest.raises(PrismaError, match="unknown hook 'blocks.0.hook_resid_pos' in this cache"):
        ActivationDataset(cache, "blocks.0.hook_resid_pos")
    with pytest.raises(PrismaError, match="pass hooks= to choose"):
        ActivationDataset(cache)
    with pytest.raises(PrismaError, match="split='test'"):
        ActivationDataset(cache, SYNTHETIC_HOOKS[0], split="test")
    with pytest.raises(PrismaError, match="normalize='zscore'"):
        ActivationDataset(cache, SYNTHETIC_HOOKS[0], normalize="zscore")
    with pytest.raises(PrismaError, match="open_shards=0: give an integer >= 1"):
        ActivationDataset(cache, SYNTHETIC_HOOKS[0], open_shards=0)
    with pytest.raises(PrismaError, match="batch_size=0: give an integer >= 1"):
        ActivationDataset(cache, SYNTHETIC_HOOKS[0], batch_size=0)
    with pytest.raises(PrismaError, match="has no manifest.json"):
        ActivationDataset(tmp_path)
    (cache / "shard-000002.tar").rename(tmp_path / "moved.tar")
    try:
        with pytest.raises(PrismaError, match="cannot read shard"):
            list(ActivationDataset(cache, SYNTHETIC_HOOKS[0], shuffle_buffer=0))
    finally:
        (tmp_path / "moved.tar").rename(cache / "shard-000002.tar")


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory):
    # 512 tokens x 4 fp32 = 8 KiB per member: payloads dwarf the 512-byte tar headers
    return synthetic_cache(tmp_path_factory.mktemp("wide"), n_samples=60, n_tokens=512)


def test_held_out_split_reads_only_its_samples_payloads(wide_cache, monkeypatch):
    counter = ShardBytes(monkeypatch)
    member = 512 * 4 * 4 + 128  # one hook's .npy: rows + npy header
    everything = _rows(ActivationDataset(wide_cache, SYNTHETIC_HOOKS[0], batch_size=512))
    all_bytes = counter.take()
    assert len(everything) == 60 * 512 and all_bytes >= 60 * member
    fraction = 0.1
    held = {s for s in range(60) if eval_score(f"k{s:03d}") < fraction}
    assert 0 < len(held) < 10
    rows = _rows(
        ActivationDataset(
            wide_cache, SYNTHETIC_HOOKS[0], 512, 0, split="eval", eval_fraction=fraction
        )
    )
    eval_bytes = counter.take()
    assert {s for s, _ in rows} == held and len(rows) == len(held) * 512
    # the held-out payloads, plus the headers of every member (3 per sample, 513 bytes each)
    # and each of the 10 shards' end-of-archive blocks
    headers = 60 * 3 * 520 + 10 * 1024
    assert len(held) * member <= eval_bytes <= len(held) * member + headers
    assert eval_bytes < 0.25 * all_bytes
    train = ActivationDataset(
        wide_cache, SYNTHETIC_HOOKS[0], 512, 1024, split="train", eval_fraction=fraction
    )
    assert len(_rows(train)) == (60 - len(held)) * 512
    assert counter.take() <= (60 - len(held)) * member + headers


@pytest.mark.parametrize(("buffer", "skip"), [(2048, 7), (2048, 30), (0, 9), (700, 1)])
def test_set_position_continues_an_uninterrupted_read_reading_only_the_buffer(
    wide_cache, monkeypatch, buffer, skip
):
    counter = ShardBytes(monkeypatch)

    def dataset():
        ds = ActivationDataset(
            wide_cache, SYNTHETIC_HOOKS, batch_size=256, shuffle_buffer=buffer, seed=3,
            split="train", eval_fraction=0.1, provenance=True, open_shards=4,
        )  # fmt: skip
        ds.set_epoch(2)
        return ds

    whole = list(dataset())
    counter.take()
    resumed_ds = dataset()
    resumed_ds.set_position([skip])
    resumed = list(resumed_ds)
    assert len(resumed) == len(whole) - skip
    for (acts, keys, tokens), (want, want_keys, want_tokens) in zip(resumed, whole[skip:]):
        assert torch.equal(acts, want) and keys == want_keys and torch.equal(tokens, want_tokens)
    resumed_bytes = counter.take()
    # replaying would read every sample that entered the buffer before the position; the
    # resumed read costs the headers, the rows left in the buffer's samples, and what follows
    replay = list(dataset())[:skip]
    assert len(replay) == skip
    member = 512 * 4 * 4 + 128
    rest_samples = len({k for _, keys, _ in whole[skip:] for k in keys})
    assert resumed_bytes <= 2 * member * rest_samples + 60 * 3 * 520 + 10 * 1024
    assert counter.take() > resumed_bytes + 2 * member * (skip * 256 // 512 - rest_samples)
