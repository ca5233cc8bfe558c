"""Feature-browser scale: build time and page load times in headless Chromium for a synthetic
feature index of 100 and of 100,000 latents (random tables, no thumbnails), side by side.

    python benchmarks/browser.py [--latents 100 100000] [--out DIR]

Index page: time to the first table rows (after meta.js and the first table file) and until
every table file has loaded (sortable over all latents); latent page: time to a rendered page.
Needs Debian's chromium and Playwright (the dev extra); not a test.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prisma_mm.hooks import TokenLayout
from prisma_mm.viz.browser import build_browser
from prisma_mm.viz.index import FeatureIndex


def random_index(n_latents: int, seed: int = 0, top_n: int = 16, n_bins: int = 5,
                 per_bin: int = 4, hist_bins: int = 32, k: int = 8,
                 n_samples: int = 50_000, n_labels: int = 10) -> FeatureIndex:  # fmt: skip
    """A FeatureIndex of random (shape-correct, ordered) tables, built vectorised."""
    rng = np.random.default_rng(seed)
    layout = TokenLayout(n_prefix=1, grid=(1, 14, 14), patch_size=(16, 16), input_size=(224, 224))
    top_value = -np.sort(-rng.gamma(2.0, 1.0, (n_latents, top_n)).astype(np.float32), axis=1)
    max_value = top_value[:, 0]
    fractions = np.array([0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0], dtype=np.float32)[: n_bins + 1]
    edges = max_value[:, None] * fractions[None, :]
    interval_value = edges[:, :-1, None] + rng.random((n_latents, n_bins, per_bin)).astype(
        np.float32
    ) * (edges[:, 1:, None] - edges[:, :-1, None])
    hist_edges = max_value[:, None] * np.linspace(0, 1, hist_bins + 1, dtype=np.float32)[None]
    neighbours = (np.arange(n_latents)[:, None] + rng.integers(1, n_latents, (n_latents, k))) % (
        n_latents
    )
    t = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    labels = [f"class_{c}" for c in range(n_labels)]
    meta = {
        "dictionary": {"path": "/synthetic", "sha256": "0" * 64, "class": "TopKSAE",
                       "n_latents": n_latents, "d_in": 768},
        "cache": {"path": "/synthetic-cache", "hook": "blocks.8.hook_resid_post",
                  "model": "synthetic", "manifest_sha256": "0" * 64},
        "score": "max", "top_n": top_n, "n_bins": n_bins, "n_inputs": n_samples,
        "n_tokens": n_samples * layout.n_tokens, "layout": layout.to_dict(), "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    return FeatureIndex(
        path=None,
        meta=meta,
        keys=[f"images/{s:06d}.jpg" for s in range(n_samples)],
        sample_labels=[labels[s % n_labels] for s in range(n_samples)],
        top_value=t(top_value, torch.float32),
        top_sample=t(rng.integers(0, n_samples, (n_latents, top_n)), torch.int64),
        top_token=t(rng.integers(0, layout.n_tokens, (n_latents, top_n)), torch.int64),
        interval_edges=t(edges, torch.float32),
        interval_value=t(interval_value, torch.float32),
        interval_sample=t(rng.integers(0, n_samples, (n_latents, n_bins, per_bin)), torch.int64),
        interval_token=t(
            rng.integers(0, layout.n_tokens, (n_latents, n_bins, per_bin)), torch.int64
        ),
        freq_token=t(rng.beta(0.5, 50, n_latents), torch.float64),
        freq_input=t(rng.beta(1, 5, n_latents), torch.float64),
        hist_edges=t(hist_edges, torch.float32),
        hist_counts=t(rng.integers(0, 1000, (n_latents, hist_bins)), torch.int64),
        mean_active=t(max_value / 3, torch.float64),
        max_value=t(max_value, torch.float32),
        neighbours=t(neighbours, torch.int64),
        neighbour_cos=t(-np.sort(-rng.random((n_latents, k)), axis=1), torch.float32),
        label_names=labels,
        label_mix=t(rng.multinomial(top_n, np.ones(n_labels) / n_labels, n_latents), torch.int64),
    )


def page_times(chromium, site: Path, latent: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds from navigation start (as the page clocks it) to the index page's first
    rows, to all its table files loaded, and to a rendered latent page; fresh page each time."""
    first, full, single = [], [], []
    clock = "Number(document.body.dataset.{}) / 1000"
    for _ in range(repeats):
        page = chromium.new_page()
        page.goto((site / "index.html").as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        first.append(page.evaluate(clock.format("firstRows")))
        full.append(page.evaluate(clock.format("readyAt")))
        page.goto((site / "latent.html").as_uri() + f"?id={latent}")
        page.wait_for_selector("body[data-ready='1']")
        single.append(page.evaluate(clock.format("readyAt")))
        page.close()
    return {"first_rows": float(np.median(first)), "all_rows": float(np.median(full)),
            "latent_page": float(np.median(single))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--out", default=None, help="keep the browsers here (default: temp)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(args.out or tempfile.mkdtemp(prefix="browser-bench-"))
    rows = []
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        for n in args.latents:
            index = random_index(n)
            site = root / f"browser-{n}"
            start = time.perf_counter()
            build_browser(index, site, progress=False)
            build = time.perf_counter() - start
            files = sum(1 for p in site.rglob("*") if p.is_file())
            size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
            times = page_times(chromium, site, latent=n // 2)
            rows.append((n, build, files, size, times))
        chromium.close()
    print(f"{'latents':>8} {'build s':>8} {'files':>7} {'MB':>7} {'first rows s':>13} "
          f"{'all rows s':>11} {'latent page s':>14}")  # fmt: skip
    for n, build, files, size, t in rows:
        print(f"{n:>8} {build:>8.2f} {files:>7} {size / 1e6:>7.1f} {t['first_rows']:>13.3f} "
              f"{t['all_rows']:>11.3f} {t['latent_page']:>14.3f}")  # fmt: skip
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"first rows {b[0]} vs {a[0]} latents: x{b[4]['first_rows'] / a[4]['first_rows']:.2f}; "
              f"latent page: x{b[4]['latent_page'] / a[4]['latent_page']:.2f}")  # fmt: skip
    print(f"browsers in {root}")


if __name__ == "__main__":
    main()
