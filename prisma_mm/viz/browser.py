"""The feature browser: a static directory that opens from ``file://`` with no server and no
network (``prisma-mm browse DICT --index DIR --out DIR``).

Layout of the directory written by :func:`build_browser`::

    index.html                  every latent: sortable, filterable table; jump to an id
    latent.html                 one page for every latent: latent.html?id=123
    assets/browser.js, .css     the only code; shipped in the package (prisma_mm/viz/static)
    data/meta.js                PRISMA.meta({...}): sizes, provenance, label names, colormap
    data/table/00000.js         PRISMA.table(0, {...}): index-table columns of 1,000 latents
    data/latents/000/000123.js  PRISMA.latent(123, {...}): everything latent 123's page shows
    thumbs/000/000123/t00.png   top-sample thumbnails with the heatmap drawn over them
    thumbs/000/000123/b3_0.png  interval samples (the index's bin 3, bins lowest first)
    prisma-browser.json         what built it (marks the folder as a browser for rebuilds)

Browsers refuse fetch/XHR of local files, so every data file is a script that calls back
into ``PRISMA``; a page loads only the files it shows (the index page paints after its first
table file and streams the rest), so 100k latents open as fast as 100. Text from data
(labels, sample keys, card names) reaches the page only through ``textContent`` in JS, and
through :func:`html.escape` in the HTML written here.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from prisma_mm.errors import PrismaError

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from prisma_mm.hooks import TokenLayout
    from prisma_mm.viz.index import FeatureIndex

__all__ = [
    "CLASS_NAMES",
    "BrowserExtras",
    "SampleSource",
    "add_browse_parser",
    "build_browser",
    "latent_data_path",
    "read_ground_truth",
    "read_meta_sae",
    "read_novel_labels",
    "read_stitching",
    "read_temporal",
    "render_thumbnail",
    "run_browse",
    "table_data_path",
    "thumb_path",
]

STATIC = Path(__file__).with_name("static")
ASSETS = ("browser.js", "browser.css")
MARKER = "prisma-browser.json"
SHARD_SIZE = 1000
CLASS_NAMES = ("novel", "reconstruction", "inactive")
CLIP_GIFS = 3  # top clips of a video latent also drawn as an animated GIF
MAX_META_MEMBERS = 16  # other members listed per meta-latent on a latent page
_CHUNK_BYTES = 256 << 20  # token values held at once while drawing a chunk of latents


# ----- where things go -----------------------------------------------------------------------
def latent_data_path(latent: int) -> str:
    """Relative path of latent ``latent``'s data script (1,000 per folder)."""
    return f"data/latents/{latent // 1000:03d}/{latent:06d}.js"


def table_data_path(shard: int) -> str:
    """Relative path of index-table shard ``shard`` (latents ``shard*1000 ..``)."""
    return f"data/table/{shard:05d}.js"


def thumb_path(latent: int, name: str) -> str:
    """Relative path of one thumbnail of ``latent`` (``name``: ``t03``, ``b1_0``)."""
    return f"thumbs/{latent // 1000:03d}/{latent:06d}/{name}.png"


def _num(value: float, digits: int = 5) -> float | None:
    """A float for JSON, rounded to ``digits`` significant digits; None for NaN / inf."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _round_sig(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, vectorised (float64; NaN kept):
    each result is the double nearest its decimal form, so JSON prints it short."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        power = digits - 1 - np.floor(np.log10(np.abs(values)))
    power = np.where(np.isfinite(power), power, 0).astype(np.int64)
    up = np.round(values * 10.0 ** np.maximum(power, 0)) / 10.0 ** np.maximum(power, 0)
    down = np.round(values / 10.0 ** np.maximum(-power, 0)) * 10.0 ** np.maximum(-power, 0)
    return np.where(power >= 0, up, down)


def _script(call: str, key: int | None, data: Any) -> str:
    """``PRISMA.call(key, data);`` with data as JSON that cannot end a script or a string."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    args = text if key is None else f"{key},{text}"
    return f"PRISMA.{call}({args});\n"


# ----- optional inputs: stitching, meta-SAE, ground truth ------------------------------------
@dataclass
class StitchingView:
    """Per latent of the browsed dictionary (the stitching's larger SAE): class index into
    :data:`CLASS_NAMES`, best match in the other SAE, its decoder cosine and ``ΔMSE``; and,
    when known (:func:`read_novel_labels`), the ground-truth label each novel latent detects
    (``novel_labels``, None where it detects none) and whether the smaller SAE had no latent
    for that label (``novel_new``)."""

    classes: np.ndarray
    best_match: np.ndarray
    max_cosine: np.ndarray
    delta_mse: np.ndarray
    other: str
    source: dict[str, Any]
    novel_labels: list[str | None] | None = None
    novel_new: list[bool | None] | None = None


@dataclass
class MetaView:
    """``decomposition[i]``: ``[(meta-latent, weight)]`` of latent ``i``; ``members[m]``:
    ``[(latent, weight)]`` of meta-latent ``m``, largest weight first."""

    decomposition: list[list[tuple[int, float]]]
    members: list[list[tuple[int, float]]]
    source: dict[str, Any]


@dataclass
class GroundTruthView:
    """``best[i]``: ``[(value index, auroc, level)]`` of the factor values latent ``i`` is the
    best detector of (best AUROC first); ``value_names`` as ``factor=value``."""

    value_names: list[str]
    best: list[list[tuple[int, float, str]]]
    source: dict[str, Any]


@dataclass
class BrowserExtras:
    """The optional results a browser shows beside the index."""

    stitching: StitchingView | None = None
    meta_sae: MetaView | None = None
    ground_truth: GroundTruthView | None = None
    temporal: TemporalView | None = None


@dataclass
class TemporalView:
    """Per latent of a video dictionary: its temporal score and the share of its activation
    gone with one frame repeated (``frozen``) and with the frames shuffled (``order``), as
    :class:`prisma_mm.analysis.motion.TemporalScores` defines them (NaN: never fired)."""

    score: np.ndarray
    frozen: np.ndarray
    order: np.ndarray
    source: dict[str, Any]


def _read_json(path: Path, what: str, hint: str) -> Any:
    if not path.is_file():
        raise PrismaError(f"{what} {str(path)!r} not found: {hint}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrismaError(f"{what} {str(path)!r} is not readable JSON ({error}): {hint}") from None


def read_stitching(path: str | Path, n_latents: int) -> StitchingView:
    """Read ``stitch.json`` (``prisma-mm stitch SMALL LARGE``) for a dictionary of
    ``n_latents`` latents, which must be its LARGE SAE (the one whose latents it classifies).

    A latent is *inactive* when it never fired on the stitching's sample (``active`` false),
    otherwise *novel* or *reconstruction* by the split the stitching used (``split_by``).
    """
    path = Path(path)
    hint = "pass the stitch.json written by `prisma-mm stitch`"
    data = _read_json(path, "stitching result", hint)
    latents = (data.get("classes") or {}).get("latents") if isinstance(data, dict) else None
    if not isinstance(latents, dict):
        raise PrismaError(
            f"stitching result {str(path)!r} has no per-latent classes (classes.latents): {hint}"
        )
    split = data.get("split_by", "test")
    novel_key = "novel_proxy" if split == "proxy" else "novel_test"
    needed = [novel_key, "best_match", "max_cosine", "delta_mse"]
    missing = [k for k in needed if k not in latents]
    if missing:
        raise PrismaError(f"stitching result {str(path)!r} lacks classes.latents.{missing[0]}")
    novel = np.asarray(latents[novel_key], dtype=bool)
    if novel.shape != (n_latents,):
        raise PrismaError(
            f"stitching result {str(path)!r} classifies {novel.size} latents but the dictionary "
            f"has {n_latents}: browse the stitching's LARGE SAE ({data.get('large', '?')})"
        )
    classes = np.where(novel, 0, 1).astype(np.int8)
    if "active" in latents:  # latents that never fired on the stitching's sample
        classes[~np.asarray(latents["active"], dtype=bool)] = 2
    as_float = lambda key: np.asarray(  # noqa: E731
        [np.nan if v is None else v for v in latents[key]], dtype=np.float64
    )
    small = data.get("small")
    return StitchingView(
        classes=classes,
        best_match=np.asarray(latents["best_match"], dtype=np.int64),
        max_cosine=as_float("max_cosine"),
        delta_mse=as_float("delta_mse"),
        other=Path(small).name if small else "the smaller SAE",
        source={
            "path": str(path.resolve()),
            "small": small,
            "large": data.get("large"),
            "split_by": split,
            "threshold": (data.get("classes") or {}).get("threshold"),
        },
    )


def read_novel_labels(path: str | Path, large: str, n_latents: int) -> dict[str, list[Any]]:
    """The ground-truth labels of the novel latents of ``large`` from a family report
    (``family_report.json`` of ``prisma-mm family``: its pair whose larger member is
    ``large``), as the ``novel_labels`` / ``novel_new`` fields of a :class:`StitchingView`."""
    path = Path(path)
    hint = "pass the family_report.json written by `prisma-mm family` (with ground truth)"
    data = _read_json(path, "family report", hint)
    pairs = data.get("pairs") if isinstance(data, dict) else None
    pair = next((p for p in pairs or [] if isinstance(p, dict) and p.get("large") == large), None)
    rows = ((pair or {}).get("novel_ground_truth") or {}).get("latents")
    if not isinstance(rows, list):
        raise PrismaError(
            f"family report {str(path)!r} has no novel-latent ground truth for {large!r}: {hint}"
        )
    labels: list[str | None] = [None] * n_latents
    new: list[bool | None] = [None] * n_latents
    for row in rows:
        latent = int(row["latent"])
        if not 0 <= latent < n_latents:
            raise PrismaError(
                f"family report {str(path)!r} names latent {latent} of {large!r} but the "
                f"dictionary has {n_latents}: pass the report of this dictionary's family"
            )
        if row.get("label") is not None:
            labels[latent] = str(row["label"])
            new[latent] = not row.get("small_has_label")
    return {"novel_labels": labels, "novel_new": new}


def read_meta_sae(path: str | Path, n_latents: int) -> MetaView:
    """Read a meta-SAE export (``prisma-mm meta-sae DICT``: the folder or its
    ``meta_sae.json``) of a dictionary of ``n_latents`` latents."""
    path = Path(path)
    file = path / "meta_sae.json" if path.is_dir() else path
    hint = "pass the folder written by `prisma-mm meta-sae` (it holds meta_sae.json)"
    data = _read_json(file, "meta-SAE result", hint)
    if not isinstance(data, dict) or data.get("format") != "prisma-mm-meta-sae":
        raise PrismaError(f"{str(file)!r} is not a meta-SAE export (format prisma-mm-meta-sae)")
    rows, metas = data.get("latents") or [], data.get("meta_latents") or []
    if len(rows) != n_latents:
        raise PrismaError(
            f"meta-SAE {str(file)!r} decomposes {len(rows)} latents but the dictionary has "
            f"{n_latents}: pass the meta-SAE of this dictionary"
        )
    decomposition: list[list[tuple[int, float]]] = [[] for _ in range(n_latents)]
    for row in rows:
        decomposition[int(row["latent"])] = [(int(m), float(w)) for m, w in row["meta"]]
    members: list[list[tuple[int, float]]] = [[] for _ in range(len(metas))]
    for meta in metas:
        members[int(meta["meta"])] = [(int(i), float(w)) for i, w in meta["latents"]]
    summary = data.get("meta") or {}
    return MetaView(
        decomposition,
        members,
        {"path": str(file.resolve()), "n_meta": len(metas), "fvu": summary.get("fvu")},
    )


def read_temporal(path: str | Path, n_latents: int) -> TemporalView:
    """Read temporal scores (``TemporalScores.save``: JSON lists ``score``, ``frozen`` and
    ``order`` with one number per latent, null where it never fired)."""
    path = Path(path)
    hint = "pass the JSON written by prisma_mm.analysis.motion.TemporalScores.save"
    data = _read_json(path, "temporal scores", hint)
    columns = {}
    for key in ("score", "frozen", "order"):
        values = data.get(key) if isinstance(data, dict) else None
        if not isinstance(values, list) or len(values) != n_latents:
            raise PrismaError(
                f"temporal scores {str(path)!r} need a list {key!r} of {n_latents} numbers (one "
                f"per latent of this dictionary): {hint}"
            )
        columns[key] = np.array([np.nan if v is None else float(v) for v in values])
    return TemporalView(**columns, source={"path": str(path.resolve())})


def read_ground_truth(path: str | Path, n_latents: int) -> GroundTruthView:
    """Read a ground-truth report (``GroundTruthReport.to_dict()`` as JSON: its ``values``
    rows name the best latent and AUROC of each factor value, per level)."""
    path = Path(path)
    hint = "pass a JSON of prisma_mm.analysis.ground_truth.GroundTruthReport.to_dict()"
    data = _read_json(path, "ground-truth report", hint)
    values = data.get("values") if isinstance(data, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise PrismaError(f"ground-truth report {str(path)!r} has no 'values' rows: {hint}")
    names = [str(v.get("value")) for v in values]
    best: list[list[tuple[int, float, str]]] = [[] for _ in range(n_latents)]
    for v, row in enumerate(values):
        for level in ("patch", "image"):
            latent, auroc = row.get(f"{level}_latent"), row.get(f"{level}_auroc")
            if latent is None or auroc is None or not math.isfinite(float(auroc)):
                continue
            if not 0 <= int(latent) < n_latents:
                raise PrismaError(
                    f"ground-truth report {str(path)!r} names latent {latent} but the "
                    f"dictionary has {n_latents}: pass the report of this dictionary"
                )
            best[int(latent)].append((v, float(auroc), level))
            break  # patch level when scored, else image level
    for entry in best:
        entry.sort(key=lambda t: -t[1])
    return GroundTruthView(names, best, {"path": str(path.resolve())})


# ----- thumbnails ----------------------------------------------------------------------------
class SampleSource(Protocol):
    """Where thumbnails come from: samples' per-token values for some latents (the same
    function of the code that ranked them: :func:`~prisma_mm.viz.index.token_scores`), and
    each sample's image. Samples are positions in ``index.keys``."""

    layout: TokenLayout

    def token_values(self, samples: Sequence[int], latents: Sequence[int]) -> dict[int, Tensor]:
        """``{sample: token_values [T, len(latents)]}``."""
        ...

    def image(self, sample: int) -> Image.Image:
        """The input image of ``sample`` as the model saw it."""
        ...


class CacheSamples:
    """A :class:`SampleSource` over the cache an index was built on: activations re-read
    from its shards and encoded by ``dictionary``, images through the samples' sources
    (``dataset``: the Python Dataset a cache was written from, when its sources are items)."""

    def __init__(
        self,
        index: FeatureIndex,
        dictionary: Any,
        cache_dir: str | Path | None = None,
        dataset: Any = None,
    ):
        from prisma_mm.viz.index import SampleImages

        self.index, self.dictionary, self.cache_dir = index, dictionary, cache_dir
        self.layout = index.layout
        self._images = SampleImages(index, dataset=dataset)

    def token_values(self, samples: Sequence[int], latents: Sequence[int]) -> dict[int, Tensor]:
        from prisma_mm.viz.index import sample_codes

        return sample_codes(self.index, self.dictionary, samples, latents, self.cache_dir)

    def image(self, sample: int) -> Image.Image:
        return self._images(sample)


def _colormap_stops(n: int = 16) -> list[list[int]]:
    """The thumbnails' colormap as ``n`` RGB stops (for the page's colour bar)."""
    from prisma_mm.viz.heatmaps import DEFAULT_CMAP, get_cmap

    cmap = get_cmap(DEFAULT_CMAP)
    return [[int(round(255 * c)) for c in cmap(i / (n - 1))[:3]] for i in range(n)]


def render_thumbnail(
    image: Image.Image,
    token_values: Tensor,
    layout: TokenLayout,
    vmax: float,
    size: int = 128,
) -> Image.Image:
    """``image`` with ``token_values [T]`` drawn over its patches as the latent grids draw
    them (:mod:`prisma_mm.viz.heatmaps`: nearest upsampling, opacity rising with the value,
    aspect kept), normalised by ``vmax`` (the latent's max, so a latent's thumbnails share a
    scale); prefix tokens (CLS, registers) as chips in a column on the right. A clip shows
    the frame where the latent peaks."""
    from matplotlib.colors import Normalize
    from PIL import Image as PILImage

    from prisma_mm.viz.heatmaps import DEFAULT_CMAP, get_cmap, overlay_rgba, token_map

    cmap = get_cmap(DEFAULT_CMAP)
    norm = Normalize(0.0, vmax if vmax > 0 else 1.0)
    frames = list(image) if isinstance(image, list | tuple) else [image]  # a clip: its frames
    ratio = size / max(frames[0].size)
    width = max(1, round(frames[0].width * ratio))
    height = max(1, round(frames[0].height * ratio))
    tmap = token_map(token_values, layout, size=(height, width))
    peak = int(np.nan_to_num(tmap.pixels, nan=0.0).reshape(len(tmap.pixels), -1).max(1).argmax())
    # the first input frame of the peak's tubelet
    base = frames[min(peak * layout.tubelet, len(frames) - 1)].convert("RGB")
    base = np.asarray(base.resize((width, height), PILImage.BILINEAR), dtype=np.float32) / 255
    rgba = overlay_rgba(tmap.pixels[peak], norm, cmap, alpha=0.8)
    alpha = rgba[..., 3:]
    drawn = (base * (1 - alpha) + rgba[..., :3] * alpha) * 255
    picture = PILImage.fromarray(np.round(drawn).astype(np.uint8))
    if layout.n_prefix == 0:
        return picture
    chip = max(8, min(height // layout.n_prefix, height // 6))
    out = PILImage.new("RGB", (width + chip + 4, height), (255, 255, 255))
    out.paste(picture, (0, 0))
    for t, value in enumerate(tmap.prefix.tolist()):
        shade = cmap(float(np.clip(norm(value), 0, 1)))[:3] if value > 0 else (0.92,) * 3
        colour = tuple(int(round(255 * c)) for c in shade)
        out.paste(PILImage.new("RGB", (chip, chip - 1), colour), (width + 4, t * chip))
    return out


# ----- the pages -----------------------------------------------------------------------------
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'self' file:; script-src 'self' file:; style-src 'self' file: 'unsafe-inline'; img-src 'self' file: data:; connect-src 'none'">
<title>{title}</title>
<link rel="stylesheet" href="assets/browser.css">
</head>
<body data-page="{page}">
<header class="top"><a id="brand" href="index.html">{title}</a><nav id="nav"></nav></header>
<main id="main"><p class="muted">loading…</p></main>
<noscript><p>The prisma-mm browser needs JavaScript (it runs offline, from these files only).</p></noscript>
<script src="assets/browser.js"></script>
</body>
</html>
"""


def _page(title: str, page: str) -> str:
    return _PAGE.format(title=html.escape(title), page=page)


@dataclass
class _Tables:
    """The index's tensors as numpy, read once."""

    top_value: np.ndarray
    top_sample: np.ndarray
    top_token: np.ndarray
    interval_edges: np.ndarray
    interval_value: np.ndarray
    interval_sample: np.ndarray
    interval_token: np.ndarray
    freq_token: np.ndarray
    freq_input: np.ndarray
    hist_edges: np.ndarray
    hist_counts: np.ndarray
    mean_active: np.ndarray
    max_value: np.ndarray
    neighbours: np.ndarray
    neighbour_cos: np.ndarray
    label_mix: np.ndarray | None
    top_label: np.ndarray = field(init=False)
    top_label_frac: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # rounded once, vectorised: the pages show 3 digits, the data keep 5 (4 for cosines)
        for name in ("top_value", "interval_value", "interval_edges", "hist_edges"):
            setattr(self, name, _round_sig(getattr(self, name), 5))
        self.neighbour_cos = _round_sig(self.neighbour_cos, 4)
        if self.label_mix is None:
            self.top_label = np.full(self.freq_token.shape[0], -1)
            self.top_label_frac = np.full(self.freq_token.shape[0], np.nan)
            return
        total = self.label_mix.sum(1)
        self.top_label = np.where(total > 0, self.label_mix.argmax(1), -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.top_label_frac = self.label_mix.max(1) / total


def _tables(index: FeatureIndex) -> _Tables:
    names = [f for f in _Tables.__dataclass_fields__ if f not in ("top_label", "top_label_frac")]
    arrays = {}
    for name in names:
        value = getattr(index, name)
        arrays[name] = None if value is None else value.detach().cpu().numpy()
    return _Tables(**arrays)


def _samples(
    index: FeatureIndex,
    values: np.ndarray,
    samples: np.ndarray,
    tokens: np.ndarray,
    images: Sequence[str | None],
) -> list[dict[str, Any]]:
    out = []
    table = index.sample_generated

    def generated_of(sample: int) -> dict[str, Any] | None:
        return table[sample] if sample < len(table) else None

    rows = zip(values.tolist(), samples.tolist(), tokens.tolist())  # plain floats: fast
    for j, (value, sample, token) in enumerate(rows):
        if sample < 0:
            continue
        label = index.sample_labels[sample] if index.sample_labels else None
        entry = {
            "v": value,
            "key": index.keys[sample],
            "label": label,
            "tok": token,
            "img": images[j] if j < len(images) else None,
        }
        generated = generated_of(sample)
        if generated is not None:  # a prompt cache: the page shows prompt, seed and step
            entry.update({k: generated.get(k) for k in ("prompt", "seed", "step")})
        out.append(entry)
    return out


def _provenance(index: FeatureIndex, extras: BrowserExtras) -> dict[str, Any]:
    meta = index.meta
    cache = dict(meta.get("cache") or {})
    prov: dict[str, Any] = {
        "dictionary": dict(meta.get("dictionary") or {}),
        "cache": cache,
        "index": {
            "path": str(index.path) if index.path else None,
            "score": meta.get("score"),
            "top_n": meta.get("top_n"),
            "n_bins": meta.get("n_bins"),
            "n_inputs": meta.get("n_inputs"),
            "n_tokens": meta.get("n_tokens"),
            "complete": meta.get("complete"),
            "created": meta.get("created"),
        },
    }
    if extras.stitching:
        prov["stitching"] = extras.stitching.source
    if extras.meta_sae:
        prov["meta-SAE"] = extras.meta_sae.source
    if extras.ground_truth:
        prov["ground truth"] = extras.ground_truth.source
    if extras.temporal:
        prov["temporal scores"] = extras.temporal.source
    return prov


def _check_out(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder that is not a browser."""
    if out.exists() and not out.is_dir():
        raise PrismaError(f"--out {str(out)!r} is a file: give a folder for the browser")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise PrismaError(
            f"--out {str(out)!r} is a non-empty folder that is not a prisma-mm browser: "
            "choose a new or empty folder (a previous browser there is rebuilt)"
        )


def build_browser(
    index: FeatureIndex,
    out: str | Path,
    *,
    source: SampleSource | None = None,
    extras: BrowserExtras | None = None,
    top_images: int = 12,
    interval_images: int = 4,
    title: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the browser of ``index`` to the folder ``out`` and return its ``index.html``.

    ``source`` draws thumbnails (the first ``top_images`` top samples and ``interval_images``
    per interval bin of each latent); without it the pages show values and labels only.
    ``extras``: stitching / meta-SAE / ground-truth results to show. The folder is written
    beside ``out`` and moved into place when complete, replacing a previous browser there.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    _check_out(out)
    extras = extras or BrowserExtras()
    n = index.n_latents
    tables = _tables(index)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    (work / "assets").mkdir(parents=True)
    for asset in ASSETS:
        shutil.copyfile(STATIC / asset, work / "assets" / asset)

    dictionary = index.meta.get("dictionary") or {}
    cache = index.meta.get("cache") or {}
    title = title or f"prisma-mm · {dictionary.get('class', 'dictionary')} · {n} latents"
    label_names = list(index.label_names) if index.label_names else None
    gt = extras.ground_truth
    meta_js = {
        "format": "prisma-mm-browser",
        "version": 1,
        "title": title,
        "n_latents": n,
        "shard_size": SHARD_SIZE,
        "n_table_shards": math.ceil(n / SHARD_SIZE),
        "columns": {
            "label": label_names is not None,
            "stitching": extras.stitching is not None,
            "meta": extras.meta_sae is not None,
            "ground_truth": gt is not None,
            "temporal": extras.temporal is not None,
        },
        "label_names": label_names,
        "gt_names": gt.value_names if gt else None,
        "layout": index.meta.get("layout"),
        "colormap": _colormap_stops(),  # the thumbnails' colormap, for the colour bar
        "stitching_other": extras.stitching.other if extras.stitching else None,
        "provenance": _provenance(index, extras),
        "stats": {"n_dead": int((tables.freq_token <= 0).sum())},
    }
    (work / "data").mkdir()
    (work / "data" / "meta.js").write_text(_script("meta", None, meta_js))
    _write_tables(work, tables, extras, n)

    # which latents get thumbnails is known up front, so neighbours link theirs by name
    drawn = np.zeros(n, dtype=bool)
    if source is not None and top_images > 0:
        drawn = (tables.max_value > 0) & (tables.top_sample[:, 0] >= 0)
    size = _chunk_size(index, top_images, interval_images) if drawn.any() else SHARD_SIZE
    bar = tqdm(total=n, desc="browser pages", unit="latent", disable=not progress)
    for start in range(0, n, size):
        chunk = range(start, min(n, start + size))
        thumbs = _draw_chunk(work, source, tables, [i for i in chunk if drawn[i]],
                             top_images, interval_images)  # fmt: skip
        for latent in chunk:
            images_top, images_bins = thumbs.get(latent, ([], []))
            data = _latent_data(index, tables, extras, latent, images_top, images_bins)
            for nb in data["neighbours"]:
                nb["img"] = thumb_path(nb["id"], "t00") if drawn[nb["id"]] else None
            path = work / latent_data_path(latent)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_script("latent", latent, data))
        bar.update(len(chunk))
    bar.close()

    (work / "index.html").write_text(_page(title, "index"))
    (work / "latent.html").write_text(_page(title, "latent"))
    marker = {
        "format": "prisma-mm-browser",
        "n_latents": n,
        "index": str(index.path) if index.path else None,
        "dictionary_sha256": dictionary.get("sha256"),
        "model": cache.get("model"),
        "thumbnails": source is not None,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (work / MARKER).write_text(json.dumps(marker, indent=1))
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out / "index.html"


def _write_tables(work: Path, t: _Tables, extras: BrowserExtras, n: int) -> None:
    (work / "data" / "table").mkdir(parents=True)
    for shard in range(math.ceil(n / SHARD_SIZE)):
        rows = range(shard * SHARD_SIZE, min(n, (shard + 1) * SHARD_SIZE))
        data: dict[str, Any] = {
            "start": rows.start,
            "count": len(rows),
            "density": [_num(t.freq_token[i], 4) for i in rows],
            "freq_input": [_num(t.freq_input[i], 4) for i in rows],
            "max": [_num(t.max_value[i], 4) for i in rows],
            "mean": [_num(t.mean_active[i], 4) for i in rows],
        }
        if t.label_mix is not None:
            data["label"] = [int(t.top_label[i]) for i in rows]
            data["label_frac"] = [_num(t.top_label_frac[i], 3) for i in rows]
        if extras.stitching:
            data["stitch"] = [int(extras.stitching.classes[i]) for i in rows]
            if extras.stitching.novel_labels is not None:
                data["novel_label"] = [extras.stitching.novel_labels[i] for i in rows]
        if extras.meta_sae:
            data["meta"] = [[m for m, _ in extras.meta_sae.decomposition[i]] for i in rows]
        if extras.ground_truth:
            best = extras.ground_truth.best
            data["gt"] = [best[i][0][0] if best[i] else -1 for i in rows]
            data["gt_auroc"] = [_num(best[i][0][1], 3) if best[i] else None for i in rows]
        if extras.temporal:
            data["temporal"] = [_num(extras.temporal.score[i], 3) for i in rows]
        (work / table_data_path(shard)).write_text(_script("table", shard, data))


def _chunk_size(index: FeatureIndex, top_images: int, interval_images: int) -> int:
    """Latents drawn from one read of their samples: as many as keep the token values
    (``samples x tokens x latents`` floats, both counts growing with the chunk) in budget, so
    that a sample shared by many latents is re-read and re-encoded as few times as possible."""
    per_latent = top_images + interval_images * index.interval_sample.shape[1]
    floats = 4 * max(per_latent, 1) * index.layout.n_tokens
    return int(np.clip(math.sqrt(_CHUNK_BYTES / floats), 8, 1024))


def _draw_chunk(
    work: Path,
    source: SampleSource | None,
    t: _Tables,
    latents: list[int],
    top_images: int,
    interval_images: int,
) -> dict[int, tuple[list[str | None], list[list[str | None]]]]:
    """Draw the thumbnails of ``latents`` (the samples' codes read in one pass): per latent
    the relative paths of its top slots and of each interval bin's slots (None: not drawn)."""
    if source is None or not latents:
        return {}
    top = t.top_sample[latents, :top_images]  # [c, top_images]
    bins = t.interval_sample[latents, :, :interval_images]  # [c, B, interval_images]
    wanted = np.unique(np.concatenate([top.ravel(), bins.ravel()]))
    values = source.token_values([int(s) for s in wanted if s >= 0], latents)
    images: dict[int, Image.Image] = {}

    def draw(latent: int, column: int, samples: np.ndarray, name: Callable[[int], str]):
        paths: list[str | None] = [None] * len(samples)
        for j, sample in enumerate(samples.tolist()):
            if sample < 0:
                continue
            if sample not in images:
                images[sample] = source.image(sample)
            rel = thumb_path(latent, name(j))
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            token_values = values[sample][:, column]
            thumb = render_thumbnail(
                images[sample], token_values, source.layout, t.max_value[latent]
            )
            thumb.save(work / rel)  # optimize=True is 10x slower for 7% smaller files
            if isinstance(images[sample], list) and name(j).startswith("t") and j < CLIP_GIFS:
                from prisma_mm.viz.video import heatmap_gif  # a clip: its heatmap animated too

                heatmap_gif(images[sample], token_values, source.layout,
                            work / (rel[: -len(".png")] + ".gif"), vmax=t.max_value[latent])  # fmt: skip
            paths[j] = rel
        return paths

    out = {}
    for column, latent in enumerate(latents):
        out[latent] = (
            draw(latent, column, top[column], lambda j: f"t{j:02d}"),
            [
                draw(latent, column, bins[column, b], lambda j, b=b: f"b{b}_{j}")
                for b in range(bins.shape[1])
            ],
        )
    return out


def _latent_data(
    index: FeatureIndex,
    t: _Tables,
    extras: BrowserExtras,
    i: int,
    images_top: list[str | None],
    images_bins: list[list[str | None]],
) -> dict[str, Any]:
    label_names = index.label_names or []
    data: dict[str, Any] = {
        "id": i,
        "density": _num(t.freq_token[i]),
        "freq_input": _num(t.freq_input[i]),
        "max": _num(t.max_value[i]),
        "mean": _num(t.mean_active[i]),
        "thumbs": bool(images_top),
        "top": _samples(index, t.top_value[i], t.top_sample[i], t.top_token[i], images_top),
    }
    intervals = []
    n_bins = t.interval_value.shape[1]
    # strongest bin first: bins are stored from the lowest edge up
    for b in reversed(range(n_bins)):
        images = images_bins[b] if b < len(images_bins) else []
        samples = _samples(
            index, t.interval_value[i, b], t.interval_sample[i, b], t.interval_token[i, b], images
        )
        if samples:
            lo, hi = t.interval_edges[i, b], t.interval_edges[i, b + 1]
            intervals.append({"lo": float(lo), "hi": float(hi), "samples": samples})
    data["intervals"] = intervals
    counts = t.hist_counts[i]
    data["hist"] = (
        {"edges": t.hist_edges[i].tolist(), "counts": counts.tolist()}
        if counts.sum() > 0
        else {"edges": [], "counts": []}
    )
    data["neighbours"] = [
        {
            "id": j,
            "cos": c,
            "label": label_names[t.top_label[j]] if t.top_label[j] >= 0 else None,
        }
        for j, c in zip(t.neighbours[i].tolist(), t.neighbour_cos[i].tolist())
        if j >= 0
    ]
    if t.label_mix is not None:
        mix = t.label_mix[i]
        order = np.argsort(-mix, kind="stable")
        data["label_mix"] = [[label_names[c], int(mix[c])] for c in order if mix[c] > 0]
    if extras.stitching:
        s = extras.stitching
        data["stitch"] = {
            "cls": int(s.classes[i]),
            "match": int(s.best_match[i]),
            "cos": _num(s.max_cosine[i], 4),
            "delta": _num(s.delta_mse[i], 4),
        }
        if s.novel_labels is not None and s.novel_labels[i] is not None:
            data["stitch"]["label"] = s.novel_labels[i]
            data["stitch"]["new"] = bool(s.novel_new[i]) if s.novel_new else None
    if extras.meta_sae:
        m = extras.meta_sae
        data["meta"] = [
            {
                "m": meta,
                "w": _num(weight, 4),
                "n_members": len(m.members[meta]),
                "members": [[j, _num(w, 3)] for j, w in m.members[meta] if j != i][
                    :MAX_META_MEMBERS
                ],
            }
            for meta, weight in m.decomposition[i]
        ]
    if extras.ground_truth:
        names = extras.ground_truth.value_names
        data["gt"] = [
            {"value": names[v], "auroc": _num(a, 3), "level": level}
            for v, a, level in extras.ground_truth.best[i]
        ]
    if extras.temporal:
        tv = extras.temporal
        data["temporal"] = {k: _num(getattr(tv, k)[i], 3) for k in ("score", "frozen", "order")}
    data["gifs"] = [path[: -len(".png")] + ".gif" for path in images_top[:CLIP_GIFS]
                    if path and index.layout.grid[0] > 1]  # fmt: skip
    return data


# ----- the command ---------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def run_browse(args: argparse.Namespace) -> int:
    """``prisma-mm browse DICT --index DIR --out DIR``: write the browser, print where."""
    from prisma_mm.sae.published import output_home
    from prisma_mm.viz.index import FeatureIndex, _load_dictionary

    dictionary, info = _load_dictionary(args.dictionary)  # a saved folder or a published name
    index_dir = Path(args.index) if args.index else output_home(args.dictionary) / "index"
    out = Path(args.out)
    _check_out(out)
    index = FeatureIndex.load(index_dir)
    n = index.n_latents
    extras = BrowserExtras(
        stitching=read_stitching(args.stitching, n) if args.stitching else None,
        meta_sae=read_meta_sae(args.meta_sae, n) if args.meta_sae else None,
        ground_truth=read_ground_truth(args.ground_truth, n) if args.ground_truth else None,
        temporal=read_temporal(args.temporal, n) if args.temporal else None,
    )
    if dictionary.cfg.n_latents != n:
        raise PrismaError(
            f"the index {str(index_dir)!r} has {n} latents but the dictionary has "
            f"{dictionary.cfg.n_latents}: pass the index built for this dictionary"
        )
    expected = (index.meta.get("dictionary") or {}).get("sha256")
    if expected and info["sha256"] != expected:
        raise PrismaError(
            f"the index {str(index_dir)!r} was built for other weights than "
            f"{args.dictionary!r}: rebuild it with `prisma-mm index`"
        )
    source = None
    if not args.no_images:
        cache_dir = Path(args.cache or (index.meta.get("cache") or {}).get("path") or "")
        if not (cache_dir / "manifest.json").is_file():
            raise PrismaError(
                f"the index's cache {str(cache_dir)!r} is not there (no manifest.json): pass "
                "--cache DIR where it now is, or --no-images for tables only"
            )
        source = CacheSamples(index, dictionary, cache_dir)
    page = build_browser(
        index,
        out,
        source=source,
        extras=extras,
        top_images=args.top_images,
        interval_images=args.interval_images,
        title=args.title,
        progress=not args.quiet,
    )
    print(f"wrote the browser: open {page.resolve().as_uri()}")
    return 0


def add_browse_parser(subparsers: Any) -> None:
    """Add ``browse`` to a ``prisma-mm`` subparsers."""
    parser = subparsers.add_parser(
        "browse",
        help="write the offline feature browser of a dictionary's feature index",
        description="Write a static feature browser (index page, one page per latent, "
        "thumbnails with heatmaps) that opens from file:// with no server and no network.",
    )
    parser.add_argument(
        "dictionary",
        help="saved dictionary directory (cfg.json + weights), or a published SAE's name",
    )
    parser.add_argument(
        "--index",
        default=None,
        help="feature index folder (default DICT/index; for a published SAE ./sae-<NAME>/index)",
    )
    parser.add_argument("--out", required=True, help="folder to write the browser into")
    parser.add_argument("--stitching", default=None, help="stitch.json of `prisma-mm stitch`")
    parser.add_argument("--meta-sae", default=None, help="folder of `prisma-mm meta-sae`")
    parser.add_argument(
        "--ground-truth", default=None, help="ground-truth report JSON (GroundTruthReport)"
    )
    parser.add_argument(
        "--temporal",
        default=None,
        help="temporal scores JSON of a video dictionary (TemporalScores)",
    )
    parser.add_argument(
        "--top-images", type=_positive_int, default=12, help="thumbnails per latent (top)"
    )
    parser.add_argument(
        "--interval-images", type=_positive_int, default=4, help="thumbnails per interval bin"
    )
    parser.add_argument(
        "--cache", default=None, help="the indexed cache, if moved (default: where the index says)"
    )
    parser.add_argument("--no-images", action="store_true", help="tables only, no thumbnails")
    parser.add_argument("--title", default=None, help="the pages' title")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_browse)
