"""Spliced-in evaluation on tiny random models: the error-term identity for SAEs,
transcoders and crosscoders; exact and empty dictionaries pin the score to 1 and 0; CLIP
zero-shot; token selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sae_helpers import exact_sae as _exact_sae

import prisma_mm
from prisma_mm.analysis.spliced import Splice, reconstruct, spliced_eval, task_head
from prisma_mm.errors import PrismaError
from prisma_mm.sae import Crosscoder, ReLUSAE, TopKSAE, Transcoder

HOOK = "blocks.0.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return prisma_mm.load_model("tiny-vit", weights=None)


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def exact_sae(d: int) -> ReLUSAE:
    """recon = x exactly (see sae_helpers.exact_sae), recorded at HOOK."""
    return _exact_sae(d, HOOK)


def test_error_term_reproduces_clean_outputs_sae(vit, batches):
    sae = TopKSAE(d_in=32, n_latents=64, k=4)
    sae.metadata["hook"] = HOOK
    result = spliced_eval(vit, sae, batches, progress=False)
    assert result.max_abs_error_with_error < 1e-5
    assert result.modes["with_error"].kl < 1e-8
    assert result.modes["with_error"].top1_agreement == 1.0
    # the random SAE itself does change the outputs (so the identity is not vacuous)
    assert result.modes["spliced"].kl > 1e-4
    assert result.n_images == 8 and result.replaced == [HOOK]


def test_error_term_identity_transcoder_and_crosscoder(vit, batches):
    tc = Transcoder(d_in=32, n_latents=64, k=4)
    tc.metadata["hook"] = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    r_tc = spliced_eval(vit, tc, batches, progress=False, modes=("spliced", "with_error"))
    assert r_tc.replaced == ["blocks.0.hook_mlp_out"]
    assert r_tc.max_abs_error_with_error < 1e-5
    assert r_tc.modes["spliced"].kl > 0
    cc = Crosscoder(d_in=32, n_sources=2, n_latents=64, k=4)
    cc.metadata["hook"] = [HOOK, "blocks.1.hook_resid_post"]
    r_cc = spliced_eval(vit, cc, batches, progress=False)
    assert r_cc.replaced == cc.metadata["hook"]
    assert r_cc.max_abs_error_with_error < 1e-5
    assert r_cc.modes["spliced"].kl > 1e-4


def test_exact_dictionary_scores_one_and_empty_dictionary_scores_zero(vit, batches):
    exact = spliced_eval(vit, exact_sae(32), batches, progress=False)
    assert exact.modes["spliced"].ce == pytest.approx(exact.modes["clean"].ce, abs=1e-6)
    assert exact.modes["spliced"].kl < 1e-10
    assert exact.score_zero == pytest.approx(1.0, abs=1e-4)
    assert exact.score_mean == pytest.approx(1.0, abs=1e-4)
    assert exact.kl_score_zero == pytest.approx(1.0, abs=1e-6)
    empty = exact_sae(32)
    with torch.no_grad():
        empty.W_dec.zero_()
    zero = spliced_eval(vit, empty, batches, progress=False)
    assert zero.modes["spliced"].ce == pytest.approx(zero.modes["zero"].ce, abs=1e-6)
    assert zero.score_zero == pytest.approx(0.0, abs=1e-4)
    # cross-entropy of the clean run, by hand from the logits
    with torch.no_grad():
        logits = torch.cat([vit(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert zero.modes["clean"].ce == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    acc = float((logits.argmax(-1) == labels).float().mean())
    assert zero.modes["clean"].accuracy == pytest.approx(acc)


def test_mean_ablation_uses_the_given_means(vit, batches):
    sae = exact_sae(32)
    means = {HOOK: torch.zeros(32)}
    r = spliced_eval(vit, sae, batches, means=means, modes=("zero", "mean"), progress=False)
    assert r.modes["mean"].ce == pytest.approx(r.modes["zero"].ce, abs=1e-6)
    computed = Splice(vit, sae).means(batches, progress=False)[HOOK]
    _, cache = vit.run_with_cache(torch.cat([x for x, _ in batches]), [HOOK])
    torch.testing.assert_close(computed, cache[HOOK].double().mean((0, 1)))


def test_token_index_replaces_only_those_tokens(vit, batches):
    sae = exact_sae(32)
    with torch.no_grad():
        sae.W_dec.zero_()
    x = batches[0][0]
    n_tokens = vit.layout.n_tokens
    seen = {}
    splice = Splice(vit, sae, token_index=[0, 2])
    _, acts = splice.clean(x)
    fns = splice.hook_fns(splice.values("spliced", acts))

    def read(act, hook):
        seen["after"] = act.clone()

    with vit.hooks({HOOK: fns[HOOK], "blocks.1.hook_resid_pre": read}):
        vit(x)
    after = seen["after"]  # resid_pre of block 1 is resid_post of block 0, after the splice
    assert torch.all(after[:, [0, 2]] == 0)
    torch.testing.assert_close(after[:, 1], acts[HOOK][:, 1])
    assert after.shape[1] == n_tokens
    all_tokens = spliced_eval(vit, sae, batches, token_index=range(n_tokens), progress=False)
    none = spliced_eval(vit, sae, batches, progress=False)
    assert all_tokens.modes["spliced"].ce == pytest.approx(none.modes["spliced"].ce, abs=1e-7)


def test_clip_zero_shot(batches):
    torch.manual_seed(0)
    clip = prisma_mm.load_model("tiny-clip", weights=None)
    names = ["cat", "dog", "car"]
    templates = ("a photo of a {}.", "a {}")
    head = task_head(clip, names, templates=templates)
    assert head.kind == "clip" and head.text.shape == (3, clip.encode_text(["x"]).shape[1])
    torch.testing.assert_close(head.text.norm(dim=-1), torch.ones(3))
    images = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        embedding = clip(images)
    logits = head.logits(embedding)
    scale = float(clip.module.logit_scale.detach().exp())
    want = scale * F.normalize(embedding, dim=-1) @ head.text.T
    torch.testing.assert_close(logits, want)
    sae = TopKSAE(d_in=clip.d_model, n_latents=64, k=4)
    sae.metadata["hook"] = "blocks.1.hook_resid_post"
    labelled = [(x, y % 3) for x, y in batches]
    r = spliced_eval(clip, sae, labelled, class_names=names, templates=templates, progress=False)
    assert r.task == "clip"
    assert r.max_abs_error_with_error < 1e-4
    labels = torch.cat([y % 3 for _, y in batches])
    assert r.modes["clean"].ce == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    with pytest.raises(PrismaError, match="class names"):
        spliced_eval(clip, sae, labelled, progress=False)


def test_reconstruct_and_errors(vit):
    sae = exact_sae(32)
    x = torch.randn(10, 32)
    torch.testing.assert_close(reconstruct(sae, x, chunk=3), x)
    sae.metadata.pop("hook")
    with pytest.raises(PrismaError, match="hook"):
        Splice(vit, sae)
    tc = Transcoder(d_in=32, n_latents=8, k=2)
    tc.metadata["hook"] = ["blocks.1.hook_mlp_out", "blocks.0.ln2.hook_normalized"]
    with pytest.raises(PrismaError, match="after its input hook"):
        Splice(vit, tc)
    with pytest.raises(PrismaError, match="one-shot iterator"):
        spliced_eval(vit, exact_sae(32), iter([]), progress=False)
    with pytest.raises(PrismaError, match="unknown mode"):
        spliced_eval(vit, exact_sae(32), [], modes=("bogus",), progress=False)


def test_spliced_loss_function(vit, batches):
    from prisma_mm.analysis.spliced import make_spliced_loss

    loss = make_spliced_loss(vit, batches, hooks=HOOK)
    exact = exact_sae(32)
    clean_ce = spliced_eval(vit, exact, batches, modes=("spliced",), progress=False)
    assert loss(exact) == pytest.approx(clean_ce.modes["clean"].ce, abs=1e-6)
    sae = TopKSAE(d_in=32, n_latents=64, k=4)
    sae.metadata["hook"] = HOOK
    want = spliced_eval(vit, sae, batches, modes=("spliced",), progress=False)
    assert loss(sae) == pytest.approx(want.modes["spliced"].ce, rel=1e-6)
    kl = make_spliced_loss(vit, batches, hooks=HOOK, metric="kl")
    assert kl(sae) == pytest.approx(want.modes["spliced"].kl, rel=1e-6)


def test_multilabel_task_against_hand_computed_values(vit, batches):
    """task="multilabel": each output is its own sigmoid. Clean accuracy is the fraction of
    (image, class) decisions right, CE the mean binary cross-entropy, KL the Bernoulli KL
    summed over classes; the error term gives back the clean outputs."""
    gen = torch.Generator().manual_seed(2)
    labelled = [(x, torch.randint(0, 2, (x.shape[0], 10), generator=gen)) for x, _ in batches]
    sae = TopKSAE(d_in=32, n_latents=64, k=4, seed=3)
    sae.metadata["hook"] = HOOK
    result = spliced_eval(
        vit, sae, labelled, task="multilabel", modes=("spliced", "with_error"), progress=False
    )
    x = torch.cat([x for x, _ in labelled])
    y = torch.cat([y for _, y in labelled]).double()
    with torch.no_grad():
        clean = vit(x).double()
        with vit.hooks(
            {HOOK: lambda act, hook: reconstruct(sae, act.reshape(-1, 32)).reshape(act.shape)}
        ):
            spliced = vit(x).double()

    def bce(logits):
        return float(F.binary_cross_entropy_with_logits(logits, y))

    def bernoulli_kl(logits):
        p, q = torch.sigmoid(clean), torch.sigmoid(logits)
        kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        return float(kl.sum(1).mean())

    assert result.task == "multilabel"
    assert result.modes["clean"].accuracy == pytest.approx(
        float(((clean > 0) == (y > 0)).double().mean())
    )
    assert result.modes["clean"].ce == pytest.approx(bce(clean), rel=1e-6)
    assert result.modes["spliced"].ce == pytest.approx(bce(spliced), rel=1e-5)
    assert result.modes["spliced"].accuracy == pytest.approx(
        float(((spliced > 0) == (y > 0)).double().mean())
    )
    assert result.modes["spliced"].kl == pytest.approx(bernoulli_kl(spliced), rel=1e-4)
    assert result.modes["spliced"].kl > 1e-4  # the SAE changes the outputs
    assert result.modes["spliced"].top1_agreement == pytest.approx(
        float(((spliced > 0) == (clean > 0)).double().mean())
    )
    assert result.max_abs_error_with_error < 1e-5 and result.modes["with_error"].kl < 1e-8
    with pytest.raises(PrismaError, match="0/1"):
        spliced_eval(
            vit,
            sae,
            [(x, torch.full((8, 10), 2))],
            task="multilabel",
            modes=("spliced",),
            progress=False,
        )
    with pytest.raises(PrismaError, match="do not match"):
        spliced_eval(
            vit, sae, [(x, torch.ones(8, 3))], task="multilabel", modes=("spliced",), progress=False
        )
