"""Every architecture recovers known sparse directions from synthetic data.

Data: 128 unit directions in 64 dimensions (more features than dimensions); 32 "common"
features fire with probability 0.08 and 96 "rare" ones with 0.015 (about 4 active per sample),
magnitudes uniform in [0.5, 1.5); inputs are scaled so E||x||^2 = d. A true direction counts
as recovered when some decoder row has cosine >= 0.9 with it; each architecture must recover
>= 90% of them. The TopK family uses AuxK with a short dead window (10 batches).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import prisma_mm.sae as S

D, N_TRUE, N_LATENTS, BATCH, STEPS, LR = 64, 128, 256, 256, 500, 1e-2
DEAD = dict(dead_tokens_threshold=10 * BATCH)


pytestmark = pytest.mark.usefixtures("one_thread")


class World:
    """Sparse ground truth: ``sample(n) -> [n, 3, D]`` (sources 0, 1 and a target 2)."""

    def __init__(self, seed: int = 1) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(3, N_TRUE, D, generator=self.gen)
        self.dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        self.probs = torch.full((N_TRUE,), 0.015)
        self.probs[:32] = 0.08
        self.scale = 1.0
        self.scale = float(self.sample(4096)[:, 0].pow(2).sum(-1).mean().div(D).sqrt())

    def sample(self, n: int) -> torch.Tensor:
        coeffs = (torch.rand(n, N_TRUE, generator=self.gen) < self.probs).float()
        coeffs *= torch.rand(n, N_TRUE, generator=self.gen) + 0.5
        return torch.einsum("bn,snd->bsd", coeffs, self.dirs) / self.scale

    def batches(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.sample(BATCH)


def _recovered(rows: torch.Tensor, truth: torch.Tensor) -> float:
    rows = rows / rows.norm(dim=-1, keepdim=True)
    truth = truth / truth.norm(dim=-1, keepdim=True)
    return float(((truth @ rows.T).max(1).values >= 0.9).float().mean())


CASES = {
    "topk": dict(k=4, **DEAD),
    "topk-multi": dict(k=4, multi_topk=True, **DEAD),
    "batchtopk": dict(k=4, **DEAD),
    "relu": dict(l1_coefficient=1.0),
    "jumprelu": dict(l0_coefficient=1.0),
    "jumprelu-target": dict(target_l0=4.0, l0_coefficient=10.0, bandwidth=0.2),
    "matryoshka": dict(k=4, group_sizes=[32, 32, 64, 128], **DEAD),
    "matryoshka-k": dict(nesting="k", ks=[2, 4, 8], k=4, **DEAD),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sae_recovers_true_directions(name):
    world = World()
    sae = S.build(name.split("-")[0], d_in=D, n_latents=N_LATENTS, **CASES[name])
    S.fit_simple(sae, (x[:, 0] for x in world.batches()), STEPS, lr=LR, progress=False)
    assert _recovered(sae.W_dec.detach(), world.dirs[0]) >= 0.9
    out = sae.eval()(world.sample(1024)[:, 0])
    assert float(out.losses["fvu"]) < 0.2


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_transcoder_recovers_output_directions(activation):
    world = World()
    kwargs = dict(k=4, **DEAD) if activation == "topk" else dict(l1_coefficient=1.0)
    tc = S.Transcoder(d_in=D, n_latents=N_LATENTS, d_out=D, activation=activation, **kwargs)
    S.fit_simple(tc, ((x[:, 0], x[:, 2]) for x in world.batches()), STEPS, lr=LR, progress=False)
    assert _recovered(tc.W_dec.detach(), world.dirs[2]) >= 0.9


def test_crosscoder_recovers_joint_directions():
    world = World()
    cc = S.Crosscoder(d_in=D, n_sources=2, n_latents=N_LATENTS, k=4, **DEAD)
    S.fit_simple(cc, (x[:, :2] for x in world.batches()), STEPS, lr=LR, progress=False)
    joint = world.dirs[:2].permute(1, 0, 2).reshape(N_TRUE, -1)
    assert _recovered(cc.W_dec.detach().reshape(N_LATENTS, -1), joint) >= 0.9
