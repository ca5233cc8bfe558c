"""SAE stitching on a constructed pair whose novel latents are known, for every family; the
closed-form insertion test against brute force; the ends of the sequence are S and L."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prisma_mm.analysis.metrics import evaluate
from prisma_mm.analysis.stitching import (
    Stitcher,
    classify_latents,
    decoder_cosines,
    plot_stitching,
    stitch,
    stitch_plan,
)
from prisma_mm.errors import PrismaError
from prisma_mm.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

D = 32


pytestmark = pytest.mark.usefixtures("one_thread")


E = torch.eye(D)
# the world: a "parent" direction e0 that comes with one of two children (e10 or e11), nine
# plain features e1..e9 and five features e20..e24 the small SAE lacks
DOG, CAT = E[0] + 0.5 * E[10], E[0] + 0.5 * E[11]
EVENTS = torch.stack([DOG, CAT, *E[1:10], *E[20:25]])  # 16 events


def world(n: int = 600, seed: int = 0) -> torch.Tensor:
    """Rows with 3 events each, magnitudes in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.stack([torch.randperm(16, generator=gen)[:3] for _ in range(n)])
    mags = 0.5 + torch.rand(n, 3, generator=gen)
    return (mags[..., None] * EVENTS[pick]).sum(1)


def make(cls, enc: torch.Tensor, dec: torch.Tensor, **kwargs):
    sae = cls(d_in=D, n_latents=dec.shape[0], **kwargs)
    with torch.no_grad():
        sae.W_enc.copy_(enc.T)
        sae.W_dec.copy_(dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if hasattr(sae.activation, "threshold"):
            sae.activation.threshold.fill_(0.01)  # JumpReLU thetas / the BatchTopK threshold
    return sae.eval()


def constructed_pair(cls, **kwargs):
    """S: e0 (the parent) and e1..e9. L: copies of e1..e9, the two children as split
    versions of e0 (cos 0.894), and the five novel e20..e24; L's latents shuffled."""
    small_dec = torch.stack([E[0], *E[1:10]])
    dog, cat = DOG / DOG.norm(), CAT / CAT.norm()
    gain = math.sqrt(1.25) / 0.5  # the child's coordinate gives the whole event's magnitude
    large_dec = torch.stack([*E[1:10], dog, cat, *E[20:25]])
    large_enc = torch.stack([*E[1:10], E[10] * gain, E[11] * gain, *E[20:25]])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    novel = sorted(int((perm == j).nonzero()) for j in range(11, 16))
    children = sorted(int((perm == j).nonzero()) for j in (9, 10))
    small = make(cls, small_dec, small_dec, **kwargs)
    large = make(cls, large_enc[perm], large_dec[perm], **kwargs)
    return small, large, novel, children


FAMILIES = [
    (ReLUSAE, {}, "relu"),
    (JumpReLUSAE, {}, "jumprelu"),
    (BatchTopKSAE, {"k": 4}, "jumprelu"),
    (TopKSAE, {"k": 4}, "topk"),
]


@pytest.mark.parametrize("cls,kwargs,family", FAMILIES, ids=[f[0].__name__ for f in FAMILIES])
def test_constructed_pair(cls, kwargs, family, tmp_path):
    small, large, novel, children = constructed_pair(cls, **kwargs)
    x = world()
    result = stitch(small, large, x, progress=False, max_points=None)
    assert result.family == family
    classes = result.classes
    assert np.flatnonzero(classes.novel_test).tolist() == novel
    assert np.flatnonzero(classes.novel_proxy).tolist() == novel
    assert classes.agreement == 1.0
    # the children match the parent at cos 1/sqrt(1.25); copies at 1; novel ones at 0
    np.testing.assert_allclose(classes.max_cosine[children], 1 / math.sqrt(1.25), atol=1e-6)
    np.testing.assert_allclose(classes.max_cosine[novel], 0.0, atol=1e-6)
    assert (classes.best_match[children] == 0).all()
    # 5 insertions, then 10 swaps: the parent for its two children, and 9 copies
    kinds = [s.kind for s in result.steps]
    assert kinds == ["insert"] * 5 + ["swap"] * 10
    parent_group = [s for s in result.steps if s.remove_small == [0]]
    assert len(parent_group) == 1 and parent_group[0].add_large == children
    # the curve starts at S, ends at L (which reconstructs this world exactly), never rises
    mse = [row["mse"] for row in result.curve]
    assert mse[0] == pytest.approx(evaluate(small, [x], progress=False).mse, rel=1e-6)
    assert mse[-1] < 1e-10 and result.mse_large < 1e-10
    assert result.monotone and result.n_increases == 0
    assert all(b < a for a, b in zip(mse[:6], mse[1:6]))  # each novel latent helps
    assert [row["n_latents"] for row in result.curve][::5] == [10, 15, 15, 16]
    png = plot_stitching(result, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert result.to_dict()["classes"]["n_novel_test"] == 5


@pytest.mark.parametrize("cls,kwargs", [(f[0], f[1]) for f in FAMILIES])
def test_insertion_deltas_match_brute_force(cls, kwargs):
    torch.manual_seed(0)
    x = torch.randn(300, 16) + 0.5
    pair = []
    for n, seed in [(12, 1), (24, 2)]:
        sae = cls(d_in=16, n_latents=n, seed=seed, **kwargs)
        with torch.no_grad():
            sae.b_dec.copy_(0.3 * torch.randn(16))  # exercises the input-centring fold
            sae.b_enc.copy_(0.2 * torch.randn(n))
            if hasattr(sae.activation, "threshold"):
                sae.activation.threshold.fill_(0.1)
        pair.append(sae.eval())
    small, large = pair
    classes = classify_latents(small, large, x)
    stitcher = Stitcher(small, large)
    base = stitcher.build(range(12), [])
    base_mse = evaluate(base, [x], progress=False).mse
    assert base_mse == pytest.approx(evaluate(small, [x], progress=False).mse, rel=1e-5)
    assert classes.mse_small == pytest.approx(base_mse, rel=1e-5)
    brute = [
        evaluate(stitcher.build(range(12), [j]), [x], progress=False).mse - base_mse
        for j in range(24)
    ]
    np.testing.assert_allclose(classes.delta_mse, brute, atol=1e-6)
    # the last member is L itself: same reconstruction
    steps = stitch_plan(classes, decoder_cosines(large, small))
    last = stitcher.member(steps, len(steps))
    with torch.no_grad():
        want = large(x).recon
        got = last(x).recon
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_proxy_split_and_errors():
    small, large, novel, _ = constructed_pair(ReLUSAE)
    x = world(200)
    by_proxy = stitch(small, large, x, use="proxy", max_points=4, progress=False)
    assert len(by_proxy.curve) == 4 and by_proxy.curve[-1]["step"] == len(by_proxy.steps)
    topk = TopKSAE(d_in=D, n_latents=8, k=2)
    with pytest.raises(PrismaError, match="TopK"):
        classify_latents(topk, large, x)
    with pytest.raises(PrismaError, match="data sample"):
        classify_latents(small, large, torch.randn(5, 7))
    uncalibrated = BatchTopKSAE(d_in=D, n_latents=8, k=2)
    with pytest.raises(PrismaError, match="threshold"):
        Stitcher(uncalibrated, large)


@pytest.mark.parametrize("cls,kwargs,family", FAMILIES, ids=[f[0].__name__ for f in FAMILIES])
def test_latents_that_never_fire_are_inactive(cls, kwargs, family):
    """Three extra latents of L read directions the data never has (e30, e31, e29), so they
    never fire on the sample. One decodes to a copy of an S latent, one to a direction S lacks:
    neither is a reconstruction latent (their insertion changes nothing: ΔMSE = 0) nor novel."""
    small, large, novel, _ = constructed_pair(cls, **kwargs)
    extra_enc = torch.stack([E[30], E[31], E[29]])
    extra_dec = torch.stack([E[1], E[26], (E[2] + E[27]) / math.sqrt(2)])
    grown = make(
        cls,
        torch.cat([large.W_enc.detach().T, extra_enc]),
        torch.cat([large.W_dec.detach(), extra_dec]),
        **kwargs,
    )
    inactive = [16, 17, 18]
    x = world()
    result = stitch(small, grown, x, progress=False, max_points=None)
    classes = result.classes
    assert np.flatnonzero(classes.inactive).tolist() == inactive
    assert np.flatnonzero(classes.novel_test).tolist() == novel
    np.testing.assert_array_equal(classes.delta_mse[inactive], 0.0)
    assert not classes.reconstruction_test[inactive].any()
    assert not classes.novel_proxy[inactive].any()  # e26 has cosine 0 with S, yet no verdict
    counts = classes.counts()
    assert counts == {
        "n_novel_test": 5,
        "n_reconstruction_test": 11,
        "n_inactive": 3,
        "n_novel_proxy": 5,
        "n_fired_small": 10,
        "n_small": 10,
        "n_fired_large": 16,
        "n_large": 19,
    }
    assert classes.confusion()["inactive"] == 3 and classes.agreement == 1.0
    assert result.to_dict()["classes"]["n_inactive"] == 3
    # inactive latents come last, in one step that leaves the sample's MSE unchanged
    assert [s.kind for s in result.steps] == ["insert"] * 5 + ["swap"] * 10 + ["inactive"]
    assert result.steps[-1].add_large == inactive
    mse = [row["mse"] for row in result.curve]
    assert mse[-1] == pytest.approx(mse[-2], abs=1e-12) and mse[-1] < 1e-10
    assert result.curve[-1]["n_latents"] == 19 and result.monotone


def test_all_reconstruction_latents_inactive_still_ends_at_large():
    """When no latent of L is an active reconstruction latent, the inactive ones are added
    before the remaining S latents are dropped, so no member is left without latents."""
    small = make(ReLUSAE, torch.stack([E[0], E[1]]), torch.stack([E[0], E[1]]))
    large = make(ReLUSAE, torch.stack([E[2], E[30], E[31]]), torch.stack([E[2], E[0], E[1]]))
    x = torch.rand(50, D) * torch.cat([torch.ones(3), torch.zeros(D - 3)])
    result = stitch(small, large, x, progress=False, max_points=None)
    assert [s.kind for s in result.steps] == ["insert", "inactive", "remove"]
    assert np.flatnonzero(result.classes.inactive).tolist() == [1, 2]
    assert [row["n_latents"] for row in result.curve] == [2, 3, 5, 3]
    assert result.curve[-1]["mse"] == pytest.approx(result.mse_large, abs=1e-9)
