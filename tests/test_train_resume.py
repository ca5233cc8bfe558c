"""ActivationDataModule's checkpoint state: a resumed train stream continues with exactly the
batches of an uninterrupted one (with and without DataLoader workers, within a pass and across
its end), reading only what it has not trained on yet, not a replay of the pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helpers import SYNTHETIC_HOOKS, ShardBytes, synthetic_cache

from prisma_mm.train.data import ActivationDataModule

N_TOKENS = 32
ROW_BYTES = 4 * 4  # d 4, fp32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("resume"), n_samples=400, n_tokens=N_TOKENS)


def _datamodule(cache, num_workers: int, seed: int = 0) -> ActivationDataModule:
    return ActivationDataModule(
        str(cache), SYNTHETIC_HOOKS[0], batch_size=256, num_workers=num_workers,
        shuffle_buffer=512, seed=seed, eval_fraction=0.1, normalize=False,
    )  # fmt: skip


def _take(datamodule: ActivationDataModule, n: int) -> list[torch.Tensor]:
    batches = iter(datamodule.train_dataloader())
    return [next(batches).clone() for _ in range(n)]


def test_resumed_stream_reads_far_less_than_a_replay(cache, monkeypatch):
    counter = ShardBytes(monkeypatch, payload_only=True)
    whole = _take(_datamodule(cache, 0), 40)
    whole_bytes = counter.take()
    first = _datamodule(cache, 0)
    _take(first, 38)
    state = first.state_dict()
    assert state["positions"] == [{"pass": 0, "batches": [38]}] and state["pass_lengths"] == [[]]
    assert state["trained_batches"] == 38
    counter.take()
    resumed = _datamodule(cache, 0)
    resumed.load_state_dict(state)
    got = _take(resumed, 2)
    resumed_bytes = counter.take()
    for batch, want in zip(got, whole[38:]):
        assert torch.equal(batch, want)
    # a replay reads every sample of the 38 batches (9,728 rows) again; the resumed stream
    # reads the samples with rows in the buffer (512 rows held, from about 512 / 32 x ln 32
    # samples) and those of the 2 batches after
    sample_bytes = N_TOKENS * ROW_BYTES + 128
    assert whole_bytes >= 40 * 256 * ROW_BYTES
    assert resumed_bytes < 0.3 * whole_bytes
    assert resumed_bytes <= (512 // N_TOKENS) * 6 * sample_bytes


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("trained", [5, 44, 60])
def test_resumed_stream_continues_an_uninterrupted_one(cache, num_workers, trained):
    torch.set_num_threads(1)
    whole = _take(_datamodule(cache, num_workers), 70)  # a pass is about 45 batches
    first = _datamodule(cache, num_workers)
    before = _take(first, trained)
    for batch, want in zip(before, whole):
        assert torch.equal(batch, want)
    state = first.state_dict()
    (position,) = state["positions"]
    assert len(position["batches"]) == max(1, num_workers)
    resumed = _datamodule(cache, num_workers)
    resumed.load_state_dict(state)
    after = _take(resumed, 70 - trained)
    for index, (batch, want) in enumerate(zip(after, whole[trained:])):
        assert torch.equal(batch, want), f"batch {trained + index} differs"
    # a checkpoint of the resumed stream points at the same place as the uninterrupted one's
    again = _datamodule(cache, num_workers)
    _take(again, 70)
    assert resumed.state_dict()["positions"] == again.state_dict()["positions"]


def test_resume_with_another_seed_starts_the_next_pass(cache):
    first = _datamodule(cache, 0)
    whole = _take(first, 50)  # into pass 1
    state = first.state_dict()
    assert state["positions"][0]["pass"] == 1
    other = _datamodule(cache, 0, seed=5)
    with pytest.warns(UserWarning, match=r"seed=5 \(checkpoint: 0\)"):
        other.load_state_dict(state)
    fresh = _datamodule(cache, 0, seed=5)
    fresh_passes = _take(fresh, 100)
    pass_length = fresh.state_dict()["pass_lengths"][0][0]
    got = _take(other, 3)
    for batch, want in zip(got, fresh_passes[pass_length:]):
        assert torch.equal(batch, want)  # pass 1 of seed 5, from its start
    assert not any(torch.equal(got[0], w) for w in whole)
    assert np.isfinite(got[0].numpy()).all()
