"""Units of prisma_mm.train without a cache: metric formulas pinned to hand-computed values, the
learning-rate schedule, batch splitting, dictionary specs and signatures, firing statistics,
the datamodule's arguments and resume state, and bf16 autocast with fp32 master weights."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

import prisma_mm.sae
from prisma_mm.analysis.metrics import split_batch
from prisma_mm.errors import PrismaError
from prisma_mm.sae import Dictionary, MatryoshkaSAE, Output, TopKSAE, Transcoder
from prisma_mm.train import ActivationDataModule, DictionaryUpdate, FiringStats, SAEModule
from prisma_mm.train.module import lr_factor
from prisma_mm.train.spec import build_dictionary, dictionary_spec


# ---- schedule and batches -----------------------------------------------------------------------
def test_lr_factor_warmup_plateau_and_decays():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(50, 100, warmup_steps=10) == 1.0
    assert lr_factor(90, 100, decay="linear", decay_start=0.8) == pytest.approx(0.5)
    assert lr_factor(90, 100, decay="linear", decay_start=0.8, min_lr_ratio=0.1) == pytest.approx(
        0.55
    )
    assert lr_factor(100, 100, decay="linear", decay_start=0.8) == pytest.approx(0.0)
    assert lr_factor(90, 100, decay="cosine", decay_start=0.8) == pytest.approx(0.5)
    assert lr_factor(85, 100, decay="cosine", decay_start=0.8) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25))
    )
    assert lr_factor(99, 100, decay="constant") == 1.0
    with pytest.raises(PrismaError, match="unknown lr decay"):
        lr_factor(90, 100, decay="step")


def test_split_batch_per_family():
    sae = TopKSAE(d_in=4, n_latents=8, k=2)
    transcoder = Transcoder(d_in=4, n_latents=8, k=2)
    crosscoder = prisma_mm.sae.Crosscoder(d_in=4, n_sources=3, n_latents=8, k=2)
    x, target = split_batch(sae, torch.zeros(5, 4))
    assert x.shape == (5, 4) and target is None
    x, target = split_batch(sae, torch.zeros(5, 1, 4))  # one hook read as a list of one
    assert x.shape == (5, 4) and target is None
    pair = torch.arange(40.0).reshape(5, 2, 4)
    x, target = split_batch(transcoder, pair)
    assert torch.equal(x, pair[:, 0]) and torch.equal(target, pair[:, 1])
    x, target = split_batch(crosscoder, torch.zeros(5, 3, 4))
    assert x.shape == (5, 3, 4) and target is None
    with pytest.raises(PrismaError, match="single hook"):
        split_batch(sae, torch.zeros(5, 2, 4))
    with pytest.raises(PrismaError, match=r"\[input_hook, output_hook\]"):
        split_batch(transcoder, torch.zeros(5, 4))
    with pytest.raises(PrismaError, match="list of its sources"):
        split_batch(crosscoder, torch.zeros(5, 4))


# ---- dictionaries in recipes and checkpoints -----------------------------------------------------
def test_dictionary_spec_round_trips_every_family():
    for architecture, cls in prisma_mm.sae.ARCHITECTURES.items():
        kwargs = {"d_in": 8, "n_latents": 16}
        if architecture != "relu" and architecture != "jumprelu":
            kwargs["k"] = 4
        if architecture == "matryoshka":
            kwargs["group_sizes"] = [4, 4, 8]  # its `activation` field is derived, not init
        dictionary = cls(**kwargs)
        spec = dictionary_spec(dictionary)
        assert spec["class_path"] == f"{cls.__module__}.{cls.__name__}"
        rebuilt = build_dictionary(spec)
        assert type(rebuilt) is cls and rebuilt.cfg == dictionary.cfg
    with pytest.raises(PrismaError, match="not a prisma_mm Dictionary"):
        build_dictionary({"class_path": "torch.nn.Linear", "init_args": {}})


def test_every_family_exposes_its_config_fields_to_jsonargparse():
    for cls in prisma_mm.sae.ARCHITECTURES.values():
        params = inspect.signature(cls).parameters
        assert {"d_in", "n_latents", "normalize_decoder", "seed"} <= set(params), cls
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Dictionary, "dictionary")
    cfg = parser.parse_args(
        [
            "--dictionary=prisma_mm.sae.MatryoshkaSAE",
            "--dictionary.init_args.d_in=8",
            "--dictionary.init_args.n_latents=16",
            "--dictionary.init_args.k=4",
            "--dictionary.init_args.group_sizes=[8, 8]",
        ]
    )
    built = parser.instantiate(cfg).dictionary
    assert isinstance(built, MatryoshkaSAE) and built.cfg.group_sizes == [8, 8]
    with pytest.raises(Exception, match="k_typo"):
        parser.parse_args(["--dictionary=prisma_mm.sae.TopKSAE", "--dictionary.init_args.k_typo=3"])


# ---- firing statistics --------------------------------------------------------------------------
class _Module:
    def __init__(self, n_latents: int) -> None:
        self.dictionary = TopKSAE(d_in=2, n_latents=n_latents, k=1)
        self.logged: dict[str, float] = {}

    def log_dict(self, values, batch_size=None):
        self.logged.update(values)


def _step(stats: FiringStats, module: _Module, code: torch.Tensor) -> dict[str, float]:
    out = Output(recon=torch.zeros(code.shape[0], 2), code=code)
    DictionaryUpdate().on_train_batch_end(None, module, {"output": out}, None, 0)
    stats.on_train_batch_end(None, module, {"output": out}, None, 0)
    return dict(module.logged)


def test_firing_stats_count_dead_and_dense_latents_in_tokens():
    module = _Module(n_latents=4)
    stats = FiringStats(dead_window_tokens=6, dense_threshold=0.3, dense_window_tokens=100)
    stats.setup(None, module, "fit")
    first = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    logged = _step(stats, module, first)
    assert logged["train/dead_fraction_6_tokens"] == 0.0  # 4 tokens < window of 6
    second = torch.tensor([[1.0, 0, 0, 0]] * 4)
    logged = _step(stats, module, second)
    # tokens since fired: [0, 4, 8, 8] -> latents 2 and 3 dead; frequencies [1, 1/8, 0, 0]
    assert logged["train/dead_fraction_6_tokens"] == pytest.approx(0.5)
    assert logged["train/dense_fraction"] == pytest.approx(0.25)
    # one tracker: the counts live in the dictionary (what AuxK reads), checkpointed with it
    tracker = module.dictionary.tracker
    assert tracker.tokens_since_fired.tolist() == [0, 4, 8, 8]
    assert tracker.dead_mask(6).tolist() == [False, False, True, True]

    resumed_module = _Module(n_latents=4)
    resumed_module.dictionary.load_state_dict(module.dictionary.state_dict())
    resumed = FiringStats(dead_window_tokens=6, dense_threshold=0.3, dense_window_tokens=100)
    resumed.load_state_dict(stats.state_dict())
    resumed.setup(None, resumed_module, "fit")
    third = torch.tensor([[0.0, 1, 0, 0]] * 2)
    logged = _step(resumed, resumed_module, third)
    assert logged["train/dead_fraction_6_tokens"] == pytest.approx(0.5)
    assert resumed_module.dictionary.tracker.tokens_since_fired.tolist() == [2, 0, 10, 10]


def test_firing_stats_default_window_is_the_auxk_window():
    module = _Module(n_latents=4)
    module.dictionary = TopKSAE(d_in=2, n_latents=4, k=1, dead_tokens_threshold=3_000_000)
    stats = FiringStats()
    stats.setup(None, module, "fit")
    logged = _step(stats, module, torch.tensor([[1.0, 0, 0, 0]]))
    assert set(logged) == {"train/dead_fraction_3M_tokens", "train/dense_fraction"}
    assert module.dictionary.tracker.tokens_since_fired.tolist() == [0, 1, 1, 1]


# ---- datamodule arguments and resume state --------------------------------------------------------
def test_datamodule_rejects_bad_arguments_with_one_line(tmp_path):
    with pytest.raises(PrismaError, match="data.hooks is empty"):
        ActivationDataModule(str(tmp_path), hooks=[])
    with pytest.raises(PrismaError, match="eval_fraction"):
        ActivationDataModule(str(tmp_path), hooks="blocks.0.hook_resid_post", eval_fraction=1.0)
    dm = ActivationDataModule(str(tmp_path / "nowhere"), hooks="blocks.0.hook_resid_post")
    with pytest.raises(PrismaError, match="no manifest.json.*prisma-mm cache"):
        _ = dm.d_in


def test_datamodule_resume_state_with_other_settings_restarts_at_a_pass(tmp_path):
    dm = ActivationDataModule(str(tmp_path), hooks="h", batch_size=64, seed=3, num_workers=2)
    state = {
        **dm._order_settings(),
        "trained_batches": 10,
        "pass_lengths": [[4, 4]],
        "positions": [{"pass": 2, "batches": [1, 1]}],
    }
    dm.load_state_dict(state)
    assert dm._resume_pass_lengths == [4, 4]
    assert (dm._start.number, dm._start.first_batch, dm._start.start) == (2, 8, [1, 1])
    other = ActivationDataModule(str(tmp_path), hooks="h", batch_size=128, seed=3, num_workers=2)
    with pytest.warns(UserWarning, match="data order differs"):
        other.load_state_dict(state)
    assert other._resume_pass_lengths == [0, 0]
    assert (other._start.number, other._start.first_batch, other._start.start) == (2, 10, [0, 0])
    # a checkpoint written before reader positions were recorded: the next pass too
    older = ActivationDataModule(str(tmp_path), hooks="h", batch_size=64, seed=3, num_workers=2)
    with pytest.warns(UserWarning, match="without reader positions"):
        older.load_state_dict({k: v for k, v in state.items() if k != "positions"})
    assert older._start.number == 2 and older._start.start == [0, 0]


# ---- the module ---------------------------------------------------------------------------------
def test_bf16_autocast_keeps_fp32_master_weights_and_normalized_decoder(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 16, generator=gen)
    loader = DataLoader(rows, batch_size=16)
    module = SAEModule(
        TopKSAE(d_in=16, n_latents=32, k=4),
        lr=1e-2,
        lr_warmup_steps=0,
        autocast_dtype="bfloat16",
    )
    before = module.dictionary.W_dec.detach().clone()
    autocast_seen: list[tuple[bool, torch.dtype]] = []
    module.dictionary.register_forward_pre_hook(
        lambda mod, args: autocast_seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        )
    )
    trainer = Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert autocast_seen == [(True, torch.bfloat16)] * 4  # the dictionary ran under autocast
    for name, param in module.dictionary.named_parameters():
        assert param.dtype == torch.float32, name
    w_dec = module.dictionary.W_dec.detach()
    assert not torch.allclose(w_dec, before)  # it trained
    torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(32), rtol=0, atol=1e-5)
    assert int(module.tokens_seen) == 64 and bool(module.initialized)
    # no datamodule: nothing to initialise from, and the dictionary is saved all the same
    saved = prisma_mm.sae.load(tmp_path / "dictionary")
    torch.testing.assert_close(saved.W_dec, w_dec)


def test_module_needs_a_training_length(tmp_path):
    module = SAEModule(TopKSAE(d_in=4, n_latents=8, k=2), lr_warmup_steps=0)
    trainer = Trainer(
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    endless = DataLoader(_Endless(), batch_size=None)
    with pytest.raises(PrismaError, match="trainer.max_steps or model.total_tokens"):
        trainer.fit(module, train_dataloaders=endless)
    assert module.lr == pytest.approx(2e-4 / math.sqrt(8 / 2**14))  # the default scaling rule


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(4, 4)
