/*
 * scoreq-live call history.
 *
 * Two views of one page, chosen by the address' fragment so that a call can
 * be linked and the back button works:
 *  - "#since=1d&below=3&stream=NAME": recent calls (GET api/calls) as a
 *    sortable table, with a bar per call for its mean score, and "more";
 *  - "#call=ID": one call (GET api/calls/ID): a timeline chart of every
 *    stream with alert spans shaded, packet loss, and a card per stream.
 *
 * Plain JavaScript, no build step; charts are uPlot (vendor/, MIT). Colours
 * and formats follow the live panel (panel.js).
 */
(function () {
  "use strict";

  // --- settings --------------------------------------------------------------

  const PAGE_SIZE = 50;
  const SINCE = ["1h", "1d", "7d", "30d"];
  const DEFAULT_SINCE = "1d";

  const DEFAULT_BANDS = {
    nr: { good: 4.0, fair: 3.0, lower_is_better: false },
    ref: { good: null, fair: null, lower_is_better: true },
  };
  const REASONS = {
    silent: "silent",
    no_speech: "no speech",
    overloaded: "overloaded",
    error: "model error",
    stopped: "stopped",
  };

  // Colours used on the canvas; they match the CSS variables in panel.css.
  const COLOURS = {
    good: "#3fb950",
    fair: "#e3b341",
    poor: "#f85149",
    axis: "#8b949e",
    grid: "rgba(139, 148, 158, 0.14)",
    alert: "rgba(248, 81, 73, 0.10)",
    alertEdge: "rgba(248, 81, 73, 0.55)",
  };
  const BAND_FILL = {
    good: "rgba(63, 185, 80, 0.045)",
    fair: "rgba(227, 179, 65, 0.045)",
    poor: "rgba(248, 81, 73, 0.055)",
  };
  // One colour per stream of a call (none of them a band's colour).
  const STREAM_COLOURS = ["#58a6ff", "#d2a8ff", "#56d4dd", "#ffa657", "#f778ba", "#a5d6ff", "#c9d1d9"];

  // --- the page URL: the token is passed on to the API and the other page ------

  const token = new URLSearchParams(window.location.search).get("token");
  const withToken = (href) => {
    const url = new URL(href, window.location.href);
    if (token) url.searchParams.set("token", token);
    return url.pathname + url.search;
  };
  document.getElementById("nav-live").href = withToken("./");
  document.getElementById("nav-history").href = withToken("history");

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** GET a JSON document of the API, relative to this page, with the page's token. */
  async function api(path, query) {
    const url = new URL(path, window.location.href);
    url.search = "";
    url.hash = "";
    for (const [k, v] of Object.entries(query || {})) {
      if (v != null && v !== "") url.searchParams.set(k, String(v));
    }
    if (token) url.searchParams.set("token", token);
    let r;
    try {
      r = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    } catch (e) {
      throw new ApiError(0, "cannot reach the server");
    }
    const text = await r.text().catch(() => "");
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (r.status === 401) throw new ApiError(401, "token refused: open the page with ?token=…");
    if (!r.ok) {
      const why = body && typeof body === "object" && body.error ? String(body.error) : text.trim();
      throw new ApiError(r.status, why || `the server answered ${r.status}`);
    }
    if (!body || typeof body !== "object") throw new ApiError(r.status, "the server's answer is not JSON");
    return body;
  }

  // --- formats -------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);
  const pad2 = (n) => String(n).padStart(2, "0");

  /** Bands as the live panel reads them: one limit given is two bands; none: the mode's defaults. */
  function readBands(b, mode) {
    const defaults = DEFAULT_BANDS[mode === "ref" ? "ref" : "nr"];
    const given = b && typeof b === "object" && (num(b.good) != null || num(b.fair) != null);
    const src = given ? b : defaults;
    const good = num(src.good);
    const fair = num(src.fair);
    return {
      good: good ?? fair,
      fair: fair ?? good,
      lower_is_better: b && b.lower_is_better != null ? Boolean(b.lower_is_better) : defaults.lower_is_better,
    };
  }

  function band(v, bands) {
    if (v == null || bands.good == null) return "none";
    if (bands.lower_is_better) return v <= bands.good ? "good" : v <= bands.fair ? "fair" : "poor";
    return v >= bands.good ? "good" : v >= bands.fair ? "fair" : "poor";
  }

  const fmtScore = (v, mode) => (num(v) == null ? "–" : mode === "ref" ? v.toFixed(3) : v.toFixed(2));
  const fmtPct = (v, digits = 1) => (num(v) == null ? "–" : `${v.toFixed(digits)} %`);
  const scoreUnit = (mode) => (mode === "ref" ? "distance" : "MOS");
  const modeText = (mode) => (mode === "ref" ? "ref · distance, lower is better" : "nr · MOS 1–5");

  /** Seconds as m:ss or h:mm:ss. */
  function fmtSpan(t) {
    if (num(t) == null) return "–";
    const s = Math.max(0, Math.round(t));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return h ? `${h}:${pad2(m)}:${pad2(s % 60)}` : `${m}:${pad2(s % 60)}`;
  }

  /** A duration in words a person reads at a glance: 45 s, 3 min 20 s, 1 h 05 min. */
  function fmtDuration(t) {
    if (num(t) == null) return "–";
    const s = Math.max(0, Math.round(t));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad2(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${pad2(Math.floor((s % 3600) / 60))} min`;
  }

  /** A Unix time as local date and time, YYYY-MM-DD HH:MM:SS (24 h). */
  function fmtWhen(ts, seconds = true) {
    if (num(ts) == null) return "–";
    const d = new Date(ts * 1000);
    const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
    const time = `${pad2(d.getHours())}:${pad2(d.getMinutes())}` + (seconds ? `:${pad2(d.getSeconds())}` : "");
    return `${date} ${time}`;
  }

  function fmtClock(ts) {
    if (num(ts) == null) return "–";
    const d = new Date(ts * 1000);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  /** A call's people: its `who`, else its streams' names. */
  function whoOf(call) {
    if (call.who) return String(call.who);
    const names = (call.streams || []).map((s) => s.stream).filter(Boolean);
    return names.length ? names.join(" ↔ ") : String(call.key || call.id);
  }

  /** A new element: h("span", {className: "x", title: "y"}, "text", child...). */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null) continue;
      if (k === "dataset") Object.assign(el.dataset, v);
      else if (k in el && typeof v !== "string") el[k] = v;
      else if (k === "className" || k === "textContent" || k === "title" || k === "href") el[k] = v;
      else el.setAttribute(k, v);
    }
    for (const c of children) {
      if (c == null || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  // --- the page's state, from its address' fragment ------------------------------

  function route() {
    const q = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (q.get("call")) return { view: "call", id: q.get("call") };
    const since = SINCE.includes(q.get("since")) ? q.get("since") : DEFAULT_SINCE;
    const filters = { since, below: "", above: "", stream: q.get("stream") || "" };
    for (const k of ["below", "above"]) {
      const v = (q.get(k) || "").trim();
      if (v !== "" && Number.isFinite(Number(v))) filters[k] = v;
    }
    return { view: "list", filters };
  }

  function listHash(f) {
    const q = new URLSearchParams();
    q.set("since", f.since);
    if (f.below !== "") q.set("below", f.below);
    if (f.above !== "") q.set("above", f.above);
    if (f.stream) q.set("stream", f.stream);
    return "#" + q.toString();
  }

  const callHash = (id) => "#" + new URLSearchParams({ call: id }).toString();

  const list = {
    key: null,           // the filters the rows are for (their hash)
    filters: null,
    rows: [],            // CALL_ROWs, in the order the server sent them
    total: 0,
    mode: "nr",
    bands: readBands(null, "nr"),
    sort: { key: "started", dir: -1 },
    loading: false,
    loaded: false,       // an answer came: mode and bands are the server's
    scrollY: 0,
    error: "",
  };
  let seq = 0;           // answers to older requests are dropped
  let fromList = false;  // the call view was opened from the list: "back" goes back
  let current = null;    // the call view's charts, for resizing and tearing down

  function setNotice(text, kind) {
    const n = $("notice");
    n.hidden = !text;
    n.textContent = text || "";
    n.dataset.kind = kind || "error";
  }

  function show() {
    const r = route();
    document.body.dataset.view = r.view;
    $("list-view").hidden = r.view !== "list";
    $("call-view").hidden = r.view !== "call";
    if (r.view === "list") {
      destroyCall();
      document.title = "scoreq-live · history";
      const key = listHash(r.filters);
      fillForm(r.filters);
      if (key !== list.key || list.error) loadList(r.filters, key, false);
      else {
        setNotice("");
        drawList();
        window.scrollTo(0, list.scrollY);
      }
    } else {
      loadCall(r.id);
    }
  }

  window.addEventListener("hashchange", (e) => {
    const was = new URL(e.oldURL).hash;
    if (route().view === "call" && !/[#&]call=/.test(was)) {
      fromList = true;
      list.scrollY = window.scrollY;
    } else if (route().view === "list") fromList = false;
    show();
  });

  // --- the list of calls ----------------------------------------------------------------

  function fillForm(f) {
    $("f-since").value = f.since;
    const cmp = f.above !== "" ? "above" : f.below !== "" ? "below" : list.bands.lower_is_better ? "above" : "below";
    $("f-cmp").value = cmp;
    $("f-score").value = f[cmp] || "";
    $("f-stream").value = f.stream;
  }

  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    const score = $("f-score").value.trim();
    const cmp = $("f-cmp").value === "above" ? "above" : "below";
    const f = { since: $("f-since").value, below: "", above: "", stream: $("f-stream").value.trim() };
    if (score !== "" && Number.isFinite(Number(score))) f[cmp] = score;
    const hash = listHash(f);
    if (hash === window.location.hash) loadList(f, hash, false); // the same again: reload
    else window.location.hash = hash;
  });
  $("f-since").addEventListener("change", () => $("filters").requestSubmit());
  $("f-clear").addEventListener("click", () => {
    window.location.hash = listHash({ since: DEFAULT_SINCE, below: "", above: "", stream: "" });
  });
  $("more").addEventListener("click", () => loadList(list.filters, list.key, true));

  async function loadList(filters, key, more) {
    const my = ++seq;
    list.loading = true;
    document.body.dataset.state = "loading";
    $("more").disabled = true;
    if (!more) setNotice("");
    setText($("list-count"), "loading…");
    const offset = more ? list.rows.length : 0;
    const query = { ...filters, limit: PAGE_SIZE, offset };
    try {
      const body = await api("api/calls", query);
      if (my !== seq) return;
      const rows = Array.isArray(body.calls) ? body.calls.filter((c) => c && c.id != null) : [];
      if (!more) list.rows = [];
      // New calls arriving between pages shift the offset: a call seen already is not listed twice.
      const seen = new Set(list.rows.map((c) => String(c.id)));
      for (const c of rows) if (!seen.has(String(c.id))) list.rows.push(c);
      list.total = num(body.total) ?? list.rows.length;
      list.mode = body.mode === "ref" ? "ref" : "nr";
      list.bands = readBands(body.bands, list.mode);
      list.key = key;
      list.filters = filters;
      list.error = "";
      list.loaded = true;
      list.more = rows.length > 0 && offset + rows.length < list.total;
      document.body.dataset.state = "ready";
      if (!more && !filters.below && !filters.above) fillForm(filters); // the mode may choose below/above
      drawList();
      if (!more) window.scrollTo(0, 0);
    } catch (e) {
      if (my !== seq) return;
      list.error = e.message;
      list.key = key;
      list.filters = filters;
      document.body.dataset.state = "error";
      setNotice(e.message);
      if (!more) {
        list.rows = [];
        list.total = 0;
        list.more = false;
        drawList();
      }
      $("more").disabled = false;
    } finally {
      if (my === seq) list.loading = false;
    }
  }

  function sortValue(c, key) {
    if (key === "who") return whoOf(c).toLowerCase();
    return num(c[key]);
  }

  function sortedRows() {
    const { key, dir } = list.sort;
    const rows = list.rows.map((c, i) => [c, i]);
    rows.sort(([a, ia], [b, ib]) => {
      const va = sortValue(a, key);
      const vb = sortValue(b, key);
      if (va == null || vb == null) return va == null && vb == null ? ia - ib : va == null ? 1 : -1; // none: last
      if (va === vb) return ia - ib;
      return (typeof va === "string" ? va.localeCompare(vb) : va - vb) * dir;
    });
    return rows.map(([c]) => c);
  }

  // A header clicked: sort by it; clicked again: the other way. The first way is the useful one.
  document.querySelector("#calls thead").addEventListener("click", (e) => {
    const th = e.target.closest("th[data-sort]");
    if (!th) return;
    const key = th.dataset.sort;
    if (list.sort.key === key) list.sort.dir = -list.sort.dir;
    else {
      const worstFirst = list.bands.lower_is_better ? -1 : 1;
      list.sort = { key, dir: key === "who" ? 1 : key === "mean" || key === "min" ? worstFirst : -1 };
    }
    drawList();
  });

  /** The bar's length, 0..1: longer is better, whichever way the score runs. */
  function barShare(v, mode, bands, top) {
    if (num(v) == null) return 0;
    const x = mode === "ref" ? 1 - v / top : (v - 1) / 4;
    return Math.max(0.02, Math.min(1, x));
  }

  function drawList() {
    const rows = sortedRows();
    for (const th of document.querySelectorAll("#calls th[data-sort]")) {
      if (th.dataset.sort === list.sort.key) th.setAttribute("aria-sort", list.sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    // Distances have no fixed scale: the bars of a ref list run up to the poor limit's double, or the worst call.
    let top = 1;
    if (list.mode === "ref") {
      const worst = Math.max(0, ...list.rows.map((c) => num(c.mean) ?? 0));
      top = Math.max(list.bands.fair != null ? 2 * list.bands.fair : 0, worst * 1.1) || 1;
    }
    $("calls-body").replaceChildren(...rows.map((c) => callRow(c, top)));
    $("list-empty").hidden = list.rows.length > 0 || !!list.error;
    document.querySelector(".list-view .table-wrap").hidden = !list.rows.length && !!list.error;
    drawSummary();
    $("more").hidden = !list.more;
    $("more").disabled = false;
  }

  function drawSummary() {
    setText($("meta-mode"), list.loaded ? modeText(list.mode) : "mode –");
    const n = list.rows.length;
    const text = list.error ? "" : `${n} of ${list.total} call${list.total === 1 ? "" : "s"}`;
    setText($("list-count"), text);
    setText($("summary"), text);
  }

  function callRow(c, top) {
    const mode = c.mode === "ref" ? "ref" : c.mode === "nr" ? "nr" : list.mode;
    const bands = mode === list.mode ? list.bands : readBands(null, mode);
    const mean = num(c.mean);
    const meanBand = band(mean, bands);
    const names = (c.streams || []).map((s) => s.stream).filter(Boolean);
    const who = whoOf(c);
    const link = h("a", { href: callHash(String(c.id)), className: "call-link" }, who);
    const whoCell = h("td", { className: "who" }, link);
    if (c.who && names.length) whoCell.append(h("span", { className: "streams" }, names.join(" ↔ ")));
    whoCell.title = [who, ...(c.who ? names : []), c.key ? `key ${c.key}` : ""].filter(Boolean).join("\n");

    const bar = h("span", { className: "bar", "aria-hidden": "true" },
      h("span", { className: "bar-fill", dataset: { band: meanBand } }));
    bar.firstChild.style.width = `${(barShare(mean, mode, bands, top) * 100).toFixed(1)}%`;
    const scoreCell = h("td", { className: "score-col" },
      h("span", { className: "score-cell" },
        h("span", { className: "score", dataset: { band: meanBand } }, fmtScore(mean, mode)), bar));
    if (num(c.worst_mean) != null && (c.streams || []).length > 1) {
      scoreCell.title = `all scored windows: ${fmtScore(mean, mode)} ${scoreUnit(mode)}\n` +
        `worst stream: ${fmtScore(c.worst_mean, mode)}`;
    }
    const min = num(c.min);
    const alerts = num(c.alerts) ?? 0;
    const alertCell = h("td", { className: "num alerts-cell", dataset: { alerts: alerts ? "yes" : "no" } },
      alerts ? `${alerts}` : "–");
    if (alerts && num(c.alert_s) != null) alertCell.append(h("span", { className: "sub" }, ` ${fmtSpan(c.alert_s)}`));

    const tr = h("tr", { dataset: { call: String(c.id), band: meanBand } },
      h("td", { className: "when", title: fmtWhen(c.started) + (c.ended ? ` – ${fmtClock(c.ended)}` : "") },
        fmtWhen(c.started, false)),
      whoCell,
      h("td", { className: "num" }, fmtSpan(c.duration_s)),
      scoreCell,
      h("td", { className: "num", dataset: { band: band(min, bands) } }, fmtScore(min, mode)),
      h("td", { className: "num" }, num(c.loss_pct) == null ? "–" : fmtPct(c.loss_pct)),
      alertCell);
    tr.dataset.mean = mean == null ? "" : String(mean);
    return tr;
  }

  // A click anywhere on a row opens its call (the name is a link too, for the keyboard and new tabs).
  $("calls-body").addEventListener("click", (e) => {
    if (e.target.closest("a")) return;
    const tr = e.target.closest("tr[data-call]");
    if (tr && !window.getSelection().toString()) window.location.hash = callHash(tr.dataset.call);
  });

  // --- one call -------------------------------------------------------------------------------

  $("back").addEventListener("click", (e) => {
    if (fromList) {
      e.preventDefault();
      window.history.back();
    }
  });

  function destroyCall() {
    if (!current) return;
    for (const u of current.charts) u.destroy();
    current.sizes.disconnect();
    current = null;
  }

  async function loadCall(id) {
    const my = ++seq;
    destroyCall();
    document.body.dataset.state = "loading";
    setNotice("");
    $("back").href = list.key || listHash({ since: DEFAULT_SINCE, below: "", above: "", stream: "" });
    setText($("call-who"), "loading…");
    $("call-meta").replaceChildren();
    $("stream-cards").replaceChildren();
    $("call-chart").replaceChildren();
    $("loss-chart").replaceChildren();
    $("loss-block").hidden = true;
    window.scrollTo(0, 0);
    try {
      const body = await api(`api/calls/${encodeURIComponent(id)}`);
      if (my !== seq) return;
      if (!body.call || typeof body.call !== "object") throw new ApiError(200, "the server's answer has no call");
      document.body.dataset.state = "ready";
      drawCall(body);
    } catch (e) {
      if (my !== seq) return;
      document.body.dataset.state = "error";
      setText($("call-who"), "");
      let text = e.message;
      if (e.status === 404) {
        // The store's own "no such call" (or "no call 'ID'") says no more; anything else (no store) is shown.
        text = !e.message || /^no (such call|call ['"])/i.test(e.message) ? "no such call" : `no such call (${e.message})`;
      }
      setNotice(text);
    }
  }

  function drawCall(body) {
    const call = body.call;
    const mode = call.mode === "ref" ? "ref" : "nr";
    const bands = readBands(body.bands, mode);
    const streams = (Array.isArray(body.streams) ? body.streams : []).filter((s) => s && typeof s === "object");
    const who = whoOf(call);
    document.title = `${who} · scoreq-live`;
    setText($("call-who"), who);
    setText($("meta-mode"), modeText(mode));
    setText($("summary"), fmtWhen(call.started));
    setText($("chart-unit"), scoreUnit(mode));

    const mean = num(call.mean);
    const alerts = num(call.alerts) ?? 0;
    const chip = (text, cls, title) => h("span", { className: `chip ${cls || ""}`.trim(), title }, text);
    $("call-meta").replaceChildren(
      chip(`${fmtWhen(call.started)} – ${fmtClock(call.ended)}`, "", "start and end, local time"),
      chip(fmtDuration(call.duration_s), "", "duration"),
      h("span", { className: "chip score-chip", dataset: { band: band(mean, bands) },
        title: "mean of all the call's scored windows" }, `mean ${fmtScore(mean, mode)} ${scoreUnit(mode)}`),
      chip(alerts ? `${alerts} alert${alerts === 1 ? "" : "s"} · ${fmtSpan(call.alert_s)}` : "no alerts",
        alerts ? "alerting" : "muted", "alerts raised during the call, and how long they lasted"),
      call.key ? chip(`key ${call.key}`, "muted mono", "the call's key") : null,
      call.model ? chip(call.model, "muted", "model") : null,
    );

    // Each stream's offset on the call's time axis, and its colour.
    const t0 = num(call.started) ?? Math.min(...streams.map((s) => num(s.started) ?? Infinity));
    const legs = streams.map((s, i) => ({
      s,
      off: Math.max(0, (num(s.started) ?? t0) - t0),
      colour: STREAM_COLOURS[i % STREAM_COLOURS.length],
      label: s.stream || s.id || `stream ${i + 1}`,
    }));
    const end = Math.max(num(call.duration_s) ?? 0,
      ...legs.map((l) => l.off + (num(l.s.duration_s) ?? lastOf(l.s.timeline && l.s.timeline.t_end) ?? 0)));

    current = { charts: [], sizes: new ResizeObserver(resizeCharts), legs, end, bands, mode };
    if (!legs.length) {
      $("call-chart").replaceChildren(h("p", { className: "empty" }, "No streams recorded for this call."));
      return;
    }
    const score = joinSeries(legs, "value");
    const scoreChart = makeChart($("call-chart"), score, { kind: "score", legs, end, bands, mode });
    current.charts.push(scoreChart);
    const loss = joinSeries(legs, "loss_pct");
    if (loss.any) {
      $("loss-block").hidden = false;
      current.charts.push(makeChart($("loss-chart"), loss, { kind: "loss", legs, end, bands, mode }));
    }
    current.sizes.observe($("call-chart"));
    current.sizes.observe($("loss-chart"));

    $("stream-cards").replaceChildren(...legs.map((l) => streamCard(l, mode, bands)));
  }

  const lastOf = (a) => (Array.isArray(a) && a.length ? num(a[a.length - 1]) : null);

  /**
   * One x axis (seconds since the call started, at each window's end) for all
   * streams, one column per stream: a value, null where the window was not
   * scored or windows are missing (a gap), undefined where the stream has no
   * window at that time (uPlot draws across).
   */
  function joinSeries(legs, field) {
    const cols = legs.map((l) => {
      const tl = l.s.timeline || {};
      const ts = Array.isArray(tl.t_end) ? tl.t_end : [];
      const vs = Array.isArray(tl[field]) ? tl[field] : [];
      const hop = num(l.s.hop_s) ?? medianStep(ts) ?? 1;
      const pts = [];
      let prev = null;
      for (let i = 0; i < ts.length; i++) {
        const t = num(ts[i]);
        if (t == null) continue;
        if (prev != null && t - prev > 2.5 * hop) pts.push([l.off + prev + hop, null]); // lost windows
        pts.push([l.off + t, num(vs[i])]);
        prev = t;
      }
      return pts;
    });
    const key = (x) => Math.round(x * 1000);
    const xs = [...new Set(cols.flatMap((pts) => pts.map(([x]) => key(x))))].sort((a, b) => a - b);
    const index = new Map(xs.map((k, i) => [k, i]));
    const data = [xs.map((k) => k / 1000)];
    let any = false;
    let max = -Infinity;
    for (const pts of cols) {
      const col = new Array(xs.length).fill(undefined);
      for (const [x, v] of pts) {
        col[index.get(key(x))] = v;
        if (v != null) {
          any = true;
          if (v > max) max = v;
        }
      }
      data.push(col);
    }
    return { data, any, max, points: cols.reduce((n, pts) => n + pts.filter(([, v]) => v != null).length, 0) };
  }

  function medianStep(ts) {
    const d = [];
    for (let i = 1; i < ts.length; i++) if (num(ts[i]) != null && num(ts[i - 1]) != null) d.push(ts[i] - ts[i - 1]);
    if (!d.length) return null;
    d.sort((a, b) => a - b);
    return d[Math.floor(d.length / 2)] || null;
  }

  // --- charts -----------------------------------------------------------------------------

  function yBand(u, lo, hi) {
    const top = u.valToPos(hi, "y", true);
    const bottom = u.valToPos(lo, "y", true);
    const y0 = Math.max(u.bbox.top, Math.min(top, bottom));
    const y1 = Math.min(u.bbox.top + u.bbox.height, Math.max(top, bottom));
    return [y0, Math.max(0, y1 - y0)];
  }

  /** Faint good/fair/poor zones behind the lines, as on the live panel. */
  function drawZones(u, b) {
    if (b.good == null) return;
    const ctx = u.ctx;
    const { left, width } = u.bbox;
    const ymin = u.scales.y.min;
    const ymax = u.scales.y.max;
    const zones = b.lower_is_better
      ? [["good", ymin, b.good], ["fair", b.good, b.fair], ["poor", b.fair, ymax]]
      : [["poor", ymin, b.fair], ["fair", b.fair, b.good], ["good", b.good, ymax]];
    ctx.save();
    for (const [name, lo, hi] of zones) {
      if (hi <= lo) continue;
      const [y, hgt] = yBand(u, lo, hi);
      ctx.fillStyle = BAND_FILL[name];
      ctx.fillRect(left, y, width, hgt);
    }
    ctx.restore();
  }

  /** Every stream's alerts as [stream index, from, to] on the call's time axis; never cleared: to the end. */
  function alertSpans(legs, end) {
    const out = [];
    legs.forEach((l, i) => {
      for (const a of Array.isArray(l.s.alerts) ? l.s.alerts : []) {
        const from = num(a && a.t_raised);
        if (from == null) continue;
        out.push([i, l.off + from, num(a.t_cleared) == null ? end : l.off + a.t_cleared]);
      }
    });
    return out;
  }

  /**
   * Alert spans: shaded over the whole plot under the lines (shade), then an
   * edge where each began and a bar in the stream's colour along the top, one
   * row per stream, to say whose alert it is (marks).
   */
  function drawAlertSpans(u, legs, spans, marks) {
    const ctx = u.ctx;
    const { top, height } = u.bbox;
    const xmin = u.scales.x.min;
    const xmax = u.scales.x.max;
    const dpr = window.devicePixelRatio || 1;
    ctx.save();
    for (const [i, from, to] of spans) {
      const x0v = Math.max(from, xmin);
      const x1v = Math.min(to, xmax);
      if (x1v < x0v) continue;
      const x0 = u.valToPos(x0v, "x", true);
      const w = Math.max(2 * dpr, u.valToPos(x1v, "x", true) - x0);
      if (!marks) {
        ctx.fillStyle = COLOURS.alert;
        ctx.fillRect(x0, top, w, height);
        continue;
      }
      ctx.fillStyle = COLOURS.alertEdge;
      if (from >= xmin) ctx.fillRect(x0, top, dpr, height);
      ctx.fillStyle = legs[i].colour;
      ctx.fillRect(x0, top + i * 4 * dpr, w, 3 * dpr);
    }
    ctx.restore();
  }

  const narrow = () => window.matchMedia("(max-width: 600px)").matches;
  const chartHeight = (kind) => (kind === "loss" ? 110 : narrow() ? 220 : 280);

  const xIncrs = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400];

  function makeChart(el, joined, o) {
    const { kind, legs, end, bands, mode } = o;
    const spans = alertSpans(legs, end);
    const xs = joined.data[0];
    const axis = {
      stroke: COLOURS.axis,
      font: "11px system-ui, sans-serif",
      grid: { stroke: COLOURS.grid, width: 1 },
      ticks: { show: false },
      gap: 4,
    };
    const fmt = kind === "loss" ? (v) => (v == null ? "–" : `${v.toFixed(1)} %`) : (v) => fmtScore(v, mode);
    let y;
    if (kind === "loss") y = { range: (u, lo, hi) => [0, Math.max(5, Number.isFinite(joined.max) ? joined.max * 1.15 : 0)] };
    else if (mode === "ref") {
      const dtop = Number.isFinite(joined.max) ? joined.max * 1.1 : 0;
      y = { range: () => [0, Math.max(bands.fair != null ? bands.fair * 1.5 : 0, dtop) || 1] };
    } else y = { range: [1, 5] };
    const opts = {
      width: chartWidth(el),
      height: chartHeight(kind),
      padding: [kind === "score" ? 6 + 4 * legs.length : 8, 14, 0, 0],
      legend: { show: true, live: true },
      cursor: { sync: { key: "call" }, drag: { x: true, y: false }, points: { size: 6 } },
      scales: {
        // The whole call from 0 when ranged on the data (first drawn, double-click); a zoom as dragged.
        x: { time: false, range: (u, lo, hi) => (lo === xs[0] && hi === xs[xs.length - 1]
          ? [Math.min(0, lo ?? 0), Math.max(end, hi ?? 0, 1)] : [lo, hi]) },
        y,
      },
      axes: [
        { ...axis, incrs: xIncrs, space: 60, size: 22, values: (u, vals) => vals.map(fmtSpan) },
        {
          ...axis,
          size: 40,
          space: kind === "loss" ? 14 : 22,
          incrs: kind === "loss" ? [1, 2, 5, 10, 20, 25, 50] : mode === "ref"
            ? [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100] : [0.5, 1],
          values: (u, vals) => vals.map((v) => (v === u.scales.y.min && kind !== "loss" ? "" : String(+v.toFixed(2)))),
        },
      ],
      series: [
        { label: "call time", value: (u, v) => (v == null ? "–" : fmtSpan(v)) },
        ...legs.map((l) => ({
          label: l.label,
          stroke: l.colour,
          width: kind === "loss" ? 1.25 : 1.75,
          fill: kind === "loss" ? l.colour + "22" : undefined,
          spanGaps: false,
          gaps: ownGaps,
          value: (u, v) => fmt(v),
          points: { size: 5, fill: l.colour, filter: isolatedPoints },
        })),
      ],
      hooks: {
        drawClear: [(u) => {
          if (kind === "score") drawZones(u, bands);
          drawAlertSpans(u, legs, spans, false);
        }],
        draw: [(u) => kind === "score" && drawAlertSpans(u, legs, spans, true)],
        setScale: [(u, key) => key === "x" && zoomOthers(u)],
      },
    };
    const u = new uPlot(opts, joined.data, el);
    el.dataset.points = String(joined.points);
    return u;
  }

  /**
   * A stream's gaps in canvas pixels, from its own window before a run of
   * nulls to its own window after it. uPlot's own gaps end at the neighbouring
   * x of the shared axis, which may be another stream's window: the line would
   * be drawn across most of the hole.
   */
  function ownGaps(u, si) {
    const xs = u.data[0];
    const ys = u.data[si];
    const px = (i) => Math.round(u.valToPos(xs[i], "x", true));
    const gaps = [];
    let last = -1;     // the stream's latest scored window
    let from = null;   // where the open gap began
    let lastNull = -1;
    for (let i = 0; i < ys.length; i++) {
      const v = ys[i];
      if (v === undefined) continue;
      if (v === null) {
        if (from == null) from = px(last >= 0 ? last : i);
        lastNull = i;
      } else {
        if (from != null) gaps.push([from, px(i)]);
        from = null;
        last = i;
      }
    }
    if (from != null) gaps.push([from, px(lastNull)]);
    return gaps;
  }

  /** A zoom on one chart of the call zooms the other too. */
  function zoomOthers(u) {
    if (!current) return;
    const { min, max } = u.scales.x;
    for (const other of current.charts) {
      if (other !== u && (other.scales.x.min !== min || other.scales.x.max !== max)) {
        other.setScale("x", { min, max });
      }
    }
  }

  /** Indices of windows that stand alone between gaps, drawn as points: a line needs two. */
  function isolatedPoints(u, si, show) {
    if (show) return null; // every point is drawn anyway
    const d = u.data[si];
    const out = [];
    let prev = null; // the previous window's value (undefined entries are other streams' times)
    for (let i = 0; i < d.length; i++) {
      if (d[i] === undefined) continue;
      if (d[i] !== null && prev === null) {
        let j = i + 1;
        while (j < d.length && d[j] === undefined) j++;
        if (j >= d.length || d[j] === null) out.push(i);
      }
      prev = d[i];
    }
    return out.length ? out : null;
  }

  const chartWidth = (el) => Math.max(200, Math.floor(el.clientWidth));

  /** Charts follow their box's width; the legend below sets its height. */
  function resizeCharts() {
    if (!current) return;
    for (const [u, el, kind] of [[current.charts[0], $("call-chart"), "score"], [current.charts[1], $("loss-chart"), "loss"]]) {
      if (!u) continue;
      const size = { width: chartWidth(el), height: chartHeight(kind) };
      if (size.width !== u.width || size.height !== u.height) u.setSize(size);
    }
  }

  // --- a stream's card ----------------------------------------------------------------------

  function streamCard(l, mode, bands) {
    const s = l.s;
    const sc = s.score && typeof s.score === "object" ? s.score : null;
    const smode = s.mode === "ref" || s.mode === "nr" ? s.mode : mode;
    const unit = sc && sc.name ? (sc.name === "mos" ? "MOS" : sc.name) : scoreUnit(smode);
    const mean = sc ? num(sc.mean) : null;
    const meanBand = band(mean, bands);
    const f = (v) => fmtScore(num(v), smode);

    const stat = (label, v, title) => h("div", { className: "stat", title },
      h("span", { className: "stat-value", dataset: { band: band(num(v), bands) } }, f(v)),
      h("span", { className: "stat-label" }, label));

    const head = h("header", { className: "card-head" },
      h("span", { className: "swatch", "aria-hidden": "true" }),
      h("h3", { className: "card-name", title: l.label }, l.label),
      s.source ? h("span", { className: "state-pill" }, s.source) : null);
    head.querySelector(".swatch").style.background = l.colour;

    const metaText = Object.entries(s.meta && typeof s.meta === "object" ? s.meta : {})
      .map(([k, v]) => `${k}=${v}`).join(" · ");
    const sub = h("div", { className: "card-sub" },
      h("span", { className: "card-detail", title: s.detail || "" }, h("bdi", { dir: "ltr" }, s.detail || "")),
      h("span", { className: "card-info" },
        `from ${fmtSpan(l.off)} · ${fmtDuration(s.duration_s)}` + (s.reason ? ` · ended: ${s.reason}` : "")));
    const meta = metaText ? h("div", { className: "card-meta", title: metaText }, metaText) : null;

    // Audio: the score's numbers, worst span, time in each band, windows.
    const audio = h("div", { className: "audio" });
    if (sc) {
      audio.append(h("div", { className: "scores" },
        h("div", { className: "score-main" },
          h("span", { className: "score-value", dataset: { band: meanBand } }, f(sc.mean)),
          h("span", { className: "score-label" }, "mean ", h("span", { className: "unit" }, unit))),
        h("div", { className: "stats" }, ...(bands.lower_is_better ? [
          stat("p90", sc.p90, "10 % of the windows were further than this"),
          stat("max", sc.max, "the furthest window"),
          stat("p10", sc.p10, "10th percentile of the windows"),
          stat("min", sc.min, "the closest window"),
        ] : [
          stat("p10", sc.p10, "10 % of the windows scored below this"),
          stat("min", sc.min, "the lowest window"),
          stat("p90", sc.p90, "90th percentile of the windows"),
          stat("max", sc.max, "the highest window"),
        ]))));
      const w = sc.worst && typeof sc.worst === "object" ? sc.worst : null;
      if (w && num(w.mean) != null) {
        const len = num(w.t_end) != null && num(w.t_start) != null ? w.t_end - w.t_start : null;
        audio.append(h("div", { className: "line worst", title: "the stretch with the worst mean, in the stream's time" },
          h("span", { className: "line-label" }, `worst ${len == null ? "" : `${Math.round(len)} s`}`),
          h("span", { className: "score", dataset: { band: band(num(w.mean), bands) } }, f(w.mean)),
          h("span", { className: "muted" }, ` at ${fmtSpan(w.t_start)}–${fmtSpan(w.t_end)}`)));
      }
    } else {
      audio.append(h("p", { className: "no-score" }, "no window scored"));
    }
    audio.append(bandShares(s.bands));
    const skipped = Object.entries(s.skipped && typeof s.skipped === "object" ? s.skipped : {})
      .filter(([, n]) => num(n)).map(([k, n]) => `${REASONS[k] || k.replace(/_/g, " ")} ${n}`);
    audio.append(h("div", { className: "line windows" },
      h("span", { className: "line-label" }, "windows"),
      `${num(s.scored) ?? "–"} scored of ${num(s.windows) ?? "–"}`));
    if (skipped.length) {
      audio.append(h("div", { className: "line skipped", title: "windows not scored, by reason" },
        h("span", { className: "line-label" }, "skipped"), skipped.join(" · ")));
    }

    const parts = [audio];
    const n = s.net && typeof s.net === "object" ? s.net : null;
    if (n) parts.push(netBlock(n));

    const alerts = Array.isArray(s.alerts) ? s.alerts : [];
    const alertList = alerts.length ? h("ul", { className: "card-alert-list" }, ...alerts.map((a) => h("li", null,
      h("span", { className: "alert-rule" }, a.rule || a.metric || "alert"),
      h("span", { className: "alert-meta" }, ` ${fmtSpan(a.t_raised)} → ` +
        (num(a.t_cleared) == null ? "end" : fmtSpan(a.t_cleared)) +
        (num(a.duration_s) != null ? ` (${fmtDuration(a.duration_s)})` : ""))))) : null;

    const card = h("article", { className: "card stream-card", dataset: { band: meanBand, stream: l.label,
      alert: alerts.length ? "yes" : "no" } },
      head, sub, meta, h("div", { className: "card-body" }, ...parts), alertList);
    return card;
  }

  function bandShares(b) {
    const wrap = h("div", { className: "line shares", title: "share of the stream's scored time in each band" },
      h("span", { className: "line-label" }, "time"));
    if (!b || typeof b !== "object" || !["good", "fair", "poor"].some((k) => num(b[k]) != null)) {
      wrap.append(h("span", { className: "muted" }, "no bands"));
      return wrap;
    }
    const bar = h("span", { className: "share-bar", "aria-hidden": "true" });
    const words = [];
    for (const k of ["good", "fair", "poor"]) {
      const v = num(b[k]) ?? 0;
      const seg = h("span", { className: "share", dataset: { band: k } });
      seg.style.width = `${(Math.max(0, Math.min(1, v)) * 100).toFixed(2)}%`;
      bar.append(seg);
      words.push(h("span", { className: "share-word", dataset: { band: k } }, `${k} ${Math.round(v * 100)} %`));
    }
    wrap.append(bar, h("span", { className: "share-words" }, ...words));
    return wrap;
  }

  function netBlock(n) {
    const row = (label, value, title) => [h("dt", { title }, label), h("dd", { title }, value)];
    const ms = (v) => (num(v) == null ? "–" : `${Math.round(v)} ms`);
    const int = (v) => (num(v) == null ? "–" : String(Math.round(v)));
    const lost = num(n.lost) != null && num(n.expected) != null ? ` (${n.lost} of ${n.expected})` : "";
    const cq = num(n.mos_cq);
    return h("div", { className: "net-block" },
      h("h4", null, "network", n.codec ? h("span", { className: "muted" }, ` · ${n.codec}`) : null),
      h("dl", null,
        ...row("loss", fmtPct(n.loss_pct) + lost, "packets lost of those expected"),
        ...row("max burst", int(n.max_burst), "most packets lost in a row"),
        ...row("jitter", `${ms(n.jitter_mean_ms)} · p95 ${ms(n.jitter_p95_ms)}`, "interarrival jitter: mean and 95th percentile"),
        ...row("R", num(n.r_factor) == null ? "–" : n.r_factor.toFixed(0), "the E-model's rating factor, from codec and loss"),
        ...row("MOS-CQ", cq == null ? "–" : cq.toFixed(2), "the E-model's conversational MOS, from codec and loss"),
        ...row("concealed", num(n.concealed) == null ? "–" : fmtPct(100 * n.concealed),
          "share of the audio that is concealment for lost or late packets")));
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  // For tests: read-only state.
  window.scoreqHistory = { list, get call() { return current; } };

  show();
})();
