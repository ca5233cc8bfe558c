"""SAE families (Leask et al., "Sparse Autoencoders Do Not Find Canonical Units of Analysis",
ICLR 2025): dictionaries of doubling size trained on one cache, each until its FVU plateaus,
and what changes from one size to the next, checked against the toy world's known factors.

Training (:func:`train_family`). Every member is an :class:`~prisma_mm.train.SAEModule` over
an :class:`~prisma_mm.train.ActivationDataModule` of the same cache, seed, batch size and
shuffle buffer, so the members see the same batches in the same order (the report checks
it: each member's first batch has the same checksum). The learning rate warms up and then
stays constant: a decaying schedule would make any curve flatten when the schedule ends.
The FVU on the cache's held-out split is measured every ``eval_every_tokens``; a member
stops when it has plateaued (:class:`PlateauCriterion`) or at ``max_tokens``, and the
report says which, at what token count.

Report (:func:`family_report`). Per size: FVU, MSE, L0, dead fraction on held-out rows, the
model's accuracy with the SAE spliced in, and how many factor values and conjunctions have a
dedicated latent. Per adjacent pair (smaller S, larger L): the stitching curve from S to L
(and whether its MSE falls monotonically), the novel / reconstruction / inactive counts of
L's latents by the exact test and by the cosine proxy and their agreement
(:mod:`prisma_mm.analysis.stitching`), and with ground truth, what each novel latent detects
and whether S already had a latent for it. For the largest member: a meta-SAE, its FVU beside
the paper's, and whether it decomposes conjunction latents ("red circle") into meta-latents
standing for their parts (:func:`~prisma_mm.analysis.meta_sae.decomposition_score`, against
a shuffled control). Definitions: docs/families.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_mm.analysis.cli import _jsonable
from prisma_mm.errors import PrismaError

__all__ = [
    "PAPER_META_FVU",
    "FamilyConfig",
    "FamilyMember",
    "PlateauCriterion",
    "ToyHeldOut",
    "add_family_parser",
    "check_family_config",
    "family_markdown",
    "family_report",
    "plateau_stop",
    "run_family",
    "toy_held_out",
    "train_family",
    "train_member",
    "write_family_report",
]

#: Meta-SAE FVU reported by Leask et al. (meta-latents explain 55.47% of the variance of the
#: decoder directions, at k = 4), rounded.
PAPER_META_FVU = 0.45
RUN_FILE = "family_run.json"
_NOT_SAE = ("transcoder", "crosscoder")
MEMBER_FILE = "training.json"
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero")


# ----- the plateau criterion -----------------------------------------------------------------
@dataclass(frozen=True)
class PlateauCriterion:
    """When a curve of evaluations ``f_1, f_2, ...`` (FVU, lower is better) has plateaued.

    At evaluation ``n > window``: ``before = min(f_1 .. f_{n-window})`` and ``recent =
    min(f_{n-window+1} .. f_n)``; the curve has plateaued at ``n`` when ``(before - recent) /
    before < rel_eps``: over the last ``window`` evaluations its best value improved by less
    than ``rel_eps`` of the best before them. Taking minima makes one noisy evaluation neither
    stop nor prolong training.
    """

    window: int = 4
    rel_eps: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PrismaError(f"plateau window must be a positive integer, got {self.window!r}")
        if not (isinstance(self.rel_eps, (int, float)) and 0.0 < self.rel_eps < 1.0):
            raise PrismaError(f"plateau rel_eps must be in (0, 1), got {self.rel_eps!r}")

    def improvement(self, values: Sequence[float]) -> float | None:
        """The relative improvement over the last ``window`` values (None: too few values)."""
        if len(values) <= self.window:
            return None
        before = min(values[: -self.window])
        recent = min(values[-self.window :])
        if not math.isfinite(before) or before <= 0:
            return 0.0 if recent >= before else float("inf")
        return (before - recent) / before

    def reached(self, values: Sequence[float]) -> bool:
        """Whether the curve has plateaued at its last value."""
        gain = self.improvement(values)
        return gain is not None and gain < self.rel_eps

    def first(self, values: Sequence[float]) -> int | None:
        """0-based index of the first value at which the curve has plateaued (None: never)."""
        for n in range(self.window + 1, len(values) + 1):
            if self.reached(values[:n]):
                return n - 1
        return None

    def describe(self) -> str:
        return (
            f"the best held-out FVU of the last {self.window} evaluations is less than "
            f"{self.rel_eps:g} (relative) below the best FVU before them"
        )


def plateau_stop(criterion: PlateauCriterion) -> Any:
    """A Lightning callback that records ``val/fvu`` after every validation and stops training
    once ``criterion`` holds (built here so that importing this module, as ``prisma-mm``'s
    parser does, does not import Lightning).

    Its ``curve``: ``[(tokens seen, fvu), ...]``; ``plateau_tokens``: tokens seen at the
    evaluation where it plateaued (None: it did not); ``first_batch_checksum``: the sum of the
    first training batch (float64), which shows that members share a data order.
    """
    from lightning.pytorch.callbacks import Callback

    class PlateauStop(Callback):
        def __init__(self) -> None:
            self.criterion = criterion
            self.curve: list[tuple[int, float]] = []
            self.plateau_tokens: int | None = None
            self.first_batch_checksum: float | None = None

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if self.first_batch_checksum is None:
                self.first_batch_checksum = float(batch.double().sum())

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or "val/fvu" not in trainer.callback_metrics:
                return
            fvu = float(trainer.callback_metrics["val/fvu"])
            self.curve.append((int(pl_module.tokens_seen), fvu))
            if self.plateau_tokens is None and self.criterion.reached([f for _, f in self.curve]):
                self.plateau_tokens = self.curve[-1][0]
                trainer.should_stop = True

    return PlateauStop()


# ----- training ------------------------------------------------------------------------------
@dataclass
class FamilyConfig:
    """A family: ``n_sizes`` dictionaries of ``base_latents * 2**i`` latents (or ``sizes``)
    of ``architecture`` (a :data:`prisma_mm.sae.ARCHITECTURES` name; BatchTopK as in the
    paper) on ``hook`` of the cache (default: its only hook). Training: ``batch_size`` rows a
    step, warm-up of ``lr_warmup_steps`` then a constant ``lr`` (None: SAEModule's size rule),
    FVU on the cache's held-out ``eval_fraction`` every ``eval_every_tokens``, until the
    :class:`PlateauCriterion` ``(plateau_window, plateau_rel_eps)`` holds or ``max_tokens``.
    ``dictionary_args``: more config fields of the family (e.g. ``auxk_coefficient``)."""

    cache_dir: Path
    out: Path
    hook: str | None = None
    architecture: str = "batchtopk"
    base_latents: int = 256
    n_sizes: int = 3
    sizes: list[int] | None = None
    k: int = 16
    batch_size: int = 1024
    lr: float | None = None
    lr_warmup_steps: int = 20
    eval_every_tokens: int = 16384
    max_tokens: int = 1_000_000
    plateau_window: int = 4
    plateau_rel_eps: float = 0.01
    eval_fraction: float = 0.02
    shuffle_buffer: int = 65536
    init_sample_rows: int = 4096
    seed: int = 0
    dictionary_args: dict[str, Any] = field(default_factory=dict)
    accelerator: str = "cpu"
    progress: bool = True

    @property
    def member_sizes(self) -> list[int]:
        """The members' numbers of latents, smallest first."""
        if self.sizes:
            return sorted(int(s) for s in self.sizes)
        return [int(self.base_latents) * 2**i for i in range(int(self.n_sizes))]

    @property
    def criterion(self) -> PlateauCriterion:
        return PlateauCriterion(self.plateau_window, self.plateau_rel_eps)

    def member_name(self, n_latents: int) -> str:
        return f"{self.architecture}-{n_latents}"

    def settings(self) -> dict[str, Any]:
        """What decides the trained members (a re-run reuses members trained with these)."""
        keys = ("hook", "architecture", "k", "batch_size", "lr", "lr_warmup_steps",
                "eval_every_tokens", "max_tokens", "plateau_window", "plateau_rel_eps",
                "eval_fraction", "shuffle_buffer", "init_sample_rows", "seed",
                "dictionary_args")  # fmt: skip
        out = {key: getattr(self, key) for key in keys}
        out["cache_dir"] = str(Path(self.cache_dir).resolve())
        return out


@dataclass
class FamilyMember:
    """One trained member: its saved dictionary ``path`` and how its training went.

    ``curve``: ``[(tokens seen, held-out FVU), ...]`` at every evaluation; ``plateaued``:
    whether the criterion held before ``max_tokens``; ``plateau_tokens``: tokens seen when it
    did; ``tokens_trained``: tokens seen when training stopped."""

    name: str
    n_latents: int
    path: Path
    curve: list[tuple[int, float]]
    plateaued: bool
    plateau_tokens: int | None
    tokens_trained: int
    first_batch_checksum: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["curve"] = [[int(t), float(f)] for t, f in self.curve]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilyMember:
        data = dict(data)
        data["path"] = Path(data["path"])
        data["curve"] = [(int(t), float(f)) for t, f in data["curve"]]
        return cls(**data)

    def load(self) -> Any:
        """The saved dictionary, in eval mode."""
        from prisma_mm.sae import load

        return load(self.path).eval()


def _cache_hook(config: FamilyConfig) -> tuple[str, dict[str, Any]]:
    """The hook to train on and the cache's manifest (one-line errors for a bad cache/hook)."""
    from prisma_mm.cache import read_manifest

    cache = Path(config.cache_dir)
    if not (cache / "manifest.json").is_file():
        raise PrismaError(
            f"--cache {str(cache)!r} holds no manifest.json: write the cache first with "
            "`prisma-mm cache ...` or fix the path"
        )
    manifest = read_manifest(cache)
    hooks = list(manifest.get("hooks") or [])
    if config.hook is None:
        if len(hooks) != 1:
            raise PrismaError(f"cache {str(cache)!r} holds hooks {hooks}: choose one with --hook")
        return hooks[0], manifest
    if config.hook not in hooks:
        raise PrismaError(
            f"hook {config.hook!r} is not in cache {str(cache)!r} (it holds {hooks}): use one of "
            "those"
        )
    return config.hook, manifest


def check_family_config(config: FamilyConfig) -> tuple[str, dict[str, Any]]:
    """Refuse, before any work, a family that cannot be trained: the cache and hook, the
    sizes, the family and its config at every size, the training lengths, the output folder
    (not a file; not holding a family trained with other settings). Returns the hook and the
    cache's manifest."""
    from prisma_mm.analysis.cli import check_output_dir
    from prisma_mm.sae import ARCHITECTURES, SparseAutoencoder

    out = check_output_dir(config.out, "--out")
    hook, manifest = _cache_hook(config)
    sizes = config.member_sizes
    if len(sizes) < 2 or len(set(sizes)) != len(sizes) or sizes[0] < 1:
        raise PrismaError(
            f"a family needs at least 2 distinct positive sizes, got {sizes}: use --n-sizes >= 2"
        )
    cls = ARCHITECTURES.get(config.architecture)
    # a family is stitched and meta-decomposed: SAEs of one hook, not transcoders/crosscoders
    families = sorted(
        n
        for n, c in ARCHITECTURES.items()
        if issubclass(c, SparseAutoencoder) and n not in _NOT_SAE
    )
    if config.architecture not in families:
        raise PrismaError(
            f"architecture {config.architecture!r} is not an SAE family: use one of {families}"
        )
    if config.k > sizes[0] and "k" in _config_fields(cls):
        raise PrismaError(
            f"k={config.k} exceeds the smallest member's {sizes[0]} latents: use a smaller --k "
            "or larger sizes"
        )
    for name, value in (("batch_size", config.batch_size),
                        ("eval_every_tokens", config.eval_every_tokens),
                        ("max_tokens", config.max_tokens)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrismaError(f"{name} must be a positive integer, got {value!r}")
    if config.max_tokens < config.batch_size:
        raise PrismaError(
            f"max_tokens {config.max_tokens} is less than one batch of {config.batch_size} rows"
        )
    if config.eval_every_tokens < config.batch_size:
        raise PrismaError(
            f"eval_every_tokens {config.eval_every_tokens} is less than one batch of "
            f"{config.batch_size} rows: evaluations happen between steps"
        )
    if not 0.0 < config.eval_fraction < 1.0:
        raise PrismaError(
            f"eval_fraction must be in (0, 1): the plateau is measured on the held-out split, "
            f"got {config.eval_fraction}"
        )
    if config.lr is not None and not config.lr > 0:
        raise PrismaError(f"lr must be positive, got {config.lr}")
    if config.seed < 0:
        raise PrismaError(f"seed must be >= 0, got {config.seed}")
    _check_accelerator(config.accelerator)
    config.criterion  # noqa: B018  (its own checks of window and rel_eps)
    d_in = int(manifest["shapes"][hook][-1])
    for n in sizes:  # the family's own checks (k, fields), without allocating weights
        _member_config(config, cls, n, d_in)
    recorded = out / RUN_FILE
    if recorded.is_file():
        try:
            earlier = json.loads(recorded.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            raise PrismaError(f"{recorded} is damaged: delete {str(out)!r} or use another --out")
        now = {**config.settings(), "hook": hook}
        changed = [key for key in now if earlier.get(key) != now[key]]
        if changed:
            key = changed[0]
            raise PrismaError(
                f"--out {str(out)!r} holds a family trained with other settings ({key} "
                f"{earlier.get(key)!r} there, {now[key]!r} now): use another --out or delete it"
            )
    return hook, manifest


def _check_accelerator(accelerator: str) -> None:
    """A Lightning accelerator this machine has (one line, before any training)."""
    known = ("auto", "cpu", "gpu", "cuda", "mps")
    if accelerator not in known:
        raise PrismaError(f"unknown accelerator {accelerator!r}: use one of {', '.join(known)}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PrismaError(
            f"accelerator {accelerator!r} but torch sees no CUDA GPU on this machine: use cpu"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise PrismaError("accelerator 'mps' but this machine has no MPS device: use cpu")


def _config_fields(cls: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls.config_class) if f.init}


def _member_config(config: FamilyConfig, cls: Any, n_latents: int, d_in: int) -> dict[str, Any]:
    """The ``init_args`` of a member (only the fields its family has), checked by its config."""
    fields = _config_fields(cls)
    unknown = sorted(set(config.dictionary_args) - fields)
    if unknown:
        raise PrismaError(
            f"{config.architecture} has no config field(s) {unknown}: drop them from the "
            "dictionary arguments"
        )
    args = {"d_in": d_in, "n_latents": n_latents, "seed": config.seed, "k": config.k,
            **config.dictionary_args}  # fmt: skip
    args = {key: value for key, value in args.items() if key in fields}
    cls.config_class(**args)
    return args


@contextlib.contextmanager
def _quiet_lightning(quiet: bool) -> Iterator[None]:
    """Lightning's device and tips banner and its deprecation noise, silenced when quiet."""
    loggers = [logging.getLogger(n) for n in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", module="lightning")
            for lg in loggers:
                lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def train_member(config: FamilyConfig, n_latents: int, hook: str) -> FamilyMember:
    """Train one member of ``n_latents`` latents until it plateaus (or ``max_tokens``) and save
    it in ``out/members/<name>``; a member already trained there with the same settings is
    reused."""
    import lightning.pytorch as pl

    from prisma_mm.sae import ARCHITECTURES
    from prisma_mm.train import ActivationDataModule, SAEModule, SaveDictionary

    name = config.member_name(n_latents)
    folder = Path(config.out) / "members" / name
    record = folder / MEMBER_FILE
    if record.is_file() and (folder / "dictionary" / "weights.safetensors").is_file():
        return FamilyMember.from_dict(json.loads(record.read_text()))
    started = time.perf_counter()
    data = ActivationDataModule(
        str(config.cache_dir),
        hook,
        batch_size=config.batch_size,
        num_workers=0,  # one reader process: the order of batches is the same for every member
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
        eval_fraction=config.eval_fraction,
    )
    cls = ARCHITECTURES[config.architecture]
    dictionary = cls(**_member_config(config, cls, n_latents, data.d_in))
    steps = math.ceil(config.max_tokens / config.batch_size)
    module = SAEModule(
        dictionary,
        lr=config.lr,
        lr_warmup_steps=config.lr_warmup_steps,
        lr_decay="constant",
        total_tokens=steps * config.batch_size,
        init_sample_rows=config.init_sample_rows,
    )
    stop = plateau_stop(config.criterion)
    with _quiet_lightning(not config.progress):  # no banner per member
        trainer = pl.Trainer(
            accelerator=config.accelerator,
            devices=1,
            max_steps=steps,
            max_epochs=-1,
            val_check_interval=max(1, config.eval_every_tokens // config.batch_size),
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=config.progress,
            default_root_dir=str(folder),
            callbacks=[stop, SaveDictionary(dirpath=str(folder / "dictionary"))],
        )
        trainer.fit(module, datamodule=data)
    member = FamilyMember(
        name=name,
        n_latents=n_latents,
        path=folder / "dictionary",
        curve=stop.curve,
        plateaued=stop.plateau_tokens is not None,
        plateau_tokens=stop.plateau_tokens,
        tokens_trained=int(module.tokens_seen),
        first_batch_checksum=stop.first_batch_checksum,
        seconds=round(time.perf_counter() - started, 1),
    )
    record.write_text(json.dumps(member.to_dict(), indent=1))
    return member


def train_family(config: FamilyConfig) -> list[FamilyMember]:
    """Train every member of the family (smallest first); see :class:`FamilyConfig`. Checks
    everything first (:func:`check_family_config`); a re-run reuses finished members."""
    hook, _ = check_family_config(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({**config.settings(), "hook": hook}, indent=1))
    members = []
    for i, n in enumerate(config.member_sizes):
        if config.progress:
            print(f"[family {i + 1}/{len(config.member_sizes)}] {config.member_name(n)}")
        members.append(train_member(config, n, hook))
    return members


# ----- held-out toy-world data ---------------------------------------------------------------
@dataclass
class ToyHeldOut:
    """Held-out toy-world images as the report takes them: ``batches`` of ``(images [B, 3, H,
    W] preprocessed, multi-hot labels [B, n_values])``, the activations at the hook ``acts
    [n, tokens, d]``, and per patch the value labels ``patch_labels [n, n_patches, n_values]``
    and conjunction labels ``patch_conjunctions [n, n_patches, n_conjunctions]`` (``parts``
    gives each conjunction's two values); ``n_prefix`` tokens (CLS) come before the patches."""

    batches: list[tuple[Tensor, Tensor]]
    acts: Tensor
    patch_labels: Tensor
    patch_conjunctions: Tensor
    parts: list[tuple[int, int]]
    value_names: list[str]
    n_prefix: int

    @property
    def rows(self) -> Tensor:
        """``[n * tokens, d]``: every token row (what the SAEs were trained on)."""
        return self.acts.reshape(-1, self.acts.shape[-1])

    @property
    def patch_rows(self) -> Tensor:
        """``[n * n_patches, d]``: the patch tokens' rows, image-major."""
        return self.acts[:, self.n_prefix :].reshape(-1, self.acts.shape[-1])

    @property
    def conjunction_names(self) -> list[str]:
        from prisma_mm.analysis.ground_truth import conjunction_names

        return conjunction_names(self.parts, self.value_names)


@torch.no_grad()
def toy_held_out(
    model: Any,
    hook: str,
    n_images: int,
    seed: int = 0,
    start: int = 0,
    pairs: Sequence[tuple[str, str]] | None = None,
    batch: int = 100,
) -> ToyHeldOut:
    """Render toy-world images ``start .. start + n_images - 1`` of ``seed`` (at the model's
    input size), label their patches on the model's patch grid (values and the conjunctions
    of the factor ``pairs``, default every pair of object factors) and read ``hook``."""
    from prisma_mm.analysis.ground_truth import (
        CONJUNCTION_PAIRS,
        conjunction_parts,
        patch_conjunctions,
    )
    from prisma_mm.data.toyworld import VALUE_NAMES, image_labels, patch_labels, render

    if n_images < 2:
        raise PrismaError(f"the held-out set needs at least 2 images, got {n_images}")
    layout = model.layout
    grid = tuple(int(g) for g in layout.grid[1:])
    size = int(layout.input_size[-1]) if layout.input_size else 64
    parts = conjunction_parts(CONJUNCTION_PAIRS if pairs is None else pairs)
    batches, acts, values, conjunctions = [], [], [], []
    for first in range(start, start + n_images, batch):
        images, hot = [], []
        for index in range(first, min(first + batch, start + n_images)):
            image, owner, scene = render(seed, index, size)
            images.append(image)
            hot.append(image_labels(scene))
            values.append(patch_labels(scene, owner, grid).reshape(-1, len(VALUE_NAMES)))
            conjunctions.append(
                patch_conjunctions(scene, owner, grid, parts).reshape(-1, len(parts))
            )
        x = model.preprocess(images)
        _, cache = model.run_with_cache(x, [hook])
        batches.append((x, torch.from_numpy(np.stack(hot))))
        acts.append(cache[hook].float())
    return ToyHeldOut(
        batches=batches,
        acts=torch.cat(acts),
        patch_labels=torch.from_numpy(np.stack(values)).float(),
        patch_conjunctions=torch.from_numpy(np.stack(conjunctions)).float(),
        parts=parts,
        value_names=list(VALUE_NAMES),
        n_prefix=int(layout.n_prefix),
    )


# ----- the report ----------------------------------------------------------------------------
@torch.no_grad()
def _encode(sae: Any, rows: Tensor, chunk: int = 8192) -> Tensor:
    """Inference codes ``[n, n_latents]`` of ``rows [n, d]``."""
    sae.eval()
    return torch.cat([sae.encode(part) for part in rows.split(chunk)]).float()


@dataclass
class _LabelScores:
    """One member against the patch labels: full-data AUROCs ``values [L, V]`` and
    ``conjunctions [L, C]``, conjunction ``detectors [L, C]`` (the rule of
    :func:`~prisma_mm.analysis.ground_truth.conjunction_detectors`), and per label whether a
    latent chosen on the first half of the images is a detector on the second half."""

    values: Tensor
    conjunctions: Tensor
    detectors: Tensor
    value_dedicated: Tensor  # [V] bool (held out)
    conjunction_dedicated: Tensor  # [C] bool (held out)
    value_scorable: Tensor  # [V] bool
    conjunction_scorable: Tensor  # [C] bool


def _ground_truth(codes: Tensor, data: ToyHeldOut) -> Any:
    """The ground-truth report (:func:`~prisma_mm.analysis.ground_truth.score_ground_truth`)
    of patch codes ``[n_images * n_patches, L]`` (image-major) on ``data``'s labels."""
    from prisma_mm.analysis.ground_truth import score_ground_truth

    n_images, n_patches = data.patch_labels.shape[:2]
    return score_ground_truth(
        data.value_names,
        patch_codes=codes.reshape(n_images, n_patches, -1),
        patch_labels=data.patch_labels,
        image_labels=torch.cat([labels for _, labels in data.batches]).float(),
    )


def _label_scores(
    codes: Tensor, data: ToyHeldOut, threshold: float, margin: float, min_positive: int
) -> _LabelScores:
    """Score patch codes ``[n_images * n_patches, L]`` (image-major) against ``data``'s
    labels: AUROC on all rows, and the held-out dedicated-latent test on halves by image."""
    from prisma_mm.analysis.ground_truth import auroc, conjunction_detectors

    n_images, n_patches = data.patch_labels.shape[:2]
    n_values = data.patch_labels.shape[-1]
    labels = torch.cat(
        [
            data.patch_labels.reshape(-1, n_values),
            data.patch_conjunctions.reshape(-1, len(data.parts)),
        ],
        dim=1,
    )
    cut = (n_images // 2) * n_patches
    halves = [(codes[:cut], labels[:cut]), (codes[cut:], labels[cut:])]
    positives = torch.stack([y.sum(0) for _, y in halves])  # [2, V + C]
    negatives = torch.stack([y.shape[0] - y.sum(0) for _, y in halves])
    scorable = ((positives >= min_positive) & (negatives >= min_positive)).all(0)

    def split(au: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        au = au.clone()
        au[:, ~scorable] = float("nan")
        values, conjunctions = au[:, :n_values], au[:, n_values:]
        detectors = conjunction_detectors(values, conjunctions, data.parts, threshold, margin)
        return values, conjunctions, detectors

    full = split(auroc(codes, labels))
    first, second = (split(auroc(c, y)) for c, y in halves)
    chosen_value = torch.nan_to_num(first[0], nan=-1.0).argmax(0)  # [V]
    value_dedicated = second[0].gather(0, chosen_value[None]).squeeze(0) >= threshold
    ranked = torch.where(first[2], first[1], torch.full_like(first[1], -1.0))  # detectors only
    chosen_conj = ranked.argmax(0)  # [C]
    conj_dedicated = first[2].any(0) & second[2].gather(0, chosen_conj[None]).squeeze(0)
    return _LabelScores(
        values=full[0],
        conjunctions=full[1],
        detectors=full[2],
        value_dedicated=value_dedicated & scorable[:n_values],
        conjunction_dedicated=conj_dedicated & scorable[n_values:],
        value_scorable=scorable[:n_values],
        conjunction_scorable=scorable[n_values:],
    )


def _best_label(
    scores: _LabelScores, latent: int, data: ToyHeldOut, threshold: float
) -> dict[str, Any]:
    """What one latent detects: its best value, its best conjunction it is a detector of,
    and the label that describes it (the conjunction when it detects one, else the value
    when its AUROC reaches ``threshold``, else None)."""
    values = torch.nan_to_num(scores.values[latent], nan=-1.0)
    v = int(values.argmax())
    row: dict[str, Any] = {
        "latent": latent,
        "value": data.value_names[v],
        "value_auroc": float(values[v]),
        "conjunction": None,
        "conjunction_auroc": None,
    }
    detected = scores.detectors[latent]
    if bool(detected.any()):
        conj = torch.where(detected, scores.conjunctions[latent], torch.full_like(values[:1], -1.0))
        c = int(conj.argmax())
        row["conjunction"] = data.conjunction_names[c]
        row["conjunction_auroc"] = float(conj[c])
        row["label"], row["kind"], row["index"] = row["conjunction"], "conjunction", c
    elif values[v] >= threshold:
        row["label"], row["kind"], row["index"] = row["value"], "value", v
    else:
        row["label"], row["kind"], row["index"] = None, None, None
    return row


def _had_label(scores: _LabelScores, row: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Whether another member (the smaller SAE) has a latent for ``row``'s label: a detector
    of the conjunction, or a latent with AUROC >= threshold for the value."""
    if row["kind"] is None:
        return {"small_has_label": None, "small_best_auroc": None}
    if row["kind"] == "value":
        column = torch.nan_to_num(scores.values[:, row["index"]], nan=-1.0)
        return {"small_has_label": bool(column.max() >= threshold),
                "small_best_auroc": float(column.max())}  # fmt: skip
    column = torch.nan_to_num(scores.conjunctions[:, row["index"]], nan=-1.0)
    return {
        "small_has_label": bool(scores.detectors[:, row["index"]].any()),
        "small_best_auroc": float(column.max()),
    }


def _novel_ground_truth(
    novel: np.ndarray,
    small: _LabelScores,
    large: _LabelScores,
    data: ToyHeldOut,
    threshold: float,
) -> dict[str, Any]:
    """What the novel latents of a pair detect, and whether the smaller SAE had the label."""
    from collections import Counter

    rows = []
    for j in np.flatnonzero(novel).tolist():
        row = _best_label(large, int(j), data, threshold)
        row.update(_had_label(small, row, threshold))
        rows.append(row)
    labelled = [r for r in rows if r["kind"] is not None]
    new_labels = {r["label"] for r in labelled if not r["small_has_label"]}
    return {
        "n_novel": len(rows),
        "n_labelled": len(labelled),
        "n_value": sum(r["kind"] == "value" for r in labelled),
        "n_conjunction": sum(r["kind"] == "conjunction" for r in labelled),
        "n_small_had_label": sum(bool(r["small_has_label"]) for r in labelled),
        "n_new_labels": len(new_labels),
        "top_labels": Counter(r["label"] for r in labelled).most_common(10),
        "latents": rows,
    }


def _meta_stage(
    large: Any,
    scores: _LabelScores,
    data: ToyHeldOut,
    *,
    threshold: float,
    k: int,
    steps: int,
    n_shuffles: int,
    seed: int,
    out: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """The meta-SAE of the largest member and its decomposition of the conjunction latents."""
    from prisma_mm.analysis.ground_truth import carried_values
    from prisma_mm.analysis.meta_sae import decomposition_score, train_meta_sae

    result = train_meta_sae(large, k=k, steps=steps, seed=seed, progress=progress)
    if out is not None:
        result.save(out / "meta_sae")
    carried = carried_values(scores.values, scores.detectors, data.parts, threshold)
    targets = []
    for j in scores.detectors.any(1).nonzero().flatten().tolist():
        conj = torch.where(scores.detectors[j], scores.conjunctions[j], torch.tensor(-1.0).double())
        targets.append((j, list(data.parts[int(conj.argmax())])))
    score = decomposition_score(
        result.codes, carried, targets, value_names=data.value_names, n_shuffles=n_shuffles,
        seed=seed,
    )  # fmt: skip
    return {
        "n_meta": result.n_meta,
        "k": k,
        "fvu": result.fvu,
        "paper_fvu": PAPER_META_FVU,
        "mean_meta_per_latent": result.mean_meta_per_latent,
        "n_latents_carrying_a_value": int(carried.any(1).sum()),
        "n_conjunction_latents": len(targets),
        "decomposition": score.to_dict(),
    }


def family_report(
    members: Sequence[FamilyMember],
    *,
    held_out: ToyHeldOut | None = None,
    rows: Tensor | None = None,
    model: Any = None,
    hook: str | None = None,
    criterion: PlateauCriterion | None = None,
    threshold: float = 0.9,
    margin: float = 0.05,
    min_positive: int = 20,
    stitch_points: int = 24,
    meta_k: int = 4,
    meta_steps: int = 1000,
    n_shuffles: int = 200,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = False,
    means: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """The family report (module doc; fields in docs/families.md) of trained ``members``
    (smallest first), on ``held_out`` toy-world data (metrics on all its token rows, ground
    truth on its patches, spliced-in accuracy with ``model`` at ``hook``), or without ground
    truth on held-out ``rows [n, d]``. ``out``: where the stitching plots and the meta-SAE go.
    With ``model``, each member's row also has ``splice_identity_error`` (the SAE with its
    error term kept against the clean run); ``means`` ({hook: [d]}, e.g. the cache's running
    mean) adds the model's mean-ablated accuracy to the report.
    """
    from prisma_mm.analysis.metrics import evaluate
    from prisma_mm.analysis.spliced import spliced_eval
    from prisma_mm.analysis.stitching import plot_stitching, stitch

    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)

    if held_out is None and rows is None:
        raise PrismaError("family_report needs held_out toy-world data or held-out rows")
    if len(members) < 2:
        raise PrismaError(f"a family report needs at least 2 members, got {len(members)}")
    members = sorted(members, key=lambda m: m.n_latents)
    x = held_out.rows if held_out is not None else rows
    assert x is not None
    saes = [m.load() for m in members]
    checksums = {m.first_batch_checksum for m in members}
    report: dict[str, Any] = {
        "criterion": asdict(criterion) if criterion else None,
        "criterion_text": criterion.describe() if criterion else None,
        "shared_data_order": len(checksums) == 1 and None not in checksums,
        "n_rows": int(x.shape[0]),
        "thresholds": {
            "detect_auroc": threshold,
            "conjunction_margin": margin,
            "min_positive": min_positive,
        },  # fmt: skip
        "members": [],
        "pairs": [],
    }
    scores: list[_LabelScores] = []
    seconds = dict.fromkeys(("metrics", "spliced", "ground_truth", "stitching", "meta_sae"), 0.0)
    clock = time.perf_counter()

    def lap(stage: str) -> None:  # where the report's time goes, for sizing a run
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] += now - clock
        clock = now

    for member, sae in zip(members, saes):
        metrics = evaluate(sae, [x], progress=False)
        lap("metrics")
        row: dict[str, Any] = {
            "name": member.name,
            "n_latents": member.n_latents,
            "path": str(member.path),
            "fvu": metrics.fvu,
            "mse": metrics.mse,
            "l0": metrics.l0,
            "dead_fraction": metrics.dead_fraction,
            "plateaued": member.plateaued,
            "plateau_tokens": member.plateau_tokens,
            "tokens_trained": member.tokens_trained,
            "train_seconds": member.seconds,
            "curve": [[int(t), float(f)] for t, f in member.curve],
        }
        if model is not None and held_out is not None:
            # the clean and mean-ablated runs do not depend on the SAE: measured with the first
            ablate = means is not None and "mean_ablated_accuracy" not in report
            spliced = spliced_eval(model, sae, held_out.batches, hooks=[hook], task="multilabel",
                                   means=means if ablate else None, progress=False,
                                   modes=("spliced", "with_error") + (("mean",) if ablate else ()),
                                   )  # fmt: skip
            row["spliced_accuracy"] = spliced.modes["spliced"].accuracy
            row["splice_identity_error"] = spliced.max_abs_error_with_error
            report.setdefault("clean_accuracy", spliced.modes["clean"].accuracy)
            if ablate:
                report["mean_ablated_accuracy"] = spliced.modes["mean"].accuracy
            lap("spliced")
        if held_out is not None:
            codes = _encode(sae, held_out.patch_rows)
            s = _label_scores(codes, held_out, threshold, margin, min_positive)
            scores.append(s)
            row["values_with_latent"] = int(s.value_dedicated.sum())
            row["conjunctions_with_latent"] = int(s.conjunction_dedicated.sum())
            row["values_scorable"] = int(s.value_scorable.sum())
            row["conjunctions_scorable"] = int(s.conjunction_scorable.sum())
            truth = _ground_truth(codes, held_out)
            row["ground_truth"] = truth.summary()
            if out is not None:  # per-value best latents, for a browser's ground-truth column
                path = Path(out) / f"ground_truth_{member.name}.json"
                path.write_text(json.dumps(truth.to_dict()))
                row["ground_truth_json"] = str(path)
            lap("ground_truth")
        report["members"].append(row)
    for i in range(len(members) - 1):
        small, large = saes[i], saes[i + 1]
        result = stitch(small, large, x, max_points=stitch_points, progress=progress)
        classes = result.classes
        pair: dict[str, Any] = {
            "small": members[i].name,
            "large": members[i + 1].name,
            "family": result.family,
            **classes.counts(),
            "agreement": classes.agreement,
            "confusion": classes.confusion(),
            "monotone": result.monotone,
            "n_increases": result.n_increases,
            "max_relative_increase": result.max_relative_increase,
            "mse_small": classes.mse_small,
            "mse_large": result.mse_large,
            "curve": [{"n_latents": r["n_latents"], "mse": r["mse"]} for r in result.curve],
        }
        if out is not None:
            stem = Path(out) / f"stitch_{members[i].name}_{members[i + 1].name}"
            pair["plot"] = str(plot_stitching(result, stem.with_suffix(".png")))
            # per-latent classes, in the format the browser's read_stitching takes
            stem.with_suffix(".json").write_text(json.dumps(_jsonable(result.to_dict())))
            pair["stitch_json"] = str(stem.with_suffix(".json"))
        lap("stitching")
        if held_out is not None:
            pair["novel_ground_truth"] = _novel_ground_truth(
                classes.novel_test, scores[i], scores[i + 1], held_out, threshold
            )
            lap("ground_truth")
        report["pairs"].append(pair)
    if held_out is not None:
        report["meta_sae"] = {
            "of": members[-1].name,
            **_meta_stage(saes[-1], scores[-1], held_out, threshold=threshold, k=meta_k,
                          steps=meta_steps, n_shuffles=n_shuffles, seed=seed,
                          out=Path(out) if out is not None else None, progress=progress),
        }  # fmt: skip
        lap("meta_sae")
    report["report_seconds"] = {stage: round(t, 2) for stage, t in seconds.items()}
    return report


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def family_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the family table, one paragraph per pair, the meta-SAE."""
    lines = ["# SAE family report", ""]
    if report.get("criterion_text"):
        lines += [f"Training stops when {report['criterion_text']}.", ""]
    lines.append(f"Members share one data order: {report['shared_data_order']}.")
    if "clean_accuracy" in report:
        lines.append(f"Model accuracy without an SAE: {report['clean_accuracy']:.3f}.")
    gt = "values_with_latent" in report["members"][0]
    lines += [
        "",
        "| SAE | latents | FVU | L0 | dead | spliced acc. | plateaued | at tokens | trained "
        "tokens |" + (" values w/ latent | conj. w/ latent |" if gt else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gt else ""),
    ]
    for m in report["members"]:
        cells = [m["name"], str(m["n_latents"]), _fmt(m["fvu"]), _fmt(m["l0"], ".1f"),
                 _fmt(m["dead_fraction"]), _fmt(m.get("spliced_accuracy")),
                 "yes" if m["plateaued"] else "no", str(m["plateau_tokens"] or "-"),
                 str(m["tokens_trained"])]  # fmt: skip
        if gt:
            cells += [f"{m['values_with_latent']} / {m['values_scorable']}",
                      f"{m['conjunctions_with_latent']} / {m['conjunctions_scorable']}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for p in report["pairs"]:
        curve = " -> ".join(_fmt(r["mse"], ".4g") for r in p["curve"])
        lines += [
            "",
            f"## {p['small']} -> {p['large']}",
            "",
            f"Stitching ({p['family']}): MSE {curve}; monotone: {p['monotone']} "
            f"({p['n_increases']} increases).",
            f"Latents of {p['large']} by the exact test: {p['n_novel_test']} novel, "
            f"{p['n_reconstruction_test']} reconstruction, {p['n_inactive']} inactive; "
            f"{p['n_novel_proxy']} novel by the cosine proxy; agreement "
            f"{_fmt(p['agreement'])} on the active ones.",
        ]
        gtn = p.get("novel_ground_truth")
        if gtn:
            top = ", ".join(f"{label} ({n})" for label, n in gtn["top_labels"]) or "none"
            lines.append(
                f"Novel latents against ground truth: {gtn['n_labelled']} of {gtn['n_novel']} "
                f"detect a label ({gtn['n_value']} a factor value, {gtn['n_conjunction']} a "
                f"conjunction); {gtn['n_small_had_label']} of those labels already had a "
                f"latent in {p['small']}; {gtn['n_new_labels']} labels are new. Most common: "
                f"{top}."
            )
    ms = report.get("meta_sae")
    if ms:
        d = ms["decomposition"]
        lines += [
            "",
            f"## Meta-SAE of {ms['of']}",
            "",
            f"{ms['n_meta']} meta-latents at k = {ms['k']}: FVU {ms['fvu']:.3f} (paper: about "
            f"{ms['paper_fvu']}).",
            f"{ms['n_conjunction_latents']} latents detect a conjunction better than either of "
            f"its parts. Decomposition score {_fmt(d['score'])} vs {_fmt(d['shuffled_score'])} "
            f"± {_fmt(d['shuffled_score_std'])} with the latents' values shuffled "
            f"(p = {_fmt(d['p_value'], '.3g')}); decomposed into both parts: "
            f"{_fmt(d['fraction_decomposed'])} vs {_fmt(d['shuffled_fraction_decomposed'])} "
            "shuffled.",
        ]
    return "\n".join(lines) + "\n"


def write_family_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``out/family_report.json`` and ``out/family_report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "family_report.json", out / "family_report.md"
    json_path.write_text(json.dumps(_jsonable(report), indent=1))
    md_path.write_text(family_markdown(report))
    return json_path, md_path


# ----- the command line ----------------------------------------------------------------------
def run_family(args: argparse.Namespace) -> int:
    """``prisma-mm family --cache CACHE --out DIR``: train the family, write its report."""
    import prisma_mm
    from prisma_mm.analysis.cli import DEFAULT_STITCH_TOKENS, load_cache_rows

    started = time.perf_counter()
    config = FamilyConfig(
        cache_dir=Path(args.cache),
        out=Path(args.out),
        hook=args.hook,
        architecture=args.architecture,
        base_latents=args.base_latents,
        n_sizes=args.n_sizes,
        sizes=args.sizes,
        k=args.k,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every_tokens=args.eval_every_tokens,
        max_tokens=args.max_tokens,
        plateau_window=args.plateau_window,
        plateau_rel_eps=args.plateau_eps,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        accelerator=args.accelerator,
        progress=not args.quiet,
    )
    hook, manifest = check_family_config(config)
    model = held = rows = None
    if args.held_out == "toyworld":
        name = (manifest.get("model") or {}).get("name")
        if not name:
            raise PrismaError(f"cache {args.cache!r} names no model: use --held-out cache")
        model = prisma_mm.load_model(name)
        model.hook_point(hook)
    members = train_family(config)
    if model is not None:
        start = args.eval_start if args.eval_start is not None else int(manifest["inputs_done"])
        held = toy_held_out(model, hook, args.n_eval, seed=args.toyworld_seed, start=start)
    else:
        rows = load_cache_rows(str(config.cache_dir), [hook], DEFAULT_STITCH_TOKENS, "eval",
                               config.eval_fraction, config.seed)  # fmt: skip
    report = family_report(
        members, held_out=held, rows=rows, model=model, hook=hook, criterion=config.criterion,
        stitch_points=args.stitch_points, meta_k=args.meta_k, meta_steps=args.meta_steps,
        seed=config.seed, out=config.out, progress=not args.quiet,
    )  # fmt: skip
    report["settings"] = {**config.settings(), "sizes": config.member_sizes}
    report["seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_family_report(report, config.out)
    print(family_markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


def add_family_parser(subparsers: Any) -> None:
    """Add ``prisma-mm family`` to a ``prisma-mm`` subparsers."""
    from prisma_mm.analysis.cli import _float_in, _int_at_least, _positive_int

    d = FamilyConfig(cache_dir=Path("."), out=Path("."))
    p = subparsers.add_parser(
        "family",
        help="train SAEs of doubling size on one cache until they plateau, and compare them",
        description="Train a family of dictionaries of doubling size (BatchTopK by default) on "
        "one cache, with one data order, each until its held-out FVU plateaus; then report "
        "FVU, L0, dead fraction and spliced-in accuracy per size, stitching between adjacent "
        "sizes, the novel latents and a meta-SAE against the toy world's ground truth "
        "(docs/families.md). Writes OUT/family_report.json and .md.",
    )
    p.add_argument("--cache", required=True, help="activation cache directory")
    p.add_argument("--out", required=True, help="output folder (members, report, plots)")
    p.add_argument("--hook", default=None, help="hook to train on (default: the cache's only)")
    p.add_argument("--architecture", default=d.architecture, help="SAE family (default batchtopk)")
    p.add_argument("--base-latents", type=_positive_int, default=d.base_latents)
    p.add_argument("--n-sizes", type=_int_at_least(2), default=d.n_sizes,
                   help="members: base, 2 x base, 4 x base ...")  # fmt: skip
    p.add_argument("--sizes", type=_positive_int, nargs="+", default=None,
                   help="explicit member sizes instead of --base-latents/--n-sizes")  # fmt: skip
    p.add_argument("--k", type=_positive_int, default=d.k)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=_float_in(0.0, 1.0, low_open=True), default=None)
    p.add_argument("--eval-every-tokens", type=_positive_int, default=d.eval_every_tokens)
    p.add_argument("--max-tokens", type=_positive_int, default=d.max_tokens,
                   help="training budget per member when it does not plateau")  # fmt: skip
    p.add_argument("--plateau-window", type=_positive_int, default=d.plateau_window,
                   help="evaluations in the plateau window")  # fmt: skip
    p.add_argument("--plateau-eps", type=_float_in(0.0, 1.0, low_open=True, high_open=True),
                   default=d.plateau_rel_eps, help="relative FVU improvement below which "
                   "the window counts as a plateau")  # fmt: skip
    p.add_argument("--eval-fraction", type=_float_in(0.0, 1.0, low_open=True, high_open=True),
                   default=d.eval_fraction, help="cache inputs held out for the plateau's FVU")  # fmt: skip
    p.add_argument("--held-out", choices=("toyworld", "cache"), default="toyworld",
                   help="toyworld: render held-out toy-world images (ground truth, spliced "
                   "accuracy); cache: up to 65536 rows of the cache's held-out split (no "
                   "ground truth)")  # fmt: skip
    p.add_argument("--n-eval", type=_int_at_least(2), default=400,
                   help="held-out toy-world images")  # fmt: skip
    p.add_argument(
        "--eval-start",
        type=_int_at_least(0),
        default=None,
        help="first held-out toy-world image (default: after the cache's inputs)",
    )
    p.add_argument("--toyworld-seed", type=_int_at_least(0), default=0)
    p.add_argument("--stitch-points", type=_int_at_least(2), default=24)
    p.add_argument("--meta-k", type=_positive_int, default=4)
    p.add_argument("--meta-steps", type=_positive_int, default=1000)
    p.add_argument("--seed", type=_int_at_least(0), default=d.seed)
    p.add_argument("--accelerator", default=d.accelerator, help="Lightning accelerator")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_family)
