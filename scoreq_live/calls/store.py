"""Where call records and stream timelines are kept: SQLite (a file, the default) or PostgreSQL.

One schema for both (:data:`SCHEMA`, versioned in the ``meta`` table), written
and read by the same SQL; only the driver and its placeholders differ.

* ``calls``: a row per call record (its JSON in ``record``, the columns a
  query filters and sorts by beside it).
* ``streams``: a row per stream run, written when it starts (``ended`` NULL
  while live, so a monitor killed mid-stream leaves a trace) and completed
  with its record when it ends.
* ``windows``: a stream's timeline, a row per window (primary score,
  smoothed, speech, level, network numbers, the reason it was not scored).
* ``runs``: every monitor or relay that wrote here, and whether it closed
  the store cleanly.

Every write is idempotent (primary keys, ``ON CONFLICT``): a batch written
again after a lost connection changes nothing.  Nothing here is
asynchronous: :class:`~scoreq_live.calls.sink.StoreSink` calls it from its
own thread, the CLI and the HTTP API from theirs.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scoreq_live.core.events import CallRecord, ScoreEvent, StreamRecord, StreamStarted
from scoreq_live.errors import ConfigError, ScoreqLiveError

SCHEMA_VERSION = 1

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started DOUBLE PRECISION NOT NULL,
        ended DOUBLE PRECISION, lost BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS calls (
        id TEXT PRIMARY KEY, call_key TEXT NOT NULL, monitor TEXT NOT NULL, who TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION NOT NULL, duration_s DOUBLE PRECISION NOT NULL,
        mode TEXT NOT NULL, model TEXT NOT NULL, n_streams INTEGER NOT NULL, score_mean DOUBLE PRECISION,
        score_min DOUBLE PRECISION, worst_mean DOUBLE PRECISION, loss_pct DOUBLE PRECISION, alerts INTEGER NOT NULL,
        alert_s DOUBLE PRECISION NOT NULL, record TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS calls_started ON calls (started)",
    "CREATE INDEX IF NOT EXISTS calls_key ON calls (call_key)",
    """CREATE TABLE IF NOT EXISTS streams (
        id TEXT PRIMARY KEY, call_id TEXT, name TEXT NOT NULL, monitor TEXT NOT NULL, source TEXT NOT NULL,
        detail TEXT NOT NULL, started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION, reason TEXT,
        score_mean DOUBLE PRECISION, score_min DOUBLE PRECISION, loss_pct DOUBLE PRECISION, run TEXT NOT NULL,
        record TEXT)""",
    "CREATE INDEX IF NOT EXISTS streams_call ON streams (call_id)",
    "CREATE INDEX IF NOT EXISTS streams_started ON streams (started)",
    "CREATE INDEX IF NOT EXISTS streams_name ON streams (name)",
    """CREATE TABLE IF NOT EXISTS windows (
        stream_id TEXT NOT NULL, win INTEGER NOT NULL, t_start REAL NOT NULL, t_end REAL NOT NULL,
        ts DOUBLE PRECISION NOT NULL, value REAL, smoothed REAL, speech REAL, level_dbfs REAL, loss_pct REAL,
        jitter_ms REAL, mos_cq REAL, reason TEXT, PRIMARY KEY (stream_id, win))""",
]

TIMELINE = ("t_start", "t_end", "value", "smoothed", "speech", "level_dbfs", "loss_pct", "jitter_ms", "mos_cq",
            "reason")
"""A timeline's columns, as ``GET /api/calls/ID`` gives them (one list per column)."""

_CALL_COLUMNS = ("id", "call_key", "monitor", "who", "started", "ended", "duration_s", "mode", "model", "n_streams",
                 "score_mean", "score_min", "worst_mean", "loss_pct", "alerts", "alert_s", "record")
_STREAM_COLUMNS = ("id", "call_id", "name", "monitor", "source", "detail", "started", "ended", "reason",
                   "score_mean", "score_min", "loss_pct", "run", "record")
_WINDOW_COLUMNS = ("stream_id", "win", "t_start", "t_end", "ts", "value", "smoothed", "speech", "level_dbfs",
                   "loss_pct", "jitter_ms", "mos_cq", "reason")


class StoreError(ScoreqLiveError):
    """The store cannot be opened or written (the database is down, the disk full, a schema too new)."""


class StoreMissing(StoreError):
    """The store is not there yet (no file, no schema): nothing was written to it."""


def _insert(table: str, columns: Sequence[str], conflict: str, update: Sequence[str] = ()) -> str:
    marks = ", ".join("?" for _ in columns)
    what = ("DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in update)) if update else "DO NOTHING"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT ({conflict}) {what}"


# A stream's start never overwrites what its record wrote (a batch replayed after its record).
_STREAM_START = _insert("streams", _STREAM_COLUMNS, "id")
_STREAM_RECORD = _insert("streams", _STREAM_COLUMNS, "id", [c for c in _STREAM_COLUMNS if c not in ("id", "run")])
_CALL = _insert("calls", _CALL_COLUMNS, "id", _CALL_COLUMNS[1:])
_WINDOW = _insert("windows", _WINDOW_COLUMNS, "stream_id, win")


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


@dataclass
class Batch:
    """Rows to write in one transaction (built on the event loop, written by the store's thread)."""

    streams_started: list[tuple[Any, ...]]
    windows: list[tuple[Any, ...]]
    stream_records: list[tuple[Any, ...]]
    calls: list[tuple[Any, ...]]
    # (stream id, placeholder id): windows written under a placeholder (a relay that saw a stream only from
    # its middle, without its stream_started) belong to the stream its record names
    renames: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def empty(cls) -> Batch:
        return cls([], [], [], [])

    def __len__(self) -> int:
        return (len(self.streams_started) + len(self.windows) + len(self.stream_records) + len(self.calls)
                + len(self.renames))

    def extend(self, other: Batch) -> None:
        self.streams_started += other.streams_started
        self.windows += other.windows
        self.stream_records += other.stream_records
        self.calls += other.calls
        self.renames += other.renames


def _json(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"), allow_nan=False)


def started_row(stream_id: str, ev: StreamStarted, monitor: str, run: str) -> tuple[Any, ...]:
    return (stream_id, None, ev.stream, monitor, ev.source, ev.detail, ev.ts, None, None, None, None, None, run, None)


def window_row(stream_id: str, ev: ScoreEvent) -> tuple[Any, ...]:
    d = ev.to_dict()  # the values as published (rounded, NaN as None)
    value = d.get("mos") if ev.mode == "nr" else d.get("distance")
    net = d.get("net") or {}
    return (stream_id, ev.window, d["t_start"], d["t_end"], d["ts"], value, d["smoothed"], d["speech"],
            d["level_dbfs"], net.get("loss_pct"), net.get("jitter_ms"), net.get("mos_cq"), ev.reason)


def stream_record_row(rec: StreamRecord, run: str) -> tuple[Any, ...]:
    d = rec.to_dict()
    score = rec.score or {}
    return (rec.id, rec.call, rec.stream, rec.monitor, rec.source, rec.detail, rec.started, rec.ended, rec.reason,
            score.get("mean"), score.get("min"), (rec.net or {}).get("loss_pct"), run, _json(d))


def call_row(rec: CallRecord) -> tuple[Any, ...]:
    return (rec.id, rec.key, rec.monitor, rec.who, rec.started, rec.ended, rec.duration_s, rec.mode, rec.model,
            len(rec.streams or ()), rec.mean, rec.min, rec.worst_mean, rec.loss_pct, rec.alerts, rec.alert_s,
            _json(rec.to_dict()))


@dataclass(frozen=True)
class CallQuery:
    """What ``scoreq-live calls`` and ``GET /api/calls`` filter by; times are Unix seconds."""

    since: float | None = None
    until: float | None = None
    below: float | None = None  # the worst stream's mean below this (a bad MOS)
    above: float | None = None  # ... above this (a bad distance)
    stream: str | None = None  # a stream of the call has this name (``*`` matches anything)
    key: str | None = None  # the call key (a callSid, a SIP Call-ID)
    limit: int = 50
    offset: int = 0


class Store:
    """One store, by where it is: a SQLite file or a ``postgresql://`` URL; :meth:`connect` opens a connection.

    A connection is used by one thread at a time; each user (the writer thread, a query) opens its own.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.postgres = target.startswith(("postgresql://", "postgres://"))
        if not self.postgres:
            if "://" in target:
                raise ConfigError(f"--store {target!r}: expected a file (calls.db) or postgresql://USER@HOST/DB")
            self.path = Path(target).expanduser()

    def __str__(self) -> str:
        """Where the store is, for messages (a PostgreSQL URL without its password)."""
        return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", self.target)

    def connect(self, *, create: bool = False, timeout_s: float = 10.0) -> Connection:
        """A connection; with ``create``, the schema is created or checked (raises :class:`StoreError`)."""
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise ConfigError("--store postgresql://... needs psycopg: pip install 'scoreq-live[postgres]'") \
                    from None
            try:
                raw: Any = psycopg.connect(self.target, connect_timeout=max(int(timeout_s), 1))
            except psycopg.Error as e:
                raise StoreError(f"{self}: cannot connect: {_first_line(e)}") from None
            conn = Connection(raw, postgres=True)
        else:
            if not create and not self.path.exists():
                raise StoreMissing(f"{self}: no such store (a monitor run with --store {self} creates it)")
            try:
                raw = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
                raw.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer, nor it for them
                raw.execute("PRAGMA synchronous=NORMAL")  # with WAL: a crash loses at most the last transactions
            except sqlite3.Error as e:
                raise StoreError(f"{self}: cannot open it: {e}") from None
            conn = Connection(raw, postgres=False)
        if create:
            try:
                conn.create_schema()
            except BaseException:
                conn.close()
                raise
        else:
            conn.check_schema(str(self))
        return conn


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Connection:
    """One database connection with the store's statements (SQLite's ``?`` become psycopg's ``%s``)."""

    def __init__(self, raw: Any, *, postgres: bool) -> None:
        self.raw = raw
        self.postgres = postgres

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What the driver raises when the database fails (down, full, locked)."""
        if self.postgres:
            import psycopg

            return (psycopg.Error, OSError)
        return (sqlite3.Error, OSError)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.postgres else text

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        cur = self.raw.cursor()
        try:
            if not self.postgres:
                cur.execute("BEGIN IMMEDIATE")
            yield _Sql(cur, self)
        except BaseException:
            self.raw.rollback() if self.postgres else cur.execute("ROLLBACK")
            raise
        else:
            self.raw.commit() if self.postgres else cur.execute("COMMIT")
        finally:
            cur.close()

    def query(self, text: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = self.raw.cursor()
        try:
            cur.execute(self.sql(text), params)
            rows = cur.fetchall()
        finally:
            cur.close()
        if self.postgres:
            self.raw.rollback()  # end the read's transaction: the next one sees new rows
        return list(rows)

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:  # already gone
            pass

    # -- schema -------------------------------------------------------------------------------------

    def create_schema(self) -> None:
        with self.transaction() as cur:
            if self.postgres:  # two writers creating it at once: one waits for the other
                cur.execute("SELECT pg_advisory_xact_lock(7164253)")
            for stmt in SCHEMA:
                cur.execute(stmt)
            cur.execute("SELECT value FROM meta WHERE key = 'schema'")
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"the store has schema version {row[0]}, newer than this scoreq-live's "
                                 f"({SCHEMA_VERSION}): upgrade scoreq-live to write to it")

    def check_schema(self, where: str) -> None:
        try:
            rows = self.query("SELECT value FROM meta WHERE key = 'schema'")
        except self.errors as e:
            raise StoreMissing(f"{where}: not a scoreq-live store ({_first_line(e)})") from None
        if not rows or int(rows[0][0]) > SCHEMA_VERSION:
            raise StoreError(f"{where}: schema version {rows[0][0] if rows else '?'} is not one this scoreq-live "
                             "reads; upgrade it")

    # -- writing ------------------------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """One batch in one transaction: all of it, or (on an error) none."""
        with self.transaction() as cur:
            if batch.streams_started:
                cur.executemany(_STREAM_START, batch.streams_started)
            if batch.windows:
                cur.executemany(_WINDOW, batch.windows)
            if batch.renames:
                cur.executemany("UPDATE windows SET stream_id = ? WHERE stream_id = ?", batch.renames)
            if batch.stream_records:
                cur.executemany(_STREAM_RECORD, batch.stream_records)
            if batch.calls:
                cur.executemany(_CALL, batch.calls)

    def begin_run(self, run: str, host: str, pid: int, now: float) -> list[tuple[str, float, int]]:
        """Register this writer; returns the earlier runs on this host that never closed the store and whose
        process is gone (killed), as (run, started, pid), marking them seen."""
        crashed = []
        with self.transaction() as cur:
            cur.execute("SELECT id, started, pid FROM runs WHERE ended IS NULL AND host = ?", (host,))
            for rid, started, rpid in cur.fetchall():
                # its process is gone (or its pid is ours now: the old one is gone)
                if rid != run and (int(rpid) == pid or not _alive(int(rpid))):
                    crashed.append((rid, float(started), int(rpid)))
            for rid, _, _ in crashed:
                cur.execute("UPDATE runs SET ended = -1 WHERE id = ?", (rid,))
            cur.execute("INSERT INTO runs (id, host, pid, started) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                        (run, host, pid, now))
        return crashed

    def streams_left_open(self, runs: Sequence[str]) -> int:
        """Streams of these runs that started and never got their record."""
        n = 0
        for run in runs:
            n += int(self.query("SELECT COUNT(*) FROM streams WHERE run = ? AND record IS NULL", (run,))[0][0])
        return n

    def end_run(self, run: str, now: float, lost: int) -> None:
        with self.transaction() as cur:
            cur.execute("UPDATE runs SET ended = ?, lost = ? WHERE id = ?", (now, lost, run))

    def purge(self, before: float, limit: int = 2000) -> int:
        """Remove up to ``limit`` calls that ended before ``before`` (Unix time) with their streams and
        windows, and streams of no call that ended before it; one short transaction.  Returns how many
        calls and streams went (0: nothing older is left)."""
        with self.transaction() as cur:
            cur.execute("SELECT id FROM calls WHERE ended < ? ORDER BY ended LIMIT ?", (before, limit))
            calls = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT id FROM streams WHERE (call_id IS NULL OR call_id NOT IN (SELECT id FROM calls)) "
                        "AND COALESCE(ended, started) < ? LIMIT ?", (before, limit))
            streams = [r[0] for r in cur.fetchall()]
            for cid in calls:
                cur.execute("SELECT id FROM streams WHERE call_id = ?", (cid,))
                streams += [r[0] for r in cur.fetchall()]
            for sid in streams:
                cur.execute("DELETE FROM windows WHERE stream_id = ?", (sid,))
            cur.executemany("DELETE FROM streams WHERE id = ?", [(s,) for s in streams])
            cur.executemany("DELETE FROM calls WHERE id = ?", [(c,) for c in calls])
        return len(calls) + len(streams)

    # -- reading ------------------------------------------------------------------------------------

    def calls(self, q: CallQuery) -> tuple[list[dict[str, Any]], int]:
        """The call records ``q`` selects, newest first, and how many there are in all."""
        conditions = (("started >= ?", q.since), ("started < ?", q.until), ("worst_mean < ?", q.below),
                      ("worst_mean > ?", q.above), ("call_key = ?", q.key),
                      ("id IN (SELECT call_id FROM streams WHERE name LIKE ? ESCAPE '!')",
                       None if q.stream is None else _like(q.stream)))
        where = [sql for sql, value in conditions if value is not None]
        params: list[Any] = [value for _, value in conditions if value is not None]
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = int(self.query(f"SELECT COUNT(*) FROM calls{clause}", params)[0][0])
        rows = self.query(f"SELECT record FROM calls{clause} ORDER BY started DESC, id DESC LIMIT ? OFFSET ?",
                          [*params, max(q.limit, 0), max(q.offset, 0)])
        return [_call_dict(r[0]) for r in rows], total

    def call(self, call_id: str) -> dict[str, Any] | None:
        """A call record with its streams' records and timelines, or None."""
        rows = self.query("SELECT record FROM calls WHERE id = ?", (call_id,))
        if not rows:
            return None
        streams = []
        for (rec,) in self.query("SELECT record FROM streams WHERE call_id = ? AND record IS NOT NULL "
                                 "ORDER BY started, id", (call_id,)):
            d = json.loads(rec)
            d["timeline"] = self.timeline(d["id"])
            streams.append(d)
        return {"call": _call_dict(rows[0][0]), "streams": streams}

    def timeline(self, stream_id: str) -> dict[str, list[Any]]:
        rows = self.query(f"SELECT {', '.join(TIMELINE)} FROM windows WHERE stream_id = ? ORDER BY win",
                          (stream_id,))
        cols: dict[str, list[Any]] = {c: [] for c in TIMELINE}
        for row in rows:
            for c, v in zip(TIMELINE, row):
                cols[c].append(round(v, 5) if isinstance(v, float) else v)
        return cols


def _call_dict(text: str) -> dict[str, Any]:
    d = json.loads(text)
    for k in ("v", "type", "stream", "ts"):
        d.pop(k, None)
    return d


def _like(pattern: str) -> str:
    """A stream name pattern (``*`` any text) as SQL LIKE with ``!`` escaping."""
    esc = pattern.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return esc.replace("*", "%")


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Sql:
    """A cursor that takes the store's ``?`` placeholders on either driver."""

    def __init__(self, cur: Any, conn: Connection) -> None:
        self.cur, self.conn = cur, conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.cur.execute(self.conn.sql(sql), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> Any:
        return self.cur.executemany(self.conn.sql(sql), list(params))

    def fetchall(self) -> list[Any]:
        return list(self.cur.fetchall())

    def fetchone(self) -> Any:
        return self.cur.fetchone()


def parse_age(text: str, flag: str = "--since") -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` or plain seconds as seconds; ``0``/``never``/``forever`` as 0."""
    t = text.strip().lower()
    if t in ("never", "forever", "0"):
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", t)
    if m is None:
        raise ConfigError(f"{flag} {text!r}: expected a duration such as 30d, 12h, 90m or 45s")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
    return float(m.group(1)) * scale

