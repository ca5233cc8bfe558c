"""The feature browser: what it writes (data scripts that hold the index's numbers, sharded;
thumbnails that light the right patch; nothing remote), and, in a real headless Chromium, what
its pages show: index -> latent -> neighbour -> back, escaping of hostile labels, and that every
request stays on file://. Screenshots land under pytest's tmp dir (and $PRISMA_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prisma_mm.errors import PrismaError
from prisma_mm.hooks import TokenLayout
from prisma_mm.viz.browser import (
    BrowserExtras,
    build_browser,
    latent_data_path,
    read_ground_truth,
    read_meta_sae,
    read_stitching,
    render_thumbnail,
    table_data_path,
)
from prisma_mm.viz.heatmaps import DEFAULT_CMAP, get_cmap
from prisma_mm.viz.index import FeatureIndex

HOSTILE_LABEL = "<script>alert(1)</script>"
HOSTILE_KEY = "<img src=x onerror=alert(2)>.png"
LAYOUT = TokenLayout(n_prefix=1, grid=(1, 4, 4), patch_size=(8, 8), input_size=(32, 32))
N_LATENTS, TOP_N, N_BINS, PER_BIN, N_HIST, N_NEIGHBOURS = 30, 6, 3, 2, 8, 4
DEAD = 7  # a latent that never fires
HOSTILE = 5  # the latent whose top samples carry the hostile label and key


def _data(path: Path) -> dict:
    """The JSON a data script hands to its PRISMA callback."""
    text = path.read_text()
    body = re.fullmatch(r"PRISMA\.\w+\((?:\d+,)?(.*)\);\n", text, re.S)
    assert body, text[:200]
    return json.loads(body.group(1))


def synthetic_index(n_latents: int = N_LATENTS, seed: int = 0) -> FeatureIndex:
    """A FeatureIndex with known, self-consistent tables; latent ``DEAD`` never fires."""
    rng = np.random.default_rng(seed)
    n_samples = 40
    keys = [f"img_{s:03d}.png" for s in range(n_samples)]
    keys[3] = HOSTILE_KEY
    names = ["cat", "dog", HOSTILE_LABEL]
    labels = [names[s % 2] for s in range(n_samples)]
    hostile_samples = [3, 13, 23, 33]
    for s in hostile_samples:
        labels[s] = HOSTILE_LABEL
    top_value = np.sort(rng.uniform(0.5, 9.0, (n_latents, TOP_N)), axis=1)[:, ::-1].copy()
    top_sample = np.stack([rng.permutation(n_samples)[:TOP_N] for _ in range(n_latents)])
    others = [s for s in range(n_samples) if s not in hostile_samples]
    top_sample[HOSTILE] = hostile_samples + others[: TOP_N - len(hostile_samples)]
    top_token = rng.integers(0, LAYOUT.n_tokens, (n_latents, TOP_N))
    edges = np.stack([np.array([0.0, 0.25, 0.5, 1.0]) * top_value[i, 0] for i in range(n_latents)])
    interval_value = np.stack(
        [
            np.stack(
                [
                    np.linspace(edges[i, b + 1], edges[i, b], PER_BIN + 2)[1:-1]
                    for b in range(N_BINS)
                ]
            )
            for i in range(n_latents)
        ]  # fmt: skip
    )
    interval_sample = rng.integers(0, n_samples, (n_latents, N_BINS, PER_BIN))
    interval_token = rng.integers(0, LAYOUT.n_tokens, (n_latents, N_BINS, PER_BIN))
    freq_token = rng.uniform(0.001, 0.3, n_latents)
    freq_input = np.minimum(1.0, freq_token * 5)
    hist_counts = rng.integers(0, 50, (n_latents, N_HIST))
    hist_edges = np.stack([np.linspace(0, top_value[i, 0], N_HIST + 1) for i in range(n_latents)])
    mean_active = top_value[:, -1] / 2
    max_value = top_value[:, 0].copy()
    neighbours = np.stack(
        [
            rng.choice([j for j in range(n_latents) if j != i], N_NEIGHBOURS, replace=False)
            for i in range(n_latents)
        ]  # fmt: skip
    )
    neighbour_cos = np.sort(rng.uniform(0.1, 0.9, (n_latents, N_NEIGHBOURS)), axis=1)[:, ::-1]
    label_mix = np.zeros((n_latents, len(names)), dtype=np.int64)
    for i in range(n_latents):
        for s in top_sample[i]:
            label_mix[i, names.index(labels[s])] += 1
    # the dead latent: nothing fired
    top_value[DEAD], top_sample[DEAD], interval_sample[DEAD] = np.nan, -1, -1
    interval_value[DEAD] = np.nan
    freq_token[DEAD] = freq_input[DEAD] = mean_active[DEAD] = max_value[DEAD] = 0.0
    hist_counts[DEAD], label_mix[DEAD] = 0, 0
    f32 = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    f64 = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    i64 = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.int64)  # noqa: E731
    meta = {
        "dictionary": {"path": "/sae/topk", "sha256": "ab" * 32, "class": "TopKSAE",
                       "n_latents": n_latents, "d_in": 32},
        "cache": {"path": "/cache", "hook": "blocks.0.hook_resid_post",
                  "model": "tiny-<b>vit</b>", "manifest_sha256": "cd" * 32},
        "score": "max", "top_n": TOP_N, "n_bins": N_BINS, "n_inputs": n_samples,
        "n_tokens": n_samples * LAYOUT.n_tokens, "layout": LAYOUT.to_dict(), "complete": True,
        "created": "2026-12-01T00:00:00Z",
    }  # fmt: skip
    return FeatureIndex(
        path=None,
        meta=meta,
        keys=keys,
        sample_labels=labels,
        top_value=f32(top_value),
        top_sample=i64(top_sample),
        top_token=i64(top_token),
        interval_edges=f32(edges),
        interval_value=f32(interval_value),
        interval_sample=i64(interval_sample),
        interval_token=i64(interval_token),
        freq_token=f64(freq_token),
        freq_input=f64(freq_input),
        hist_edges=f32(hist_edges),
        hist_counts=i64(hist_counts),
        mean_active=f64(mean_active),
        max_value=f32(max_value),
        neighbours=i64(neighbours),
        neighbour_cos=f32(neighbour_cos),
        label_names=names,
        label_mix=i64(label_mix),
    )


class FakeSamples:
    """A SampleSource: sample ``s`` is a flat-coloured image; latent ``l`` fires on patch
    ``l % 16`` of every sample with the value 1 + l (and on the CLS token for even ``l``)."""

    layout = LAYOUT

    def token_values(self, samples, latents):
        out = {}
        for s in samples:
            values = torch.zeros(LAYOUT.n_tokens, len(latents))
            for c, latent in enumerate(latents):
                values[1 + latent % 16, c] = 1.0 + latent
                if latent % 2 == 0:
                    values[0, c] = 0.5 * (1.0 + latent)
            out[s] = values
        return out

    def image(self, sample):
        shade = 60 + (sample * 37) % 180
        return Image.new("RGB", (32, 32), (shade, 200 - shade // 2, 120))


def _extras_files(root: Path, index: FeatureIndex) -> dict[str, Path]:
    """stitch.json, meta_sae/meta_sae.json and a ground-truth report, as their writers do."""
    n = index.n_latents
    active = [i != DEAD for i in range(n)]
    stitch = {
        "small": "/saes/topk-small",
        "large": "/saes/topk",
        "split_by": "test",
        "classes": {
            "threshold": 0.7,
            "latents": {
                "max_cosine": [0.5 + 0.01 * i for i in range(n)],
                "best_match": [i // 2 for i in range(n)],
                "delta_mse": [(-1) ** i * 1e-3 for i in range(n)],
                "active": active,
                "novel_test": [a and i % 2 == 1 for i, a in enumerate(active)],
                "novel_proxy": [i % 3 == 0 for i in range(n)],
            },
        },
    }
    (root / "stitch.json").write_text(json.dumps(stitch))
    n_meta = 6
    decomposition = [[[i % n_meta, 0.8], [(i + 1) % n_meta, 0.3]] for i in range(n)]
    members = [
        [[i, w] for i in range(n) for mm, w in decomposition[i] if mm == m] for m in range(n_meta)
    ]
    for m in members:
        m.sort(key=lambda t: -t[1])
    meta_sae = {
        "format": "prisma-mm-meta-sae",
        "source": {},
        "meta": {"n_meta": n_meta, "fvu": 0.25},
        "latents": [{"latent": i, "meta": decomposition[i]} for i in range(n)],
        "meta_latents": [
            {"meta": m, "n_latents": len(members[m]), "latents": members[m]} for m in range(n_meta)
        ],
    }
    (root / "meta_sae").mkdir(exist_ok=True)
    (root / "meta_sae" / "meta_sae.json").write_text(json.dumps(meta_sae))
    ground_truth = {
        "summary": {"score": 0.5},
        "values": [
            {"value": "shape=circle", "patch_latent": 2, "patch_auroc": 0.97},
            {"value": "colour=red", "patch_latent": 4, "patch_auroc": 0.91},
            {"value": "colour=blue", "patch_latent": 2, "patch_auroc": 0.8},
        ],
    }
    (root / "gt.json").write_text(json.dumps(ground_truth))
    return {"stitching": root / "stitch.json", "meta": root / "meta_sae", "gt": root / "gt.json"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    index = synthetic_index()
    files = _extras_files(root, index)
    n = index.n_latents
    extras = BrowserExtras(
        stitching=read_stitching(files["stitching"], n),
        meta_sae=read_meta_sae(files["meta"], n),
        ground_truth=read_ground_truth(files["gt"], n),
    )
    page = build_browser(
        index, root / "site", source=FakeSamples(), extras=extras, top_images=4,
        interval_images=1, progress=False,
    )  # fmt: skip
    return {"root": root, "site": root / "site", "page": page, "index": index}


# ----- what is written -----------------------------------------------------------------------
def test_data_scripts_hold_the_index_numbers(built):
    site, index = built["site"], built["index"]
    meta = _data(site / "data" / "meta.js")
    assert meta["n_latents"] == N_LATENTS and meta["n_table_shards"] == 1
    assert meta["stats"]["n_dead"] == 1
    table = _data(site / table_data_path(0))
    assert table["count"] == N_LATENTS
    np.testing.assert_allclose(table["max"], index.max_value.numpy(), rtol=1e-3)
    np.testing.assert_allclose(table["density"], index.freq_token.numpy(), rtol=1e-3)
    mix = index.label_mix.numpy()
    expected_label = np.where(mix.sum(1) > 0, mix.argmax(1), -1)
    assert table["label"] == expected_label.tolist()
    assert table["stitch"][DEAD] == 2  # never fired on the stitching sample: inactive
    assert table["stitch"][1] == 0 and table["stitch"][2] == 1  # novel, reconstruction
    assert table["meta"][3] == [3, 4]
    assert table["gt"][2] == 0 and table["gt"][4] == 1 and table["gt"][0] == -1

    latent = _data(site / latent_data_path(HOSTILE))
    assert [s["v"] for s in latent["top"]] == pytest.approx(
        index.top_value[HOSTILE].tolist(), rel=1e-4
    )
    assert latent["top"][0]["key"] == HOSTILE_KEY and latent["top"][0]["label"] == HOSTILE_LABEL
    assert [s["img"] is not None for s in latent["top"]] == [True] * 4 + [False] * 2
    assert [nb["id"] for nb in latent["neighbours"]] == index.neighbours[HOSTILE].tolist()
    # interval bins strongest first, each inside its edges
    los = [b["lo"] for b in latent["intervals"]]
    assert los == sorted(los, reverse=True)
    for b in latent["intervals"]:
        assert all(b["lo"] <= s["v"] <= b["hi"] for s in b["samples"])
    assert latent["meta"][0]["m"] == HOSTILE % 6
    assert all(j != HOSTILE for m in latent["meta"] for j, _ in m["members"])
    dead = _data(site / latent_data_path(DEAD))
    assert dead["top"] == [] and dead["thumbs"] is False and dead["stitch"]["cls"] == 2
    gt2 = _data(site / latent_data_path(2))["gt"]
    assert [g["value"] for g in gt2] == ["shape=circle", "colour=blue"]


def test_thumbnails_light_the_firing_patch_and_the_cls_chip():
    values = torch.zeros(LAYOUT.n_tokens)
    values[1 + 1 * 4 + 2] = 3.0  # patch (row 1, col 2)
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    thumb = np.asarray(render_thumbnail(image, values, LAYOUT, vmax=3.0, size=64)).astype(int)
    cell = 64 // 4
    hot = thumb[cell * 1 : cell * 2, cell * 2 : cell * 3]
    cold = thumb[:cell, :cell]
    assert (hot == hot[0, 0]).all() and (cold == cold[0, 0]).all()  # nearest: flat patches
    top = np.array(get_cmap(DEFAULT_CMAP)(1.0)[:3]) * 255  # the colormap at the latent's max
    assert np.abs(hot[0, 0] - (0.8 * top + 0.2 * 128)).max() <= 1  # opacity 0.8 at the max
    assert abs(cold[0, 0] - 128).max() <= 1  # unlit patch: the image unchanged
    assert ((thumb[:, :64] != 128).any(axis=2)).sum() == cell * cell  # only that patch lit
    assert thumb.shape[1] > 64  # the CLS chip column
    chip = thumb[2, 64 + 6]
    values[0] = 3.0
    lit = np.asarray(render_thumbnail(image, values, LAYOUT, vmax=3.0, size=64)).astype(int)
    assert (chip == 235).all()  # an unlit CLS chip is light grey
    assert (lit[:, :64] == thumb[:, :64]).all()  # the CLS value changes no patch
    assert np.abs(lit[2, 64 + 6] - top).max() <= 1  # and colours its chip


def test_table_is_sharded_and_a_rebuild_replaces_the_previous_browser(tmp_path):
    index = synthetic_index(n_latents=2100, seed=1)
    out = tmp_path / "site"
    build_browser(index, out, progress=False)
    assert sorted(p.name for p in (out / "data" / "table").iterdir()) == [
        "00000.js", "00001.js", "00002.js",
    ]  # fmt: skip
    last = _data(out / table_data_path(2))
    assert last["start"] == 2000 and last["count"] == 100
    assert (out / latent_data_path(2099)).is_file() and latent_data_path(2099).startswith(
        "data/latents/002/"
    )
    assert not (out / "thumbs").exists()  # no sample source: no thumbnails
    build_browser(synthetic_index(n_latents=10), out, progress=False)
    assert _data(out / "data" / "meta.js")["n_latents"] == 10
    assert not (out / "data" / "table" / "00002.js").exists()


def test_output_folder_and_inputs_are_checked(tmp_path):
    index = synthetic_index()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(PrismaError, match="not a prisma-mm browser"):
        build_browser(index, tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    files = _extras_files(tmp_path, index)
    with pytest.raises(PrismaError, match="LARGE SAE"):
        read_stitching(files["stitching"], N_LATENTS + 1)
    summary_only = json.loads(files["stitching"].read_text())
    del summary_only["classes"]["latents"]
    (tmp_path / "summary.json").write_text(json.dumps(summary_only))
    with pytest.raises(PrismaError, match="no per-latent classes"):
        read_stitching(tmp_path / "summary.json", N_LATENTS)
    with pytest.raises(PrismaError, match="decomposes 30 latents"):
        read_meta_sae(files["meta"], 12)
    with pytest.raises(PrismaError, match="names latent 4"):
        read_ground_truth(files["gt"], 3)


def test_no_remote_references(built):
    """Only local files: no http(s) URL in any src/href, and the only one in the code is the
    SVG namespace name (an identifier the browser never fetches)."""
    urls = set()
    for path in built["site"].rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text), path
            assert "@import" not in text and "url(" not in text, path
            urls |= set(re.findall(r"https?://[^\s\"')]+", text))
    assert urls == {"http://www.w3.org/2000/svg"}


# ----- in a real browser ---------------------------------------------------------------------
def _chromium() -> str | None:
    for name in (os.environ.get("PRISMA_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: `apt-get install chromium` (CI installs it)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, built):
    """A page that fails the test on any dialog (a script from data would open one), and
    records every request."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.dialogs, page.requests, page.errors = [], [], []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()
    assert page.dialogs == [], f"a dialog opened: {page.dialogs}"
    assert page.errors == [], f"script errors: {page.errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_screenshots")
    print(f"\nbrowser screenshots: {folder}")
    yield folder
    target = os.environ.get("PRISMA_ARTIFACTS")
    if target:
        shutil.copytree(folder, Path(target) / "browser", dirs_exist_ok=True)


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=15000)


def _follow(page, action) -> None:
    """Run ``action`` (a click on a link, back) and wait until the page it opens is ready."""
    with page.expect_navigation():
        action()
    page.wait_for_selector("body[data-ready='1']", timeout=15000)


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def test_walk_index_latent_neighbour_back(page, built, shots):
    index = built["index"]
    _open(page, built["page"].as_uri())
    assert page.text_content("#status").startswith(f"{N_LATENTS} of {N_LATENTS} latents")
    rows = page.locator("#rows tr")
    assert rows.count() == N_LATENTS
    first = rows.nth(0).locator("td")
    assert first.nth(0).text_content() == "#0"
    assert first.nth(1).text_content() == _pct(float(index.freq_token[0]))
    assert first.nth(3).text_content() == f"{float(index.max_value[0]):.3g}"
    page.screenshot(path=str(shots / "index.png"), full_page=True)

    page.click("th[data-key='max']")  # sort by max activation, largest first
    strongest = int(index.max_value.argmax())
    assert rows.nth(0).get_attribute("data-id") == str(strongest)
    page.fill("#filter", "dog")
    mix = index.label_mix.numpy()
    dogs = int(((mix.sum(1) > 0) & (mix.argmax(1) == 1)).sum())
    expect(rows).to_have_count(dogs)
    assert set(page.locator("#rows td.label").all_text_contents()) <= {
        text for text in page.locator("#rows td.label").all_text_contents() if "dog" in text
    }
    page.fill("#filter", "")
    expect(rows).to_have_count(N_LATENTS)
    page.select_option("#class-filter", "2")  # inactive
    assert [rows.nth(i).get_attribute("data-id") for i in range(rows.count())] == [str(DEAD)]
    page.select_option("#class-filter", "")

    latent = strongest
    _follow(page, lambda: page.click(f"#rows tr[data-id='{latent}'] a"))
    assert page.url.endswith(f"latent.html?id={latent}")
    assert page.text_content("#latent-title") == f"Latent #{latent}"
    assert page.text_content("#stat-max .stat-value") == f"{float(index.max_value[latent]):.3g}"
    thumbs = page.locator("#top img.thumb")
    assert thumbs.count() == 4
    assert page.evaluate(
        "[...document.querySelectorAll('#top img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#intervals .interval").count() == N_BINS
    assert page.locator("#histogram rect.bar").count() == N_HIST
    assert page.locator("#stitching .badge").text_content() in ("novel", "reconstruction")
    shown = [int(a.get_attribute("data-id")) for a in page.locator("#neighbours a.neighbour").all()]
    assert shown == index.neighbours[latent].tolist()
    page.screenshot(path=str(shots / "latent.png"), full_page=True)

    neighbour = shown[0]
    _follow(page, lambda: page.click(f"#neighbours a[data-id='{neighbour}']"))
    assert page.text_content("#latent-title") == f"Latent #{neighbour}"
    assert page.text_content("#stat-density .stat-value") == _pct(
        float(index.freq_token[neighbour])
    )
    page.screenshot(path=str(shots / "neighbour.png"), full_page=True)

    _follow(page, page.go_back)
    assert page.text_content("#latent-title") == f"Latent #{latent}"
    _follow(page, lambda: page.click("#to-index"))
    assert page.locator("#rows tr").count() == N_LATENTS

    page.fill("#jump-id", str(DEAD))
    _follow(page, lambda: page.click("#jump button"))
    assert "never fired" in page.text_content("#main")
    assert all(url.startswith("file://") for url in page.requests)


def test_hostile_text_is_shown_as_text_and_never_runs(page, built, shots):
    _open(page, built["site"].joinpath("latent.html").as_uri() + f"?id={HOSTILE}")
    first = page.locator("#top figure.sample").nth(0)
    assert first.locator(".label").text_content() == HOSTILE_LABEL
    assert first.locator(".key").text_content() == HOSTILE_KEY
    assert page.locator("#provenance").inner_text().count("tiny-<b>vit</b>") == 1
    # nothing from the data became an element: one script (ours), no <img src=x>, no <b>
    assert page.evaluate("document.querySelectorAll('script').length") == 1
    assert page.locator("img[src='x']").count() == 0 and page.locator("main b").count() == 0
    page.screenshot(path=str(shots / "hostile.png"), full_page=True)
    _open(page, built["page"].as_uri())
    page.fill("#filter", "script")
    expect(page.locator("#rows tr")).not_to_have_count(N_LATENTS)
    labels = page.locator("#rows td.label").all_text_contents()
    assert labels and all(HOSTILE_LABEL in text for text in labels)
    assert page.dialogs == []


def test_every_request_is_a_local_file(page, built):
    """Every request the pages make, across both pages and all their data, is file://."""
    remote = []
    page.route(
        re.compile(r"^(?!file:).*"), lambda route: (remote.append(route.request.url), route.abort())
    )
    _open(page, built["page"].as_uri())
    _open(page, built["site"].joinpath("latent.html").as_uri() + "?id=2")
    assert remote == []
    assert page.requests and all(url.startswith("file://") for url in page.requests)
    loaded = {Path(url.split("?")[0]).name for url in page.requests}
    assert {"browser.js", "browser.css", "meta.js", "00000.js", "000002.js"} <= loaded


# ----- through the command line, on a real index -------------------------------------------------
def test_browse_command_on_a_real_index(tmp_path, capsys):
    """`prisma-mm index` then `prisma-mm browse` on a tiny-vit cache: thumbnails are drawn from
    the right sample and latent (equal to a drawing from the index's own per-latent maps)."""
    import prisma_mm
    from prisma_mm.cache import write_cache
    from prisma_mm.cli import main
    from prisma_mm.sae import TopKSAE
    from prisma_mm.viz.index import SampleImages, latent_token_maps

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        for label in ("cat", "dog"):
            (tmp_path / "images" / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
        torch.manual_seed(0)
        model = prisma_mm.load_model("tiny-vit", weights=None)
        hook = "blocks.0.hook_resid_post"
        write_cache(model, str(tmp_path / "images"), tmp_path / "cache", [hook], progress=False)
        sae = TopKSAE(d_in=32, n_latents=12, k=3, seed=3)
        sae.metadata["hook"] = hook
        sae.save(tmp_path / "sae")
        common = ["--top-n", "3", "--n-bins", "2", "--interval-n", "1", "--hist-bins", "8"]
        assert main(["index", str(tmp_path / "sae"), str(tmp_path / "cache"), *common]) == 0
        site = tmp_path / "site"
        assert main(["browse", str(tmp_path / "sae"), "--out", str(site), "--quiet"]) == 0
        assert f"open {(site / 'index.html').resolve().as_uri()}" in capsys.readouterr().out
        index = FeatureIndex.load(tmp_path / "sae" / "index")
        fired = [i for i in range(index.n_latents) if index.max_value[i] > 0]
        assert fired
        images = SampleImages(index)
        for latent in fired[:3]:
            data = _data(site / latent_data_path(latent))
            assert data["thumbs"] and data["top"][0]["img"] == f"thumbs/000/{latent:06d}/t00.png"
            key, _, value, token_values = latent_token_maps(
                index, tmp_path / "sae", None, latent, "top"
            )[0]
            assert key == data["top"][0]["key"] and value == pytest.approx(
                data["top"][0]["v"], rel=1e-4
            )
            sample = index.keys.index(key)
            expected = render_thumbnail(
                images(sample), token_values, index.layout, float(index.max_value[latent])
            )
            drawn = Image.open(site / data["top"][0]["img"]).convert("RGB")
            assert np.array_equal(np.asarray(drawn), np.asarray(expected))
        meta = _data(site / "data" / "meta.js")
        assert meta["provenance"]["cache"]["model"] == "tiny-vit"
        assert meta["label_names"] == ["cat", "dog"]
    finally:
        torch.set_num_threads(threads)
