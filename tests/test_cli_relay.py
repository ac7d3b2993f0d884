"""One feed for many monitors as a user runs it: monitor processes ``--publish`` to a real redis-server,
one ``scoreq-live feed --subscribe`` process serves them, a real websocket client and ``/metrics`` read it.

The monitors play the demo recordings live (so a broker outage falls in the
middle of their run) with the tiny test model.  Each monitor also writes its
own events as JSON lines: what the relay got is checked against them, and
what it did not get must be exactly what it counts as missing: events a
monitor dropped from its full buffer while Redis was down, and events
published while the relay itself was cut off (pub/sub keeps nothing).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.helpers import EXAMPLES, ScoreqProcess
from tests.redis_tools import RedisServer

CLEAN, LYRA3 = EXAMPLES / "clean.wav", EXAMPLES / "lyra3.wav"


def monitor(tiny: Path, url: str, name: str, jsonl: Path, *inputs: Path, duration: float = 12.0,
            extra: tuple[str, ...] = ()) -> ScoreqProcess:
    args: list[object] = ["monitor", "--model", tiny, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads", "1",
                          "--publish", url, "--monitor-name", name, "--jsonl", jsonl, "--duration", duration, *extra]
    for f in inputs:
        args += ["--input", f"{f.stem}={f}"]
    return ScoreqProcess(*args)


def relay(url: str, jsonl: Path) -> tuple[ScoreqProcess, int, int]:
    p = ScoreqProcess("feed", "--subscribe", url, "--ws", "127.0.0.1:0", "--http", "127.0.0.1:0", "--jsonl", jsonl)
    ws = int(p.wait_for(r"feed: ws://127\.0\.0\.1:(\d+)/")[1])
    http = int(p.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
    p.wait_for(r"relay: subscribed to redis://")
    return p, ws, http


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def watch(url: str, want: set[str], timeout: float = 60) -> tuple[dict, dict[str, list[dict]]]:
    """hello, and the score events per stream until every stream in ``want`` has a scored window."""
    scores: dict[str, list[dict]] = {}
    async with connect(url) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        deadline = time.monotonic() + timeout
        while not want <= {s for s, evs in scores.items() if any(e["mos"] is not None for e in evs)}:
            assert time.monotonic() < deadline, f"only {sorted(scores)} scored"
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if msg["type"] == "score":
                scores.setdefault(msg["stream"], []).append(msg)
    return hello, scores


def test_two_monitors_publish_and_one_feed_serves_both_streams_to_a_websocket_client(tmp_path, tiny_nr):
    with RedisServer(tmp_path / "redis") as broker:
        url = broker.url("calls")
        feed, ws_port, http_port = relay(url, tmp_path / "relay.jsonl")
        mons = []
        try:
            mons = [monitor(tiny_nr, url, "a", tmp_path / "a.jsonl", CLEAN, LYRA3, duration=8),
                    monitor(tiny_nr, url, "b", tmp_path / "b.jsonl", LYRA3, duration=8)]
            hello, scores = asyncio.run(watch(f"ws://127.0.0.1:{ws_port}", {"a/clean", "a/lyra3", "b/lyra3"}))
            assert hello["type"] == "hello" and hello["mode"] == "nr"
            for s, evs in scores.items():
                assert all(1.0 <= e["mos"] <= 5.0 for e in evs if e["mos"] is not None), s
                assert {e["model"] for e in evs} == {"tiny_nr"}
            for m in mons:
                assert m.wait(60) == 0, "".join(m.lines)
            time.sleep(1.0)  # the last events (stream_ended) cross the broker
            # The panel's view of a new client: both monitors' streams, ended, with their history.
            hello, _ = asyncio.run(watch(f"ws://127.0.0.1:{http_port}/ws", set(), timeout=5))
            assert {s["stream"]: s["state"] for s in hello["streams"]} == {
                "a/clean": "stopped", "a/lyra3": "stopped", "b/lyra3": "stopped"}
            assert hello["model"] == "tiny_nr" and hello["window_s"] == 4.0
            # Nothing lost: the relay has every event each monitor wrote, in order, renamed.
            relayed = read_jsonl(tmp_path / "relay.jsonl")
            for name in ("a", "b"):
                own = read_jsonl(tmp_path / f"{name}.jsonl")
                mine = [e for e in relayed if e["stream"].startswith(f"{name}/")]
                # (stream records say which monitor they came from; call records are monitor-wide, checked below)
                assert [{**e, "stream": f"{name}/{e['stream']}",
                         **({"monitor": name} if e["type"] == "stream_record" else {})}
                        for e in own if e["stream"]] == mine
                calls = [e for e in relayed if e["type"] == "call_record" and e["monitor"] == name]
                assert [[f"{name}/{s['stream']}" for s in e["streams"]] for e in own if e["type"] == "call_record"] \
                    == [[s["stream"] for s in e["streams"]] for e in calls]
            m = metrics(http_port)
            for name in ("a", "b"):
                n = len(read_jsonl(tmp_path / f"{name}.jsonl"))
                assert m[("scoreq_live_relay_events_total", (("monitor", name),))] == n
                assert m[("scoreq_live_relay_missing_events_total", (("monitor", name),))] == 0
                assert m[("scoreq_live_relay_monitor_up", (("monitor", name),))] == 0  # stopped: said bye
            assert m[("scoreq_live_relay_broker_connected", (("broker", url),))] == 1
            assert m[("scoreq_live_relay_malformed_messages_total", ())] == 0
            assert not [e for e in relayed if e["type"] == "gap"]
        finally:
            for p in mons:
                p.stop()
            assert feed.stop() is not None


def test_redis_killed_and_restarted_mid_run_loses_only_what_the_sequence_numbers_report(tmp_path, tiny_nr):
    broker = RedisServer(tmp_path / "redis").start()
    url = broker.url("calls")
    feed, ws_port, http_port = relay(url, tmp_path / "relay.jsonl")
    mons = []
    try:
        # b keeps only 2 events while the broker is away: it drops (and reports) the rest.
        mons = [monitor(tiny_nr, url, "a", tmp_path / "a.jsonl", CLEAN, LYRA3, duration=20),
                monitor(tiny_nr, url, "b", tmp_path / "b.jsonl", LYRA3, duration=20,
                        extra=("--publish-buffer", "2"))]
        asyncio.run(watch(f"ws://127.0.0.1:{ws_port}", {"a/clean", "b/lyra3"}))
        broker.kill()
        killed = time.time()
        feed.wait_for(r"relay: redis://\S+ unreachable", timeout=10)
        time.sleep(3.0)
        assert all(m.proc.poll() is None for m in mons), "a broker outage must not stop the monitors"
        broker.start()
        restarted = time.time()
        feed.wait_for(r"relay: subscribed to redis://\S+ again", timeout=15)
        # Now only the relay loses its connection, again and again for 2 s, while the monitors publish:
        # pub/sub keeps nothing for it, so what was published meanwhile is lost, and counted.
        admin = redis.Redis(port=broker.port)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            admin.client_kill_filter(_type="pubsub")
            time.sleep(0.05)
        admin.close()
        deadline = time.monotonic() + 15
        while sum("subscribed to redis" in line and "again" in line for line in feed.lines) < 2:
            assert time.monotonic() < deadline, "".join(feed.lines)
            time.sleep(0.1)
        for m in mons:
            assert m.wait(60) == 0, "".join(m.lines)
        time.sleep(1.0)
        relayed = read_jsonl(tmp_path / "relay.jsonl")
        m = metrics(http_port)
        for name in ("a", "b"):
            # Stream records say which monitor they came from; call records are monitor-wide (counted apart).
            own_all = read_jsonl(tmp_path / f"{name}.jsonl")
            own = [{**e, "stream": f"{name}/{e['stream']}", **({"monitor": name} if e["type"] == "stream_record"
                                                               else {})} for e in own_all if e["stream"]]
            mine = [e for e in relayed if e["stream"].startswith(f"{name}/")]
            calls = [e for e in relayed if e["type"] == "call_record" and e["monitor"] == name]
            missing = m[("scoreq_live_relay_missing_events_total", (("monitor", name),))]
            dropped = m[("scoreq_live_relay_monitor_dropped_events_total", (("monitor", name),))]
            # Exact: every event either arrived (in order, unchanged) or is counted missing.
            print(f"monitor {name}: {len(own)} events, relayed {len(mine)}, missing {missing:g}, dropped {dropped:g}")
            assert len(mine) + len(calls) + missing == len(own_all), (name, len(mine), missing, len(own_all))
            it = iter(own)
            assert all(any(e == o for o in it) for e in mine), "relayed events are the monitor's own, in order"
            gaps = [e for e in relayed if e["type"] == "gap" and e["monitor"] == name]
            assert sum(g["missing"] for g in gaps) == missing
            assert dropped <= missing
            # Scores resumed after the restart, up to the end of the run.
            assert any(e["type"] == "score" and e["ts"] > restarted for e in mine), name
            # The run ends with stream_ended, stream_record (and the monitor-wide call_record) at once: with b's
            # two-event buffer one of them may be dropped, and then it is counted above.
            assert [e["type"] for e in mine][-1] in ("stream_ended", "stream_record")
        a_missing = m[("scoreq_live_relay_missing_events_total", (("monitor", "a"),))]
        assert a_missing >= 1, "a published for 2 s while the relay was cut off"
        b_missing = m[("scoreq_live_relay_missing_events_total", (("monitor", "b"),))]
        assert b_missing >= 1, "b's two-event buffer overflowed during a 3 s outage (a score a second)"
        assert any(e["ts"] > killed for e in relayed if e["stream"].startswith("a/"))
    finally:
        for p in mons:
            p.stop()
        feed.stop()
        broker.stop()


def test_a_broker_down_at_monitor_start_does_not_stop_scoring_and_what_it_drops_is_counted(tmp_path, tiny_nr):
    broker = RedisServer(tmp_path / "redis")  # never started
    mon = monitor(tiny_nr, broker.url(), "a", tmp_path / "a.jsonl", CLEAN, duration=6,
                  extra=("--publish-buffer", "3", "--http", "127.0.0.1:0", "--linger", "60"))
    try:
        port = int(mon.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
        mon.wait_for(r"publish: cannot reach redis://127\.0\.0\.1:\d+/scoreq-live .*; buffering", timeout=60)
        mon.wait_for(r"stream clean: ended", timeout=60)
        events = read_jsonl(tmp_path / "a.jsonl")
        assert sum(1 for e in events if e["type"] == "score" and e["mos"] is not None) >= 1
        assert [e["type"] for e in events][-3:] == ["stream_ended", "stream_record", "call_record"]
        # Every event but the newest three (the buffer) was dropped, and /metrics says so.
        m = metrics(port)
        assert m[("scoreq_live_events_dropped_total", (("consumer", "redis"),))] == len(events) - 3
        assert mon.stop() == 0
    finally:
        mon.stop()


def test_bad_publish_and_subscribe_urls_are_one_clear_error_before_anything_starts(tmp_path, tiny_nr):
    for args, msg in (
        (["monitor", "--input", CLEAN, "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws",
          "--publish", "http://127.0.0.1:6379/x"], "--publish 'http://127.0.0.1:6379/x': expected redis://"),
        (["monitor", "--input", CLEAN, "--no-tui", "--no-ws", "--publish", "redis://h/x", "--monitor-name", "a/b"],
         "--monitor-name 'a/b'"),
        (["feed", "--subscribe", "redis://127.0.0.1:1/x"], "feed needs somewhere to serve"),
        (["feed", "--subscribe", "tcp://x", "--ws", "127.0.0.1:0"], "--subscribe 'tcp://x'"),
    ):
        r = subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
