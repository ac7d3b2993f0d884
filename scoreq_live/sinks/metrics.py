"""Prometheus metrics, served at ``/metrics`` by the HTTP server.

Names follow Prometheus' conventions (``scoreq_live_`` prefix, base units,
``_total`` counters, ``_ratio`` fractions).  Per-stream series are removed
when their stream ends, so label cardinality stays bounded by the streams
that are live.  The metrics live in their own registry: embedding
scoreq-live in another program never mixes them with that program's.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from scoreq_live import __version__
from scoreq_live.bus import EventBus, Subscription
from scoreq_live.core.events import (
    AlertEvent,
    BackendStatus,
    ClearedEvent,
    Event,
    InputDropped,
    ModelScore,
    OutputStatus,
    ScoreEvent,
    StreamError,
    state_after,
)
from scoreq_live.sinks.base import Sink

if TYPE_CHECKING:
    from scoreq_live.engine import Engine
    from scoreq_live.sinks.feed import FeedHub

# Model runs take ~10 ms (GPU, small batch) to seconds (CPU, large batch).
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_PERIOD_S = 0.1  # how often the event loop's lateness is sampled


class _Registry(CollectorRegistry):
    """A registry whose exposition leaves out the ``_created`` twin of every counter and histogram.

    Those time stamps would double the series of every per-stream counter.
    prometheus-client's own switch for them (``disable_created_metrics``) is
    process-wide, which an embedded monitor must not change for its host
    program, so they are filtered here, for this registry only.
    """

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            if any(s.name.endswith("_created") for s in metric.samples):
                metric = copy.copy(metric)
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _Pulled:
    """Values read at scrape time from the feed and the other consumers (no bookkeeping on the hot path)."""

    def __init__(self) -> None:
        self.hub: FeedHub | None = None
        self.bus: EventBus | None = None
        self.drops: dict[str, Callable[[], int]] = {}

    def collect(self) -> list[Metric]:
        clients = GaugeMetricFamily("scoreq_live_connected_clients", "Websocket clients connected to the feed")
        dropped = CounterMetricFamily("scoreq_live_events_dropped", "Events dropped because a consumer fell "
                                      "behind (websocket: all feed clients together; others: the sink)",
                                      labels=["consumer"])
        gone = CounterMetricFamily("scoreq_live_clients_disconnected", "Websocket clients gone, by reason "
                                   "(closed, stalled)", labels=["reason"])
        if self.hub is not None:
            clients.add_metric([], len(self.hub.clients))
            dropped.add_metric(["websocket"], self.hub.dropped)
            for reason, n in sorted(self.hub.disconnected.items()):
                gone.add_metric([reason], n)
        else:
            clients.add_metric([], 0)
        if self.bus is not None:
            for sub in self.bus.subscriptions:
                if sub.name:
                    dropped.add_metric([sub.name], sub.dropped)
        for name, count in self.drops.items():
            dropped.add_metric([name], count())
        return [clients, dropped, gone]


class MetricsSink(Sink):
    """Keeps the Prometheus metrics up to date from the event stream; :meth:`render` serves them."""

    def __init__(self, model: str = "", mode: str = "") -> None:
        self.registry = r = _Registry()
        per = ["stream"]
        self.mos = Gauge("scoreq_live_mos", "MOS (1-5) of the latest scored window (mode nr)", per, registry=r)
        self.mos_smoothed = Gauge("scoreq_live_mos_smoothed", "Smoothed MOS (mode nr)", per, registry=r)
        self.distance = Gauge("scoreq_live_distance", "Distance to the reference of the latest scored window "
                              "(mode ref; lower is better)", per, registry=r)
        self.distance_smoothed = Gauge("scoreq_live_distance_smoothed", "Smoothed distance (mode ref)", per,
                                       registry=r)
        self.speech = Gauge("scoreq_live_speech_ratio", "Fraction (0-1) of the latest window's 30 ms frames "
                            "with speech", per, registry=r)
        self.level = Gauge("scoreq_live_level_dbfs", "RMS level of the latest window, dBFS", per, registry=r)
        self.latency = Gauge("scoreq_live_latency_seconds", "From the latest window's last sample to its event",
                             per, registry=r)
        self.windows = Counter("scoreq_live_windows", "Windows by result: scored, or why not (silent, no_speech, "
                               "overloaded, error, backend_unavailable, stopped)", ["stream", "result"], registry=r)
        self.alert_active = Gauge("scoreq_live_alert_active", "1 while an alert is raised on a stream",
                                  ["stream", "rule"], registry=r)
        self.alerts = Counter("scoreq_live_alerts", "Alerts raised", ["rule"], registry=r)
        self.input_dropped = Counter("scoreq_live_input_dropped_seconds", "Input audio lost before the monitor got "
                                     "it (sound-card blocks dropped while the event loop stalled)", per, registry=r)
        self.streams = Gauge("scoreq_live_streams", "Streams now live", registry=r)
        self.stream_errors = Counter("scoreq_live_stream_errors", "Streams that failed, or senders refused (RTP: "
                                     "an undeclared payload type, a full port); each also a stream_error event",
                                     registry=r)
        self.started = Counter("scoreq_live_streams_started", "Streams started (RTP senders, calls, inputs)",
                               registry=r)
        # Packet streams (RTP, captures): what the network did to the latest window.
        self.loss = Gauge("scoreq_live_packet_loss_ratio", "Fraction (0-1) of the latest window's packets lost "
                          "(RFC 3550 A.3)", per, registry=r)
        self.jitter = Gauge("scoreq_live_jitter_seconds", "Interarrival jitter (RFC 3550 A.8), mean over the latest "
                            "window's packets", per, registry=r)
        self.r_factor = Gauge("scoreq_live_r_factor", "E-model (ITU-T G.107) R factor of the latest window, from "
                              "codec and loss", per, registry=r)
        self.output_failed = Gauge("scoreq_live_output_failed", "1 while an output (jsonl, ...) cannot write (or its "
                                   "reader has gone), else 0", ["output"], registry=r)
        self.output_lost = Gauge("scoreq_live_output_lost_events", "Events an output has not written so far (as of "
                                 "its latest state change)", ["output"], registry=r)
        self.score = Gauge("scoreq_live_score", "Every named score of the model (score events' scores) in the "
                           "latest scored window; the primary one is also scoreq_live_mos / _distance",
                           ["stream", "score"], registry=r)
        self.mos_cq = Gauge("scoreq_live_mos_cq", "E-model MOS-CQ of the latest window (what the network says, "
                            "beside scoreq_live_mos)", per, registry=r)
        self.inference = Histogram("scoreq_live_inference_seconds", "Duration of one model run (a batch of "
                                   "windows)", buckets=INFERENCE_BUCKETS, registry=r)
        self.loop_lag = Histogram("scoreq_live_loop_lag_seconds", "How late the event loop ran a timer due every "
                                  f"{LAG_PERIOD_S:g} s (work that holds the loop delays every stream and client)",
                                  buckets=LAG_BUCKETS, registry=r)
        self.loop_lag_max = Gauge("scoreq_live_loop_lag_max_seconds", "Largest loop lag since the previous scrape",
                                  registry=r)
        self._lag_max = 0.0
        self.batch = Histogram("scoreq_live_batch_windows", "Windows per model run", buckets=BATCH_BUCKETS,
                               registry=r)
        self.backend_up = Gauge("scoreq_live_backend_up", "1 while the scoring backend (--backend) answers, 0 while "
                                "it does not (windows skipped, or scored by the local fallback)", ["backend"],
                                registry=r)
        self.backend_skipped = Counter("scoreq_live_backend_unavailable_windows", "Windows not scored because the "
                                       "scoring backend did not answer (all streams, ended ones included)",
                                       registry=r)
        info = Gauge("scoreq_live_build_info", "Version, model and mode of this monitor (always 1)",
                     ["version", "model", "mode"], registry=r)
        info.labels(__version__, model, mode).set(1)
        self._pulled = _Pulled()
        r.register(self._pulled)
        self._live: set[str] = set()
        self._results: dict[str, set[str]] = {}
        self._scores: dict[str, set[str]] = {}  # the named scores each live stream has series for
        self._alerts: set[tuple[str, str]] = set()

    # -- sources of numbers ---------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Observe the engine's model runs and the bus consumers' drops."""
        engine.batch_observers.append(self.observe_batch)
        self._pulled.bus = engine.bus

    def watch_feed(self, hub: FeedHub) -> None:
        """Report the feed's clients and drops (read at scrape time)."""
        self._pulled.hub = hub

    def watch_drops(self, consumer: str, count: Callable[[], int]) -> None:
        """Report another consumer's dropped events as ``scoreq_live_events_dropped_total{consumer}``."""
        self._pulled.drops[consumer] = count

    def observe_batch(self, windows: int, seconds: float) -> None:
        self.inference.observe(seconds)
        self.batch.observe(windows)

    # -- events ---------------------------------------------------------------------

    def _named(self, stream: str, scores: dict[str, float] | None) -> None:
        """Set a window's named scores (``scoreq_live_score``), remembering the series to drop with the stream."""
        if scores is None:
            return
        names = self._scores.setdefault(stream, set())
        for name, v in scores.items():
            if v is not None:
                self.score.labels(stream, name).set(v)
                names.add(name)

    def update(self, ev: Event) -> None:
        """Fold one event into the metrics."""
        s = ev.stream
        if isinstance(ev, BackendStatus):
            self.backend_up.labels(ev.backend).set(1 if ev.state == "up" else 0)
            return
        if isinstance(ev, OutputStatus):
            self.output_failed.labels(ev.output).set(0 if ev.state == "recovered" else 1)
            self.output_lost.labels(ev.output).set(ev.lost)
            return
        if isinstance(ev, ScoreEvent):
            if ev.reason == "backend_unavailable":
                self.backend_skipped.inc()
            result = ev.reason or "scored"
            self.windows.labels(s, result).inc()
            self._results.setdefault(s, set()).add(result)
            value, smoothed = (self.mos, self.mos_smoothed) if ev.mode == "nr" else (self.distance,
                                                                                   self.distance_smoothed)
            if ev.value is not None:
                value.labels(s).set(ev.value)
            self._named(s, ev.scores)
            if ev.smoothed is not None:
                smoothed.labels(s).set(ev.smoothed)
            self.speech.labels(s).set(ev.speech)
            self.level.labels(s).set(ev.level_dbfs)
            self.latency.labels(s).set(ev.latency_ms / 1000.0)
            if ev.net is not None:
                self.loss.labels(s).set(ev.net.loss_pct / 100.0)
                self.jitter.labels(s).set(ev.net.jitter_ms / 1000.0)
                self.r_factor.labels(s).set(ev.net.r_factor)
                self.mos_cq.labels(s).set(ev.net.mos_cq)
        elif isinstance(ev, ModelScore):  # an additional model's window: its named scores
            self._named(s, ev.scores)
        elif isinstance(ev, AlertEvent):
            self.alert_active.labels(s, ev.rule).set(1)
            self._alerts.add((s, ev.rule))
            self.alerts.labels(ev.rule).inc()
        elif isinstance(ev, ClearedEvent):
            self._drop_alert(s, ev.rule)
        elif isinstance(ev, InputDropped):
            self.input_dropped.labels(s).inc(ev.dropped_s)
        elif isinstance(ev, StreamError):
            self.stream_errors.inc()
        state = state_after(ev)
        if state is not None:
            if state == "live":
                self._live.add(s)
                self.started.inc()
            else:
                self._live.discard(s)
                self._forget(s)
            self.streams.set(len(self._live))

    def _drop_alert(self, stream: str, rule: str) -> None:
        if (stream, rule) in self._alerts:
            self._alerts.discard((stream, rule))
            self.alert_active.remove(stream, rule)

    def _forget(self, stream: str) -> None:
        """Remove every series of an ended stream (bounded cardinality)."""
        for g in (self.mos, self.mos_smoothed, self.distance, self.distance_smoothed, self.speech,
                  self.level, self.latency, self.input_dropped, self.loss, self.jitter, self.r_factor, self.mos_cq):
            try:
                g.remove(stream)
            except KeyError:
                pass
        for result in self._results.pop(stream, ()):
            self.windows.remove(stream, result)
        for name in self._scores.pop(stream, ()):
            self.score.remove(stream, name)
        for st, rule in [a for a in self._alerts if a[0] == stream]:
            self._drop_alert(st, rule)

    async def run(self, events: Subscription) -> None:
        lag = asyncio.get_running_loop().create_task(self._sample_lag(), name="loop-lag")
        try:
            async for ev in events:
                self.update(ev)
        finally:
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)

    async def _sample_lag(self) -> None:
        """Sleep a period, see how much later than asked the loop woke: the loop lag (every input feels it)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PERIOD_S
            await asyncio.sleep(LAG_PERIOD_S)
            late = max(0.0, loop.time() - due)
            self.loop_lag.observe(late)
            self._lag_max = max(self._lag_max, late)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (the largest loop lag is reset by each scrape)."""
        self.loop_lag_max.set(self._lag_max)
        self._lag_max = 0.0
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
