"""Putting a monitor together: options in, typed parts out, then run.

As uvicorn splits ``Config`` from ``Server``: :class:`MonitorOptions` holds
every setting (inputs, model and windows, alerts, feed, outputs) as plain
data; :func:`build_monitor` checks them and builds the parts (sources,
scorer, alert rules, feed server, HTTP sites, metrics, webhook) into a
:class:`Monitor`, whose :meth:`Monitor.run` only runs them.  What listens on
the network is assembled by :func:`serve_parts`, for the relay
(:mod:`scoreq_live.relay`) as for the monitor.  The command line turns flags into
options and nothing more, so a program embedding scoreq-live builds the same
monitor the command line does.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scoreq_live.bus import EventBus
from scoreq_live.calls.record import Recorder
from scoreq_live.core.alerts import AlertEvaluator, AlertRule, check_rule_mode, parse_rule
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.errors import ConfigError
from scoreq_live.scoring.load import LoadedScorer, ScoringOptions, load_scorer
from scoreq_live.scoring.runner import runner_for
from scoreq_live.signals import stop_on_signals, wait_stopped
from scoreq_live.sinks.bands import Bands
from scoreq_live.sinks.base import Sink, close_sinks, start_sinks
from scoreq_live.sources import Input, open_inputs

if TYPE_CHECKING:
    from scoreq_live.calls.sink import StoreOptions
    from scoreq_live.http.policy import Listen
    from scoreq_live.http.site import HttpSite
    from scoreq_live.ingest.http import IngestRoutes
    from scoreq_live.scoring.download import Progress
    from scoreq_live.sinks.feed import FeedInfo
    from scoreq_live.sinks.metrics import MetricsSink
    from scoreq_live.sinks.redis import BrokerAddress
    from scoreq_live.sinks.server import FeedServer
    from scoreq_live.sip.siprec import SiprecOptions

log = logging.getLogger(__name__)

Notify = Callable[[str], None]
"""Where the monitor's one-line notices go (listening addresses, a busy default port)."""


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

    Served on the ``--http`` site, and on ``listen`` (``--whip HOST:PORT``)
    by a site of their own that serves nothing else.  ``ice_hosts``: the
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
    max_calls: int = 10_000  # SIP calls followed at once by a live capture (sniff:); SIPREC sessions at once
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
    store: StoreOptions | None = None  # --store: call records and timelines kept in SQLite or PostgreSQL
    siprec: SiprecOptions | None = None  # --siprec: a SIPREC recording server whose recorded calls are scored

    @property
    def publishers(self) -> bool:
        """Whether publishers can send streams (WHIP, media websockets): with ``--http`` or ``--whip``."""
        return self.ingest.listen is not None or (self.feed is not None and self.feed.http is not None)

    @property
    def linger_s(self) -> float:
        if self.linger is not None:
            return self.linger
        return math.inf if self.feed is not None and self.feed.explicit and self.duration is None else 0.0


def open_sources(opts: MonitorOptions) -> list[Input]:
    """Every input, each opened once to check it (a typo, a missing sound card, a port in use is reported now)."""
    if not opts.inputs:
        if opts.publishers or opts.siprec is not None:
            return []  # a monitor that only takes published streams (WHIP, media websockets, SIPREC)
        raise ConfigError("no --input given (or give --http / --whip and publish streams to the monitor, or "
                          "--siprec HOST:PORT for recorded calls)")
    if opts.max_calls < 1:
        raise ConfigError(f"--max-calls must be at least 1 (got {opts.max_calls})")
    from scoreq_live.sources import InputOptions

    return open_inputs(list(opts.inputs), options=InputOptions(fast=opts.fast, timeout_s=opts.rtp_timeout_s,
                                                               max_calls=opts.max_calls))


def open_endpoints(opts: MonitorOptions) -> IngestRoutes | None:
    """The publishers' endpoints (WHIP and media websockets) when ``--http`` or ``--whip`` is given."""
    if not opts.publishers:
        return None
    from scoreq_live.ingest.http import IngestRoutes
    from scoreq_live.ingest.ice import IceError, check_hosts
    from scoreq_live.ingest.media import MediaIngest
    from scoreq_live.ingest.whip import WhipIngest
    from scoreq_live.sources import InputOptions
    from scoreq_live.sources import open_endpoints as endpoint_inputs

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
    # The endpoint rows of the input table (sources.SCHEMES), opened with the monitor's settings.
    endpoints = endpoint_inputs(InputOptions(fast=opts.fast, timeout_s=opts.rtp_timeout_s, ice_hosts=hosts,
                                             stun=tuple(ing.stun), max_sessions=ing.max_sessions))
    whip = next((e for e in endpoints if isinstance(e, WhipIngest)), None)
    media = next((e for e in endpoints if isinstance(e, MediaIngest)), None)
    return IngestRoutes(whip, media)


def parse_alerts(rules: Sequence[str], scoring: ScoringOptions | None = None) -> list[AlertRule]:
    """The ``--alert`` rules, parsed once (before the model loads, so a typo costs nothing).

    A bare model name is a metric when that model is one of the additional ones (its one score).
    """
    from pathlib import Path

    models = {Path(m).stem if m.endswith((".onnx", ".toml")) else m for m in (scoring.extra_models if scoring else ())}
    return [parse_rule(r, models) for r in rules]


@dataclass
class Monitor:
    """The parts of one monitor, built by :func:`build_monitor`; :meth:`run` runs them.

    ``sinks`` are every output, in start order; a caller may append its own
    (a terminal panel) before :meth:`run`.  ``feed`` and ``metrics`` are
    also among the sinks when the options ask for them.  ``sites`` are the
    HTTP listeners (``--http``, ``--whip``): they listen before the sinks
    start and stop after the sinks have closed.
    """

    options: MonitorOptions
    sources: list[Input]
    scoring: LoadedScorer
    rules: list[AlertRule]
    bands: Bands
    sinks: list[Sink] = field(default_factory=list)
    feed: FeedServer | None = None
    metrics: MetricsSink | None = None
    sites: list[HttpSite] = field(default_factory=list)
    engine: Engine | None = None  # once running

    async def run(self) -> Engine:
        """Run until the inputs end (or ``duration``, or SIGINT/SIGTERM), then keep serving for the linger."""
        from scoreq_live.http.site import serving

        opts = self.options
        bus = EventBus()
        if self.rules:
            bus.derive.append(AlertEvaluator(self.rules).feed)  # alert events follow the score that caused them
        # A stream's record follows its end, a call's the end of its last stream (and sees the alerts above).
        bus.derive.append(Recorder({self.scoring.mode: self.bands}).feed)
        async with serving(self.sites):
            sink_tasks = await start_sinks(self.sinks, bus)
            engine = self.engine = Engine(
                self.scoring.scorer, self.sources,
                EngineConfig(stream=self.scoring.stream, max_batch=self.scoring.scorer.max_batch,
                             batch_wait_s=opts.batch_wait_s, max_pending=opts.max_pending, fast=opts.fast,
                             max_latency_s=opts.max_latency_s), bus, fallback=self.scoring.fallback,
                extra=[(x.stream, runner_for(x.scorer)) for x in self.scoring.extra])
            for s in self.sinks:
                s.attach(engine)
            stopped = asyncio.Event()

            def stop() -> None:
                stopped.set()  # also ends a linger
                engine.stop()

            linger = opts.linger_s
            try:
                with stop_on_signals(stop):
                    await engine.run(duration=opts.duration)
                    if linger > 0 and not stopped.is_set():
                        # Inputs ended, but dashboards may still be looking: keep serving history and stream states.
                        await wait_stopped(stopped, linger)
            finally:
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
    rules = parse_alerts(opts.alerts, opts.scoring)
    where = listen_addresses(opts.feed, opts.ingest.listen)
    endpoints = open_endpoints(opts)
    if endpoints is not None:
        sources = [*sources, *endpoints.inputs]
    if opts.siprec is not None:
        from scoreq_live.sip.siprec import SiprecServer
        from scoreq_live.sources import InputOptions

        recorder = SiprecServer(opts.siprec, InputOptions(timeout_s=opts.rtp_timeout_s).sender_timeout_s)
        recorder.check()  # its port, before the model loads
        sources = [*sources, recorder]
    if opts.alert_webhook:
        check_url(opts.alert_webhook)
    broker = _publish_address(opts)
    scoring = scoring or load_scorer(opts.scoring, progress=progress, fast=opts.fast)
    mode = scoring.mode
    names = (*scoring.scorer.names, *(n for x in scoring.extra for n in x.names))
    for rule in rules:
        check_rule_mode(rule, mode, names)
    bands = Bands.parse(opts.bands, mode)
    monitor = Monitor(opts, sources, scoring, rules, bands)
    if opts.jsonl:
        monitor.sinks.append(JsonlSink(opts.jsonl))
    if opts.store is not None:
        from scoreq_live.calls.sink import StoreSink

        monitor.sinks.append(StoreSink(opts.store))
    if where.feed or endpoints is not None:
        _add_served(monitor, opts.feed or FeedOptions(ws=None), where, notify, endpoints)
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


@dataclass(frozen=True)
class Addresses:
    """Where a monitor or a relay listens: the feed's own websockets, the HTTP site, the publishers' site."""

    ws: Listen | None = None  # --ws
    http: Listen | None = None  # --http: the panel, /metrics, the feed at /ws, the publishers' endpoints
    whip: Listen | None = None  # --whip: the publishers' endpoints alone

    @property
    def feed(self) -> bool:
        """Whether the feed is served (on its own websockets, or on the HTTP site)."""
        return self.ws is not None or self.http is not None


def listen_addresses(feed: FeedOptions | None, whip: str | None = None) -> Addresses:
    """The addresses ``feed`` (``--ws``, ``--http``) and ``whip`` (``--whip``) ask for, read and checked.

    Checked before anything loads: a typo or two servers on one port is reported at once.
    """
    from scoreq_live.http.policy import parse_listen
    from scoreq_live.http.site import DEFAULT_HTTP_PORT
    from scoreq_live.sinks.server import DEFAULT_WS_PORT

    ws = parse_listen(feed.ws, DEFAULT_WS_PORT) if feed is not None and feed.ws is not None else None
    http = parse_listen(feed.http, DEFAULT_HTTP_PORT) if feed is not None and feed.http is not None else None
    if ws is not None and http is not None and ws.port == http.port and ws.port != 0:
        raise ConfigError(f"--ws and --http both on port {ws.port}: the HTTP server serves the feed at /ws too, "
                          "so use --no-ws or another port")
    own = parse_listen(whip, DEFAULT_HTTP_PORT) if whip is not None else None
    for other, flag in ((ws, "--ws"), (http, "--http")):
        if own is not None and other is not None and other.port == own.port and own.port != 0:
            raise ConfigError(f"--whip and {flag} both on port {own.port}"
                              + ("; the --http server serves /whip and /media too" if flag == "--http" else ""))
    return Addresses(ws, http, own)


@dataclass
class Served:
    """What a monitor or a relay serves on the network, built by :func:`serve_parts`.

    ``feed`` (its own websockets, ``/ws`` on the HTTP site) and ``metrics``
    are sinks (:attr:`sinks`); ``sites`` are the HTTP listeners.
    """

    feed: FeedServer | None = None
    metrics: MetricsSink | None = None
    sites: list[HttpSite] = field(default_factory=list)

    @property
    def sinks(self) -> list[Sink]:
        """The sinks among them, in start order."""
        return [s for s in (self.metrics, self.feed) if s is not None]


def serve_parts(feed: FeedOptions, where: Addresses, info: FeedInfo, *, metrics_model: str | None = None,
                endpoints: IngestRoutes | None = None, notify: Notify | None = None,
                store: str | None = None) -> Served:
    """The feed, the metrics and the HTTP sites ``where`` asks for, each site with the routes it serves.

    The one place routes are put on sites: the ``--http`` site serves the
    panel, ``/metrics``, the feed at ``/ws`` and ``endpoints`` (WHIP,
    ``/media``); the ``--whip`` site serves ``endpoints`` alone, and no feed
    is built for it.  ``info``: what the feed's ``hello`` says;
    ``metrics_model``: the model ``/metrics`` names (default: ``info``'s).
    Every site and the feed share one policy: ``feed``'s token and origins.
    ``store``: the call records the ``--http`` site serves at ``/api/calls``
    (for the history page).
    """
    from scoreq_live.calls.api import CallsRoutes
    from scoreq_live.calls.store import Store
    from scoreq_live.http.policy import SitePolicy
    from scoreq_live.http.routes import MetricsRoutes, PanelRoutes
    from scoreq_live.http.site import HttpSite
    from scoreq_live.sinks.feed import FeedHub
    from scoreq_live.sinks.metrics import MetricsSink
    from scoreq_live.sinks.policy import PANEL_DIR
    from scoreq_live.sinks.server import FeedServer

    policy = SitePolicy(token=feed.token, allowed_origins=frozenset(feed.allowed_origins))
    served = Served()
    if where.feed:
        hub = FeedHub(info, history_s=feed.history_s)
        served.feed = FeedServer(hub, where.ws, ws_required=feed.ws_required, policy=policy,
                                 max_clients=feed.max_clients, notify=notify)
    if where.http is not None:
        served.metrics = MetricsSink(info.model if metrics_model is None else metrics_model, info.mode)
        site = HttpSite(where.http, policy, flag="--http", notify=notify)
        site.add(PanelRoutes(PANEL_DIR), MetricsRoutes(served.metrics.render),
                 CallsRoutes(Store(store) if store is not None else None, info.mode, info.bands))
        if served.feed is not None:
            served.metrics.watch_feed(served.feed.hub)
            site.add(served.feed)
        if endpoints is not None:
            site.add(endpoints)
        served.sites.append(site)
    if where.whip is not None and endpoints is not None:
        served.sites.append(HttpSite(where.whip, policy, flag="--whip", notify=notify).add(endpoints))
    return served


def _add_served(monitor: Monitor, feed: FeedOptions, where: Addresses, notify: Notify | None,
                endpoints: IngestRoutes | None) -> None:
    from scoreq_live.sinks.feed import FeedInfo

    stream = monitor.scoring.stream
    info = FeedInfo(model=stream.model, mode=stream.mode, window_s=stream.window_s, hop_s=stream.hop_s,
                    bands=monitor.bands.to_dict())
    store = monitor.options.store
    served = serve_parts(feed, where, info, endpoints=endpoints, notify=notify,
                         store=store.target if store is not None else None)
    monitor.feed, monitor.metrics, monitor.sites = served.feed, served.metrics, served.sites
    monitor.sinks += served.sinks


async def run_monitor(opts: MonitorOptions, sinks: Sequence[Sink] = (), *, scoring: LoadedScorer | None = None,
                      sources: list[Input] | None = None) -> Engine:
    """Build the monitor the options describe and run it (see :func:`build_monitor`)."""
    return await build_monitor(opts, sinks, scoring=scoring, sources=sources).run()
