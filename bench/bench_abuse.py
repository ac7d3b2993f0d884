"""Loop lag under abuse: how late the monitor's event loop runs while one client misbehaves, against quiet rounds.

    python bench/bench_abuse.py            # about 4 minutes
    python bench/bench_abuse.py --quick    # about 1 minute

A real monitor process (the bundled model, an RTP port and --http on loopback) scores one good call: real
speech as 20 ms PCMU packets, sent in real time by a thread of this process.  Rounds of ``--round-s`` seconds
alternate between quiet and one attack at a time (Q A1 Q A2 Q A3 ... repeated), so that whatever else the
machine does falls on both alike.  Each round's loop lag comes from the monitor's own
``scoreq_live_loop_lag_seconds`` histogram (the difference of two scrapes: p99 is the upper bound of the
bucket holding it).  Attacks, each bounded in count and time:

- ``subscribe``: one feed client sends 3,000 subscribe messages on /ws without reading.
- ``whip``: 200 concurrent POST /whip with 150 unbundled audio sections each.
- ``rtp-flood``: 20 SSRCs send real speech at 10x real time to the good call's port.
- ``slow-headers``: 100 connections send their request headers a byte every 0.5 s.

Also reported: whether the good call was split (more than one stream_started for it) or ended early.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import rtp_tools as rt  # noqa: E402
from tests.media_tools import mulaw_encode  # noqa: E402

LOOPBACK = "127.0.0.1"
GOOD_SSRC = 0x600D0001


def ulaw_payloads(path: Path) -> list[bytes]:
    """20 ms PCMU payloads of a recording (the tests' G.711 encoder)."""
    import soxr

    x, sr = sf.read(path, dtype="float32", always_2d=True)
    code = mulaw_encode(soxr.resample(x.mean(axis=1), sr, 8000))
    return [code[i:i + 160] for i in range(0, len(code) - 159, 160)]


class Monitor:
    def __init__(self, rtp_port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scoreq_live", "monitor", "-i", f"good=rtp://{LOOPBACK}:{rtp_port}",
             "--http", f"{LOOPBACK}:0", "--no-ws", "--no-tui", "--jsonl", "-", "--device", "cpu"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.events: list[dict] = []
        self.err: list[str] = []
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._errs, daemon=True).start()
        deadline = time.monotonic() + 120
        self.http = 0
        while not self.http and time.monotonic() < deadline:
            for line in list(self.err):
                if m := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                    self.http = int(m[1])
            time.sleep(0.1)
        if not self.http:
            raise RuntimeError("the monitor did not start:\n" + "".join(self.err))

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def _errs(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def lag_buckets(self) -> dict[float, float]:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for m in re.finditer(r'^scoreq_live_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
            out[float(m[1])] = float(m[2])
        return out

    def stop(self) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def p99(before: dict[float, float], after: dict[float, float]) -> tuple[float, int]:
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    n = counts[-1]
    for le, c in zip(les, counts):
        if c >= 0.99 * n:
            return le, int(n)
    return float("inf"), int(n)


def good_call(port: int, payloads: list[bytes], stop: threading.Event) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        t0 = time.monotonic()
        i = 0
        while not stop.is_set():
            s.sendto(rt.rtp_packet(i & 0xFFFF, i * 160, GOOD_SSRC, 0, payloads[i % len(payloads)]),
                     (LOOPBACK, port))
            i += 1
            wait = t0 + i * 0.02 - time.monotonic()
            if wait > 0:
                time.sleep(wait)


# -- attacks: each runs for about `seconds` ----------------------------------------------------------------


async def subscribe_storm(mon: Monitor, rtp_port: int, payloads: list[bytes], seconds: float) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://{LOOPBACK}:{mon.http}/ws") as ws:
        for i in range(3000):
            await ws.send_str(json.dumps({"type": "subscribe", "streams": ["good"] if i % 2 else "*"}))
        await asyncio.sleep(seconds)


async def whip_flood(mon: Monitor, rtp_port: int, payloads: list[bytes], seconds: float) -> None:
    section = ("m=audio 9 UDP/TLS/RTP/SAVPF 0\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:0 PCMU/8000\r\na=sendonly\r\n"
               "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\n")
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 "
           + ":".join(["AB"] * 32) + "\r\n" + section * 150)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async def post() -> None:
            try:
                async with http.post(f"http://{LOOPBACK}:{mon.http}/whip", data=sdp,
                                     headers={"Content-Type": "application/sdp"}) as r:
                    await r.read()
            except aiohttp.ClientError:
                pass

        await asyncio.gather(*(post() for _ in range(200)))
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - t0)))


async def rtp_flood(mon: Monitor, rtp_port: int, payloads: list[bytes], seconds: float) -> None:
    def flood() -> None:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
        try:
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < seconds:
                for k, s in enumerate(socks):
                    s.sendto(rt.rtp_packet(i & 0xFFFF, i * 160, 0xF100D000 + k, 0, payloads[i % len(payloads)]),
                             (LOOPBACK, rtp_port))
                i += 1
                wait = t0 + i * 0.002 - time.monotonic()  # 10x real time
                if wait > 0:
                    time.sleep(wait)
        finally:
            for s in socks:
                s.close()

    await asyncio.to_thread(flood)


async def slow_headers(mon: Monitor, rtp_port: int, payloads: list[bytes], seconds: float) -> None:
    head = f"GET /metrics HTTP/1.1\r\nHost: {LOOPBACK}\r\nX-Slow: " + "a" * 200
    conns = []
    try:
        for _ in range(100):
            _, w = await asyncio.open_connection(LOOPBACK, mon.http)
            conns.append(w)
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < seconds and i < len(head):
            for w in conns:
                if not w.is_closing():
                    w.write(head[i].encode())
            i += 1
            await asyncio.sleep(0.5)
    finally:
        for w in conns:
            w.close()


async def quiet(mon: Monitor, rtp_port: int, payloads: list[bytes], seconds: float) -> None:
    await asyncio.sleep(seconds)


ATTACKS: dict[str, Callable] = {"subscribe": subscribe_storm, "whip": whip_flood, "rtp-flood": rtp_flood,
                                "slow-headers": slow_headers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--round-s", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    round_s = a.round_s or (4.0 if a.quick else 8.0)
    repeats = a.repeats or (1 if a.quick else 3)
    payloads = ulaw_payloads(ROOT / "examples" / "clean.wav")
    rtp_port = rt.free_udp_port()
    mon = Monitor(rtp_port)
    stop = threading.Event()
    sender = threading.Thread(target=good_call, args=(rtp_port, payloads, stop), daemon=True)
    sender.start()
    results: dict[str, list[tuple[float, int]]] = {"quiet": []}
    spans: dict[str, list[tuple[float, float]]] = {}  # wall-clock spans of each kind of round
    try:
        time.sleep(10)  # the call's first windows are scored
        for _ in range(repeats):
            for name, attack in ATTACKS.items():
                for label, fn in (("quiet", quiet), (name, attack)):
                    before = mon.lag_buckets()
                    t0 = time.time()
                    asyncio.run(fn(mon, rtp_port, payloads, round_s))
                    time.sleep(1.0)  # what the attack left queued is worked off inside the round
                    results.setdefault(label, []).append(p99(before, mon.lag_buckets()))
                    spans.setdefault(label, []).append((t0, time.time()))
                    print(f"{label:13s} p99 loop lag <= {results[label][-1][0] * 1000:7.1f} ms "
                          f"({results[label][-1][1]} samples)", file=sys.stderr, flush=True)
    finally:
        stop.set()
        sender.join(5)
        time.sleep(1)
        mon.stop()
    starts = [e for e in mon.events if e["type"] == "stream_started" and e["stream"].startswith("good-600d0001")]
    ends = [e for e in mon.events if e["type"] == "stream_ended" and e["stream"].startswith("good-600d0001")]
    q = statistics.median(v for v, _ in results["quiet"])
    print(f"\nloop lag p99 per round (bucket upper bounds), {repeats} rounds of {round_s:g} s each, interleaved "
          "with quiet rounds")
    print(f"{'round':14s} {'median p99':>11s} {'max p99':>9s} {'vs quiet':>9s}   the good call's windows in them")
    report = {}
    scores = [e for e in mon.events if e["type"] == "score" and e["stream"].startswith("good-600d0001")]
    for label, vals in results.items():
        med = statistics.median(v for v, _ in vals)
        mx = max(v for v, _ in vals)
        mine = [e for e in scores if any(a <= e["ts"] < b for a, b in spans[label])]
        mos = [e["mos"] for e in mine if e["mos"] is not None]
        skipped = sum(1 for e in mine if e["reason"] == "overloaded")
        lost = sum(e["net"]["lost"] for e in mine if e.get("net"))
        expected = sum(e["net"]["expected"] for e in mine if e.get("net"))
        report[label] = {"p99_median_s": med, "p99_max_s": mx, "ratio": med / q if q else None,
                         "windows": len(mine), "mos_mean": statistics.fmean(mos) if mos else None,
                         "overloaded": skipped, "packets_lost": lost, "packets_expected": expected}
        print(f"{label:14s} {med * 1000:9.1f}ms {mx * 1000:7.1f}ms {med / q if q else float('nan'):8.1f}x   "
              f"{len(mine)} windows, mean MOS {statistics.fmean(mos) if mos else float('nan'):.3f}, "
              f"{skipped} skipped (overloaded), packets lost {lost}/{expected}")
    print(f"\ngood call: {len(starts)} stream_started, ends {[e['reason'] for e in ends]} "
          f"({'not split' if len(starts) == 1 else 'SPLIT'})")
    report["good_call"] = {"started": len(starts), "ended": [e["reason"] for e in ends]}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
