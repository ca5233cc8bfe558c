"""Each dictionary family's encoding and loss terms, pinned to hand-computed references."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch

import prisma_mm.sae as S
from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import FiringTracker, Output, fvu, geometric_median
from prisma_mm.sae.batchtopk import BatchTopKActivation
from prisma_mm.sae.jumprelu import JumpReLUActivation, _JumpReLU, _Step
from prisma_mm.sae.relu import ReLUActivation
from prisma_mm.sae.topk import TopKActivation


def _x(batch: int = 24, d: int = 8, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d, generator=gen, dtype=dtype) + 0.5


def _randomise(d: S.Dictionary, seed: int = 1) -> S.Dictionary:
    """Untied random parameters (a 'trained' dictionary), biases included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("threshold"):
                p.copy_(0.2 + 0.3 * torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return d


def _dense_code(d, x, k):
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc if d.apply_b_dec_to_input else x @ d.W_enc + d.b_enc
    vals, idx = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, vals.relu())


# ---- construction ------------------------------------------------------------------------


def test_build_errors_name_the_problem():
    with pytest.raises(PrismaError, match="unknown architecture 'topkk'.*'topk'"):
        S.build("topkk", d_in=4, n_latents=8)
    with pytest.raises(PrismaError, match="unknown argument.*kk"):
        S.TopKSAE(d_in=4, n_latents=8, kk=2)
    with pytest.raises(PrismaError, match="k must be in 1..n_latents=8"):
        S.TopKSAE(d_in=4, n_latents=8, k=9)
    with pytest.raises(PrismaError, match="needs d_in"):
        S.TopKSAE(n_latents=8)
    with pytest.raises(PrismaError, match="unknown activation 'gelu'"):
        S.Transcoder(d_in=4, n_latents=8, activation="gelu")
    assert set(S.ARCHITECTURES) == {
        "topk",
        "batchtopk",
        "relu",
        "jumprelu",
        "matryoshka",
        "transcoder",
        "crosscoder",
    }


def test_config_object_and_keywords_build_the_same_dictionary():
    cfg = S.TopKConfig(d_in=8, n_latents=16, k=3)
    a, b = S.TopKSAE(cfg), S.TopKSAE(d_in=8, n_latents=16, k=3)
    assert a.cfg == b.cfg
    assert S.TopKSAE(cfg, k=5).cfg.k == 5
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


# ---- TopK --------------------------------------------------------------------------------


def test_topk_encodes_k_latents_per_row_with_leading_dims():
    sae = _randomise(S.TopKSAE(d_in=8, n_latents=32, k=3))
    x = _x(12).reshape(3, 4, 8)
    code = sae.encode(x)
    assert code.shape == (3, 4, 32)
    assert bool(((code != 0).sum(-1) <= 3).all())
    torch.testing.assert_close(code.reshape(12, 32), _dense_code(sae, x.reshape(12, 8), 3))
    recon = sae.decode(code)
    torch.testing.assert_close(recon, code @ sae.W_dec + sae.b_dec)
    out = sae(x.reshape(12, 8))
    torch.testing.assert_close(out.recon, recon.reshape(12, 8))
    torch.testing.assert_close(out.loss, fvu(out.recon, x.reshape(12, 8)))


def test_auxk_term_matches_hand_computation():
    sae = _randomise(S.TopKSAE(d_in=8, n_latents=32, k=3, dead_tokens_threshold=100, k_aux=5))
    x = _x(16)
    out = sae.train()(x)
    assert "auxk" not in out.losses  # nothing is dead yet
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 5, 9, 13, 20, 31]] = True
    sae.tracker.tokens_since_fired[dead] = 100
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    masked = torch.where(dead, pre, torch.tensor(-torch.inf))
    vals, idx = masked.topk(5, dim=1)
    aux_code = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    e = (x - out.recon).detach()
    e_hat = aux_code @ sae.W_dec  # no b_dec: the bias is already in recon
    want = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.losses["auxk"], want.detach())
    torch.testing.assert_close(out.loss, out.losses["fvu"] + want / 32, rtol=1e-5, atol=1e-6)
    # a live latent outside the main top-k gets no encoder gradient (AuxK reads dead ones only)
    sae.zero_grad()
    out.loss.backward()
    alive_cols = sae.W_enc.grad[:, ~dead]
    main_cols = _dense_code(sae, x, 3).detach().ne(0).any(0)[~dead]
    assert bool((alive_cols[:, ~main_cols] == 0).all())
    assert "auxk" not in sae.eval()(x).losses


def test_multi_topk_adds_the_fvu_of_4k_latents():
    sae = _randomise(S.TopKSAE(d_in=8, n_latents=64, k=2, multi_topk=True))
    x = _x(16)
    out = sae.train()(x)
    recon_4k = _dense_code(sae, x, 8) @ sae.W_dec + sae.b_dec
    recon_k = _dense_code(sae, x, 2) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.losses["fvu_multi"], fvu(recon_4k, x).detach())
    torch.testing.assert_close(out.recon, recon_k)
    torch.testing.assert_close(out.loss, fvu(recon_k, x) + fvu(recon_4k, x))
    assert bool(((out.code != 0).sum(-1) <= 2).all())


# ---- BatchTopK ---------------------------------------------------------------------------


def test_batchtopk_training_threshold_and_batch_independent_inference():
    sae = _randomise(S.BatchTopKSAE(d_in=8, n_latents=32, k=3, threshold_momentum=0.9))
    x = _x(20)
    out = sae.train()(x)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu().detach()
    vals, idx = pre.flatten().topk(60)
    torch.testing.assert_close(out.code, torch.zeros(640).scatter(0, idx, vals).view(20, 32))
    assert not sae.activation.calibrated
    sae.on_train_batch_end(out)
    first = float(vals.min())
    assert float(sae.activation.threshold) == pytest.approx(first)
    out2 = sae(_x(20, seed=3))
    sae.on_train_batch_end(out2)
    second = float(out2.sparse.values.detach().min())
    assert float(sae.activation.threshold) == pytest.approx(0.9 * first + 0.1 * second)
    # inference: a fixed threshold, so one row encodes the same alone or in any batch
    sae.eval()
    alone = sae.encode(x[:1])
    in_batch = sae.encode(torch.cat([_x(7, seed=9), x[:1]]))[-1:]
    torch.testing.assert_close(alone, in_batch)
    theta = sae.activation.threshold
    pre_row = (x[:1] - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(alone, pre_row * (pre_row > theta))
    assert "activation.threshold" in sae.inference_state_dict()


# ---- ReLU / JumpReLU ---------------------------------------------------------------------


def test_relu_l1_is_decoder_norm_weighted_with_warmup():
    sae = _randomise(S.ReLUSAE(d_in=8, n_latents=16, l1_coefficient=2.0, l1_warmup_fraction=0.1))
    x = _x()
    code = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    l1 = (code * sae.W_dec.norm(dim=1)).sum(1).mean()
    mse = (code @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean()
    for progress, factor in [(0.0, 0.0), (0.05, 0.5), (0.5, 1.0)]:
        sae.set_progress(progress)
        out = sae(x)
        torch.testing.assert_close(out.losses["l1"], l1.detach())
        torch.testing.assert_close(out.loss, mse + 2.0 * factor * l1)
    norms = sae.W_dec.norm(dim=1).clone()
    sae.normalize_decoder_()  # not the method for norm-weighted L1
    torch.testing.assert_close(sae.W_dec.norm(dim=1), norms)
    assert S.ReLUSAE(d_in=8, n_latents=16).W_dec.norm(dim=1).allclose(torch.full((16,), 0.1))


def test_jumprelu_straight_through_gradients_follow_the_rectangle_kernel():
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    pre = torch.tensor([[0.5, 0.98, 1.03, 2.0]], requires_grad=True)
    eps = 0.1
    out = _JumpReLU.apply(pre, theta, eps)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, 0.0, 1.03, 2.0]]))
    out.sum().backward()
    # d/dtheta = -(theta/eps) * 1[|pre - theta| < eps/2]
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -10.0, -10.0, 0.0]))
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    theta.grad = None
    pre.grad = None
    step = _Step.apply(pre, theta, eps)
    torch.testing.assert_close(step.detach(), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    step.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -10.0, -10.0, 0.0]))
    assert pre.grad is None or bool((pre.grad == 0).all())


def test_jumprelu_losses_l0_and_target_l0():
    sae = _randomise(S.JumpReLUSAE(d_in=8, n_latents=16, l0_coefficient=0.5))
    sae.set_progress(1.0)
    x = _x()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    theta = sae.activation.threshold
    code = pre * (pre > theta)
    l0 = (pre > theta).float().sum(1).mean()
    mse = (code @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean()
    out = sae(x)
    torch.testing.assert_close(out.losses["l0"], l0)
    torch.testing.assert_close(out.loss, mse + 0.5 * l0)
    target = S.JumpReLUSAE(sae.cfg, target_l0=2.0)
    target.load_state_dict(sae.state_dict())
    target.set_progress(1.0)
    out = target(x)
    torch.testing.assert_close(out.losses["l0_target"], ((l0 - 2.0) / 2.0).pow(2))
    torch.testing.assert_close(out.loss, mse + 0.5 * ((l0 - 2.0) / 2.0).pow(2))
    target.set_progress(0.025)  # warm-up 5%: half the coefficient
    torch.testing.assert_close(target(x).loss, mse + 0.25 * ((l0 - 2.0) / 2.0).pow(2))


# ---- Matryoshka --------------------------------------------------------------------------


def test_matryoshka_latent_prefixes_fvu_and_loss():
    sae = _randomise(S.MatryoshkaSAE(d_in=8, n_latents=16, k=3, group_sizes=[2, 4, 10]))
    x = _x()
    out = sae.train()(x)
    code = out.code.detach()
    total = 0.0
    for g, end in enumerate([2, 6, 16]):
        masked = code.clone()
        masked[:, end:] = 0
        want = fvu(masked @ sae.W_dec + sae.b_dec, x)
        torch.testing.assert_close(out.losses[f"fvu_prefix_{g}"], want.detach())
        total = total + want
    torch.testing.assert_close(out.loss, total)
    assert int((code != 0).sum()) == 3 * 24  # BatchTopK budget
    torch.testing.assert_close(out.losses["fvu_prefix_2"], out.losses["fvu"])
    with pytest.raises(PrismaError, match="sum to n_latents=16"):
        S.MatryoshkaSAE(d_in=8, n_latents=16, group_sizes=[4, 4])


def test_matryoshka_nested_k_prefixes_and_inference_k():
    sae = _randomise(
        S.MatryoshkaSAE(d_in=8, n_latents=32, nesting="k", ks=[4, 1, 2], k_weights=[1, 2, 3])
    )
    assert sae.cfg.ks == [1, 2, 4] and sae.cfg.k == 4
    x = _x()
    out = sae.train()(x)
    want = 0.0
    for i, (k, w) in enumerate(zip([1, 2, 4], [1, 2, 3])):
        f = fvu(_dense_code(sae, x, k) @ sae.W_dec + sae.b_dec, x)
        torch.testing.assert_close(out.losses[f"fvu_prefix_{i}"], f.detach())
        want = want + w * f
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(sae.eval().encode(x), _dense_code(sae, x, 4))
    small = S.MatryoshkaSAE(sae.cfg, k=2)
    small.load_state_dict(sae.state_dict())
    torch.testing.assert_close(small.train()(x).code, _dense_code(sae, x, 2))


# ---- Transcoder / Crosscoder -------------------------------------------------------------


@pytest.mark.parametrize(
    "activation,cls",
    [
        ("topk", TopKActivation),
        ("batchtopk", BatchTopKActivation),
        ("relu", ReLUActivation),
        ("jumprelu", JumpReLUActivation),
    ],
)
def test_transcoder_reuses_every_activation_and_adds_skip(activation, cls):
    tc = _randomise(
        S.Transcoder(d_in=7, n_latents=24, d_out=5, activation=activation, k=3, skip=True)
    )
    assert type(tc.activation) is cls
    x, y = _x(d=7), _x(d=5, seed=4)
    out = tc.train()(x, y)
    assert out.recon.shape == (24, 5) and out.code.shape == (24, 24)
    torch.testing.assert_close(out.recon, out.code @ tc.W_dec + tc.b_dec + x @ tc.W_skip)
    recon_loss = "mse" if activation in ("relu", "jumprelu") else "fvu"
    want = fvu(out.recon, y) if recon_loss == "fvu" else (out.recon - y).pow(2).sum(1).mean()
    torch.testing.assert_close(out.losses[recon_loss], want.detach())
    out.loss.backward()
    assert tc.W_skip.grad is not None and tc.W_enc.grad is not None
    with pytest.raises(PrismaError, match="needs target"):
        tc(x)


def test_crosscoder_shapes_losses_and_norm_weighted_l1():
    cc = _randomise(S.Crosscoder(d_in=6, n_sources=3, n_latents=20, k=4))
    assert cc.W_enc.shape == (3, 6, 20) and cc.W_dec.shape == (20, 3, 6)
    x = torch.randn(10, 3, 6)
    out = cc(x)
    assert out.recon.shape == (10, 3, 6)
    pre = torch.einsum("bsd,sdn->bn", x, cc.W_enc) + cc.b_enc
    vals, idx = pre.topk(4, dim=1)
    code = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    recon = torch.einsum("bn,nsd->bsd", code, cc.W_dec) + cc.b_dec
    torch.testing.assert_close(out.recon, recon)
    per_source = [fvu(recon[:, s], x[:, s]) for s in range(3)]
    for s in range(3):
        torch.testing.assert_close(out.losses[f"fvu_source_{s}"], per_source[s].detach())
    torch.testing.assert_close(out.loss, sum(per_source))
    cc.normalize_decoder_()
    torch.testing.assert_close(cc.W_dec.reshape(20, -1).norm(dim=1), torch.ones(20))
    l1cc = _randomise(S.Crosscoder(d_in=6, n_sources=3, n_latents=20, activation="relu"))
    l1cc.set_progress(1.0)
    out = l1cc(x)
    code = (torch.einsum("bsd,sdn->bn", x, l1cc.W_enc) + l1cc.b_enc).relu()
    weights = l1cc.W_dec.norm(dim=-1).sum(-1)  # sum over sources of per-source norms
    torch.testing.assert_close(out.losses["l1"], (code * weights).sum(1).mean().detach())
    with pytest.raises(PrismaError, match=r"input of shape \(10, 6\) must end in \(3, 6\)"):
        cc(torch.randn(10, 6))


# ---- shared machinery --------------------------------------------------------------------


def test_decoder_normalisation_and_gradient_projection():
    sae = _randomise(S.TopKSAE(d_in=8, n_latents=16, k=2))
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    sae.W_dec.grad = torch.randn(16, 8)
    sae.remove_decoder_grad_parallel_()
    torch.testing.assert_close(
        (sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6, rtol=0
    )


def test_geometric_median_and_init_from_sample():
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(square), torch.tensor([1.0, 1.0]))
    # the median resists an outlier that drags the mean
    pts = torch.cat(
        [torch.randn(200, 3, generator=torch.Generator().manual_seed(0)), torch.full((5, 3), 1e3)]
    )
    median = geometric_median(pts)
    assert float(median.norm()) < 0.5 < float(pts.mean(0).norm())
    cost = lambda p: (pts - p).norm(dim=1).sum()  # noqa: E731
    for delta in torch.eye(3) * 0.01:
        assert cost(median) <= cost(median + delta) and cost(median) <= cost(median - delta)
    sae = S.TopKSAE(d_in=3, n_latents=8, k=2)
    sae.init_from_sample(pts)
    torch.testing.assert_close(sae.b_dec.detach(), median)


def _fold_case(name: str) -> tuple[S.Dictionary, dict]:
    f64 = torch.float64
    if name == "topk":
        return S.TopKSAE(d_in=6, n_latents=24, k=3), dict(mean=torch.randn(6), scale=2.5)
    if name == "topk-vector":
        return S.TopKSAE(d_in=6, n_latents=24, k=3), dict(
            mean=torch.randn(6), scale=torch.rand(6) + 0.5
        )
    if name == "batchtopk":
        return S.BatchTopKSAE(d_in=6, n_latents=24, k=3), dict(mean=torch.randn(6), scale=0.7)
    if name == "relu":
        return S.ReLUSAE(d_in=6, n_latents=24), dict(mean=torch.randn(6), scale=3.0)
    if name == "jumprelu":
        return S.JumpReLUSAE(d_in=6, n_latents=24), dict(mean=torch.randn(6), scale=1.7)
    if name == "transcoder":
        return S.Transcoder(d_in=6, n_latents=24, d_out=4, k=3, skip=True), dict(
            mean=torch.randn(6), scale=2.0, target_mean=torch.randn(4), target_scale=0.5
        )
    assert name == "crosscoder"
    del f64
    return S.Crosscoder(d_in=5, n_sources=2, n_latents=24, k=3), dict(
        mean=torch.randn(2, 5), scale=1.5
    )


@pytest.mark.parametrize(
    "name", ["topk", "topk-vector", "batchtopk", "relu", "jumprelu", "transcoder", "crosscoder"]
)
def test_fold_normalization_makes_raw_inputs_give_raw_reconstructions(name):
    torch.manual_seed(0)
    d, norm = _fold_case(name)
    d = _randomise(d).double().eval()
    if name == "batchtopk":
        d.activation.threshold.fill_(0.3)
    norm = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in norm.items()}
    shape = (16, 2, 5) if name == "crosscoder" else (16, 6)
    x_raw = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x_norm = (x_raw - norm["mean"]) / norm["scale"]
    before = d(x_norm, _target(name, x_norm))
    folded = copy.deepcopy(d)
    folded.fold_normalization_(**norm)
    after = folded(x_raw, _target(name, x_raw))
    out_mean = norm.get("target_mean", norm["mean"])
    out_scale = norm.get("target_scale", norm["scale"])
    torch.testing.assert_close(after.recon, before.recon * out_scale + out_mean)
    code_scale = out_scale if out_scale.numel() == 1 else 1.0
    torch.testing.assert_close(after.code, before.code * code_scale)
    assert folded.metadata["normalization"]["folded"] is True


def _target(name, x):
    return torch.zeros(x.shape[0], 4, dtype=x.dtype) if name == "transcoder" else None


def test_firing_tracker_counts_tokens_and_frequencies():
    tracker = FiringTracker(4)
    tracker.update(torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 3.0, 0]]))
    tracker.update(torch.tensor([[0.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0]]))
    assert tracker.tokens_since_fired.tolist() == [3, 5, 0, 5]
    assert tracker.fire_count.tolist() == [2, 0, 3, 0]
    assert int(tracker.tokens_seen) == 5
    assert tracker.dead_fraction(5) == 0.5
    assert tracker.dead_fraction(3) == 0.75
    assert tracker.dense_fraction(0.5) == 0.25
    code = torch.tensor([[0.0, 1.0, 0, 0]])
    tracker.update(Output(recon=code, code=code))
    assert tracker.tokens_since_fired.tolist() == [4, 0, 1, 6]
    tracker.reset_frequency()
    assert int(tracker.tokens_seen) == 0 and tracker.fire_count.sum() == 0


def test_sparse_output_fire_counts_match_dense():
    sae = _randomise(S.TopKSAE(d_in=8, n_latents=16, k=3))
    out = sae(_x())
    sparse_counts = out.fire_counts()
    assert out._code is None  # counting did not densify
    torch.testing.assert_close(sparse_counts, (out.code != 0).sum(0))
    assert float(out.l0()) == pytest.approx(float((out.code != 0).sum(1).float().mean()))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_bf16_autocast_keeps_fp32_parameters_and_grads(arch):
    sae = S.build(arch, d_in=16, n_latents=64, **({} if arch in ("relu", "jumprelu") else {"k": 4}))
    x = _x(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.train()(x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in sae.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name


def test_fit_simple_calls_the_training_hooks_in_trainer_order():
    calls: list[str] = []

    class Spy(S.TopKSAE):
        def init_from_sample(self, x, target=None):
            calls.append("init")
            super().init_from_sample(x, target)

        def set_progress(self, fraction):
            calls.append(f"progress {fraction:.2f}")
            super().set_progress(fraction)

        def remove_decoder_grad_parallel_(self):
            calls.append("project")
            super().remove_decoder_grad_parallel_()

        def normalize_decoder_(self):
            calls.append("normalize")
            super().normalize_decoder_()

        def on_train_batch_end(self, out):
            calls.append("end")
            super().on_train_batch_end(out)

    sae = Spy(d_in=8, n_latents=16, k=2)
    history = S.fit_simple(sae, [_x(), _x(seed=1)], steps=4, lr=1e-2, progress=False)
    step = ["project", "normalize", "end"]
    assert calls == ["init", "progress 0.00", *step, "progress 0.25", *step] + [
        "progress 0.50",
        *step,
        "progress 0.75",
        *step,
    ]
    assert int(sae.tracker.tokens_seen) == 4 * 24
    assert history[-1]["step"] == 3.0 and "fvu" in history[-1]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    assert not sae.training


def test_matryoshka_reports_prefix_fvus_in_eval_mode_too():
    sae = _randomise(S.MatryoshkaSAE(d_in=8, n_latents=16, k=3, group_sizes=[2, 4, 10]))
    sae.activation.threshold.fill_(0.2)
    x = _x()
    out = sae.eval()(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    code = pre * (pre > 0.2)
    torch.testing.assert_close(out.code, code)
    for g, end in enumerate([2, 6, 16]):
        masked = code.clone()
        masked[:, end:] = 0
        want = fvu(masked @ sae.W_dec + sae.b_dec, x)
        torch.testing.assert_close(out.losses[f"fvu_prefix_{g}"], want.detach())
    nested = _randomise(S.MatryoshkaSAE(d_in=8, n_latents=16, nesting="k", ks=[1, 3], k=2))
    out = nested.eval()(x)
    torch.testing.assert_close(out.code, _dense_code(nested, x, 2))
    f1 = fvu(_dense_code(nested, x, 1) @ nested.W_dec + nested.b_dec, x)
    torch.testing.assert_close(out.losses["fvu_prefix_0"], f1.detach())


# ---- sparse codes, aliases, input checks, AuxK normalisation ---------------------------------

SPARSE_FAMILIES = {
    "topk": lambda: S.TopKSAE(d_in=8, n_latents=32, k=4),
    "batchtopk": lambda: S.BatchTopKSAE(d_in=8, n_latents=32, k=4),
    "matryoshka": lambda: S.MatryoshkaSAE(d_in=8, n_latents=32, k=4, group_sizes=[8, 8, 16]),
    "matryoshka-k": lambda: S.MatryoshkaSAE(d_in=8, n_latents=32, nesting="k", ks=[2, 5]),
    "relu": lambda: S.ReLUSAE(d_in=8, n_latents=32),
    "jumprelu": lambda: S.JumpReLUSAE(d_in=8, n_latents=32),
    "transcoder": lambda: S.Transcoder(d_in=8, n_latents=32, d_out=5, k=3),
    "crosscoder": lambda: S.Crosscoder(d_in=4, n_sources=2, n_latents=32, k=3),
}


@pytest.mark.parametrize("name", list(SPARSE_FAMILIES))
def test_encode_sparse_holds_exactly_the_dense_codes_nonzeros(name):
    sae = _randomise(SPARSE_FAMILIES[name]()).eval()
    if isinstance(getattr(sae, "activation", None), BatchTopKActivation):
        sae.activation.threshold.fill_(0.15)  # calibrated: per-row counts vary
    shape = (2, 12, 2, 4) if name == "crosscoder" else (2, 12, 8)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = sae.encode(x)
        values, indices = sae.encode_sparse(x)
    assert values.shape[:2] == (2, 12) and indices.shape == values.shape
    assert indices.dtype == torch.long
    rebuilt = torch.zeros_like(dense).scatter_add(-1, indices, values)
    assert torch.equal(rebuilt, dense)
    counts = (dense != 0).sum(-1)
    k = getattr(sae.activation, "k", None)
    if isinstance(sae.activation, TopKActivation):
        assert values.shape[-1] == k  # every row holds exactly k entries
    else:  # width: the largest count of active latents among the rows; the rest pads with 0
        assert values.shape[-1] == int(counts.max()) and int(counts.min()) < int(counts.max())
    assert torch.equal((values != 0).sum(-1), counts)
    # active entries in ascending latent order within each row
    active = torch.where(values != 0, indices, torch.full_like(indices, -1))
    for row in active.reshape(-1, active.shape[-1]):
        kept = row[row >= 0]
        assert torch.equal(kept, kept.sort().values)


def test_d_sae_is_an_alias_of_n_latents_everywhere(tmp_path):
    a = S.TopKSAE(d_in=6, d_sae=20, k=3)
    assert a.cfg.n_latents == 20 and a.W_dec.shape == (20, 6)
    assert "d_sae" not in a.cfg.to_dict()  # stored once, as n_latents
    assert S.TopKConfig(d_in=6, d_sae=20, k=3) == a.cfg
    assert S.build("relu", d_in=6, d_sae=12).cfg.n_latents == 12
    assert S.TopKSAE(a.cfg, d_sae=24).cfg.n_latents == 24  # replaces the config's value
    with pytest.raises(PrismaError, match=r"n_latents=20 and d_sae=21 disagree"):
        S.TopKSAE(d_in=6, n_latents=20, d_sae=21, k=3)
    with pytest.raises(PrismaError, match=r"needs n_latents \(or its alias d_sae\)"):
        S.TopKSAE(d_in=6, k=3)
    S.TopKSAE(d_in=6, d_sae=20, n_latents=20, k=3)  # both, agreeing, is fine
    a.save(tmp_path / "a")
    cfg = tmp_path / "a" / "cfg.json"
    data = json.loads(cfg.read_text())
    data["config"]["d_sae"] = data["config"].pop("n_latents")
    cfg.write_text(json.dumps(data))
    assert S.from_pretrained(tmp_path / "a").cfg == a.cfg
    data["config"]["n_latents"] = 19
    cfg.write_text(json.dumps(data))
    with pytest.raises(PrismaError, match=r"cfg.json: n_latents=19 and d_sae=20 disagree"):
        S.load(tmp_path / "a")


def test_config_values_are_checked_against_their_types():
    with pytest.raises(PrismaError, match=r"TopKConfig: k must be int, got '8' \(str\)"):
        S.TopKSAE(d_in=6, n_latents=20, k="8")
    with pytest.raises(PrismaError, match=r"apply_b_dec_to_input must be bool, got 1"):
        S.ReLUSAE(d_in=6, n_latents=20, apply_b_dec_to_input=1)
    with pytest.raises(PrismaError, match=r"group_sizes must be list\[int\] \| None"):
        S.MatryoshkaSAE(d_in=6, n_latents=4, group_sizes=[2, "2"])
    assert S.ReLUSAE(d_in=6, n_latents=20, l1_coefficient=3).cfg.l1_coefficient == 3  # int ok


@pytest.mark.parametrize("name", list(SPARSE_FAMILIES))
def test_wrong_sizes_give_one_line_naming_both(name):
    sae = SPARSE_FAMILIES[name]().eval()
    if name == "crosscoder":
        bad, want = torch.randn(3, 2, 5), r"input of shape \(3, 2, 5\) must end in \(2, 4\)"
    else:
        bad, want = torch.randn(3, 7), r"the input's last dimension is 7 .*d_in is 8"
    target = torch.randn(3, 5) if name == "transcoder" else None
    for call in (sae.encode, sae.encode_sparse, lambda v: sae(v, target)):
        with pytest.raises(PrismaError, match=want) as err:
            call(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(
        PrismaError, match=r"decode: the code's last dimension is 31 .*n_latents is 32"
    ):
        sae.decode(torch.zeros(3, 31))
    if name in ("topk", "transcoder"):
        x = torch.randn(3, 8)
        with pytest.raises(PrismaError, match=r"the target's last dimension is 9 .*d_out is"):
            sae(x, torch.randn(3, 9))
        d_out = sae.d_out
        with pytest.raises(PrismaError, match=r"holds 6 rows, the input 3"):
            sae(x, torch.randn(6, d_out))


@pytest.mark.parametrize("normalization", ["prisma", "sparsify"])
def test_auxk_normalisation_options_match_hand_computation(normalization):
    sae = _randomise(
        S.TopKSAE(
            d_in=8, n_latents=32, k=3, dead_tokens_threshold=100, k_aux=5,
            auxk_normalization=normalization,
        )
    ).train()  # fmt: skip
    x = _x(16)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 9]] = True  # 3 dead latents, fewer than k_aux = 5
    sae.tracker.tokens_since_fired[dead] = 100
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = torch.where(dead, pre, torch.tensor(-torch.inf)).topk(3, dim=1)
    e = (x - out.recon).detach()
    e_hat = torch.zeros_like(pre).scatter(1, idx, vals.relu()) @ sae.W_dec
    error = (e_hat - e).pow(2).sum()
    if normalization == "prisma":  # the residual's variance
        want = error / (e - e.mean(0)).pow(2).sum()
    else:  # sparsify: the target's variance, scaled by min(dead / k_aux, 1) = 3 / 5
        want = 0.6 * error / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.losses["auxk"], want.detach())
    torch.testing.assert_close(out.loss, out.losses["fvu"] + want / 32, rtol=1e-5, atol=1e-6)


def test_sae_modules_import_without_cycles_or_local_dodges():
    import ast
    from pathlib import Path

    folder = Path(S.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prisma_mm.sae"):
                target = node.module.removeprefix("prisma_mm.sae").lstrip(".")
                deps |= {target} if target else {alias.name for alias in node.names}
        graph[path.stem] = deps & {p.stem for p in folder.glob("*.py")}
        if path.stem in ("base", "io", "kernels", "code", "files"):
            local = [
                n.module
                for fn in ast.walk(tree)
                if isinstance(fn, ast.FunctionDef)
                for n in ast.walk(fn)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("prisma_mm.sae")
            ]
            assert not local, f"{path.name} imports {local} inside a function"
    assert "io" not in graph["base"] and "base" not in graph["kernels"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph[start]
        )

    for module in graph:
        if module != "__init__":
            assert not reaches(module, module, {module}), f"import cycle through sae/{module}.py"


def test_families_register_by_name_and_subclasses_keep_signature_not_the_name():
    class Custom(S.TopKSAE):
        """A user's variant that names no architecture of its own."""

    assert S.ARCHITECTURES["topk"] is S.TopKSAE  # the variant does not take over "topk"
    params = inspect.signature(Custom).parameters
    assert {"d_in", "n_latents", "d_sae", "k", "seed"} <= set(params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["k"].annotation is int and params["k"].default == 32
    assert Custom(S.TopKConfig(d_in=4, n_latents=8, k=2)).cfg.k == 2  # a config positionally
