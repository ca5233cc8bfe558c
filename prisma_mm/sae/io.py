"""Saving, loading and converting dictionaries.

Our format: a directory with ``cfg.json`` (``{"format": "prisma-mm", "architecture": ...,
"config": {...}, "metadata": {...}}``) and ``weights.safetensors``.
Converters: SAELens (``cfg.json`` + ``sae_weights.safetensors``) both ways, sparsify
(``cfg.json`` + ``sae.safetensors``) both ways, ViT-Prisma (``config.json`` + ``weights.pt``,
read with ``torch.load(weights_only=True)``) in. ``from_pretrained`` reads any of these from a
local directory or a Hugging Face hub repo (offline from the HF cache); ``push_to_hub``
publishes ours. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from prisma_mm.errors import PrismaError, unknown
from prisma_mm.sae.base import Dictionary, load_dictionary, load_state, save_dictionary
from prisma_mm.sae.files import (
    CFG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    check_tensors,
    load_safetensors,
    read_json,
    require,
)
from prisma_mm.sae.transcoder import Transcoder

__all__ = [
    "FORMAT_VERSION",
    "detect_format",
    "from_pretrained",
    "from_saelens",
    "from_sparsify",
    "from_vit_prisma",
    "load_any",
    "load_dictionary",
    "prepare_hub_folder",
    "push_to_hub",
    "save_dictionary",
    "to_saelens",
    "to_sparsify",
]

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
PRISMA_CONFIG = "config.json"
PRISMA_WEIGHTS = "weights.pt"


# --------------------------------------------------------------------------------------------
# SAELens
# --------------------------------------------------------------------------------------------


def _saelens_architecture(d: Dictionary) -> tuple[str, dict[str, Any]]:
    """SAELens architecture name and extra cfg fields for an (inference-equivalent) export."""
    act = getattr(getattr(d, "activation", None), "name", "")
    if isinstance(d, Transcoder):
        if act == "relu":
            return ("skip_transcoder" if d.cfg.skip else "transcoder"), {"d_out": d.d_out}
        if act in ("jumprelu", "batchtopk") and not d.cfg.skip:
            return "jumprelu_transcoder", {"d_out": d.d_out}
        raise PrismaError(
            f"SAELens has no transcoder with activation {act!r}"
            f"{' and a skip connection' if d.cfg.skip else ''}; export relu or jumprelu ones"
        )
    if d.architecture == "crosscoder":
        raise PrismaError("SAELens export does not cover crosscoders; save with .save()")
    if act == "topk":  # our decoder rows enter as they are: no decoder-norm rescaling
        return "topk", {"k": int(d.cfg.k), "rescale_acts_by_decoder_norm": False}
    if act == "relu":
        return "standard", {}
    if act in ("jumprelu", "batchtopk"):
        return "jumprelu", {}
    raise PrismaError(f"no SAELens architecture for {d.architecture!r}")


def to_saelens(
    d: Dictionary,
    path: str | Path,
    hook_name: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``d`` in the SAELens format: ``cfg.json`` + ``sae_weights.safetensors``
    (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold`` for
    JumpReLU; BatchTopK and Matryoshka-over-BatchTopK export as JumpReLU with their global
    threshold, as SAELens saves them). Our architecture and config ride along under the
    ``"prisma_mm"`` key (ignored by SAELens) so :func:`from_saelens` restores ``d`` exactly."""
    arch, extra = _saelens_architecture(d)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hook = hook_name or d.metadata.get("hook")
    model = model_name or d.metadata.get("model")
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d.cfg.d_in,
        "d_sae": d.cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(getattr(d, "apply_b_dec_to_input", True)),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "hook_name": hook,
        "model_name": model,
        "metadata": {"hook_name": hook, "model_name": model},
        "prisma_mm": {
            "architecture": d.architecture,
            "config": d.cfg.to_dict(),
            "metadata": d.metadata,
        },
    }
    if arch.endswith("transcoder"):
        cfg["hook_name_out"] = d.metadata.get("hook_out")
    state = d.inference_state_dict()
    tensors = {k: state[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    act = d.activation  # type: ignore[attr-defined]
    if act.name == "jumprelu":
        tensors["threshold"] = act.threshold.detach()
    elif act.name == "batchtopk":
        tensors["threshold"] = act.threshold.detach().expand(d.cfg.n_latents)
    if arch == "skip_transcoder":
        tensors["W_skip"] = state["W_skip"].T
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(path / SAELENS_WEIGHTS), metadata={"format": "pt"})
    return path


def from_saelens(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Read a SAELens ``cfg.json`` + ``sae_weights.safetensors`` directory.

    ``standard`` -> ReLUSAE, ``topk`` -> TopKSAE, ``jumprelu`` -> JumpReLUSAE, ``batchtopk``
    (training checkpoints with ``topk_threshold``) -> BatchTopKSAE, ``transcoder`` /
    ``skip_transcoder`` / ``jumprelu_transcoder`` -> Transcoder. Files written by
    :func:`to_saelens` come back as the exact original dictionary.
    """
    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / SAELENS_WEIGHTS
    cfg = read_json(cfg_path)
    require(cfg, ["architecture", "d_in", "d_sae"], cfg_path)
    tensors = load_safetensors(w_path)
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise PrismaError(
            f"{cfg_path}: normalize_activations={norm!r} rescales each input at run time, which "
            "this library does not model; fold it first (SAELens fold_activation_norm_scaling_factor)"
        )
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    model = meta.get("model_name") or cfg.get("model_name")

    if isinstance(cfg.get("prisma_mm"), dict):
        d = _from_embedded(cfg["prisma_mm"], cfg_path)
        state = _from_saelens_tensors(d, tensors, w_path)
        return load_state(d, state, w_path).to(device).eval()

    arch = cfg["architecture"]
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescale and arch not in ("topk", "batchtopk"):
        raise PrismaError(
            f"{cfg_path}: rescale_acts_by_decoder_norm with architecture {arch!r} is not "
            "supported (it is folded on import for topk and batchtopk SAEs only)"
        )
    common = {
        "d_in": _int_field(cfg, "d_in", cfg_path),
        "n_latents": _int_field(cfg, "d_sae", cfg_path),
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
    }
    if arch == "standard":
        d = Dictionary.from_config("relu", common, cfg_path)
    elif arch == "topk":
        require(cfg, ["k"], cfg_path)
        d = Dictionary.from_config(
            "topk", {**common, "k": _int_field(cfg, "k", cfg_path)}, cfg_path
        )
    elif arch == "jumprelu":
        d = Dictionary.from_config("jumprelu", common, cfg_path)
    elif arch == "batchtopk":
        require(cfg, ["k"], cfg_path)
        d = Dictionary.from_config(
            "batchtopk", {**common, "k": max(1, round(_number(cfg, "k", cfg_path)))}, cfg_path
        )
    elif arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder"):
        require(cfg, ["d_out"], cfg_path)
        d = Dictionary.from_config(
            "transcoder",
            {
                **common,
                "apply_b_dec_to_input": False,
                "d_out": _int_field(cfg, "d_out", cfg_path),
                "activation": "jumprelu" if arch == "jumprelu_transcoder" else "relu",
                "skip": arch == "skip_transcoder",
            },
            cfg_path,
        )
    else:
        raise unknown(
            "SAELens architecture",
            arch,
            ["standard", "topk", "jumprelu", "batchtopk", "transcoder", "skip_transcoder"],
            hint=f" in {cfg_path}",
        )
    d.metadata = {k: v for k, v in {"hook": hook, "model": model}.items() if v is not None}
    if cfg.get("hook_name_out"):
        d.metadata["hook_out"] = cfg["hook_name_out"]
    state = _from_saelens_tensors(d, tensors, w_path)
    if rescale:
        _fold_decoder_norms(state)
    return load_state(d, state, w_path).to(device).eval()


def _fold_decoder_norms(state: dict[str, Tensor]) -> None:
    """SAELens ``rescale_acts_by_decoder_norm``: its encoder multiplies the pre-activations by
    each decoder row's norm ``n_i`` before the top-k (and any threshold), its decoder divides
    the code by ``n_i`` again. Folded as SAELens folds it on saving: ``W_enc[:, i] * n_i``,
    ``b_enc[i] * n_i``, ``W_dec[i] / n_i``, so the code and the reconstruction are unchanged
    and the decoder rows have unit norm."""
    norms = state["W_dec"].norm(dim=-1).clamp_min(1e-8)
    state["W_enc"] = state["W_enc"] * norms
    state["b_enc"] = state["b_enc"] * norms
    state["W_dec"] = state["W_dec"] / norms[:, None]


def _from_embedded(ours: dict[str, Any], cfg_path: Path) -> Dictionary:
    """The dictionary described by the ``"prisma_mm"`` key our exports embed in a config."""
    require(ours, ["architecture", "config"], cfg_path)
    d = Dictionary.from_config(ours["architecture"], ours["config"], cfg_path)
    metadata = ours.get("metadata") or {}
    d.metadata = dict(metadata) if isinstance(metadata, dict) else {}
    return d


def _from_saelens_tensors(
    d: Dictionary, tensors: dict[str, Tensor], path: Path
) -> dict[str, Tensor]:
    """Map SAELens tensor names onto ``d``'s state dict (shapes are checked by the caller)."""
    n = d.cfg.n_latents
    expected = {
        k: tuple(v.shape)
        for k, v in d.inference_state_dict().items()
        if k in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    act = d.activation.name  # type: ignore[attr-defined]
    if act in ("jumprelu", "batchtopk"):
        key = "topk_threshold" if "topk_threshold" in tensors else "threshold"
        expected[key] = () if key == "topk_threshold" else (n,)
    if "W_skip" in d.inference_state_dict():
        w_skip = d.inference_state_dict()["W_skip"]
        expected["W_skip"] = (w_skip.shape[1], w_skip.shape[0])
    check_tensors(tensors, expected, path, ignore=("log_threshold",))
    state = {k: tensors[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if act == "jumprelu":
        state["activation.threshold"] = tensors["threshold"]
    elif act == "batchtopk":
        thr = tensors.get("topk_threshold", tensors.get("threshold"))
        assert thr is not None
        flat = thr.reshape(-1)
        if not bool((flat == flat[0]).all()):
            raise PrismaError(
                f"{path}: 'threshold' differs across latents; a BatchTopK threshold is one "
                "number (load it as a JumpReLU SAE instead)"
            )
        state["activation.threshold"] = flat[0].reshape(()).to(torch.float32)
    if "W_skip" in expected:
        state["W_skip"] = tensors["W_skip"].T.contiguous()
    return state


# --------------------------------------------------------------------------------------------
# sparsify
# --------------------------------------------------------------------------------------------


def from_sparsify(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Read a sparsify ``cfg.json`` + ``sae.safetensors`` directory (TopK activation).

    ``encoder.weight [n_latents, d_in]`` -> ``W_enc`` (transposed), ``encoder.bias``,
    ``W_dec [n_latents, d_in]``, ``b_dec``. sparsify's ``transcode`` means "do not subtract
    ``b_dec`` before encoding": ``transcode`` / ``skip_connection`` give a
    :class:`~prisma_mm.sae.transcoder.Transcoder` with ``apply_b_dec_to_input = not
    transcode`` (sparsify's ``W_skip`` is transposed). Files written by :func:`to_sparsify`
    come back as the exact original dictionary (its ``"prisma_mm"`` key).
    """
    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / SPARSIFY_WEIGHTS
    cfg = read_json(cfg_path)
    if isinstance(cfg.get("prisma_mm"), dict):
        d = _from_embedded(cfg["prisma_mm"], cfg_path)
    else:
        require(cfg, ["d_in", "k"], cfg_path)
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise PrismaError(
                f"{cfg_path}: sparsify activation {activation!r} is not supported (topk)"
            )
        d_in = _int_field(cfg, "d_in", cfg_path)
        n = _int_field(cfg, "num_latents", cfg_path, 0) or d_in * _int_field(
            cfg, "expansion_factor", cfg_path, 32
        )
        transcode = bool(cfg.get("transcode", False))
        skip = bool(cfg.get("skip_connection", False))
        common = {
            "d_in": d_in,
            "n_latents": n,
            "k": _int_field(cfg, "k", cfg_path),
            "multi_topk": bool(cfg.get("multi_topk", False)),
            "normalize_decoder": bool(cfg.get("normalize_decoder", True)),
        }
        if transcode or skip:
            common.update(activation="topk", skip=skip, apply_b_dec_to_input=not transcode)
            d = Dictionary.from_config("transcoder", common, cfg_path)
        else:
            d = Dictionary.from_config("topk", common, cfg_path)
    tensors = load_safetensors(w_path)
    n, d_in = d.cfg.n_latents, d.cfg.d_in
    skip = "W_skip" in d.inference_state_dict()
    expected = {
        "encoder.weight": (n, d_in),
        "encoder.bias": (n,),
        "W_dec": (n, d_in),
        "b_dec": (d_in,),
    }
    if skip:
        expected["W_skip"] = (d_in, d_in)
    check_tensors(tensors, expected, w_path)
    state = {
        "W_enc": tensors["encoder.weight"].T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if skip:
        state["W_skip"] = tensors["W_skip"].T.contiguous()
    return load_state(d, state, w_path).to(device).eval()


def _number(cfg: dict[str, Any], key: str, path: Path, default: float | None = None) -> float:
    """``cfg[key]`` as a number (``default`` when absent or null), else one clear error."""
    value = cfg.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrismaError(f"{path}: {key!r} must be a number, got {value!r}")
    return float(value)


def _int_field(cfg: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    """``cfg[key]`` as an int (a whole float such as ``32.0`` too), else one clear error."""
    value = _number(cfg, key, path, default)
    if value != int(value):
        raise PrismaError(f"{path}: {key!r} must be an integer, got {cfg.get(key)!r}")
    return int(value)


def to_sparsify(d: Dictionary, path: str | Path) -> Path:
    """Write a TopK SAE (or a TopK transcoder with ``d_out == d_in``) in sparsify's format.

    sparsify subtracts ``b_dec`` from the input before encoding unless ``transcode`` is set,
    so ``transcode`` is written as ``not apply_b_dec_to_input`` (an SAE that does not centre its
    input encodes in sparsify exactly as here). Our architecture and config ride along under
    the ``"prisma_mm"`` key (sparsify drops unknown keys) so :func:`from_sparsify` restores
    ``d`` exactly."""
    act = getattr(getattr(d, "activation", None), "name", "")
    is_tc = isinstance(d, Transcoder)
    if act != "topk" or d.architecture not in ("topk", "transcoder"):
        raise PrismaError(f"sparsify holds TopK SAEs/transcoders only, not {d.architecture!r}")
    if is_tc and d.d_out != d.cfg.d_in:  # type: ignore[attr-defined]
        raise PrismaError("sparsify transcoders need d_out == d_in")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    skip = bool(is_tc and d.cfg.skip)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, d.cfg.n_latents // d.cfg.d_in),
        "normalize_decoder": bool(d.cfg.normalize_decoder),
        "num_latents": d.cfg.n_latents,
        "k": int(d.cfg.k),
        "multi_topk": bool(d.cfg.multi_topk),
        "skip_connection": skip,
        "transcode": not d.apply_b_dec_to_input,  # type: ignore[attr-defined]
        "d_in": d.cfg.d_in,
        "prisma_mm": {
            "architecture": d.architecture,
            "config": d.cfg.to_dict(),
            "metadata": d.metadata,
        },
    }
    state = d.inference_state_dict()
    tensors = {
        "encoder.weight": state["W_enc"].T,
        "encoder.bias": state["b_enc"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    if skip:
        tensors["W_skip"] = state["W_skip"].T
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(path / SPARSIFY_WEIGHTS), metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# ViT-Prisma
# --------------------------------------------------------------------------------------------


def _prisma_k(cfg: dict[str, Any], cfg_path: Path) -> int:
    """A ViT-Prisma TopK config's ``k`` (``activation_fn_kwargs.k``)."""
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if "k" not in kwargs:
        raise PrismaError(f"{cfg_path}: topk SAE without activation_fn_kwargs.k")
    return int(kwargs["k"])


def from_vit_prisma(
    path: str | Path,
    device: str | torch.device = "cpu",
    weights_file: str = PRISMA_WEIGHTS,
    ignore_normalization: bool = False,
) -> Dictionary:
    """Read a ViT-Prisma SAE: ``config.json`` (VisionModelSAERunnerConfig fields: ``d_in``,
    ``d_sae`` or ``expansion_factor``, ``activation_fn_str`` ``relu``/``topk`` with
    ``activation_fn_kwargs.k``, ``architecture`` ``standard``/``jumprelu``,
    ``hook_point_layer``, ``layer_subtype``, ``model_name``, ``normalize_activations``,
    ``is_transcoder``) and a state dict ``weights.pt`` (``W_enc [d_in, d_sae]``, ``W_dec
    [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``; transcoders also ``b_dec_out
    [d_out]`` and ``W_skip [d_out, d_in]``), read by :func:`load_torch_state`.

    Transcoders (``is_transcoder``: ``layer_subtype`` -> ``out_hook_point_layer`` /
    ``layer_out_subtype``, ``transcoder_with_skip_connection``) load as a
    :class:`~prisma_mm.sae.transcoder.Transcoder` with ``metadata["hook_out"]``.
    Per-token run-time normalization (``layer_norm``, ``constant_norm_rescale``) is not part of
    a plain dictionary: it raises unless ``ignore_normalization`` (then it is recorded in
    metadata); :func:`prisma_mm.sae.published.from_vit_prisma_folder` applies ``layer_norm``.
    """
    path = Path(path)
    cfg_path, w_path = path / PRISMA_CONFIG, path / weights_file
    cfg = read_json(cfg_path)
    require(cfg, ["d_in"], cfg_path)
    d_in = _int_field(cfg, "d_in", cfg_path)
    n = _int_field(cfg, "d_sae", cfg_path, 0) or d_in * _int_field(
        cfg, "expansion_factor", cfg_path, 0
    )
    if n <= 0:
        raise PrismaError(f"{cfg_path}: needs 'd_sae' or 'expansion_factor'")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none" and not ignore_normalization:
        raise PrismaError(
            f"{cfg_path}: normalize_activations={norm!r} normalizes each token at run time, "
            "which a plain dictionary does not model; load it with "
            "prisma_mm.sae.published.from_vit_prisma_folder (or prisma_mm.load_sae by name), or "
            "pass ignore_normalization=True to load the weights anyway"
        )
    act = cfg.get("activation_fn_str", "relu")
    arch = cfg.get("architecture", "standard")
    transcoder = bool(cfg.get("is_transcoder", False))
    skip = transcoder and bool(cfg.get("transcoder_with_skip_connection", True))
    d_out = _int_field(cfg, "d_out", cfg_path, d_in) if transcoder else d_in
    common = {"d_in": d_in, "n_latents": n, "apply_b_dec_to_input": True}
    if transcoder:
        if act not in ("relu", "topk"):
            raise PrismaError(
                f"{cfg_path}: unsupported ViT-Prisma transcoder activation {act!r} (relu, topk)"
            )
        tc = {**common, "apply_b_dec_to_input": False, "d_out": d_out, "activation": act}
        if act == "topk":
            tc["k"] = _prisma_k(cfg, cfg_path)
        d = Dictionary.from_config("transcoder", {**tc, "skip": skip}, cfg_path)
    elif arch == "jumprelu":
        d = Dictionary.from_config("jumprelu", common, cfg_path)
    elif act == "topk":
        d = Dictionary.from_config("topk", {**common, "k": _prisma_k(cfg, cfg_path)}, cfg_path)
    elif act == "relu" and arch == "standard":
        d = Dictionary.from_config("relu", common, cfg_path)
    else:
        raise PrismaError(
            f"{cfg_path}: unsupported ViT-Prisma SAE (architecture={arch!r}, "
            f"activation_fn_str={act!r}); supported: standard relu/topk, jumprelu"
        )
    obj = load_torch_state(w_path)
    if transcoder:
        expected = {
            "W_enc": (d_in, n),
            "b_enc": (n,),
            "W_dec": (n, d_out),
            "b_dec": (d_in,),
            "b_dec_out": (d_out,),
        }
        if skip:
            expected["W_skip"] = (d_out, d_in)
        check_tensors(obj, expected, w_path)
        # ViT-Prisma's transcoder centres its input on b_dec [d_in] and adds b_dec_out [d_out]:
        # the centring folds into b_enc, b_dec_out is our b_dec, W_skip is stored [out, in]
        state = {
            "W_enc": obj["W_enc"],
            "b_enc": obj["b_enc"] - obj["b_dec"] @ obj["W_enc"],
            "W_dec": obj["W_dec"],
            "b_dec": obj["b_dec_out"],
        }
        if skip:
            state["W_skip"] = obj["W_skip"].T.contiguous()
    else:
        expected = {"W_enc": (d_in, n), "W_dec": (n, d_in), "b_enc": (n,), "b_dec": (d_in,)}
        if arch == "jumprelu":
            expected["threshold"] = (n,)
        check_tensors(obj, expected, w_path)
        state = {k: obj[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if arch == "jumprelu":
            state["activation.threshold"] = obj["threshold"]
    layer, subtype = cfg.get("hook_point_layer"), cfg.get("layer_subtype")
    d.metadata = {"source_format": "vit-prisma"}
    if cfg.get("hook_point"):
        d.metadata["hook"] = cfg["hook_point"]
    elif layer is not None and subtype:
        d.metadata["hook"] = f"blocks.{layer}.{subtype}"
    if transcoder:
        out_layer = cfg.get("out_hook_point_layer", layer)
        out_subtype = cfg.get("layer_out_subtype", "hook_mlp_out")
        d.metadata["hook_out"] = f"blocks.{out_layer}.{out_subtype}"
    if cfg.get("model_name"):
        d.metadata["model"] = cfg["model_name"]
    if norm != "none":
        d.metadata["unapplied_normalization"] = norm
    return load_state(d, state, w_path).to(device).eval()


# The one class some ViT-Prisma checkpoints pickle beside their tensors (their training config).
PRISMA_PICKLED_CONFIG = "vit_prisma.sae.config.VisionModelSAERunnerConfig"


class PickledConfigStandIn:
    """Receives the fields of a pickled ViT-Prisma config as plain data: the weights-only
    unpickler builds it with ``__new__`` and a ``__dict__`` update, so no code of the original
    class runs (the config.json beside the weights is what the loader reads)."""


def load_torch_state(path: Path) -> dict[str, Tensor]:
    """A tensor state dict from a torch checkpoint, read with ``weights_only=True``.

    A dict holding ``state_dict`` (ViT-Prisma's ``{"cfg": ..., "state_dict": ...}``) gives that
    entry. ViT-Prisma's pickled config class is read into :class:`PickledConfigStandIn`;
    any other global (a class, a function, ``os.system`` in a reduce) is refused in one line."""
    if not path.is_file():
        raise PrismaError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals([(PickledConfigStandIn, PRISMA_PICKLED_CONFIG)]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of many kinds: name the file, never unpickle more
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrismaError(
            f"{path}: refused: not a plain tensor checkpoint loadable with weights_only=True "
            f"({reason[:200]}); only tensors and ViT-Prisma's config are read, never code"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PrismaError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


# --------------------------------------------------------------------------------------------
# any format, hub
# --------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``"prisma-mm"``, ``"saelens"``, ``"sparsify"`` or ``"vit-prisma"`` from the files."""
    path = Path(path)
    if (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return "prisma-mm"
    if (path / CFG_FILE).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / CFG_FILE).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (path / PRISMA_CONFIG).is_file() and (path / PRISMA_WEIGHTS).is_file():
        return "vit-prisma"
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise PrismaError(
        f"{path}: no dictionary found (expected cfg.json + weights.safetensors, "
        f"sae_weights.safetensors or sae.safetensors, or config.json + weights.pt; "
        f"found {', '.join(present) or 'nothing'})"
    )


def load_any(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load a dictionary directory in any supported format."""
    fmt = detect_format(path)
    if fmt == "prisma-mm":
        return load_dictionary(path, device=device)
    if fmt == "saelens":
        return from_saelens(path, device=device)
    if fmt == "sparsify":
        return from_sparsify(path, device=device)
    return from_vit_prisma(path, device=device)


def from_pretrained(
    name_or_path: str | Path,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Dictionary:
    """A dictionary from a local directory or a Hugging Face hub repo id (``org/name``), in any
    supported format. ``subfolder``: the dictionary's folder inside the repo (e.g. a hook
    name). ``local_files_only=None`` tries the hub, then falls back to the local HF cache."""
    local = Path(name_or_path)
    if local.exists():
        return load_any(local / subfolder if subfolder else local, device=device)
    repo_id = str(name_or_path)
    if repo_id.count("/") != 1:
        raise PrismaError(
            f"{repo_id!r} is neither an existing directory nor a hub repo id like 'org/name'"
        )
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": revision,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "allow_patterns": [f"{subfolder}/*"] if subfolder else None,
    }
    attempts = [bool(local_files_only)] if local_files_only is not None else [False, True]
    last: Exception | None = None
    for offline in attempts:
        try:
            root = Path(snapshot_download(local_files_only=offline, **kwargs))
            break
        except Exception as err:  # network, missing cache entry, auth: try the next way
            last = err
    else:
        raise PrismaError(
            f"could not get {repo_id!r}{f' (subfolder {subfolder!r})' if subfolder else ''} "
            f"from the hub or the local Hugging Face cache: {type(last).__name__}: {last}"
        )
    return load_any(root / subfolder if subfolder else root, device=device)


def prepare_hub_folder(
    d: Dictionary, folder: str | Path, repo_id: str | None = None, subfolder: str | None = None
) -> Path:
    """Write what :func:`push_to_hub` uploads: ``cfg.json``, ``weights.safetensors`` (in
    ``subfolder`` if given) and a ``README.md`` model card at the top. Returns ``folder``."""
    folder = Path(folder)
    target = folder / subfolder if subfolder else folder
    save_dictionary(d, target)
    cfg = d.cfg.to_dict()
    name = repo_id or "this repository"
    load_args = f'"{repo_id}"' if repo_id else '"path/to/dir"'
    if subfolder:
        load_args += f', subfolder="{subfolder}"'
    lines = [
        "---",
        "library_name: prisma-mm",
        "tags:",
        "- prisma-mm",
        "- sparse-autoencoder",
        f"- {d.architecture}",
        "---",
        "",
        f"# {d.architecture} dictionary ({name})",
        "",
        f"- latents: {cfg['n_latents']}, input size: {cfg['d_in']}",
        f"- model: {d.metadata.get('model', 'unknown')}",
        f"- hook: {d.metadata.get('hook', 'unknown')}",
        "",
        "```python",
        "from prisma_mm.sae import from_pretrained",
        f"sae = from_pretrained({load_args})",
        "```",
        "",
        "Config:",
        "",
        "```json",
        json.dumps(cfg, indent=2),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
    return folder


def push_to_hub(
    d: Dictionary,
    repo_id: str,
    *,
    subfolder: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``d`` (see :func:`prepare_hub_folder`) to a hub model repo, creating it if
    needed; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_hub_folder(d, tmp, repo_id=repo_id, subfolder=subfolder)
        info = api.upload_folder(
            folder_path=tmp,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or f"Upload {d.architecture} dictionary",
        )
    return str(info)
