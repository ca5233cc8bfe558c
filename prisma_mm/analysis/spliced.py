"""Spliced-in evaluation: run the model with a hook's activation replaced by the dictionary's
reconstruction and measure what the model's task loses.

One clean pass caches the dictionary's hooks; every other pass replaces, token by token (the
tokens the dictionary was trained on: ``token_index``, default all), the activation at the
replaced hook(s) by a tensor computed from the clean activations:

===================  ============================  =========================================
kind                 reads (clean)                  replaces
===================  ============================  =========================================
SAE                  its hook ``h``                 ``h`` with ``recon(x_h)``
transcoder           ``[h_in, h_out]``              ``h_out`` with ``transcoder(x_in)``
crosscoder           its sources ``[h_1 .. h_S]``   every ``h_s`` with ``recon(x_1..x_S)[s]``
===================  ============================  =========================================

Modes: ``spliced`` (the reconstruction), ``with_error`` (reconstruction + the clean error
term ``x - recon``, which must give back the clean outputs), ``zero`` and ``mean`` ablation
(the replaced activation set to 0 or to a per-dimension mean).

Task: classifier cards give logits; CLIP / SigLIP cards give zero-shot logits
``scale * <normalize(image_embedding), text_c> + bias`` with ``text_c`` the unit-norm mean of
the class's prompt embeddings. Per mode: cross-entropy and accuracy against the labels,
``KL(p_clean || p_mode)`` (softmax over the classes) and top-1 agreement with the clean run.
A ``multilabel`` task (``task="multilabel"``: independent sigmoid outputs, e.g. ``toyvit``
predicting every toy-world factor value) takes multi-hot labels ``[B, n_classes]``; per
image, CE is the mean binary cross-entropy over the classes, accuracy the fraction of classes
decided right (``logit > 0`` against the label), KL the sum over classes of the Bernoulli
``KL(p_clean || p_mode)``, and ``top1_agreement`` the fraction of decisions the clean run
makes alike.
``score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`` for zero and mean ablation,
``kl_score = (KL_ablated - KL_spliced) / KL_ablated``. Dictionaries take raw activations (the
training normalization is folded into their weights), so no normalization happens here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError
from prisma_mm.sae.base import Dictionary, SparseAutoencoder

__all__ = [
    "MODES",
    "ModeResult",
    "Splice",
    "SplicedResult",
    "TaskHead",
    "dictionary_hooks",
    "make_spliced_loss",
    "reconstruct",
    "spliced_eval",
    "task_head",
]

MODES = ("clean", "spliced", "with_error", "zero", "mean")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_ROW_CHUNK = 4096


def dictionary_hooks(dictionary: Dictionary, hooks: str | Sequence[str] | None = None) -> list[str]:
    """The hook names a dictionary reads: ``hooks`` when given, else its metadata's ``hook``.

    SAE: ``[hook]``; transcoder: ``[input_hook, output_hook]``; crosscoder: its sources.
    """
    value: Any = hooks if hooks is not None else dictionary.metadata.get("hook")
    if value is None:
        raise PrismaError(
            "the dictionary does not record its hook (cfg.json metadata 'hook'): pass hooks="
        )
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    architecture = getattr(dictionary, "architecture", "")
    expected = {"transcoder": 2, "crosscoder": getattr(dictionary.cfg, "n_sources", None)}.get(
        architecture, 1
    )
    if len(names) != expected:
        raise PrismaError(
            f"a {architecture or 'dictionary'} reads {expected} hook(s); got {names}"
            + (" ([input_hook, output_hook])" if architecture == "transcoder" else "")
        )
    return names


@torch.no_grad()
def reconstruct(dictionary: Dictionary, x: Tensor, chunk: int = _ROW_CHUNK) -> Tensor:
    """The dictionary's inference reconstruction of rows ``x [n, d_in]`` (crosscoder
    ``[n, n_sources, d]``) -> ``[n, d_out]`` (crosscoder ``[n, n_sources, d]``), in the dtype
    of ``x``; rows go through in chunks of ``chunk``. Transcoders include their skip path."""
    param = next(dictionary.parameters())
    was_training = dictionary.training
    dictionary.eval()
    parts = []
    try:
        for part in x.split(chunk):
            rows = part.to(param.device, param.dtype)
            if isinstance(dictionary, SparseAutoencoder):
                recon = dictionary.decode(dictionary.encode(rows))
                skip = dictionary.skip(rows.reshape(rows.shape[0], -1))
                if skip is not None:
                    recon = recon + skip.reshape(recon.shape)
            else:
                recon = dictionary(rows).recon
            parts.append(recon.to(x.device, x.dtype))
    finally:
        dictionary.train(was_training)
    return torch.cat(parts) if parts else x.new_zeros((0,))


# ----- the task ------------------------------------------------------------------------------
@dataclass
class TaskHead:
    """Turns the model's output into class logits ``[batch, n_classes]``.

    ``kind``: ``"classifier"`` (the output is the logits of one class), ``"multilabel"`` (the
    output is one independent sigmoid logit per class) or ``"clip"`` (the output is the image
    embedding; ``text [n_classes, e]`` unit-norm class embeddings, logits
    ``logit_scale * normalize(output) @ text.T + logit_bias``).
    """

    kind: str
    text: Tensor | None = None
    logit_scale: float = 1.0
    logit_bias: float = 0.0
    class_names: list[str] | None = None

    def logits(self, output: Tensor) -> Tensor:
        """``output [batch, ...]`` -> float32 logits ``[batch, n_classes]``."""
        output = output.float()
        if self.kind in ("classifier", "multilabel"):
            return output
        assert self.text is not None
        image = F.normalize(output, dim=-1)
        return self.logit_scale * image @ self.text.to(image.device).T + self.logit_bias


def task_head(
    model: Any,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    task: str | None = None,
) -> TaskHead:
    """The task of a hooked model: its card's ``task`` (or ``task=``), ``"classifier"``,
    ``"multilabel"`` or ``"clip"``. CLIP / SigLIP need ``class_names``; each is put into every
    template (``"a photo of a {}."``), encoded with ``model.encode_text`` and the unit-norm mean
    kept."""
    kind = task or getattr(getattr(model, "card", None), "task", None) or "classifier"
    if kind in ("classifier", "multilabel"):
        return TaskHead(kind, class_names=list(class_names) if class_names else None)
    if kind != "clip":
        raise PrismaError(
            f"spliced evaluation measures a classifier's (single- or multi-label) or a "
            f"CLIP/SigLIP model's task; this model's task is {kind!r} (evaluate reconstruction "
            "metrics with `prisma-mm eval` without --data)"
        )
    if not class_names:
        raise PrismaError("zero-shot evaluation of a CLIP/SigLIP model needs class names")
    if not templates or any("{}" not in t for t in templates):
        raise PrismaError("each zero-shot template must contain '{}' for the class name")
    names = list(class_names)
    prompts = [t.format(name) for name in names for t in templates]
    embeddings = model.encode_text(prompts).float().reshape(len(names), len(templates), -1)
    text = F.normalize(F.normalize(embeddings, dim=-1).mean(1), dim=-1)
    module = model.module
    scale = getattr(module, "logit_scale", None)
    bias = getattr(module, "logit_bias", None)
    if not isinstance(scale, Tensor):
        raise PrismaError(
            f"{type(module).__name__} has no logit_scale: zero-shot evaluation needs an "
            "open_clip CLIP / SigLIP model"
        )
    return TaskHead(
        "clip",
        text=text,
        logit_scale=float(scale.detach().exp()),
        logit_bias=float(bias.detach()) if isinstance(bias, Tensor) else 0.0,
        class_names=names,
    )


# ----- splicing ------------------------------------------------------------------------------
class Splice:
    """Splices ``dictionary`` into ``model`` at its hooks (see the module doc for each kind).

    ``token_index``: the token positions replaced (those the dictionary was trained on, e.g.
    the cache manifest's ``token_index``); None replaces every token.
    """

    def __init__(
        self,
        model: Any,
        dictionary: Dictionary,
        hooks: str | Sequence[str] | None = None,
        token_index: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.dictionary = dictionary
        self.kind = {"transcoder": "transcoder", "crosscoder": "crosscoder"}.get(
            getattr(dictionary, "architecture", ""), "sae"
        )
        self.hooks = dictionary_hooks(dictionary, hooks)
        points = [model.hook_point(name) for name in self.hooks]
        if self.kind == "transcoder" and points[1].order <= points[0].order:
            raise PrismaError(
                f"transcoder output hook {self.hooks[1]!r} must come after its input hook "
                f"{self.hooks[0]!r} in the forward pass"
            )
        self.replaced = [self.hooks[1]] if self.kind == "transcoder" else list(self.hooks)
        self.token_index = None if token_index is None else [int(t) for t in token_index]

    def _select(self, act: Tensor) -> Tensor:
        """``[batch, tokens, d]`` -> the replaced tokens ``[batch, n_selected, d]``."""
        if self.token_index is None:
            return act
        if max(self.token_index, default=-1) >= act.shape[1]:
            raise PrismaError(
                f"token_index reaches {max(self.token_index)} but the activation has "
                f"{act.shape[1]} tokens"
            )
        return act[:, self.token_index]

    @torch.no_grad()
    def clean(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The clean output and the activations at the dictionary's hooks ``[batch, tokens, d]``."""
        output, cache = self.model.run_with_cache(x, names_filter=self.hooks)
        return output, cache

    @torch.no_grad()
    def reconstructions(self, acts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """For each replaced hook, the reconstruction of its selected tokens
        ``[batch, n_selected, d]``, computed from the clean activations ``acts``."""
        selected = [self._select(acts[h]) for h in self.hooks]
        batch, n_sel = selected[0].shape[:2]
        if self.kind == "crosscoder":
            stacked = torch.stack(selected, dim=2)  # [B, T, S, d]
            recon = reconstruct(self.dictionary, stacked.reshape(batch * n_sel, *stacked.shape[2:]))
            recon = recon.reshape(batch, n_sel, *recon.shape[1:])
            return {h: recon[:, :, s] for s, h in enumerate(self.hooks)}
        source = selected[0]
        recon = reconstruct(self.dictionary, source.reshape(batch * n_sel, -1))
        return {self.replaced[0]: recon.reshape(batch, n_sel, -1)}

    def values(
        self,
        mode: str,
        acts: Mapping[str, Tensor],
        recons: Mapping[str, Tensor] | None = None,
        means: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """What each replaced hook's selected tokens become in ``mode`` (not ``clean``)."""
        if mode in ("spliced", "with_error"):
            recons = recons if recons is not None else self.reconstructions(acts)
            if mode == "spliced":
                return dict(recons)
            return {h: recons[h] + (self._select(acts[h]) - recons[h]) for h in self.replaced}
        if mode == "zero":
            return {h: torch.zeros_like(self._select(acts[h])) for h in self.replaced}
        if mode == "mean":
            if means is None:
                raise PrismaError(
                    "mean ablation needs the per-dimension means of the replaced hooks"
                )
            out = {}
            for h in self.replaced:
                current = self._select(acts[h])
                if h not in means:
                    raise PrismaError(f"no mean given for hook {h!r}")
                mean = torch.as_tensor(means[h]).to(current.device, current.dtype)
                if mean.shape[-1] != current.shape[-1]:
                    raise PrismaError(
                        f"the mean for {h!r} has {mean.shape[-1]} dims, the activation "
                        f"{current.shape[-1]}"
                    )
                out[h] = mean.expand_as(current)
            return out
        raise PrismaError(f"unknown splice mode {mode!r}: use one of {', '.join(MODES[1:])}")

    def hook_fns(self, values: Mapping[str, Tensor]) -> dict[str, Callable]:
        """``model.hooks`` functions writing ``values[h]`` into the selected tokens of ``h``."""
        index = self.token_index

        def make(value: Tensor) -> Callable:
            def replace(act: Tensor, hook: Any) -> Tensor:
                if index is None:
                    return value.to(act.dtype)
                new = act.clone()
                new[:, index] = value.to(act.dtype)
                return new

            return replace

        return {h: make(v) for h, v in values.items()}

    @torch.no_grad()
    def run(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        """The model's output on ``x`` with the replaced hooks set to ``values``."""
        with self.model.hooks(self.hook_fns(values)):
            return self.model(x)

    @contextlib.contextmanager
    def spliced(self, x: Tensor) -> Any:
        """Within the block, the model runs on ``x`` with the reconstruction spliced in
        (for one batch; e.g. to read other hooks downstream)."""
        _, acts = self.clean(x)
        with self.model.hooks(self.hook_fns(self.values("spliced", acts))):
            yield self.model

    @torch.no_grad()
    def means(self, batches: Iterable[Any], progress: bool = True) -> dict[str, Tensor]:
        """Per-dimension means ``[d]`` (float64) of the replaced hooks over the selected tokens
        of every image in ``batches`` (``images`` or ``(images, labels)``)."""
        sums: dict[str, Tensor] = {}
        count = 0
        for batch in tqdm(batches, desc="hook means", unit="batch", disable=not progress):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            _, cache = self.model.run_with_cache(images, self.replaced, stop_at_layer="auto")
            for h in self.replaced:
                sums[h] = sums.get(h, 0) + self._select(cache[h]).double().sum((0, 1))
            selected = self._select(cache[self.replaced[0]])
            count += int(selected.shape[0] * selected.shape[1])
        if count == 0:
            raise PrismaError("no images to compute the ablation means from")
        return {h: s / count for h, s in sums.items()}


# ----- evaluation ----------------------------------------------------------------------------
@dataclass
class ModeResult:
    """Task metrics of one mode over the evaluated images (None where labels are missing)."""

    ce: float | None
    accuracy: float | None
    kl: float
    top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ce": self.ce,
            "accuracy": self.accuracy,
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
        }


@dataclass
class SplicedResult:
    """Spliced-in evaluation of one dictionary (definitions: module doc).

    ``max_abs_error_with_error``: ``max |logits_with_error - logits_clean|`` over the images
    (the splice identity check; close to 0 when splicing is right).
    """

    task: str
    n_images: int
    hooks: list[str]
    replaced: list[str]
    modes: dict[str, ModeResult]
    score_zero: float | None
    score_mean: float | None
    kl_score_zero: float | None
    kl_score_mean: float | None
    max_abs_error_with_error: float
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "n_images": self.n_images,
            "hooks": self.hooks,
            "replaced": self.replaced,
            "modes": {k: v.to_dict() for k, v in self.modes.items()},
            "score_zero": self.score_zero,
            "score_mean": self.score_mean,
            "kl_score_zero": self.kl_score_zero,
            "kl_score_mean": self.kl_score_mean,
            "max_abs_error_with_error": self.max_abs_error_with_error,
            **self.extras,
        }

    def rows(self) -> list[tuple[str, str]]:
        """``(name, value)`` pairs for a printed table."""

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        rows = [("images", str(self.n_images)), ("task", self.task)]
        for mode, result in self.modes.items():
            rows.append(
                (
                    f"{mode}",
                    f"ce {fmt(result.ce)}  acc {fmt(result.accuracy)}  kl {fmt(result.kl)}",
                )
            )
        rows += [
            ("score (zero abl.)", fmt(self.score_zero)),
            ("score (mean abl.)", fmt(self.score_mean)),
            ("kl score (zero abl.)", fmt(self.kl_score_zero)),
            ("kl score (mean abl.)", fmt(self.kl_score_mean)),
            ("splice identity error", f"{self.max_abs_error_with_error:.2e}"),
        ]
        return rows


class _Sums:
    """Per-mode sums over images; ``multilabel``: sigmoid outputs against multi-hot labels."""

    def __init__(self, multilabel: bool = False) -> None:
        self.multilabel = multilabel
        self.ce = 0.0
        self.correct = 0.0
        self.kl = 0.0
        self.agree = 0.0
        self.n = 0
        self.n_labelled = 0

    def add(self, logits: Tensor, clean_logits: Tensor, labels: Tensor | None) -> None:
        logits, clean_logits = logits.double(), clean_logits.double()
        if self.multilabel:
            self._add_multilabel(logits, clean_logits, labels)
            return
        log_p = F.log_softmax(logits, dim=-1)
        log_clean = F.log_softmax(clean_logits, dim=-1)
        self.kl += float((log_clean.exp() * (log_clean - log_p)).sum(-1).clamp_min(0).sum())
        self.agree += float((logits.argmax(-1) == clean_logits.argmax(-1)).sum())
        self.n += logits.shape[0]
        if labels is not None:
            labels = labels.to(logits.device)
            self.ce += float(F.cross_entropy(logits, labels, reduction="sum"))
            self.correct += float((logits.argmax(-1) == labels).sum())
            self.n_labelled += logits.shape[0]

    def _add_multilabel(self, logits: Tensor, clean_logits: Tensor, labels: Tensor | None) -> None:
        p_clean = torch.sigmoid(clean_logits)
        # Bernoulli KL per class from log-sigmoids (stable for large logits), summed over classes
        kl = p_clean * (F.logsigmoid(clean_logits) - F.logsigmoid(logits)) + (1 - p_clean) * (
            F.logsigmoid(-clean_logits) - F.logsigmoid(-logits)
        )
        self.kl += float(kl.sum(-1).clamp_min(0).sum())
        self.agree += float(((logits > 0) == (clean_logits > 0)).double().mean(-1).sum())
        self.n += logits.shape[0]
        if labels is not None:
            if labels.shape != logits.shape:
                raise PrismaError(
                    f"multi-label targets {tuple(labels.shape)} do not match the model's "
                    f"{tuple(logits.shape)} outputs: give one 0/1 label per output"
                )
            target = labels.to(logits.device, logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            self.ce += float(bce.mean(-1).sum())
            self.correct += float(((logits > 0) == (target > 0.5)).double().mean(-1).sum())
            self.n_labelled += logits.shape[0]

    def result(self) -> ModeResult:
        labelled = self.n_labelled > 0
        return ModeResult(
            ce=self.ce / self.n_labelled if labelled else None,
            accuracy=self.correct / self.n_labelled if labelled else None,
            kl=self.kl / max(self.n, 1),
            top1_agreement=self.agree / max(self.n, 1),
        )


def _score(ablated: float | None, spliced: float | None, clean: float | None) -> float | None:
    if ablated is None or spliced is None or clean is None:
        return None
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else math.nan


def _require_reiterable(batches: Iterable[Any], why: str) -> None:
    if iter(batches) is batches:
        raise PrismaError(f"{why}: pass a list or a DataLoader, not a one-shot iterator")


def _images_labels(batch: Any, multilabel: bool = False) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    images, labels = batch
    if labels is None:
        return images, None
    labels = torch.as_tensor(labels)
    if multilabel:
        if labels.ndim != 2 or bool(((labels != 0) & (labels != 1)).any()):
            raise PrismaError("multi-label targets must be 0/1 tensors [batch, n_classes]")
        return images, labels.float()
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise PrismaError("labels must be integer class indices")
    return images, labels.long()


@torch.no_grad()
def spliced_eval(
    model: Any,
    dictionary: Dictionary,
    batches: Iterable[Any],
    *,
    hooks: str | Sequence[str] | None = None,
    token_index: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    task: str | None = None,
    means: Mapping[str, Tensor] | None = None,
    modes: Sequence[str] = ("spliced", "with_error", "zero", "mean"),
    progress: bool = True,
) -> SplicedResult:
    """Spliced-in evaluation of ``dictionary`` in ``model`` over ``batches``.

    ``batches`` yields ``images [B, 3, H, W]`` (preprocessed) or ``(images, labels [B])`` with
    integer labels (class indices of the classifier's head, or indices into ``class_names``
    for CLIP / SigLIP); for ``task="multilabel"``, ``labels [B, n_classes]`` multi-hot. Mean ablation uses ``means`` ({hook: [d]}), else the means over
    ``batches`` in a first pass (``batches`` must then be re-iterable, e.g. a list or
    DataLoader). Returns a :class:`SplicedResult`.
    """
    unknown_modes = [m for m in modes if m not in MODES[1:]]
    if unknown_modes:
        raise PrismaError(f"unknown mode(s) {unknown_modes}: use {', '.join(MODES[1:])}")
    splice = Splice(model, dictionary, hooks, token_index)
    head = task_head(model, class_names, templates, task)
    if "mean" in modes and means is None:
        _require_reiterable(batches, "mean ablation without means= reads the batches twice")
        means = splice.means(batches, progress=progress)
    multilabel = head.kind == "multilabel"
    sums = {mode: _Sums(multilabel) for mode in ("clean", *modes)}
    max_identity_error = 0.0
    for batch in tqdm(batches, desc="spliced eval", unit="batch", disable=not progress):
        images, labels = _images_labels(batch, multilabel)
        output, acts = splice.clean(images)
        clean_logits = head.logits(output)
        if (
            labels is not None
            and head.kind == "clip"
            and int(labels.max()) >= clean_logits.shape[-1]
        ):
            raise PrismaError(
                f"label {int(labels.max())} is outside the {clean_logits.shape[-1]} class names"
            )
        sums["clean"].add(clean_logits, clean_logits, labels)
        recons = splice.reconstructions(acts) if {"spliced", "with_error"} & set(modes) else None
        for mode in modes:
            values = splice.values(mode, acts, recons, means)
            logits = head.logits(splice.run(images, values))
            sums[mode].add(logits, clean_logits, labels)
            if mode == "with_error":
                max_identity_error = max(
                    max_identity_error, float((logits - clean_logits).abs().max())
                )
    if sums["clean"].n == 0:
        raise PrismaError("no images were evaluated: the data yielded no batches")
    results = {mode: s.result() for mode, s in sums.items()}

    def score(ablation: str, key: str) -> float | None:
        if ablation not in results or "spliced" not in results:
            return None
        ablated, spliced = results[ablation], results["spliced"]
        if key == "ce":
            return _score(ablated.ce, spliced.ce, results["clean"].ce)
        return _score(ablated.kl, spliced.kl, 0.0)

    return SplicedResult(
        task=head.kind,
        n_images=sums["clean"].n,
        hooks=splice.hooks,
        replaced=splice.replaced,
        modes=results,
        score_zero=score("zero", "ce"),
        score_mean=score("mean", "ce"),
        kl_score_zero=score("zero", "kl"),
        kl_score_mean=score("mean", "kl"),
        max_abs_error_with_error=max_identity_error,
        extras={"token_index": splice.token_index},
    )


def make_spliced_loss(
    model: Any,
    batches: Iterable[Any],
    *,
    hooks: str | Sequence[str] | None = None,
    token_index: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    task: str | None = None,
    metric: str = "ce",
) -> Callable[[Dictionary], float]:
    """A function ``dictionary -> float``: the spliced-in ``metric`` (``"ce"`` or ``"kl"``) of
    the dictionary on ``batches`` (re-iterable), e.g. the ``loss_fn`` of
    :func:`~prisma_mm.analysis.stitching.stitch`. The task head is built once."""
    if metric not in ("ce", "kl"):
        raise PrismaError(f"metric must be 'ce' or 'kl', got {metric!r}")
    _require_reiterable(batches, "the loss function reads the batches once per dictionary")
    head = task_head(model, class_names, templates, task)

    def loss(dictionary: Dictionary) -> float:
        splice = Splice(model, dictionary, hooks, token_index)
        sums = _Sums(head.kind == "multilabel")
        for batch in batches:
            images, labels = _images_labels(batch, head.kind == "multilabel")
            output, acts = splice.clean(images)
            logits = head.logits(splice.run(images, splice.values("spliced", acts)))
            sums.add(logits, head.logits(output), labels)
        result = sums.result()
        value = result.ce if metric == "ce" else result.kl
        if value is None:
            raise PrismaError("a cross-entropy needs labelled batches (images, labels)")
        return float(value)

    return loss
