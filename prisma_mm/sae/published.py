"""Published SAEs by name: cards (YAML data in ``model_zoo/saes/``) and one loader per format.

A card file holds one release family::

    format: vit-prisma                 # the loader: vit-prisma | sdxl-unbox | saev | clip-scope
    release: https://...               # where the family is described
    defaults: {model: clip-b32-datacomp-xl, files: [config.json, "*.pt"], ...}
    cards:
      - name: prisma-clip-b32-vanilla-x64-l10-mlp-out
        repo: Prisma-Multimodal/sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-10-hook_mlp_out-l1-1e-05
        hook: blocks.10.hook_mlp_out

Each card names its source (a Hugging Face repo and the files in it, or a GitHub repo and a
folder in it), the zoo model card it belongs to, the hook it reads (``hook_out``: the hook a
transcoder writes), the tokens it was trained on (``all``, ``patches`` or ``cls``), its sizes and
the input normalisation it expects. :func:`load_sae` turns a name into a
:class:`~prisma_mm.sae.base.Dictionary` whose metadata carries the hook and the model, so
``prisma-mm eval NAME``, the feature index, the browser and steering need nothing more.

Weights are read offline from the Hugging Face cache (``HF_HUB_OFFLINE=1`` never touches the
network) or from a local folder, and never by unpickling code: plain state dicts go through
``torch.load(weights_only=True)``; ViT-Prisma's one pickled config class is read into a
stand-in (:func:`~prisma_mm.sae.io.load_torch_state`).
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import functools
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from prisma_mm.errors import PrismaError, unknown
from prisma_mm.sae.base import Dictionary, Output, SparseAutoencoder, load_state
from prisma_mm.sae.files import check_tensors, read_json
from prisma_mm.sae.io import from_vit_prisma

__all__ = [
    "FORMATS",
    "SAECard",
    "apply_dataset_scaling",
    "card_activation_shape",
    "card_token_rows",
    "estimate_dataset_scaling",
    "from_clip_scope",
    "from_saev",
    "from_sdxl_unbox",
    "from_vit_prisma_folder",
    "get_sae_card",
    "list_saes",
    "load_sae",
    "resolve_files",
    "standardize_tokens",
]

FORMATS = ("vit-prisma", "sdxl-unbox", "saev", "clip-scope")
TOKENS = ("all", "patches", "cls")
NORMALIZATIONS = ("none", "config", "per-token", "dataset-scale")


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAECard:
    """One published dictionary: where it lives, what it reads, how its input is prepared.

    ``repo``: a Hugging Face model repo id (``org/name``) or ``github:owner/name``;
    ``files``: paths inside ``subfolder`` of it, a ``*`` pattern matching the checkpoint (the
    one with the largest number in its name is the final one). ``tokens``: ``all``,
    ``patches`` (no CLS / registers) or ``cls``. ``normalization``: ``none``, ``config`` (as
    the release's config.json says; ViT-Prisma's ``layer_norm`` is applied at run time),
    ``per-token`` (standardised per token at run time) or
    ``dataset-scale`` (trained on ``(x - mean) / scale`` with statistics not released:
    :func:`estimate_dataset_scaling`). ``img_size``: the input size the model ran at.
    """

    name: str
    format: str
    repo: str
    model: str
    hook: str
    d_in: int
    n_latents: int
    tokens: str
    files: tuple[str, ...]
    subfolder: str = ""
    hook_out: str | None = None
    k: int | None = None
    architecture: str = ""
    normalization: str = "none"
    img_size: int | None = None
    description: str = ""
    release: str = ""
    family: str = ""

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out is not None

    @property
    def on_hub(self) -> bool:
        return not self.repo.startswith("github:")

    def to_dict(self) -> dict[str, Any]:
        info = asdict(self)
        info["files"] = list(self.files)
        return info


_REQUIRED = ("name", "repo", "model", "hook", "d_in", "n_latents", "tokens", "files")


def saes_dir() -> Path:
    """``model_zoo/saes`` (inside an installed wheel: ``prisma_mm/model_zoo/saes``)."""
    from prisma_mm.zoo.registry import zoo_dir

    return zoo_dir() / "saes"


def _parse_card_file(path: Path) -> list[SAECard]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "format" not in data or "cards" not in data:
        raise PrismaError(f"SAE card file {path} must have 'format' and 'cards' keys")
    fmt = data["format"]
    if fmt not in FORMATS:
        raise unknown("SAE format", str(fmt), FORMATS, hint=f" in {path.name}")
    defaults = dict(data.get("defaults") or {})
    known = set(SAECard.__dataclass_fields__) - {"format", "release", "family"}
    cards = []
    for entry in data["cards"]:
        merged = {**defaults, **entry}
        extra = set(merged) - known
        missing = [k for k in _REQUIRED if k not in merged]
        if extra or missing:
            raise PrismaError(
                f"SAE card {merged.get('name', '?')!r} in {path.name}: missing {missing}, "
                f"unknown keys {sorted(extra)}"
            )
        merged["files"] = tuple(merged["files"])
        card = SAECard(format=fmt, release=str(data.get("release", "")), family=path.stem,
                       **merged)  # fmt: skip
        if card.tokens not in TOKENS or card.normalization not in NORMALIZATIONS:
            raise PrismaError(
                f"SAE card {card.name!r}: tokens must be one of {TOKENS} and normalization "
                f"one of {NORMALIZATIONS}"
            )
        cards.append(card)
    return cards


@functools.cache
def _cards() -> dict[str, SAECard]:
    cards: dict[str, SAECard] = {}
    for path in sorted(saes_dir().glob("*.yaml")):
        for card in _parse_card_file(path):
            if card.name in cards:
                raise PrismaError(
                    f"SAE card {card.name!r} is defined twice ({cards[card.name].family}, "
                    f"{path.stem})"
                )
            cards[card.name] = card
    return cards


def list_saes(family: str | None = None) -> list[str]:
    """Names of the carded SAEs, optionally of one release family (a card file's stem)."""
    cards = _cards()
    families = sorted({c.family for c in cards.values()})
    if family is not None and family not in families:
        raise unknown("SAE family", family, families)
    return [n for n, c in cards.items() if family is None or c.family == family]


def get_sae_card(name: str) -> SAECard:
    """The card called ``name``; unknown names get the nearest valid ones."""
    cards = _cards()
    if name not in cards:
        raise unknown("published SAE", name, cards, hint=" (see `prisma-mm sae list`)")
    return cards[name]


# --------------------------------------------------------------------------------------------
# Files: a local folder or the Hugging Face cache
# --------------------------------------------------------------------------------------------


def _checkpoint_rank(name: str) -> tuple[int, str]:
    """The final checkpoint among a pattern's matches: the largest number in the file name."""
    numbers = [int(n) for n in re.findall(r"\d+", Path(name).name)]
    return (max(numbers) if numbers else -1, name)


def _pick(pattern: str, names: list[str]) -> str | None:
    """The final checkpoint among ``names`` matching ``pattern`` at the same folder depth."""
    depth = pattern.count("/")
    matches = [n for n in names if n.count("/") == depth and fnmatch.fnmatch(n, pattern)]
    return max(matches, key=_checkpoint_rank) if matches else None


def _fetch_hint(card: SAECard) -> str:
    if not card.on_hub:
        where = f"{card.subfolder}/" if card.subfolder else ""
        return (
            f"clone https://github.com/{card.repo.removeprefix('github:')} and pass "
            f"path=<clone>/{where} (on the command line {card.name}@<clone>; files "
            f"{', '.join(card.files)})"
        )
    from prisma_mm.zoo.registry import offline_hint

    files = [f"{card.subfolder}/{f}" if card.subfolder else f for f in card.files]
    return offline_hint(card.repo, files).replace(
        f"`huggingface-cli download {card.repo} {files[0]}`",
        f"`huggingface-cli download {card.repo} --include {' '.join(repr(f) for f in files)}`",
    )


def resolve_files(
    card: SAECard,
    path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> dict[str, Path]:
    """Each of ``card.files`` as a local path: from ``path`` (a folder in the release's layout)
    if given, else from the Hugging Face cache (then, unless offline, the hub). A missing file
    is one line naming what to fetch."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise PrismaError(f"path {str(path)!r} is not a folder: {_fetch_hint(card)}")
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        base = card.subfolder if (folder / card.subfolder).is_dir() and card.subfolder else ""
        found = {}
        for pattern in card.files:
            full = f"{base}/{pattern}" if base else pattern
            hit = _pick(full, names)
            if hit is None:
                raise PrismaError(
                    f"{card.name}: no file matching {pattern!r} in {folder}: {_fetch_hint(card)}"
                )
            found[pattern] = folder / hit
        return found
    if not card.on_hub:
        raise PrismaError(f"{card.name} is published on GitHub, not the hub: {_fetch_hint(card)}")
    return _from_hub(card, cache_dir, revision, local_files_only)


def _from_hub(
    card: SAECard, cache_dir: Any, revision: str | None, local_files_only: bool | None
) -> dict[str, Path]:
    from huggingface_hub import snapshot_download

    from prisma_mm.zoo.registry import hub_offline

    patterns = [f"{card.subfolder}/{f}" if card.subfolder else f for f in card.files]
    cache = str(cache_dir) if cache_dir is not None else None
    attempts = [True] if (local_files_only or hub_offline()) else [True, False]
    if local_files_only is False:
        attempts = [False]
    for offline in attempts:
        try:
            if offline:
                root = Path(
                    snapshot_download(
                        card.repo, revision=revision, cache_dir=cache, local_files_only=True
                    )
                )
                names = sorted(
                    p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                )
            else:
                names = _remote_names(card, revision)
                wanted = [_pick(p, names) for p in patterns]
                if any(w is None for w in wanted):
                    break
                root = Path(
                    snapshot_download(
                        card.repo, revision=revision, cache_dir=cache, allow_patterns=wanted
                    )
                )
                names = [w for w in wanted if w is not None]
        except Exception:  # noqa: BLE001 - no cache entry, no network, no such repo
            continue
        found = {f: _pick(p, names) for f, p in zip(card.files, patterns)}
        if all(v is not None for v in found.values()):
            return {f: root / str(v) for f, v in found.items()}
    missing = "offline" if attempts == [True] else "in the cache or on the hub"
    raise PrismaError(f"{card.name}: weights not found {missing}: {_fetch_hint(card)}")


def _remote_names(card: SAECard, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    return list(HfApi().list_repo_files(card.repo, revision=revision))


# --------------------------------------------------------------------------------------------
# Run-time normalisation
# --------------------------------------------------------------------------------------------


class _TokenStandardized:
    """Mixed in front of an SAE family trained on per-token normalised inputs (ViT-Prisma's
    ``normalize_activations``): ``x' = (x - mu) / s_in``, ``recon = recon' * s_out + mu``.

    ``layer_norm``: ``mu`` the token's mean, ``s_in = std + eps``, ``s_out = std`` (unbiased
    std, as ViT-Prisma computes it); ``constant_norm_rescale``: ``mu = 0``, ``s = ||x|| /
    sqrt(d)``. As in ViT-Prisma, :meth:`encode` keeps the statistics of the rows it saw and
    :meth:`decode` un-normalises with them, so ``decode(encode(x))`` is the reconstruction;
    a transcoder's skip path reads the raw input and is scaled by ``s_out``.
    """

    _norm_mode: str = "layer_norm"
    _norm_eps: float = 1e-5
    _stats: tuple[Tensor, Tensor, Tensor] | None = None

    def _normalize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x [..., d]`` -> ``(x', mu, s_in, s_out)`` with ``[..., 1]`` statistics."""
        if self._norm_mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            centred = x - mu
            std = centred.std(-1, keepdim=True)
            return centred / (std + self._norm_eps), mu, std + self._norm_eps, std
        scale = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
        return x / scale, torch.zeros_like(scale), scale, scale

    def _normalize_kept(self, x: Tensor) -> Tensor:
        """``x'`` of raw ``x [..., d]``, keeping the rows' statistics for :meth:`decode`."""
        x_norm, mu, _, s_out = self._normalize(x)
        self._stats = (mu, s_out, torch.tensor(x.shape[:-1]))
        return x_norm

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` (raw) -> code ``[..., n_latents]``; keeps the rows' statistics."""
        return super().encode(self._normalize_kept(x))  # type: ignore[misc]

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [..., d_in]`` (raw) -> ``(values [..., m], indices [..., m])`` of the code
        :meth:`encode` gives (the feature index reads this path); keeps the rows' statistics."""
        return super().encode_sparse(self._normalize_kept(x))  # type: ignore[misc]

    def _kept(self, lead: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        if self._stats is None or tuple(self._stats[2].tolist()) != tuple(lead):
            raise PrismaError(
                f"{type(self).__name__}: decode un-normalises with the statistics of the rows "
                "last encoded (per-token normalisation): call encode on the same rows first, "
                "or use forward(x)"
            )
        return self._stats[0], self._stats[1]

    def decode(self, code: Tensor) -> Tensor:
        """``code [..., n_latents]`` -> raw reconstruction ``[..., d_out]`` (see class doc)."""
        recon = super().decode(code)  # type: ignore[misc]
        mu, s_out = self._kept(tuple(code.shape[:-1]))
        return recon * s_out.to(recon.dtype) + mu.to(recon.dtype)

    def skip(self, x: Tensor) -> Tensor | None:
        """The transcoder skip path of raw ``x [rows, d_in]``, scaled by the kept ``s_out``."""
        out = super().skip(x)  # type: ignore[misc]
        if out is None:
            return None
        kept = tuple(self._stats[2].tolist()) if self._stats is not None else (-1,)
        _, s_out = self._kept(kept)
        if s_out.numel() != out.shape[0]:
            self._kept((-1,))  # rows differ from the last encode: the one-line error
        return out * s_out.reshape(-1, 1).to(out.dtype)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """``x [batch, d_in]`` raw -> :class:`Output` with the raw reconstruction; ``losses``:
        ``fvu`` and ``mse`` against ``target`` (default ``x``). Inference only: the loss is
        not the one the release was trained with."""
        code = self.encode(x)
        recon = self.decode(code)
        skip = self.skip(x.reshape(-1, x.shape[-1]))
        if skip is not None:
            recon = recon + skip.reshape(recon.shape)
        target = x if target is None else target
        flat_r = recon.reshape(-1, recon.shape[-1])
        losses = self.reconstruction_terms(flat_r, target.reshape(flat_r.shape))  # type: ignore[attr-defined]
        return Output(recon=recon, code=code, loss=losses["fvu"], losses=losses)


@functools.cache
def _token_normalized(base: type) -> type:
    """``base`` with per-token normalisation in front (one class per family; not registered
    as an architecture: it saves as ``base``, with the normalisation in its metadata)."""
    return type(f"TokenNormalized{base.__name__}", (_TokenStandardized, base), {})


def standardize_tokens(d: Dictionary, mode: str = "layer_norm", eps: float = 1e-5) -> Dictionary:
    """Make ``d`` (an SAE family) normalise each input token at run time, in place
    (``mode``: ViT-Prisma's ``layer_norm`` or ``constant_norm_rescale``); recorded in
    ``metadata["normalization"]``. Returns ``d``."""
    if mode not in ("layer_norm", "constant_norm_rescale"):
        raise PrismaError(f"unknown per-token normalisation {mode!r}: layer_norm or "
                          "constant_norm_rescale")  # fmt: skip
    if not isinstance(d, SparseAutoencoder):
        raise PrismaError(f"per-token normalisation wraps an SAE family, not {type(d).__name__}")
    if not isinstance(d, _TokenStandardized):
        d.__class__ = _token_normalized(type(d))
    d._norm_mode, d._norm_eps = mode, float(eps)  # type: ignore[attr-defined]
    d.metadata["normalization"] = {"per_token": mode, "eps": float(eps), "folded": False}
    return d


# --------------------------------------------------------------------------------------------
# Format loaders
# --------------------------------------------------------------------------------------------


def from_vit_prisma_folder(
    folder: str | Path, weights_file: str | None = None, device: str | torch.device = "cpu"
) -> Dictionary:
    """A ViT-Prisma release folder: ``config.json`` and one ``.pt`` checkpoint (the one named,
    else the only / final one). ``normalize_activations`` of the config is applied at run time
    (:func:`standardize_tokens`); transcoders keep their skip path."""
    folder = Path(folder)
    if weights_file is None:
        names = sorted(p.name for p in folder.glob("*.pt"))
        weights_file = _pick("*.pt", names)
        if weights_file is None:
            raise PrismaError(f"{folder}: no .pt checkpoint beside config.json")
    d = from_vit_prisma(folder, device=device, weights_file=weights_file, ignore_normalization=True)
    mode = d.metadata.pop("unapplied_normalization", None)
    if mode is not None:
        standardize_tokens(d, mode)
    return d


def _torch_file(path: Path, what: str) -> Any:
    """A weights-only torch object (tensor or dict) from ``path``, or one line."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickles with code, truncated files, ...
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PrismaError(
            f"{path}: refused: {what} must be plain tensors loadable with weights_only=True "
            f"({first}); nothing else is unpickled"
        ) from None


def from_sdxl_unbox(folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """An sdxl-unbox checkpoint folder: ``config.json`` (``n_dirs_local``, ``d_model``, ``k``),
    ``state_dict.pth`` (``{"state_dict": {encoder.weight [n, d], decoder.weight [d, n],
    pre_bias [d], latent_bias [n], stats_last_nonzero [n]}}``) and ``mean.pt`` / ``std.pt``.

    ``latents = relu(topk(encoder(x - pre_bias) + latent_bias))``, ``recon = decoder(latents) +
    pre_bias`` is a TopK SAE with ``b_dec = pre_bias`` subtracted from the input. ``mean.pt`` /
    ``std.pt`` are each latent's activation statistics ``[n]`` (the release's steering scale),
    kept as ``d.latent_mean`` / ``d.latent_std``; the input (the block's update) is raw."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    for key in ("n_dirs_local", "d_model", "k"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise PrismaError(f"{cfg_path}: {key!r} must be an integer, got {cfg.get(key)!r}")
    n, d_in, k = cfg["n_dirs_local"], cfg["d_model"], cfg["k"]
    w_path = folder / "state_dict.pth"
    if not w_path.is_file():
        raise PrismaError(f"{w_path}: file not found")
    obj = _torch_file(w_path, "state_dict.pth")
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise PrismaError(f"{w_path}: expected {{'state_dict': {{...}}}}")
    check_tensors(
        state,
        {
            "encoder.weight": (n, d_in),
            "decoder.weight": (d_in, n),
            "pre_bias": (d_in,),
            "latent_bias": (n,),
        },
        w_path,
        ignore=("stats_last_nonzero",),
    )
    d = Dictionary.from_config("topk", {"d_in": d_in, "n_latents": n, "k": k}, cfg_path)
    ours = {
        "W_enc": state["encoder.weight"].T.contiguous().float(),
        "b_enc": state["latent_bias"].float(),
        "W_dec": state["decoder.weight"].T.contiguous().float(),
        "b_dec": state["pre_bias"].float(),
    }
    load_state(d, ours, w_path)
    for stat in ("mean", "std"):
        path = folder / f"{stat}.pt"
        if path.is_file():
            value = _torch_file(path, f"{stat}.pt")
            if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
                raise PrismaError(f"{path}: expected a tensor [{n}] (one value per latent)")
            setattr(d, f"latent_{stat}", value.float().to(device))
    d.metadata = {"source_format": "sdxl-unbox"}
    return d.to(device).eval()


def _saev_header(path: Path) -> tuple[dict[str, Any], bytes]:
    with open(path, "rb") as handle:
        first = handle.readline()
        rest = handle.read()
    try:
        header = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PrismaError(
            f"{path}: not a saev checkpoint (its first line must be a JSON header)"
        ) from None
    if not isinstance(header, dict):
        raise PrismaError(f"{path}: the saev header must be a JSON object")
    return header, rest


def _saev_config(header: dict[str, Any], path: Path) -> tuple[int, int, str, int | None, bool]:
    """``(d_in, n_latents, activation, k, centres_on_b_dec)`` from any saev header schema."""
    if "schema" not in header:  # the first releases: raw config fields, ReLU, x - b_dec
        d_in = header.get("d_vit")
        exp = header.get("exp_factor")
        n = header.get("d_sae") or (
            d_in * exp if isinstance(d_in, int) and isinstance(exp, int) else None
        )
        if not isinstance(d_in, int) or not isinstance(n, int):
            raise PrismaError(f"{path}: saev header without d_vit and exp_factor")
        return d_in, n, "relu", None, True
    schema = header["schema"]
    if schema not in (1, 2, 3, 4, 5):
        raise PrismaError(f"{path}: unknown saev schema {schema!r} (1-5 are read)")
    cfg = dict(header.get("cfg") or {})
    d_in = cfg.get("d_model")
    n = cfg.get("d_sae") or (
        d_in * cfg["exp_factor"] if isinstance(d_in, int) and "exp_factor" in cfg else None
    )
    if not isinstance(d_in, int) or not isinstance(n, int):
        raise PrismaError(f"{path}: saev cfg without d_model and d_sae")
    activation = cfg.get("activation")
    if schema == 1 and header.get("cls") in ("Relu", "TopK", "BatchTopK"):
        kind, k = header["cls"], cfg.get("top_k", 32)
    elif isinstance(activation, dict) and "cls" in activation:
        kind, k = activation["cls"], (activation.get("params") or {}).get("top_k")
    else:
        raise PrismaError(f"{path}: saev cfg without an activation")
    if kind == "Relu":
        return d_in, n, "relu", None, False
    if kind == "TopK":
        return d_in, n, "topk", int(k if k is not None else 32), False
    raise PrismaError(f"{path}: saev activation {kind!r} is not read (Relu, TopK)")


def from_saev(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """A saev ``sae.pt``: one JSON header line, then a ``torch.save``'d state dict (``W_enc
    [d, n]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]``), read with ``weights_only=True``.

    Pre-schema headers (``d_vit``, ``exp_factor``; the first CLIP / DINOv2 / BioCLIP releases)
    encode ``relu((x - b_dec) W_enc + b_enc)``; schema 1-5 headers ``act(x W_enc + b_enc)`` with
    ``Relu`` or ``TopK`` (``top_k``). saev's TopK keeps the top ``k`` pre-activations even when
    negative; here they are clipped at 0 (the same code wherever ``k`` are positive). The
    training inputs were scaled with statistics the file does not hold: see
    :func:`estimate_dataset_scaling`."""
    path = Path(path)
    if not path.is_file():
        raise PrismaError(f"{path}: file not found")
    header, rest = _saev_header(path)
    d_in, n, activation, k, centred = _saev_config(header, path)
    try:
        state = torch.load(io.BytesIO(rest), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickles with code, truncated files, ...
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PrismaError(
            f"{path}: refused: the weights after the header must be a plain state dict "
            f"loadable with weights_only=True ({first})"
        ) from None
    if not isinstance(state, dict):
        raise PrismaError(f"{path}: expected a state dict after the header")
    state = {k_: v for k_, v in state.items() if not k_.startswith("activation.")}
    check_tensors(
        state, {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}, path
    )
    common = {"d_in": d_in, "n_latents": n, "apply_b_dec_to_input": centred}
    if activation == "topk":
        d = Dictionary.from_config("topk", {**common, "k": k}, path)
    else:
        d = Dictionary.from_config("relu", common, path)
    load_state(d, {key: v.float() for key, v in state.items()}, path)
    d.metadata = {"source_format": "saev", "saev_header": header}
    return d.to(device).eval()


def from_clip_scope(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """A CLIP-Scope checkpoint (``{layer}_resid/{tokens}.pt``): a dict with ``d_in``,
    ``n_features``, ``k`` and ``model_state_dict`` (``pre_b [d]``, ``enc [d, n]``, ``dec [n,
    d]``), read with ``weights_only=True``. ``latent = topk((x - pre_b) @ enc)``, ``recon =
    latent @ dec + pre_b``: a TopK SAE without encoder bias (clipscope keeps negative top-k
    values; they are clipped at 0 here, the same code wherever ``k`` are positive)."""
    path = Path(path)
    if not path.is_file():
        raise PrismaError(f"{path}: file not found")
    obj = _torch_file(path, "a CLIP-Scope checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("model_state_dict"), dict):
        raise PrismaError(f"{path}: expected a dict with 'model_state_dict' (CLIP-Scope layout)")
    for key in ("d_in", "n_features", "k"):
        if not isinstance(obj.get(key), int) or isinstance(obj.get(key), bool):
            raise PrismaError(f"{path}: {key!r} must be an integer, got {obj.get(key)!r}")
    d_in, n, k = obj["d_in"], obj["n_features"], obj["k"]
    state = obj["model_state_dict"]
    check_tensors(state, {"pre_b": (d_in,), "enc": (d_in, n), "dec": (n, d_in)}, path)
    d = Dictionary.from_config("topk", {"d_in": d_in, "n_latents": n, "k": k}, path)
    ours = {
        "W_enc": state["enc"].float(),
        "b_enc": torch.zeros(n),
        "W_dec": state["dec"].float(),
        "b_dec": state["pre_b"].float(),
    }
    load_state(d, ours, path)
    d.metadata = {"source_format": "clip-scope"}
    return d.to(device).eval()


# --------------------------------------------------------------------------------------------
# Dataset scaling (saev): estimated from an activation cache
# --------------------------------------------------------------------------------------------


def card_token_rows(manifest: dict[str, Any], hook: str, tokens: str | None) -> list[int] | None:
    """Positions among a cache's stored tokens of ``hook`` that an SAE trained on ``tokens``
    (``all``, ``patches`` or ``cls``: a card's, in ``metadata["tokens"]``) reads; None when it
    reads every stored token. ``cls`` is model token 0, as ``prisma-mm cache --tokens cls``."""
    if tokens in (None, "all"):
        return None
    kept = [int(t) for t in manifest["token_index"][hook]]
    if any(t < 0 for t in kept):
        raise PrismaError("the cache keeps random tokens per sample: write it with --tokens all")
    n_prefix = int((manifest.get("layout") or {}).get("n_prefix", 0))
    if tokens == "cls":
        rows = [i for i, t in enumerate(kept) if t == 0 and n_prefix > 0]
    else:
        rows = [i for i, t in enumerate(kept) if t >= n_prefix]
    if not rows:
        raise PrismaError(
            f"the SAE reads {tokens} tokens but the cache keeps none of them at {hook!r} (it "
            f"keeps {manifest.get('tokens')!r}): write the cache with --tokens {tokens}"
        )
    return None if rows == list(range(len(kept))) else rows


@torch.no_grad()
def estimate_dataset_scaling(
    cache_dir: str | Path, hook: str, tokens: str = "patches", max_rows: int = 2**19
) -> tuple[Tensor, float]:
    """saev's input scaling, estimated from an activation cache: ``mean [d]`` = the mean
    activation and ``scale`` = ``E||x - mean|| / sqrt(d)`` (saev: 2^19 random training rows),
    over the ``tokens`` (``patches``, ``cls`` or ``all``) of at most ``max_rows`` rows in two
    streaming passes. The SAE then reads ``(x - mean) / scale``."""
    from prisma_mm.cache.reader import ActivationDataset

    def rows():
        ds = ActivationDataset(cache_dir, hook, batch_size=4096, shuffle_buffer=0,
                               provenance=True)  # fmt: skip
        rows_kept = card_token_rows(ds.manifest, hook, tokens)
        keep = None
        if rows_kept is not None:
            keep = torch.zeros(ds.n_tokens, dtype=torch.bool)
            keep[rows_kept] = True
        seen = 0
        for acts, _keys, token in ds:
            if keep is not None:
                acts = acts[keep[token] if token.numel() else token.bool()]
            acts = acts[: max_rows - seen].double()
            seen += acts.shape[0]
            if acts.shape[0]:
                yield acts
            if seen >= max_rows:
                return

    total, count = None, 0
    for acts in rows():
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += acts.shape[0]
    if total is None or count == 0:
        raise PrismaError(f"cache {str(cache_dir)!r} holds no {tokens} rows at {hook!r}")
    mean = total / count
    norms = sum(float((acts - mean).norm(dim=1).sum()) for acts in rows())
    scale = norms / count / math.sqrt(mean.numel())
    return mean.float(), float(scale)


def apply_dataset_scaling(
    d: Dictionary, cache_dir: str | Path, hook: str | None = None, tokens: str | None = None,
    max_rows: int = 2**19,
) -> Dictionary:  # fmt: skip
    """Fold saev's estimated input scaling (:func:`estimate_dataset_scaling`) into ``d`` so it
    reads raw activations; recorded in ``metadata["normalization"]``. Returns ``d``."""
    hook = hook or d.metadata.get("hook")
    if not isinstance(hook, str):
        raise PrismaError("the dictionary records no single hook: pass hook=")
    tokens = tokens or d.metadata.get("tokens", "patches")
    mean, scale = estimate_dataset_scaling(cache_dir, hook, tokens, max_rows)
    if mean.numel() != d.cfg.d_in:
        raise PrismaError(
            f"cache rows at {hook!r} have d={mean.numel()}; the dictionary reads d_in={d.cfg.d_in}"
        )
    d.fold_normalization_(mean.to(d.W_dec.device), scale)
    d.metadata["normalization"]["estimated_from"] = str(Path(cache_dir).resolve())
    return d


# --------------------------------------------------------------------------------------------
# By name
# --------------------------------------------------------------------------------------------


def _load_format(card: SAECard, files: dict[str, Path], device: Any) -> Dictionary:
    first = files[card.files[0]]
    if card.format == "vit-prisma":
        weights = next(p for f, p in files.items() if f != "config.json")
        if weights.parent != files["config.json"].parent:
            raise PrismaError(f"{card.name}: config.json and {weights.name} must share a folder")
        return from_vit_prisma_folder(weights.parent, weights.name, device=device)
    if card.format == "sdxl-unbox":
        return from_sdxl_unbox(first.parent, device=device)
    if card.format == "saev":
        return from_saev(first, device=device)
    return from_clip_scope(first, device=device)


def load_sae(
    name: str,
    *,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    scaling_cache: str | Path | None = None,
) -> Dictionary:
    """The published SAE ``name`` (see ``prisma-mm sae list``) as a dictionary in eval mode.

    Files come from ``path`` (a folder in the release's layout) or the Hugging Face cache
    (then the hub, unless ``HF_HUB_OFFLINE=1`` or ``local_files_only``). ``metadata`` names the
    zoo ``model``, the ``hook`` (transcoders: ``[hook, hook_out]``), the ``tokens`` and the
    published ``name``. ``scaling_cache``: an activation cache of the card's model at its hook,
    from which ``dataset-scale`` cards (saev) estimate their input scaling."""
    from prisma_mm.zoo.registry import resolve_device

    card = get_sae_card(name)
    device = resolve_device(device)
    if scaling_cache is not None and card.normalization != "dataset-scale":
        raise PrismaError(
            f"{name} expects normalization {card.normalization!r}: scaling_cache applies to "
            "dataset-scale cards only"
        )
    if scaling_cache is not None and not (Path(scaling_cache) / "manifest.json").is_file():
        raise PrismaError(f"scaling_cache {str(scaling_cache)!r} is not an activation cache")
    files = resolve_files(
        card, path, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only
    )
    d = _load_format(card, files, device)
    if (d.cfg.d_in, d.cfg.n_latents) != (card.d_in, card.n_latents):
        raise PrismaError(
            f"{name}: the checkpoint holds d_in={d.cfg.d_in}, n_latents={d.cfg.n_latents}; the "
            f"card says {card.d_in}, {card.n_latents} (a different release in this folder?)"
        )
    recorded_out = d.metadata.get("hook_out")
    if card.is_transcoder and recorded_out not in (None, card.hook_out):
        raise PrismaError(
            f"{name}: the checkpoint writes {recorded_out!r}, the card {card.hook_out!r}"
        )
    d.metadata.update(
        {
            "published": name,
            "model": card.model,
            "hook": [card.hook, card.hook_out] if card.is_transcoder else card.hook,
            "tokens": card.tokens,
            "source": {"repo": card.repo, "files": {f: str(p) for f, p in files.items()}},
        }
    )
    if card.is_transcoder:
        d.metadata["hook_out"] = card.hook_out
    if card.img_size is not None:
        d.metadata["img_size"] = card.img_size
    if scaling_cache is not None:
        apply_dataset_scaling(d, scaling_cache, card.hook, card.tokens)
    return d


def _published_spec(text: str | Path) -> tuple[str, str | None] | None:
    """``(name, folder)`` when ``text`` is a carded SAE's name, or ``NAME@FOLDER`` (its files in
    a local folder, e.g. a clone of a GitHub release), and not an existing path; else None."""
    if Path(text).exists():
        return None
    cards = _cards()
    if str(text) in cards:
        return str(text), None
    name, at, folder = str(text).partition("@")
    return (name, folder) if at and folder and name in cards else None


def is_published(name: str | Path) -> bool:
    """Whether ``name`` is a carded SAE (or ``NAME@FOLDER``), and not an existing path."""
    return _published_spec(name) is not None


def resolve_dictionary(
    path_or_name: str | Path, device: str | torch.device = "cpu", **load_kwargs: Any
) -> Dictionary:
    """The dictionary every stage takes: a saved dictionary directory (``cfg.json`` +
    weights), or a published SAE's name (:func:`load_sae`, with ``load_kwargs``), whose
    metadata then names its ``model``, ``hook``, ``tokens`` and ``img_size``; ``NAME@FOLDER``
    reads the SAE's files from a local folder in the release's layout (``path=``), which is how
    the command line loads a GitHub-only release. An existing path always wins over a name;
    anything else fails in one line (with the closest names)."""
    from prisma_mm.sae import load

    folder = Path(path_or_name).expanduser()
    spec = _published_spec(path_or_name)
    if spec is not None:
        local = {"path": spec[1]} if spec[1] else {}
        return load_sae(spec[0], device=device, **{**local, **load_kwargs})
    if not folder.exists():
        name = str(path_or_name).partition("@")[0]
        close = difflib.get_close_matches(name, list(_cards()), n=3, cutoff=0.6)
        guess = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PrismaError(
            f"{str(path_or_name)!r} is not a saved dictionary: it does not exist: check the path "
            f"(or give a published SAE's name, see `prisma-mm sae list`{guess})"
        )
    if not (folder / "cfg.json").is_file():
        raise PrismaError(
            f"{str(path_or_name)!r} is not a saved dictionary (no cfg.json): pass the directory "
            "written by training or Dictionary.save, or a published SAE's name"
        )
    return load(folder, device=device)


def output_home(path_or_name: str | Path) -> Path:
    """The folder a stage writes its default outputs into (``eval.json``, ``index/``,
    ``meta_sae/`` ...): the saved dictionary's own folder, or for a published SAE's name
    ``./sae-<name>`` under the current folder (characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_``; ``NAME@FOLDER``: the name's), which never shadows the name."""
    spec = _published_spec(path_or_name)
    if spec is None:
        return Path(path_or_name)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", spec[0]).strip("._") or "published"
    return Path(f"sae-{safe}")


def dictionary_label(path_or_name: str | Path) -> str:
    """How reports name a dictionary: its resolved path, or the published SAE's name."""
    return str(path_or_name) if is_published(path_or_name) else str(Path(path_or_name).resolve())


def check_cache_size(dictionary: Any, manifest: dict[str, Any], cache: str | Path) -> None:
    """A published SAE trained at ``metadata["img_size"]`` refuses a cache whose model ran at
    another input size (its tokens would not be the ones the SAE was trained on)."""
    img_size = (getattr(dictionary, "metadata", None) or {}).get("img_size")
    ran = ((manifest.get("layout") or {}).get("input_size")) or None
    if img_size is None or ran is None or list(ran)[-2:] == [img_size, img_size]:
        return
    raise PrismaError(
        f"{dictionary.metadata.get('published', 'the dictionary')} was trained at {img_size} px "
        f"but cache {str(cache)!r} ran its model at {'x'.join(str(v) for v in ran)}: write the "
        f"cache with `prisma-mm cache ... --img-size {img_size}`"
    )


def card_activation_shape(card: SAECard | str) -> tuple[int, int]:
    """``(tokens, d)`` the card's model gives at the card's hook (and output hook), built on the
    meta device (no weights): tokens as trained (``all``, ``patches``, ``cls``)."""
    from prisma_mm.zoo.registry import build_on_meta

    card = get_sae_card(card) if isinstance(card, str) else card
    model = build_on_meta(card.model, img_size=card.img_size)
    hooks = [card.hook] + ([card.hook_out] if card.hook_out else [])
    if hasattr(model, "describe_hooks"):  # a diffusion pipeline: grids known without a run
        _, shapes = model.describe_hooks(hooks)
        return int(shapes[card.hook][0]), int(shapes[card.hook][1])
    size = model.layout.input_size
    x = torch.empty(1, 3, *size, device="meta")
    _, cache = model.run_with_cache(x, names_filter=hooks, stop_at_layer="auto")
    widths = {tuple(cache[h].shape[2:]) for h in hooks}
    if len(widths) != 1:
        raise PrismaError(f"{card.name}: hooks {hooks} have different widths {sorted(widths)}")
    tokens = int(cache[card.hook].shape[1])
    layout = model.layout
    if card.tokens == "patches":
        tokens = layout.n_patches
    elif card.tokens == "cls":
        tokens = min(tokens, 1)
    return tokens, int(cache[card.hook].shape[-1])


def markdown_table() -> str:
    """The cards as the Markdown table of docs/published_saes.md (one row per card)."""
    rows = [
        "| name | model | hook | tokens | latents | k | normalisation | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in list_saes():
        c = get_sae_card(name)
        hook = f"`{c.hook}` -> `{c.hook_out}`" if c.hook_out else f"`{c.hook}`"
        if c.on_hub:
            source = f"[{c.repo}](https://huggingface.co/{c.repo})"
        else:
            github = c.repo.removeprefix("github:")
            source = f"[{github}](https://github.com/{github}/tree/main/{c.subfolder})"
        rows.append(
            f"| `{c.name}` | `{c.model}` | {hook} | {c.tokens} | {c.n_latents} | "
            f"{c.k if c.k is not None else '-'} | {c.normalization} | {source} |"
        )
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------
# CLI: prisma-mm sae list | show
# --------------------------------------------------------------------------------------------


def _sae_list(args: argparse.Namespace) -> int:
    names = list_saes(args.family)
    if args.json:
        print(json.dumps([get_sae_card(n).to_dict() for n in names], indent=2))
        return 0
    cards = [get_sae_card(n) for n in names]
    hooks = [f"{c.hook} -> {c.hook_out.split('.')[-1]}" if c.hook_out else c.hook for c in cards]
    width, wm, wh = (max(len(x) for x in col) for col in (names, [c.model for c in cards], hooks))
    print(f"{'name':<{width}}  {'model':<{wm}}  {'hook':<{wh}}  {'tokens':<7}  latents  source")
    for c, hook in zip(cards, hooks):
        print(f"{c.name:<{width}}  {c.model:<{wm}}  {hook:<{wh}}  {c.tokens:<7}  "
              f"{c.n_latents:>7}  {c.repo}")  # fmt: skip
    print(f"{len(cards)} published SAEs")
    return 0


def _sae_show(args: argparse.Namespace) -> int:
    card = get_sae_card(args.name)
    info = card.to_dict()
    tokens, d = card_activation_shape(card)
    info["activations"] = {"tokens": tokens, "d": d}
    try:  # where load_sae would read it from without the network
        found = resolve_files(card, local_files_only=True) if card.on_hub else None
    except PrismaError:
        found = None
    info["in_hf_cache"] = {f: str(p) for f, p in found.items()} if found else None
    print(json.dumps(info, indent=2))
    return 0


def add_sae_parser(subparsers) -> None:
    """``prisma-mm sae list [--family F] [--json]`` and ``prisma-mm sae show NAME``."""
    sae = subparsers.add_parser("sae", help="list and inspect published SAEs (load by name)")
    sub = sae.add_subparsers(dest="sae_command", required=True)
    listing = sub.add_parser("list", help="list the published SAE cards")
    listing.add_argument("--family", default=None, help="only this release family (card file)")
    listing.add_argument("--json", action="store_true", help="print the cards as JSON")
    listing.set_defaults(handler=_sae_list)
    show = sub.add_parser("show", help="one card, with the activations its model gives")
    show.add_argument("name")
    show.set_defaults(handler=_sae_show)


__all__ += [
    "add_sae_parser",
    "check_cache_size",
    "dictionary_label",
    "is_published",
    "markdown_table",
    "output_home",
    "resolve_dictionary",
    "saes_dir",
]
