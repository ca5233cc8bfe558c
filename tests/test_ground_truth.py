"""Ground-truth scoring: AUROC / F1 / AP pinned to hand-computed values, perfect and random
dictionaries on toy-world labels, splitting and composition on a constructed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prisma_mm.analysis.ground_truth import (
    auroc,
    average_precision,
    average_ranks,
    best_f1,
    score_ground_truth,
    score_level,
)
from prisma_mm.data.toyworld import VALUE_NAMES, render_arrays
from prisma_mm.errors import PrismaError


def pairwise_auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Reference: the fraction of (positive, negative) pairs ordered right, ties one half."""
    pos, neg = score[label == 1], score[label == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_auroc_hand_computed():
    scores = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
    labels = torch.tensor([[0], [0], [1], [1]])
    assert auroc(scores, labels).item() == pytest.approx(0.75)
    # ties: positives {1, 2}, negatives {1, 0}: pairs 0.5 + 1 + 1 + 1 over 4
    tied = torch.tensor([[1.0], [1.0], [2.0], [0.0]])
    assert auroc(tied, torch.tensor([[1], [0], [1], [0]])).item() == pytest.approx(0.875)


def test_average_ranks_ties():
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [3.0, 5.0], [2.0, 0.0]])
    ranks = average_ranks(x)
    assert ranks[:, 0].tolist() == [3.5, 1.0, 3.5, 2.0]
    assert ranks[:, 1].tolist() == [2.0, 2.0, 4.0, 2.0]


def test_auroc_matches_pairwise_reference_with_chunks():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, size=(300, 7)).astype(np.float32)  # many ties, like sparse codes
    codes[:, 3] = rng.normal(size=300)
    labels = (rng.random((300, 4)) < [0.1, 0.5, 0.3, 0.9]).astype(np.uint8)
    labels[:, 2] |= (codes[:, 2] > 2).astype(np.uint8)  # one informative pair
    got = auroc(codes, labels, chunk_elements=600)  # 2 latents per chunk
    want = np.array(
        [[pairwise_auroc(codes[:, j], labels[:, v]) for v in range(4)] for j in range(7)]
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert got[2, 2] > 0.8


def test_auroc_unscorable_value_is_nan():
    codes = torch.randn(10, 3)
    labels = torch.zeros(10, 2)
    labels[:5, 1] = 1
    out = auroc(codes, labels)
    assert torch.isnan(out[:, 0]).all() and not torch.isnan(out[:, 1]).any()


def test_best_f1_and_average_precision_hand_computed():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]).unsqueeze(1)
    labels = torch.tensor([1, 0, 1, 1, 0]).unsqueeze(1)
    f1, thr = best_f1(scores, labels)
    assert f1.item() == pytest.approx(6 / 7)  # top 4: tp 3, 2*3 / (4 + 3)
    assert thr.item() == pytest.approx(0.6)
    assert average_precision(scores, labels).item() == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # tied scores share one threshold: {1, 1} cannot be split
    f1, thr = best_f1(torch.tensor([[1.0], [1.0], [0.0]]), torch.tensor([[1], [0], [1]]))
    assert f1.item() == pytest.approx(0.8) and thr.item() == 0.0
    ap = average_precision(torch.tensor([[1.0], [1.0], [0.0]]), torch.tensor([[1], [0], [1]]))
    assert ap.item() == pytest.approx((0.5 + 2 / 3) / 2)


@pytest.fixture(scope="module")
def world():
    return render_arrays(48, seed=3, patch_grid=8, progress=False)


def test_exact_factor_directions_score_perfectly(world):
    patches = torch.from_numpy(world["patches"]).float()  # [48, 8, 8, V]
    n_values = patches.shape[-1]
    d = 64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    directions = q[:n_values]  # orthonormal factor directions [V, d]
    # seeded, so that the result does not depend on which tests ran before: with 24 images a
    # half, another latent can tie with a value's own on the first half, and the noise breaks it
    noise = torch.randn(*patches.shape[:-1], d, generator=torch.Generator().manual_seed(0))
    acts = patches @ directions + 0.01 * noise
    codes = torch.relu(acts @ directions.T)  # a dictionary whose latents are the directions
    report = score_ground_truth(
        VALUE_NAMES,
        patch_codes=codes.reshape(48, 64, -1),
        patch_labels=patches.reshape(48, 64, -1),
        image_labels=world["labels"],
    )
    for level in (report.patch, report.image):
        scorable = level.scorable
        assert scorable.sum() >= n_values - 2  # (a rare value may be absent from 48 images)
        assert torch.all(level.auroc[scorable] == 1.0)
        assert torch.equal(level.best_latent[scorable], torch.arange(n_values)[scorable])
        assert torch.all(level.f1[scorable] == 1.0)
        assert level.fraction_detected == 1.0
    # one latent per value, except that the outer ("large") object covers most patches of a
    # nested pair, so the size=large latent also detects inside=yes at patch level
    inside, large = VALUE_NAMES.index("inside=yes"), VALUE_NAMES.index("size=large")
    others = [v for v in range(n_values) if v != inside and report.patch.scorable[v]]
    assert report.patch.n_detecting[others].eq(1).all()
    assert report.patch.n_detecting[inside] == 2
    assert report.patch.n_factors_per_latent.tolist() == [
        2 if v == large else 1 for v in range(n_values)
    ]
    assert report.image.splitting == 1.0 and report.image.composition == 0.0
    assert report.score == 1.0
    assert report.summary()["image_recovery"] == 1.0


def test_random_dictionary_scores_near_chance(world):
    patches = torch.from_numpy(world["patches"]).reshape(-1, len(VALUE_NAMES))
    codes = torch.relu(
        torch.randn(patches.shape[0], 96, generator=torch.Generator().manual_seed(1))
    )
    report = score_ground_truth(VALUE_NAMES, patch_codes=codes, patch_labels=patches)
    assert report.image is None
    # the latent chosen on one half of the rows is at chance on the other half
    assert report.score < 0.08
    heldout = report.patch.heldout_auroc[~torch.isnan(report.patch.heldout_auroc)]
    assert abs(float(heldout.mean()) - 0.5) < 0.03
    assert report.patch.fraction_detected == 0.0
    assert math.isnan(report.patch.splitting) and math.isnan(report.patch.composition)
    mean_auroc = report.summary()["patch_mean_auroc"]
    assert 0.53 < mean_auroc < 0.62  # the best of 96 chance latents sits above 0.5 in-sample


def test_splitting_and_composition_constructed():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(400, generator=g) < 0.4).float()
    y = (torch.rand(400, generator=g) < 0.3).float()
    labels = torch.stack([x, y, x], 1)  # b=z always co-occurs with a=x
    noise = 0.01 * torch.randn(400, 4, generator=g)
    codes = torch.stack([x, 2 * x, y, torch.rand(400, generator=g)], 1) + noise
    level = score_level(codes, labels, ["a=x", "a=y", "b=z"])
    assert level.n_detecting.tolist() == [2, 1, 2]
    assert level.n_values_per_latent.tolist() == [2, 2, 1, 0]
    assert level.n_factors_per_latent.tolist() == [2, 2, 1, 0]
    assert level.splitting == pytest.approx(5 / 3)
    assert level.composition == pytest.approx(2 / 3)
    assert level.fraction_detected == 1.0


def test_user_errors():
    with pytest.raises(PrismaError, match="rows"):
        auroc(torch.randn(5, 2), torch.ones(4, 1))
    with pytest.raises(PrismaError, match="value names"):
        score_level(torch.randn(5, 2), torch.ones(5, 3), ["a=1"])
    with pytest.raises(PrismaError, match="together"):
        score_ground_truth(["a=1"], patch_codes=torch.randn(5, 2))
    with pytest.raises(PrismaError, match="max over patches"):
        score_ground_truth(["a=1"], image_labels=torch.ones(5, 1))
