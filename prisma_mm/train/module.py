"""``SAEModule``: the Lightning step logic around any :class:`~prisma_mm.sae.base.Dictionary`.

The module holds only what a step does: split the batch, run the dictionary (under bf16
autocast with fp32 master weights if asked), return the loss, and the learning-rate schedule.
Decoder normalisation, dictionary state updates (BatchTopK threshold, firing tracker), metric
logging, dead / dense tracking and saving the final dictionary are callbacks
(:mod:`prisma_mm.train.callbacks`), attached by :meth:`SAEModule.configure_callbacks` unless
the trainer already has one of the same kind.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from prisma_mm.analysis.metrics import DEFAULT_DENSE_THRESHOLD, MetricsAccumulator, split_batch
from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary
from prisma_mm.sae.distributed import batch_spans_processes
from prisma_mm.train.callbacks import default_callbacks
from prisma_mm.train.spec import build_dictionary, dictionary_spec

__all__ = ["SAEModule", "lr_factor"]


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "linear",
    decay_start: float = 0.8,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps, constant,
    then from ``decay_start * total_steps`` a ``linear`` or ``cosine`` decay reaching
    ``min_lr_ratio`` at ``total_steps`` (``constant``: no decay).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    start = int(decay_start * total_steps)
    if step < start:
        return 1.0
    frac = min(1.0, (step - start) / max(1, total_steps - start))
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * frac
    if decay == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise PrismaError(f"unknown lr decay {decay!r}: use 'constant', 'linear' or 'cosine'")


class TrainingLength:
    """The length of a run, for a LightningModule with ``total_tokens`` (or None) and a
    ``tokens_seen`` buffer; ``setup`` stores :meth:`total_steps` in ``_total_steps``."""

    total_tokens: int | None
    tokens_seen: Tensor
    _total_steps: int

    def tokens_per_step(self) -> int:
        """Rows per optimizer step over all processes (global batch x gradient accumulation)."""
        datamodule = getattr(self.trainer, "datamodule", None)  # type: ignore[attr-defined]
        batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is None:
            raise PrismaError(
                f"{type(self).__name__} needs an ActivationDataModule (or a datamodule with "
                "batch_size) to convert total_tokens to steps; or set trainer.max_steps and "
                "leave total_tokens unset"
            )
        return int(batch_size) * int(self.trainer.accumulate_grad_batches)  # type: ignore[attr-defined]

    def total_steps(self) -> int:
        """Optimizer steps in the whole run (from ``total_tokens``, else the trainer's limits)."""
        if self.total_tokens is not None:
            return math.ceil(self.total_tokens / self.tokens_per_step())
        trainer = self.trainer  # type: ignore[attr-defined]
        steps = trainer.max_steps
        if steps is None or steps < 0:
            steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps <= 0:
            raise PrismaError(
                "the training length is unknown: set trainer.max_steps or model.total_tokens"
            )
        return int(steps)

    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (tokens seen / total tokens, else steps)."""
        if self.total_tokens is not None:
            return min(1.0, int(self.tokens_seen) / self.total_tokens)
        return min(1.0, self.global_step / max(1, self._total_steps))  # type: ignore[attr-defined]


class SAEModule(TrainingLength, pl.LightningModule):
    """Trains a sparse dictionary on batches of activations.

    Args:
        dictionary: any :class:`~prisma_mm.sae.base.Dictionary` (in a recipe: ``class_path`` +
            ``init_args``; ``d_in`` comes from the data).
        lr: Adam learning rate; ``None``: ``2e-4 / sqrt(n_latents / 2**14)`` (the TopK scaling
            rule of Gao et al. 2024).
        lr_warmup_steps: optimizer steps of linear warm-up.
        lr_decay: ``constant``, ``linear`` or ``cosine`` decay after ``lr_decay_start``.
        lr_decay_start: fraction of training at which the decay starts.
        min_lr_ratio: learning rate at the end, as a fraction of ``lr``.
        betas, eps, weight_decay: Adam's.
        total_tokens: training length in tokens (rows); sets ``trainer.max_steps`` when the
            trainer has none, and drives the dictionary's ``set_progress``. Without it,
            progress is ``global_step / trainer.max_steps``.
        autocast_dtype: ``bfloat16`` runs the dictionary under autocast (weights, optimizer
            state and loss stay float32); ``float32`` runs it in full precision.
        init_sample_rows: rows of the train split handed to ``dictionary.init_from_sample``
            before the first step (0: no data-dependent initialisation).
    """

    initialized: Tensor
    tokens_seen: Tensor

    def __init__(
        self,
        dictionary: Dictionary,
        lr: float | None = None,
        lr_warmup_steps: int = 1000,
        lr_decay: Literal["constant", "linear", "cosine"] = "linear",
        lr_decay_start: float = 0.8,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        total_tokens: int | None = None,
        autocast_dtype: Literal["float32", "bfloat16"] = "float32",
        init_sample_rows: int = 65536,
    ) -> None:
        super().__init__()
        if not isinstance(dictionary, (Dictionary, dict)):
            raise PrismaError(
                f"model.dictionary must be a prisma_mm Dictionary, got {type(dictionary).__name__}"
            )
        if lr_decay not in ("constant", "linear", "cosine"):
            raise PrismaError(
                f"unknown lr_decay {lr_decay!r}: use 'constant', 'linear' or 'cosine'"
            )
        if autocast_dtype not in ("float32", "bfloat16"):
            raise PrismaError(
                f"autocast_dtype must be 'float32' or 'bfloat16', got {autocast_dtype!r}"
            )
        if total_tokens is not None and total_tokens <= 0:
            raise PrismaError(f"total_tokens must be positive, got {total_tokens}")
        if isinstance(dictionary, dict):  # from a checkpoint's hyper-parameters
            dictionary = build_dictionary(dictionary)
        self.save_hyperparameters(ignore=["dictionary"])
        # plain data only, so checkpoints load with torch.load(weights_only=True) and
        # SAEModule.load_from_checkpoint(path) rebuilds the dictionary without a CLI
        self.hparams.pop("_instantiator", None)
        self.hparams["dictionary"] = dictionary_spec(dictionary)
        self._hparams_initial = copy.deepcopy(self._hparams)  # what loggers write (hparams.yaml)
        self.dictionary = dictionary
        n_latents = int(dictionary.cfg.n_latents)
        self.lr = float(lr) if lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.lr_decay = lr_decay
        self.lr_decay_start = float(lr_decay_start)
        self.min_lr_ratio = float(min_lr_ratio)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.total_tokens = total_tokens
        self.autocast_dtype = autocast_dtype
        self.init_sample_rows = int(init_sample_rows)
        # checkpointed with the weights: a resumed run neither re-initialises nor recounts tokens
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    # ---- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = getattr(self.trainer, "strategy", None)
        if isinstance(strategy, DDPStrategy):
            # every process all-reduces the dictionary's statistics itself, so its buffers are
            # equal everywhere; DDP's broadcast of rank 0's buffers each forward is redundant,
            # and off it cannot hide a process that diverged (an explicit setting wins)
            strategy._ddp_kwargs.setdefault("broadcast_buffers", False)
        if stage != "fit":
            return
        if self.total_tokens is not None and self.trainer.max_steps in (None, -1):
            # the train stream is endless: the token budget is what stops training
            self.trainer.fit_loop.epoch_loop.max_steps = self.total_steps()
        self._total_steps = self.total_steps()

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks training needs, except those the trainer already has (so a recipe can
        configure any of them in ``trainer.callbacks``)."""
        present = {type(c) for c in self.trainer.callbacks}
        return [c for c in default_callbacks() if not any(issubclass(t, type(c)) for t in present)]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(
            self.dictionary.parameters(),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        total = self.total_steps()
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(
                step,
                total,
                self.lr_warmup_steps,
                self.lr_decay,
                self.lr_decay_start,
                self.min_lr_ratio,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Initialise the dictionary from a sample of the train split (once per run: a resumed
        run restores the initialised weights instead)."""
        if bool(self.initialized):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.init_sample_rows > 0 and hasattr(datamodule, "sample"):
            sample = datamodule.sample(self.init_sample_rows).to(self.device)
            x, target = split_batch(self.dictionary, sample)
            self.dictionary.init_from_sample(x, target)
            self.dictionary.normalize_decoder_()
            # every process read the same sample; process 0's result makes it exact everywhere
            self._broadcast_dictionary()
        self.initialized.fill_(True)

    def _broadcast_dictionary(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        for tensor in [*self.dictionary.parameters(), *self.dictionary.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast_dtype == "bfloat16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def forward(self, batch: Tensor) -> Any:
        """Run the dictionary on a data batch (see
        :func:`~prisma_mm.analysis.metrics.split_batch`) -> ``Output``."""
        x, target = split_batch(self.dictionary, batch)
        with self._autocast():
            return self.dictionary(x, target)

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Any]:
        """One step: ``{"loss": scalar with graph, "output": the dictionary's Output}``.

        Under DDP the batch statistics the loss needs (FVU denominators, BatchTopK's global
        top ``batch * k``) are taken over every process's rows, so DDP's mean of the
        processes' gradients is the gradient of the global batch's loss."""
        self.dictionary.set_progress(self.progress())
        with batch_spans_processes():
            out = self(batch)
        self.tokens_seen += batch.shape[0] * self.trainer.world_size
        return {"loss": out.loss, "output": out}

    def _new_val_metrics(self) -> MetricsAccumulator:
        return MetricsAccumulator(int(self.dictionary.cfg.n_latents), DEFAULT_DENSE_THRESHOLD)

    def on_validation_epoch_start(self) -> None:
        self._val_metrics = self._new_val_metrics()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Accumulate exact metric sums over the eval split (logged at the epoch's end)."""
        x, target = split_batch(self.dictionary, batch)
        out = self(batch)
        losses = {"total": out.loss, **out.losses}
        target = x if target is None else target
        self._val_metrics.update(target, out.recon, out.fire_counts(), losses)

    def on_validation_epoch_end(self) -> None:
        acc = self._val_metrics
        acc.all_reduce(self.device)
        if acc.n_tokens:
            # summed over processes already: every process logs the same values
            self.log_dict(
                {f"val/{k}": float(v) for k, v in validation_log(acc.compute()).items()},
                sync_dist=True,
            )
        self._val_metrics = self._new_val_metrics()


def validation_log(metrics: Any) -> dict[str, float]:
    """The ``val/...`` keys of a :class:`~prisma_mm.analysis.metrics.Metrics` over the eval
    split: reconstruction, sparsity (dead named by its window: the eval split) and losses."""
    out = {
        "fvu": metrics.fvu,
        "explained_variance": metrics.explained_variance,
        "mse": metrics.mse,
        "cosine_similarity": metrics.cosine_similarity,
        "relative_reconstruction_bias": metrics.relative_reconstruction_bias,
        "l0": metrics.l0,
        "dead_fraction_eval_split": metrics.dead_fraction,
        "dense_fraction": metrics.dense_fraction,
    }
    out.update({f"loss/{name}": value for name, value in metrics.losses.items()})
    return out
