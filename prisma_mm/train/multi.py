"""``MultiSAEModule``: several dictionaries trained together from one batch of rows.

A sweep (several hooks, or several sizes on one hook) reads the data once: the data module
yields ``[batch, n_hooks, d]`` rows of all the hooks (one model forward, or one cache read), and
each member dictionary trains on its own hook(s) of the same rows. Each member is an
:class:`~prisma_mm.train.module.SAEModule` (its own learning rate, schedule, sparsity and
initialisation); the optimizer is one Adam with a parameter group per member, which is exactly
independent training (Adam is per parameter and the members share no parameter), with each
group's schedule from the member's own settings. Every per-dictionary callback of a single run
(decoder normalisation, dictionary updates, firing statistics, train metrics) runs per member,
logging under ``<name>/train/...`` and ``<name>/val/...``; each member is saved to
``<run dir>/dictionaries/<name>`` with the data's normalization of its hooks folded in.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from prisma_mm.analysis.metrics import split_batch
from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary
from prisma_mm.sae.distributed import batch_spans_processes
from prisma_mm.train.callbacks import (
    DecoderNormalization,
    DictionaryUpdate,
    FiringStats,
    TrainMetrics,
    export_dictionary,
    fold_kwargs,
)
from prisma_mm.train.module import SAEModule, TrainingLength, lr_factor, validation_log
from prisma_mm.train.spec import build_dictionary, dictionary_spec

__all__ = ["MultiSAEModule", "SaveDictionaries", "check_member_hooks"]


class _Member:
    """What a per-dictionary callback sees as ``pl_module``: one member's dictionary, and the
    parent's logging under the member's prefix."""

    def __init__(self, parent: MultiSAEModule, name: str, index: int) -> None:
        self.parent = parent
        self.name = name
        self.param_group = index  # the member's learning rate is this optimizer group's
        self.dictionary = parent.members[name].dictionary

    @property
    def tokens_seen(self) -> Tensor:
        return self.parent.tokens_seen

    def tokens_per_step(self) -> int:
        return self.parent.tokens_per_step()

    def log(self, key: str, value: Any, **kwargs: Any) -> None:
        self.parent.log(f"{self.name}/{key}", value, **kwargs)

    def log_dict(self, metrics: dict[str, Any], **kwargs: Any) -> None:
        self.parent.log_dict({f"{self.name}/{k}": v for k, v in metrics.items()}, **kwargs)


class _EachMember(Callback):
    """Runs a single-dictionary callback once per member, with that member's rows and output."""

    def __init__(self, make: type[Callback], names: list[str]) -> None:
        self.callbacks = {name: make() for name in names}

    @property
    def state_key(self) -> str:
        return f"_EachMember[{type(next(iter(self.callbacks.values()))).__name__}]"

    def _members(self, pl_module: Any) -> list[tuple[Callback, _Member]]:
        return [(cb, pl_module.member_view(name)) for name, cb in self.callbacks.items()]

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        for callback, member in self._members(pl_module):
            callback.setup(trainer, member, stage)  # type: ignore[arg-type]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        for callback, member in self._members(pl_module):
            callback.on_before_optimizer_step(trainer, member, optimizer)  # type: ignore[arg-type]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for callback, member in self._members(pl_module):
            rows = pl_module.member_rows(member.name, batch)
            output = {"output": outputs["outputs"][member.name]}
            callback.on_train_batch_end(trainer, member, output, rows, batch_idx)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {name: cb.state_dict() for name, cb in self.callbacks.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, cb in self.callbacks.items():
            if name in state_dict:
                cb.load_state_dict(state_dict[name])


class SaveDictionaries(Callback):
    """At the end of ``fit``, saves each member to ``<dirpath>/<name>`` (default
    ``<run dir>/dictionaries/<name>``), the data's normalization of its hooks folded in."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_paths: dict[str, Path] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        run_dir = trainer.log_dir or trainer.default_root_dir
        root = Path(self.dirpath) if self.dirpath else Path(run_dir) / "dictionaries"
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            normalization = getattr(datamodule, "normalization", {}) or {}
            base = datamodule.dictionary_metadata() if datamodule is not None else {}
            for name, member in pl_module.members.items():
                hooks = pl_module.member_hooks[name]
                metadata = {**base, "hook": hooks[0] if len(hooks) == 1 else hooks, "name": name}
                fold = fold_kwargs(member.dictionary, hooks, normalization)
                self.saved_paths[name] = export_dictionary(
                    member.dictionary, root / name, fold, metadata
                )
        trainer.strategy.barrier("prisma_mm_save_dictionaries")


def check_member_hooks(members: dict[str, Any], hooks: str | list[str] | None) -> None:
    """Every member's hook(s) are among the hooks the data reads (one line otherwise)."""
    read = [hooks] if isinstance(hooks, str) else list(hooks or [])
    for name, member in members.items():
        wanted = member if isinstance(member, (str, list)) else member.get("hook")
        wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
        missing = [h for h in wanted if h not in read]
        if missing:
            raise PrismaError(
                f"model.members.{name} trains on {missing[0]!r}, which the data does not read "
                f"(data.hooks: {read}): add it to data.hooks as a list"
            )


def _build_member(name: str, class_path: str, init_args: dict[str, Any], d_in: int) -> Any:
    """A member's dictionary: the common config's fields that its class takes, its own, d_in."""
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    config_class = getattr(cls, "config_class", None)
    if not dataclasses.is_dataclass(config_class):
        raise PrismaError(f"model.members.{name}: {class_path!r} is not a prisma_mm Dictionary")
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    kept = {k: v for k, v in init_args.items() if k in fields}
    return build_dictionary({"class_path": class_path, "init_args": {**kept, "d_in": d_in}})


class MultiSAEModule(TrainingLength, pl.LightningModule):
    """Trains several dictionaries on the rows of one batch (one forward of the model).

    Args:
        dictionary: the members' common dictionary (in a recipe: ``class_path`` +
            ``init_args``; ``d_in`` comes from the data, as for SAEModule).
        members: ``{name: {"hook": hook name or [hooks], "dictionary_args": {config fields
            that differ from dictionary's, e.g. n_latents}, "dictionary_class": another
            Dictionary class path (optional), <any SAEModule argument>: ...}}``. The data
            module must read every hook named here.
        defaults: SAEModule arguments shared by the members (a member's own win), e.g.
            ``lr_warmup_steps``, ``lr_decay``, ``init_sample_rows``.
        total_tokens: training length in tokens (rows per member), as SAEModule's.
    """

    tokens_seen: Tensor

    def __init__(
        self,
        dictionary: Dictionary,
        members: dict[str, dict[str, Any]],
        defaults: dict[str, Any] | None = None,
        total_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise PrismaError("model.members is empty: name at least one dictionary")
        if total_tokens is not None and total_tokens <= 0:
            raise PrismaError(f"total_tokens must be positive, got {total_tokens}")
        if isinstance(dictionary, dict):  # from a checkpoint's hyper-parameters
            dictionary = build_dictionary(dictionary)
        self.save_hyperparameters(ignore=["dictionary"])
        self.hparams.pop("_instantiator", None)
        # plain data only, so checkpoints load with torch.load(weights_only=True)
        self.hparams["dictionary"] = template = dictionary_spec(dictionary)
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.total_tokens = total_tokens
        self.member_hooks: dict[str, list[str]] = {}
        built: dict[str, SAEModule] = {}
        for name, spec in members.items():
            spec = {**(defaults or {}), **dict(spec)}
            hook = spec.pop("hook", None)
            if not hook:
                raise PrismaError(f"model.members.{name} needs a 'hook' (or a list of hooks)")
            spec.pop("total_tokens", None)
            class_path = spec.pop("dictionary_class", template["class_path"])
            init_args = {**template["init_args"], **dict(spec.pop("dictionary_args", None) or {})}
            if "n_sources" in init_args:
                init_args["n_sources"] = 1 if isinstance(hook, str) else len(hook)
            built[name] = SAEModule(
                _build_member(name, class_path, init_args, int(dictionary.cfg.d_in)), **spec
            )
            self.member_hooks[name] = [hook] if isinstance(hook, str) else list(hook)
        self.members = nn.ModuleDict(built)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self._hook_index: dict[str, list[int]] = {}

    # ---- rows of each member ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = getattr(self.trainer, "strategy", None)
        if isinstance(strategy, DDPStrategy):  # as SAEModule: every process computes its buffers
            strategy._ddp_kwargs.setdefault("broadcast_buffers", False)
        datamodule = getattr(self.trainer, "datamodule", None)
        hooks = list(getattr(datamodule, "hooks", []))
        check_member_hooks(self.member_hooks, hooks)
        for name, wanted in self.member_hooks.items():
            self._hook_index[name] = [hooks.index(h) for h in wanted]
        if stage == "fit":
            if self.total_tokens is not None and self.trainer.max_steps in (None, -1):
                self.trainer.fit_loop.epoch_loop.max_steps = self.total_steps()
            self._total_steps = self.total_steps()

    def member_rows(self, name: str, batch: Tensor) -> Tensor:
        """A member's rows of a data batch: ``[batch, d]`` (one hook) or ``[batch, k, d]``."""
        if batch.dim() == 2:  # the data reads one hook
            return batch
        index = self._hook_index[name]
        return batch[:, index[0]] if len(index) == 1 else batch[:, index]

    def member_view(self, name: str) -> _Member:
        """The member as a per-dictionary callback sees it (logging under ``name/``)."""
        return _Member(self, name, list(self.members).index(name))

    # ---- Lightning hooks --------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        names = list(self.members)
        each = [
            _EachMember(kind, names)
            for kind in (DecoderNormalization, DictionaryUpdate, FiringStats, TrainMetrics)
        ]
        return [*each, SaveDictionaries()]

    def configure_optimizers(self) -> dict[str, Any]:
        groups, schedules = [], []
        total = self.total_steps()
        for member in self.members.values():
            groups.append(
                {
                    "params": list(member.dictionary.parameters()),
                    "lr": member.lr,
                    "betas": member.betas,
                    "eps": member.eps,
                    "weight_decay": member.weight_decay,
                }
            )
            schedules.append(
                lambda step, m=member: lr_factor(
                    step, total, m.lr_warmup_steps, m.lr_decay, m.lr_decay_start, m.min_lr_ratio
                )
            )
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Initialise every member not yet initialised from one sample of the train split."""
        waiting = [m for m in self.members.values() if not bool(m.initialized)]
        rows = max((m.init_sample_rows for m in waiting), default=0)
        datamodule = getattr(self.trainer, "datamodule", None)
        if rows > 0 and hasattr(datamodule, "sample"):
            sample = datamodule.sample(rows).to(self.device)
            for name, member in self.members.items():
                if bool(member.initialized) or member.init_sample_rows <= 0:
                    continue
                part = self.member_rows(name, sample)[: member.init_sample_rows]
                x, target = split_batch(member.dictionary, part)
                member.dictionary.init_from_sample(x, target)
                member.dictionary.normalize_decoder_()
                member._broadcast_dictionary()
        for member in waiting:
            member.initialized.fill_(True)

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Any]:
        """The sum of the members' losses (their parameters are disjoint, so each member's
        gradient is its own loss's) and ``{"outputs": {name: Output}}``."""
        outputs, loss = {}, 0.0
        progress = self.progress()
        with batch_spans_processes():
            for name, member in self.members.items():
                member.dictionary.set_progress(progress)
                outputs[name] = member(self.member_rows(name, batch))
                loss = loss + outputs[name].loss
        self.tokens_seen += batch.shape[0] * self.trainer.world_size
        return {"loss": loss, "outputs": outputs}

    def on_validation_epoch_start(self) -> None:
        for member in self.members.values():
            member.on_validation_epoch_start()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        for name, member in self.members.items():
            member.validation_step(self.member_rows(name, batch), batch_idx)

    def on_validation_epoch_end(self) -> None:
        logged: dict[str, float] = {}
        for name, member in self.members.items():
            acc = member._val_metrics
            acc.all_reduce(self.device)
            if acc.n_tokens:
                for key, value in validation_log(acc.compute()).items():
                    logged[f"{name}/val/{key}"] = float(value)
            member._val_metrics = member._new_val_metrics()
        if logged:
            self.log_dict(logged, sync_dist=True)
