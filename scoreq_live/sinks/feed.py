"""The live feed's state, without sockets: history, stream states, per-client queues.

:class:`FeedHub` is fed every event (:meth:`FeedHub.publish`) and keeps, per
stream, its state and the last ``history_s`` seconds (stream time) of
events, already serialised once for every client.  A client
(:meth:`FeedHub.connect`) first gets ``hello``, the history of the streams it
subscribed to and ``history_end``; then live events go into its own bounded
queue, which drops its oldest frames when the client falls behind and tells
it so with one ``dropped`` frame.  The I/O layer (:mod:`scoreq_live.sinks.server`)
only moves the frames that :meth:`FeedClient.take` returns to a socket.
Time is passed in, so all of this is tested without sockets or sleeps.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from scoreq_live import __version__
from scoreq_live.core.events import (
    SCHEMA_VERSION,
    AlertEvent,
    BackendStatus,
    ClearedEvent,
    Event,
    InputDropped,
    Mode,
    ModelScore,
    ScoreEvent,
    StreamEnded,
    StreamError,
    StreamRecord,
    StreamStarted,
    StreamState,
    state_after,
)
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.queues import DropOldest
from scoreq_live.sinks.bands import Bands

ALL = None  # a subscription to every stream
MAX_SUBSCRIBED = 1000  # names in one subscription
MAX_NAME = 256  # characters in one stream name of a subscription


def _frame(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def default_bands(mode: Mode, bands: tuple[float, float] | None = None) -> dict[str, Any]:
    """Colour bands for the panel as ``hello`` carries them (see :class:`scoreq_live.sinks.bands.Bands`)."""
    return Bands.for_mode(mode, bands).to_dict()


NOTES_KEPT = 16  # error frames kept for a client whose new snapshot is pending (the latest)


@dataclass(frozen=True)
class FeedInfo:
    """What ``hello`` says about the monitor."""

    model: str
    mode: Mode
    window_s: float
    hop_s: float
    bands: dict[str, Any] = field(default_factory=dict)
    server: str = f"scoreq-live {__version__}"


class SubscriptionError(ScoreqLiveError):
    """A subscription the feed cannot take; the message says why."""


def parse_streams(value: str | Iterable[str] | None) -> frozenset[str] | None:
    """A subscription from ``?streams=a,b`` or a subscribe message's ``streams``.

    None, ``""``, ``"*"`` and an empty list mean every stream (returns None).
    """
    if value is None:
        return ALL
    if isinstance(value, str):
        names = [] if value.strip() == "*" else [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = list(value)
        if not all(isinstance(s, str) for s in names):
            raise SubscriptionError("streams must be a list of stream names (strings) or \"*\"")
    else:
        raise SubscriptionError("streams must be a list of stream names (strings) or \"*\"")
    names = [s for s in names if s]
    if not names or "*" in names:
        return ALL
    if len(names) > MAX_SUBSCRIBED or any(len(s) > MAX_NAME for s in names):
        raise SubscriptionError(f"at most {MAX_SUBSCRIBED} streams of at most {MAX_NAME} characters")
    return frozenset(names)


class FeedClient:
    """One connected client: its subscription and the frames waiting for it."""

    def __init__(self, streams: frozenset[str] | None, maxsize: int) -> None:
        self.streams = streams
        self.maxsize = maxsize
        self._snapshot: list[bytes] = []  # hello + history + history_end: sent whole, never dropped
        # A subscription changed and its snapshot is not made yet: it is made when the client takes its frames,
        # so that a storm of subscribe messages from a client that does not read costs a flag each, not a copy
        # of the whole history each (live events meanwhile are in that snapshot; notes wait beside it).
        self._resubscribed: Callable[[FeedClient], list[bytes]] | None = None
        self._notes: list[bytes] = []  # error frames answering its messages meanwhile (the latest few)
        self._queue: DropOldest[bytes] = DropOldest(maxsize)  # drop-oldest: the newest state matters most
        self._unreported = 0  # frames lost since the last `dropped` notice
        self._lost_upstream = 0  # frames the feed itself missed (its bus subscription overflowed)
        self.pending_since: float | None = None  # when frames started waiting untaken
        self.on_ready: Callable[[], None] | None = None  # called when frames become available
        self.closed = False

    def wants(self, stream: str) -> bool:
        return self.streams is None or stream in self.streams

    @property
    def dropped(self) -> int:
        """Frames this client lost in all: dropped from its queue, or missed by the feed."""
        return self._queue.dropped + self._lost_upstream

    @property
    def pending(self) -> int:
        """Frames waiting to be taken (including a pending ``dropped`` notice)."""
        return (len(self._snapshot) + len(self._queue) + len(self._notes) + (1 if self._unreported else 0)
                + (1 if self._resubscribed is not None else 0))

    def _ready(self, now: float) -> None:
        if self.pending_since is None:
            self.pending_since = now
            if self.on_ready is not None:
                self.on_ready()

    def _put(self, frame: bytes, now: float) -> None:
        if self._resubscribed is not None:  # the snapshot still to be made covers it
            return
        if self._queue.put(frame):
            self._unreported += 1
        self._ready(now)

    def _note(self, frame: bytes, now: float) -> None:
        """A frame of its own (an ``error`` answering a message): queued, or kept beside a pending snapshot."""
        if self._resubscribed is None:
            self._put(frame, now)
            return
        self._notes = [*self._notes[-(NOTES_KEPT - 1):], frame]
        self._ready(now)

    def _lost(self, n: int, now: float) -> None:
        self._unreported += n
        self._lost_upstream += n
        self._ready(now)

    def take(self, now: float) -> list[bytes]:
        """Every frame now due, in order; a ``dropped`` notice stands where frames were lost."""
        if self._resubscribed is not None:
            self._snapshot, self._resubscribed = self._resubscribed(self), None
        out = self._snapshot
        self._snapshot = []
        if self._notes:
            out += self._notes
            self._notes = []
        if self._unreported:
            out.append(_frame({"v": SCHEMA_VERSION, "type": "dropped", "count": self._unreported}))
            self._unreported = 0
        out.extend(self._queue.take_all())
        self.pending_since = None
        return out


@dataclass
class _Stream:
    name: str
    state: StreamState = "live"
    source: str = ""
    detail: str = ""
    error: str | None = None
    started: tuple[int, bytes] | None = None  # kept whatever its age: it says what the stream is
    timeline: deque[tuple[int, float, bytes]] = field(default_factory=deque)  # (seq, stream time, frame)
    errors: deque[tuple[int, bytes]] = field(default_factory=lambda: deque(maxlen=10))  # (seq, frame)
    ended_at: float | None = None  # hub time the stream ended, for forgetting it later

    def info(self) -> dict[str, Any]:
        return {"stream": self.name, "state": self.state, "source": self.source, "detail": self.detail,
                "error": self.error}

    def history(self) -> list[tuple[int, bytes]]:
        out = [self.started] if self.started else []
        out += [(seq, frame) for seq, _, frame in self.timeline]
        out += list(self.errors)
        out.sort(key=lambda x: x[0])
        return out


class FeedHub:
    """History, stream states, active alerts and the connected clients' queues.

    ``history_s``: seconds of stream time kept per stream (and how long an
    ended stream is remembered); ``queue_size``: live frames a client may have
    waiting before its oldest are dropped; ``stall_s``: a client that takes no
    frame for this long while frames wait is reported by :meth:`stalled`.
    """

    def __init__(self, info: FeedInfo, history_s: float = 300.0, queue_size: int = 4096,
                 stall_s: float = 10.0, max_history_events: int = 20_000, max_ended_streams: int = 1000) -> None:
        self.info = info
        self.history_s = history_s
        self.queue_size = queue_size
        self.stall_s = stall_s
        self.max_history_events = max_history_events
        self.max_ended_streams = max_ended_streams
        self.streams: dict[str, _Stream] = {}
        self.alerts: dict[str, dict[str, Any]] = {}  # id -> alert event, while active
        self.clients: set[FeedClient] = set()
        self.published = 0
        self.dropped = 0  # frames dropped for slow clients, all clients together
        self.disconnected: Counter[str] = Counter()  # reason -> clients
        self.backend: bytes | None = None  # the latest backend status event (--backend), as sent
        self._seq = 0

    # -- events in ------------------------------------------------------------

    def publish(self, ev: Event, now: float) -> None:
        """Take one event: update state and history, queue it for the clients that want it."""
        frame = ev.to_json().encode()  # serialised once, shared by every client
        self._seq += 1
        self.published += 1
        self._record(ev, self._seq, frame, now)
        for c in self.clients:
            if c.streams is None or ev.stream in c.streams:
                before = c.dropped
                c._put(frame, now)
                self.dropped += c.dropped - before

    def lost(self, n: int, now: float) -> None:
        """The feed itself missed ``n`` events (its bus subscription overflowed): tell every client."""
        for c in self.clients:
            c._lost(n, now)
        self.dropped += n * len(self.clients)

    def _stream(self, name: str) -> _Stream:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = _Stream(name)
        return s

    def _record(self, ev: Event, seq: int, frame: bytes, now: float) -> None:
        if isinstance(ev, StreamStarted):
            # A stream that starts again starts clean.
            s = self.streams[ev.stream] = _Stream(ev.stream, source=ev.source, detail=ev.detail)
            s.started = (seq, frame)
            self._expire(now)
            return
        if isinstance(ev, BackendStatus):
            self.backend = frame  # the latest only: a new client is told the backend's state after hello
            return
        if not ev.stream or isinstance(ev, StreamRecord):
            # A monitor-wide event (a relay's gap, a call record) or a stream's record (it follows the end, and
            # the history is the stream's own events): live clients get it, a new client's history does not.
            return
        s = self._stream(ev.stream)
        state = state_after(ev)
        if state is not None:
            s.state, s.ended_at = state, (None if state == "live" else now)
        if isinstance(ev, (ScoreEvent, ModelScore)):
            self._keep(s, seq, ev.t_end, frame)
        elif isinstance(ev, AlertEvent):
            self.alerts[ev.id] = ev.to_dict()
            self._keep(s, seq, ev.t, frame)
        elif isinstance(ev, ClearedEvent):
            self.alerts.pop(ev.id, None)
            self._keep(s, seq, ev.t, frame)
        elif isinstance(ev, (StreamEnded, InputDropped)):
            self._keep(s, seq, ev.t, frame)
        elif isinstance(ev, StreamError):
            s.error = ev.error
            s.errors.append((seq, frame))

    def _keep(self, s: _Stream, seq: int, t: float, frame: bytes) -> None:
        s.timeline.append((seq, t, frame))
        horizon = t - self.history_s
        tl = s.timeline
        while tl and (tl[0][1] < horizon or len(tl) > self.max_history_events):
            tl.popleft()

    def _expire(self, now: float) -> None:
        """Forget streams that ended more than ``history_s`` ago (so the hello stays bounded)."""
        ended = sorted((s.ended_at, name) for name, s in self.streams.items() if s.ended_at is not None)
        excess = len(ended) - self.max_ended_streams
        for i, (at, name) in enumerate(ended):
            if i < excess or now - at > self.history_s:
                del self.streams[name]

    # -- clients ------------------------------------------------------------------

    def connect(self, streams: frozenset[str] | None, now: float) -> FeedClient:
        """A new client: its first frames (hello, history, history_end) are ready to take."""
        self._expire(now)
        c = FeedClient(streams, self.queue_size)
        c._snapshot = self._snapshot(c)
        self.clients.add(c)
        c._ready(now)
        return c

    def disconnect(self, client: FeedClient, reason: str = "closed") -> None:
        """Forget a client (idempotent)."""
        if client in self.clients:
            self.clients.discard(client)
            self.disconnected[reason] += 1
        client.closed = True
        if client.on_ready is not None:
            client.on_ready()  # wake its writer so that it sees `closed`

    def subscribe(self, client: FeedClient, streams: frozenset[str] | None, now: float) -> None:
        """Replace a client's subscription: it gets a fresh hello, history and history_end.

        Frames still queued for the old subscription are discarded: the new
        history covers everything up to now, so nothing is lost or doubled.
        """
        client.streams = streams
        client._queue.clear()
        client._unreported = 0
        client._snapshot = []
        client._resubscribed = self._snapshot  # made when the client takes it (see FeedClient._resubscribed)
        client._ready(now)

    def handle_message(self, client: FeedClient, data: str | bytes, now: float) -> None:
        """A message from a client; a bad one gets an ``error`` frame, the connection stays."""
        msg: Any
        try:
            msg = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return self._error(client, 'messages are JSON objects, e.g. {"type":"subscribe","streams":["a"]}', now)
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            kind = msg.get("type") if isinstance(msg, dict) else None
            return self._error(client, f"unknown message type {kind!r}; the feed accepts 'subscribe'", now)
        try:
            streams = parse_streams(msg.get("streams"))
        except SubscriptionError as e:
            return self._error(client, str(e), now)
        self.subscribe(client, streams, now)

    def _error(self, client: FeedClient, message: str, now: float) -> None:
        client._note(_frame({"v": SCHEMA_VERSION, "type": "error", "error": message}), now)

    def stalled(self, now: float) -> list[FeedClient]:
        """Clients that have taken no frame for more than ``stall_s`` while frames waited."""
        return [c for c in self.clients
                if c.pending_since is not None and now - c.pending_since > self.stall_s]

    def hello(self, client: FeedClient) -> dict[str, Any]:
        """The ``hello`` message for a client: the monitor, every stream's state, its active alerts."""
        i = self.info
        return {
            "v": SCHEMA_VERSION, "type": "hello", "server": i.server, "schema": SCHEMA_VERSION,
            "model": i.model, "mode": i.mode, "window_s": i.window_s, "hop_s": i.hop_s,
            "history_s": self.history_s, "bands": i.bands,
            "subscribed": "*" if client.streams is None else sorted(client.streams),
            "streams": [s.info() for s in self.streams.values()],
            "alerts": [a for a in self.alerts.values() if client.wants(a["stream"])],
        }

    def _snapshot(self, client: FeedClient) -> list[bytes]:
        histories = [s.history() for s in self.streams.values() if client.wants(s.name)]
        frames = [_frame(self.hello(client))]
        if self.backend is not None:
            frames.append(self.backend)
        frames += [frame for _, frame in heapq.merge(*histories, key=lambda x: x[0])]
        frames.append(_frame({"v": SCHEMA_VERSION, "type": "history_end"}))
        return frames
