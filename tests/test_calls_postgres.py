"""A fleet's calls recorded once in PostgreSQL: two monitor processes publish to a real redis-server, one
``scoreq-live feed --subscribe --store postgresql://...`` writes what they send into a throwaway cluster, and
the database is stopped mid-run and started again.  Nothing is written twice; what could not be kept while it
was down is counted exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from scoreq_live.calls.store import CallQuery, Store
from tests.helpers import EXAMPLES, ScoreqProcess
from tests.pg_tools import PostgresServer
from tests.redis_tools import RedisServer

CLEAN, LYRA3 = EXAMPLES / "clean.wav", EXAMPLES / "lyra3.wav"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count(pg: PostgresServer, sql: str) -> int:
    with pg.connect() as conn:
        return int(conn.execute(sql).fetchone()[0])


def test_a_relay_records_two_monitors_calls_once_in_postgres_across_a_database_outage(tmp_path, tiny_nr):
    with RedisServer(tmp_path / "redis") as broker, PostgresServer(tmp_path) as pg:
        url = broker.url()
        relay = ScoreqProcess("feed", "--subscribe", url, "--ws", "127.0.0.1:0", "--jsonl", tmp_path / "relay.jsonl",
                              "--store", pg.url, "--store-buffer", "4")
        mons: list[ScoreqProcess] = []
        try:
            relay.wait_for(r"relay: subscribed to redis://")
            for name, inputs in (("a", (CLEAN, LYRA3)), ("b", (LYRA3,))):
                args: list[object] = ["monitor", "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws",
                                      "--threads", "1", "--publish", url, "--monitor-name", name, "--jsonl",
                                      tmp_path / f"{name}.jsonl", "--duration", "14"]
                for f in inputs:
                    args += ["--input", f"{f.stem}={f}"]
                mons.append(ScoreqProcess(*args))
            # Once windows are in the database, it goes down for 4 s (three streams, a window a second each:
            # more than the relay's 4-row buffer), then comes back.
            deadline = time.monotonic() + 90
            while count(pg, "SELECT COUNT(*) FROM windows") < 3:
                assert time.monotonic() < deadline, relay.output()
                time.sleep(0.2)
            pg.stop()
            relay.wait_for(r"store: cannot write to postgresql://", timeout=30)
            time.sleep(4.0)
            pg.start()
            relay.wait_for(r"store: writing to postgresql://\S+ works again; \d+ row\(s\) were lost", timeout=60)
            for m in mons:
                assert m.wait(90) == 0, m.output()
            deadline = time.monotonic() + 60
            while count(pg, "SELECT COUNT(*) FROM calls") < 3:
                assert time.monotonic() < deadline, relay.output()
                time.sleep(0.2)
        finally:
            for m in mons:
                m.stop()
            relay.stop()
        assert relay.wait(60) in (0, 1), relay.output()

        relayed = read_jsonl(tmp_path / "relay.jsonl")
        status = [e for e in relayed if e["type"] == "output" and e["output"] == "store"]
        assert [e["state"] for e in status] == ["failed", "recovered"], status
        lost = status[-1]["lost"]
        assert lost >= 1, "4 s down with 3 streams and a 4-row buffer must lose some windows"
        scores = [e for e in relayed if e["type"] == "score"]
        # Exact: every window the relay got is in the database once, or counted lost.
        assert count(pg, "SELECT COUNT(*) FROM windows") + lost == len(scores)
        assert count(pg, "SELECT COUNT(*) FROM (SELECT stream_id, win FROM windows GROUP BY stream_id, win "
                         "HAVING COUNT(*) > 1) d") == 0
        # One call record per monitor stream, written once, equal to what the monitors sent.
        conn = Store(pg.url).connect()
        try:
            rows, total = conn.calls(CallQuery(limit=10))
            assert total == 3
            sent = {(n, e["id"]): e for n in ("a", "b") for e in read_jsonl(tmp_path / f"{n}.jsonl")
                    if e["type"] == "call_record"}
            assert {(r["monitor"], r["id"]) for r in rows} == set(sent)
            for r in rows:
                assert r["worst_mean"] == pytest.approx(sent[(r["monitor"], r["id"])]["worst_mean"], abs=1e-12)
                assert r["streams"][0]["stream"].startswith(f"{r['monitor']}/")
                got = conn.call(r["id"])
                assert got is not None and len(got["streams"]) == 1
                timeline = got["streams"][0]["timeline"]["value"]
                assert 0 < len(timeline) <= got["streams"][0]["windows"]
        finally:
            conn.close()
        assert count(pg, "SELECT COUNT(*) FROM streams WHERE record IS NULL") == 0
