"""Call records in a SQLite store, as a user runs it: a monitor process over files, RTP from an SDP sent by two
real ffmpeg senders, and a Twilio-format call over a real websocket; read back by ``scoreq-live calls`` and
``GET /api/calls``; killed mid-write; old calls removed by retention."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile as sf

import tests.media_tools as mt
from scoreq_live.calls.store import Batch, CallQuery, Store, call_row
from scoreq_live.core.events import CallRecord
from tests.helpers import EXAMPLES, ScoreqProcess, speech_16k, stop_process
from tests.rtp_tools import ffmpeg_rtp, ffmpeg_sdp, free_udp_port, require_ffmpeg

CALL = "CA00000000000000000000000000000017"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calls_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scoreq_live", "calls", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if e.headers.get_content_type() == "application/json" else {"text": body}


def wait_records(path: Path, n: int, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = read_jsonl(path) if path.exists() else []
        if sum(e["type"] == "call_record" for e in events) >= n:
            return events
        assert time.monotonic() < deadline, [e for e in events if e["type"] in ("call_record", "stream_error")]
        time.sleep(0.2)


def excerpt(src: Path, dst: Path, start_s: float, seconds: float) -> Path:
    x, rate = sf.read(src, dtype="float32", always_2d=True)
    sf.write(dst, x[int(start_s * rate):int((start_s + seconds) * rate)], rate)
    return dst


def test_files_rtp_from_an_sdp_and_a_twilio_call_become_call_records_the_cli_and_api_return(tmp_path, tiny_nr):
    require_ffmpeg()
    db, jsonl = tmp_path / "calls.db", tmp_path / "events.jsonl"
    a = excerpt(EXAMPLES / "clean.wav", tmp_path / "a.wav", 0.0, 8.0)
    b = excerpt(EXAMPLES / "lyra3.wav", tmp_path / "b.wav", 2.0, 8.0)
    port = free_udp_port()
    sdp = tmp_path / "call.sdp"
    sdp.write_text(ffmpeg_sdp(port, "pcmu"))
    mon = ScoreqProcess("monitor", "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads", "1",
                        "--input", f"a={a}", "--input", f"b={b}", "--input", f"leg={sdp}", "--rtp-timeout", "1",
                        "--http", "127.0.0.1:0", "--store", db, "--jsonl", jsonl, "--alert", "mos<3.0 for 2s")
    senders: list[subprocess.Popen] = []
    try:
        http = int(mon.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
        mon.wait_for(r"call history: http://127\.0\.0\.1:\d+/history")
        # Both directions of one call, mirrored to the SDP's port: two senders (SSRCs) live together.
        senders = [ffmpeg_rtp(a, port, "pcmu", ssrc=0x1111, duration_s=6.0),
                   ffmpeg_rtp(b, port, "pcmu", ssrc=0x2222, duration_s=6.0)]
        # A Twilio call: two tracks of one callSid, at 4x real time.
        speech = speech_16k(EXAMPLES / "clean.wav")[:16000 * 6]
        ulaw = {"inbound": mt.mulaw_encode(mt.to_8k(speech)), "outbound": mt.mulaw_encode(mt.to_8k(speech[::-1]))}

        async def twilio() -> None:
            async with aiohttp.ClientSession() as s, s.ws_connect(f"http://127.0.0.1:{http}/media") as ws:
                await mt.send_paced(ws, mt.twilio_call(ulaw, call_sid=CALL), speed=4.0)
                await ws.receive(timeout=20)

        asyncio.run(twilio())
        for p in senders:
            assert p.wait(60) == 0
        events = wait_records(jsonl, 4)  # a, b, the RTP call, the Twilio call
        time.sleep(1.5)  # the store's writer commits every 0.5 s
        status, listed = get_json(f"http://127.0.0.1:{http}/api/calls?since=1h")
        assert status == 200 and listed["total"] == 4 and listed["mode"] == "nr", listed
        api_calls = listed["calls"]
        # While the monitor runs, the CLI reads the same store (SQLite in WAL mode: readers never wait).
        cli = calls_cli("--store", db, "--json")
        assert cli.returncode == 0, cli.stderr
        assert {c["id"] for c in json.loads(cli.stdout)["calls"]} == {c["id"] for c in api_calls}
    finally:
        for p in senders:
            stop_process(p)
        mon.stop()
    assert mon.wait(60) == 0, mon.output()

    events = read_jsonl(jsonl)
    records = {e["stream"]: e for e in events if e["type"] == "stream_record"}
    assert set(records) == {"a", "b", "leg-00001111", "leg-00002222", f"{CALL}-inbound", f"{CALL}-outbound"}
    # Each record's mean is the mean of that stream's score events as written to the JSON lines.
    for name, rec in records.items():
        mos = [e["mos"] for e in events if e["type"] == "score" and e["stream"] == name and e["mos"] is not None]
        assert len(mos) >= 2, name
        assert rec["score"]["mean"] == pytest.approx(float(np.mean(mos)), abs=1e-6)
        assert rec["score"]["min"] == min(mos) and rec["scored"] == len(mos)
    calls = {e["id"]: e for e in events if e["type"] == "call_record"}
    by_streams = {tuple(sorted(s["stream"] for s in c["streams"])): c for c in calls.values()}
    assert set(by_streams) == {("a",), ("b",), ("leg-00001111", "leg-00002222"),
                               (f"{CALL}-inbound", f"{CALL}-outbound")}
    twilio_call = by_streams[(f"{CALL}-inbound", f"{CALL}-outbound")]
    assert twilio_call["key"] == CALL
    meta = records[f"{CALL}-inbound"]["meta"]
    assert meta["callSid"] == CALL and meta["track"] == "inbound" and meta["peer"].startswith("127.0.0.1")
    rtp_call = by_streams[("leg-00001111", "leg-00002222")]
    assert records["leg-00001111"]["call_key"] == records["leg-00002222"]["call_key"] == rtp_call["key"]
    for leg in ("leg-00001111", "leg-00002222"):
        net = records[leg]["net"]
        assert net["codec"] == "PCMU" and net["expected"] >= 250 and net["loss_pct"] == 0.0, net
        assert net["mos_cq"] > 4.0 and records[leg]["meta"]["ssrc"] in ("00001111", "00002222")
    # The store holds exactly the records the events carried, and every window of every stream.
    conn = Store(str(db)).connect()
    try:
        rows, total = conn.calls(CallQuery(limit=10))
        assert total == 4 and {r["id"] for r in rows} == set(calls)
        for cid, c in calls.items():
            got = conn.call(cid)
            assert got is not None and got["call"]["worst_mean"] == pytest.approx(c["worst_mean"], abs=1e-9)
            for s in got["streams"]:
                n = sum(e["type"] == "score" and e["stream"] == s["stream"] for e in events)
                assert len(s["timeline"]["value"]) == n == s["windows"]
                assert s["score"]["mean"] == records[s["stream"]]["score"]["mean"]
        # --below: the worst direction's mean
        worst = min(c["worst_mean"] for c in calls.values())
        bad, _ = conn.calls(CallQuery(below=worst + 1e-6))
        assert [r["worst_mean"] for r in bad] == [worst]
        named, _ = conn.calls(CallQuery(stream="leg-*"))
        assert [r["id"] for r in named] == [rtp_call["id"]]
    finally:
        conn.close()
    # The CLI: a table, CSV, and one call with its timeline as a sparkline.
    table = calls_cli("--store", db, "--since", "1d")
    lines = table.stdout.strip().splitlines()
    assert table.returncode == 0 and lines[0].startswith("ID") and len(lines) == 5, table.stdout
    assert any(f"{CALL}-inbound" in line for line in lines)
    csv = calls_cli("--store", db, "--csv", "--stream", "a")
    assert csv.returncode == 0 and len(csv.stdout.strip().splitlines()) == 2, csv.stdout
    show = calls_cli("show", twilio_call["id"], "--store", db)
    assert show.returncode == 0 and f"stream {CALL}-outbound" in show.stdout
    assert any(ch in show.stdout for ch in "▁▂▃▄▅▆▇█"), show.stdout
    missing = calls_cli("show", "nope", "--store", db)
    assert missing.returncode == 2 and "no call 'nope'" in missing.stderr


def test_api_without_a_store_token_rules_and_bad_queries(tmp_path, tiny_nr):
    db = tmp_path / "calls.db"
    mon = ScoreqProcess("monitor", "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads", "1",
                        "--http", "127.0.0.1:0", "--token", "s3cret", "--store", db)
    plain = ScoreqProcess("monitor", "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads",
                          "1", "--http", "127.0.0.1:0")
    try:
        port = int(mon.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
        other = int(plain.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
        assert get_json(f"http://127.0.0.1:{port}/api/calls")[0] == 401
        status, body = get_json(f"http://127.0.0.1:{port}/api/calls?token=s3cret")
        assert status == 200 and body["calls"] == [] and body["total"] == 0
        for bad in ("below=x", "limit=0", "limit=100000", "since=yesterday", "offset=-1"):
            status, body = get_json(f"http://127.0.0.1:{port}/api/calls?token=s3cret&{bad}")
            assert status == 400 and body["error"], bad
        assert get_json(f"http://127.0.0.1:{port}/api/calls/0123?token=s3cret")[0] == 404
        status, body = get_json(f"http://127.0.0.1:{other}/api/calls")
        assert status == 404 and "--store" in body["error"]
    finally:
        mon.stop()
        plain.stop()


def test_a_monitor_killed_mid_write_leaves_a_store_that_opens_with_its_records_and_says_so(tmp_path, tiny_nr):
    """SIGKILL while windows are being written: the file opens, every record written before is intact, and the
    next run says the last one did not close the store."""
    db = tmp_path / "calls.db"
    short = excerpt(EXAMPLES / "clean.wav", tmp_path / "short.wav", 0.0, 6.0)
    common = ("monitor", "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads", "1",
              "--store", db)
    first = ScoreqProcess(*common, "--fast", "--input", f"short={short}")
    assert first.wait(120) == 0, first.output()
    # A long live stream (real time) whose windows are being written when the process is killed.
    live = ScoreqProcess(*common, "--input", f"long={EXAMPLES / 'lyra3.wav'}")
    try:
        deadline = time.monotonic() + 90
        while True:
            n = sqlite3.connect(db).execute("SELECT COUNT(*) FROM windows w JOIN streams s ON s.id = w.stream_id "
                                            "WHERE s.name = 'long'").fetchone()[0]
            if n >= 3:
                break
            assert time.monotonic() < deadline and live.proc.poll() is None, live.output()
            time.sleep(0.2)
        os.killpg(live.proc.pid, signal.SIGKILL)
        live.proc.wait(30)
    finally:
        stop_process(live.proc)
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = check.execute("SELECT COUNT(*) FROM windows w JOIN streams s ON s.id = w.stream_id "
                         "WHERE s.name = 'long'").fetchone()[0]
    assert kept >= 3
    check.close()
    listed = calls_cli("--store", db, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["streams"][0]["stream"] for c in json.loads(listed.stdout)["calls"]] == ["short"]
    again = ScoreqProcess(*common, "--fast", "--input", f"short2={short}")
    assert again.wait(120) == 0, again.output()
    assert "did not close" in again.output() and "1 stream(s) live then have a timeline but no record" in \
        again.output(), again.output()
    assert {c["streams"][0]["stream"] for c in json.loads(calls_cli("--store", db, "--json").stdout)["calls"]} == {
        "short", "short2"}


def test_retention_removes_old_calls_while_the_monitor_scores(tmp_path, tiny_nr):
    """20,000 calls older than --retain are removed by the store's thread; the stream scored meanwhile has every
    window scored and its own record kept."""
    db = tmp_path / "calls.db"
    store = Store(str(db))
    conn = store.connect(create=True)
    old = time.time() - 40 * 86400
    batch = Batch.empty()
    for i in range(20_000):
        rec = CallRecord(stream="", ts=old + i, id=f"old{i:06d}", key=f"k{i}", started=old + i, ended=old + i + 60,
                         duration_s=60.0, streams=[{"id": f"s{i}", "stream": "x"}], mean=3.0, min=2.0, worst_mean=3.0)
        batch.calls.append(call_row(rec))
        batch.stream_records.append((f"s{i}", rec.id, "x", "", "file", "", old + i, old + i + 60, "eof", 3.0, 2.0,
                                     None, "run", "{}"))
        batch.windows += [(f"s{i}", w, 0.0, 4.0, old + i, 3.0, 3.0, 1.0, -20.0, None, None, None, None)
                          for w in range(5)]
    conn.write(batch)
    recent = CallRecord(stream="", ts=time.time(), id="recent", key="r", started=time.time() - 3600,
                        ended=time.time() - 3500, duration_s=100.0, streams=[])
    conn.write(Batch([], [], [], [call_row(recent)]))
    conn.close()
    clip = excerpt(EXAMPLES / "clean.wav", tmp_path / "clip.wav", 0.0, 8.0)
    jsonl = tmp_path / "e.jsonl"
    mon = ScoreqProcess("monitor", "--model", tiny_nr, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads", "1",
                        "--store", db, "--retain", "30d", "--input", f"clip={clip}", "--jsonl", jsonl)
    assert mon.wait(120) == 0, mon.output()
    events = read_jsonl(jsonl)
    scores = [e for e in events if e["type"] == "score"]
    assert scores and all(e["reason"] != "overloaded" for e in scores), [e["reason"] for e in scores]
    check = sqlite3.connect(db)
    assert check.execute("SELECT COUNT(*) FROM calls WHERE id LIKE 'old%'").fetchone()[0] == 0
    assert check.execute("SELECT COUNT(*) FROM windows WHERE stream_id LIKE 's%'").fetchone()[0] == 0
    assert check.execute("SELECT COUNT(*) FROM streams WHERE name = 'x'").fetchone()[0] == 0
    ids = {r[0] for r in check.execute("SELECT id FROM calls")}
    assert "recent" in ids and len(ids) == 2  # the recent one and the clip's call


async def test_a_relay_that_sees_a_stream_from_its_middle_keeps_its_timeline_under_the_record(tmp_path):
    """Score events of a stream whose stream_started the writer never saw (a relay started mid-call) go under a
    placeholder, and land under the stream's own id once its record comes; the record's call is listed."""
    from scoreq_live.bus import EventBus
    from scoreq_live.calls.record import Recorder
    from scoreq_live.calls.sink import StoreOptions, StoreSink
    from scoreq_live.core.events import ScoreEvent, StreamEnded, StreamStarted

    bus = EventBus()
    sink = StoreSink(StoreOptions(str(tmp_path / "r.db")))
    await sink.start()
    task = asyncio.create_task(sink.run(bus.subscribe()))
    # What a monitor made of the stream, records included; the relay's bus gets it from the third window on.
    rec = Recorder()
    made = []
    for ev in [StreamStarted(stream="m/x", ts=1000.0, id="run-x"),
               *(ScoreEvent(stream="m/x", ts=1001.0 + i, window=i, t_start=float(i), t_end=i + 4.0, mos=3.0 + i / 10)
                 for i in range(6)),
               StreamEnded(stream="m/x", ts=1010.0, t=9.0, windows=6, scored=6)]:
        made += [ev, *rec.feed(ev)]
    for ev in made[3:]:
        bus.publish(ev)
    await asyncio.sleep(0)
    bus.close()
    await task
    await sink.close()
    conn = Store(str(tmp_path / "r.db")).connect()
    try:
        (call,), _ = conn.calls(CallQuery())
        got = conn.call(call["id"])
        assert got is not None and [s["id"] for s in got["streams"]] == ["run-x"]
        assert got["streams"][0]["timeline"]["value"] == pytest.approx([3.2, 3.3, 3.4, 3.5])  # windows 2..5
    finally:
        conn.close()
