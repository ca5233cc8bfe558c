"""Metric formulas pinned to hand-computed values; exact streaming; evaluate() on SAEs,
transcoders and crosscoders; the density histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prisma_mm.analysis.metrics import (
    MetricsAccumulator,
    evaluate,
    plot_density_histogram,
    reconstruction_metrics,
    split_batch,
)
from prisma_mm.errors import PrismaError
from prisma_mm.sae import Crosscoder, TopKSAE, Transcoder, fvu

# x = [[1, 0], [3, 2]], x̂ = [[1, 1], [2, 2]]:
#   errors (0, -1), (1, 0) -> Σ||x - x̂||² = 2
#   mean x = (2, 1) -> Σ||x - x̄||² = (1 + 1) + (1 + 1) = 4 -> FVU = 0.5
#   MSE per element = 2 / 4 = 0.5
#   cos: 1 / (1 · √2) and (6 + 4) / (√13 · √8) -> mean (0.70710678 + 0.98058068) / 2
#   γ = Σ||x̂||² / Σ<x, x̂> = (2 + 8) / (1 + 10) = 10 / 11
#   codes [[0, 2, 0], [1, 1, 0]]: L0 = 3 / 2; frequencies (0.5, 1, 0): dead 1/3, dense(>0.6) 1/3
X = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
X_HAT = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
CODES = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])


def _fire(code: torch.Tensor) -> torch.Tensor:
    return (code != 0).sum(0)


def test_formulas_hand_computed():
    acc = MetricsAccumulator(n_latents=3, dense_threshold=0.6)
    acc.update(X, X_HAT, _fire(CODES))
    m = acc.compute()
    assert m.n_tokens == 2 and m.d == 2
    assert m.fvu == pytest.approx(0.5, abs=1e-12)
    assert m.explained_variance == pytest.approx(0.5, abs=1e-12)
    assert m.mse == pytest.approx(0.5, abs=1e-12)
    cos = (1 / math.sqrt(2) + 10 / math.sqrt(104)) / 2
    assert m.cosine_similarity == pytest.approx(cos, abs=1e-12)
    assert m.cosine_similarity == pytest.approx(0.8438437, abs=1e-7)
    assert m.relative_reconstruction_bias == pytest.approx(10 / 11, abs=1e-12)
    assert m.l0 == pytest.approx(1.5)
    np.testing.assert_allclose(m.firing_frequency, [0.5, 1.0, 0.0])
    assert m.dead_fraction == pytest.approx(1 / 3)
    assert m.dense_fraction == pytest.approx(1 / 3)
    assert m.to_dict()["n_dead"] == 1


def test_streaming_equals_one_batch_and_variance_is_about_the_set_mean():
    # row by row: each one-row batch has zero variance about its own mean, so a per-batch
    # average would be undefined; the set-level formula must give the same 0.5
    acc = MetricsAccumulator(n_latents=3)
    for i in range(2):
        acc.update(X[i : i + 1], X_HAT[i : i + 1], _fire(CODES[i : i + 1]))
    assert acc.compute().fvu == pytest.approx(0.5, abs=1e-12)
    # a large offset shared by all rows changes neither the variance nor the errors
    shifted = MetricsAccumulator(n_latents=3)
    for i in range(2):
        shifted.update(X[i : i + 1] + 1e6, X_HAT[i : i + 1] + 1e6, _fire(CODES[i : i + 1]))
    assert shifted.compute().fvu == pytest.approx(0.5, abs=1e-9)


def test_many_batches_match_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=gen) * 3 + 5
    x_hat = x + 0.3 * torch.randn(1000, 8, generator=gen)
    codes = (torch.rand(1000, 16, generator=gen) < 0.1).float()
    acc = MetricsAccumulator(16)
    for xs, hs, cs in zip(x.split(77), x_hat.split(77), codes.split(77)):
        acc.update(xs, hs, _fire(cs))
    m = acc.compute()
    xd, hd = x.double(), x_hat.double()
    want = ((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert m.fvu == pytest.approx(float(want), rel=1e-10)
    assert m.l0 == pytest.approx(float(codes.double().sum(1).mean()), rel=1e-12)
    cos = torch.nn.functional.cosine_similarity(xd, hd, dim=1).mean()
    assert m.cosine_similarity == pytest.approx(float(cos), rel=1e-10)


def test_per_source_fvu_for_crosscoder_targets():
    # source 0: x = [0, 2], x̂ = [1, 1]: err 2, var 2 -> 1.0; source 1: x = [1, 3], x̂ = [1, 3]: 0
    target = torch.tensor([[[0.0], [1.0]], [[2.0], [3.0]]])
    recon = torch.tensor([[[1.0], [1.0]], [[1.0], [3.0]]])
    acc = MetricsAccumulator(n_latents=1, n_sources=2)
    acc.update(target, recon, torch.tensor([2]))
    m = acc.compute()
    assert m.fvu_per_source == pytest.approx([1.0, 0.0])
    assert m.fvu == pytest.approx(2 / 4)  # pooled: Σ errors / Σ variances


def test_evaluate_topk_matches_its_own_fvu_and_l0():
    torch.manual_seed(0)
    sae = TopKSAE(d_in=8, n_latents=32, k=3)
    x = torch.randn(300, 8) + 2.0
    m = evaluate(sae, list(x.split(64)), progress=False)
    assert m.n_tokens == 300
    with torch.no_grad():
        out = sae(x)
    assert m.fvu == pytest.approx(float(fvu(out.recon, x)), rel=1e-5)
    assert m.l0 == pytest.approx(3.0)  # TopK keeps 3 entries per row (values may be 0 only rarely)
    assert m.dead_fraction == pytest.approx(float((out.fire_counts() == 0).float().mean()))
    assert evaluate(sae, list(x.split(64)), max_tokens=100, progress=False).n_tokens == 100


def test_evaluate_transcoder_uses_the_target():
    torch.manual_seed(0)
    tc = Transcoder(d_in=6, d_out=6, n_latents=16, k=2)
    x, y = torch.randn(50, 6), torch.randn(50, 6) * 2
    stacked = torch.stack([x, y], dim=1)  # the cache reader's [batch, 2, d] layout
    m_pairs = evaluate(tc, [(x, y)], progress=False)
    m_stack = evaluate(tc, [stacked], progress=False)
    with torch.no_grad():
        recon = tc(x, y).recon
    assert m_pairs.fvu == pytest.approx(float(fvu(recon, y)), rel=1e-5)
    assert m_stack.fvu == pytest.approx(m_pairs.fvu, rel=1e-9)
    with pytest.raises(PrismaError, match="transcoder"):
        split_batch(tc, x)


def test_evaluate_crosscoder_reports_sources():
    torch.manual_seed(0)
    cc = Crosscoder(d_in=4, n_sources=3, n_latents=16, k=2)
    x = torch.randn(40, 3, 4)
    m = evaluate(cc, [x], progress=False)
    assert len(m.fvu_per_source) == 3
    with torch.no_grad():
        recon = cc(x).recon
    for s in range(3):
        assert m.fvu_per_source[s] == pytest.approx(float(fvu(recon[:, s], x[:, s])), rel=1e-5)


def test_density_histogram_png(tmp_path):
    acc = MetricsAccumulator(n_latents=3)
    acc.update(X, X_HAT, _fire(CODES))
    path = plot_density_histogram(acc.compute(), tmp_path / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_mistakes():
    with pytest.raises(PrismaError, match="no tokens"):
        MetricsAccumulator(3).compute()
    with pytest.raises(PrismaError, match="dense_threshold"):
        MetricsAccumulator(3, dense_threshold=2.0)
    acc = MetricsAccumulator(3)
    with pytest.raises(PrismaError, match="fire_counts"):
        acc.update(X, X_HAT, torch.tensor([1, 2]))


# ---- the one accumulator training uses too ---------------------------------------------------
def test_reconstruction_metrics_of_one_batch_hand_computed():
    target = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    recon = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]])
    m = reconstruction_metrics(target, recon)
    # squared errors 1, 0, 1; variance about the batch mean (4/3, 4/3): 20/9 + 20/9 + 8/9
    assert m["fvu"].item() == pytest.approx(2.0 / (48.0 / 9.0), abs=1e-12)  # 0.375, not 2/16
    assert m["mse"].item() == pytest.approx(2.0 / 6.0, abs=1e-12)
    cos = (1.0 + 1.0 + 6.0 / math.sqrt(40.0)) / 3.0
    assert m["cosine_similarity"].item() == pytest.approx(cos, abs=1e-12)


def test_shifted_sums_keep_the_variance_of_rows_far_from_zero():
    # rows 1e9 + (1, 3 | 5, 7) in two batches: mean 1e9 + 4, Σ (x - x̄)² = 9 + 1 + 1 + 9 = 20;
    # errors ±1 -> Σ err² = 4 -> FVU 0.2. Unshifted sums (Σx² - (Σx)²/N ~ 4e18 - 4e18 in
    # float64, ulp 512) lose the variance entirely.
    acc = MetricsAccumulator(n_latents=0)
    for rows, errors in (([1.0, 3.0], [1.0, -1.0]), ([5.0, 7.0], [1.0, -1.0])):
        x = torch.tensor(rows, dtype=torch.float64).unsqueeze(1) + 1e9
        acc.update(x, x + torch.tensor(errors, dtype=torch.float64).unsqueeze(1))
    assert float(acc.total_variance_per_dim().sum()) == pytest.approx(20.0, abs=1e-6)
    assert acc.compute().fvu == pytest.approx(0.2, abs=1e-9)
    naive = (torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64) + 1e9).pow(2).sum() - (
        torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64) + 1e9
    ).sum().pow(2) / 4
    assert abs(float(naive) - 20.0) > 1.0  # what the unshifted formula would report


def test_losses_are_row_weighted_means():
    acc = MetricsAccumulator(n_latents=3)
    acc.update(X, X_HAT, _fire(CODES), {"aux": torch.tensor(1.0)})
    acc.update(X[:1], X_HAT[:1], _fire(CODES[:1]), {"aux": torch.tensor(4.0)})
    m = acc.compute()
    assert m.losses == {"aux": pytest.approx((2 * 1.0 + 1 * 4.0) / 3)}
    assert m.to_dict()["loss/aux"] == pytest.approx(2.0)


def _all_reduce_worker(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        target, recon, codes = _split_data()
        rows = slice(0, 3) if rank == 0 else slice(3, 10)
        acc = MetricsAccumulator(n_latents=8)
        # different first-batch shifts on the two processes; a loss term only process 1 has
        losses = {"aux": torch.tensor(float(rank + 1))}
        if rank == 1:
            losses["only_one"] = torch.tensor(3.0)
        acc.update(target[rows], recon[rows], _fire(codes[rows]), losses)
        acc.all_reduce()
        if rank == 1:
            torch.save(acc.compute().to_dict(frequencies=True), out)
    finally:
        torch.distributed.destroy_process_group()


def _split_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(10, 2, 3, generator=gen) * 2 + 50.0
    target[3:] += 7.0  # the two processes' rows have different means
    recon = target + 0.3 * torch.randn(10, 2, 3, generator=gen)
    codes = (torch.rand(10, 8, generator=gen) > 0.6).float()
    codes[:, 7] = 0
    return target, recon, codes


def test_all_reduce_over_two_processes_gives_the_one_process_metrics(tmp_path):
    out = tmp_path / "metrics.pt"
    torch.multiprocessing.spawn(
        _all_reduce_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True
    )
    got = torch.load(out, weights_only=True)
    target, recon, codes = _split_data()
    whole = MetricsAccumulator(n_latents=8)
    whole.update(target, recon, _fire(codes))
    want = whole.compute().to_dict(frequencies=True)
    assert got["n_tokens"] == want["n_tokens"] == 10
    for key in ("fvu", "mse", "cosine_similarity", "relative_reconstruction_bias", "l0"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert got["dead_fraction"] == want["dead_fraction"] >= 1 / 8  # latent 7 never fires
    assert got["firing_frequency"] == pytest.approx(want["firing_frequency"])
    assert got["loss/aux"] == pytest.approx((3 * 1.0 + 7 * 2.0) / 10)
    assert got["loss/only_one"] == pytest.approx(7 * 3.0 / 10)
