"use strict";
// nlref attention explorer: everything it shows is in the JSON of #nlref-data, written by
// nlref.explore. No network: the page reads nothing but itself.
(() => {
  const DATA = JSON.parse(document.getElementById("nlref-data").textContent);
  const DECADES = 4; // the log colour scale spans this many powers of ten below the max
  const MAX_ALPHA = 0.9;
  // matplotlib's "inferno", 17 stops, interpolated linearly
  const INFERNO = [
    [0, 0, 4], [11, 7, 36], [33, 12, 74], [61, 9, 101], [87, 16, 110], [113, 25, 110],
    [138, 34, 106], [163, 44, 97], [188, 55, 84], [210, 70, 68], [228, 90, 49],
    [241, 115, 29], [249, 142, 9], [252, 172, 17], [249, 203, 53], [242, 234, 105],
    [252, 255, 164],
  ];
  const LUT = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (INFERNO.length - 1);
    const k = Math.min(Math.floor(x), INFERNO.length - 2);
    const f = x - k;
    for (let c = 0; c < 3; c++) LUT[3 * i + c] = INFERNO[k][c] * (1 - f) + INFERNO[k + 1][c] * f;
  }

  // ------------------------------------------------------------------ decoding
  function bytes(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const f64 = (b64) => new Float64Array(bytes(b64).buffer);
  const f32 = (b64) => new Float32Array(bytes(b64).buffer);
  const u32 = (b64) => new Uint32Array(bytes(b64).buffer);
  const u16 = (b64) => new Uint16Array(bytes(b64).buffer);
  async function inflate(b64) {
    const stream = new Blob([bytes(b64)]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  const prod = (a) => a.reduce((p, v) => p * v, 1);
  const Q = DATA.queries; // query grid: [h, w] or [T, h, w]
  const K = DATA.keys; // key grid, same rank
  const KERNEL = DATA.kernel; // pooling kernel per axis (1: not pooled)
  const NQ = prod(Q);
  const NK = prod(K);
  const CLIP = Q.length === 3;
  const [T, H, W] = CLIP ? Q : [1, ...Q];
  const [KT, KH, KW] = CLIP ? K : [1, ...K];
  const [PT, PH, PW] = CLIP ? KERNEL : [1, ...KERNEL];
  const [IMG_H, IMG_W] = DATA.pixels; // size of one frame, in the image's own pixels

  // a binary field equal to an earlier layer's is stored as {sameAs: index of that layer}
  const stored = (key, k) => {
    let value = DATA.variants[k][key];
    while (value && value.sameAs !== undefined) value = DATA.variants[value.sameAs][key];
    return value;
  };
  const NK_WIDE = prod(DATA.keys) > 65536; // top keys: 16-bit indices unless N′ > 2^16
  const variants = DATA.variants.map((v, k) => ({
    name: v.name,
    label: v.label,
    rowsB64: stored("rows", k),
    rows: null,
    lo: v.rows ? f64(stored("lo", k)) : null,
    hi: v.rows ? f64(stored("hi", k)) : null,
    entropy: v.rows ? f32(stored("entropy", k)) : null,
    distance: v.rows ? f32(stored("distance", k)) : null,
    top: v.rows ? (NK_WIDE ? u32 : u16)(stored("top", k)) : null,
    topWeight: v.rows ? f32(stored("topWeight", k)) : null,
    summary: v.summary,
    maps: Object.fromEntries(
      v.maps.map((m) => [m.name, { description: m.description, values: f64(m.values) }]),
    ),
  }));
  const viewNames = ["query"];
  for (const v of variants) for (const m of Object.keys(v.maps)) {
    if (!viewNames.includes(m)) viewNames.push(m);
  }
  // side by side: one panel per layer (an image only), all on one colour scale
  const PANELS = !CLIP && DATA.sideBySide ? variants.map((_, k) => k) : null;

  // ------------------------------------------------------------------ the data API
  function variantIndex(variant) {
    const i = typeof variant === "number" ? variant : variants.findIndex((v) => v.name === variant);
    if (!(i >= 0 && i < variants.length)) {
      throw new Error(`unknown variant ${variant}; known: ${variants.map((v) => v.name).join(", ")}`);
    }
    return i;
  }
  function flatQuery(coords) {
    if (coords.length !== Q.length) {
      throw new Error(`a query has ${Q.length} coordinates (${DATA.axes.join(", ")}), got ${coords.length}`);
    }
    let i = 0;
    for (let d = 0; d < Q.length; d++) {
      const c = coords[d];
      if (!(Number.isInteger(c) && c >= 0 && c < Q[d])) {
        throw new Error(`query ${coords} lies outside the query grid ${Q.join("x")}`);
      }
      i = i * Q[d] + c;
    }
    return i;
  }
  function unflat(i, shape) {
    const out = new Array(shape.length);
    for (let d = shape.length - 1; d >= 0; d--) {
      out[d] = i % shape[d];
      i = Math.floor(i / shape[d]);
    }
    return out;
  }
  // Row i of a variant, dequantised: lo + (q / 255)^2 (hi - lo) (the "sqrt-uint8" code)
  function rowValues(vi, i, out) {
    const v = variants[vi];
    const lo = v.lo[i];
    const span = v.hi[i] - lo;
    const base = i * NK;
    for (let j = 0; j < NK; j++) {
      const s = v.rows[base + j] / 255;
      out[j] = lo + s * s * span;
    }
    return out;
  }

  // ------------------------------------------------------------------ state and layout
  // side by side, the maps differ in spread: a log scale shows the spread-out ones too
  const state = { variant: 0, query: Math.floor(NQ / 2), view: "query",
    scale: PANELS ? "log" : "linear", smooth: !DATA.pixelated, pinned: false };
  const buffers = variants.map(() => new Float64Array(NK)); // one decoded row per layer
  const frames = [];
  const images = DATA.frames.map((src) => {
    const img = new Image();
    img.src = src;
    return img;
  });

  function pixelOf(cell) { // the centre of a query cell, in image pixels
    const [, y, x] = CLIP ? cell : [0, ...cell];
    return [(y + 0.5) * IMG_H / H, (x + 0.5) * IMG_W / W];
  }
  function keyPixel(key) { // the centre of a (pooled) key cell, in image pixels
    const [, a, b] = CLIP ? key : [0, ...key];
    return [(a + 0.5) * PH * IMG_H / H, (b + 0.5) * PW * IMG_W / W];
  }
  const fmt = (x) => {
    if (!Number.isFinite(x)) return "n/a";
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toPrecision(3);
  };
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };

  function buildLayout() {
    document.getElementById("title").textContent = DATA.title;
    const box = document.getElementById("frames");
    // one image: as large as fits beside the panel (at most 640 px wide); a clip: a row of
    // small frames
    const room = Math.max(240, Math.min(window.innerHeight - 190, 640));
    let width = CLIP
      ? Math.min(240, Math.max(120, 720 / Math.min(T, 4)))
      : Math.min(640, (room * IMG_W) / IMG_H);
    if (PANELS) width = Math.min(width, Math.max(200, 960 / PANELS.length - 10));
    const scale = width / IMG_W;
    const perRow = CLIP ? Math.min(T, 4) : PANELS ? PANELS.length : 1;
    document.getElementById("view").style.width = `${Math.max(320, perRow * (width + 10))}px`;
    const dpr = window.devicePixelRatio || 1;
    const count = PANELS ? PANELS.length : T;
    for (let t = 0; t < count; t++) {
      const fig = el("figure");
      const canvas = el("canvas");
      canvas.style.width = `${Math.round(IMG_W * scale)}px`;
      canvas.style.height = `${Math.round(IMG_H * scale)}px`;
      canvas.width = Math.round(IMG_W * scale * dpr);
      canvas.height = Math.round(IMG_H * scale * dpr);
      const frame = PANELS ? 0 : t;
      canvas.dataset.frame = String(frame);
      if (PANELS) canvas.dataset.panel = variants[PANELS[t]].name;
      canvas.addEventListener("pointermove", (e) => onPointer(e, frame, false));
      canvas.addEventListener("pointerdown", (e) => onPointer(e, frame, true));
      fig.appendChild(canvas);
      const caption = el("figcaption", CLIP ? `frame ${t}` : "");
      fig.appendChild(caption);
      box.appendChild(fig);
      frames.push({ canvas, caption, frame, panel: PANELS ? PANELS[t] : null });
    }
    const addButtons = (id, items, key, labels) => {
      const group = document.getElementById(id);
      items.forEach((item, k) => {
        const b = el("button", labels ? labels[k] : String(item));
        b.type = "button";
        b.dataset.value = String(item);
        b.addEventListener("click", () => { state[key] = item; render(); });
        group.appendChild(b);
      });
    };
    addButtons("variants", variants.map((_, k) => k), "variant", variants.map((v) => v.name));
    addButtons("views", viewNames, "view", viewNames.map((n) => (n === "query" ? "this query" : n)));
    addButtons("scales", ["linear", "log"], "scale", ["linear", `log (${DECADES} decades)`]);
    document.getElementById("smooth").addEventListener("click", () => {
      state.smooth = !state.smooth;
      render();
    });
    document.addEventListener("keydown", onKey);
  }

  function onPointer(event, t, press) {
    if (state.pinned && !press) return;
    const rect = event.currentTarget.getBoundingClientRect();
    const py = ((event.clientY - rect.top) / rect.height) * IMG_H;
    const px = ((event.clientX - rect.left) / rect.width) * IMG_W;
    const y = Math.min(H - 1, Math.max(0, Math.floor((py * H) / IMG_H)));
    const x = Math.min(W - 1, Math.max(0, Math.floor((px * W) / IMG_W)));
    const query = flatQuery(CLIP ? [t, y, x] : [y, x]);
    if (press && event.pointerType === "mouse") state.pinned = !state.pinned;
    if (press || query !== state.query) {
      state.query = query;
      state.pointer = [Math.floor(py), Math.floor(px)];
      render();
    }
  }
  function onKey(event) {
    const steps = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (event.key in steps) {
      const cell = unflat(state.query, Q);
      const d = cell.length - 2;
      cell[d] = Math.min(Q[d] - 1, Math.max(0, cell[d] + steps[event.key][0]));
      cell[d + 1] = Math.min(Q[d + 1] - 1, Math.max(0, cell[d + 1] + steps[event.key][1]));
      state.query = flatQuery(cell);
      state.pointer = null;
      event.preventDefault();
      render();
    } else if (/^[1-9]$/.test(event.key) && Number(event.key) <= variants.length) {
      state.variant = Number(event.key) - 1;
      render();
    } else if (event.key === "p") {
      state.pinned = !state.pinned;
      render();
    }
  }

  // ------------------------------------------------------------------ drawing
  // The map a layer shows: the selected query's row ("this query"), or the chosen
  // query-independent map; a layer without rows shows its first map in the query view.
  function mapOf(vi) {
    const v = variants[vi];
    const chosen = v.maps[state.view];
    if (state.view !== "query" && chosen) return { values: chosen.values, label: chosen.description };
    if (state.view === "query" && v.rows) {
      return { values: rowValues(vi, state.query, buffers[vi]), label: "attention of this query" };
    }
    const own = Object.keys(v.maps)[0];
    if (state.view === "query" && !v.rows && own) {
      return { values: v.maps[own].values, label: v.maps[own].description };
    }
    return null;
  }

  // The colour scale of a map: linear from min(0, its minimum) (signed maps, the dot
  // product, start at their minimum) to its maximum, or log over DECADES below |max|.
  function normaliser(vals) {
    let lo = Infinity;
    let hi = -Infinity;
    let top = 0;
    for (let j = 0; j < vals.length; j++) {
      lo = Math.min(lo, vals[j]);
      hi = Math.max(hi, vals[j]);
      top = Math.max(top, Math.abs(vals[j]));
    }
    if (state.scale === "log") {
      const floor = top * 10 ** -DECADES;
      return {
        lo: floor, hi: top, log: true,
        f: (v) => (top > 0 ? Math.max(0, 1 + Math.log10(Math.max(Math.abs(v), floor) / top) / DECADES) : 0),
      };
    }
    const low = Math.min(0, lo);
    const span = hi > low ? hi - low : 1;
    return { lo: low, hi: hi > low ? hi : low + 1, log: false, f: (v) => (v - low) / span };
  }

  function overlay(map, norm, keyFrame) {
    const off = document.createElement("canvas");
    off.width = KW;
    off.height = KH;
    const ctx = off.getContext("2d");
    const img = ctx.createImageData(KW, KH);
    const base = keyFrame * KH * KW;
    for (let j = 0; j < KH * KW; j++) {
      const t = Math.min(1, Math.max(0, norm.f(map[base + j])));
      const c = Math.round(t * 255);
      img.data[4 * j] = LUT[3 * c];
      img.data[4 * j + 1] = LUT[3 * c + 1];
      img.data[4 * j + 2] = LUT[3 * c + 2];
      img.data[4 * j + 3] = Math.round(255 * MAX_ALPHA * Math.sqrt(t));
    }
    ctx.putImageData(img, 0, 0);
    return off;
  }

  function drawFrames(maps, norms) {
    const cell = unflat(state.query, Q);
    const qt = CLIP ? cell[0] : 0;
    frames.forEach(({ canvas, caption, frame, panel }) => {
      const t = frame;
      const map = maps[panel === null ? 0 : panel];
      const norm = norms[panel === null ? 0 : panel];
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = !DATA.pixelated;
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(images[t], 0, 0, canvas.width, canvas.height);
      ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      const keyFrame = Math.floor(t / PT); // key frame k covers query frames [k PT, (k+1) PT)
      if (map && keyFrame < KT) {
        ctx.imageSmoothingEnabled = state.smooth;
        // pooled keys cover KH*PH of the H query rows (max-pooling drops the remainder)
        const w = (canvas.width * KW * PW) / W;
        const h = (canvas.height * KH * PH) / H;
        ctx.drawImage(overlay(map.values, norm, keyFrame), 0, 0, w, h);
      }
      if (t === qt) {
        const [py, px] = pixelOf(cell);
        const sx = canvas.width / IMG_W;
        const r = Math.max(6, (0.5 * canvas.width) / W, 6 * (window.devicePixelRatio || 1));
        ctx.strokeStyle = "#00e5ff";
        ctx.lineWidth = 2 * (window.devicePixelRatio || 1);
        ctx.beginPath();
        ctx.arc(px * sx, py * sx, r, 0, 2 * Math.PI);
        ctx.moveTo(px * sx - 1.6 * r, py * sx);
        ctx.lineTo(px * sx + 1.6 * r, py * sx);
        ctx.moveTo(px * sx, py * sx - 1.6 * r);
        ctx.lineTo(px * sx, py * sx + 1.6 * r);
        ctx.stroke();
      }
      if (CLIP) caption.textContent = t === qt ? `frame ${t} (the query's)` : `frame ${t}`;
      if (panel !== null) {
        const top = map ? ` (max ${fmt(norm.hi)})` : "";
        caption.textContent = `${variants[panel].name}: ${map ? map.label : "no map"}${top}`;
        caption.classList.toggle("current", panel === state.variant);
      }
    });
  }

  function drawColourbar(norm, label) {
    const canvas = document.querySelector("#colourbar canvas");
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      img.data.set([LUT[3 * i], LUT[3 * i + 1], LUT[3 * i + 2], 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    const mid = norm.log ? Math.sqrt(norm.lo * norm.hi) : (norm.lo + norm.hi) / 2;
    document.getElementById("cb-lo").textContent = norm.log ? `≤ ${fmt(norm.lo)}` : fmt(norm.lo);
    document.getElementById("cb-mid").textContent = fmt(mid);
    document.getElementById("cb-hi").textContent = fmt(norm.hi);
    document.getElementById("cb-label").textContent = norm.log
      ? `${label}: log scale, ${DECADES} decades below its maximum`
      : `${label}: linear scale, from ${fmt(norm.lo)} to its maximum`;
  }

  function row(table, cells, header) {
    const tr = el("tr");
    cells.forEach((c) => tr.appendChild(el(header ? "th" : "td", c)));
    table.appendChild(tr);
  }

  function drawPanel() {
    const panel = document.getElementById("panel");
    panel.replaceChildren();
    const v = variants[state.variant];
    const cell = unflat(state.query, Q);
    const [py, px] = state.pointer || pixelOf(cell).map(Math.floor);
    const add = (tag, text, cls) => panel.appendChild(el(tag, text, cls));
    add("h2", "query");
    const where = el("p");
    where.append(
      el("span", `pixel (${py}, ${px})`, "value"),
      ` of the ${IMG_H}×${IMG_W} ${CLIP ? "frames" : "image"}, in cell (${cell.join(", ")}) of the ` +
        `${Q.join("×")} query grid` + (CLIP ? ` (${DATA.axes.join(", ")})` : "") +
        (state.pinned ? " · pinned" : ""),
    );
    panel.appendChild(where);
    add("p", `keys: ${K.join("×")} grid (N′ = ${NK})` +
      (DATA.pooled ? `, pooled ${KERNEL.join("×")} from the query grid` : ""), "note");
    add("h2", `${v.name}`);
    add("p", v.label, "note");
    if (!v.rows) {
      add("p", "This layer's attention does not depend on the query: the same map for every " +
        "query, drawn above.", "note");
      return;
    }
    const ent = v.entropy[state.query];
    const dist = v.distance[state.query];
    const stats = el("table");
    row(stats, ["row entropy", `${fmt(ent)} of uniform`]);
    row(stats, ["distance to the mean map", `${fmt(dist)} (Jensen–Shannon)`]);
    panel.appendChild(stats);
    add("p", "Entropy 1: the query looks everywhere alike; 0: at one key. Distance 0: this " +
      "map is the average map; 1: it shares no key with it.", "note");
    add("h2", `top ${DATA.topK} keys`);
    const top = el("table");
    row(top, ["key cell", "at pixel", "weight"], true);
    for (let r = 0; r < DATA.topK; r++) {
      const j = v.top[state.query * DATA.topK + r];
      const key = unflat(j, K);
      const [ky, kx] = keyPixel(key).map(Math.floor);
      row(top, [`(${key.join(", ")})`, `(${ky}, ${kx})`, fmt(v.topWeight[state.query * DATA.topK + r])]);
    }
    panel.appendChild(top);
    add("h2", "whole image");
    const whole = el("table");
    row(whole, ["query dependence", `${fmt(v.summary.queryDependence)}`]);
    row(whole, ["mean row entropy", `${fmt(v.summary.meanEntropy)} of uniform`]);
    panel.appendChild(whole);
    add("p", "Query dependence: the mean Jensen–Shannon distance of every query's map to the " +
      "mean map. Near 0, every query looks at the same keys (GCNet's finding for many " +
      "trained blocks): one global map would do.", "note");
    add("p", `Maps are stored in 8 bits a key (${DATA.quantisation}); the numbers in this ` +
      "panel are exact.", "note");
  }

  function render() {
    // side by side, each panel on its own scale (its maximum in its caption): a
    // query-independent map then looks the same for every query
    const maps = PANELS ? variants.map((_, k) => mapOf(k)) : [mapOf(state.variant)];
    const norms = maps.map((m) => normaliser(m ? m.values : [0, 1]));
    drawFrames(maps, norms);
    const current = PANELS ? state.variant : 0;
    const label = PANELS
      ? `each panel on its own scale (its maximum in its caption); the bar is ${variants[current].name}'s`
      : maps[0] ? maps[0].label : "no map";
    drawColourbar(norms[current], label);
    drawPanel();
    const pressed = (id, val) => document.querySelectorAll(`#${id} button`).forEach((b) => {
      b.setAttribute("aria-pressed", String(b.dataset.value === String(val)));
    });
    pressed("variants", state.variant);
    pressed("views", state.view);
    pressed("scales", state.scale);
    document.getElementById("smooth").setAttribute("aria-pressed", String(state.smooth));
    document.body.dataset.query = unflat(state.query, Q).join(",");
  }

  async function start() {
    const inflated = new Map(); // one inflate per stored string
    for (const v of variants) {
      if (typeof v.rowsB64 !== "string") continue;
      if (!inflated.has(v.rowsB64)) inflated.set(v.rowsB64, await inflate(v.rowsB64));
      v.rows = inflated.get(v.rowsB64);
    }
    await Promise.all(images.map((img) => img.decode()));
    buildLayout();
    render();
    api.loadMs = performance.now();
    document.body.dataset.ready = "true";
  }

  const api = {
    grid: { queries: Q.slice(), keys: K.slice(), kernel: KERNEL.slice(), axes: DATA.axes.slice() },
    variants: variants.map((v) => v.name),
    quantisation: DATA.quantisation,
    /** The attention row the page draws for a query cell: N′ numbers, key grid row-major. */
    row(variant, ...coords) {
      const vi = variantIndex(variant);
      if (!variants[vi].rows) throw new Error(`${variants[vi].name} has no per-query rows`);
      return Array.from(rowValues(vi, flatQuery(coords), new Float64Array(NK)));
    },
    /** A layer's query-independent map (N′ numbers, key grid row-major), stored exactly. */
    map(variant, name) {
      const v = variants[variantIndex(variant)];
      if (!(name in v.maps)) {
        throw new Error(`${v.name} has no map ${name}; its maps: ${Object.keys(v.maps).join(", ")}`);
      }
      return Array.from(v.maps[name].values);
    },
    /** The names of a layer's query-independent maps. */
    maps(variant) {
      return Object.keys(variants[variantIndex(variant)].maps);
    },
    /** The layers drawn side by side, in order, or null. */
    panels: PANELS ? PANELS.map((k) => variants[k].name) : null,
    /** Select a query cell (and optionally a variant), as the pointer does. */
    select(coords, variant) {
      state.query = flatQuery(coords);
      if (variant !== undefined) state.variant = variantIndex(variant);
      state.pointer = null;
      render();
    },
    get selected() {
      return { variant: variants[state.variant].name, query: unflat(state.query, Q) };
    },
    loadMs: null,
  };
  api.ready = start().catch((err) => {
    document.querySelector("main").replaceChildren(el("p", `cannot show the explorer: ${err}`));
    document.querySelector("main").firstChild.id = "error";
    throw err;
  });
  window.nlref = api;
})();
