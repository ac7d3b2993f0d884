"""WebRTC (WHIP) publishers: time from offer to first score, and memory and descriptors per session.

    python bench/bench_whip.py             # about 3 minutes
    python bench/bench_whip.py --quick     # a smoke run

The monitor is built as the command line builds it (``build_monitor`` with ``--http 127.0.0.1:0
--ice-host 127.0.0.1``, the bundled Distill-MOS, 7.68 s window, 1 s hop) and runs in this process; the
publishers are real aiortc peers sending real speech (examples/clean.wav, looped) in real time.

1. Offer to first score: an aiortc peer in this process POSTs its offer; measured are the POST's round trip
   (the answer, with ICE gathered) and the time to the stream's first ``score`` event, and that minus the
   window (what the WebRTC path adds: ICE, DTLS, the jitter buffer, the model run).  Baseline, interleaved
   run by run: the same audio from a file input played in real time through the same kind of monitor, its
   first score minus the window.
2. Per session: N publishers in a separate process; with all N live and scored, the Python memory traced
   since before they came (tracemalloc), the process's resident memory and its open file descriptors, each
   divided by N.  Then the publishers are killed (no DELETE) and the same numbers are taken once every
   stream has ended, against the numbers before.  Three rounds in one monitor; the third is reported (the
   first two warm up what is made once, see per_session).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoreq_live.bus import Subscription  # noqa: E402
from scoreq_live.monitor import FeedOptions, IngestOptions, Monitor, MonitorOptions, build_monitor  # noqa: E402
from scoreq_live.sinks.base import Sink  # noqa: E402
from tests.whip_tools import publish, recording_48k  # noqa: E402

CLEAN = ROOT / "examples" / "clean.wav"


class Collect(Sink):
    """Every event's type, stream and arrival time (monotonic)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str, str | None]] = []

    async def run(self, events: Subscription) -> None:
        async for ev in events:
            self.events.append((time.monotonic(), ev.type, ev.stream, getattr(ev, "reason", None)))

    def first(self, stream: str, kind: str) -> float | None:
        return next((t for t, k, s, _ in self.events if s == stream and k == kind), None)

    def ended(self, names: list[str]) -> bool:
        done = {s for _, k, s, _ in self.events if k == "stream_ended"}
        return all(n in done for n in names)


def _monitor(inputs: tuple[str, ...] = ()) -> tuple[Monitor, Collect]:
    sink = Collect()
    opts = MonitorOptions(inputs=inputs, feed=FeedOptions(http="127.0.0.1:0", ws=None),
                          ingest=IngestOptions(ice_hosts=("127.0.0.1",)), linger=0)
    return build_monitor(opts, [sink]), sink


async def _wait(pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)


async def first_score_webrtc(window_s: float) -> tuple[float, float]:
    mon, sink = _monitor()
    run = asyncio.create_task(mon.run())
    assert mon.feed is not None
    await _wait(lambda: mon.feed.http_address is not None and mon.engine is not None, 30)
    await asyncio.sleep(0.5)
    url = f"http://{mon.feed.http_address}/whip?stream=pub"
    audio = recording_48k(CLEAN)
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        pub = await publish(http, url, audio)
        answered = time.monotonic() - t0
        await _wait(lambda: sink.first("pub", "score") is not None, 60)
        first = sink.first("pub", "score")
        assert first is not None
        await pub.pc.close()
    assert mon.engine is not None
    mon.engine.stop()
    await run
    return answered, first - t0 - window_s


async def first_score_file(window_s: float) -> float:
    mon, sink = _monitor((f"file={CLEAN}",))
    t0 = time.monotonic()
    run = asyncio.create_task(mon.run())
    await _wait(lambda: sink.first("file", "stream_started") is not None, 60)
    t0 = sink.first("file", "stream_started") or t0
    await _wait(lambda: sink.first("file", "score") is not None, 60)
    first = sink.first("file", "score")
    assert first is not None and mon.engine is not None
    mon.engine.stop()
    await run
    return first - t0 - window_s


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def per_session(n: int, rounds: int = 3) -> dict[str, float]:
    mon, sink = _monitor()
    run = asyncio.create_task(mon.run())
    assert mon.feed is not None
    await _wait(lambda: mon.feed.http_address is not None and mon.engine is not None, 30)
    url = f"http://{mon.feed.http_address}/whip"
    out: dict[str, float] = {}
    # The first rounds warm up what is made once: codecs, certificates, and onnxruntime's memory for the shapes
    # of the windows that end streams (shorter tails: each new length grows its arena once, by up to a few
    # hundred MB resident with Distill-MOS); the last round is the one reported.
    for r in range(rounds):
        rnd = "warm" if r == 0 else f"pub{r}-"
        gc.collect()
        fds0, rss0 = _fds(), _rss()
        tracemalloc.start()
        mem0 = tracemalloc.get_traced_memory()[0]
        proc = subprocess.Popen([sys.executable, "-m", "tests.whip_tools", url, str(n), str(CLEAN), "--prefix", rnd],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        names = [f"{rnd}{i}" for i in range(n)]
        live = lambda names=names: all(sink.first(s, "score") is not None for s in names)  # noqa: E731
        try:
            await _wait(live, 120)
            gc.collect()
            out.update(mem_live=(tracemalloc.get_traced_memory()[0] - mem0) / n, rss_live=(_rss() - rss0) / n,
                       fds_live=(_fds() - fds0) / n)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await _wait(lambda names=names: sink.ended(names), 60)
            await asyncio.sleep(4)  # peer connections close in the background
            gc.collect()
            out.update(mem_after=tracemalloc.get_traced_memory()[0] - mem0, rss_after=_rss() - rss0,
                       fds_after=_fds() - fds0)
            print(f"  round {r}: {out}", flush=True)
        finally:
            tracemalloc.stop()
            if proc.poll() is None:
                proc.kill()
    assert mon.engine is not None
    mon.engine.stop()
    await run
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sessions", type=int, default=20)
    a = ap.parse_args()
    from scoreq_live.scoring.catalogue import resolve_model

    window_s = resolve_model("distillmos").windowing()[0]
    runs = 1 if a.quick else 3
    webrtc, answers, files = [], [], []
    for _ in range(runs):  # interleaved: WebRTC, file, WebRTC, file, ...
        answered, lat = await first_score_webrtc(window_s)
        answers.append(answered)
        webrtc.append(lat)
        files.append(await first_score_file(window_s))
    print(f"offer -> answer (POST round trip, ICE gathered): median {statistics.median(answers) * 1000:.0f} ms")
    print(f"offer -> first score, minus the {window_s} s window: median {statistics.median(webrtc) * 1000:.0f} ms "
          f"({', '.join(f'{x * 1000:.0f}' for x in webrtc)}); same audio from a file: "
          f"{statistics.median(files) * 1000:.0f} ms ({', '.join(f'{x * 1000:.0f}' for x in files)})")
    n = 4 if a.quick else a.sessions
    m = await per_session(n)
    print(f"{n} live sessions, per session: {m['mem_live'] / 1e6:.2f} MB traced Python memory, "
          f"{m['rss_live'] / 1e6:.2f} MB resident, {m['fds_live']:.1f} file descriptors")
    print(f"after they vanished and ended: {m['mem_after'] / 1e6:+.3f} MB traced, {m['rss_after'] / 1e6:+.1f} MB "
          f"resident, {m['fds_after']:+.0f} file descriptors (against before they came)")
    print(f"numpy {np.__version__}")


if __name__ == "__main__":
    asyncio.run(main())
