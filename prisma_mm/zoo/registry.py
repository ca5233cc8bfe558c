"""The model zoo: model cards (YAML data in ``model_zoo/``) and the one entry point that
turns a card into a :class:`~prisma_mm.hooks.HookedModel`.

A card file holds one family's cards::

    family: timm                # adapter module prisma_mm.zoo.<adapter>
    cards:
      - name: vit-b16-augreg2-in21k-ft-in1k
        arch: vit_base_patch16_224           # the library's architecture name
        pretrained: augreg2_in21k_ft_in1k    # the library's pretrained tag
        source: timm/vit_base_patch16_224.augreg2_in21k_ft_in1k   # exact source id
        task: classifier                      # classifier | embedding | clip
        kwargs: {}                            # constructor overrides (tiny cards)

A new family is one adapter module plus a card file; nothing else changes.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.overrides import TorchFunctionMode

from prisma_mm.errors import PrismaError, unknown

ADAPTERS = {
    "timm": "prisma_mm.zoo.timm_vit",
    "open_clip": "prisma_mm.zoo.open_clip",
    "transformers_video": "prisma_mm.zoo.video",
    "torchvision_video": "prisma_mm.zoo.video_torchvision",
    "diffusers": "prisma_mm.zoo.diffusion",
}
TASKS = ("classifier", "embedding", "clip", "text-to-image")


def _package_or_repo_dir(name: str) -> Path:
    """``prisma_mm/<name>`` inside an installed wheel, else ``<repo>/<name>`` in a checkout."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / name
    return packaged if packaged.is_dir() else here.parent / name


def zoo_dir() -> Path:
    return _package_or_repo_dir("model_zoo")


def assets_dir() -> Path:
    return _package_or_repo_dir("assets")


@dataclass(frozen=True)
class ModelCard:
    """One carded model: which architecture, where its weights come from, what it does."""

    name: str
    family: str
    arch: str
    source: str
    task: str = "classifier"
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # "asset:FILE" for weights shipped in assets/
    config_file: str | None = None  # architecture config shipped in model_zoo/ (open_clip)
    preprocess: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)  # diffusion: steps, guidance, size
    description: str = ""
    file: str = ""

    @property
    def is_tiny(self) -> bool:
        return self.name.startswith("tiny-")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_card_file(path: Path) -> list[ModelCard]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "family" not in data or "cards" not in data:
        raise PrismaError(f"card file {path} must have 'family' and 'cards' keys")
    family = data["family"]
    if family not in ADAPTERS:
        raise PrismaError(f"card file {path}: unknown family {family!r}; known: {sorted(ADAPTERS)}")
    cards = []
    known = set(ModelCard.__dataclass_fields__) - {"family", "file"}
    for entry in data["cards"]:
        extra = set(entry) - known
        if extra or "name" not in entry or "arch" not in entry:
            raise PrismaError(
                f"card {entry.get('name', '?')!r} in {path.name}: needs name and arch; "
                f"unknown keys {sorted(extra)}"
            )
        entry.setdefault("source", entry["arch"])
        card = ModelCard(family=family, file=path.name, **entry)
        if card.task not in TASKS:
            raise PrismaError(f"card {card.name!r}: task {card.task!r} is not one of {TASKS}")
        cards.append(card)
    return cards


@functools.cache
def _cards() -> dict[str, ModelCard]:
    cards: dict[str, ModelCard] = {}
    for path in sorted(zoo_dir().glob("*.yaml")):
        for card in _parse_card_file(path):
            if card.name in cards:
                raise PrismaError(
                    f"model card {card.name!r} is defined twice ({cards[card.name].file}, {path.name})"
                )
            cards[card.name] = card
    return cards


def list_models(family: str | None = None) -> list[str]:
    """Card names, optionally only those of ``family``."""
    cards = _cards()
    if family is not None and family not in {c.family for c in cards.values()}:
        raise unknown("model family", family, sorted({c.family for c in cards.values()}))
    return [name for name, card in cards.items() if family is None or card.family == family]


def get_card(name: str) -> ModelCard:
    """The card called ``name``; unknown names get the nearest valid ones."""
    cards = _cards()
    if name not in cards:
        raise unknown("model", name, cards, hint=" (see `prisma-mm zoo list`)")
    return cards[name]


def _adapter(card: ModelCard):
    return importlib.import_module(ADAPTERS[card.family])


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise unknown("dtype", str(dtype), names)
    return names[dtype]


def resolve_device(device: Any) -> torch.device:
    """``device`` as a torch.device that exists on this machine, or one clear line."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise PrismaError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PrismaError(
                f"device {device!r} was asked for but this machine has no CUDA GPU "
                "(torch.cuda.is_available() is False): use --device cpu"
            )
        if resolved.index is not None and resolved.index >= count:
            raise PrismaError(
                f"device {device!r} does not exist: this machine has {count} CUDA GPU(s), "
                f"cuda:0-cuda:{count - 1}"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise PrismaError(f"device {device!r} is not available on this machine: use --device cpu")
    return resolved


def check_img_size(card: ModelCard, img_size: Any) -> int | None:
    """A valid input size for ``card`` (a positive multiple of its patch size), or None."""
    if img_size is None:
        return None
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise PrismaError(f"img_size={img_size!r}: give a positive number of pixels, e.g. 224")
    if card.family == "diffusers":
        return img_size  # the pipeline checks it against its VAE (HookedPipeline.check_size)
    if card.family != "timm" and card.family != "open_clip":
        raise PrismaError(f"img_size is not supported for {card.family} cards ({card.name!r})")
    patch = build_on_meta(card).layout.patch_size
    if img_size % patch[0] or img_size % patch[1]:
        raise PrismaError(
            f"img_size={img_size} is not a multiple of {card.name!r}'s patch size "
            f"{patch[0]}: use e.g. {max(1, round(img_size / patch[0])) * patch[0]}"
        )
    return img_size


def load_model(
    name: str,
    weights: Any = "pretrained",
    device: Any = "cpu",
    dtype: Any = None,
    *,
    img_size: int | None = None,
    seed: int = 0,
):
    """Build the carded model ``name`` as a :class:`~prisma_mm.hooks.HookedModel` in eval mode.

    ``weights``: None (random init), ``"pretrained"`` (the library's own loader: HF hub or
    open_clip tag; offline from the HF cache), ``"hf-hub:org/repo"``, or a local path (a
    safetensors file, a ``save_pretrained`` directory, an open_clip ``.bin`` / ``.pt``).
    ``img_size``: run at this input size (timm's ``img_size``, open_clip's
    ``force_image_size``; position embeddings are resampled from the checkpoint's).
    ``seed``: random initialisation (``weights=None``, tiny cards, fresh heads) is seeded,
    so the same call builds the same weights; the global RNG state is left as it was.
    """
    card = get_card(name) if isinstance(name, str) else name
    if card.family == "diffusers":  # a pipeline, not one module: its own loader
        from prisma_mm.zoo.diffusion import load_pipeline

        return load_pipeline(card, weights, device, dtype, size=img_size, seed=seed)
    if isinstance(weights, Path):
        weights = str(weights)
    if weights is not None and not isinstance(weights, str):
        raise PrismaError(
            f"weights={weights!r}: use None, 'pretrained', 'hf-hub:org/repo' or a path"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrismaError(f"seed={seed!r}: give an integer")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    img_size = check_img_size(card, img_size)
    if card.is_tiny and weights == "pretrained":
        weights = None  # tiny cards are random-init test models
    if weights not in (None, "pretrained") and not weights.startswith("hf-hub:"):
        resolve_local_weights(weights)  # a missing path fails before anything is built
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _adapter(card).build(card, weights=weights, device=device, img_size=img_size)
    if dtype is not None:
        model.module.to(dtype)
    model.eval()
    return model


# In-place ops that only write values: on a meta tensor they compute nothing.
_VALUE_ONLY_INPLACE = frozenset(
    "uniform_ normal_ erfinv_ mul_ add_ sub_ div_ clamp_ clamp_min_ clamp_max_ zero_ fill_ "
    "copy_ exp_ log_ sqrt_ neg_ triu_ tril_ bernoulli_ random_ exponential_ log_normal_ "
    "constant_ ones_ zeros_ eye_ dirac_ trunc_normal_ orthogonal_ sparse_ kaiming_uniform_ "
    "kaiming_normal_ xavier_uniform_ xavier_normal_".split()
)


class _SkipInitOnMeta(TorchFunctionMode):
    """Skip weight initialisation on meta tensors: it writes no data there, yet runs Python
    meta kernels op by op (timm's trunc_normal_ was ~80% of a meta build)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (
            getattr(func, "__name__", "") in _VALUE_ONLY_INPLACE
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].is_meta
        ):
            return args[0]
        return func(*args, **(kwargs or {}))


def build_on_meta(name: str | ModelCard, img_size: int | None = None):
    """The card's architecture on the ``meta`` device (at ``img_size`` if given): no weights,
    no memory."""
    card = get_card(name) if isinstance(name, str) else name
    if card.family == "diffusers":
        from prisma_mm.zoo.diffusion import build_on_meta as build_pipeline_on_meta

        return build_pipeline_on_meta(card, size=img_size)
    if img_size is not None:
        img_size = check_img_size(card, img_size)
    with _SkipInitOnMeta():
        return _adapter(card).build(
            card, weights=None, device=torch.device("meta"), img_size=img_size
        )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise PrismaError(
                f"cannot read weights from {path}: not a valid safetensors file "
                f"({error.__class__.__name__}); re-download or re-export it"
            ) from error
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here is a bad user file
        raise PrismaError(
            f"cannot read weights from {path}: {error.__class__.__name__} (only safetensors and "
            "plain tensor checkpoints are loaded; pickled objects are refused)"
        ) from error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PrismaError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with one clear line when keys or shapes do not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"wrong shapes: {wrong[:3]}")
        raise PrismaError(
            f"weights {source} do not fit this model: {'; '.join(parts)} "
            "(is it a checkpoint of this card's architecture?)"
        )
    module.load_state_dict(state, strict=True)


def resolve_local_weights(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.exists():
        raise PrismaError(
            f"weights path {weights!r} does not exist: use None, 'pretrained', "
            "'hf-hub:org/repo' or an existing file or directory"
        )
    return path


def hub_offline() -> bool:
    """Whether Hugging Face downloads are off (``HF_HUB_OFFLINE`` as huggingface_hub reads it
    at import, or set since: 1 / true / yes / on in any case)."""
    import os

    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "true", "yes", "on")


def offline_hint(repo_id: str, files: list[str]) -> str:
    """Where to put files for an offline load, in words."""
    from huggingface_hub import constants

    wanted = " or ".join(files)
    return (
        f"fetch {wanted} of the Hugging Face repo {repo_id!r} into the HF cache "
        f"({constants.HF_HUB_CACHE}), e.g. `huggingface-cli download {repo_id} {files[0]}` "
        "on a machine with network access, then copy the cache folder here"
    )
