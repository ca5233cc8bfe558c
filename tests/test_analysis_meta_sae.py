"""Meta-SAEs: decoder rows built as sparse sums of a few base directions; the meta-latents
must find those directions, and the export must agree with the codes."""

from __future__ import annotations

import json

import pytest
import torch

from prisma_mm.analysis.meta_sae import decoder_rows, train_meta_sae
from prisma_mm.errors import PrismaError
from prisma_mm.sae import TopKSAE, load

pytestmark = pytest.mark.usefixtures("one_thread")


def compositional(n: int = 96, d: int = 32, n_base: int = 8, seed: int = 0):
    """A TopK SAE whose decoder rows are sums of 2 or 3 of ``n_base`` random unit base
    directions with weights in [0.5, 1.5), and the base directions and the sets used."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n_base, d, generator=gen)
    base = base / base.norm(dim=1, keepdim=True)
    rows, sets = [], []
    for _ in range(n):
        size = 2 + int(torch.rand(1, generator=gen) < 0.5)
        idx = torch.randperm(n_base, generator=gen)[:size]
        weights = 0.5 + torch.rand(size, generator=gen)
        rows.append((weights[:, None] * base[idx]).sum(0))
        sets.append(set(idx.tolist()))
    sae = TopKSAE(d_in=d, n_latents=n, k=4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack(rows))
    sae.metadata["hook"] = "blocks.0.hook_resid_post"
    return sae, base, sets


def test_meta_latents_find_the_base_directions(tmp_path):
    sae, base, sets = compositional()
    result = train_meta_sae(sae, steps=300, lr=3e-3, progress=False)  # k=4, n_meta = 96 // 4
    assert result.n_meta == 24 and result.meta.cfg.k == 4
    directions = result.meta_directions()
    best_cos, best_meta = (base @ directions.T).max(1)
    assert int((best_cos >= 0.9).sum()) >= 7  # most of the 8 base directions are recovered
    assert result.fvu < 0.1
    # a latent built from base b uses the meta-latent that found b, for most (latent, b) pairs
    hits = total = 0
    for i, used in enumerate(sets):
        metas = {m for m, _ in result.decomposition(i)}
        for b in used:
            if best_cos[b] >= 0.9:
                total += 1
                hits += int(best_meta[b].item() in metas)
    assert hits / total >= 0.8
    # a random meta-dictionary of the same size does not find them
    random_dirs = torch.randn(24, 32, generator=torch.Generator().manual_seed(5))
    random_dirs = torch.nn.functional.normalize(random_dirs, dim=1)
    assert int(((base @ random_dirs.T).max(1).values >= 0.9).sum()) == 0

    # the export agrees with the codes, both ways
    export = result.to_dict()
    assert export["meta"]["n_meta"] == 24 and len(export["latents"]) == 96
    for entry in export["latents"][:10]:
        for m, w in entry["meta"]:
            assert w == pytest.approx(float(result.codes[entry["latent"], m]), abs=1e-6)
    members = {m["meta"]: {i for i, _ in m["latents"]} for m in export["meta_latents"]}
    for i, entry in enumerate(export["latents"]):
        for m, _ in entry["meta"]:
            assert i in members[m]
    path = result.save(tmp_path / "out")
    assert json.loads(path.read_text())["meta"]["fvu"] == pytest.approx(result.fvu)
    reloaded = load(tmp_path / "out" / "meta_sae")
    torch.testing.assert_close(reloaded.encode(decoder_rows(sae)), result.codes)


def test_meta_sae_options_and_errors():
    sae, _, _ = compositional(n=40)
    result = train_meta_sae(sae, n_meta=6, k=2, steps=20, decoder_bias=True, progress=False)
    assert result.n_meta == 6 and result.meta.cfg.k == 2
    plain = train_meta_sae(sae, n_meta=6, k=2, steps=20, progress=False)
    assert torch.count_nonzero(plain.meta.b_dec) == 0  # no decoder bias by default
    with pytest.raises(PrismaError, match="k must be"):
        train_meta_sae(sae, n_meta=3, k=4, steps=5, progress=False)
    # API mistakes are refused before training, each in one line
    for kwargs, message in [({"steps": 0}, "steps must be"), ({"lr": 0.0}, "lr must be"),
                            ({"seed": -1}, "seed must be"), ({"n_meta": 0}, "n_meta must be"),
                            ({"batch_size": 41}, "batch_size must be")]:  # fmt: skip
        with pytest.raises(PrismaError, match=message):
            train_meta_sae(sae, **{"steps": 5, "progress": False, **kwargs})
    with torch.no_grad():
        sae.W_dec[0].zero_()
    with pytest.raises(PrismaError, match="zero"):
        decoder_rows(sae)
