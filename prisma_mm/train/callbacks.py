"""Callbacks of dictionary training.

:func:`default_callbacks` lists the ones every run needs; ``SAEModule.configure_callbacks``
attaches those the trainer does not already have, so a recipe may configure any of them in
``trainer.callbacks``. :class:`CheckpointEveryNTokens` and :class:`SaveDictionary` complete a
run: periodic resumable checkpoints and the final dictionary (cfg.json + weights.safetensors,
normalization folded in) in the run directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from prisma_mm.analysis.metrics import reconstruction_metrics, split_batch
from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import FiringTracker
from prisma_mm.sae.distributed import batch_spans_processes
from prisma_mm.train.data import ActivationDataModule
from prisma_mm.train.model_data import ModelActivationDataModule
from prisma_mm.train.spec import build_dictionary, dictionary_spec

__all__ = [
    "CheckpointEveryNTokens",
    "DecoderNormalization",
    "DictionaryUpdate",
    "FiringStats",
    "SaveDictionary",
    "TrainMetrics",
    "default_callbacks",
    "export_dictionary",
    "fold_kwargs",
    "tokens_label",
]


class DecoderNormalization(Callback):
    """Keeps decoder rows at unit norm: projects the gradient of ``W_dec`` orthogonal to its rows
    before each optimizer step and renormalises the rows after it (both no-ops for families whose
    method is a norm-weighted penalty)."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        pl_module.dictionary.remove_decoder_grad_parallel_()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        pl_module.dictionary.normalize_decoder_()


class DictionaryUpdate(Callback):
    """Calls ``dictionary.on_train_batch_end(output)`` after each step: the dictionary's own
    training state (BatchTopK inference threshold, the firing tracker its AuxK loss and the
    logged dead / dense fractions read). Under DDP every process makes the call with the
    batch spanning all of them, so the counts and the threshold statistic are all-reduced
    and every process holds the same state."""

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        with batch_spans_processes():
            pl_module.dictionary.on_train_batch_end(outputs["output"])


def tokens_label(n_tokens: int) -> str:
    """A token count as a short label: 10_000_000 -> ``10M``, 2_048 -> ``2048``, 1_500 -> ``1500``."""
    for factor, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n_tokens >= factor and n_tokens % factor == 0:
            return f"{n_tokens // factor}{suffix}"
    return str(n_tokens)


class FiringStats(Callback):
    """Dead and dense latent fractions, in training tokens over all processes, from the
    dictionary's own firing tracker (the one its AuxK loss reads: one tracker, updated once per
    step by :class:`DictionaryUpdate` from counts all-reduced over the processes).

    A latent is dead when it has not fired for ``dead_window_tokens`` tokens (default: the
    dictionary's ``dead_tokens_threshold``, AuxK's window, else 10M); logged as
    ``train/dead_fraction_<window>_tokens`` (e.g. ``train/dead_fraction_10M_tokens``). Dense:
    fired on more than ``dense_threshold`` of the tokens of the current window of
    ``dense_window_tokens`` (``train/dense_fraction``). The tracker is checkpointed with the
    dictionary, so a resumed run continues the same windows.
    """

    def __init__(
        self,
        dead_window_tokens: int | None = None,
        dense_threshold: float = 0.1,
        dense_window_tokens: int = 10_000_000,
    ) -> None:
        if (dead_window_tokens is not None and dead_window_tokens <= 0) or dense_window_tokens <= 0:
            raise PrismaError("FiringStats windows must be positive numbers of tokens")
        self.dead_window_tokens = dead_window_tokens
        self.dense_threshold = float(dense_threshold)
        self.dense_window_tokens = int(dense_window_tokens)
        # dense fraction of the last completed window (None until one completes)
        self._window_dense_fraction: float | None = None

    @staticmethod
    def tracker_of(pl_module: pl.LightningModule) -> FiringTracker:
        """The dictionary's firing tracker."""
        tracker = getattr(pl_module.dictionary, "tracker", None)
        if not isinstance(tracker, FiringTracker):
            raise PrismaError(
                f"{type(pl_module.dictionary).__name__} keeps no firing tracker: remove "
                "FiringStats from trainer.callbacks"
            )
        return tracker

    def dead_window(self, pl_module: pl.LightningModule) -> int:
        """The dead window in tokens: this callback's, else the dictionary's AuxK window."""
        if self.dead_window_tokens is not None:
            return int(self.dead_window_tokens)
        return int(getattr(pl_module.dictionary.cfg, "dead_tokens_threshold", 10_000_000))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.tracker_of(pl_module)  # fail before training, not after the first step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        tracker = self.tracker_of(pl_module)
        if int(tracker.tokens_seen) >= self.dense_window_tokens:
            self._window_dense_fraction = tracker.dense_fraction(self.dense_threshold)
            tracker.reset_frequency()
        dense = self._window_dense_fraction
        if dense is None:  # first window still running: report it so far
            dense = tracker.dense_fraction(self.dense_threshold)
        window = self.dead_window(pl_module)
        pl_module.log_dict(
            {
                f"train/dead_fraction_{tokens_label(window)}_tokens": tracker.dead_fraction(window),
                "train/dense_fraction": dense,
            },
            batch_size=outputs["output"].n_tokens,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"window_dense_fraction": self._window_dense_fraction}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window_dense_fraction = state_dict.get("window_dense_fraction")


class TrainMetrics(Callback):
    """Logs, every step, the batch's FVU, MSE, cosine similarity and L0, the loss and each of
    its named terms, the learning rate and the tokens seen (``train/...``). Under DDP the
    batch metrics are those of process 0's part of the batch."""

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        out = outputs["output"]
        x, target = split_batch(pl_module.dictionary, batch)
        batch_metrics = reconstruction_metrics(x if target is None else target, out.recon)
        metrics: dict[str, Tensor | float] = {k: v.float() for k, v in batch_metrics.items()}
        metrics["l0"] = out.l0()
        metrics["loss"] = out.loss.detach()
        for name, value in out.losses.items():
            metrics[f"loss/{name}"] = value.detach()
        # a MultiSAEModule member's learning rate is its own parameter group's
        group = getattr(pl_module, "param_group", 0)
        metrics["lr"] = trainer.optimizers[0].param_groups[group]["lr"]
        metrics["tokens_seen"] = float(pl_module.tokens_seen)
        pl_module.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=out.n_tokens)
        pl_module.log("tokens_seen", float(pl_module.tokens_seen), prog_bar=True, logger=False)


def fold_kwargs(
    dictionary: Any, hooks: list[str], normalization: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """``fold_normalization_`` arguments for a dictionary trained on ``(x - mean) * scale`` per
    hook (the cache reader's normalization): the first hook is the input, the second a
    transcoder's target, all of them a crosscoder's sources. None when nothing was normalized.
    """
    if not normalization:
        return None
    means = [torch.as_tensor(normalization[h]["mean"], dtype=torch.float32) for h in hooks]
    # the reader multiplies by its scale; fold_normalization_ divides by its own
    scales = [1.0 / float(normalization[h]["scale"]) for h in hooks]
    architecture = getattr(dictionary, "architecture", "")
    if architecture == "transcoder":
        return {
            "mean": means[0],
            "scale": scales[0],
            "target_mean": means[1],
            "target_scale": scales[1],
        }
    if architecture == "crosscoder":
        return {"mean": torch.stack(means), "scale": torch.tensor(scales).unsqueeze(-1)}
    return {"mean": means[0], "scale": scales[0]}


def export_dictionary(
    dictionary: Any,
    path: str | Path,
    normalization: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a float32 CPU copy of ``dictionary`` to ``path`` (cfg.json + weights.safetensors)
    with the training normalization folded in (``fold_normalization_(**normalization)``) and
    ``metadata`` added to its cfg.json. The trained module is left untouched."""
    # a fresh CPU instance: no second copy of the weights on the training device
    exported = build_dictionary(dictionary_spec(dictionary))
    exported.load_state_dict(
        {
            k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
            for k, v in dictionary.state_dict().items()
        }
    )
    exported.metadata = copy.deepcopy(dictionary.metadata)
    if normalization:
        exported.fold_normalization_(**normalization)
    exported.metadata.update(metadata or {})
    path = Path(path)
    exported.save(path)
    return path


class SaveDictionary(Callback):
    """At the end of ``fit``, saves the trained dictionary with the data's normalization folded
    in and the hook / model / cache metadata, to ``dirpath`` (default ``<run dir>/dictionary``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_path: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # log_dir is broadcast from process 0, so every process asks for it
        run_dir = trainer.log_dir or trainer.default_root_dir
        path = Path(self.dirpath) if self.dirpath else Path(run_dir) / "dictionary"
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            normalization = metadata = None
            if isinstance(datamodule, (ActivationDataModule, ModelActivationDataModule)):
                normalization = fold_kwargs(
                    pl_module.dictionary, datamodule.hooks, datamodule.normalization
                )
                metadata = datamodule.dictionary_metadata()
            self.saved_path = export_dictionary(pl_module.dictionary, path, normalization, metadata)
        trainer.strategy.barrier("prisma_mm_save_dictionary")


class CheckpointEveryNTokens(ModelCheckpoint):
    """A :class:`ModelCheckpoint` that saves every ``every_n_tokens`` training tokens (rounded
    down to whole optimizer steps, at least one) instead of every N steps or epochs.

    The last step of training is saved too. Other arguments are ModelCheckpoint's; by default it
    keeps the most recent checkpoint plus ``last.ckpt`` (a link), which ``--ckpt_path`` resumes
    from.
    """

    def __init__(
        self,
        every_n_tokens: int,
        dirpath: str | None = None,
        filename: str | None = "{step}",
        save_top_k: int = 1,
        save_last: bool | str | None = "link",
        **kwargs: Any,
    ) -> None:
        if every_n_tokens <= 0:
            raise PrismaError(f"every_n_tokens must be positive, got {every_n_tokens}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            save_top_k=save_top_k,
            save_last=save_last,
            every_n_train_steps=1,
            **kwargs,
        )
        self.every_n_tokens = int(every_n_tokens)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            steps = max(1, self.every_n_tokens // pl_module.tokens_per_step())
            self._every_n_train_steps = steps

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        last_step = trainer.global_step == trainer.max_steps
        if last_step and trainer.global_step % self._every_n_train_steps:
            # the final step as well, so a finished fit always leaves its end state to resume
            # (with a larger budget) or validate
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def default_callbacks() -> list[Callback]:
    """The callbacks every dictionary training run needs."""
    return [
        DecoderNormalization(),
        DictionaryUpdate(),
        FiringStats(),
        TrainMetrics(),
        SaveDictionary(),
    ]
