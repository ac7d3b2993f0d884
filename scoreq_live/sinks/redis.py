"""Publish every event to Redis pub/sub (``--publish redis://HOST:6379/CHANNEL``), for one feed of many monitors.

Each event goes out as one JSON message on the channel, wrapped in an
envelope that names the monitor and numbers its events::

    {"v": 1, "monitor": "edge-1", "run": "5f0c9a1e", "seq": 42, "event": {...}}

``seq`` counts this monitor run's events from 1 with no holes, so a
subscriber (``scoreq-live feed --subscribe``) knows exactly how many it did
not get; ``run`` changes when the monitor restarts (and ``seq`` starts
again).  Two more envelopes carry no event, only the numbering::

    {"v": 1, "monitor": ..., "run": ..., "seq": 57, "gap": {"dropped": 15, "since": T0, "until": T1}}
    {"v": 1, "monitor": ..., "run": ..., "seq": 60, "heartbeat": T}
    {"v": 1, "monitor": ..., "run": ..., "seq": 64, "bye": T}

A ``gap`` says the monitor itself dropped ``dropped`` events from its full
buffer while the broker was out of reach, between ``since`` and ``until``
(Unix time); ``seq`` is the last number given so far.  A ``heartbeat``, sent
when the monitor has had nothing to send for a while, says every event up to
``seq`` has been published or dropped: it lets a subscriber count events lost
at the end of an outage, and notice a monitor that has gone.  ``bye`` is the
last message of a monitor that stops (a heartbeat that says no more will come).  What a
subscriber misses is exact from the numbers alone; ``gap`` says how much of
it the monitor dropped (rather than the broker or the subscriber losing it).

Publishing never waits for the broker: the sink copies its bus subscription
into its own bounded buffer (oldest dropped first, counted in
:attr:`RedisPublisher.dropped`); a sender task publishes what is buffered in
batches (one pipelined round trip per batch), reconnects with backoff when the
broker goes away, and sends the ``gap`` record first once it is back.  An
unreachable broker at start is reported and retried; scoring starts anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from scoreq_live.bus import Subscription
from scoreq_live.core.events import Event
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.sinks.base import Sink

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "scoreq-live"
DEFAULT_PORT = 6379
ENVELOPE_VERSION = 1


class BrokerError(ScoreqLiveError):
    """A broker URL that cannot be used."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where to publish or subscribe: the Redis connection URL and the pub/sub channel."""

    url: str  # redis[s]://[user:password@]host:port, for redis-py (the channel is not part of it)
    channel: str

    def __str__(self) -> str:
        """The address without its password, for messages and logs."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{parts.scheme}://{host}:{parts.port or DEFAULT_PORT}/{self.channel}"


def parse_broker_url(url: str, flag: str = "--publish") -> BrokerAddress:
    """``redis://[user:password@]HOST[:PORT][/CHANNEL]`` (or ``rediss://`` for TLS) as a :class:`BrokerAddress`.

    The path is the pub/sub channel (default ``scoreq-live``), not a database
    number: pub/sub channels are the same in every database.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BrokerError(f"{flag} {url!r}: {e}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise BrokerError(f"{flag} {url!r}: expected redis://HOST[:PORT][/CHANNEL] (or rediss:// for TLS), "
                          f"e.g. redis://127.0.0.1:6379/{DEFAULT_CHANNEL}")
    channel = unquote(parts.path.lstrip("/")) or DEFAULT_CHANNEL
    auth = parts.netloc.rpartition("@")[0]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    conn = f"{parts.scheme}://{auth + '@' if auth else ''}{host}:{port or DEFAULT_PORT}"
    return BrokerAddress(conn, channel)


def connect(address: BrokerAddress, timeout_s: float, read_timeout: bool = True) -> Any:
    """A redis-py asyncio client that fails fast: the callers retry with their own backoff, never redis-py.

    ``read_timeout``: False for a subscriber, for which a quiet channel is not a lost broker (a closed
    connection is seen at once; a silent one by the subscriber's own pings).
    """
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(address.url, socket_connect_timeout=timeout_s,
                                   socket_timeout=timeout_s if read_timeout else None,
                                   retry=Retry(NoBackoff(), 0), health_check_interval=0)


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a lost or unreachable broker raises (redis-py's errors, sockets, timeouts)."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, asyncio.TimeoutError)


class Backoff:
    """Waits between reconnection attempts: ``first_s``, doubling up to ``max_s``; :meth:`reset` after success."""

    def __init__(self, first_s: float = 0.25, max_s: float = 5.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s

    def next(self) -> float:
        wait = self._next
        self._next = min(self.max_s, self._next * 2)
        return wait

    def reset(self) -> None:
        self._next = self.first_s


def envelope(monitor: str, run: str, seq: int, **body: Any) -> bytes:
    """One message on the channel (see the module's docstring)."""
    return json.dumps({"v": ENVELOPE_VERSION, "monitor": monitor, "run": run, "seq": seq, **body},
                      separators=(",", ":"), allow_nan=False).encode()


@dataclass
class _Drops:
    """Events dropped from the buffer and not yet reported in a ``gap`` record."""

    count: int = 0
    since: float = 0.0
    until: float = 0.0

    def add(self, now: float) -> None:
        if self.count == 0:
            self.since = now
        self.count += 1
        self.until = now

    def merge(self, later: _Drops) -> _Drops:
        """These drops followed by ``later`` ones, reported as one gap."""
        if not self.count:
            return later
        if later.count:
            self.count += later.count
            self.until = later.until
        return self


class RedisPublisher(Sink):
    """Publishes every event to ``address`` as ``monitor`` (see the module's docstring).

    ``buffer_size``: events waiting for the broker at most (the oldest are
    dropped beyond it); ``batch_size``: events in one pipelined round trip;
    ``timeout_s``: connecting and each round trip; ``heartbeat_s``: a heartbeat
    after this long without a message; ``flush_s``: how long events still
    buffered may take once the monitor stops.
    """

    def __init__(self, address: BrokerAddress, monitor: str, *, buffer_size: int = 10_000, batch_size: int = 100,
                 timeout_s: float = 2.0, heartbeat_s: float = 2.0, flush_s: float = 3.0,
                 backoff: Backoff | None = None, notify: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if buffer_size < 1 or batch_size < 1:
            raise BrokerError("the publish buffer and batch must hold at least one event")
        self.address = address
        self.monitor = monitor
        self.run_id = secrets.token_hex(4)
        self.buffer_size, self.batch_size = buffer_size, batch_size
        self.timeout_s, self.heartbeat_s, self.flush_s = timeout_s, heartbeat_s, flush_s
        self.backoff = backoff or Backoff()
        self.notify = notify or (lambda line: None)
        self.clock = clock
        self.seq = 0  # the last sequence number given to an event
        self.published = 0  # events the broker accepted
        self.dropped = 0  # events dropped from the full buffer, in all
        self.batches = 0  # pipelined round trips that succeeded
        self.connected = False
        self._buffer: deque[tuple[int, Event]] = deque()
        self._drops = _Drops()
        self._wake = asyncio.Event()
        self._reading = False  # run() is taking events from the bus
        self._drained = asyncio.Event()  # ... and has taken the last one
        self._closing = False
        self._client: Any = None
        self._sender: asyncio.Task[None] | None = None

    # -- intake: never waits ------------------------------------------------------------

    def put(self, ev: Event) -> None:
        """Number ``ev`` and buffer it; drop the oldest buffered event when full."""
        self.seq += 1
        if len(self._buffer) >= self.buffer_size:
            self._drop_oldest()
        self._buffer.append((self.seq, ev))
        self._wake.set()

    def _drop_oldest(self) -> None:
        self._buffer.popleft()
        self.dropped += 1
        self._drops.add(self.clock())

    # -- the sink -----------------------------------------------------------------------

    async def start(self) -> None:
        """Try the broker once, briefly: unreachable is a notice (the sender keeps trying), never an error."""
        try:
            await asyncio.wait_for(self._connect(), self.timeout_s)
        except broker_errors() as e:
            self.notify(f"publish: cannot reach {self.address} ({_why(e)}); events are buffered "
                        f"(at most {self.buffer_size}) and sent when it is back")
        else:
            self.notify(f"publish: {self.address} as monitor {self.monitor!r}")
        self._sender = asyncio.create_task(self._send_all(), name="redis-publisher")

    async def run(self, events: Subscription) -> None:
        self._reading = True
        try:
            await self._read(events)
        finally:
            self._drained.set()

    async def _read(self, events: Subscription) -> None:
        seen = 0
        async for ev in events:
            if events.dropped != seen:  # the bus queue itself overflowed: numbered and reported like ours
                for _ in range(events.dropped - seen):
                    self.seq += 1
                    self.dropped += 1
                    self._drops.add(self.clock())
                seen = events.dropped
            self.put(ev)

    async def close(self) -> None:
        """Give buffered events ``flush_s`` to go out, then disconnect."""
        if self._reading:  # the bus is closed: let the last events (the streams' ends) reach the buffer first
            try:
                await asyncio.wait_for(self._drained.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
        self._closing = True
        self._wake.set()
        if self._sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), self.flush_s)
            except asyncio.TimeoutError:
                log.warning("publish: %d event(s) not sent to %s before stopping", len(self._buffer), self.address)
            finally:
                self._sender.cancel()
                await asyncio.gather(self._sender, return_exceptions=True)
        if self.connected and not self._buffer:
            try:
                await asyncio.wait_for(self._client.publish(self.address.channel, envelope(
                    self.monitor, self.run_id, self.seq, bye=round(self.clock(), 3))), self.timeout_s)
            except broker_errors():
                pass  # the subscribers will see the heartbeats stop instead
        await self._disconnect()

    # -- sending ----------------------------------------------------------------------

    async def _connect(self) -> None:
        client = connect(self.address, self.timeout_s)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self.connected = True
        self.backoff.reset()

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        self.connected = False
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # the connection is gone anyway
                pass

    async def _send_all(self) -> None:
        """Publish what is buffered, batch by batch, until closing with nothing left; reconnect as needed."""
        lost_at: float | None = None
        while True:
            if not self._buffer and not self._drops.count:
                if self._closing:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                except asyncio.TimeoutError:
                    if self.connected:
                        await self._try(self._heartbeat)
                continue
            if not self.connected:
                if self._closing and lost_at is not None:
                    return  # the broker is gone and the monitor is stopping: what is left is lost
                try:
                    await asyncio.wait_for(self._connect(), self.timeout_s)
                except broker_errors() as e:
                    if lost_at is None:
                        lost_at = self.clock()
                        log.warning("publish: cannot reach %s (%s); buffering", self.address, _why(e))
                    await asyncio.sleep(self.backoff.next())
                    continue
                if lost_at is not None:
                    log.warning("publish: %s is back after %.1fs", self.address, self.clock() - lost_at)
                    lost_at = None
            if not await self._try(self._send_batch) and lost_at is None:
                lost_at = self.clock()

    async def _try(self, send: Callable[[], Any]) -> bool:
        try:
            await asyncio.wait_for(send(), self.timeout_s)
            return True
        except broker_errors() as e:
            log.warning("publish: lost %s (%s); buffering and reconnecting", self.address, _why(e))
            await self._disconnect()
            return False

    async def _send_batch(self) -> None:
        """One pipelined round trip: the gap record (if any) and up to ``batch_size`` events.

        The batch leaves the buffer while it is on its way, so the buffer
        keeps taking ``buffer_size`` new events meanwhile.  When the round trip
        fails the batch goes back in front (and the oldest beyond the bound are
        dropped); the broker may have published part of it already, which is
        then sent again: a subscriber ignores numbers it has seen.
        """
        batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
        drops, self._drops = self._drops, _Drops()
        try:
            pipe = self._client.pipeline(transaction=False)
            if drops.count:
                pipe.publish(self.address.channel, envelope(
                    self.monitor, self.run_id, self.seq,
                    gap={"dropped": drops.count, "since": round(drops.since, 3), "until": round(drops.until, 3)}))
            for seq, ev in batch:
                try:
                    body = envelope(self.monitor, self.run_id, seq, event=ev.to_dict())
                except (ValueError, TypeError):  # one event that cannot be JSON must not stop the others
                    log.exception("publish: cannot serialise a %s event; subscribers see it missing", ev.type)
                    continue
                pipe.publish(self.address.channel, body)
            await pipe.execute()
        except BaseException:
            self._drops = drops.merge(self._drops)
            self._buffer.extendleft(reversed(batch))
            while len(self._buffer) > self.buffer_size:
                self._drop_oldest()
            raise
        self.batches += 1
        self.published += len(batch)

    async def _heartbeat(self) -> None:
        await self._client.publish(self.address.channel,
                                   envelope(self.monitor, self.run_id, self.seq, heartbeat=round(self.clock(), 3)))


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def check_monitor_name(name: str) -> str:
    """A monitor name: the first part of its streams' names on a relay (``MONITOR/STREAM``)."""
    if not name or "/" in name or len(name) > 128 or not name.isprintable():
        raise BrokerError(f"--monitor-name {name!r}: 1-128 printable characters without '/'")
    return name
