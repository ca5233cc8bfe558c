"""The meta-SAE decomposition score: pinned to a hand-computed case, and on a planted
dictionary (pure part latents and latents that are sums of two parts) it scores high while
its shuffled control scores low."""

from __future__ import annotations

import pytest
import torch

from prisma_mm.analysis.meta_sae import decomposition_score, train_meta_sae
from prisma_mm.errors import PrismaError
from prisma_mm.sae import ReLUSAE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decomposition_score_by_hand():
    # latents: 0 red, 1 circle, 2 red circle (the target), 3 another red one, 4 unlabelled
    codes = torch.tensor([[1.0, 0], [0, 1.0], [0.6, 0.5], [0.8, 0], [0, 0.3]])
    carried = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    got = decomposition_score(codes, carried, [(2, [0, 1])], value_names=["red", "circle"],
                              n_shuffles=50)  # fmt: skip
    # meta 0's other members {0, 3} are both red: 1; meta 1's {1, 4}: one circle in two: 1/2
    assert got.score == pytest.approx(0.75)
    assert got.fraction_decomposed == 1.0
    assert got.latents == [
        {
            "latent": 2,
            "meta": [0, 1],
            "parts": [
                {"value": "red", "share": 1.0, "meta_latent": 0},
                {"value": "circle", "share": 0.5, "meta_latent": 1},
            ],
        }
    ]
    assert 0 < got.p_value <= 1 and got.n_shuffles == 50 and got.n_targets == 1
    again = decomposition_score(codes, carried, [(2, [0, 1])], n_shuffles=50)
    assert again.shuffled_score == got.shuffled_score  # seeded control
    # a target on no meta-latent, or whose meta-latents have no other member, scores 0
    lonely = torch.tensor([[1.0, 0], [0, 0]])
    assert decomposition_score(lonely, carried[:2], [(1, [0])], n_shuffles=5).score == 0.0
    assert decomposition_score(lonely, carried[:2], [(0, [0])], n_shuffles=5).score == 0.0


def test_decomposition_score_refuses_bad_input():
    codes, carried = torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(PrismaError, match="same latents"):
        decomposition_score(codes, carried[:2], [(0, [1])])
    with pytest.raises(PrismaError, match="outside"):
        decomposition_score(codes, carried, [(3, [1])])
    with pytest.raises(PrismaError, match="part is outside"):
        decomposition_score(codes, carried, [(0, [4])])
    with pytest.raises(PrismaError, match="n_shuffles"):
        decomposition_score(codes, carried, [(0, [1])], n_shuffles=0)


def planted(d: int = 32, n_colours: int = 6, n_shapes: int = 6):
    """A dictionary of pure colour latents, pure shape latents and every colour + shape sum
    (unit decoder rows), the values each carries, and the sums as targets with their parts."""
    generator = torch.Generator().manual_seed(0)
    parts = torch.linalg.qr(torch.randn(d, n_colours + n_shapes, generator=generator))[0].T
    rows, carried, targets = [], [], []
    for v in range(n_colours + n_shapes):
        rows.append(parts[v])
        carried.append([v])
    for c in range(n_colours):
        for s in range(n_colours, n_colours + n_shapes):
            targets.append((len(rows), [c, s]))
            rows.append(parts[c] + parts[s])
            carried.append([c, s])
    sae = ReLUSAE(d_in=d, n_latents=len(rows))
    weights = torch.stack(rows)
    with torch.no_grad():
        sae.W_dec.copy_(weights / weights.norm(dim=1, keepdim=True))
    hot = torch.zeros(len(rows), n_colours + n_shapes, dtype=torch.bool)
    for i, values in enumerate(carried):
        hot[i, values] = True
    return sae, hot, targets


def test_planted_parts_score_high_and_their_shuffled_control_low():
    sae, carried, targets = planted()
    result = train_meta_sae(sae, k=2, n_meta=12, steps=250, seed=0, progress=False)
    assert result.fvu < 0.3  # the parts are found: 2 meta-latents rebuild every sum
    got = decomposition_score(result.codes, carried, targets, n_shuffles=100)
    assert got.score > 0.6 and got.fraction_decomposed > 0.5
    assert got.shuffled_score < 0.35 and got.shuffled_fraction_decomposed < 0.1
    assert got.p_value <= 0.02
    # the same meta-SAE against carried values unrelated to the parts: no better than chance
    scrambled = carried[
        torch.randperm(carried.shape[0], generator=torch.Generator().manual_seed(1))
    ]
    control = decomposition_score(result.codes, scrambled, targets, n_shuffles=100)
    assert control.score < 0.4 and control.p_value > 0.05
