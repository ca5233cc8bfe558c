/* prisma-mm feature browser: a static page that opens from file:// with no server.
 *
 * Data files are scripts that call back into PRISMA (browsers refuse fetch/XHR of local
 * files), e.g. data/latents/000/000123.js runs PRISMA.latent(123, {...}). Every piece of text
 * from data enters the page through textContent / createTextNode, never as HTML.
 */
"use strict";

(function () {
  const PRISMA = (window.PRISMA = window.PRISMA || {});
  const waiting = new Map(); // data key -> resolve
  const loaded = new Map(); // data key -> Promise

  function deliver(key, data) {
    const resolve = waiting.get(key);
    if (resolve) {
      waiting.delete(key);
      resolve(data);
    }
  }
  PRISMA.meta = (data) => deliver("meta", data);
  PRISMA.table = (shard, data) => deliver("table/" + shard, data);
  PRISMA.latent = (id, data) => deliver("latent/" + id, data);

  // Load one data script; resolves with what it registers.
  function load(key, src) {
    if (loaded.has(key)) return loaded.get(key);
    const promise = new Promise((resolve, reject) => {
      waiting.set(key, resolve);
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => {
        script.remove();
        if (waiting.has(key)) {
          waiting.delete(key);
          reject(new Error(src + " did not register its data"));
        }
      };
      script.onerror = () => {
        script.remove();
        waiting.delete(key);
        reject(new Error("missing data file " + src));
      };
      document.head.appendChild(script);
    });
    loaded.set(key, promise);
    return promise;
  }

  const pad = (n, width) => String(n).padStart(width, "0");
  const latentSrc = (id) =>
    "data/latents/" + pad(Math.floor(id / 1000), 3) + "/" + pad(id, 6) + ".js";
  const tableSrc = (shard) => "data/table/" + pad(shard, 5) + ".js";
  const loadMeta = () => load("meta", "data/meta.js");
  const loadLatent = (id) => load("latent/" + id, latentSrc(id));
  const loadTable = (shard) => load("table/" + shard, tableSrc(shard));

  // ----- DOM helpers: text only through text nodes ------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) append(node, child);
    return node;
  }
  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach((c) => append(node, c));
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }
  const svgNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    const node = document.createElementNS(svgNS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const d = digits === undefined ? 3 : digits;
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(d - 1);
    return Number(x.toPrecision(d)).toString();
  }
  const pct = (x) => (x === null || x === undefined ? "–" : fmt(100 * x, 3) + "%");
  const latentHref = (id) => "latent.html?id=" + Number(id);
  const CLASS_NAMES = ["novel", "reconstruction", "inactive"];

  function gradient(meta) {
    const stops = meta.colormap.map(
      (c, i, all) => "rgb(" + c.join(",") + ") " + ((100 * i) / (all.length - 1)).toFixed(1) + "%"
    );
    return "linear-gradient(to right, " + stops.join(", ") + ")";
  }

  // Page state for tests and benchmarks: ready, and when (ms since navigation start).
  function markReady() {
    document.body.dataset.readyAt = String(Math.round(performance.now()));
    document.body.dataset.ready = "1";
  }

  function showError(error) {
    const main = document.getElementById("main");
    main.replaceChildren(el("p", { class: "error" }, String(error.message || error)));
  }

  function provenanceTable(meta) {
    const rows = [];
    const add = (group, key, value) => {
      if (value === null || value === undefined || value === "") return;
      const text = typeof value === "object" ? JSON.stringify(value) : String(value);
      rows.push(el("tr", {}, el("th", {}, group), el("td", {}, key), el("td", { class: "mono" }, text)));
    };
    for (const [group, fields] of Object.entries(meta.provenance || {})) {
      if (fields && typeof fields === "object" && !Array.isArray(fields)) {
        for (const [key, value] of Object.entries(fields)) add(group, key, value);
      } else add(group, "", fields);
    }
    return el("table", { class: "provenance" }, el("tbody", {}, rows));
  }

  function jumpForm(meta, onJump) {
    const input = el("input", {
      type: "number", min: 0, max: meta.n_latents - 1, placeholder: "latent id", id: "jump-id",
    });
    const form = el("form", { class: "jump", id: "jump" }, input, el("button", { type: "submit" }, "Go"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const id = Number(input.value);
      if (Number.isInteger(id) && id >= 0 && id < meta.n_latents) onJump(id);
      else input.setCustomValidity("0 to " + (meta.n_latents - 1)), input.reportValidity();
    });
    input.addEventListener("input", () => input.setCustomValidity(""));
    return form;
  }

  // ----- the index page ---------------------------------------------------------------------
  const PAGE_ROWS = 100;

  function indexPage(meta) {
    const n = meta.n_latents;
    const cols = {
      density: new Float64Array(n).fill(NaN),
      freq_input: new Float64Array(n).fill(NaN),
      max: new Float64Array(n).fill(NaN),
      mean: new Float64Array(n).fill(NaN),
      label: new Int32Array(n).fill(-1),
      label_frac: new Float64Array(n).fill(NaN),
      stitch: new Int8Array(n).fill(-1),
      gt: new Int32Array(n).fill(-1),
      gt_auroc: new Float64Array(n).fill(NaN),
      temporal: new Float64Array(n).fill(NaN),
    };
    const metaOf = new Array(n);
    const novelOf = new Array(n); // ground-truth label a novel latent detects (stitching)
    const have = new Uint8Array(n);
    let nShardsLoaded = 0;
    const state = { sort: "id", descending: false, page: 0, text: "", cls: "", hideDead: false };
    let order = null;

    const columns = [
      { key: "id", title: "latent", num: true },
      { key: "density", title: "density", num: true, tip: "fraction of tokens where it fires" },
      { key: "freq_input", title: "images", num: true, tip: "fraction of inputs where it fires" },
      { key: "max", title: "max act.", num: true },
      { key: "mean", title: "mean act.", num: true, tip: "mean activation when active" },
    ];
    if (meta.columns.label) columns.push({ key: "label", title: "top label", tip: "most common label of the top samples" });
    if (meta.columns.stitching) columns.push({ key: "stitch", title: "stitching", tip: "class against the smaller SAE; a novel latent's ground-truth label" });
    if (meta.columns.meta) columns.push({ key: "meta", title: "meta-latents" });
    if (meta.columns.ground_truth) columns.push({ key: "gt", title: "ground truth", tip: "factor value it detects best (AUROC)" });
    if (meta.columns.temporal) columns.push({ key: "temporal", title: "temporal", num: true, tip: "share of its activation that goes without motion (frame-repeated and frame-shuffled clips)" });

    const labelText = (i) => (cols.label[i] >= 0 ? meta.label_names[cols.label[i]] : "");
    const gtText = (i) => (cols.gt[i] >= 0 ? meta.gt_names[cols.gt[i]] : "");
    const metaText = (i) => (metaOf[i] || []).map((m) => "m" + m).join(" ");

    const main = document.getElementById("main");
    const status = el("span", { class: "status", id: "status" });
    const textFilter = el("input", { type: "search", id: "filter", placeholder: "filter: label, factor, m12 …" });
    const classFilter = el("select", { id: "class-filter" },
      el("option", { value: "" }, "all classes"),
      CLASS_NAMES.map((c, i) => el("option", { value: String(i) }, c)));
    const deadBox = el("input", { type: "checkbox", id: "hide-dead" });
    const controls = el("div", { class: "controls" },
      jumpForm(meta, (id) => (window.location.href = latentHref(id))),
      textFilter,
      meta.columns.stitching ? classFilter : null,
      el("label", { class: "check" }, deadBox, " hide latents that never fire"),
      status);
    const thead = el("thead");
    const tbody = el("tbody", { id: "rows" });
    const pager = el("div", { class: "pager" });
    main.replaceChildren(
      el("section", { class: "summary" }, summaryCards(meta)),
      controls,
      el("div", { class: "table-wrap" }, el("table", { class: "latents", id: "latent-table" }, thead, tbody)),
      pager,
      el("details", { class: "card" }, el("summary", {}, "Provenance"), provenanceTable(meta)));

    function summaryCards() {
      const p = meta.provenance || {};
      const d = p.dictionary || {};
      const c = p.cache || {};
      const card = (label, value) => el("div", { class: "stat" }, el("div", { class: "stat-label" }, label), el("div", { class: "stat-value" }, value));
      return [
        card("latents", String(meta.n_latents)),
        card("dictionary", d.class || "–"),
        card("model", c.model || "–"),
        card("hook", c.hook || "–"),
        card("inputs indexed", p.index && p.index.n_inputs !== undefined ? String(p.index.n_inputs) : "–"),
        card("never fire", meta.stats && meta.stats.n_dead !== undefined ? String(meta.stats.n_dead) : "–"),
      ];
    }

    function header() {
      const cells = columns.map((c) => {
        const arrow = state.sort === c.key ? (state.descending ? " ▼" : " ▲") : "";
        return el("th", {
          class: (c.num ? "num " : "") + "sortable", title: c.tip || null, "data-key": c.key,
          onclick: () => {
            if (state.sort === c.key) state.descending = !state.descending;
            else (state.sort = c.key), (state.descending = c.num && c.key !== "id");
            state.page = 0;
            refresh();
          },
        }, c.title + arrow);
      });
      thead.replaceChildren(el("tr", {}, cells));
    }

    function sortValue(key) {
      if (key === "id") return null;
      if (key === "label") return labelText;
      if (key === "gt") return gtText;
      if (key === "meta") return (i) => (metaOf[i] && metaOf[i].length ? metaOf[i][0] : Infinity);
      if (key === "stitch") return (i) => (cols.stitch[i] < 0 ? 9 : cols.stitch[i]);
      const column = cols[key];
      return (i) => column[i];
    }

    function compute() {
      const text = state.text.trim().toLowerCase();
      const cls = state.cls === "" ? -1 : Number(state.cls);
      const ids = [];
      for (let i = 0; i < n; i++) {
        if (!have[i]) continue;
        if (state.hideDead && !(cols.density[i] > 0)) continue;
        if (cls >= 0 && cols.stitch[i] !== cls) continue;
        if (text) {
          const hay = (String(i) + " " + labelText(i) + " " + gtText(i) + " " + metaText(i) + " " + (novelOf[i] || "")).toLowerCase();
          if (!hay.includes(text)) continue;
        }
        ids.push(i);
      }
      const value = sortValue(state.sort);
      const sign = state.descending ? -1 : 1;
      if (value) {
        ids.sort((a, b) => {
          const x = value(a), y = value(b);
          const xBad = x === "" || Number.isNaN(x), yBad = y === "" || Number.isNaN(y);
          if (xBad !== yBad) return xBad ? 1 : -1; // missing values last, whichever direction
          if (x < y) return -sign;
          if (x > y) return sign;
          return a - b;
        });
      } else if (state.descending) ids.reverse();
      order = ids;
    }

    function row(i) {
      const cells = [el("td", { class: "num" }, el("a", { href: latentHref(i), class: "latent-link" }, "#" + i))];
      cells.push(el("td", { class: "num" }, pct(cols.density[i])));
      cells.push(el("td", { class: "num" }, pct(cols.freq_input[i])));
      cells.push(el("td", { class: "num" }, fmt(cols.max[i])));
      cells.push(el("td", { class: "num" }, fmt(cols.mean[i])));
      if (meta.columns.label)
        cells.push(el("td", { class: "label" }, labelText(i),
          cols.label[i] >= 0 ? el("span", { class: "muted" }, " " + pct(cols.label_frac[i])) : null));
      if (meta.columns.stitching) {
        const c = cols.stitch[i];
        cells.push(el("td", {}, c >= 0 ? el("span", { class: "badge " + CLASS_NAMES[c] }, CLASS_NAMES[c]) : "–",
          novelOf[i] ? el("span", { class: "muted novel-label" }, " " + novelOf[i]) : null));
      }
      if (meta.columns.meta)
        cells.push(el("td", { class: "mono" }, metaText(i) || "–"));
      if (meta.columns.ground_truth)
        cells.push(el("td", {}, gtText(i) || "–",
          cols.gt[i] >= 0 ? el("span", { class: "muted" }, " " + fmt(cols.gt_auroc[i])) : null));
      if (meta.columns.temporal) cells.push(el("td", { class: "num" }, fmt(cols.temporal[i])));
      return el("tr", { "data-id": i }, cells);
    }

    function render() {
      header();
      const pages = Math.max(1, Math.ceil(order.length / PAGE_ROWS));
      state.page = Math.min(state.page, pages - 1);
      const start = state.page * PAGE_ROWS;
      tbody.replaceChildren(...order.slice(start, start + PAGE_ROWS).map(row));
      const nav = (label, page, id) => el("button", {
        id, disabled: page < 0 || page >= pages ? "disabled" : null,
        onclick: () => { state.page = page; render(); window.scrollTo(0, 0); },
      }, label);
      pager.replaceChildren(
        nav("‹ previous", state.page - 1, "prev-page"),
        el("span", {}, "page " + (state.page + 1) + " of " + pages),
        nav("next ›", state.page + 1, "next-page"));
      const loading = nShardsLoaded < meta.n_table_shards
        ? " (loading " + nShardsLoaded + "/" + meta.n_table_shards + " table files)" : "";
      status.textContent = order.length + " of " + n + " latents" + loading;
    }

    function refresh() {
      compute();
      render();
    }

    let timer = null;
    textFilter.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => { state.text = textFilter.value; state.page = 0; refresh(); }, 150);
    });
    classFilter.addEventListener("change", () => { state.cls = classFilter.value; state.page = 0; refresh(); });
    deadBox.addEventListener("change", () => { state.hideDead = deadBox.checked; state.page = 0; refresh(); });

    function take(shard) {
      for (let j = 0; j < shard.count; j++) {
        const i = shard.start + j;
        for (const key of ["density", "freq_input", "max", "mean"]) cols[key][i] = shard[key][j] ?? NaN;
        if (shard.label) (cols.label[i] = shard.label[j]), (cols.label_frac[i] = shard.label_frac[j] ?? NaN);
        if (shard.stitch) cols.stitch[i] = shard.stitch[j];
        if (shard.novel_label) novelOf[i] = shard.novel_label[j];
        if (shard.gt) (cols.gt[i] = shard.gt[j]), (cols.gt_auroc[i] = shard.gt_auroc[j] ?? NaN);
        if (shard.meta) metaOf[i] = shard.meta[j];
        if (shard.temporal) cols.temporal[i] = shard.temporal[j] ?? NaN;
        have[i] = 1;
      }
      nShardsLoaded += 1;
    }

    // The first table file paints at once; the rest stream in behind it, a few at a time,
    // repainting at most twice a second, so the first rows show as fast for 100k as for 100.
    let next = 1;
    let lastPaint = 0;
    function pump() {
      if (next >= meta.n_table_shards) return;
      const shard = next++;
      loadTable(shard).then((data) => {
        take(data);
        const now = performance.now();
        const done = nShardsLoaded === meta.n_table_shards;
        if (done || now - lastPaint > 500) {
          lastPaint = now;
          refresh();
        }
        if (done) markReady();
        pump();
      }, showError);
    }
    loadTable(0).then((data) => {
      take(data);
      refresh();
      lastPaint = performance.now();
      document.body.dataset.firstRows = String(Math.round(performance.now()));
      if (nShardsLoaded === meta.n_table_shards) markReady();
      // let the first rows paint before the other files compete for the main thread
      requestAnimationFrame(() => setTimeout(() => { for (let k = 0; k < 4; k++) pump(); }, 0));
    }, showError);
  }

  // ----- the latent page --------------------------------------------------------------------
  function tokenName(meta, token) {
    const layout = meta.layout;
    if (!layout || token === null || token === undefined || token < 0) return "";
    if (token < layout.n_prefix) return token === 0 ? "CLS" : "prefix " + token;
    const [frames, h, w] = layout.grid;
    const size = { t: frames, h: h, w: w }, at = {};
    let p = token - layout.n_prefix;
    for (const axis of (layout.order || "thw").split("").reverse()) (at[axis] = p % size[axis]), (p = Math.floor(p / size[axis]));
    const f = at.t, r = at.h, c = at.w; // the family's token order (TimeSformer: time fastest)
    return frames > 1 ? "frame " + f + " patch " + r + "," + c : "patch " + r + "," + c;
  }

  // A generated sample's prompt, seed and step (prompt caches), as text: never parsed as HTML.
  function generation(sample) {
    if (sample.prompt === undefined || sample.prompt === null) return null;
    return el("div", { class: "prompt", title: sample.prompt }, sample.prompt,
      el("span", { class: "muted" }, " · seed " + sample.seed + " · step " + sample.step));
  }

  function sampleCard(meta, sample, extraClass) {
    const picture = sample.img
      ? el("img", { src: sample.img, alt: "", loading: "lazy", class: "thumb" })
      : el("div", { class: "thumb missing" }, "no image");
    return el("figure", { class: "sample " + (extraClass || "") },
      picture,
      el("figcaption", {},
        el("div", { class: "value" }, fmt(sample.v)),
        sample.label !== null && sample.label !== undefined ? el("div", { class: "label" }, sample.label) : null,
        generation(sample),
        el("div", { class: "key mono", title: sample.key }, sample.key),
        el("div", { class: "muted" }, tokenName(meta, sample.tok))));
  }

  // Samples with a thumbnail as cards; the rest (past the drawn ones) as a compact table.
  // Samples with a thumbnail as cards; the rest as a compact table (all of them when the
  // browser was built without thumbnails).
  function samples(meta, d, list, size) {
    if (!list.length) return el("p", { class: "muted" }, "no samples");
    const cards = list.filter((s) => s.img);
    const rest = list.filter((s) => !s.img);
    const table = (rows) => el("table", { class: "samples" }, el("tbody", {}, rows.map((s) => el("tr", {},
      el("td", { class: "num value" }, fmt(s.v)), el("td", { class: "label" }, s.label ?? "", generation(s)),
      el("td", { class: "mono key" }, s.key), el("td", { class: "muted" }, tokenName(meta, s.tok))))));
    if (!cards.length) return table(rest);
    return [
      el("div", { class: "grid " + size }, cards.map((s) => sampleCard(meta, s, size))),
      rest.length
        ? el("details", { class: "more" }, el("summary", {}, rest.length + " more without thumbnails"), table(rest))
        : null,
    ];
  }

  function histogram(hist) {
    const width = 520, height = 150, left = 44, bottom = 24;
    const box = svg("svg", { viewBox: "0 0 " + width + " " + height, class: "hist", role: "img" });
    const counts = hist.counts, edges = hist.edges;
    const peak = Math.max(1, ...counts);
    const barW = (width - left - 6) / counts.length;
    counts.forEach((c, i) => {
      const h = ((height - bottom - 8) * Math.log1p(c)) / Math.log1p(peak);
      const bar = svg("rect", { x: left + i * barW, y: height - bottom - h, width: Math.max(1, barW - 1), height: h, class: "bar" });
      const tip = svg("title", {});
      tip.textContent = fmt(edges[i]) + " – " + fmt(edges[i + 1]) + ": " + c;
      bar.appendChild(tip);
      box.appendChild(bar);
    });
    const text = (x, y, s, anchor) => {
      const t = svg("text", { x, y, "text-anchor": anchor || "middle", class: "axis" });
      t.textContent = s;
      box.appendChild(t);
    };
    box.appendChild(svg("line", { x1: left, y1: height - bottom, x2: width - 6, y2: height - bottom, class: "axis-line" }));
    text(left, height - 8, fmt(edges[0]), "start");
    text(width - 6, height - 8, fmt(edges[edges.length - 1]), "end");
    text(left - 6, 14, String(peak), "end");
    text(left - 6, height - bottom, "0", "end");
    return box;
  }

  function section(title, id, ...body) {
    return el("section", { class: "card", id }, el("h2", {}, title), ...body);
  }

  function latentPage(meta) {
    const params = new URLSearchParams(window.location.search);
    const raw = params.get("id") ?? window.location.hash.replace("#", "");
    const id = Number(raw);
    if (raw === null || raw === "" || !Number.isInteger(id) || id < 0 || id >= meta.n_latents)
      throw new Error("no latent " + JSON.stringify(raw) + ": ids run 0 to " + (meta.n_latents - 1));
    document.title = "latent " + id + " · " + document.title;
    const nav = document.getElementById("nav");
    nav.replaceChildren(
      el("a", { href: "index.html", id: "to-index" }, "← all latents"),
      id > 0 ? el("a", { href: latentHref(id - 1), id: "prev-latent" }, "‹ #" + (id - 1)) : null,
      id < meta.n_latents - 1 ? el("a", { href: latentHref(id + 1), id: "next-latent" }, "#" + (id + 1) + " ›") : null,
      jumpForm(meta, (j) => (window.location.href = latentHref(j))));
    return loadLatent(id).then((d) => renderLatent(meta, d));
  }

  function renderLatent(meta, d) {
    const main = document.getElementById("main");
    const stat = (label, value, id) => el("div", { class: "stat", id }, el("div", { class: "stat-label" }, label), el("div", { class: "stat-value" }, value));
    const topLabel = d.label_mix && d.label_mix.length ? d.label_mix[0] : null;
    const stats = [
      stat("density", pct(d.density), "stat-density"),
      stat("images", pct(d.freq_input), "stat-images"),
      stat("max activation", fmt(d.max), "stat-max"),
      stat("mean when active", fmt(d.mean), "stat-mean"),
    ];
    if (topLabel) stats.push(stat("top label", topLabel[0], "stat-label"));
    if (d.stitch) stats.push(stat("stitching", CLASS_NAMES[d.stitch.cls] || "–", "stat-stitch"));
    if (d.gt && d.gt.length) stats.push(stat("ground truth", d.gt[0].value, "stat-gt"));
    if (d.temporal) stats.push(stat("temporal score", fmt(d.temporal.score), "stat-temporal"));

    const parts = [el("h1", { id: "latent-title" }, "Latent #" + d.id), el("section", { class: "summary" }, stats)];
    if (!(d.max > 0)) parts.push(el("p", { class: "notice" }, "This latent never fired on the indexed data."));

    const bar = el("div", { class: "colorbar-wrap" },
      el("span", {}, "0"), el("div", { class: "colorbar", style: "background: " + gradient(meta) }), el("span", {}, fmt(d.max)),
      el("span", { class: "muted" }, " heatmaps share one scale: 0 to this latent's max activation"));
    parts.push(section("Top activations", "top", d.thumbs ? bar : null, samples(meta, d, d.top, "")));
    if (d.gifs && d.gifs.length)
      parts.push(section("Top clips, animated", "clips",
        el("p", { class: "muted" }, "the heatmap over each top clip's frames, on the same scale"),
        el("div", { class: "grid" }, d.gifs.map((src) => el("img", { src, alt: "", loading: "lazy", class: "thumb clip" })))));

    if (d.intervals && d.intervals.length)
      parts.push(section("Interval samples", "intervals",
        el("p", { class: "muted" }, "samples from each activation range, strongest first, so weak firings show as well"),
        d.intervals.map((b) => el("div", { class: "interval" },
          el("div", { class: "interval-range" }, fmt(b.lo) + " – " + fmt(b.hi)),
          el("div", { class: "interval-samples" }, samples(meta, d, b.samples, "small"))))));

    const side = [];
    if (d.hist && d.hist.counts.length)
      side.push(section("Activation histogram", "histogram",
        el("p", { class: "muted" }, "non-zero values; counts on a log scale"), histogram(d.hist)));
    if (d.label_mix && d.label_mix.length) {
      const total = d.label_mix.reduce((s, x) => s + x[1], 0);
      side.push(section("Label mix of the top samples", "label-mix",
        el("table", { class: "mix" }, el("tbody", {}, d.label_mix.map(([name, count]) =>
          el("tr", {}, el("td", { class: "label" }, name),
            el("td", { class: "barcell" }, el("div", { class: "hbar", style: "width:" + ((100 * count) / total).toFixed(1) + "%" })),
            el("td", { class: "num" }, String(count))))))));
    }
    if (d.stitch) {
      const s = d.stitch;
      side.push(section("Stitching", "stitching",
        el("p", {}, el("span", { class: "badge " + CLASS_NAMES[s.cls] }, CLASS_NAMES[s.cls] || "–")),
        el("table", { class: "kv" }, el("tbody", {},
          el("tr", {}, el("th", {}, "best match in " + (meta.stitching_other || "the other SAE")), el("td", { class: "mono" }, "#" + s.match)),
          el("tr", {}, el("th", {}, "decoder cosine"), el("td", {}, fmt(s.cos))),
          el("tr", {}, el("th", {}, "ΔMSE when inserted"), el("td", {}, fmt(s.delta))),
          s.label ? el("tr", { id: "novel-label" }, el("th", {}, "detects (ground truth)"),
            el("td", {}, s.label, el("span", { class: "muted" }, s.new ? " · new: the smaller SAE has no latent for it" : " · the smaller SAE has a latent for it"))) : null))));
    }
    if (d.gt && d.gt.length)
      side.push(section("Ground truth", "ground-truth",
        el("table", { class: "kv" }, el("tbody", {}, d.gt.map((g) =>
          el("tr", {}, el("th", {}, g.value), el("td", {}, "AUROC " + fmt(g.auroc) + " (" + g.level + ")")))))));
    if (d.temporal)
      side.push(section("Temporal score", "temporal",
        el("p", { class: "muted" }, "share of its activation on moving clips that goes on the controls (docs/video.md)"),
        el("table", { class: "kv" }, el("tbody", {},
          el("tr", {}, el("th", {}, "temporal score"), el("td", {}, fmt(d.temporal.score))),
          el("tr", {}, el("th", {}, "gone with one frame repeated"), el("td", {}, fmt(d.temporal.frozen))),
          el("tr", {}, el("th", {}, "gone with frames shuffled"), el("td", {}, fmt(d.temporal.order)))))));
    if (d.meta) {
      side.push(section("Meta-SAE decomposition", "meta-sae",
        d.meta.length ? d.meta.map((m) => el("div", { class: "meta-latent" },
          el("div", {}, el("strong", {}, "meta-latent m" + m.m), el("span", { class: "muted" }, " weight " + fmt(m.w) + " · " + m.n_members + " members")),
          el("div", { class: "members" }, m.members.length ? m.members.map(([j, w]) =>
            el("a", { href: latentHref(j), class: "chip" }, "#" + j, el("span", { class: "muted" }, " " + fmt(w, 2)))) : el("span", { class: "muted" }, "no other members"))))
          : el("p", { class: "muted" }, "no meta-latent is active for this latent")));
    }

    parts.push(el("div", { class: "columns" }, side));
    if (d.neighbours && d.neighbours.length)
      parts.push(section("Decoder-cosine neighbours", "neighbours",
        el("div", { class: "grid" }, d.neighbours.map((nb) => el("a", { href: latentHref(nb.id), class: "neighbour", "data-id": nb.id },
          nb.img ? el("img", { src: nb.img, alt: "", loading: "lazy", class: "thumb" }) : null,
          el("div", { class: "value" }, "#" + nb.id),
          el("div", { class: "muted" }, "cos " + fmt(nb.cos)),
          nb.label ? el("div", { class: "label" }, nb.label) : null)))));
    parts.push(section("Provenance", "provenance", provenanceTable(meta)));
    main.replaceChildren(...parts);
    markReady();
  }

  function start() {
    const page = document.body.dataset.page;
    loadMeta()
      .then((meta) => {
        const brand = document.getElementById("brand");
        if (brand && meta.title) brand.textContent = meta.title;
        return page === "index" ? indexPage(meta) : latentPage(meta);
      })
      .catch(showError);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
