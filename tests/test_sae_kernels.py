"""The sparse TopK kernels against dense references (float64, small shapes)."""

from __future__ import annotations

import pytest
import torch

from prisma_mm.sae.base import nested_fvus, prefix_fvus
from prisma_mm.sae.kernels import _row_topk, batchtopk_encode, sparse_decode, topk_encode


def _dense_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, vals.relu())


def _dense_batchtopk(pre: torch.Tensor, k: int) -> torch.Tensor:
    flat = pre.relu().flatten()
    vals, idx = flat.topk(pre.shape[0] * k)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)


def _inputs(seed: int, batch: int = 9, d: int = 6, n: int = 40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    x = x * torch.rand(batch, 1, generator=gen, dtype=torch.float64).pow(3) * 5
    w_enc = torch.randn(d, n, generator=gen, dtype=torch.float64)
    b_enc = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    w_dec = torch.randn(n, d, generator=gen, dtype=torch.float64)
    center = torch.randn(d, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, w_enc, b_enc, w_dec, center)]


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("centred", [False, True])
def test_sparse_path_matches_dense_reference_values_and_gradients(mode, seed, centred):
    x, w_enc, b_enc, w_dec, center = _inputs(seed)
    k = 3
    grad_out = torch.randn(x.shape[0], w_dec.shape[1], dtype=torch.float64)
    c = center if centred else None
    wrt = [x, w_enc, b_enc, w_dec] + ([center] if centred else [])

    if mode == "topk":
        code = topk_encode(x, w_enc, b_enc, k, center=c)
    else:
        code = batchtopk_encode(x, w_enc, b_enc, k, center=c)
    recon = sparse_decode(code.values, code.latents, code.offsets, w_dec)
    fast = torch.autograd.grad((recon * grad_out).sum(), wrt)

    pre = ((x - center) if centred else x) @ w_enc + b_enc
    dense = _dense_topk(pre, k) if mode == "topk" else _dense_batchtopk(pre, k)
    ref_recon = dense @ w_dec
    ref = torch.autograd.grad((ref_recon * grad_out).sum(), wrt)

    torch.testing.assert_close(code.dense(), dense.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(recon, ref_recon, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec", "center"], fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    # layout: rows contiguous and in order, latents ascending inside a row
    rows = code.rows()
    assert bool((rows[1:] >= rows[:-1]).all())
    same_row = rows[1:] == rows[:-1]
    assert bool((code.latents[1:][same_row] > code.latents[:-1][same_row]).all())


def test_topk_gradcheck_small():
    x, w_enc, b_enc, w_dec, center = _inputs(3, batch=4, d=3, n=10)

    def f(x, w_enc, b_enc, w_dec, center):
        code = topk_encode(x, w_enc, b_enc, 2, center=center)
        return sparse_decode(code.values, code.latents, code.offsets, w_dec)

    assert torch.autograd.gradcheck(f, (x, w_enc, b_enc, w_dec, center), eps=1e-6, atol=1e-6)


def test_data_input_needs_no_input_gradient():
    x, w_enc, b_enc, w_dec, center = _inputs(6)
    x = x.detach()  # activations are data: the backward skips grad x
    code = topk_encode(x, w_enc, b_enc, 3, center=center)
    recon = sparse_decode(code.values, code.latents, code.offsets, w_dec)
    recon.sum().backward()
    pre = (x - center) @ w_enc + b_enc
    ref = _dense_topk(pre, 3) @ w_dec
    want = torch.autograd.grad(ref.sum(), [center, b_enc])
    torch.testing.assert_close(center.grad, want[0])
    torch.testing.assert_close(b_enc.grad, want[1])


def test_batchtopk_exact_when_one_row_takes_most_of_the_budget():
    """A row far larger than the rest needs more than its 2k candidates: the full-row
    fallback must still give the exact batch-wide top."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    x[3] *= 100.0
    w = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    b = torch.zeros(64, dtype=torch.float64)
    code = batchtopk_encode(x, w, b, 2)
    ref = _dense_batchtopk(x @ w + b, 2)
    assert int((ref[3] > 0).sum()) > 8  # row 3 really takes more than 2k = 4 entries (and 4k)
    torch.testing.assert_close(code.dense(), ref)
    assert code.values.numel() == 32


def test_rank_orders_entries_by_value_within_row():
    x, w_enc, b_enc, _, _ = _inputs(4)
    code = topk_encode(x, w_enc, b_enc, 5, with_rank=True)
    dense = code.dense().detach()
    for row in range(x.shape[0]):
        sl = slice(row * 5, (row + 1) * 5)
        by_rank = code.values[sl][code.rank[sl].argsort()].detach()
        assert bool((by_rank[:-1] >= by_rank[1:]).all())
        kept = code.latents[sl][code.values[sl] != 0]
        assert set(kept.tolist()) == set(dense[row].nonzero().flatten().tolist())


def test_bf16_autocast_forward_keeps_fp32_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=gen)
    w_enc = torch.randn(16, 64, generator=gen, requires_grad=True)
    b_enc = torch.zeros(64, requires_grad=True)
    w_dec = torch.randn(64, 16, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code = topk_encode(x, w_enc, b_enc, 4)
        recon = sparse_decode(code.values, code.latents, code.offsets, w_dec)
    assert code.values.dtype == torch.bfloat16
    assert recon.dtype == torch.float32
    recon.pow(2).sum().backward()
    for p in (w_enc, b_enc, w_dec):
        assert p.grad is not None and p.grad.dtype == torch.float32
    ref = _dense_topk(x @ w_enc.detach() + b_enc.detach(), 4)
    # bf16 selection may differ on near ties; most entries agree
    agree = (code.dense().detach().float() != 0) == (ref != 0)
    assert float(agree.float().mean()) > 0.98


@pytest.mark.parametrize("n", [1024, 1030])  # a multiple of the block size, and one with a tail
def test_two_stage_row_topk_equals_torch_topk(n):
    """Rows long against k take the block-maxima path: same values and latents as topk, also
    when a row's top k crowd into one block or sit in the tail past the last full block."""
    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(64, n, generator=gen, dtype=torch.float64)
    n_blocks = n // 16
    pre[0, [3 + n_blocks * i for i in range(16)]] += 50.0  # row 0: the whole top in one block
    pre[1, n - 6 :] += 50.0  # row 1: the top in the tail (or the last blocks)
    pre[2] = -pre[2].abs()  # row 2: nothing positive
    for k in (1, 8, 32):
        vals, idx = _row_topk(pre, k, sorted=True)
        ref_vals, ref_idx = pre.topk(k, dim=1)
        assert idx.shape == (64, k)  # the two-stage path ran (32 k <= n)
        torch.testing.assert_close(vals, ref_vals, rtol=0, atol=0)
        assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    assert set(_row_topk(pre, 16, sorted=False)[1][0].tolist()) == {
        3 + n_blocks * i for i in range(16)
    }


def test_long_rows_sparse_path_matches_dense_reference_gradients():
    """The encoder on rows long enough for the two-stage top-k keeps exact gradients."""
    x, w_enc, b_enc, w_dec, center = _inputs(8, batch=12, d=5, n=520)
    code = topk_encode(x, w_enc, b_enc, 4, center=center)
    recon = sparse_decode(code.values, code.latents, code.offsets, w_dec)
    grad_out = torch.randn_like(recon)
    wrt = [x, w_enc, b_enc, w_dec, center]
    fast = torch.autograd.grad((recon * grad_out).sum(), wrt)
    pre = (x - center) @ w_enc + b_enc
    ref_recon = _dense_topk(pre, 4) @ w_dec
    ref = torch.autograd.grad((ref_recon * grad_out).sum(), wrt)
    torch.testing.assert_close(recon, ref_recon, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec", "center"], fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("per_row_offset", [False, True])
@pytest.mark.parametrize("keep", [0, 1, -1])
def test_nested_fvus_matches_cumsum_prefixes_values_and_gradients(per_row_offset, keep):
    """The fused nested FVUs equal prefix_fvus over offset + cumsum(parts), and so do the
    gradients of a loss using both the FVUs and the kept prefix (parts, offset, target)."""
    gen = torch.Generator().manual_seed(11)
    parts = torch.randn(7, 3, 5, generator=gen, requires_grad=True)
    offset_shape = (7, 5) if per_row_offset else (5,)
    offset = torch.randn(*offset_shape, generator=gen, requires_grad=True)
    target = torch.randn(7, 5, generator=gen, requires_grad=True)
    weights = torch.tensor([0.5, 2.0, 1.0])
    probe = torch.randn(7, 5, generator=gen)

    fvus, prefix = nested_fvus(parts, offset, target, keep)
    loss = (fvus * weights).sum() + (prefix * probe).sum()
    got = torch.autograd.grad(loss, [parts, offset, target])

    prefixes = offset.unsqueeze(-2) + parts.cumsum(1)
    ref_fvus = prefix_fvus(prefixes, target)
    ref_loss = (ref_fvus * weights).sum() + (prefixes[:, keep] * probe).sum()
    want = torch.autograd.grad(ref_loss, [parts, offset, target])

    torch.testing.assert_close(fvus, ref_fvus)
    torch.testing.assert_close(prefix, prefixes[:, keep])
    for name, g, w in zip(["parts", "offset", "target"], got, want):
        torch.testing.assert_close(g, w, msg=name)
