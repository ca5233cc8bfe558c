"""The shared dictionary API: configs, outputs, the `Dictionary` base class, firing statistics.

Every family (TopK, BatchTopK, ReLU, JumpReLU, Matryoshka, transcoder, crosscoder) is a
:class:`Dictionary`. Families that share the encoder/decoder layout subclass
:class:`SparseAutoencoder`, which composes a sparsity :class:`Activation` (TopK, BatchTopK,
ReLU + L1, JumpReLU + L0): the transcoder and crosscoder reuse those same activation objects.

Shapes: ``x [batch, d_in]``, ``code [batch, n_latents]``, ``recon [batch, d_out]``;
``W_enc [d_in, n_latents]``, ``b_enc [n_latents]``, ``W_dec [n_latents, d_out]``, ``b_dec [d_out]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import prisma_mm
from prisma_mm.errors import PrismaError, unknown
from prisma_mm.sae import files
from prisma_mm.sae.code import SparseCode
from prisma_mm.sae.distributed import centred_sum_of_squares, reduce_
from prisma_mm.sae.kernels import bag_offsets, sparse_decode

__all__ = [
    "Activation",
    "Dictionary",
    "DictionaryConfig",
    "FiringTracker",
    "Output",
    "SparseAutoencoder",
    "SparseCode",
    "fvu",
    "check_field_types",
    "nested_fvus",
    "geometric_median",
    "warmup",
]


# --------------------------------------------------------------------------------------------
# Config and output
# --------------------------------------------------------------------------------------------


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from Python, JSON or YAML) fits the annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is typing.Literal:
        return value in args
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_field_types(cfg: Any) -> None:
    """A one-line PrismaError for the first field of dataclass ``cfg`` whose value does not
    fit its annotation (``k='8'`` where an int is wanted), naming the field and both types."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.init and f.name in hints and not _matches(value, hints[f.name]):
            raise PrismaError(
                f"{type(cfg).__name__}: {f.name} must be {_type_name(hints[f.name])}, "
                f"got {value!r} ({type(value).__name__})"
            )


@dataclass
class DictionaryConfig:
    """Sizes shared by every dictionary; each family subclasses it with its own fields.

    ``d_sae`` is SAELens' name for ``n_latents`` and is accepted in its place (it is not
    stored: the config holds ``n_latents``). Every field's value is checked against its type.
    """

    d_in: int
    n_latents: int | None = None  # required (or its alias d_sae); an int once built
    d_sae: dataclasses.InitVar[int | None] = None
    normalize_decoder: bool = True

    def __post_init__(self, d_sae: int | None = None) -> None:
        if d_sae is not None:
            if self.n_latents is not None and self.n_latents != d_sae:
                raise PrismaError(
                    f"n_latents={self.n_latents!r} and d_sae={d_sae!r} disagree: d_sae is another "
                    "name for n_latents, give one of them"
                )
            self.n_latents = d_sae
        if self.n_latents is None:
            raise PrismaError(f"{type(self).__name__} needs n_latents (or its alias d_sae)")
        check_field_types(self)
        for name in ("d_in", "n_latents"):
            if getattr(self, name) <= 0:
                raise PrismaError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
            if f.init
        }


class Output:
    """What ``dictionary(x)`` returns.

    ``recon [batch, d_out]`` (crosscoder ``[batch, n_sources, d]``), ``code [batch, n_latents]``
    (dense view; built lazily from ``sparse`` when the family computed a sparse code), ``loss``
    (the scalar to minimise) and ``losses`` (named terms and diagnostics, e.g. ``{"fvu": ...,
    "auxk": ...}``; the terms that enter ``loss`` are documented per family).
    ``extras`` holds family state for :meth:`Dictionary.on_train_batch_end` (e.g. the smallest
    kept BatchTopK activation).
    """

    def __init__(
        self,
        recon: Tensor,
        code: Tensor | None = None,
        loss: Tensor | None = None,
        losses: dict[str, Tensor] | None = None,
        *,
        sparse: SparseCode | None = None,
        extras: dict[str, Tensor] | None = None,
    ) -> None:
        if code is None and sparse is None:
            raise ValueError("Output needs a dense code or a SparseCode")
        self.recon = recon
        self._code = code
        self.sparse = sparse
        self.loss = loss if loss is not None else recon.new_zeros(())
        self.losses = losses if losses is not None else {}
        self.extras = extras if extras is not None else {}

    @property
    def code(self) -> Tensor:
        """Dense code ``[batch, n_latents]``."""
        if self._code is None:
            assert self.sparse is not None
            self._code = self.sparse.dense()
        return self._code

    @code.setter
    def code(self, value: Tensor) -> None:
        self._code = value

    def fire_counts(self) -> Tensor:
        """Rows in which each latent is non-zero, ``[n_latents]`` (long); sparse-aware."""
        if self._code is None and self.sparse is not None:
            return self.sparse.fire_counts()
        code = self.code.detach()
        return (code.reshape(-1, code.shape[-1]) != 0).sum(0)

    @property
    def n_tokens(self) -> int:
        """Number of rows (tokens) in the batch."""
        if self._code is None and self.sparse is not None:
            return self.sparse.batch
        return int(self.code.reshape(-1, self.code.shape[-1]).shape[0])

    def l0(self) -> Tensor:
        """Mean number of non-zero latents per row (a detached scalar)."""
        return self.fire_counts().sum().float() / max(self.n_tokens, 1)

    def __repr__(self) -> str:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in self.losses.items())
        return f"Output(recon={tuple(self.recon.shape)}, loss={float(self.loss.detach()):.4g}, {terms})"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def fvu(recon: Tensor, target: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``sum (recon - target)^2 / sum (target - mean)^2``.

    ``recon, target [batch, d]``; the mean is over the batch, per dimension. Scalar.
    """
    target = target.float()
    err = (recon.float() - target).pow(2).sum()
    var = centred_sum_of_squares(target)  # over every process's rows under DDP
    return err / var.clamp_min(torch.finfo(torch.float32).tiny)


def prefix_fvus(prefixes: Tensor, target: Tensor) -> Tensor:
    """FVU of each of several reconstructions at once: ``prefixes [batch, G, d]``,
    ``target [batch, d]`` -> ``[G]`` (the target's variance is computed once)."""
    target = target.float()
    err = (prefixes.float() - target[:, None]).pow(2).sum((0, 2))
    var = centred_sum_of_squares(target)  # over every process's rows under DDP
    return err / var.clamp_min(torch.finfo(torch.float32).tiny)


class _NestedErrors(torch.autograd.Function):
    """``(parts [B, G, D], offset [D] | [B, D], target [B, D], keep) -> (sse [G], prefix [B, D])``
    with ``prefix_g = offset + sum_{h <= g} parts[:, h]``, ``sse_g = sum (prefix_g - target)^2``
    and ``prefix = prefix_keep``: one pass over ``[B, D]`` slices each way (the backward walks
    the prefixes down from the last error), where the autograd graph of cumsum, subtract and
    square makes about ten ``[B, G, D]`` temporaries."""

    @staticmethod
    def forward(ctx, parts, offset, target, keep):  # type: ignore[override]
        err = offset - target  # [B, D] (offset broadcast)
        sse = parts.new_empty(parts.shape[1])
        prefix = None
        for g in range(parts.shape[1]):
            err = err + parts[:, g]
            sse[g] = torch.linalg.vecdot(err.flatten(), err.flatten())
            if g == keep:
                prefix = err + target
        ctx.keep = keep
        ctx.offset_shape = offset.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        ctx.save_for_backward(parts, err)
        return sse, prefix

    @staticmethod
    def backward(ctx, grad_sse, grad_prefix):  # type: ignore[override]
        parts, err = ctx.saved_tensors
        grad_parts = torch.empty_like(parts)
        acc = torch.zeros_like(err)  # d loss / d prefix_g summed over the prefixes g >= h
        for g in range(parts.shape[1] - 1, -1, -1):
            if grad_sse is not None:
                acc.addcmul_(err, 2.0 * grad_sse[g])  # a 0-dim factor: no device sync
            if g == ctx.keep and grad_prefix is not None:
                acc.add_(grad_prefix)
            grad_parts[:, g] = acc
            if g > 0:
                err = err - parts[:, g]
        grad_offset = acc.sum(0) if len(ctx.offset_shape) == 1 else acc
        grad_target = None
        if ctx.needs_input_grad[2]:  # the prefix itself does not depend on the target
            grad_target = -acc if grad_prefix is None else grad_prefix - acc
        return grad_parts, grad_offset, grad_target, None


def nested_fvus(
    parts: Tensor, offset: Tensor, target: Tensor, keep: int = -1
) -> tuple[Tensor, Tensor]:
    """FVU of every nested prefix of per-group reconstructions, and one prefix.

    ``parts [batch, G, d]`` (group ``g``'s share, e.g. from
    :meth:`SparseAutoencoder.nested_parts`), ``offset [d]`` or ``[batch, d]`` added to every
    prefix (``b_dec``, a skip path), ``target [batch, d]`` -> ``(fvus [G], prefix_keep [batch,
    d])``; equal to ``prefix_fvus(offset + parts.cumsum(1), target)`` and that prefix, without
    the ``[batch, G, d]`` temporaries."""
    keep = keep % parts.shape[1]
    target = target.float()
    sse, prefix = _NestedErrors.apply(parts.float(), offset.float(), target, keep)
    var = centred_sum_of_squares(target)  # over every process's rows under DDP
    return sse / var.clamp_min(torch.finfo(torch.float32).tiny), prefix


def warmup(progress: float, fraction: float) -> float:
    """Linear warm-up factor in [0, 1]: ``min(1, progress / fraction)`` (1 when fraction is 0)."""
    if fraction <= 0:
        return 1.0
    return float(min(1.0, max(0.0, progress) / fraction))


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances.

    ``points [n, d]`` -> ``[d]`` (float32 or float64 as given; half precision is upcast).
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise PrismaError(
            f"geometric_median needs points [n, d] with n > 0, got {tuple(points.shape)}"
        )
    pts = points if points.dtype in (torch.float32, torch.float64) else points.float()
    median = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * max(1.0, float(median.norm())):
            break
    return median


# --------------------------------------------------------------------------------------------
# Firing statistics
# --------------------------------------------------------------------------------------------


class FiringTracker(nn.Module):
    """Counts, per latent, tokens since it last fired and how often it fires.

    Buffers (saved in checkpoints so a resumed run tracks the same latents):
    ``tokens_since_fired [n_latents]``, ``fire_count [n_latents]``, ``tokens_seen []``.
    ``tokens_since_fired`` is exact to one batch: a latent that fired anywhere in a batch is 0.
    Inside :func:`~prisma_mm.sae.distributed.batch_spans_processes` the counts are summed over
    all processes first, so every process holds the same state, counted in global tokens.
    """

    tokens_since_fired: Tensor
    fire_count: Tensor
    tokens_seen: Tensor

    def __init__(self, n_latents: int) -> None:
        super().__init__()
        self.n_latents = n_latents
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("fire_count", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, code: Tensor | Output) -> None:
        """Count one batch: ``code [..., n_latents]`` or an :class:`Output` (sparse-aware)."""
        if isinstance(code, Output):
            counts, n_tokens = code.fire_counts(), code.n_tokens
        else:
            flat = code.detach().reshape(-1, code.shape[-1])
            counts, n_tokens = (flat != 0).sum(0), flat.shape[0]
        counts = counts.to(self.fire_count.device, torch.long)
        # one reduction for counts and tokens: the batch over every process it spans
        totals = reduce_(torch.cat([counts, counts.new_tensor([n_tokens])]))
        counts, n_tokens = totals[:-1], int(totals[-1])
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0
        self.fire_count += counts
        self.tokens_seen += n_tokens

    def dead_mask(self, window_tokens: int) -> Tensor:
        """``[n_latents]`` bool: latents that have not fired for ``window_tokens`` tokens."""
        return self.tokens_since_fired >= window_tokens

    def dead_fraction(self, window_tokens: int) -> float:
        """Fraction of latents that have not fired for ``window_tokens`` tokens."""
        return float(self.dead_mask(window_tokens).float().mean())

    def firing_frequency(self) -> Tensor:
        """``[n_latents]`` float: fraction of tokens (since the last reset) each latent fired on."""
        return self.fire_count.double() / max(int(self.tokens_seen), 1)

    def dense_fraction(self, thresh: float) -> float:
        """Fraction of latents firing on more than ``thresh`` of the tokens seen."""
        return float((self.firing_frequency() > thresh).float().mean())

    def reset_frequency(self) -> None:
        """Start a new window for :meth:`firing_frequency` (tokens since fired is kept)."""
        self.fire_count.zero_()
        self.tokens_seen.zero_()


# --------------------------------------------------------------------------------------------
# The Dictionary base class
# --------------------------------------------------------------------------------------------


_PROJECTION_CHUNK = 512  # decoder rows per vecdot in remove_decoder_grad_parallel_


def _config_parameters(config_class: type) -> list[inspect.Parameter]:
    """Keyword-only parameters, one per init field of ``config_class`` (``InitVar`` aliases
    included), typed with resolved annotations so jsonargparse reads them."""
    hints = typing.get_type_hints(config_class)
    params = []
    for name, param in inspect.signature(config_class).parameters.items():
        hint = hints.get(name, Any)
        if isinstance(hint, dataclasses.InitVar):
            hint = hint.type
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=param.default,
                              annotation=hint)
        )  # fmt: skip
    return params


def _declare_config_signature(cls: type[Dictionary]) -> None:
    """Give ``cls.__init__`` the signature ``(self, *, <config fields>)`` at class creation, so
    ``TopKSAE(d_in=..., n_latents=..., k=...)`` and a recipe's ``init_args`` are checked
    against the fields (``**kwargs`` alone hides them from jsonargparse and ``help``).
    A positional config (``TopKSAE(cfg)``) is still accepted."""
    own = cls.__dict__.get("__init__")
    init = own if own is not None else super(cls, cls).__init__  # type: ignore[misc]
    init = getattr(init, "__wrapped__", init)

    def __init__(self: Any, cfg: Any = None, **kwargs: Any) -> None:
        init(self, cfg, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [self_param, *_config_parameters(cls.config_class)]
    )
    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = __init__  # type: ignore[method-assign]


class Dictionary(nn.Module):
    """Base class of every sparse dictionary.

    Subclasses set ``config_class`` and ``architecture`` and implement ``encode``, ``decode``
    and ``forward``. Keyword arguments build the config: ``TopKSAE(d_in=768, n_latents=12288,
    k=32)``; a config plus keywords replaces those fields.
    """

    config_class: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    architecture: ClassVar[str] = ""
    # every family by its architecture name (filled as the classes are defined)
    registry: ClassVar[dict[str, type[Dictionary]]] = {}
    # state_dict prefixes that are training state only (kept in checkpoints, not in saved weights)
    training_state_prefixes: ClassVar[tuple[str, ...]] = ("tracker.",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("architecture"):  # named in its own body: a subclass does not take over
            Dictionary.registry[cls.architecture] = cls
        if dataclasses.is_dataclass(cls.config_class):
            _declare_config_signature(cls)

    def __init__(self, cfg: DictionaryConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.cfg = self.build_config(cfg, **kwargs)
        self.metadata: dict[str, Any] = {}
        self.progress = 0.0

    @classmethod
    def build_config(cls, cfg: DictionaryConfig | None = None, **kwargs: Any) -> DictionaryConfig:
        """A ``config_class`` instance from a config and/or keyword arguments (``d_sae`` is
        accepted for ``n_latents``)."""
        names = set(inspect.signature(cls.config_class).parameters)
        unknown_names = sorted(set(kwargs) - names)
        if unknown_names:
            raise PrismaError(
                f"{cls.__name__} got unknown argument(s) {', '.join(unknown_names)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        if cfg is None:
            missing = [
                f.name
                for f in dataclasses.fields(cls.config_class)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                and f.name not in kwargs
            ]
            if missing:
                raise PrismaError(f"{cls.__name__} needs {', '.join(missing)}")
            return cls.config_class(**kwargs)
        if "d_sae" in kwargs and "n_latents" not in kwargs:
            kwargs["n_latents"] = kwargs.pop("d_sae")  # replaces the config's n_latents
        if not isinstance(cfg, cls.config_class):
            cfg = cls.config_class(**{**cfg.to_dict(), **kwargs})
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        return cfg

    # ---- the API every family implements ---------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """``x [batch, d_in]`` -> dense code ``[batch, n_latents]``."""
        raise NotImplementedError

    def decode(self, code: Tensor) -> Tensor:
        """``code [batch, n_latents]`` -> ``[batch, d_out]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Reconstruct ``target`` (default ``x``) and compute the loss."""
        raise NotImplementedError

    W_dec: nn.Parameter

    # ---- training hooks (defaults; families override what they use) ----------------------
    def init_from_sample(self, x: Tensor, target: Tensor | None = None) -> None:
        """Data-dependent initialisation from a sample batch (e.g. ``b_dec`` <- geometric median)."""

    def uses_unit_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm (False where a norm-weighted penalty is
        the method, or when ``normalize_decoder`` is off)."""
        return bool(self.cfg.normalize_decoder)

    def _decoder_rows(self, tensor: Tensor) -> Tensor:
        """View of a decoder-shaped tensor as ``[n_latents, -1]`` rows."""
        return tensor.reshape(tensor.shape[0], -1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale each decoder row to unit norm (no-op where not the method)."""
        if not self.uses_unit_decoder():
            return
        rows = self._decoder_rows(self.W_dec.data)
        rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_decoder_grad_parallel_(self) -> None:
        """Project the gradient of ``W_dec`` orthogonal to its (unit) rows (no-op where not the
        method). Call after ``backward`` and before the optimizer step."""
        if not self.uses_unit_decoder() or self.W_dec.grad is None:
            return
        rows = self._decoder_rows(self.W_dec.data)
        grad = self._decoder_rows(self.W_dec.grad)
        # grad -= (<grad, row> / |row|^2) row; vecdot in row chunks keeps its product temporary
        # in cache (one [n, d] product costs as much as the projection itself)
        coef = torch.empty(rows.shape[0], dtype=grad.dtype, device=grad.device)
        for start in range(0, rows.shape[0], _PROJECTION_CHUNK):
            part = slice(start, start + _PROJECTION_CHUNK)
            torch.linalg.vecdot(grad[part], rows[part], out=coef[part])
        coef.div_(rows.norm(dim=1).square_().clamp_min_(1e-16))
        grad.addcmul_(coef.unsqueeze(1), rows, value=-1.0)

    def set_progress(self, fraction: float) -> None:
        """Tell the dictionary how far training is (0..1), for coefficient warm-ups."""
        self.progress = float(min(1.0, max(0.0, fraction)))

    def on_train_batch_end(self, out: Output) -> None:
        """Update training state after an optimizer step (firing tracker, thresholds)."""
        tracker = getattr(self, "tracker", None)
        if isinstance(tracker, FiringTracker):
            tracker.update(out)

    # ---- normalization folding -------------------------------------------------------------
    def fold_normalization_(
        self,
        mean: Tensor | float | list | None,
        scale: Tensor | float | list,
        target_mean: Tensor | float | list | None = None,
        target_scale: Tensor | float | list | None = None,
    ) -> None:
        """Make a dictionary trained on ``(x - mean) / scale`` take raw ``x`` and return raw
        reconstructions. ``target_*`` describe the target's normalization (transcoders; default:
        the input's)."""
        raise NotImplementedError(f"{type(self).__name__} does not fold normalization")

    # ---- persistence -----------------------------------------------------------------------
    def inference_state_dict(self) -> dict[str, Tensor]:
        """The tensors saved in ``weights.safetensors`` (no training-only state)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(self.training_state_prefixes)
        }

    def save(self, path: str | Path) -> None:
        """Write ``path/cfg.json`` + ``path/weights.safetensors``."""
        save_dictionary(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
        """Load a directory written by :meth:`save` (checks the architecture matches ``cls``)."""
        return load_dictionary(path, device=device, expected=cls)

    @classmethod
    def from_config(
        cls, architecture: Any, config: Any, where: str | Path = "config"
    ) -> Dictionary:
        """A new dictionary of the registered ``architecture`` from a config mapping (e.g. a
        ``cfg.json``'s ``"config"``); ``where`` names the source in errors."""
        if not isinstance(architecture, str):
            raise PrismaError(f"{where}: 'architecture' must be a string, got {architecture!r}")
        if architecture not in Dictionary.registry:
            raise unknown("architecture", architecture, Dictionary.registry, hint=f" in {where}")
        if not isinstance(config, dict):
            raise PrismaError(
                f"{where}: 'config' must be an object of fields, got {type(config).__name__}"
            )
        try:
            return Dictionary.registry[architecture](**config)
        except PrismaError as err:
            raise PrismaError(f"{where}: {err}") from None


def save_dictionary(d: Dictionary, path: str | Path) -> Path:
    """Write ``path/cfg.json`` (``format``, ``architecture``, ``config``, ``metadata``) and
    ``path/weights.safetensors`` (the inference state dict); returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "format": "prisma-mm",
        "format_version": files.FORMAT_VERSION,
        "prisma_mm_version": prisma_mm.__version__,
        "architecture": d.architecture,
        "config": d.cfg.to_dict(),
        "metadata": d.metadata,
    }
    (path / files.CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in d.inference_state_dict().items()}
    save_file(tensors, str(path / files.WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def load_state(d: Dictionary, tensors: dict[str, Tensor], path: str | Path) -> Dictionary:
    """Load ``tensors`` into ``d`` after checking every key and shape against its inference
    state dict (a PrismaError naming ``path`` on any mismatch)."""
    shapes = {k: tuple(v.shape) for k, v in d.inference_state_dict().items()}
    files.check_tensors(tensors, shapes, Path(path))
    d.load_state_dict(tensors, strict=False)
    return d


def load_dictionary(
    path: str | Path,
    device: str | torch.device = "cpu",
    expected: type[Dictionary] | None = None,
) -> Dictionary:
    """Load a directory written by :func:`save_dictionary` (in eval mode) on ``device``;
    ``expected``: the class it must hold."""
    path = Path(path)
    cfg_path = path / files.CFG_FILE
    cfg = files.read_json(cfg_path)
    files.require(cfg, ["architecture", "config"], cfg_path)
    d = Dictionary.from_config(cfg["architecture"], cfg["config"], cfg_path)
    if expected is not None and expected is not Dictionary and not isinstance(d, expected):
        raise PrismaError(
            f"{cfg_path}: holds a {cfg['architecture']!r} dictionary, "
            f"not a {expected.architecture or expected.__name__!r}; use prisma_mm.sae.load"
        )
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PrismaError(f"{cfg_path}: 'metadata' must be an object, got {metadata!r}")
    d.metadata = dict(metadata)
    weights = path / files.WEIGHTS_FILE
    load_state(d, files.load_safetensors(weights), weights)
    return d.to(device).eval()


# --------------------------------------------------------------------------------------------
# Sparsity activations (composed into SparseAutoencoder, Transcoder, Crosscoder)
# --------------------------------------------------------------------------------------------


class Activation(nn.Module):
    """Maps encoder inputs to a sparse code and contributes its own loss terms.

    Subclasses set ``name`` (registered for lookup by name), ``recon_loss`` ("fvu" for the
    TopK family, "mse" for penalty-based families), and read their hyper-parameters from the
    owning dictionary's config in ``__init__(cfg)``.
    """

    name: ClassVar[str] = ""
    recon_loss: ClassVar[str] = "fvu"
    unit_decoder: ClassVar[bool] = True  # False where a decoder-norm-weighted penalty is the method
    decoder_init_norm: ClassVar[float] = 1.0
    registry: ClassVar[dict[str, type[Activation]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Activation.registry[cls.name] = cls

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__()

    def encode(self, sae: SparseAutoencoder, x: Tensor) -> Tensor | SparseCode:
        """``x [batch, D]`` (flat input; centring on ``sae.encoder_center()`` is done by
        ``sae.pre_acts`` or the sparse kernels) -> code (dense or sparse)."""
        raise NotImplementedError

    def loss_terms(
        self,
        sae: SparseAutoencoder,
        x: Tensor,
        code: Tensor | SparseCode,
        recon: Tensor,
        target: Tensor,
    ) -> dict[str, tuple[float, Tensor]]:
        """Extra terms: ``{name: (coefficient, value)}``; loss adds ``coefficient * value``."""
        return {}

    def extras(self, code: Tensor | SparseCode) -> dict[str, Tensor]:
        """State passed to :meth:`after_step` through ``Output.extras``."""
        return {}

    def after_step(self, sae: SparseAutoencoder, out: Output) -> None:
        """Training-state update after an optimizer step."""

    def scale_thresholds_(self, factor: Tensor | float) -> None:
        """Multiply inference thresholds by a positive ``factor`` (normalization folding)."""


def _as_tensor(value: Tensor | float | list | None, like: Tensor) -> Tensor | None:
    if value is None:
        return None
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


class SparseAutoencoder(Dictionary):
    """Encoder / activation / decoder: ``code = act(W_enc^T (x - c) + b_enc)``,
    ``recon = W_dec^T code + b_dec`` where ``c = b_dec`` when ``apply_b_dec_to_input`` else 0.

    Parameters: ``W_enc [d_in, n_latents]``, ``b_enc [n_latents]``, ``W_dec [n_latents, d_out]``,
    ``b_dec [d_out]``. The sparsity comes from ``self.activation`` (an :class:`Activation`
    named by ``activation_name`` or by the config's ``activation`` field).
    """

    activation_name: ClassVar[str] = ""

    def __init__(self, cfg: DictionaryConfig | None = None, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        cfg = self.cfg
        n = cfg.n_latents
        name = getattr(cfg, "activation", None) or self.activation_name
        if name not in Activation.registry:
            raise unknown("activation", str(name), Activation.registry)
        self.activation = Activation.registry[name](cfg)
        self.W_enc = nn.Parameter(torch.empty(*self.encoder_shape()))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, *self.output_shape()))
        self.b_dec = nn.Parameter(torch.zeros(*self.output_shape()))
        self.tracker = FiringTracker(n)
        self.reset_parameters()

    # ---- geometry ----------------------------------------------------------------------------
    def encoder_shape(self) -> tuple[int, ...]:
        """Shape of ``W_enc``: ``(d_in, n_latents)`` (crosscoder ``(n_sources, d, n_latents)``)."""
        return (self.cfg.d_in, self.cfg.n_latents)

    def output_shape(self) -> tuple[int, ...]:
        """Shape of one reconstruction (``b_dec``): ``(d_out,)`` (crosscoder ``(n_sources, d)``)."""
        return (self.d_out,)

    @property
    def d_out(self) -> int:
        """Size of the reconstructed vector."""
        return int(getattr(self.cfg, "d_out", None) or self.cfg.d_in)

    @property
    def apply_b_dec_to_input(self) -> bool:
        return bool(getattr(self.cfg, "apply_b_dec_to_input", True))

    def uses_unit_decoder(self) -> bool:
        return bool(self.cfg.normalize_decoder) and self.activation.unit_decoder

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows random vectors of norm ``decoder_init_norm`` (config, else the
        activation's default), encoder = decoder transpose, biases zero."""
        gen = torch.Generator().manual_seed(int(getattr(self.cfg, "seed", 0)))
        w = torch.randn(self.W_dec.shape, generator=gen)
        rows = self._decoder_rows(w)
        rows.div_(rows.norm(dim=1, keepdim=True))
        init_norm = getattr(self.cfg, "decoder_init_norm", None)
        rows.mul_(float(init_norm if init_norm is not None else self.activation.decoder_init_norm))
        self.W_dec.copy_(w)
        enc = self.encoder_weight()
        if enc.shape[0] == rows.shape[1]:
            enc.copy_(rows.T)
        else:  # transcoder: input and output differ, encoder gets its own random directions
            rand = torch.randn(enc.shape, generator=gen)
            enc.copy_(rand / rand.norm(dim=0, keepdim=True) * rows.norm(dim=1))
        self.b_enc.zero_()
        self.b_dec.zero_()

    def decoder_norms(self) -> Tensor:
        """``[n_latents]`` norm of each decoder row (weights of norm-weighted penalties)."""
        return self._decoder_rows(self.W_dec).norm(dim=1)

    # ---- encode / decode --------------------------------------------------------------------
    def encoder_center(self) -> Tensor | None:
        """``b_dec`` flattened when inputs are centred on it (``apply_b_dec_to_input``), else
        None."""
        return self.b_dec.reshape(-1) if self.apply_b_dec_to_input else None

    def encoder_input(self, x: Tensor) -> Tensor:
        """Flat ``x [batch, D]`` -> the vector the encoder multiplies, ``[batch, D]``."""
        center = self.encoder_center()
        return x if center is None else x - center.to(x.dtype)

    def encoder_weight(self) -> Tensor:
        """``W_enc`` viewed as ``[D, n_latents]`` (crosscoder: sources flattened)."""
        return self.W_enc.reshape(-1, self.cfg.n_latents)

    def pre_acts(self, x_in: Tensor) -> Tensor:
        """Dense pre-activations ``[batch, n_latents]`` from flat ``x [batch, D]``."""
        return torch.addmm(self.b_enc, self.encoder_input(x_in), self.encoder_weight())

    _in_dims: ClassVar[int] = 1  # trailing dims of one input row (crosscoder: 2)

    def _flat_in(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``x [..., *row]`` -> ``(x [rows, *row], leading shape)``, after checking that ``x``
        ends in one input row's shape (shapes only: no device sync)."""
        row = tuple(self.encoder_shape()[:-1])
        if tuple(x.shape[max(0, x.ndim - len(row)) :]) != row or x.ndim <= len(row) - 1:
            raise PrismaError(self._size_error("input", tuple(x.shape), row, "d_in"))
        lead = x.shape[: x.ndim - len(row)]
        return x.reshape(-1, *row), tuple(lead)

    def _flat_target(self, target: Tensor, n_rows: int) -> Tensor:
        """``target [..., *out]`` -> ``[n_rows, prod(out)]``, checking it ends in the output
        shape and holds ``n_rows`` rows (the input's)."""
        out = tuple(self.b_dec.shape)
        if tuple(target.shape[max(0, target.ndim - len(out)) :]) != out:
            raise PrismaError(self._size_error("target", tuple(target.shape), out, "d_out"))
        if target.numel() != n_rows * self.b_dec.numel():
            raise PrismaError(
                f"{type(self).__name__}: target of shape {tuple(target.shape)} holds "
                f"{target.numel() // max(1, self.b_dec.numel())} rows, the input {n_rows}"
            )
        return target.reshape(n_rows, -1)

    def _size_error(self, what: str, got: tuple[int, ...], want: tuple[int, ...], name: str) -> str:
        if len(want) == 1:
            last = got[-1] if got else None
            return (
                f"{type(self).__name__}: the {what}'s last dimension is {last} (shape {got}), "
                f"but this dictionary's {name} is {want[0]}"
            )
        return f"{type(self).__name__}: the {what} of shape {got} must end in {want}"

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` -> dense code ``[..., n_latents]`` (inference encoding)."""
        flat, lead = self._flat_in(x)
        code = self.activation.encode(self, flat.reshape(flat.shape[0], -1))
        if isinstance(code, SparseCode):
            code = code.dense()
        return code.reshape(*lead, self.cfg.n_latents)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [..., d_in]`` -> ``(values [..., m], indices [..., m])``: each row's active
        latents without the dense ``[..., n_latents]`` code (inference encoding).

        TopK (and Matryoshka with ``nesting="k"``): ``m = k``, entries in ascending latent
        order; a value is 0 where fewer than ``k`` pre-activations are positive. Per-row
        variable counts (BatchTopK and Matryoshka over BatchTopK at inference, ReLU, JumpReLU):
        ``m`` is the largest count among the rows and shorter rows are padded with value 0 at
        index 0, so ``zeros(n_latents).scatter_add(-1, indices, values)`` is the dense code.
        """
        flat, lead = self._flat_in(x)
        code = self.activation.encode(self, flat.reshape(flat.shape[0], -1))
        if not isinstance(code, SparseCode):
            code = SparseCode.from_dense(code)
        values, latents = code.padded()
        return values.reshape(*lead, -1), latents.reshape(*lead, -1)

    def decode_sparse(self, code: SparseCode) -> Tensor:
        """Decode a sparse code without ``b_dec``: ``[batch, d_out_flat]`` (sparse kernel)."""
        return sparse_decode(
            code.values, code.latents, code.offsets, self._decoder_rows(self.W_dec)
        )

    def nested_parts(
        self, code: SparseCode, group: Tensor, n_groups: int, in_order: bool = False
    ) -> Tensor:
        """Per-group reconstructions, without ``b_dec``: ``[batch, n_groups, D]`` where slice
        ``g`` decodes the entries of group ``g`` (one sparse decode with a bag per row and
        group). ``group [nnz]`` gives each entry's group (0..n_groups-1); ``in_order``: the
        groups already ascend within each row (groups of consecutive latents), so no sort."""
        key = code.rows() * n_groups + group
        if in_order:
            values, latents = code.values, code.latents
        else:
            order = torch.argsort(key, stable=True)
            values, latents = code.values[order], code.latents[order]
        offsets = bag_offsets(key, code.batch * n_groups)
        parts = sparse_decode(values, latents, offsets, self._decoder_rows(self.W_dec))
        return parts.reshape(code.batch, n_groups, -1)

    def nested_recons(self, code: SparseCode, group: Tensor, n_groups: int) -> Tensor:
        """Cumulative reconstructions over nested groups, without ``b_dec``.

        ``group [nnz]`` gives each entry's group (0..n_groups-1); returns ``[batch, n_groups, D]``
        where slice ``g`` decodes the entries of groups ``0..g``.
        """
        return self.nested_parts(code, group, n_groups).cumsum(1)

    def decode_latents(self, code: Tensor | SparseCode) -> Tensor:
        """``W_dec^T code`` without biases, flat ``[batch, prod(d_out)]``."""
        if isinstance(code, SparseCode):
            return self.decode_sparse(code)
        w = self._decoder_rows(self.W_dec)
        return code @ w.to(code.dtype)

    def decode(self, code: Tensor) -> Tensor:
        """``code [..., n_latents]`` -> ``[..., d_out]`` (``W_dec^T code + b_dec``)."""
        if code.ndim == 0 or code.shape[-1] != self.cfg.n_latents:
            got = tuple(code.shape)
            raise PrismaError(
                f"{type(self).__name__}.decode: the code's last dimension is "
                f"{got[-1] if got else None} (shape {got}), but n_latents is {self.cfg.n_latents}"
            )
        lead = code.shape[:-1]
        flat = code.reshape(-1, code.shape[-1])
        out = self.decode_latents(flat) + self.b_dec.reshape(-1).to(flat.dtype)
        return out.reshape(*lead, *self.b_dec.shape)

    def skip(self, x: Tensor) -> Tensor | None:
        """Optional skip path added to the reconstruction (transcoder ``W_skip``)."""
        return None

    # ---- forward / loss ---------------------------------------------------------------------
    def reconstruction_terms(self, recon: Tensor, target: Tensor) -> dict[str, Tensor]:
        """``{"fvu": ..., "mse": ...}`` for flat ``recon, target [batch, D]``: FVU and the mean
        over rows of the summed squared error."""
        target = target.float()
        row_sse = (recon.float() - target).pow(2).sum(-1)  # one error pass for both terms
        var = centred_sum_of_squares(target)  # over every process's rows under DDP
        fvu_value = row_sse.sum() / var.clamp_min(torch.finfo(torch.float32).tiny)
        return {"fvu": fvu_value, "mse": row_sse.mean()}

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """``x [batch, d_in]`` (target ``[batch, d_out]``, default ``x``) -> :class:`Output`.

        ``loss = <recon term> + sum(coef * term)``, the recon term being ``fvu`` for the TopK
        family and ``mse`` for the penalty families (see docs/dictionaries.md).
        """
        target = x if target is None else target
        flat_x, lead = self._flat_in(x)
        flat_t = self._flat_target(target, flat_x.shape[0])
        x_in = flat_x.reshape(flat_x.shape[0], -1)
        code = self.activation.encode(self, x_in)
        recon = self.decode_latents(code) + self.b_dec.reshape(-1)
        skip = self.skip(flat_x)
        if skip is not None:
            recon = recon + skip
        losses, loss = self.compute_losses(x_in, code, recon, flat_t)
        out_shape = (*lead, *self.b_dec.shape)
        sparse = code if isinstance(code, SparseCode) else None
        return Output(
            recon=recon.reshape(out_shape),
            code=None if sparse is not None else code,
            loss=loss,
            losses=losses,
            sparse=sparse,
            extras=self.activation.extras(code),
        )

    def compute_losses(
        self, x_in: Tensor, code: Tensor | SparseCode, recon: Tensor, target: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Reconstruction terms + the activation's terms -> (losses dict, total loss)."""
        losses = self.reconstruction_terms(recon, target)
        loss = losses[self.activation.recon_loss]
        for name, (coef, value) in self.activation.loss_terms(
            self, x_in, code, recon, target
        ).items():
            losses[name] = value
            loss = loss + coef * value
        losses = {k: v.detach() if k != "loss" else v for k, v in losses.items()}
        return losses, loss

    # ---- training hooks ----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_sample(self, x: Tensor, target: Tensor | None = None) -> None:
        """``b_dec`` <- geometric median of the target sample (``x`` for an SAE)."""
        target = x if target is None else target
        flat = target.reshape(-1, self.b_dec.numel()).float()
        self.b_dec.copy_(geometric_median(flat).reshape(self.b_dec.shape).to(self.b_dec.dtype))

    def on_train_batch_end(self, out: Output) -> None:
        super().on_train_batch_end(out)
        self.activation.after_step(self, out)

    # ---- normalization folding --------------------------------------------------------------
    @torch.no_grad()
    def fold_normalization_(
        self,
        mean: Tensor | float | list | None,
        scale: Tensor | float | list,
        target_mean: Tensor | float | list | None = None,
        target_scale: Tensor | float | list | None = None,
    ) -> None:
        """Fold ``x' = (x - mean) / scale`` (and the target's normalization) into the weights so
        the dictionary takes raw activations and reconstructs raw targets.

        ``mean``: scalar or ``[d_in]`` (crosscoder ``[n_sources, d]``); ``scale``: positive scalar
        or of the same shape. A scalar output scale is folded into the code (decoder rows stay
        unit norm, thresholds scale); a per-dimension one into the decoder rows.
        """
        like = self.W_enc.data
        in_shape = self.W_enc.shape[:-1]
        m_in = _as_tensor(mean if mean is not None else 0.0, like)
        s_in = _as_tensor(scale, like)
        same = target_mean is None and target_scale is None
        m_out = m_in if target_mean is None else _as_tensor(target_mean, like)
        s_out = s_in if target_scale is None else _as_tensor(target_scale, like)
        if self.apply_b_dec_to_input and not same:
            raise PrismaError(
                "fold_normalization_: with apply_b_dec_to_input the target must share the input's "
                "normalization; pass target_mean/target_scale only for transcoders"
            )
        for name, t in (("scale", s_in), ("target_scale", s_out)):
            if bool((t <= 0).any()):
                raise PrismaError(f"fold_normalization_: {name} must be positive")
        m_in = torch.broadcast_to(m_in, in_shape)
        s_in_full = torch.broadcast_to(s_in, in_shape)
        m_out = torch.broadcast_to(m_out, self.b_dec.shape)
        code_scale = s_out if s_out.numel() == 1 else torch.ones((), dtype=like.dtype)
        dec_scale = torch.broadcast_to(s_out / code_scale, self.b_dec.shape)

        c = self.b_dec.data.clone() if self.apply_b_dec_to_input else torch.zeros_like(m_in)
        # pre = W^T((x - m_in)/s_in - c) + b ; times code_scale to keep codes homogeneous
        w_enc = self.W_enc.data / s_in_full.unsqueeze(-1)
        shift = (m_in + s_in_full * c).reshape(-1)
        new_b_dec = s_out * self.b_dec.data + m_out
        if self.apply_b_dec_to_input:
            # encoder centres on the new b_dec, which equals m_in + s_in * c here
            b_enc = self.b_enc.data
        else:
            b_enc = self.b_enc.data - shift @ w_enc.reshape(-1, self.cfg.n_latents)
        self.W_enc.copy_(w_enc * code_scale)
        self.b_enc.copy_(b_enc * code_scale)
        self.activation.scale_thresholds_(code_scale)
        self.W_dec.mul_(dec_scale.unsqueeze(0))
        skip = getattr(self, "W_skip", None)
        if isinstance(skip, nn.Parameter):
            w_skip = skip.data / s_in_full.reshape(-1, 1) * s_out.reshape(-1)
            new_b_dec = new_b_dec - (m_in.reshape(-1) @ w_skip).reshape(self.b_dec.shape)
            skip.copy_(w_skip)
        self.b_dec.copy_(new_b_dec)

        def _jsonable(t: Tensor) -> float | list:
            return t.item() if t.numel() == 1 else t.tolist()

        self.metadata["normalization"] = {
            "mean": _jsonable(torch.as_tensor(mean if mean is not None else 0.0)),
            "scale": _jsonable(torch.as_tensor(scale)),
            "folded": True,
        }
        if not same:
            self.metadata["normalization"]["target_mean"] = _jsonable(torch.as_tensor(m_out))
            self.metadata["normalization"]["target_scale"] = _jsonable(torch.as_tensor(s_out))
