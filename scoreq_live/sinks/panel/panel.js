/*
 * scoreq-live browser panel.
 *
 * Reads the websocket feed (event schema v1, see the README) and shows one
 * card per stream: the smoothed and current score coloured by band, a chart
 * of the last minutes, speech activity, level, state and alerts.
 *
 * How it stays smooth with many streams:
 *  - events only update plain state objects; drawing happens at most once per
 *    animation frame, for the cards that changed (and within a time budget);
 *  - each stream keeps its chart points in a fixed-size ring, so memory and
 *    redraw cost do not grow with uptime;
 *  - a chart is redrawn at most every CHART_MIN_INTERVAL_MS and only while
 *    its card is on screen.
 *
 * Plain JavaScript, no build step; charts are uPlot (vendor/, MIT).
 */
(function () {
  "use strict";

  // --- settings --------------------------------------------------------------

  const RECONNECT_MIN_MS = 500;       // first retry after a lost connection
  const RECONNECT_MAX_MS = 15000;     // backoff doubles up to this
  const HISTORY_END_TIMEOUT_MS = 5000; // draw anyway if history_end never comes
  const CHART_MIN_INTERVAL_MS = 200;  // at most 5 chart redraws per second per card
  const FRAME_BUDGET_MS = 10;         // leave the rest of a 16 ms frame to the browser
  const MIN_CHART_SPAN_S = 60;        // the x axis shows at least this much stream time
  const MAX_RING_POINTS = 4000;       // upper bound per stream whatever history_s / hop_s say
  const MAX_ENDED_CARDS = 24;         // ended streams (finished calls) kept on screen, newest first
  const ALERT_LOG_MAX = 100;
  const ALERT_SPANS_MAX = 50;         // alert intervals kept per stream for the chart
  const STALE_AFTER_S = 5;            // a live stream silent this long (and > 3 hops) is marked stale
  const THINNED_S = 5;                // a stream with a window skipped as overloaded this recently is "thinned"
  const COMPACT_FROM = 8;             // more streams than this: compact cards

  // Used when hello says nothing. Distances have no universal scale: without
  // bands from the server they are shown uncoloured.
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
  const STATE_LABELS = {
    starting: "starting",
    live: "live",
    ended: "ended",
    stopped: "stopped",
    error: "error",
  };

  // Colours used on the canvas; they match the CSS variables in panel.css.
  const COLOURS = {
    good: "#3fb950",
    fair: "#e3b341",
    poor: "#f85149",
    raw: "rgba(201, 209, 217, 0.55)",
    neutral: "#58a6ff",
    speech: "rgba(88, 166, 255, 0.16)",
    axis: "#8b949e",
    grid: "rgba(139, 148, 158, 0.14)",
    alert: "rgba(248, 81, 73, 0.07)",
    alertBar: "rgba(248, 81, 73, 0.85)",
  };
  const BAND_FILL = {
    good: "rgba(63, 185, 80, 0.045)",
    fair: "rgba(227, 179, 65, 0.045)",
    poor: "rgba(248, 81, 73, 0.055)",
  };

  // --- the page URL: token and stream filter are passed on to the feed -------

  const params = new URLSearchParams(window.location.search);

  /** The websocket URL: "ws" next to this page, same host and port, same token. */
  function feedUrl() {
    const url = new URL("ws", window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    const token = params.get("token");
    if (token) url.searchParams.set("token", token);
    const streams = params.get("streams");
    if (streams) url.searchParams.set("streams", streams);
    return url.toString();
  }

  // The links to the panel's pages keep the token (and only the token).
  for (const [id, href] of [["nav-live", "./"], ["nav-history", "history"]]) {
    const link = document.getElementById(id);
    const token = params.get("token");
    if (link && token) link.href = `${href}?${new URLSearchParams({ token })}`;
  }

  // --- state -------------------------------------------------------------------

  /**
   * Chart points of one stream in a fixed-size ring: stream time, raw score,
   * smoothed score, speech. NaN stands for "not scored" (a gap in the line).
   */
  class Ring {
    constructor(capacity) {
      this.capacity = capacity;
      this.t = new Float64Array(capacity);
      this.raw = new Float64Array(capacity);
      this.smoothed = new Float64Array(capacity);
      this.speech = new Float64Array(capacity);
      this.start = 0;
      this.length = 0;
    }

    clear() {
      this.start = 0;
      this.length = 0;
    }

    get lastT() {
      return this.length ? this.t[(this.start + this.length - 1) % this.capacity] : NaN;
    }

    push(t, raw, smoothed, speech) {
      let i;
      if (this.length < this.capacity) {
        i = (this.start + this.length) % this.capacity;
        this.length++;
      } else {
        i = this.start;
        this.start = (this.start + 1) % this.capacity;
      }
      this.t[i] = t;
      this.raw[i] = raw;
      this.smoothed[i] = smoothed;
      this.speech[i] = speech;
    }

    /** Copy into uPlot's column arrays (reused between redraws), oldest first. */
    copyTo(cols) {
      const [xs, sp, raw, sm] = cols;
      const n = this.length;
      xs.length = sp.length = raw.length = sm.length = n;
      for (let k = 0; k < n; k++) {
        const i = (this.start + k) % this.capacity;
        xs[k] = this.t[i];
        sp[k] = Number.isNaN(this.speech[i]) ? null : this.speech[i];
        raw[k] = Number.isNaN(this.raw[i]) ? null : this.raw[i];
        sm[k] = Number.isNaN(this.smoothed[i]) ? null : this.smoothed[i];
      }
      return n;
    }
  }

  const state = {
    hello: null,          // the last hello message
    mode: "nr",
    bands: DEFAULT_BANDS.nr,
    banded: true,         // false: no limits known (ref mode without bands), numbers stay neutral
    subscribed: null,     // Set of stream names, or null for all
    historyS: 300,
    hopS: 1,
    replaying: false,     // between hello and history_end: fold events, draw once at the end
    streams: new Map(),   // name -> Stream
    active: new Map(),    // alert key -> alert event
    alertLog: [],         // newest first: {kind: "alert"|"cleared", ev}
    dropped: 0,
    serverError: "",
    conn: "connecting",
    connDetail: "",
  };

  /** Counters a test or benchmark can read as window.scoreqPanel.stats. */
  const stats = { events: 0, frames: 0, renderMsTotal: 0, renderMsMax: 0, chartDraws: 0, hellos: 0 };

  function ringCapacity() {
    return Math.min(MAX_RING_POINTS, Math.ceil(state.historyS / Math.max(state.hopS, 0.05)) + 16);
  }

  function newStream(name) {
    return {
      name,
      state: "starting",
      source: "",
      detail: "",
      error: "",
      value: null,          // latest window's score (null: not scored)
      smoothed: null,
      reason: null,
      speech: null,
      level: null,
      latency: null,
      net: null, // packet streams: the latest window's loss, jitter, E-model
      named: null, // the model's other named scores in the latest scored window (score events' `scores`)
      t: null,              // stream time of the latest window
      lastSeen: 0,          // performance.now() of the latest event, for "stale"
      thinnedAt: 0,         // performance.now() of the latest window skipped as overloaded, for "thinned"
      skipT: NaN,           // stream time of that window: thinning is not a gap in the chart
      endedAt: null,        // performance.now() when it ended, for forgetting it
      ring: new Ring(ringCapacity()),
      alertSpans: [],       // {key, from, to|null} in stream time, for the chart
      card: null,           // DOM and chart, made on first draw
      dirty: true,
      chartDirty: true,
      lastChartDraw: -Infinity,
    };
  }

  function stream(name) {
    let s = state.streams.get(name);
    if (!s) {
      s = newStream(name);
      state.streams.set(name, s);
      layoutDirty = true;
    }
    return s;
  }

  const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);
  const alertKey = (ev) => (ev.id != null ? String(ev.id) : `${ev.stream}|${ev.rule}`);

  // --- folding events into state --------------------------------------------------

  function onHello(msg) {
    stats.hellos++;
    resetState();
    state.hello = msg;
    state.mode = msg.mode === "ref" ? "ref" : "nr";
    const defaults = DEFAULT_BANDS[state.mode];
    const b = msg.bands && typeof msg.bands === "object" ? msg.bands : defaults;
    const good = num(b.good);
    const fair = num(b.fair);
    state.bands = {
      good: good ?? fair,  // one limit given: two bands
      fair: fair ?? good,
      lower_is_better: b.lower_is_better != null ? Boolean(b.lower_is_better) : defaults.lower_is_better,
    };
    state.banded = state.bands.good != null;
    // hello lists every stream of the monitor; with ?streams= only those subscribed get a card.
    state.subscribed = Array.isArray(msg.subscribed) ? new Set(msg.subscribed) : null;
    state.historyS = num(msg.history_s) ?? 300;
    state.hopS = num(msg.hop_s) ?? 1;
    for (const info of msg.streams || []) {
      if (state.subscribed && !state.subscribed.has(info.stream)) continue;
      const s = stream(info.stream);
      s.state = info.state || "live";
      s.source = info.source || "";
      s.detail = info.detail || "";
      if (info.error) s.error = info.error;
    }
    for (const a of msg.alerts || []) {
      if (!state.subscribed || state.subscribed.has(a.stream)) fireAlert(a, false);
    }
    state.replaying = true;
    clearTimeout(replayTimer);
    replayTimer = setTimeout(endReplay, HISTORY_END_TIMEOUT_MS);
    headerDirty = alertsDirty = layoutDirty = true;
  }

  function endReplay() {
    clearTimeout(replayTimer);
    if (!state.replaying) return;
    state.replaying = false;
    // hello's states are those at the end of the history (the history may start with a stream_started
    // whose stream_ended has not come yet, or one that fell out of the window).
    for (const info of (state.hello && state.hello.streams) || []) {
      const s = state.streams.get(info.stream);
      if (!s || !info.state) continue;
      s.state = info.state;
      if (info.error) s.error = info.error;
    }
    for (const s of state.streams.values()) s.dirty = s.chartDirty = true;
    headerDirty = alertsDirty = layoutDirty = true;
    schedule();
  }

  function onScore(ev) {
    const s = stream(ev.stream);
    const value = num(state.mode === "ref" ? ev.distance : ev.mos) ?? num(ev.mos) ?? num(ev.distance);
    const t = num(ev.t_end) ?? 0;
    const ring = s.ring;
    const lastT = ring.lastT;
    if (t < lastT - state.hopS) {
      ring.clear(); // stream time went back: a new run of the stream
      s.skipT = NaN;
    } else if (t - Math.max(lastT, s.skipT || -Infinity) > 2.5 * state.hopS) {
      ring.push(lastT + state.hopS, NaN, NaN, NaN); // lost windows: a gap
    }
    if (ev.reason === "overloaded") {
      // The scorer is behind and this stream is thinned (scored at a longer hop): the latest score
      // still stands and the chart joins the scored windows.
      if (!state.replaying) s.thinnedAt = performance.now();
      s.skipT = t;
      s.latency = num(ev.latency_ms);
      s.t = t;
      if (s.state === "starting") s.state = "live";
      touch(s, false);
      return;
    }
    const smoothed = num(ev.smoothed);
    // The smoothed value holds over unscored windows; the chart shows a gap there, like the raw line.
    ring.push(t, value ?? NaN, value == null ? NaN : smoothed ?? NaN, num(ev.speech) ?? NaN);
    s.value = value;
    s.smoothed = smoothed;
    s.reason = ev.reason || null;
    s.speech = num(ev.speech);
    s.level = num(ev.level_dbfs);
    s.latency = num(ev.latency_ms);
    s.net = ev.net && typeof ev.net === "object" ? ev.net : null;
    if (ev.scores && typeof ev.scores === "object") s.named = otherScores(ev.scores, s.named);
    s.t = t;
    if (s.state === "starting") s.state = "live";
    touch(s, true);
  }

  /** Named scores beyond the primary one, merged into the stream's latest: [name, value] pairs (null: none). */
  function otherScores(scores, named) {
    const out = new Map(named || []);
    for (const [k, v] of Object.entries(scores)) {
      const x = num(v);
      if (k !== "mos" && k !== "distance" && x != null) out.set(k, x);
    }
    return out.size ? [...out] : null;
  }

  /** An additional model's window (`model_score`): its named scores join the stream's latest. */
  function onModelScore(ev) {
    const s = stream(ev.stream);
    if (ev.scores && typeof ev.scores === "object") {
      s.named = otherScores(ev.scores, s.named);
      touch(s, false);
    }
  }

  function onStreamStarted(ev) {
    const s = stream(ev.stream);
    if (s.ring.length) {
      // The same name started again: a new run, a new chart.
      s.ring.clear();
      s.alertSpans = [];
      s.value = s.smoothed = s.reason = s.speech = s.level = s.latency = s.t = s.net = s.named = null;
      s.thinnedAt = 0;
      s.skipT = NaN;
    }
    s.state = "live";
    s.endedAt = null;
    s.source = ev.source || s.source;
    s.detail = ev.detail || s.detail;
    s.error = "";
    touch(s, true);
    headerDirty = true;
    forgetEnded();
  }

  function onStreamEnded(ev) {
    const s = stream(ev.stream);
    s.state = ev.reason === "error" ? "error" : ev.reason === "stopped" ? "stopped" : "ended";  // eof, inactive, bye, closed, disconnected: ended
    s.endedAt = performance.now();
    touch(s, false);
    headerDirty = true;
  }

  /** Forget streams that ended more than history_s ago, and all but the newest ended ones, as the server does. */
  function forgetEnded() {
    const now = performance.now();
    const ended = [...state.streams.values()].filter((s) => s.endedAt != null).sort((a, b) => b.endedAt - a.endedAt);
    ended.forEach((s, i) => {
      if (i >= MAX_ENDED_CARDS || now - s.endedAt > 1000 * state.historyS) {
        destroyCard(s);
        dirty.delete(s);
        state.streams.delete(s.name);
      }
    });
  }

  function onStreamError(ev) {
    const s = stream(ev.stream);
    s.state = "error";
    s.error = ev.error || "error";
    touch(s, false);
    headerDirty = true;
  }

  function fireAlert(ev, log) {
    const key = alertKey(ev);
    state.active.set(key, ev);
    if (log) pushLog("alert", ev);
    if (ev.stream == null) return;
    const s = stream(ev.stream);
    if (!s.alertSpans.some((a) => a.key === key && a.to == null)) {
      s.alertSpans.push({ key, from: num(ev.t) ?? s.t ?? 0, to: null });
      if (s.alertSpans.length > ALERT_SPANS_MAX) s.alertSpans.shift();
    }
    touch(s, true);
  }

  function clearAlert(ev) {
    const key = alertKey(ev);
    state.active.delete(key);
    pushLog("cleared", ev);
    if (ev.stream == null) return;
    const s = stream(ev.stream);
    for (const a of s.alertSpans) if (a.key === key && a.to == null) a.to = num(ev.t) ?? s.t ?? a.from;
    touch(s, true);
  }

  function pushLog(kind, ev) {
    state.alertLog.unshift({ kind, ev });
    if (state.alertLog.length > ALERT_LOG_MAX) state.alertLog.length = ALERT_LOG_MAX;
    alertsDirty = true;
  }

  function touch(s, chart) {
    s.lastSeen = performance.now();
    s.dirty = true;
    if (chart) s.chartDirty = true;
    dirty.add(s);
    headerDirty = true;
  }

  function resetState() {
    for (const s of state.streams.values()) destroyCard(s);
    state.streams.clear();
    state.active.clear();
    state.alertLog = [];
    state.dropped = 0;
    state.serverError = "";
    dirty.clear();
    grid.replaceChildren();
  }

  /** The scoring backend's state (--backend): a chip beside the model, red while it does not answer. */
  function onBackend(msg) {
    const chip = $("meta-backend");
    const down = msg.state !== "up";
    const since = new Date((num(msg.since) ?? 0) * 1000).toLocaleTimeString();
    chip.hidden = false;
    chip.dataset.state = String(msg.state);
    setText(chip, msg.state === "up" ? "backend up"
      : msg.state === "fallback" ? `backend down since ${since} · scoring locally`
      : `backend down since ${since} · windows skipped`);
    chip.title = `${msg.backend || ""}${down && msg.error ? "\n" + msg.error : ""}`;
  }

  /** Handle one feed message; unknown types are ignored (newer servers may send more). */
  function onMessage(msg) {
    if (!msg || typeof msg !== "object") return;
    stats.events++;
    switch (msg.type) {
      case "hello": onHello(msg); break;
      case "history_end": endReplay(); break;
      case "score": onScore(msg); break;
      case "model_score": onModelScore(msg); break;
      case "stream_started": onStreamStarted(msg); break;
      case "stream_ended": onStreamEnded(msg); break;
      case "stream_error": onStreamError(msg); break;
      case "alert": fireAlert(msg, true); break;
      case "cleared": clearAlert(msg); break;
      case "backend": onBackend(msg); break;
      case "error": // the server did not like something we sent or asked for
        state.serverError = String(msg.error || "error");
        alertsDirty = true;
        break;
      case "dropped":
        state.dropped += num(msg.count) ?? 1;
        alertsDirty = true;
        break;
      default: return;
    }
    schedule();
  }

  // --- connection ------------------------------------------------------------------

  let socket = null;
  let attempt = 0;
  let retryTimer = 0;
  let retryAt = 0;
  let replayTimer = 0;

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = 0;
    setConn(attempt ? "reconnecting" : "connecting", "");
    let ws;
    try {
      ws = new WebSocket(feedUrl());
    } catch (e) {
      scheduleReconnect(String(e));
      return;
    }
    socket = ws;
    let gotHello = false;
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      if (msg && msg.type === "hello") {
        gotHello = true;
        attempt = 0;
        setConn("live", msg.server || "");
      }
      onMessage(msg);
    };
    ws.onclose = (e) => {
      if (socket !== ws) return;
      socket = null;
      if (e.reason) scheduleReconnect(e.reason); // the server said why (going away, stalled, full)
      else if (gotHello) scheduleReconnect("connection lost");
      else diagnose().then(scheduleReconnect);
    };
    ws.onerror = () => {}; // a close event follows; reconnecting is handled there
  }

  /**
   * Why a websocket handshake failed: browsers hide the HTTP status, so ask the
   * same URL over plain HTTP (the server answers a refused token or origin there too).
   */
  async function diagnose() {
    const url = new URL(feedUrl());
    url.protocol = window.location.protocol;
    try {
      const r = await fetch(url, { cache: "no-store" });
      if (r.status === 401) return "token refused: open the panel with ?token=…";
      if (r.status === 403) return "refused by the server (origin or host not allowed)";
      if (r.status === 503) return "server busy (too many clients)";
      if (r.status === 400) return `server refused the request: ${(await r.text()).trim()}`;
      return "cannot open the feed";
    } catch (err) {
      return "cannot reach the server";
    }
  }

  function scheduleReconnect(why) {
    const base = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** attempt);
    const delay = base / 2 + Math.random() * base / 2; // jitter: many screens must not retry in step
    attempt++;
    retryAt = performance.now() + delay;
    retryTimer = setTimeout(connect, delay);
    setConn("offline", why);
  }

  function setConn(conn, detail) {
    state.conn = conn;
    state.connDetail = detail;
    document.body.dataset.conn = conn;
    headerDirty = true;
    schedule();
  }

  // Back online or back in view: do not wait for the rest of the backoff.
  function retryNow() {
    if (!socket && retryTimer) connect();
  }
  window.addEventListener("online", retryNow);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) retryNow();
  });

  // --- drawing -----------------------------------------------------------------------

  const grid = document.getElementById("grid");
  const template = document.getElementById("card-template");
  const $ = (id) => document.getElementById(id);
  const dirty = new Set();
  let frameQueued = false;
  let headerDirty = true;
  let alertsDirty = true;
  let layoutDirty = true;

  function schedule() {
    if (frameQueued || state.replaying) return;
    frameQueued = true;
    requestAnimationFrame(frame);
  }

  /** One animation frame: draw what changed, within a time budget. */
  function frame() {
    frameQueued = false;
    const t0 = performance.now();
    if (layoutDirty) layout();
    if (headerDirty) drawHeader();
    if (alertsDirty) drawAlerts();
    for (const s of dirty) {
      if (performance.now() - t0 > FRAME_BUDGET_MS) break; // the rest next frame
      if (drawCard(s, t0)) dirty.delete(s);
    }
    const ms = performance.now() - t0;
    stats.frames++;
    stats.renderMsTotal += ms;
    if (ms > stats.renderMsMax) stats.renderMsMax = ms;
    if (dirty.size) schedule();
  }

  /** Cards in feed order (hello order, then first appearance). */
  function layout() {
    layoutDirty = false;
    for (const s of state.streams.values()) {
      if (!s.card) makeCard(s);
      if (s.card.el.parentNode !== grid) grid.appendChild(s.card.el);
      dirty.add(s);
    }
    $("empty").hidden = state.streams.size > 0;
    document.body.dataset.density = state.streams.size > COMPACT_FROM ? "compact" : "normal";
  }

  const fmtScore = (v) => (v == null ? "–" : state.mode === "ref" ? v.toFixed(3) : v.toFixed(2));

  function band(v) {
    if (v == null || !state.banded) return "none";
    const b = state.bands;
    if (b.lower_is_better) return v <= b.good ? "good" : v <= b.fair ? "fair" : "poor";
    return v >= b.good ? "good" : v >= b.fair ? "fair" : "poor";
  }

  function fmtStreamTime(t) {
    if (t == null) return "";
    const s = Math.max(0, Math.floor(t));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = String(s % 60).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
  }

  function fmtClock(ts) {
    const d = typeof ts === "number" ? new Date(ts * 1000) : new Date();
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function setData(el, key, value) {
    if (el.dataset[key] !== value) el.dataset[key] = value;
  }

  function makeCard(s) {
    const el = template.content.firstElementChild.cloneNode(true);
    const q = (sel) => el.querySelector(sel);
    const card = {
      el,
      name: q(".card-name"),
      pill: q(".state-pill"),
      detail: q(".card-detail"),
      smoothed: q(".smoothed-value"),
      unit: q(".unit"),
      now: q(".now-value"),
      nowLabel: q(".now-label"),
      alerts: q(".card-alerts"),
      chartEl: q(".chart"),
      speechFill: q(".speech-meter .meter-fill"),
      speechValue: q(".speech-meter .meter-value"),
      levelFill: q(".level-meter .meter-fill"),
      levelValue: q(".level-meter .meter-value"),
      time: q(".stream-time"),
      latency: q(".latency"),
      net: q(".net"),
      named: q(".named-scores"),
      diag: q(".diag-bars"),
      diagKey: "",
      chart: null,
      cols: [[], [], [], []],
      visible: true,
      alertKeys: "",
    };
    el.dataset.stream = s.name;
    card.name.textContent = s.name;
    card.name.title = s.name;
    card.unit.textContent = state.mode === "ref" ? "distance" : "MOS";
    s.card = card;
    visibility.observe(el);
    sizes.observe(card.chartEl);
  }

  function destroyCard(s) {
    if (!s.card) return;
    visibility.unobserve(s.card.el);
    sizes.unobserve(s.card.chartEl);
    if (s.card.chart) s.card.chart.destroy();
    s.card.el.remove();
    s.card = null;
  }

  /** Named scores on a 1-5 scale as a small group of bars (DNSMOS SIG/BAK/OVRL, P.808, PLCMOS). */
  function drawDiagBars(c, named) {
    const bars = (named || []).filter(([, v]) => v >= 1 && v <= 5);
    c.diag.hidden = !bars.length;
    const key = bars.map(([k]) => k).join(",");
    if (c.diagKey !== key) {
      c.diagKey = key;
      c.diag.replaceChildren(...bars.map(([k]) => {
        const m = document.createElement("div");
        m.className = "meter diag-meter";
        m.dataset.score = k;
        m.title = k;
        m.innerHTML = '<span class="meter-label"></span><span class="meter-bar"><span class="meter-fill"></span></span>'
          + '<span class="meter-value"></span>';
        m.querySelector(".meter-label").textContent = k.includes(".") ? k.slice(k.lastIndexOf(".") + 1) : k;
        return m;
      }));
    }
    bars.forEach(([, v], i) => {
      const m = c.diag.children[i];
      const fill = m.querySelector(".meter-fill");
      fill.style.width = `${((v - 1) / 4) * 100}%`;
      setData(fill, "band", state.mode === "nr" ? band(v) : "none");
      setText(m.querySelector(".meter-value"), v.toFixed(2));
    });
  }

  /** Update one card; returns false when its chart still waits for its turn. */
  function drawCard(s, now) {
    if (!s.card) makeCard(s);
    const c = s.card;
    if (s.dirty) {
      s.dirty = false;
      const stale = s.state === "live" && s.lastSeen > 0 &&
        now - s.lastSeen > 1000 * Math.max(STALE_AFTER_S, 3 * state.hopS);
      setData(c.el, "state", s.state);
      const thinned = s.state === "live" && !stale && s.thinnedAt > 0 && now - s.thinnedAt < 1000 * THINNED_S;
      setData(c.el, "stale", stale ? "yes" : "no");
      setData(c.el, "thinned", thinned ? "yes" : "no");
      setText(c.pill, stale ? "stale" : thinned ? "thinned" : STATE_LABELS[s.state] || s.state);
      c.pill.title = thinned ? "scoring cannot keep up: some of this stream's windows are skipped (overloaded)" : "";
      const detail = s.state === "error" && s.error ? s.error : [s.source, s.detail].filter(Boolean).join(" · ");
      setText(c.detail, detail);
      c.detail.title = detail;

      setText(c.smoothed, fmtScore(s.smoothed));
      setData(c.el, "band", band(s.smoothed));
      setData(c.smoothed, "band", band(s.smoothed));
      setText(c.now, s.value == null && s.reason ? "–" : fmtScore(s.value));
      setData(c.now, "band", band(s.value));
      setText(c.nowLabel, s.value == null && s.reason ? REASONS[s.reason] || s.reason : "now");

      const sp = s.speech;
      c.speechFill.style.width = sp == null ? "0%" : `${Math.round(sp * 100)}%`;
      setText(c.speechValue, sp == null ? "–" : `${Math.round(sp * 100)} %`);
      const lv = s.level;
      c.levelFill.style.width = lv == null ? "0%" : `${Math.max(0, Math.min(100, (lv + 60) / 60 * 100))}%`;
      setText(c.levelValue, lv == null ? "–" : `${lv.toFixed(0)} dBFS`);
      setText(c.time, s.t == null ? "" : `t ${fmtStreamTime(s.t)}`);
      setText(c.latency, s.latency == null ? "" : `latency ${Math.round(s.latency)} ms`);
      const n = s.net;
      c.net.hidden = !n;
      if (n) {
        const loss = num(n.loss_pct), jit = num(n.jitter_ms), cq = num(n.mos_cq);
        setText(c.net, `loss ${loss == null ? "–" : loss.toFixed(1)} % · jitter ${jit == null ? "–" :
          Math.round(jit)} ms · net MOS ${cq == null ? "–" : cq.toFixed(2)}`);
      }
      c.named.hidden = !s.named;
      if (s.named) setText(c.named, s.named.map(([k, v]) => `${k} ${v.toFixed(2)}`).join(" · "));
      drawDiagBars(c, s.named);
      drawCardAlerts(s);
    }
    if (s.chartDirty) {
      if (!c.visible) return true; // drawn when it scrolls into view
      if (now - s.lastChartDraw < CHART_MIN_INTERVAL_MS) {
        return false;
      }
      drawChart(s);
    }
    return true;
  }

  function drawCardAlerts(s) {
    const c = s.card;
    const mine = [];
    for (const [key, a] of state.active) if (a.stream === s.name) mine.push([key, a]);
    const keys = mine.map(([k]) => k).join("\n");
    setData(c.el, "alert", mine.length ? "yes" : "no");
    if (keys === c.alertKeys) return;
    c.alertKeys = keys;
    c.alerts.replaceChildren(...mine.map(([, a]) => {
      const li = document.createElement("li");
      li.className = "card-alert";
      li.textContent = a.rule || `${a.metric} ${a.op} ${a.threshold}`;
      return li;
    }));
  }

  // --- charts ----------------------------------------------------------------------

  /** Horizontal pixel band of a value range on the y scale, clipped to the plot. */
  function yBand(u, lo, hi) {
    const top = u.valToPos(hi, "y", true);
    const bottom = u.valToPos(lo, "y", true);
    const y0 = Math.max(u.bbox.top, Math.min(top, bottom));
    const y1 = Math.min(u.bbox.top + u.bbox.height, Math.max(top, bottom));
    return [y0, Math.max(0, y1 - y0)];
  }

  /** Faint good/fair/poor zones behind the lines, and alert intervals on top. */
  function drawZones(u) {
    if (!state.banded) return;
    const ctx = u.ctx;
    const { left, width } = u.bbox;
    const b = state.bands;
    const ymin = u.scales.y.min;
    const ymax = u.scales.y.max;
    const zones = b.lower_is_better
      ? [["good", ymin, b.good], ["fair", b.good, b.fair], ["poor", b.fair, ymax]]
      : [["poor", ymin, b.fair], ["fair", b.fair, b.good], ["good", b.good, ymax]];
    ctx.save();
    for (const [name, lo, hi] of zones) {
      if (hi <= lo) continue;
      const [y, h] = yBand(u, lo, hi);
      ctx.fillStyle = BAND_FILL[name];
      ctx.fillRect(left, y, width, h);
    }
    ctx.restore();
  }

  function drawAlertSpans(u, s) {
    if (!s.alertSpans.length) return;
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const xmin = u.scales.x.min;
    const xmax = u.scales.x.max;
    ctx.save();
    const now = s.ring.length ? s.ring.lastT : xmax;
    for (const a of s.alertSpans) {
      const to = a.to == null ? Math.max(now, a.from) : a.to; // still active: up to the latest window
      if (to < xmin || a.from > xmax) continue;
      const x0 = Math.max(left, u.valToPos(Math.max(a.from, xmin), "x", true));
      const x1 = Math.min(left + width, u.valToPos(Math.min(to, xmax), "x", true));
      const w = Math.max(2, x1 - x0);
      ctx.fillStyle = COLOURS.alert;
      ctx.fillRect(x0, top, w, height);
      ctx.fillStyle = COLOURS.alertBar;
      ctx.fillRect(x0, top, w, 3 * devicePixelRatio);
    }
    ctx.restore();
  }

  /** The smoothed line takes the colour of the band it is in (a gradient with hard stops). */
  function bandStroke(u) {
    if (!state.banded) return COLOURS.neutral;
    const b = state.bands;
    const { top, height } = u.bbox;
    if (!height) return COLOURS.good;
    const g = u.ctx.createLinearGradient(0, top, 0, top + height);
    const stop = (v) => Math.min(1, Math.max(0, (u.valToPos(v, "y", true) - top) / height));
    const [upper, lower] = b.lower_is_better ? ["poor", "good"] : ["good", "poor"];
    const sHi = stop(Math.max(b.good, b.fair));
    const sLo = stop(Math.min(b.good, b.fair));
    g.addColorStop(0, COLOURS[upper]);
    g.addColorStop(sHi, COLOURS[upper]);
    g.addColorStop(sHi, COLOURS.fair);
    g.addColorStop(sLo, COLOURS.fair);
    g.addColorStop(sLo, COLOURS[lower]);
    g.addColorStop(1, COLOURS[lower]);
    return g;
  }

  function yRange(u, dmin, dmax) {
    if (state.mode !== "ref") return [1, 5];
    const b = state.bands;
    const top = Math.max(state.banded ? b.fair * 1.5 : 0, Number.isFinite(dmax) ? dmax * 1.1 : 0);
    return [0, top || 1];
  }

  const xIncrs = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];

  function makeChart(s) {
    const c = s.card;
    const { width, height } = chartSize(c.chartEl);
    const axis = {
      stroke: COLOURS.axis,
      font: "11px system-ui, sans-serif",
      grid: { stroke: COLOURS.grid, width: 1 },
      ticks: { show: false },
      gap: 4,
    };
    const opts = {
      width,
      height,
      padding: [10, 12, 0, 0], // fixed, so the plot does not shift as tick labels change
      legend: { show: false },
      cursor: { show: false },
      select: { show: false },
      scales: {
        x: { time: false, range: () => xRange(s) },
        y: { range: yRange },
        speech: { range: [0, 4] }, // speech fills the lower quarter of the chart
      },
      axes: [
        { ...axis, incrs: xIncrs, space: 60, size: 22, values: (u, vals) => vals.map(fmtStreamTime) },
        {
          ...axis,
          size: 34,
          space: 18,
          incrs: state.mode === "ref" ? [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100] : [0.5, 1, 2],
          // The lowest label would sit on the time axis' labels: leave it out.
          values: (u, vals) => vals.map((v) => (v === u.scales.y.min ? "" : String(+v.toFixed(2)))),
        },
      ],
      series: [
        {},
        {
          label: "speech",
          scale: "speech",
          stroke: "transparent",
          width: 0,
          fill: COLOURS.speech,
          points: { show: false },
          paths: uPlot.paths.stepped({ align: -1 }),
        },
        { label: "window", stroke: COLOURS.raw, width: 1, points: { show: false } },
        { label: "smoothed", stroke: bandStroke, width: 2.25, points: { show: false } },
      ],
      hooks: {
        drawClear: [drawZones],
        draw: [(u) => drawAlertSpans(u, s)],
      },
    };
    c.chart = new uPlot(opts, c.cols, c.chartEl);
  }

  function xRange(s) {
    const last = s.ring.length ? s.ring.lastT : 0;
    const span = Math.max(MIN_CHART_SPAN_S, state.historyS);
    const hi = Math.max(last, Math.min(span, MIN_CHART_SPAN_S));
    return [Math.max(0, hi - span), hi];
  }

  function drawChart(s) {
    const c = s.card;
    if (!c.chart) makeChart(s);
    const n = s.ring.copyTo(c.cols);
    // batch: draw now rather than in a microtask, so the frame budget sees what drawing costs.
    c.chart.batch(() => c.chart.setData(c.cols));
    setData(c.chartEl, "points", String(n));
    s.chartDirty = false;
    s.lastChartDraw = performance.now();
    stats.chartDraws++;
  }

  function chartSize(el) {
    return { width: Math.max(120, Math.floor(el.clientWidth)), height: Math.max(80, Math.floor(el.clientHeight)) };
  }

  // One observer each for all cards: resize charts with their cards, skip charts off screen.
  const sizes = new ResizeObserver((entries) => {
    for (const e of entries) {
      const s = state.streams.get(e.target.closest(".card").dataset.stream);
      if (s && s.card && s.card.chart) s.card.chart.setSize(chartSize(e.target));
    }
  });
  const visibility = new IntersectionObserver((entries) => {
    for (const e of entries) {
      const s = state.streams.get(e.target.dataset.stream);
      if (!s || !s.card) continue;
      s.card.visible = e.isIntersecting;
      if (e.isIntersecting && s.chartDirty) {
        dirty.add(s);
        schedule();
      }
    }
  }, { rootMargin: "200px" });

  // --- header and alert list -------------------------------------------------------

  function drawHeader() {
    headerDirty = false;
    const h = state.hello;
    if (h) {
      setText($("meta-model"), h.model || "model ?");
      setText($("meta-mode"), state.mode === "ref" ? "ref · distance, lower is better" : "nr · MOS 1–5");
      const parts = [];
      if (num(h.window_s) != null) parts.push(`window ${h.window_s} s`);
      if (num(h.hop_s) != null) parts.push(`hop ${h.hop_s} s`);
      setText($("meta-window"), parts.join(" · "));
    }
    const all = [...state.streams.values()];
    const live = all.filter((s) => s.state === "live").length;
    const poor = all.filter((s) => s.state === "live" && band(s.smoothed) === "poor").length;
    const parts = [`${all.length} stream${all.length === 1 ? "" : "s"}`, `${live} live`];
    if (poor) parts.push(`${poor} poor`);
    setText($("summary"), parts.join(" · "));

    let label;
    if (state.conn === "live") label = state.replaying ? "loading history…" : "live";
    else if (state.conn === "offline") {
      const secs = Math.max(0, Math.ceil((retryAt - performance.now()) / 1000));
      label = `${state.connDetail || "offline"} · retry in ${secs} s`;
    } else label = state.conn === "reconnecting" ? "reconnecting…" : "connecting…";
    setText($("conn-label"), label);
    $("conn").title = state.conn === "live" ? state.connDetail : feedUrl().replace(/token=[^&]*/, "token=…");
  }

  function alertText(a) {
    const rule = a.rule || `${a.metric} ${a.op} ${a.threshold}`;
    const v = num(a.value);
    return { rule, value: v == null ? "" : fmtScore(v) };
  }

  function drawAlerts() {
    alertsDirty = false;
    const active = [...state.active.values()];
    $("alerts").dataset.active = active.length ? "yes" : "no";
    setText($("alerts-count"), active.length ? `${active.length} active` : "none active");
    $("alert-active").replaceChildren(...active.map((a) => {
      const { rule, value } = alertText(a);
      const li = document.createElement("li");
      li.className = "alert-item";
      li.dataset.stream = a.stream ?? "";
      const name = document.createElement("strong");
      name.textContent = a.stream ?? "all";
      const r = document.createElement("span");
      r.className = "alert-rule";
      r.textContent = rule;
      const meta = document.createElement("span");
      meta.className = "alert-meta";
      meta.textContent = `since ${fmtClock(a.ts)}`;
      li.title = value ? `${a.stream}: ${rule}, value ${value} when it fired` : rule;
      li.append(name, r, meta);
      return li;
    }));
    setText($("alert-log-count"), state.alertLog.length ? `(${state.alertLog.length})` : "");
    $("alert-log").replaceChildren(...state.alertLog.map(({ kind, ev }) => {
      const { rule, value } = alertText(ev);
      const li = document.createElement("li");
      li.dataset.kind = kind;
      const what = kind === "alert" ? "fired  " : ev.reason === "stream_ended" ? "ended  " : "cleared";
      li.textContent = `${fmtClock(ev.ts)}  ${what}  ${ev.stream ?? ""}  ${rule}` + (value ? `  (${value})` : "");
      return li;
    }));
    const dropped = $("dropped");
    const notes = [];
    if (state.dropped) notes.push(`${state.dropped} events lost (slow connection)`);
    if (state.serverError) notes.push(`server: ${state.serverError}`);
    dropped.hidden = !notes.length;
    setText(dropped, notes.join(" · "));
    for (const s of state.streams.values()) {
      s.dirty = true;
      dirty.add(s);
    }
  }

  // Once a second: the reconnect countdown, stale streams and thinned streams catching up.
  setInterval(() => {
    if (state.conn === "offline") headerDirty = true;
    const now = performance.now();
    for (const s of state.streams.values()) {
      const thinEnds = s.thinnedAt && now - s.thinnedAt < 1000 * (THINNED_S + 2);
      if (s.state === "live" && (thinEnds || s.lastSeen && now - s.lastSeen > 1000 * STALE_AFTER_S)) {
        s.dirty = true;
        dirty.add(s);
      }
    }
    schedule();
  }, 1000);

  // For tests and benchmarks: read-only counters and state, no control.
  window.scoreqPanel = { stats, state };

  connect();
})();
