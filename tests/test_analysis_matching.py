"""Hungarian matching of decoder directions: a permuted copy matches perfectly; hand-made
cosine matrices pin the assignment and the shared fractions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prisma_mm.analysis.matching import match_dictionaries, match_rows
from prisma_mm.errors import PrismaError
from prisma_mm.sae import BatchTopKSAE, TopKSAE


def test_permuted_copy_matches_perfectly(tmp_path):
    a = TopKSAE(d_in=16, n_latents=40, k=4, seed=3)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    b = TopKSAE(d_in=16, n_latents=40, k=4, seed=9)
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec[perm] * 2.5)  # scale does not matter: unit rows are compared
    result = match_dictionaries(a, b)
    # latent perm[j] of A is latent j of B
    inverse = torch.argsort(perm).numpy()
    np.testing.assert_array_equal(result.pairs_b, inverse[result.pairs_a])
    np.testing.assert_allclose(result.cosine, 1.0, atol=1e-5)
    assert result.n_shared == 40 and result.fraction_shared == 1.0
    saved = json.loads(result.save(tmp_path / "m.json").read_text())
    assert saved["fraction_shared"] == 1.0 and len(saved["pairs"]) == 40


def test_hand_made_cosines():
    # greedy would pair (0, 0) at 0.9, then (1, 2) at 0.2; the optimum is 0.8 + 0.85
    cos = np.array([[0.9, 0.8, 0.0], [0.85, 0.1, 0.2]])
    result = match_rows(cos, threshold=0.7)
    assert result.pairs_a.tolist() == [0, 1] and result.pairs_b.tolist() == [1, 0]
    np.testing.assert_allclose(result.cosine, [0.8, 0.85])
    d = result.to_dict()
    assert d["n_shared"] == 2 and d["fraction_shared"] == 1.0
    assert d["fraction_of_b_shared"] == pytest.approx(2 / 3)
    assert d["mean_best_cosine_a_in_b"] == pytest.approx((0.9 + 0.85) / 2)
    assert d["mean_best_cosine_b_in_a"] == pytest.approx((0.9 + 0.8 + 0.2) / 3)
    assert match_rows(cos, threshold=0.82).n_shared == 1


def test_different_architectures_and_errors():
    a = TopKSAE(d_in=8, n_latents=10, k=2)
    b = BatchTopKSAE(d_in=8, n_latents=20, k=2, seed=5)
    result = match_dictionaries(a, b)
    assert result.cosine.size == 10 and result.n_a == 10 and result.n_b == 20
    with pytest.raises(PrismaError, match="same hook"):
        match_dictionaries(a, TopKSAE(d_in=9, n_latents=10, k=2))
    with pytest.raises(PrismaError, match="threshold"):
        match_rows(np.eye(2), threshold=2.0)
