"""`prisma-mm train` end to end on a real tiny-vit cache written here: every recipe parses, every
tiny recipe trains and saves its dictionary, `validate` reproduces the last validation, a run
killed mid-way and resumed from its checkpoint ends with the same weights as an uninterrupted
one, and DDP on 2 CPU processes reads disjoint rows and matches a single process."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import prisma_mm.sae
from prisma_mm.train import SAEModule
from prisma_mm.train.cli import list_recipes, resolve_recipe, train_cli

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_post",
    "blocks.1.ln2.hook_normalized",
    "blocks.1.hook_mlp_out",
]
TINY_FAMILIES = ["topk", "batchtopk", "relu", "jumprelu", "matryoshka", "transcoder", "crosscoder"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


# ---- callbacks the training subprocesses load by class_path (PYTHONPATH=tests) ----------------
class KillAtStep(Callback):
    """Ends the process abruptly (no cleanup, like a kill) once the optimizer step given by
    $PRISMA_TEST_KILL_AT_STEP is done."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = int(os.environ.get("PRISMA_TEST_KILL_AT_STEP", "0"))
        if step and trainer.global_step == step:
            os._exit(17)


class RecordBatches(Callback):
    """Saves every train batch this process stepped on to $PRISMA_TEST_RECORD_DIR/rank<r>.pt."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch.detach().cpu().clone())

    def on_train_end(self, trainer, pl_module):
        out = Path(os.environ["PRISMA_TEST_RECORD_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.batches, out / f"rank{trainer.global_rank}.pt")


class RecordState(Callback):
    """Saves, per step, whether AuxK was in the loss and how many latents were dead to AuxK, and
    at the end the dictionary's whole state (weights, tracker, thresholds), to
    $PRISMA_TEST_RECORD_DIR/state<r>.pt."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dictionary = pl_module.dictionary
        window = getattr(dictionary.cfg, "dead_tokens_threshold", None)
        dead = int(dictionary.tracker.dead_mask(window).sum()) if window else 0
        auxk = outputs["output"].losses.get("auxk")
        self.steps.append({"dead": dead, "auxk": -1.0 if auxk is None else float(auxk)})

    def on_train_end(self, trainer, pl_module):
        out = Path(os.environ["PRISMA_TEST_RECORD_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.dictionary.state_dict().items()}
        torch.save({"state": state, "steps": self.steps}, out / f"state{trainer.global_rank}.pt")


# ---- helpers ----------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """64 random images through tiny-vit (17 tokens, d 32) at the four hooks the tiny recipes
    read: 1088 rows, one shard (so DDP splits rows, not shards)."""
    from prisma_mm.cache import write_cache

    out = tmp_path_factory.mktemp("cache") / "tiny-vit"
    write_cache("tiny-vit", _Images(), out, HOOKS, weights=None, shard_size=1000, progress=False)
    return out


def _fit(recipe: str, cache: Path, root: Path, *extra: str, subcommand: str = "fit"):
    args = [
        subcommand,
        "--config",
        recipe,
        f"--data.cache_dir={cache}",
        f"--trainer.default_root_dir={root}",
        *QUIET,
        *extra,
    ]
    return train_cli(args)


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _last(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# ---- recipes ----------------------------------------------------------------------------------
def test_every_recipe_parses_and_its_dictionary_config_is_valid():
    recipes = list_recipes()
    for family in TINY_FAMILIES:
        assert f"tiny-vit-{family}" in recipes
    real = [r for r in recipes if not r.startswith("tiny-vit-")]
    for name in ("clip-b32-topk-l8", "dinov2-b14-matryoshka-l11", "clip-b32-transcoder-l8"):
        assert name in real
    assert "clip-b32-crosscoder" in real
    for name in recipes:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            train_cli(["fit", "--config", name, "--print_config"])
        assert done.value.code == 0, name
        config = yaml.safe_load(out.getvalue())
        model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
        for member in model_args.get("members", {}).values():  # MultiSAEModule's
            assert member["hook"] in data_args["hooks"], name
        spec = model_args["dictionary"]
        module_name, _, class_name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        assert cls in prisma_mm.sae.ARCHITECTURES.values()
        init_args = dict(spec["init_args"])
        assert "d_in" not in init_args  # linked from the data at instantiation
        init_args.pop("n_sources", None)
        hooks = data_args["hooks"]
        # the family's own checks (k, group sizes, activation) without allocating weights
        cfg = cls.config_class(d_in=32 if name.startswith("tiny") else 768, **init_args)
        assert cfg.n_latents > 0
        if cls.architecture == "transcoder":
            assert len(hooks) == 2 and hooks[0].endswith("ln2.hook_normalized")
        if cls.architecture == "crosscoder":
            assert len(hooks) == (2 if name.startswith("tiny") else 12)
        # a real recipe tells how to make its cache (or, trained from a model, how to run it)
        text = Path(resolve_recipe(name)).read_text()
        from_model = config["data"]["class_path"].endswith("ModelActivationDataModule")
        assert ("prisma-mm train fit" if from_model else "prisma-mm cache") in text, name


def test_prisma_mm_train_reports_user_mistakes_in_one_line(capsys, tmp_path):
    from prisma_mm.cli import main

    assert main(["train", "fit", "--config", "tiny-vit-topc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "unknown recipe 'tiny-vit-topc'" in err[0] and "tiny-vit-topk" in err[0]
    )
    missing = tmp_path / "no-cache"
    assert main(["train", "fit", "--config", "tiny-vit-topk", f"--data.cache_dir={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prisma-mm: error: data.cache_dir") and "prisma-mm cache" in err[-1]


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_recipe_trains_logs_and_saves_its_dictionary(family, tiny_cache, tmp_path):
    cli = _fit(
        f"tiny-vit-{family}",
        tiny_cache,
        tmp_path,
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1",
    )
    run_dir = tmp_path / f"tiny-vit-{family}" / "version_0"
    assert Path(cli.trainer.log_dir) == run_dir
    assert cli.trainer.global_step == 6
    assert int(cli.model.tokens_seen) == 6 * 256
    assert cli.model.dictionary.cfg.d_in == 32  # linked from the cache
    rows = _metrics(run_dir)
    train_keys = ("fvu", "mse", "cosine_similarity", "l0", "loss", "dense_fraction", "lr")
    for key in (*train_keys, "dead_fraction_10M_tokens"):  # dead, named by its window
        assert f"train/{key}" in rows[0], key
    val_keys = ("fvu", "mse", "cosine_similarity", "l0", "dense_fraction", "loss/total")
    for key in (*val_keys, "dead_fraction_eval_split"):
        assert f"val/{key}" in rows[0], key
    assert _last(rows, "train/tokens_seen") == 6 * 256
    val_steps = [int(r["step"]) for r in rows if r.get("val/fvu")]
    assert val_steps == [2, 5]  # after optimizer steps 3 and 6
    assert all(0.0 < float(r["val/fvu"]) < 10.0 for r in rows if r.get("val/fvu"))
    assert list((run_dir).glob("events.out.tfevents.*"))  # TensorBoard beside the CSV
    assert (run_dir / "config.yaml").is_file()

    saved = prisma_mm.sae.load(run_dir / "dictionary")
    assert saved.architecture == cli.model.dictionary.architecture
    meta = saved.metadata
    assert meta["model"] == "tiny-vit" and meta["normalization"]["folded"] is True
    hooks = cli.datamodule.hooks
    assert meta["hook"] == (hooks[0] if len(hooks) == 1 else hooks)
    if family == "crosscoder":
        assert saved.cfg.n_sources == 2
    # the saved dictionary takes raw activations: on raw rows it gives what the trained one
    # gives on normalized rows, mapped back to raw units
    from prisma_mm.cache import ActivationDataset

    raw = next(iter(ActivationDataset(tiny_cache, hooks, batch_size=64, shuffle_buffer=0)))
    normalization = cli.datamodule.normalization
    mean = torch.stack([torch.as_tensor(normalization[h]["mean"]).float() for h in hooks])
    scale = torch.tensor([float(normalization[h]["scale"]) for h in hooks]).unsqueeze(-1)
    normed = (raw - mean) * scale  # [64, n_hooks, 32]
    if family == "transcoder":
        x_raw, x_norm, out = raw[:, 0], normed[:, 0], 1
    elif family == "crosscoder":
        x_raw, x_norm, out = raw, normed, slice(None)
    else:
        x_raw, x_norm, out = raw[:, 0], normed[:, 0], 0
    with torch.no_grad():
        expected = cli.model.dictionary.eval()(x_norm).recon / scale[out] + mean[out]
        got = saved.eval()(x_raw).recon
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_validate_reproduces_the_last_validation_of_fit(tiny_cache, tmp_path):
    _fit(
        "tiny-vit-topk",
        tiny_cache,
        tmp_path,
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
    )
    run_dir = tmp_path / "tiny-vit-topk" / "version_0"
    fit_fvu = _last(_metrics(run_dir), "val/fvu")
    ckpt = run_dir / "checkpoints" / "step=4.ckpt"
    assert ckpt.is_file()
    cli = _fit("tiny-vit-topk", tiny_cache, tmp_path, f"--ckpt_path={ckpt}", subcommand="validate")
    assert Path(cli.trainer.log_dir).name == "version_1"
    validated = cli.trainer.callback_metrics["val/fvu"].item()
    assert validated == pytest.approx(fit_fvu, rel=1e-5)


def test_resume_after_a_kill_gives_the_weights_of_an_uninterrupted_run(tiny_cache, tmp_path):
    # 12 steps of 256 rows: 3 batches per pass over the cache, so passes end mid-run;
    # checkpoints every 4 steps, validation every 5, killed after step 6 (2 steps lost)
    common = [
        "--config",
        "tiny-vit-batchtopk",
        f"--data.cache_dir={tiny_cache}",
        "--data.shuffle_buffer=512",
        "--model.total_tokens=3072",
        "--trainer.val_check_interval=5",
        "--trainer.callbacks.every_n_tokens=1024",
        "--trainer.callbacks.save_top_k=-1",
        *QUIET,
    ]
    _fit_args = ["fit", *common, f"--trainer.default_root_dir={tmp_path / 'whole'}"]
    whole = train_cli(_fit_args)
    assert whole.trainer.global_step == 12

    killed_root = tmp_path / "killed"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prisma_mm.train.cli",
            "fit",
            *common,
            f"--trainer.default_root_dir={killed_root}",
            "--trainer.callbacks+=test_train_cli.KillAtStep",
        ],
        env=_subprocess_env(PRISMA_TEST_KILL_AT_STEP="6"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    run_dir = killed_root / "tiny-vit-batchtopk" / "version_0"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step=*.ckpt")) == ["step=4.ckpt"]
    assert not (run_dir / "dictionary").exists()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert state["ActivationDataModule"]["trained_batches"] == 4
    assert state["ActivationDataModule"]["pass_lengths"] == [[3]]
    restored = SAEModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert type(restored.dictionary).__name__ == "BatchTopKSAE"
    assert torch.equal(restored.dictionary.W_dec, state["state_dict"]["dictionary.W_dec"])

    resumed = train_cli(
        [
            "fit",
            *common,
            f"--trainer.default_root_dir={killed_root}",
            f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    assert resumed.trainer.global_step == 12
    assert int(resumed.model.tokens_seen) == int(whole.model.tokens_seen) == 12 * 256
    expected = load_file(
        tmp_path
        / "whole"
        / "tiny-vit-batchtopk"
        / "version_0"
        / "dictionary"
        / "weights.safetensors"
    )
    got = load_file(
        killed_root / "tiny-vit-batchtopk" / "version_1" / "dictionary" / "weights.safetensors"
    )
    assert set(got) == set(expected)
    assert "threshold" in " ".join(got)  # BatchTopK's inference threshold came through too
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


DDP_CASES = {
    # ReLU SAE: its loss is a mean over rows, so DDP's mean gradient is the global one as is
    "relu": [],
    # TopK with a dead window of one global batch (64 tokens): AuxK acts from step 2 on, on the
    # dead set of the global batch; its FVU and AuxK denominators are the global batch's
    "topk": ["--model.dictionary.init_args.dead_tokens_threshold=64"],
    # BatchTopK: the global top batch*k, and the inference threshold from the global min kept
    "batchtopk": ["--model.dictionary.init_args.dead_tokens_threshold=64"],
}


@pytest.mark.parametrize("family", sorted(DDP_CASES))
def test_ddp_on_two_cpu_processes_matches_one_process(family, tiny_cache, tmp_path):
    # no shuffle and one shard: rank r reads rows r::2 of the rows one process reads
    common = [
        "--config",
        f"tiny-vit-{family}",
        f"--data.cache_dir={tiny_cache}",
        "--data.shuffle_buffer=0",
        "--data.eval_fraction=0",
        "--data.batch_size=64",
        "--model.init_sample_rows=256",
        "--model.lr_warmup_steps=2",
        "--trainer.max_steps=8",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=test_train_cli.RecordBatches",
        "--trainer.callbacks+=test_train_cli.RecordState",
        *DDP_CASES[family],
        *QUIET,
    ]
    ddp_records = tmp_path / "ddp_records"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prisma_mm.train.cli",
            "fit",
            *common,
            f"--trainer.default_root_dir={tmp_path / 'ddp'}",
            "--trainer.strategy=ddp",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
        ],
        env=_subprocess_env(PRISMA_TEST_RECORD_DIR=str(ddp_records)),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    single_records = tmp_path / "single_records"
    os.environ["PRISMA_TEST_RECORD_DIR"] = str(single_records)
    try:
        train_cli(["fit", *common, f"--trainer.default_root_dir={tmp_path / 'single'}"])
    finally:
        del os.environ["PRISMA_TEST_RECORD_DIR"]

    rank0 = torch.load(ddp_records / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_records / "rank1.pt", weights_only=True)
    single = torch.load(single_records / "rank0.pt", weights_only=True)
    assert len(rank0) == len(rank1) == len(single) == 8
    rows = lambda batch: {row.numpy().tobytes() for row in batch}  # noqa: E731
    seen0 = set().union(*(rows(b) for b in rank0))
    seen1 = set().union(*(rows(b) for b in rank1))
    assert len(seen0) == len(seen1) == 8 * 32  # 32 distinct rows per process and step
    assert not seen0 & seen1
    for step in range(8):
        assert rank0[step].shape == rank1[step].shape == (32, 32)
        assert rows(rank0[step]) | rows(rank1[step]) == rows(single[step])

    run = f"tiny-vit-{family}/version_0/dictionary/weights.safetensors"
    ddp, one = load_file(tmp_path / "ddp" / run), load_file(tmp_path / "single" / run)
    assert set(ddp) == set(one)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5)
        assert not torch.equal(one[name], torch.zeros_like(one[name]))

    # every process holds the one-process state: weights, firing tracker, thresholds
    states = [
        torch.load(p, weights_only=True)
        for p in (
            ddp_records / "state0.pt",
            ddp_records / "state1.pt",
            single_records / "state0.pt",
        )
    ]
    for ddp_state in states[:2]:
        assert set(ddp_state["state"]) == set(states[2]["state"])
        for name, value in states[2]["state"].items():
            if value.is_floating_point():
                torch.testing.assert_close(ddp_state["state"][name], value, rtol=1e-4, atol=1e-5)
            else:  # the tracker counts global tokens, exactly
                assert torch.equal(ddp_state["state"][name], value), name
        assert [s["dead"] for s in ddp_state["steps"]] == [s["dead"] for s in states[2]["steps"]]
    assert int(states[2]["state"]["tracker.tokens_seen"]) == 8 * 64
    if family == "relu":
        return
    auxk = [s["auxk"] for s in states[2]["steps"]]
    assert sum(a > 0 for a in auxk) >= 4, auxk  # latents were dead and AuxK trained them
    # each process's AuxK term is its share of the global batch's: their mean is that term
    auxk0, auxk1 = ([s["auxk"] for s in state["steps"]] for state in states[:2])
    for a0, a1, a in zip(auxk0, auxk1, auxk):
        assert (a0 > 0) == (a1 > 0) == (a > 0)
        if a > 0:
            assert (a0 + a1) / 2 == pytest.approx(a, rel=1e-3)
    if family == "batchtopk":
        threshold = "activation.threshold"
        assert float(one[threshold]) > 0
        torch.testing.assert_close(ddp[threshold], one[threshold], rtol=0, atol=1e-6)
