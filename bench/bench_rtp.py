"""RTP input benchmark: how soon a call's first score comes, and how many calls the receive path carries.

    python bench/bench_rtp.py             # about 5 minutes
    python bench/bench_rtp.py --quick     # a smoke run (about 1 minute)

The senders run in a separate process (plain UDP sockets, RTP headers packed by hand, real speech as 20 ms
PCMU payloads from examples/clean.wav), so that they never share the receiver's event loop; the receiver is
the monitor's own path in this process: :class:`RtpPort` (socket, demux, jitter buffers, decoders) feeding an
:class:`Engine`.  This machine's speed varies from run to run, so each number comes with a baseline measured
in the same run.

1. First score: time from a stream's first packet to its first score event, minus the window length (the
   pipeline's own latency: jitter buffer, delivery, batching, the model run), with the bundled model
   (distillmos, its 7.68 s window) and with a tiny model on a 1 s window (the pipeline without the model's
   cost).  Baseline: the same audio from a file played in real time through the same engine, interleaved
   run by run.  Each input's first datum comes at the end of its 20 ms (the file source releases block k
   when its end is due; the RTP sender sends packet i at i x 20 ms), so both are measured the same way.
2. Receive capacity: N concurrent streams (50 packets/s each), N = 25, 50, 100, ... doubling, with a trivial
   scorer so that the model is not the limit, until packets are lost, late, dropped by a port's queue or the
   kernel, streams do not start, or a backlog builds up in the socket buffers (the last datagram read 100 ms
   or more after the sender stopped); then halfway back once or twice.  A port takes at most 64 senders (the
   README), so the streams go to ports of --per-port streams each, all in the one engine as several
   ``-i rtp://`` inputs would be (``--per-port 0``: all into one port, its cap raised).  Streams start
   1.3 ms apart (calls come and go; they do not all start in the same instant), which also spreads their
   packets over the 20 ms.  CPU per packet is compared with the first step.
3. The model's own capacity (the other limit): windows per second of the bundled model from a batch run,
   on one thread and on all cores, i.e. streams at one hop per second.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import multiprocessing as mp
import os
import random
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoreq_live.audio import load_audio  # noqa: E402
from scoreq_live.bus import EventBus  # noqa: E402
from scoreq_live.core.events import ScoreEvent, StreamError  # noqa: E402
from scoreq_live.core.stream import StreamConfig  # noqa: E402
from scoreq_live.engine import Engine, EngineConfig  # noqa: E402
from scoreq_live.scoring.catalogue import resolve_model  # noqa: E402
from scoreq_live.scoring.scorer import Scorer  # noqa: E402
from scoreq_live.scoring.session import OnnxModel  # noqa: E402
from scoreq_live.scoring.spec import ModelSpec  # noqa: E402
from scoreq_live.sources.file import FileSource  # noqa: E402
from scoreq_live.sources.rtp import RtpPort, RtpSpec  # noqa: E402

SPEECH = ROOT / "examples" / "clean.wav"
PACKET_S = 0.02
STREAM_GAP_S = 0.0013  # between stream starts: not a divisor of 20 ms, so the streams' phases spread


def pcmu_payloads(path: Path = SPEECH) -> list[bytes]:
    """20 ms PCMU payloads (160 bytes) of a speech file: soxr to 8 kHz, PyAV's G.711 mu-law encoder."""
    import av
    import soxr

    x = soxr.resample(load_audio(path), 16000, 8000)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    pcm = np.concatenate([pcm, np.zeros((-len(pcm)) % 160, np.int16)])
    ctx: Any = av.CodecContext.create("pcm_mulaw", "w")
    ctx.sample_rate, ctx.layout, ctx.format = 8000, "mono", "s16"
    out = b""
    for i in range(0, len(pcm), 160):
        frame = av.AudioFrame.from_ndarray(pcm[i:i + 160].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, i
        out += b"".join(bytes(p) for p in ctx.encode(frame))
    return [out[i:i + 160] for i in range(0, len(out) - 159, 160)]


# --- the sender process ---------------------------------------------------------------------------


def sender_main(conn: Any, payloads: list[bytes]) -> None:
    """Serve ``("send", dests, ssrcs, packets, sockets, start_at, gap_s)`` until ``("quit",)``."""
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        conn.send(send_streams(payloads, *cmd[1:]))


def send_streams(payloads: list[bytes], dests: list[int], ssrcs: list[int], packets: int, sockets: int,
                 start_at: float, gap_s: float) -> dict[str, Any]:
    """Stream j (SSRC ``ssrcs[j]``) sends ``packets`` packets to 127.0.0.1:``dests[j]``, packet i at
    ``start_at + j * gap_s + i * 20 ms`` (``time.monotonic``, the receiver's clock too), from socket j % ``sockets``."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(max(1, min(sockets, len(ssrcs))))]
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    rng = random.Random(len(ssrcs))
    seq = [rng.randrange(65536) for _ in ssrcs]
    ts = [rng.randrange(1 << 32) for _ in ssrcs]
    offset = [rng.randrange(len(payloads)) for _ in ssrcs]  # each stream at its own place in the speech
    sent = [0] * len(ssrcs)
    heap = [(start_at + j * gap_s, j) for j in range(len(ssrcs))]
    heapq.heapify(heap)
    addrs = [("127.0.0.1", d) for d in dests]
    behind: list[float] = []
    first = None
    cpu0 = time.process_time()
    while heap:
        due, j = heap[0]
        now = time.monotonic()
        if due - now > 0.0003:
            time.sleep(due - now - 0.0002)
            continue
        behind.append(now - due)
        i = sent[j]
        pkt = struct.pack("!BBHII", 0x80, 0x80 if i == 0 else 0, (seq[j] + i) & 0xFFFF, (ts[j] + 160 * i) & 0xFFFFFFFF,
                          ssrcs[j]) + payloads[(offset[j] + i) % len(payloads)]
        if first is None:
            first = time.monotonic()
        try:
            socks[j % len(socks)].sendto(pkt, addrs[j])
        except OSError:
            pass  # the receiver is gone (ICMP unreachable on a later send)
        sent[j] = i + 1
        if sent[j] < packets:
            heapq.heapreplace(heap, (due + PACKET_S, j))
        else:
            heapq.heappop(heap)
    for s in socks:
        s.close()
    behind.sort()
    return {"sent": sum(sent), "first": first, "end": time.monotonic(), "cpu_s": time.process_time() - cpu0,
            "behind_p99_ms": 1000 * behind[int(0.99 * (len(behind) - 1))] if behind else 0.0,
            "behind_max_ms": 1000 * behind[-1] if behind else 0.0}


class Sender:
    """The sender process and its pipe."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=sender_main, args=(child, payloads), daemon=True)
        self.proc.start()

    def start(self, *args: Any) -> None:
        self.conn.send(("send", *args))

    async def result(self) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self.conn.recv)

    def close(self) -> None:
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# --- helpers --------------------------------------------------------------------------------------


class TrivialScorer:
    """Scores every window 3.0 at once: the engine's model stand-in when the model is not what is measured."""

    name = "trivial"

    def score(self, windows: Any) -> np.ndarray:
        return np.full(len(windows), 3.0, np.float32)


class StampedFile(FileSource):
    """A real-time file source that notes when it released its first block (``time.monotonic``)."""

    first: float | None = None

    async def frames(self):  # type: ignore[no-untyped-def]
        async for f in super().frames():
            if self.first is None:
                self.first = time.monotonic()
            yield f


def rtp_port(name: str, timeout_s: float, max_streams: int = 64) -> RtpPort:
    port = RtpPort(RtpSpec("127.0.0.1", free_udp_port(), {}, name), timeout_s=timeout_s)
    port.demux.max_streams = max_streams  # the demux's default cap is 64 streams per port
    port.check()  # bound now, before any sender starts
    return port


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kernel_drops(port: int) -> int:
    """Datagrams the kernel dropped on the UDP socket bound to ``port`` (full receive buffer)."""
    return udp_socket_stats([port])[1]


def udp_socket_stats(ports: list[int]) -> tuple[int, int]:
    """(bytes waiting in the receive queues, datagrams dropped) of the UDP sockets bound to ``ports``."""
    want = {f":{p:04X}" for p in ports}
    queued = drops = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1][-5:] in want:
            queued += int(f[4].split(":")[1], 16)
            drops += int(f[-1])
    return queued, drops


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- 1. first score -------------------------------------------------------------------------------


async def first_score(scorer: Any, model: str, window_s: float, kind: str, sender: Sender, wav: Path) -> dict:
    bus = EventBus()
    sub = bus.subscribe(maxsize=100_000, name="bench")
    cfg = EngineConfig(stream=StreamConfig(window_s=window_s, hop_s=1.0, model=model))
    runs: list[float] = []
    if kind == "rtp":
        port = rtp_port("lat", timeout_s=2.0)
        engine = Engine(scorer, [port], cfg, bus)
    else:
        src = StampedFile("lat", wav)
        engine = Engine(scorer, [src], cfg, bus)
    engine.batch_observers.append(lambda n, took: runs.append(took))
    task = asyncio.create_task(engine.run(duration=window_s + 20))
    if kind == "rtp":
        packets = int((window_s + 1.0) / PACKET_S)
        sender.start([port.address[1]], [0x1A7E0000 + random.randrange(1 << 16)], packets, 1, time.monotonic() + 0.2,
                     0.0)
    t_score, ev0 = None, None
    async for ev in sub:
        if isinstance(ev, ScoreEvent):
            t_score, ev0 = time.monotonic(), ev
            break
        if isinstance(ev, StreamError):
            raise RuntimeError(ev.error)
    engine.stop()
    await task
    if kind == "rtp":
        first = (await sender.result())["first"]
    else:
        first = src.first
    assert t_score is not None and ev0 is not None and first is not None
    total = t_score - first
    return {"pipeline_ms": 1000 * (total - window_s), "model_ms": 1000 * runs[0] if runs else float("nan"),
            "core_to_event_ms": ev0.latency_ms, "scored": ev0.mos is not None, "t_end": ev0.t_end}


async def latency_suite(args: argparse.Namespace, sender: Sender) -> None:
    bundled = Scorer(OnnxModel(resolve_model("distillmos"), device="cpu"), max_batch=8)
    window, _ = resolve_model("distillmos").windowing()
    models: list[tuple[str, Any, float]] = [("distillmos", bundled, window)]
    tmp = tempfile.TemporaryDirectory(prefix="bench-rtp-")
    try:
        from tests.tiny_models import build  # onnx (the test extra) builds it

        path = build(Path(tmp.name) / "tiny.onnx", kind="mos")
        tiny = ModelSpec("tiny", path, native_window_s=1.0, pad_multiple=320)
        models.append(("tiny", Scorer(OnnxModel(tiny, device="cpu"), max_batch=8), 1.0))
    except ImportError:
        print("  (no onnx here: the tiny-model rows are left out)")
    for _, scorer, win in models:
        scorer.score([np.zeros(int(win * 16000), np.float32)])  # warm-up: the first run allocates and picks kernels
    # the file baseline plays the very audio the RTP sender sends: its PCMU decoded, at 16 kHz
    wav = Path(tmp.name) / "pcmu.wav"
    write_pcmu_wav(wav)
    print(f"\n1. first score: first packet (file: first 20 ms block) -> first score event, minus the window; "
          f"{args.repeat} runs each, interleaved")
    res: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeat):
        for name, scorer, win in models:
            for kind in ("rtp", "file"):
                r = await first_score(scorer, name, win, kind, sender, wav)
                res.setdefault((name, kind), []).append(r)
                print(f"    run {rep + 1} {name:10s} {kind:4s}: {r['pipeline_ms']:7.1f} ms "
                      f"(model run {r['model_ms']:.1f} ms, window end -> event {r['core_to_event_ms']:.1f} ms)",
                      flush=True)
    print("\n  model       window  input  first pkt->score - window  window's last pkt->score  model run  "
          "rest (not the model)  RTP - file (rest)")
    for name, _, win in models:
        rest_file = median([r["pipeline_ms"] - r["model_ms"] for r in res[(name, "file")]])
        for kind in ("rtp", "file"):
            rs = res[(name, kind)]
            p = median([r["pipeline_ms"] for r in rs])
            rest = median([r["pipeline_ms"] - r["model_ms"] for r in rs])
            extra = f"{rest - rest_file:+7.1f} ms" if kind == "rtp" else "(baseline)"
            print(f"  {name:10s} {win:5.2f} s  {kind:5s}  {p:13.1f} ms (min {min(r['pipeline_ms'] for r in rs):5.1f})"
                  f"  {p + 1000 * PACKET_S:17.1f} ms  {median([r['model_ms'] for r in rs]):6.1f} ms  {rest:13.1f} ms"
                  f"       {extra}")
    print(f"  (the window's last packet leaves {1000 * PACKET_S:g} ms before the window's end is due: each input's "
          "first datum comes at the end of its 20 ms)")
    tmp.cleanup()


def write_pcmu_wav(path: Path) -> None:
    import soundfile as sf
    import soxr

    table = _ulaw_table()
    x = np.concatenate([table[np.frombuffer(p, np.uint8)] for p in pcmu_payloads()])
    sf.write(path, soxr.resample(x, 8000, 16000).astype(np.float32), 16000, subtype="FLOAT")


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.float32) / 32768.0


# --- 2. receive capacity --------------------------------------------------------------------------


async def capacity_step(ports: list[RtpPort], sender: Sender, n: int, per_port: int, seconds: float,
                        sockets: int, base: int, counts: dict[str, int]) -> dict:
    loop = asyncio.get_running_loop()
    used = ports[:max(1, math.ceil(n / per_port))] if per_port else ports[:1]
    ssrcs = [base + j for j in range(n)]
    dests = [used[j // per_port if per_port else 0].address[1] for j in range(n)]
    wanted = set(ssrcs)
    seen: dict[int, Any] = {}
    packets = int(seconds / PACKET_S)
    ramp = n * STREAM_GAP_S

    def state() -> dict[str, int]:
        return {"overflow": sum(p.overflow for p in used), "kernel": sum(kernel_drops(p.address[1]) for p in used),
                "dropped": sum(sum(p.demux.dropped.values()) for p in used), **counts}

    before = state()
    before_rx = [p.received for p in used]
    start_at = time.monotonic() + 0.3
    sender.start(dests, ssrcs, packets, sockets, start_at, STREAM_GAP_S)
    lags: list[float] = []
    cpu_at: dict[str, float] = {}
    rx_max = [0]
    numbers = [p.address[1] for p in used]

    async def watch() -> None:
        while True:
            if len(lags) % 10 == 0:
                rx_max[0] = max(rx_max[0], udp_socket_stats(numbers)[0])
            t = loop.time()
            await asyncio.sleep(0.01)
            now = time.monotonic()
            lags.append(loop.time() - t - 0.01)
            for p in used:
                for ssrc, src in p.live.items():
                    if ssrc in wanted and ssrc not in seen:
                        seen[ssrc] = src.stream
            if "steady" not in cpu_at and now >= start_at + ramp:
                cpu_at["steady"], cpu_at["steady_t"] = time.process_time(), now

    watcher = asyncio.create_task(watch())
    result = await sender.result()
    cpu_end, t_end = time.process_time(), time.monotonic()
    # the backlog left when the sender stops: how long until the last datagram is taken from the socket
    while sum(p.received for p in used) - sum(before_rx) < result["sent"] and time.monotonic() < t_end + 5:
        await asyncio.sleep(0.002)
    drain_ms = 1000 * (time.monotonic() - t_end)
    # let the streams end (timeout) so that the jitter buffers give up or play out everything
    deadline = time.monotonic() + used[0].timeout_s + 5
    while any(s in p.live for p in used for s in wanted) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    watcher.cancel()
    totals = [st.totals() for st in seen.values() if st is not None]
    steady_pkts = n * max(0.0, (t_end - cpu_at.get("steady_t", t_end))) / PACKET_S
    cpu = cpu_end - cpu_at.get("steady", cpu_end)
    lags.sort()
    after = state()
    r = {
        "n": n, "ports": len(used), "sent": result["sent"], "streams": len(seen),
        "received": sum(t["received"] for t in totals), "lost": sum(t["lost"] for t in totals),
        "late": sum(t["late"] for t in totals), "concealed_s": sum(t["concealed_s"] for t in totals),
        **{k: after[k] - before[k] for k in ("overflow", "kernel", "dropped", "errors", "overloaded", "scores")},
        "jitter_ms": median([t["jitter_mean_ms"] for t in totals]),
        "lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))] if lags else float("nan"),
        "lag_max_ms": 1000 * lags[-1] if lags else float("nan"),
        "cpu_pct": 100 * cpu / max(1e-9, t_end - cpu_at.get("steady_t", t_end)),
        "us_per_pkt": 1e6 * cpu / steady_pkts if steady_pkts else float("nan"),
        "rx_queue_kib": rx_max[0] / 1024, "drain_ms": drain_ms,
        "sender_p99_ms": result["behind_p99_ms"], "sender_cpu_pct": 100 * result["cpu_s"] / (ramp + seconds),
    }
    r["sender_limited"] = r["sender_p99_ms"] > 10.0
    complete = (r["streams"] == n and r["received"] == r["sent"] and r["lost"] == 0 and r["late"] == 0
                and r["overflow"] == 0 and r["kernel"] == 0 and r["dropped"] == 0 and r["errors"] == 0)
    r["ok"] = complete and r["drain_ms"] < 100  # and no backlog growing in the socket buffer
    r["verdict"] = "ok" if r["ok"] else ("BEHIND" if complete else "LOSSES")
    if r["sender_limited"]:
        r["verdict"] += " (sender behind)"
    return r


async def capacity_suite(args: argparse.Namespace, sender: Sender) -> list[dict]:
    spec = resolve_model("distillmos")
    window, hop = spec.windowing()
    limit = max(args.streams)
    if args.per_port:
        ports = [rtp_port(f"cap{i}", timeout_s=1.0) for i in range(math.ceil(limit / args.per_port))]
    else:
        ports = [rtp_port("cap", timeout_s=1.0, max_streams=limit)]
    sock = ports[0]._sock
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if sock is not None else 0
    bus = EventBus()
    sub = bus.subscribe(maxsize=1_000_000, name="bench")
    counts = {"scores": 0, "overloaded": 0, "errors": 0}

    async def consume() -> None:
        async for ev in sub:
            if isinstance(ev, ScoreEvent):
                counts["scores"] += 1
                counts["overloaded"] += ev.reason == "overloaded"
            elif isinstance(ev, StreamError):
                counts["errors"] += 1

    cfg = EngineConfig(stream=StreamConfig(window_s=window, hop_s=hop, model="trivial"), max_batch=16)
    engine = Engine(TrivialScorer(), list(ports), cfg, bus)
    consumer = asyncio.create_task(consume())
    task = asyncio.create_task(engine.run())
    into = f"ports of {args.per_port} streams" if args.per_port else "one port (its 64-sender cap raised)"
    print(f"\n2. receive capacity: N streams x 50 packets/s (20 ms PCMU, real speech) into {into}, "
          f"{args.seconds:g} s each after a ramp of 1.3 ms per stream; trivial scorer, windows {window:g} s / "
          f"hop {hop:g} s; socket buffer {rcvbuf >> 10} KiB; sender: 1 process, {args.sockets} sockets")
    rows = []
    try:
        ladder = list(args.streams)
        refine = args.refine
        k = 0
        while k < len(ladder):
            n = ladder[k]
            r = await capacity_step(ports, sender, n, args.per_port, args.seconds, args.sockets,
                                    0x10000000 * (k + 1), counts)
            k += 1
            rows.append(r)
            flag = r["verdict"]
            print(f"    N={n:5d} ({r['ports']} ports): {r['streams']}/{n} streams, "
                  f"received {r['received']}/{r['sent']}, lost {r['lost']}, "
                  f"late {r['late']}, port queue {r['overflow']}, kernel {r['kernel']}, demux {r['dropped']}; "
                  f"socket queue max {r['rx_queue_kib']:.0f} KiB, left at the end {r['drain_ms']:.0f} ms; "
                  f"loop lag p99 {r['lag_p99_ms']:.1f} ms; receiver CPU {r['cpu_pct']:.0f} %; {flag}", flush=True)
            await asyncio.sleep(0.5)
            failed = [x["n"] for x in rows if not x["ok"]]
            if failed and not args.all_steps:
                ok = [x["n"] for x in rows if x["ok"] and x["n"] < min(failed)]
                if not (refine and ok and min(failed) - max(ok) > 25):
                    break
                refine -= 1  # one more step halfway between the largest N without losses and the smallest with
                ladder = ladder[:k] + [(max(ok) + min(failed)) // 2]
    finally:
        engine.stop()
        await task
        consumer.cancel()
    base = rows[0]
    print(f"\n      N  ports  packets/s  streams   lost  late  dropped queue/kernel/demux  socket queue KiB max/"
          f"end ms  loop lag p99/max ms  recv CPU  us/pkt  vs N={base['n']}  streams/core  sender CPU  result")
    for r in rows:
        per_core = 100 * r["n"] / r["cpu_pct"] if r["cpu_pct"] > 0 and r["ok"] else float("nan")  # saturated: -
        print(f"  {r['n']:5d}  {r['ports']:5d}  {r['n'] * 50:9d}  {r['streams']:7d}  {r['lost']:5d}  {r['late']:4d}  "
              f"{r['overflow']:>13d}/{r['kernel']}/{r['dropped']:<10d}  "
              f"{r['rx_queue_kib']:12.0f}/{r['drain_ms']:<6.0f}  "
              f"{r['lag_p99_ms']:8.1f}/{r['lag_max_ms']:<8.1f}  "
              f"{r['cpu_pct']:6.0f} %  {r['us_per_pkt']:6.1f}  x{r['us_per_pkt'] / base['us_per_pkt']:6.2f}  "
              f"{'-' if per_core != per_core else round(per_core):>12}  {r['sender_cpu_pct']:8.0f} %  {r['verdict']}")
    good = [r["n"] for r in rows if r["ok"]]
    bad = [r["n"] for r in rows if not r["ok"]]
    print(f"  largest N kept up with: {max(good) if good else 'none'}"
          + (f"; smallest not: {min(bad)}" if bad else "")
          + "  (streams/core: N / receiver CPU, the receive path being one event loop on one core)")
    return rows


# --- 3. the model's capacity ----------------------------------------------------------------------


def model_capacity(args: argparse.Namespace) -> None:
    spec = resolve_model("distillmos")
    window, hop = spec.windowing()
    speech = load_audio(SPEECH)
    n = int(window * 16000)
    starts = np.linspace(0, speech.size - n, 8).astype(int)
    batch = [speech[s:s + n].copy() for s in starts]
    cores = os.cpu_count() or 1
    print(f"\n3. the bundled model's own capacity: batches of 8 windows of {window:g} s, {args.model_s:g} s per run, "
          f"interleaved; {cores} CPU cores")
    scorers = {"1 thread": Scorer(OnnxModel(spec, device="cpu", threads=1), max_batch=8),
               f"{cores} threads": Scorer(OnnxModel(spec, device="cpu"), max_batch=8)}
    for s in scorers.values():
        s.score(batch)  # warm-up
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in scorers}
    for _ in range(2 if args.quick else 3):
        for name, s in scorers.items():
            t0, c0, done = time.perf_counter(), time.process_time(), 0
            while time.perf_counter() - t0 < args.model_s:
                s.score(batch)
                done += len(batch)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            res[name].append((done / wall, done / cpu))
    print("  threads       windows/s  windows per CPU-second  = streams at one hop per "
          f"{hop:g} s")
    for name, rs in res.items():
        wps = median([w for w, _ in rs])
        print(f"  {name:12s} {wps:10.1f}  {median([c for _, c in rs]):22.1f}    {wps * hop:6.1f}")


async def run(args: argparse.Namespace) -> None:
    payloads = pcmu_payloads()
    sender = Sender(payloads)
    try:
        print(f"{os.cpu_count()} CPU cores (receiver, sender process and model share them); load average "
              f"{os.getloadavg()[0]:.2f}")
        if not args.skip_latency:
            await latency_suite(args, sender)
        if not args.skip_capacity:
            await capacity_suite(args, sender)
    finally:
        sender.close()
    if not args.skip_model:
        model_capacity(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one latency run each, N = 25, 100, 400, short steps")
    ap.add_argument("--repeat", type=int, default=3, help="first-score runs per model and input")
    ap.add_argument("--streams", default=None, help="stream counts for the capacity ladder (default 25,50,...,3200)")
    ap.add_argument("--seconds", type=float, default=8.0, help="each capacity step, after the ramp")
    ap.add_argument("--per-port", type=int, default=50, help="streams per RTP port (0: all into one port)")
    ap.add_argument("--sockets", type=int, default=8, help="sender sockets (source addresses) the streams share")
    ap.add_argument("--all-steps", action="store_true", help="go on after the first step with losses")
    ap.add_argument("--refine", type=int, default=2, help="steps halfway back after the first losses")
    ap.add_argument("--model-s", type=float, default=4.0, help="each model capacity run")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.repeat, a.seconds, a.model_s, a.refine = 1, 3.0, 2.0, 0
        a.streams = a.streams or "25,100,400"
    a.streams = [int(x) for x in (a.streams or "25,50,100,200,400,800,1600,3200").split(",")]
    asyncio.run(run(a))


if __name__ == "__main__":
    main()
