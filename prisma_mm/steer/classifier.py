"""What steering does to a classifier: each batch runs clean and steered, and the change in
class logits, predictions and accuracy is reported.

Labels decide the kind of head: integer class indices ``[batch]`` (single-label: prediction
= argmax, accuracy = top-1) or multi-hot ``[batch, n_classes]`` (multi-label, one sigmoid per
class as the toy world's ``toyvit``: prediction = logit > 0, accuracy = mean over images and
classes of prediction == label). CLIP / SigLIP models give zero-shot logits through
:func:`~prisma_mm.analysis.spliced.task_head`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prisma_mm.errors import PrismaError
from prisma_mm.steer.base import Intervention, steer

__all__ = ["SteeringEffect", "steering_effect"]


@dataclass
class SteeringEffect:
    """Clean vs. steered over ``n_images`` (means over images; ``[C]`` per class).

    ``logit_delta [C]``: mean of steered - clean logits; ``predicted_clean / _steered [C]``:
    fraction of images predicted as each class; ``class_accuracy_clean / _steered [C]``
    (labels given): per-class accuracy (multi-label: over all images; single-label: recall
    over the images of that class, NaN where there are none); ``accuracy_clean / _steered``
    (labels given): overall accuracy; ``top1_agreement``: share of images whose argmax class
    is unchanged.
    """

    n_images: int
    multi_label: bool
    logit_delta: Tensor
    predicted_clean: Tensor
    predicted_steered: Tensor
    top1_agreement: float
    accuracy_clean: float | None = None
    accuracy_steered: float | None = None
    class_accuracy_clean: Tensor | None = None
    class_accuracy_steered: Tensor | None = None
    class_names: list[str] | None = None

    @property
    def accuracy_change(self) -> float | None:
        """``accuracy_steered - accuracy_clean`` (None without labels)."""
        if self.accuracy_clean is None or self.accuracy_steered is None:
            return None
        return self.accuracy_steered - self.accuracy_clean

    def name(self, c: int) -> str:
        return self.class_names[c] if self.class_names else str(c)

    def top_classes(self, n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` classes whose mean logit moved most, as ``(name, delta)`` (classes that
        did not move are left out)."""
        order = self.logit_delta.abs().argsort(descending=True)[:n]
        return [
            (self.name(int(c)), float(self.logit_delta[c]))
            for c in order
            if self.logit_delta[c] != 0
        ]

    def to_dict(self) -> dict[str, Any]:
        def listed(t: Tensor | None) -> list[float] | None:
            return None if t is None else [float(v) for v in t]

        return {
            "n_images": self.n_images,
            "multi_label": self.multi_label,
            "class_names": self.class_names,
            "logit_delta": listed(self.logit_delta),
            "predicted_clean": listed(self.predicted_clean),
            "predicted_steered": listed(self.predicted_steered),
            "top1_agreement": self.top1_agreement,
            "accuracy_clean": self.accuracy_clean,
            "accuracy_steered": self.accuracy_steered,
            "accuracy_change": self.accuracy_change,
            "class_accuracy_clean": listed(self.class_accuracy_clean),
            "class_accuracy_steered": listed(self.class_accuracy_steered),
        }


class _Totals:
    """Running sums over batches for one run (clean or steered)."""

    def __init__(self) -> None:
        self.predicted: Tensor | None = None
        self.correct: Tensor | None = None  # per class
        self.per_class_n: Tensor | None = None

    def add(self, logits: Tensor, labels: Tensor | None, multi_label: bool) -> None:
        n_classes = logits.shape[-1]
        if multi_label:
            predicted = (logits > 0).double()
        else:
            predicted = torch.nn.functional.one_hot(logits.argmax(-1), n_classes).double()
        self.predicted = predicted.sum(0) + (0 if self.predicted is None else self.predicted)
        if labels is None:
            return
        if multi_label:
            correct = (predicted == (labels > 0.5)).double().sum(0)
            count = torch.full((n_classes,), float(labels.shape[0]), dtype=torch.float64)
        else:
            hit = (logits.argmax(-1) == labels).double()
            correct = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, labels, hit)
            count = torch.bincount(labels, minlength=n_classes).double()
        self.correct = correct + (0 if self.correct is None else self.correct)
        self.per_class_n = count + (0 if self.per_class_n is None else self.per_class_n)


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        images, labels = batch
        return images, None if labels is None else torch.as_tensor(labels).cpu()
    raise PrismaError("steering_effect: batches must be images or (images, labels) pairs")


@torch.no_grad()
def steering_effect(
    model: Any,
    interventions: Intervention | Sequence[Intervention],
    batches: Iterable[Any],
    *,
    class_names: Sequence[str] | None = None,
    head: Any = None,
    progress: bool = False,
) -> SteeringEffect:
    """Run each batch clean and steered; returns a :class:`SteeringEffect`.

    ``batches`` yields preprocessed ``images [B, 3, H, W]`` or ``(images, labels)`` with
    ``labels [B]`` class indices or ``[B, C]`` multi-hot. ``head``: a
    :class:`~prisma_mm.analysis.spliced.TaskHead` (default: the model's own, from its card;
    CLIP / SigLIP need ``class_names``).
    """
    from prisma_mm.analysis.spliced import task_head

    head = head if head is not None else task_head(model, class_names)
    names = list(class_names) if class_names else getattr(head, "class_names", None)
    totals = {"clean": _Totals(), "steered": _Totals()}
    delta_sum: Tensor | None = None
    agree, n_images, multi_label, labelled = 0.0, 0, None, None
    for batch in tqdm(batches, desc="steering effect", unit="batch", disable=not progress):
        images, labels = _split(batch)
        clean = head.logits(model(images)).double().cpu()
        with steer(model, interventions):
            steered = head.logits(model(images)).double().cpu()
        batch_multi = labels is not None and labels.dim() == 2
        if labels is not None:
            if batch_multi and tuple(labels.shape) != tuple(clean.shape):
                raise PrismaError(
                    f"multi-hot labels have shape {tuple(labels.shape)}; the logits are "
                    f"{tuple(clean.shape)}"
                )
            if not batch_multi:
                labels = labels.long()
                if (
                    labels.numel()
                    and not 0 <= int(labels.min()) <= int(labels.max()) < clean.shape[-1]
                ):
                    raise PrismaError(
                        f"class labels must lie in 0..{clean.shape[-1] - 1}, got "
                        f"{int(labels.min())}..{int(labels.max())}"
                    )
        if multi_label is None:
            multi_label, labelled = batch_multi, labels is not None
        elif (multi_label, labelled) != (batch_multi, labels is not None):
            raise PrismaError("every batch must carry the same kind of labels (or none)")
        for key, logits in (("clean", clean), ("steered", steered)):
            totals[key].add(logits, labels, multi_label)
        change = (steered - clean).sum(0)
        delta_sum = change if delta_sum is None else delta_sum + change
        agree += float((steered.argmax(-1) == clean.argmax(-1)).sum())
        n_images += clean.shape[0]
    if n_images == 0 or delta_sum is None:
        raise PrismaError("steering_effect got no images: the batches were empty")
    effect = SteeringEffect(
        n_images=n_images,
        multi_label=bool(multi_label),
        logit_delta=(delta_sum / n_images).float(),
        predicted_clean=(totals["clean"].predicted / n_images).float(),
        predicted_steered=(totals["steered"].predicted / n_images).float(),
        top1_agreement=agree / n_images,
        class_names=names,
    )
    if labelled:
        for key in ("clean", "steered"):
            t = totals[key]
            assert t.correct is not None and t.per_class_n is not None
            per_class = t.correct / t.per_class_n.where(t.per_class_n > 0, torch.nan)
            setattr(effect, f"class_accuracy_{key}", per_class.float())
            setattr(effect, f"accuracy_{key}", float(t.correct.sum() / t.per_class_n.sum()))
    return effect
