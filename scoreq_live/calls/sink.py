"""``--store``: call records and timelines written to the store, batched, on a thread of their own.

The sink's task only turns events into rows (microseconds an event) and
hands them over; a thread writes them every :data:`FLUSH_S` in one
transaction.  Scoring never waits for the database.

Nothing vanishes silently.  While the database is down (or the disk full)
rows wait, up to ``buffer`` windows; beyond that newer timeline rows are
counted as lost (records are always kept: a call's summary matters more
than one window of it).  A failure is reported once (an ``output`` event
with state ``failed``, a line on stderr, ``scoreq_live_output_failed``),
batches are retried with backoff, and ``recovered`` says how many rows were
lost meanwhile.  Every write is idempotent, so a batch retried after a lost
connection is not written twice.

At start the sink registers its run; a run on this host that never closed
the store (the process was killed) is reported: what it wrote before its
last batch is intact (each batch is one transaction), the streams it had
live have no record.  Old calls are removed by the same thread
(``--retain``), a few thousand rows a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scoreq_live.bus import Subscription
from scoreq_live.calls.store import (
    Batch,
    Connection,
    Store,
    StoreError,
    call_row,
    started_row,
    stream_record_row,
    window_row,
)
from scoreq_live.core.events import (
    CallRecord,
    Event,
    OutputState,
    OutputStatus,
    ScoreEvent,
    StreamRecord,
    StreamStarted,
    new_id,
)
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.sinks.base import Sink

log = logging.getLogger(__name__)

FLUSH_S = 0.5  # rows are written at least this often
BATCH_MAX = 5000  # this many rows waiting wake the writer before its next flush
RETRY_S, RETRY_MAX_S = 1.0, 30.0  # a failing database is tried again after this, doubling to the most
PURGE_EVERY_S = 600.0  # retention runs this often (and once at start)
CLOSE_WAIT_S = 10.0  # at the end, rows still waiting are written for at most this long


@dataclass(frozen=True)
class StoreOptions:
    """``--store`` and its settings."""

    target: str  # a SQLite file, or postgresql://...
    retain_s: float = 30 * 86400.0  # calls older than this are removed; 0: kept for ever
    buffer: int = 100_000  # timeline rows waiting while the database is down, at most
    monitor: str = ""  # the monitor's name, for the streams it writes
    relay: bool = False  # a feed relay writes: each stream's monitor is its name's first part (MONITOR/STREAM)


class StoreSink(Sink):
    """Writes ``stream_started``, ``score``, ``stream_record`` and ``call_record`` events to a store."""

    name = "store"

    def __init__(self, opts: StoreOptions, *, clock: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self.store = Store(opts.target)
        self.clock = clock
        self.run_id = new_id()
        self.lost = 0  # rows not written (the buffer was full, or the database was down at the end)
        self.written = 0  # rows written
        self.batches = 0
        self.failing = ""  # the error while writes fail
        self._ids: dict[str, str] = {}  # live stream name -> its run id (score events name the stream only)
        self._pending = Batch.empty()  # rows not taken by the writer yet
        self._held = Batch.empty()  # rows the writer took and has not written yet (the database failed)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: Subscription | None = None
        self._seen_dropped = 0
        self._registered = False  # this run is in the store's runs table

    # -- Sink ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (and create) the store; a file that cannot be opened stops the monitor now.  A PostgreSQL
        server that does not answer yet is reported and retried: scoring does not wait for it."""
        self._loop = asyncio.get_running_loop()
        try:
            self._conn = await asyncio.to_thread(self._open)
        except StoreError as e:
            if not self.store.postgres:
                raise ScoreqLiveError(f"--store {e}") from None
            log.error("store: %s; calls are kept in memory and written once it answers", e)
            self.failing = str(e)
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()

    def _open(self) -> Connection:
        conn = self.store.connect(create=True)
        if self._registered:  # a reconnection: the run is registered, earlier runs were reported
            return conn
        try:
            crashed = conn.begin_run(self.run_id, socket.gethostname(), os.getpid(), self.clock())
            if crashed:
                open_streams = conn.streams_left_open([r for r, _, _ in crashed])
                for _, started, pid in crashed:
                    log.warning("store: a run that began %s (pid %d) did not close %s: it was stopped "
                                "abruptly; what it wrote is intact except its last batch (at most %.1fs of "
                                "events)", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), pid,
                                self.store, FLUSH_S)
                if open_streams:
                    log.warning("store: %d stream(s) live then have a timeline but no record", open_streams)
        except BaseException:
            conn.close()
            raise
        self._registered = True
        return conn

    async def run(self, events: Subscription) -> None:
        self._events = events
        async for ev in events:
            self.add(ev)
            dropped = events.dropped
            if dropped != self._seen_dropped:  # the bus dropped events for us (the loop was starved): counted
                with self._lock:
                    self.lost += dropped - self._seen_dropped
                self._seen_dropped = dropped

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.lost:
            log.warning("store: %d row(s) were not written to %s", self.lost, self.store)

    # -- events -> rows (on the loop) ---------------------------------------------------------------

    def add(self, ev: Event) -> None:
        """The rows ``ev`` makes, queued for the writer."""
        if isinstance(ev, ScoreEvent):
            sid = self._ids.get(ev.stream)
            if sid is None:  # a relay that joined mid-stream: the stream's run still needs a key
                sid = self._ids[ev.stream] = f"{ev.stream}@{int(ev.ts)}"
            with self._lock:
                if len(self._pending.windows) + len(self._held.windows) >= self.opts.buffer:
                    self.lost += 1
                    return
                self._pending.windows.append(window_row(sid, ev))
        elif isinstance(ev, StreamStarted):
            sid = self._ids[ev.stream] = ev.id or new_id()
            monitor = ev.stream.split("/", 1)[0] if self.opts.relay and "/" in ev.stream else self.opts.monitor
            with self._lock:
                self._pending.streams_started.append(started_row(sid, ev, monitor, self.run_id))
        elif isinstance(ev, StreamRecord):
            sid = self._ids.pop(ev.stream, None)
            with self._lock:
                if sid is not None and ev.id and sid != ev.id:  # its windows went under a placeholder
                    self._pending.renames.append((ev.id, sid))
                self._pending.stream_records.append(stream_record_row(ev, self.run_id))
        elif isinstance(ev, CallRecord):
            with self._lock:
                self._pending.calls.append(call_row(ev))
        else:
            return
        if len(self._pending) >= BATCH_MAX:
            self._wake.set()

    # -- the writer thread --------------------------------------------------------------------------

    def _take(self) -> Batch:
        """What waits, with what was taken before and not written (to be written in one transaction)."""
        with self._lock:
            self._held.extend(self._pending)
            self._pending = Batch.empty()
            return self._held

    def _written(self) -> None:
        with self._lock:
            self._held = Batch.empty()

    def _writer(self) -> None:
        retry_s = RETRY_S
        next_purge = 0.0
        close_by: float | None = None
        while True:
            closing = self._closing
            if closing and close_by is None:
                close_by = time.monotonic() + CLOSE_WAIT_S
            held = self._take()
            if len(held) or (self.opts.retain_s > 0 and time.monotonic() >= next_purge):
                try:
                    if self._conn is None:
                        self._conn = self._open()
                    if len(held):
                        self._conn.write(held)
                        self.written += len(held)
                        self.batches += 1
                        self._written()
                    if self.opts.retain_s > 0 and time.monotonic() >= next_purge:
                        self._purge()
                        next_purge = time.monotonic() + PURGE_EVERY_S
                    if self.failing:
                        self._recovered()
                    retry_s = RETRY_S
                except self._errors() as e:
                    self._failed(e)
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    if closing and close_by is not None and time.monotonic() + retry_s > close_by:
                        with self._lock:
                            self.lost += len(self._held) + len(self._pending)
                            self._held, self._pending = Batch.empty(), Batch.empty()
                        break
                    self._wake.wait(retry_s)
                    self._wake.clear()
                    retry_s = min(2 * retry_s, RETRY_MAX_S)
                    continue
            if closing and not len(self._pending):
                break
            self._wake.wait(FLUSH_S)
            self._wake.clear()
        if self._conn is not None:
            try:
                self._conn.end_run(self.run_id, self.clock(), self.lost)
            except self._errors():
                pass
            self._conn.close()
            self._conn = None

    def _errors(self) -> tuple[type[BaseException], ...]:
        """What a failing database raises: the store's own errors and the driver's."""
        if self.store.postgres:
            try:
                import psycopg
            except ImportError:
                return (StoreError, OSError)
            return (StoreError, psycopg.Error, OSError)
        import sqlite3

        return (StoreError, sqlite3.Error, OSError)

    def _purge(self) -> None:
        assert self._conn is not None
        before = self.clock() - self.opts.retain_s
        removed = 0
        while not self._closing:
            n = self._conn.purge(before)
            removed += n
            if n == 0:
                break
        if removed:
            log.info("store: removed %d calls and streams older than the retention", removed)

    def _failed(self, e: BaseException) -> None:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not self.failing:
            self.failing = msg
            log.error("store: cannot write to %s: %s; rows wait (up to %d windows) and are retried",
                      self.store, msg, self.opts.buffer)
            self._status("failed", msg)

    def _recovered(self) -> None:
        log.warning("store: writing to %s works again; %d row(s) were lost meanwhile", self.store, self.lost)
        self.failing = ""
        self._status("recovered", "")

    def _status(self, state: OutputState, error: str) -> None:
        """An ``output`` event, published on the loop (this runs on the writer thread)."""
        events, loop = self._events, self._loop
        if events is None or loop is None:
            return
        ev = OutputStatus(stream="", ts=time.time(), output=self.name, target=str(self.store), state=state,
                          error=error, lost=self.lost)
        try:
            loop.call_soon_threadsafe(events.bus.publish, ev)
        except RuntimeError:  # the loop has closed
            pass
