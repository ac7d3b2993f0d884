"""One feed for many monitors: ``scoreq-live feed --subscribe redis://HOST:6379/CHANNEL``.

Monitors publish their events to Redis (``--publish``, see
:mod:`scoreq_live.sinks.redis`); the relay subscribes, turns each envelope
back into an event, names its stream ``MONITOR/STREAM`` and publishes it on a
local event bus read by the same feed server (websockets, browser panel) and
``/metrics`` a monitor has, assembled the same way (:func:`~scoreq_live.monitor.serve_parts`).

:class:`Relay` is the part without sockets: envelopes in, events out, and per
monitor the exact count of events it did not get, from the sequence
numbers: a hole in the numbers, or a heartbeat numbered beyond the last event,
is a :class:`~scoreq_live.core.events.MonitorGap` event and counts in
``/metrics``.  Numbers seen again (a batch the monitor sent twice across a
reconnection) are ignored.  A monitor's first message sets where its
numbering starts, so a relay that starts late does not count what came
before it as missing; a new ``run`` (the monitor restarted) starts afresh.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from redis.exceptions import ConnectionError as RedisConnectionError

from scoreq_live.bus import EventBus
from scoreq_live.calls.sink import StoreOptions
from scoreq_live.core.events import (
    AlertChange,
    CallRecord,
    Event,
    Mode,
    MonitorGap,
    StreamRecord,
    StreamStarted,
    event_from_dict,
)
from scoreq_live.errors import ConfigError
from scoreq_live.monitor import FeedOptions, Notify, listen_addresses, serve_parts
from scoreq_live.signals import stop_on_signals, wait_stopped
from scoreq_live.sinks.base import Sink, close_sinks, start_sinks
from scoreq_live.sinks.redis import Backoff, BrokerAddress, broker_errors, connect, parse_broker_url

log = logging.getLogger(__name__)

MAX_RUNS = 16  # runs remembered per monitor name (restarts, or processes sharing a name)


@dataclass
class MonitorTrack:
    """What the relay knows of one monitor (by name), over all its runs."""

    name: str
    run: str = ""  # the run heard from last
    # Per run, the number up to which every event was received or counted missing.  Kept per run, not per
    # name: two processes given one --monitor-name are then still counted right (and reported).
    last_seqs: dict[str, int] = field(default_factory=dict)
    received: int = 0
    missing: int = 0
    dropped: int = 0  # the monitor's own count of dropped events, from its gap records
    duplicates: int = 0
    runs: int = 0
    last_seen: float = 0.0  # relay clock
    stopped: bool = False  # the monitor said goodbye (it stopped cleanly)
    clashed: bool = False  # two runs at once: told once

    @property
    def last_seq(self) -> int:
        """The number up to which the latest run's events are accounted for."""
        return self.last_seqs.get(self.run, 0)


@dataclass
class Relay:
    """Envelopes in, events out (streams renamed ``MONITOR/STREAM``), with exact per-monitor gap counts."""

    monitors: dict[str, MonitorTrack] = field(default_factory=dict)
    malformed: int = 0

    def receive(self, data: bytes | str, now: float, wall: float | None = None) -> list[Event]:
        """The events one message carries: none, the monitor's event, and a gap event before it when events
        were missed.  ``now``: the relay's clock (for heartbeats); ``wall``: Unix time for the gap events."""
        try:
            env = json.loads(data)
            name, run, seq = env["monitor"], env["run"], env["seq"]
            if not (isinstance(name, str) and name and isinstance(run, str) and type(seq) is int and seq >= 0):
                raise ValueError("bad envelope")
            ev = event_from_dict(env["event"]) if "event" in env else None
        except (ValueError, KeyError, TypeError) as e:
            self.malformed += 1
            log.debug("relay: ignoring a message that is not a scoreq-live envelope: %s", e)
            return []
        track = self.monitors.get(name)
        if track is None:
            track = self.monitors[name] = MonitorTrack(name)
        track.last_seen = now
        out: list[Event] = []
        last = track.last_seqs.get(run)
        if last is None:
            # A monitor seen for the first time, or restarted: its numbering starts here.
            track.runs += 1
            last = seq - 1 if ev is not None else seq
            while len(track.last_seqs) >= MAX_RUNS:  # keep the newest runs only
                del track.last_seqs[next(iter(track.last_seqs))]
        elif run != track.run and not track.clashed:
            track.clashed = True
            log.warning("relay: two monitors publish as %r at once; give each its own --monitor-name", name)
        track.run = run
        track.last_seqs.pop(run, None)
        track.last_seqs[run] = last  # most recently heard last
        if isinstance(env.get("gap"), dict):
            dropped = env["gap"].get("dropped")
            if isinstance(dropped, int) and dropped > 0:
                track.dropped += dropped
        track.stopped = "bye" in env
        if ev is None:
            # A heartbeat or bye says every event up to seq was sent: those not here are lost.
            if ("heartbeat" in env or "bye" in env) and seq > last:
                out.append(self._missed(track, seq - last, wall))
                track.last_seqs[run] = seq
            return out
        if seq <= last:
            track.duplicates += 1
            return out
        if seq > last + 1:
            out.append(self._missed(track, seq - last - 1, wall))
        track.last_seqs[run] = seq
        track.received += 1
        ev.stream = f"{name}/{ev.stream}" if ev.stream else ""
        if isinstance(ev, AlertChange) and ev.id:
            ev.id = f"{name}/{ev.id}"  # alert ids are unique per monitor: make them unique across monitors
        elif isinstance(ev, StreamRecord):
            ev.monitor = name
        elif isinstance(ev, CallRecord):
            ev.monitor = name
            ev.streams = [{**s, "stream": f"{name}/{s.get('stream', '')}"} for s in ev.streams or ()
                          if isinstance(s, dict)]
        out.append(ev)
        return out

    def _missed(self, track: MonitorTrack, n: int, wall: float | None) -> MonitorGap:
        track.missing += n
        log.warning("relay: %d event(s) of monitor %r missed (%d in all, %d dropped by the monitor)",
                    n, track.name, track.missing, track.dropped)
        return MonitorGap(stream="", ts=time.time() if wall is None else wall, monitor=track.name, missing=n,
                          missing_total=track.missing, dropped_total=track.dropped)


class _RelayMetrics:
    """The relay's own numbers for ``/metrics``, read at scrape time."""

    def __init__(self, relay: Relay, brokers: dict[str, bool], heartbeat_timeout_s: float,
                 clock: Callable[[], float]) -> None:
        self.relay, self.brokers = relay, brokers
        self.heartbeat_timeout_s, self.clock = heartbeat_timeout_s, clock

    def collect(self) -> list[Metric]:
        per = ["monitor"]
        received = CounterMetricFamily("scoreq_live_relay_events", "Events received from each monitor", labels=per)
        missing = CounterMetricFamily("scoreq_live_relay_missing_events", "Events of each monitor the relay did "
                                      "not get (exact, from the monitor's sequence numbers)", labels=per)
        dropped = CounterMetricFamily("scoreq_live_relay_monitor_dropped_events", "Events each monitor reports "
                                      "having dropped while its broker was unreachable", labels=per)
        up = GaugeMetricFamily("scoreq_live_relay_monitor_up", "1 while a monitor's messages or heartbeats "
                               "arrive (0 once it stopped, or fell silent)", labels=per)
        broker = GaugeMetricFamily("scoreq_live_relay_broker_connected", "1 while subscribed to the broker",
                                   labels=["broker"])
        now = self.clock()
        for name, t in sorted(self.relay.monitors.items()):
            received.add_metric([name], t.received)
            missing.add_metric([name], t.missing)
            dropped.add_metric([name], t.dropped)
            up.add_metric([name], 1 if not t.stopped and now - t.last_seen <= self.heartbeat_timeout_s else 0)
        for where, ok in sorted(self.brokers.items()):
            broker.add_metric([where], 1 if ok else 0)
        malformed = CounterMetricFamily("scoreq_live_relay_malformed_messages", "Messages on the channel that are "
                                        "not scoreq-live envelopes (ignored)", value=self.relay.malformed)
        return [received, missing, dropped, up, broker, malformed]


@dataclass(frozen=True)
class RelayOptions:
    """A relay: the brokers to subscribe to, its feed, and outputs."""

    subscribe: Sequence[str] = ()  # redis:// URLs
    feed: FeedOptions = field(default_factory=lambda: FeedOptions(ws=None))
    mode: Mode = "nr"  # what the panel shows (bands, units); streams of the other mode are relayed as they are
    bands: str | None = None
    jsonl: str | None = None
    duration: float | None = None
    heartbeat_timeout_s: float = 10.0  # a monitor silent this long is shown as down in /metrics
    store: StoreOptions | None = None  # --store: record the monitors' calls, once, in SQLite or PostgreSQL


class RelayServer:
    """Subscribes to every broker and serves what arrives (see the module's docstring)."""

    def __init__(self, opts: RelayOptions, notify: Notify | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from scoreq_live.sinks.bands import Bands
        from scoreq_live.sinks.feed import FeedInfo
        from scoreq_live.sinks.jsonl import JsonlSink

        if not opts.subscribe:
            raise ConfigError("feed needs --subscribe redis://HOST:6379/CHANNEL (repeatable)")
        self.addresses: list[BrokerAddress] = [parse_broker_url(u, "--subscribe") for u in opts.subscribe]
        where = listen_addresses(opts.feed)
        if not where.feed:
            raise ConfigError("feed needs somewhere to serve: --ws HOST:PORT and/or --http HOST:PORT")
        self.options = opts
        self.notify = notify or (lambda line: None)
        self.clock = clock
        self.relay = Relay()
        self.brokers: dict[str, bool] = {str(a): False for a in self.addresses}
        info = FeedInfo(model="", mode=opts.mode, window_s=0.0, hop_s=0.0,
                        bands=Bands.parse(opts.bands, opts.mode).to_dict())
        served = serve_parts(opts.feed, where, info, metrics_model="relay", notify=self.notify,
                             store=opts.store.target if opts.store is not None else None)
        assert served.feed is not None  # where.feed: it is served
        self.feed, self.hub, self.metrics, self.sites = served.feed, served.feed.hub, served.metrics, served.sites
        if self.metrics is not None:
            self.metrics.registry.register(_RelayMetrics(self.relay, self.brokers, opts.heartbeat_timeout_s, clock))
        self.sinks: list[Sink] = []
        if opts.jsonl:
            self.sinks.append(JsonlSink(opts.jsonl))
        if opts.store is not None:
            from scoreq_live.calls.sink import StoreSink

            # The monitors send their records; the relay writes them and the timelines under MONITOR/STREAM.
            self.sinks.append(StoreSink(replace(opts.store, relay=True)))
        self.sinks += served.sinks
        self._models: list[str] = []
        self.ping_s = 10.0  # a subscription quiet this long is pinged; no answer in as long again: reconnect

    def _describe(self, ev: StreamStarted) -> None:
        """The hello names the models of the streams relayed, and the windowing of the first."""
        info = self.hub.info
        if ev.model and ev.model not in self._models:
            self._models.append(ev.model)
            info = replace(info, model=",".join(self._models))
        if not info.window_s:
            info = replace(info, window_s=ev.window_s, hop_s=ev.hop_s)
        self.hub.info = info

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM (or the duration)."""
        from scoreq_live.http.site import serving

        bus = EventBus()
        async with serving(self.sites):
            sink_tasks = await start_sinks(self.sinks, bus)
            subscribers = [asyncio.create_task(self._subscribe(a, bus), name=f"subscribe {a}")
                           for a in self.addresses]
            stopped = asyncio.Event()
            try:
                with stop_on_signals(stopped.set):
                    await wait_stopped(stopped, self.options.duration)
            finally:
                for t in subscribers:
                    t.cancel()
                await asyncio.gather(*subscribers, return_exceptions=True)
                bus.close()
                await close_sinks(self.sinks, sink_tasks)

    def publish(self, data: bytes | str, bus: EventBus) -> None:
        """One message from a broker onto the bus."""
        for ev in self.relay.receive(data, self.clock()):
            if isinstance(ev, StreamStarted):
                self._describe(ev)
            bus.publish(ev)

    async def _subscribe(self, address: BrokerAddress, bus: EventBus) -> None:
        """Subscribe, relay, and on a lost broker resubscribe with backoff, for ever."""
        backoff = Backoff()
        where = str(address)
        lost_at: float | None = None
        first = True
        while True:
            client = connect(address, 5.0, read_timeout=False)
            pubsub = client.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(address.channel), 5.0)
                self.brokers[where] = True
                backoff.reset()
                if first or lost_at is not None:
                    self.notify(f"relay: subscribed to {where}" + (
                        "" if lost_at is None else f" again after {time.monotonic() - lost_at:.1f}s"))
                first, lost_at = False, None
                pinged = False
                while True:
                    msg = await pubsub.get_message(timeout=self.ping_s)
                    if msg is None:  # a quiet channel, or a broker gone silently: a ping tells them apart
                        if pinged:
                            raise RedisConnectionError(f"no answer to a ping within {self.ping_s:g}s")
                        await pubsub.ping()
                        pinged = True
                        continue
                    pinged = False
                    if msg.get("type") == "message":
                        self.publish(msg["data"], bus)
            except broker_errors() as e:
                self.brokers[where] = False
                if lost_at is None:
                    lost_at = time.monotonic()
                    self.notify(f"relay: {where} unreachable ({e or type(e).__name__}); retrying")
            finally:
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception:  # the connection is gone anyway
                    pass
            await asyncio.sleep(backoff.next())

