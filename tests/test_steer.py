"""Classifier steering: no-op interventions are bit-identical; adding a feature moves the hook
activation by exactly strength x mean activation x decoder row; ablation with the error term
kept; a toyvit colour feature moves that colour's logit; the logit / accuracy report by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import prisma_mm
from prisma_mm.data.toyworld import VALUE_INDEX, VALUE_NAMES, ToyWorld, collate
from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.sae import ReLUSAE, TopKSAE, Transcoder, fit_simple
from prisma_mm.steer import (
    AddFeature,
    EditFeatures,
    ablate,
    steer,
    steering_effect,
    token_mask,
)

HOOK = "blocks.3.hook_resid_post"
RED = VALUE_INDEX["colour=red"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    """toyvit, 300 held-out toy-world images, their activations at HOOK and a TopK SAE
    trained on them (a few seconds)."""
    model = prisma_mm.load_model("toyvit")
    world = ToyWorld(300, seed=0, start=200_000)
    images, labels = collate([world[i] for i in range(len(world))])
    x = model.preprocess(list(images.numpy()))
    with torch.no_grad():
        _, cache = model.run_with_cache(x, [HOOK])
    rows = cache[HOOK].reshape(-1, model.d_model)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield rows[torch.randint(0, rows.shape[0], (1024,), generator=gen)]

    torch.manual_seed(0)
    sae = TopKSAE(d_in=model.d_model, n_latents=256, k=8)
    fit_simple(sae, batches(), steps=300, lr=2e-3, progress=False)
    sae.eval()
    sae.metadata["hook"] = HOOK
    with torch.no_grad():
        code = sae.encode(rows).reshape(len(world), model.layout.n_tokens, -1)
    fired = code > 0
    mean_active = (code * fired).sum((0, 1)) / fired.sum((0, 1)).clamp_min(1)
    index = SimpleNamespace(mean_active=mean_active.double(), meta={"cache": {"hook": HOOK}})
    return SimpleNamespace(
        model=model,
        x=x,
        labels=labels["multi_hot"].float(),
        acts=cache[HOOK],
        sae=sae,
        code=code,
        index=index,
    )


def read_hook(model, x, hook=HOOK):
    """The activation at ``hook`` as the forward sees it after any attached edits."""
    seen = {}
    with model.hooks({hook: lambda act, _h: seen.__setitem__("act", act.detach().clone())}):
        out = model(x)
    return out, seen["act"]


def test_noop_interventions_are_bit_identical(toy):
    x = toy.x[:12]
    with torch.no_grad():
        clean = toy.model(x)
        nothing = [
            AddFeature(toy.sae, [3, 5], 0.0, scale=toy.index),
            EditFeatures(toy.sae, {3: 1.0, 7: 1.0}),
            AddFeature(toy.sae, 3, 0.0, scale=2.0, hook=None, mask=token_mask(toy.model.layout)),
        ]
        with steer(toy.model, nothing):
            steered = toy.model(x)
        with steer(toy.model, AddFeature(toy.sae, 3, 1e-3, scale=toy.index)):
            nudged = toy.model(x)
    assert torch.equal(clean, steered)
    assert all(item.calls == 0 for item in nothing)  # they returned None: nothing was touched
    assert not torch.equal(clean, nudged)  # the same path with a tiny strength does change it


def test_edit_that_changes_no_code_value_is_bit_identical_through_the_math(toy):
    # latent 0 made unable to fire: ablating it goes through encode -> delta, which is exactly 0
    sae = TopKSAE(d_in=toy.sae.cfg.d_in, n_latents=256, k=8)
    sae.load_state_dict(toy.sae.state_dict())
    sae.eval()
    sae.metadata["hook"] = HOOK
    with torch.no_grad():
        sae.b_enc[0] = -1e4
        clean = toy.model(toy.x[:12])
        edit = ablate(sae, 0)
        assert torch.equal(edit.delta(toy.acts[:12]), torch.zeros_like(toy.acts[:12]))
        with steer(
            toy.model,
            [edit, AddFeature(sae, 4, 2.0, scale=1.0, mask=torch.zeros(65, dtype=torch.bool))],
        ):
            steered = toy.model(toy.x[:12])
    assert edit.calls == 1  # the edit ran (not short-circuited) and still changed no bit
    assert torch.equal(clean, steered)


def test_add_feature_moves_the_activation_by_strength_times_mean_active(toy):
    x, latent, strength = toy.x[:6], int(toy.code.sum((0, 1)).argmax()), 2.5
    mask = token_mask(toy.model.layout, patches=torch.eye(8, dtype=torch.bool))  # the diagonal
    _, before = read_hook(toy.model, x)
    with (
        torch.no_grad(),
        steer(toy.model, AddFeature(toy.sae, latent, strength, scale=toy.index, mask=mask)),
    ):
        _, after = read_hook(toy.model, x)
    row = toy.sae.W_dec[latent].detach()
    assert float(row.norm()) == pytest.approx(1.0, abs=1e-5)  # TopK keeps unit decoder rows
    expected = strength * float(toy.index.mean_active[latent]) * row
    assert torch.allclose(after[:, mask] - before[:, mask], expected.expand(6, 8, -1), atol=1e-5)
    assert torch.equal(after[:, ~mask], before[:, ~mask])  # tokens outside the mask untouched
    # a hook after the steered one sees the change; the one before does not
    _, upstream = read_hook(toy.model, x, "blocks.3.hook_resid_mid")
    with torch.no_grad(), steer(toy.model, AddFeature(toy.sae, latent, strength, scale=toy.index)):
        _, upstream_steered = read_hook(toy.model, x, "blocks.3.hook_resid_mid")
    assert torch.equal(upstream, upstream_steered)


def test_add_feature_scales_the_decoder_row_as_decoded_not_its_unit_direction(toy):
    # ReLU SAEs keep non-unit rows (init norm 0.1): strength 1 at scale s adds what a code value
    # s contributes to the reconstruction, s * W_dec[i]
    sae = ReLUSAE(d_in=128, n_latents=32)
    sae.metadata["hook"] = HOOK
    x = toy.x[:2]
    _, before = read_hook(toy.model, x)
    with torch.no_grad(), steer(toy.model, AddFeature(sae, [1, 2], [1.0, -2.0], scale=[3.0, 0.5])):
        _, after = read_hook(toy.model, x)
    expected = 3.0 * sae.W_dec[1].detach() - 1.0 * sae.W_dec[2].detach()
    assert float(sae.W_dec[1].detach().norm()) == pytest.approx(0.1, rel=1e-4)
    # one float32 rounding of the sum, at the residual's own scale (toyvit's reaches about 40)
    ulp = torch.finfo(torch.float32).eps * float(before.abs().max())
    assert torch.allclose(after - before, expected.expand_as(after), rtol=0, atol=2 * ulp)
    assert not torch.allclose(after - before, 0.5 * expected.expand_as(after), rtol=0, atol=2 * ulp)


def test_ablation_keeps_the_error_term_and_re_encodes_to_zero_for_an_orthonormal_sae(toy):
    # tied, orthonormal TopK SAE: pre(x') = pre(x) - c_i e_i, so latent i re-encodes to exactly
    # 0 (up to rounding) and every other pre-activation is unchanged
    d = toy.model.d_model
    sae = TopKSAE(d_in=d, n_latents=64, k=4)
    q, _ = torch.linalg.qr(torch.randn(d, 64, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_dec.copy_(toy.acts.reshape(-1, d).mean(0))
    sae.eval()
    sae.metadata["hook"] = HOOK
    x = toy.x[:8]
    _, before = read_hook(toy.model, x)
    with torch.no_grad():
        code = sae.encode(before.reshape(-1, d))
        latent = int((code > 0).sum(0).argmax())
        with steer(toy.model, ablate(sae, latent)):
            out, after = read_hook(toy.model, x)
        code_after = sae.encode(after.reshape(-1, d))
        pre_before, pre_after = (
            sae.pre_acts(before.reshape(-1, d)),
            sae.pre_acts(after.reshape(-1, d)),
        )
    fired = code[:, latent] > 0
    assert int(fired.sum()) > 20
    assert float(code_after[:, latent].abs().max()) < 1e-4
    others = torch.arange(64) != latent
    assert torch.allclose(pre_after[:, others], pre_before[:, others], atol=1e-4)
    # x' = x - c_i W_dec[i]: the error term x - recon(x) is kept
    removed = code[:, latent : latent + 1] * sae.W_dec[latent].detach()
    assert torch.allclose(after.reshape(-1, d), before.reshape(-1, d) - removed, atol=1e-5)


def test_ablation_of_a_trained_feature_changes_the_output_with_the_error_kept(toy):
    x = toy.x[:16]
    d = toy.model.d_model
    latent = int((toy.code[:16] > 0).sum((0, 1)).argmax())
    with torch.no_grad():
        clean, before = read_hook(toy.model, x)
        with steer(toy.model, EditFeatures(toy.sae, {latent: 0.0})):
            steered, after = read_hook(toy.model, x)
        code = toy.sae.encode(before.reshape(-1, d))
        edited = code.clone()
        edited[:, latent] = 0
        by_definition = before.reshape(-1, d) + toy.sae.decode(edited) - toy.sae.decode(code)
        recode = toy.sae.encode(after.reshape(-1, d))
    assert torch.allclose(after.reshape(-1, d), by_definition, atol=1e-4)
    assert float((steered - clean).abs().max()) > 0.05
    # what holds exactly: x' - x = -c_i W_dec[i], so the ablated latent's pre-activation
    # becomes pre_i (1 - w_enc_i . W_dec[i]) where it fired (TopK codes are pre-activations);
    # whether it still fires then depends on the other latents competing for the k slots
    fired = code[:, latent] > 0
    overlap = float(toy.sae.W_enc[:, latent].detach() @ toy.sae.W_dec[latent].detach())
    pre_after = toy.sae.pre_acts(after.reshape(-1, d))[:, latent]
    assert 0.3 < overlap < 1.0  # a trained encoder row is not the decoder row's dual
    assert torch.allclose(pre_after[fired], code[fired, latent] * (1 - overlap), atol=1e-4)
    assert float(recode[:, latent].sum()) < (1 - overlap) * float(code[:, latent].sum()) + 1e-4
    # doubling it instead moves the activation the other way along the same row
    with torch.no_grad(), steer(toy.model, EditFeatures(toy.sae, {latent: 2.0})):
        _, doubled = read_hook(toy.model, x)
    assert torch.allclose(doubled - before, -(after - before), atol=1e-4)


def red_feature(toy) -> int:
    """The latent whose max over patches correlates best with the image's colour=red label."""
    score = toy.code[:, toy.model.layout.n_prefix :].amax(1)
    label = toy.labels[:, RED]
    s, lab = score - score.mean(0), label - label.mean()
    corr = (s * lab[:, None]).sum(0) / (s.norm(dim=0) * lab.norm()).clamp_min(1e-9)
    assert float(corr.max()) > 0.8  # the SAE really has a red detector
    return int(corr.argmax())


def test_steering_a_colour_feature_moves_that_colours_logit(toy):
    latent = red_feature(toy)
    patches = token_mask(toy.model.layout, patches=torch.ones(8, 8, dtype=torch.bool))
    no_red = toy.labels[:, RED] == 0
    add = AddFeature(toy.sae, latent, 1.0, scale=toy.index, mask=patches)
    effect = steering_effect(
        toy.model, add, [(toy.x[no_red][:60], toy.labels[no_red][:60])], class_names=VALUE_NAMES
    )
    assert effect.multi_label and effect.n_images == 60
    assert effect.top_classes(1)[0][0] == "colour=red"
    assert float(effect.logit_delta[RED]) > 2.0
    assert float(effect.predicted_clean[RED]) < 0.1 < 0.5 < float(effect.predicted_steered[RED])
    assert effect.accuracy_change < 0  # calling red what is not red costs accuracy
    # the opposite sign on images with red pushes red down
    red = toy.labels[:, RED] == 1
    remove = AddFeature(toy.sae, latent, -1.0, scale=toy.index, mask=patches)
    effect = steering_effect(toy.model, remove, [(toy.x[red][:40], toy.labels[red][:40])])
    assert float(effect.logit_delta[RED]) < -2.0
    assert float(effect.predicted_steered[RED]) < float(effect.predicted_clean[RED])


def test_steering_effect_matches_a_hand_computation():
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    sae = TopKSAE(d_in=32, n_latents=16, k=2)
    sae.metadata["hook"] = "blocks.1.hook_resid_post"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (10,), generator=gen)
    add = AddFeature(sae, 5, 4.0, scale=1.5)
    with torch.no_grad():
        clean = model(x)
        with steer(model, add):
            steered = model(x)
    effect = steering_effect(model, [add], [(x[:4], y[:4]), (x[4:], y[4:])])
    assert not effect.multi_label and effect.n_images == 10
    assert torch.allclose(effect.logit_delta, (steered - clean).mean(0), atol=1e-5)
    assert effect.accuracy_clean == pytest.approx(float((clean.argmax(1) == y).float().mean()))
    assert effect.accuracy_steered == pytest.approx(float((steered.argmax(1) == y).float().mean()))
    assert effect.top1_agreement == pytest.approx(
        float((clean.argmax(1) == steered.argmax(1)).float().mean())
    )
    predicted = torch.bincount(steered.argmax(1), minlength=10).float() / 10
    assert torch.allclose(effect.predicted_steered, predicted)
    for c in range(10):
        of_c = y == c
        recall = effect.class_accuracy_steered[c]
        if of_c.any():
            assert float(recall) == pytest.approx(
                float((steered[of_c].argmax(1) == c).float().mean())
            )
        else:
            assert torch.isnan(recall)
    assert effect.to_dict()["accuracy_change"] == pytest.approx(effect.accuracy_change)
    assert add.calls == 1  # steer() resets on entry: one block per batch, one forward each


def test_hooks_are_removed_after_an_error_in_the_block(toy):
    x = toy.x[:3]
    with torch.no_grad():
        clean = toy.model(x)
        with (
            pytest.raises(RuntimeError, match="boom"),
            steer(toy.model, AddFeature(toy.sae, 1, 5.0, scale=1.0)),
        ):
            raise RuntimeError("boom")
        assert torch.equal(toy.model(x), clean)


def test_token_mask_maps_through_the_layout(toy):
    layout = toy.model.layout
    cls_only = token_mask(layout, prefix=True)
    assert cls_only.tolist() == [True] + [False] * 64
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[2, 5] = True
    mask = token_mask(layout, patches=grid)
    assert mask.nonzero().flatten().tolist() == [1 + 2 * 8 + 5]
    with pytest.raises(PrismaError, match="patch grid"):
        token_mask(layout, patches=torch.ones(4, 4, dtype=torch.bool))
    # a time-fastest video layout (TimeSformer): the chosen patch is the token that maps back
    video = TokenLayout(n_prefix=1, grid=(3, 2, 4), patch_size=(8, 8), input_size=(16, 32),
                        order="hwt")  # fmt: skip
    cube = torch.zeros(3, 2, 4, dtype=torch.bool)
    cube[1, 0, 2] = True
    (token,) = token_mask(video, patches=cube).nonzero().flatten().tolist()
    assert video.token_to_patch(token) == (1, 0, 2) and token != 1 + 1 * 8 + 0 * 4 + 2


def test_bad_steering_inputs_are_refused_before_the_forward(toy):
    unrecorded = ReLUSAE(d_in=128, n_latents=8)  # no hook in its metadata
    with pytest.raises(PrismaError, match="does not record its hook"):
        AddFeature(unrecorded, 1, 1.0, scale=1.0)
    far = AddFeature(unrecorded, 1, 1.0, scale=1.0, hook="blocks.9.hook_resid_post")
    with pytest.raises(PrismaError, match="unknown hook"), steer(toy.model, far):
        pytest.fail("the block must not run")
    assert far.calls == 0
    with pytest.raises(PrismaError, match="trained on 'blocks.3.hook_resid_post'"):
        AddFeature(toy.sae, 1, 1.0, scale=1.0, hook="blocks.2.hook_resid_post")
    with pytest.raises(PrismaError, match="outside 0..255"):
        EditFeatures(toy.sae, {256: 0.0})
    dead = SimpleNamespace(mean_active=torch.zeros(256, dtype=torch.float64), meta={})
    with pytest.raises(PrismaError, match="no positive mean activation"):
        AddFeature(toy.sae, 7, 1.0, scale=dead)
    other = SimpleNamespace(
        mean_active=toy.index.mean_active, meta={"cache": {"hook": "blocks.1.hook_resid_post"}}
    )
    with pytest.raises(PrismaError, match="feature index was built at"):
        AddFeature(toy.sae, 7, 1.0, scale=other)
    with pytest.raises(PrismaError, match=r"expected \[256\]"):
        AddFeature(toy.sae, 7, 1.0, scale=torch.ones(10))
    transcoder = Transcoder(d_in=128, n_latents=16, k=2)
    with pytest.raises(PrismaError, match="reconstructs another hook"):
        ablate(transcoder, 0, hook=HOOK)
    with pytest.raises(PrismaError, match="mask"):
        with (
            torch.no_grad(),
            steer(
                toy.model,
                AddFeature(toy.sae, 1, 1.0, scale=1.0, mask=torch.ones(9, dtype=torch.bool)),
            ),
        ):
            toy.model(toy.x[:1])


def test_multi_label_report_matches_a_hand_computation():
    torch.manual_seed(0)
    model = prisma_mm.load_model("tiny-vit", weights=None)
    sae = TopKSAE(d_in=32, n_latents=16, k=2)
    sae.metadata["hook"] = "blocks.1.hook_resid_post"
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 32, 32, generator=gen)
    y = (torch.rand(6, 10, generator=gen) > 0.5).float()
    add = AddFeature(sae, [2, 9], [3.0, -2.0], scale=[1.0, 2.0])
    with torch.no_grad():
        clean = model(x)
        with steer(model, add):
            steered = model(x)
    effect = steering_effect(model, add, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert effect.multi_label
    right = ((steered > 0) == (y > 0.5)).float()
    assert effect.accuracy_steered == pytest.approx(float(right.mean()))
    assert effect.accuracy_clean == pytest.approx(float(((clean > 0) == (y > 0.5)).float().mean()))
    assert torch.allclose(effect.class_accuracy_steered, right.mean(0))
    assert torch.allclose(effect.predicted_steered, (steered > 0).float().mean(0))
    assert torch.allclose(effect.logit_delta, (steered - clean).mean(0), atol=1e-5)
    with pytest.raises(PrismaError, match="same kind of labels"):
        steering_effect(model, add, [(x[:3], y[:3]), (x[3:], y[3:, 0].long())])


def test_interventions_compose_at_one_hook_and_across_hooks(toy):
    x = toy.x[:4]
    first = AddFeature(toy.sae, 10, 1.0, scale=2.0)
    second = AddFeature(toy.sae, 11, -0.5, scale=4.0)
    both = AddFeature(toy.sae, [10, 11], [1.0, -0.5], scale=[2.0, 4.0])
    with torch.no_grad():
        with steer(toy.model, [first, second]):
            _, stacked = read_hook(toy.model, x)
        with steer(toy.model, both):
            _, at_once = read_hook(toy.model, x)
    assert torch.allclose(stacked, at_once, atol=1e-5)
    # interventions at two hooks (another SAE, declared hook) both act in one forward
    other = ReLUSAE(d_in=128, n_latents=8)
    early = AddFeature(other, 3, 1.0, scale=1.0, hook="blocks.1.hook_resid_post")
    with torch.no_grad():
        with steer(toy.model, [first, early]):
            toy.model(x)
    assert first.calls == 1 and early.calls == 1  # each hook fired once in one forward
