"""Putting a monitor together: options in, typed parts out, then run.

As uvicorn splits ``Config`` from ``Server``: :class:`MonitorOptions` holds
every setting (inputs, model and windows, alerts, feed, outputs) as plain
data; :func:`build_monitor` checks them and builds the parts (sources,
scorer, alert rules, feed server, metrics, webhook) into a :class:`Monitor`,
whose :meth:`Monitor.run` only runs them.  The command line turns flags into
options and nothing more, so a program embedding scoreq-live builds the same
monitor the command line does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from scoreq_live.bus import EventBus
from scoreq_live.core.alerts import AlertEvaluator, AlertRule, check_rule_mode, parse_rule
from scoreq_live.core.events import Mode
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.scorer import Reference, Scorer
from scoreq_live.sinks.bands import Bands
from scoreq_live.sinks.base import Sink, close_sinks, start_sinks
from scoreq_live.sources import Input, open_inputs

if TYPE_CHECKING:
    from scoreq_live.ingest.http import IngestRoutes
    from scoreq_live.scoring.download import Progress
    from scoreq_live.scoring.references import StoredReference
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.spec import ModelSpec
    from scoreq_live.scoring.triton import TritonModel
    from scoreq_live.sinks.metrics import MetricsSink
    from scoreq_live.sinks.redis import BrokerAddress
    from scoreq_live.sinks.server import FeedServer, Listen

log = logging.getLogger(__name__)

MAX_BATCH = 16  # the largest batch the start-up measurement tries

Notify = Callable[[str], None]
"""Where the monitor's one-line notices go (listening addresses, a busy default port)."""


class ConfigError(ScoreqLiveError):
    """The options do not make a working monitor; the message says why."""


@dataclass(frozen=True)
class ScoringOptions:
    """The model, its mode and reference, and how audio is windowed, gated and smoothed."""

    model: str | None = None  # catalogue name or ONNX path; None: the bundled default for the mode
    model_spec: str | None = None  # TOML contract for an ONNX file
    model_kind: Literal["mos", "embedding"] | None = None
    mode: Mode | None = None  # None: what the model does
    references: Sequence[str] = ()  # clean speech files or stored reference names (mode ref)
    window_s: float | None = None  # None: the model's default window
    hop_s: float | None = None  # None: the model's hop, at most the window
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    max_batch: int | None = None  # most windows in one model run; None: measured at start (scoring/batching.py)
    min_speech: float = 0.2
    vad: int = 2
    smoothing: Literal["ema", "median"] = "ema"
    smoothing_s: float = 5.0
    # Score on an inference server: triton://HOST:8001/MODEL (gRPC) or triton+http://HOST:8000/MODEL; the
    # --model still names the contract (and, with backend_fallback "local", the model scored locally meanwhile).
    backend: str | None = None
    backend_fallback: Literal["local"] | None = None
    backend_timeout_s: float | None = None  # a request's deadline; None: see backend_timeout()


def backend_timeout(opts: ScoringOptions, hop_s: float, fast: bool = False) -> float:
    """A request's deadline: ``--backend-timeout``, else twice the hop (at least 1 s; 30 s with ``--fast``).

    A live window's answer is useful until the next window of its stream is
    due (the latency budget is the hop plus twice the run time), so a request
    that has taken two hops has missed it: failing it then lets the engine
    mark the backend down and probe it, instead of letting windows pile up
    behind a server that does not answer.  Files played ``--fast`` send
    larger batches and wait for every window, so they get a long deadline.
    """
    if opts.backend_timeout_s is not None:
        return opts.backend_timeout_s
    return 30.0 if fast else max(1.0, 2.0 * hop_s)


@dataclass(frozen=True)
class FeedOptions:
    """The live feed: websockets, and HTTP with the browser panel, ``/metrics`` and ``/ws``.

    ``ws_required``: False for the default websocket address, which is skipped
    with a notice when its port is busy; an address the user gave must work.
    ``token``: clients must present it; required beyond loopback.
    """

    ws: str | None = None  # HOST:PORT; None: no websocket server of its own
    ws_required: bool = True
    http: str | None = None  # HOST:PORT; None: no panel, no /metrics
    token: str | None = None  # the CLI fills it from --token or $SCOREQ_LIVE_TOKEN
    allowed_origins: Sequence[str] = ()
    max_clients: int = 256
    history_s: float = 300.0

    @property
    def explicit(self) -> bool:
        """The user asked for a feed (so it keeps serving after file inputs end)."""
        return self.ws_required and self.ws is not None or self.http is not None


@dataclass(frozen=True)
class IngestOptions:
    """Publishers: WebRTC (WHIP at ``/whip``) and media-stream websockets (``/media``).

    Served on the ``--http`` server, and on ``listen`` (``--whip HOST:PORT``)
    by a server of their own that serves nothing else.  ``ice_hosts``: the
    addresses WebRTC sessions gather candidates on (empty: every interface
    but loopback); ``stun``: STUN servers for a public candidate behind NAT;
    ``max_sessions``: WHIP sessions (and, apart, media websockets) at once.
    """

    listen: str | None = None
    ice_hosts: Sequence[str] = ()
    stun: Sequence[str] = ()
    max_sessions: int = 64


@dataclass(frozen=True)
class MonitorOptions:
    """Everything a monitor is: inputs, scoring, alerts, feed and outputs."""

    inputs: Sequence[str] = ()  # --input specs: 'mic', 'mic:NAME', a file, rtp://..., .sdp, pcap:FILE; NAME=...
    rtp_timeout_s: float | None = None  # an RTP sender silent this long has ended (None: the default, 5 s)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    fast: bool = False  # play files as fast as scoring allows
    duration: float | None = None  # stop after this many seconds
    alerts: Sequence[str] = ()  # rules such as "mos<3.0 for 10s" (scoreq_live.core.alerts)
    alert_webhook: str | None = None  # POST alerts here
    feed: FeedOptions | None = None  # None: no network feed
    ingest: IngestOptions = field(default_factory=IngestOptions)  # publishers, when --http or --whip is given
    bands: str | None = None  # GOOD,FAIR colour bands for the panels; None: the mode's defaults
    jsonl: str | None = None  # write every event here ('-': stdout)
    # Seconds to keep serving the feed after the inputs end; None: until stopped when the feed
    # was asked for explicitly (a dashboard may still be looking) and no duration was given, else 0.
    linger: float | None = None
    batch_wait_s: float = 0.01
    max_pending: int = 256  # --fast: windows waiting for the scorer
    # Live: seconds from a window's last sample to its score or skip; None: the hop plus twice
    # the recent model run time.  Windows that cannot make it are skipped ("overloaded").
    max_latency_s: float | None = None
    # Publish every event to Redis pub/sub (redis://HOST:6379/CHANNEL) for `scoreq-live feed --subscribe`, as
    # monitor `monitor_name` (None: this machine's host name), buffering at most `publish_buffer` events.
    publish: str | None = None
    monitor_name: str | None = None
    publish_buffer: int = 10_000

    @property
    def publishers(self) -> bool:
        """Whether publishers can send streams (WHIP, media websockets): with ``--http`` or ``--whip``."""
        return self.ingest.listen is not None or (self.feed is not None and self.feed.http is not None)

    @property
    def linger_s(self) -> float:
        if self.linger is not None:
            return self.linger
        return math.inf if self.feed is not None and self.feed.explicit and self.duration is None else 0.0


@dataclass
class LoadedScorer:
    """A model session ready to score, with the stream settings that go with it."""

    scorer: Scorer
    stream: StreamConfig
    model: OnnxModel | TritonModel
    fallback: Scorer | None = None  # --backend-fallback local: the local model, scored while the backend is down

    @property
    def mode(self) -> Mode:
        return self.stream.mode


def load_scorer(opts: ScoringOptions, progress: Progress | None = None, fast: bool = False) -> LoadedScorer:
    """The model session, its reference (mode ref) and the stream settings that go with them.

    ``progress``: called with (bytes done, total) while a published model is downloaded on first use.
    """
    # Imported here so that 'scoreq-live devices' does not pay for onnxruntime and the reference machinery.
    from scoreq_live.scoring.batching import plan_for
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.references import build_reference, combine
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.store import fingerprint
    from scoreq_live.scoring.triton import TritonModel

    mode = opts.mode
    files, stored = _split_references(opts.references)
    model_name = opts.model
    if stored and not model_name and not opts.model_spec and mode in (None, "ref"):
        # A stored reference knows its model: `--mode ref --reference office` needs nothing else.
        made_with = sorted({r.model for r in stored})
        if len(made_with) > 1:
            raise ConfigError(f"the stored references were made with different models ({', '.join(made_with)}); "
                              "give --model")
        model_name = made_with[0]
    spec = resolve_model(model_name, opts.model_spec, opts.model_kind, mode, progress=progress)
    if mode is None:
        mode = spec.mode
    if mode != spec.mode:
        what = "predicts a MOS (mode nr)" if spec.kind == "mos" else "outputs embeddings (mode ref)"
        raise ConfigError(f"model {spec.name!r} {what}; it cannot run in mode {mode!r}")
    if mode == "ref" and not opts.references:
        raise ConfigError("--mode ref needs --reference CLEAN.wav (clean speech to compare against)")
    if mode == "nr" and opts.references:
        raise ConfigError("--reference is only used with --mode ref")
    local: OnnxModel | None = None
    model: OnnxModel | TritonModel
    if opts.backend:
        model, local = _remote_model(spec, opts, fast)
    else:
        model = local = OnnxModel(spec, device=opts.device, threads=opts.threads)
    spec = model.spec
    window_s, hop_s = spec.windowing(opts.window_s, opts.hop_s)
    if isinstance(model, TritonModel) and opts.backend_timeout_s is None:
        model.timeout_s = backend_timeout(opts, hop_s, fast)
    config = StreamConfig(window_s=window_s, hop_s=hop_s, min_speech=opts.min_speech,
                          vad_aggressiveness=opts.vad, smoothing=opts.smoothing,
                          smoothing_s=opts.smoothing_s, model=spec.name, mode=mode)
    reference = None
    if mode == "ref":
        parts: list[Reference] = []
        for r in stored:
            assert spec.file is not None  # a loaded model has a file
            r.check_model(spec.name, fingerprint(spec.file), model.output_dim)
            parts.append(r.to_reference())
            if (r.window_s, r.hop_s) != (config.window_s, config.hop_s):
                log.warning("reference %r was windowed at %gs/%gs, the monitor uses %gs/%gs",
                            r.name, r.window_s, r.hop_s, config.window_s, config.hop_s)
        if files:
            try:
                # Embedded before the loop starts: locally when the model is here too, else through the backend.
                parts.append(build_reference(local or model, files, config))
            except ScoreqLiveError as e:
                raise ConfigError(f"cannot build the reference: {e}") from e
        reference = combine(parts, spec.name)
    if isinstance(model, TritonModel):
        return _remote_scorer(model, local, reference, config, opts)
    # Batch sizes measured on this machine (or --max-batch), every shape warmed before the first live window.
    plan = plan_for(model, spec.padded_length(round(config.window_s * spec.sample_rate)),
                    opts.max_batch or MAX_BATCH, given=opts.max_batch)
    log.info("%s", plan.describe())
    return LoadedScorer(Scorer(model, reference, plan=plan), config, model)


def _remote_model(spec: ModelSpec, opts: ScoringOptions, fast: bool) -> tuple[TritonModel, OnnxModel | None]:
    """The model on the ``--backend`` server, checked against the contract, and the local one for a fallback."""
    from scoreq_live.scoring.scorer import BackendUnavailable
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.triton import TritonModel, parse_backend

    if opts.backend_fallback not in (None, "local"):
        raise ConfigError(f"--backend-fallback {opts.backend_fallback!r}: the only fallback is 'local'")
    if opts.backend_timeout_s is not None and not (opts.backend_timeout_s > 0 and math.isfinite(
            opts.backend_timeout_s)):
        raise ConfigError(f"--backend-timeout must be a positive number of seconds (got {opts.backend_timeout_s:g})")
    url = parse_backend(opts.backend or "")
    local = OnnxModel(spec, device=opts.device, threads=opts.threads) if opts.backend_fallback else None
    # A provisional deadline for the checks at start; load_scorer sets the one that follows the hop.
    remote = TritonModel(local.spec if local else spec, url, backend_timeout(opts, spec.hop_s, fast), connect=False)
    try:
        remote.connect()
    except BackendUnavailable as e:
        if local is None:
            raise ConfigError(f"{e} (give --backend-fallback local to score locally until it answers)") from None
        # The fallback scores meanwhile; the engine probes the server and checks the contract when it answers.
        log.warning("%s: scoring locally until it answers", e)
    return remote, local


def _remote_scorer(model: TritonModel, local: OnnxModel | None, reference: Reference | None, config: StreamConfig,
                   opts: ScoringOptions) -> LoadedScorer:
    """Scorers for a backend: no batch sizes to measure here (the server's batcher merges requests)."""
    from scoreq_live.scoring.batching import BatchPlan

    cap = opts.max_batch or MAX_BATCH
    fallback = Scorer(local, reference, plan=BatchPlan.up_to(cap)) if local is not None else None
    return LoadedScorer(Scorer(model, reference, plan=BatchPlan.up_to(cap)), config, model, fallback)


def _split_references(refs: Sequence[str]) -> tuple[list[str], list[StoredReference]]:
    """``--reference`` values: audio files (an existing path wins) and stored references by name."""
    from scoreq_live.scoring.references import ReferenceStore

    files: list[str] = []
    stored: list[StoredReference] = []
    store = None
    for r in refs:
        if Path(r).is_file():
            files.append(r)
            continue
        store = store or ReferenceStore()
        if not store.exists(r):
            raise ConfigError(f"--reference {r}: no such file or stored reference (see 'scoreq-live reference list')")
        stored.append(store.get(r))
    return files, stored


def open_sources(opts: MonitorOptions) -> list[Input]:
    """Every input, each opened once to check it (a typo, a missing sound card, a port in use is reported now)."""
    if not opts.inputs:
        if opts.publishers:
            return []  # a monitor that only takes published streams (WHIP, media websockets)
        raise ConfigError("no --input given (or give --http / --whip and publish streams to the monitor)")
    return open_inputs(list(opts.inputs), fast=opts.fast, rtp_timeout_s=opts.rtp_timeout_s)


def open_endpoints(opts: MonitorOptions) -> IngestRoutes | None:
    """The publishers' endpoints (WHIP and media websockets) when ``--http`` or ``--whip`` is given."""
    if not opts.publishers:
        return None
    from scoreq_live.ingest.http import IngestRoutes
    from scoreq_live.ingest.ice import IceError, check_hosts
    from scoreq_live.ingest.media import MediaIngest
    from scoreq_live.ingest.whip import WhipIngest, WhipSettings
    from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S

    ing = opts.ingest
    if ing.max_sessions < 1:
        raise ConfigError(f"--max-sessions must be at least 1 (got {ing.max_sessions})")
    for url in ing.stun:
        if not url.startswith("stun:") or not url[5:]:
            raise ConfigError(f"--stun {url!r}: expected stun:HOST[:PORT], e.g. stun:stun.example.net:3478")
    try:
        hosts = check_hosts(ing.ice_hosts)
    except IceError as e:
        raise ConfigError(str(e)) from None
    timeout = opts.rtp_timeout_s or DEFAULT_TIMEOUT_S
    whip = WhipIngest(WhipSettings(ice_hosts=hosts, stun=tuple(ing.stun), max_sessions=ing.max_sessions,
                                   timeout_s=timeout))
    media = MediaIngest(timeout_s=timeout, max_sessions=ing.max_sessions)
    return IngestRoutes(whip, media)


def parse_alerts(rules: Sequence[str]) -> list[AlertRule]:
    """The ``--alert`` rules, parsed once (before the model loads, so a typo costs nothing)."""
    return [parse_rule(r) for r in rules]


@dataclass
class Monitor:
    """The parts of one monitor, built by :func:`build_monitor`; :meth:`run` runs them.

    ``sinks`` are every output, in start order; a caller may append its own
    (a terminal panel) before :meth:`run`.  ``feed`` and ``metrics`` are
    also among the sinks when the options ask for them.
    """

    options: MonitorOptions
    sources: list[Input]
    scoring: LoadedScorer
    rules: list[AlertRule]
    bands: Bands
    sinks: list[Sink] = field(default_factory=list)
    feed: FeedServer | None = None
    metrics: MetricsSink | None = None
    engine: Engine | None = None  # once running

    async def run(self) -> Engine:
        """Run until the inputs end (or ``duration``, or SIGINT/SIGTERM), then keep serving for the linger."""
        opts = self.options
        bus = EventBus()
        if self.rules:
            bus.derive.append(AlertEvaluator(self.rules).feed)  # alert events follow the score that caused them
        sink_tasks = await start_sinks(self.sinks, bus)
        engine = self.engine = Engine(
            self.scoring.scorer, self.sources,
            EngineConfig(stream=self.scoring.stream, max_batch=self.scoring.scorer.max_batch,
                         batch_wait_s=opts.batch_wait_s, max_pending=opts.max_pending, fast=opts.fast,
                         max_latency_s=opts.max_latency_s), bus, fallback=self.scoring.fallback)
        for s in self.sinks:
            s.attach(engine)
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()

        def stop() -> None:
            stopped.set()  # also ends a linger
            engine.stop()

        signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:  # a service is stopped with SIGTERM, a person presses Ctrl-C: both end streams cleanly
                loop.add_signal_handler(sig, stop)
                signals.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here
        linger = opts.linger_s
        try:
            await engine.run(duration=opts.duration)
            if linger > 0 and not stopped.is_set():
                # Inputs ended, but dashboards may still be looking: keep serving history and stream states.
                try:
                    await asyncio.wait_for(stopped.wait(), None if math.isinf(linger) else linger)
                except asyncio.TimeoutError:
                    pass
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            bus.close()
            await close_sinks(self.sinks, sink_tasks)
        return engine


def build_monitor(opts: MonitorOptions, sinks: Sequence[Sink] = (), *, notify: Notify | None = None,
                  progress: Progress | None = None, sources: list[Input] | None = None,
                  scoring: LoadedScorer | None = None) -> Monitor:
    """Check the options and build every part; a :class:`ScoreqLiveError` says what is wrong.

    Everything that needs no model is checked first (inputs, alert rules,
    addresses, the webhook URL), so a typo is reported before a model loads
    or downloads.  ``sinks`` are outputs of the caller's own, started after
    the feed.  ``sources`` and ``scoring`` reuse parts already built (tests
    that score many runs with one session).
    """
    from scoreq_live.sinks.jsonl import JsonlSink
    from scoreq_live.sinks.webhook import WebhookSink, check_url

    if opts.max_latency_s is not None and not (opts.max_latency_s > 0 and math.isfinite(opts.max_latency_s)):
        raise ConfigError(f"--max-latency must be a positive number of seconds (got {opts.max_latency_s:g})")
    sources = sources if sources is not None else open_sources(opts)
    rules = parse_alerts(opts.alerts)
    listen = _feed_addresses(opts.feed) if opts.feed is not None else (None, None)
    ingest_listen = _ingest_address(opts.ingest, *listen)
    endpoints = open_endpoints(opts)
    if endpoints is not None:
        sources = [*sources, *endpoints.inputs]
    if opts.alert_webhook:
        check_url(opts.alert_webhook)
    broker = _publish_address(opts)
    scoring = scoring or load_scorer(opts.scoring, progress=progress, fast=opts.fast)
    mode = scoring.mode
    for rule in rules:
        check_rule_mode(rule, mode)
    bands = Bands.parse(opts.bands, mode)
    monitor = Monitor(opts, sources, scoring, rules, bands)
    if opts.jsonl:
        monitor.sinks.append(JsonlSink(opts.jsonl))
    if opts.feed is not None or endpoints is not None:
        _add_feed(monitor, opts.feed or FeedOptions(ws=None), *listen, notify, endpoints, ingest_listen)
    if opts.alert_webhook:
        hook = WebhookSink(opts.alert_webhook)
        monitor.sinks.append(hook)
        if monitor.metrics is not None:
            monitor.metrics.watch_drops("webhook", lambda: hook.dropped)
    if broker is not None:
        from scoreq_live.sinks.redis import RedisPublisher

        publisher = RedisPublisher(broker, opts.monitor_name or _host_name(), buffer_size=opts.publish_buffer,
                                   notify=notify)
        monitor.sinks.append(publisher)
        if monitor.metrics is not None:
            monitor.metrics.watch_drops("redis", lambda: publisher.dropped)
    monitor.sinks += sinks
    return monitor


def _publish_address(opts: MonitorOptions) -> BrokerAddress | None:
    """``--publish`` checked before the model loads; a broker that is down is not an error (it is retried)."""
    from scoreq_live.sinks.redis import check_monitor_name, parse_broker_url

    if opts.monitor_name is not None:
        check_monitor_name(opts.monitor_name)
    if opts.publish is None:
        return None
    if opts.publish_buffer < 1:
        raise ConfigError(f"--publish-buffer must be at least 1 (got {opts.publish_buffer})")
    return parse_broker_url(opts.publish)


def _host_name() -> str:
    """The default ``--monitor-name``: this machine's name, up to its first dot ('/' cannot be in a name)."""
    import socket

    return socket.gethostname().split(".")[0].replace("/", "-") or "monitor"


def _feed_addresses(feed: FeedOptions) -> tuple[Listen | None, Listen | None]:
    from scoreq_live.sinks.server import DEFAULT_HTTP_PORT, DEFAULT_WS_PORT, parse_listen

    ws = parse_listen(feed.ws, DEFAULT_WS_PORT) if feed.ws is not None else None
    http = parse_listen(feed.http, DEFAULT_HTTP_PORT) if feed.http is not None else None
    if ws is not None and http is not None and ws.port == http.port and ws.port != 0:
        raise ConfigError(f"--ws and --http both on port {ws.port}: the HTTP server serves the feed at /ws too, "
                          "so use --no-ws or another port")
    return ws, http


def _ingest_address(ingest: IngestOptions, ws: Listen | None, http: Listen | None) -> Listen | None:
    from scoreq_live.sinks.server import DEFAULT_HTTP_PORT, parse_listen

    if ingest.listen is None:
        return None
    where = parse_listen(ingest.listen, DEFAULT_HTTP_PORT)
    for other, flag in ((ws, "--ws"), (http, "--http")):
        if other is not None and other.port == where.port and where.port != 0:
            raise ConfigError(f"--whip and {flag} both on port {where.port}"
                              + ("; the --http server serves /whip and /media too" if flag == "--http" else ""))
    return where


def _add_feed(monitor: Monitor, feed: FeedOptions, ws: Listen | None, http: Listen | None,
              notify: Notify | None, endpoints: IngestRoutes | None = None,
              ingest_listen: Listen | None = None) -> None:
    from scoreq_live.sinks.feed import FeedHub, FeedInfo
    from scoreq_live.sinks.metrics import MetricsSink
    from scoreq_live.sinks.server import FeedServer

    if ws is None and http is None and ingest_listen is None:
        return
    stream = monitor.scoring.stream
    hub = FeedHub(FeedInfo(model=stream.model, mode=stream.mode, window_s=stream.window_s, hop_s=stream.hop_s,
                           bands=monitor.bands.to_dict()), history_s=feed.history_s)
    if http is not None:
        monitor.metrics = MetricsSink(stream.model, stream.mode)
        monitor.metrics.watch_feed(hub)
        monitor.sinks.append(monitor.metrics)
    monitor.feed = FeedServer(hub, ws, http, ws_required=feed.ws_required,
                              token=feed.token, allowed_origins=feed.allowed_origins,
                              max_clients=feed.max_clients,
                              metrics=monitor.metrics.render if monitor.metrics else None, notify=notify,
                              ingest=endpoints, ingest_listen=ingest_listen)
    monitor.sinks.append(monitor.feed)


async def run_monitor(opts: MonitorOptions, sinks: Sequence[Sink] = (), *, scoring: LoadedScorer | None = None,
                      sources: list[Input] | None = None) -> Engine:
    """Build the monitor the options describe and run it (see :func:`build_monitor`)."""
    return await build_monitor(opts, sinks, scoring=scoring, sources=sources).run()
