"""What keeping call records costs: write cost per window and per record, size per stream-hour, query time.

    python bench/bench_store.py            # about 2 minutes
    python bench/bench_store.py --quick    # about 30 seconds
    python bench/bench_store.py --postgres postgresql://USER@127.0.0.1:PORT/DB   # the same against PostgreSQL

1. **On the event loop** (what could delay scoring): the store sink turning events into rows, per window and
   per record, timed in rounds interleaved with the same events going through a sink that does nothing
   (A B A B ...), so that what else the machine does falls on both alike.
2. **On the writer thread**: one transaction of a realistic batch (windows of many streams at 1 s hop, their
   starts and records), per window and per record.
3. **A monitor with and without ``--store``**, interleaved: a monitor process scoring files as fast as it
   can (the bundled test-size model if given with ``--model``, else the bundled Distill-MOS), wall time each.
4. **Size**: a stream-hour (3,600 windows with network numbers, its start and record) in SQLite, after a
   checkpoint.
5. **Query time**: a day of 10,000 calls (two streams of 120 windows each) generated into a fresh store; the
   history list (``--since 1d --below 3``, the first 50 and the count), a call with its timelines, and a name
   filter, each timed over repeats (median).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scoreq_live.calls.record import Recorder  # noqa: E402
from scoreq_live.calls.sink import StoreOptions, StoreSink  # noqa: E402
from scoreq_live.calls.store import Batch, CallQuery, Store, call_row, started_row, stream_record_row, window_row  # noqa: E402
from scoreq_live.core.events import (  # noqa: E402
    CallRecord,
    Event,
    NetQuality,
    ScoreEvent,
    StreamEnded,
    StreamRecord,
    StreamStarted,
    new_id,
)
from scoreq_live.sinks.bands import Bands  # noqa: E402


def stream_events(name: str, windows: int, t0: float, call: str = "", records: bool = True) -> list[Event]:
    """A stream's events as a monitor publishes them: start, a score a second with network numbers, end, and
    (``records``) its stream and call records."""
    rng = random.Random(name)
    evs: list[Event] = [StreamStarted(stream=name, ts=t0, source="rtp", detail=f"PCMU from 10.0.0.1:4000 {name}",
                                      rate=8000, channels=1, model="distillmos", mode="nr", window_s=4.0, hop_s=1.0,
                                      id=new_id(), call=call, meta={"ssrc": "0a0b0c0d", "remote": "10.0.0.1:4000"})]
    for i in range(windows):
        mos = 1.0 + 4.0 * rng.random()
        net = NetQuality("PCMU", 200, 196, 4, 0, 0, 2.0, 3.1, 0.02, 88.0, 4.2)
        evs.append(ScoreEvent(stream=name, ts=t0 + 4 + i, window=i, t_start=float(i), t_end=i + 4.0, mos=mos,
                              smoothed=mos, speech=0.8, level_dbfs=-24.0, model="distillmos", latency_ms=30.0,
                              net=net, scores={"mos": mos}))
    evs.append(StreamEnded(stream=name, ts=t0 + 4 + windows, t=windows + 3.0, windows=windows, scored=windows,
                           net={"codec": "PCMU", "expected": 200 * windows, "loss_pct": 2.0}))
    if not records:
        return evs
    rec = Recorder({"nr": Bands.for_mode("nr")})
    out: list[Event] = []
    for ev in evs:
        out.append(ev)
        out.extend(rec.feed(ev))
    return out


class _Null(StoreSink):
    """The baseline: the same call for each event, doing nothing."""

    def add(self, ev: Event) -> None:
        return None


def loop_cost(rounds: int, streams: int, windows: int) -> dict[str, float]:
    """Microseconds per window of StoreSink.add on the loop, interleaved with a sink that does nothing."""
    events = [ev for i in range(streams) for ev in stream_events(f"s{i}", windows, 1e9)]
    n_windows = sum(isinstance(e, ScoreEvent) for e in events)
    n_records = sum(isinstance(e, (StreamRecord, CallRecord)) for e in events)
    with tempfile.TemporaryDirectory() as d:
        opts = StoreOptions(str(Path(d) / "x.db"), buffer=10**9)
        real, null = StoreSink(opts), _Null(opts)
        times: dict[str, list[float]] = {"store": [], "none": []}
        for _ in range(rounds):
            for name, sink in (("none", null), ("store", real)):
                t = time.perf_counter()
                for ev in events:
                    sink.add(ev)
                times[name].append(time.perf_counter() - t)
                real._pending = Batch.empty()
        store_s, none_s = statistics.median(times["store"]), statistics.median(times["none"])
    # Records are rare (one a stream): their share is measured apart below; here all goes on the windows.
    return {"loop_us_per_window": 1e6 * (store_s - none_s) / n_windows, "events": len(events),
            "windows": n_windows, "records": n_records}


def writer_cost(rounds: int, streams: int, windows: int) -> dict[str, float]:
    """Milliseconds of one transaction: a batch of windows (no records), and one of records alone."""
    out: dict[str, list[float]] = {"windows": [], "records": []}
    with tempfile.TemporaryDirectory() as d:
        conn = Store(str(Path(d) / "w.db")).connect(create=True)
        for r in range(rounds):
            wins, recs = Batch.empty(), Batch.empty()
            for i in range(streams):
                for ev in stream_events(f"r{r}s{i}", windows, 1e9 + r):
                    if isinstance(ev, ScoreEvent):
                        wins.windows.append(window_row(f"r{r}s{i}", ev))
                    elif isinstance(ev, StreamStarted):
                        recs.streams_started.append(started_row(ev.id, ev, "", "run"))
                    elif isinstance(ev, StreamRecord):
                        recs.stream_records.append(stream_record_row(ev, "run"))
                    elif isinstance(ev, CallRecord):
                        recs.calls.append(call_row(ev))
            t = time.perf_counter()
            conn.write(wins)
            out["windows"].append((time.perf_counter() - t) / len(wins.windows))
            t = time.perf_counter()
            conn.write(recs)
            out["records"].append((time.perf_counter() - t) / (len(recs.calls)))
        conn.close()
    return {"writer_us_per_window": 1e6 * statistics.median(out["windows"]),
            "writer_us_per_call_record": 1e6 * statistics.median(out["records"])}


def monitor_run(store: Path | None, inputs: list[Path], model: str | None) -> float:
    args = [sys.executable, "-m", "scoreq_live", "monitor", "--fast", "--no-tui", "--no-ws", "-q", "--threads", "1"]
    if model:
        args += ["--model", model, "--model-kind", "mos"]
    for i, f in enumerate(inputs):
        args += ["--input", f"s{i}={f}"]
    if store is not None:
        args += ["--store", str(store)]
    t = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def monitor_ab(rounds: int, model: str | None) -> dict[str, float]:
    inputs = [ROOT / "examples" / "clean.wav", ROOT / "examples" / "lyra3.wav"] * 2
    times: dict[str, list[float]] = {"none": [], "store": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            times["none"].append(monitor_run(None, inputs, model))
            times["store"].append(monitor_run(Path(d) / f"m{r}.db", inputs, model))
    ratios = [s / n for s, n in zip(times["store"], times["none"])]
    return {"monitor_store_over_none": statistics.median(ratios), "monitor_none_s": statistics.median(times["none"]),
            "monitor_store_s": statistics.median(times["store"])}


def stream_hour_bytes() -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.db"
        store = Store(str(path))
        conn = store.connect(create=True)
        empty = path.stat().st_size
        batch = Batch.empty()
        for ev in stream_events("hour", 3600, 1e9):
            if isinstance(ev, ScoreEvent):
                batch.windows.append(window_row("hour-id", ev))
            elif isinstance(ev, StreamStarted):
                batch.streams_started.append(started_row("hour-id", ev, "", "run"))
            elif isinstance(ev, StreamRecord):
                batch.stream_records.append(stream_record_row(ev, "run"))
            elif isinstance(ev, CallRecord):
                batch.calls.append(call_row(ev))
        conn.write(batch)
        conn.raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        return path.stat().st_size - empty


def query_times(target: str | None, calls: int, repeats: int) -> dict[str, float]:
    """A day of ``calls`` calls (two streams of 120 windows each) in a fresh store; query times, ms (median)."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(target or str(Path(d) / "q.db"))
        conn = store.connect(create=True)
        now = time.time()
        rng = random.Random(1)
        t_gen = time.perf_counter()
        ids = []
        sid: dict[str, str] = {}
        for start in range(0, calls, 500):
            batch = Batch.empty()
            for c in range(start, min(start + 500, calls)):
                t0 = now - 86400 + 86400 * c / calls
                key = f"day-{c}"
                evs = (stream_events(f"c{c}-in", 120, t0, key, records=False)
                       + stream_events(f"c{c}-out", 120, t0 + 0.1, key, records=False))
                rec = Recorder({"nr": Bands.for_mode("nr")})
                for ev in evs:
                    for e in [ev, *rec.feed(ev)]:
                        if isinstance(e, ScoreEvent):
                            batch.windows.append(window_row(sid[e.stream], e))
                        elif isinstance(e, StreamStarted):
                            sid[e.stream] = e.id
                            batch.streams_started.append(started_row(e.id, e, "", "run"))
                        elif isinstance(e, StreamRecord):
                            batch.stream_records.append(stream_record_row(e, "run"))
                        elif isinstance(e, CallRecord):
                            batch.calls.append(call_row(e))
                            ids.append(e.id)
            conn.write(batch)
        gen_s = time.perf_counter() - t_gen
        q = CallQuery(since=now - 86400, below=3.0, limit=50)
        timings: dict[str, list[float]] = {"list": [], "call": [], "stream": []}
        for _ in range(repeats):
            t = time.perf_counter()
            rows, total = conn.calls(q)
            timings["list"].append(time.perf_counter() - t)
            t = time.perf_counter()
            conn.call(rng.choice(ids))
            timings["call"].append(time.perf_counter() - t)
            t = time.perf_counter()
            conn.calls(CallQuery(stream=f"c{rng.randrange(calls)}-in"))
            timings["stream"].append(time.perf_counter() - t)
        conn.close()
    return {"calls": calls, "generate_s": gen_s, "list_ms": 1e3 * statistics.median(timings["list"]),
            "list_total": total, "call_with_timelines_ms": 1e3 * statistics.median(timings["call"]),
            "stream_filter_ms": 1e3 * statistics.median(timings["stream"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--postgres", metavar="URL", help="also measure the queries against PostgreSQL (an empty "
                                                     "database: the day of calls is written into it)")
    p.add_argument("--model", help="the model the monitor runs use (default: the bundled one)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args()
    rounds = 3 if a.quick else 7
    report: dict[str, object] = {}
    report["loop"] = loop_cost(rounds, 20 if a.quick else 50, 120)
    report["writer_sqlite"] = writer_cost(rounds, 20 if a.quick else 50, 120)
    report["stream_hour_bytes_sqlite"] = stream_hour_bytes()
    report["query_sqlite"] = query_times(None, 2000 if a.quick else 10_000, 5 if a.quick else 11)
    if a.postgres:
        report["query_postgres"] = query_times(a.postgres, 2000 if a.quick else 10_000, 5 if a.quick else 11)
    report["monitor"] = monitor_ab(2 if a.quick else 4, a.model)
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
