"""Live feed benchmark: fan-out the websocket server sustains, and what a stalled client costs the others.

The server (FeedServer + FeedHub, default settings unless told) runs in its own
process and publishes score events at a set rate; the clients, in this
process, are minimal websocket clients (raw sockets, frame headers parsed by
hand) so that the server, not the client library, is what is measured.
Every number is relative to a single-client baseline measured in the same run.

    python bench/bench_feed.py                 # about 3 minutes
    python bench/bench_feed.py --quick         # a smaller run (about 1 minute)

Fan-out: for each client count, the highest event rate (doubling from 50/s)
at which every client receives every event in order with p99 delay under
--max-p99-ms, held for --seconds.  Stalled: --stall-clients clients that read
nothing join --stall-base clients; the delay (publish -> arrival) the others
see is compared with the same load without them and with one client alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreq_live.core.events import ScoreEvent, StreamStarted  # noqa: E402

STREAMS = [f"call-{i}" for i in range(10)]


# --- the server process -------------------------------------------------------------------------


def server_main(conn, queue_size: int, stall_s: float, max_clients: int) -> None:
    asyncio.run(_server(conn, queue_size, stall_s, max_clients))


async def _server(conn, queue_size, stall_s, max_clients) -> None:
    from scoreq_live.bus import EventBus
    from scoreq_live.sinks.feed import FeedHub, FeedInfo, default_bands
    from scoreq_live.sinks.server import FeedServer, Listen

    hub = FeedHub(FeedInfo("distillmos", "nr", 7.68, 1.0, default_bands("nr")), queue_size=queue_size,
                  stall_s=stall_s)
    srv = FeedServer(hub, ws=Listen("127.0.0.1", 0), max_clients=max_clients)
    await srv.start()
    bus = EventBus()
    pump = asyncio.create_task(srv.run(bus.subscribe(maxsize=1_000_000, name="FeedServer")))
    for s in STREAMS:
        bus.publish(StreamStarted(stream=s, ts=time.time(), source="file", detail=f"{s}.wav", rate=16000,
                                  channels=1, model="distillmos", window_s=7.68, hop_s=1.0))
    conn.send(srv.ws_address.port)
    loop = asyncio.get_running_loop()
    seq = 0
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "quit":
            break
        if cmd[0] == "stats":
            conn.send({"clients": len(hub.clients), "dropped": hub.dropped, "disconnected": dict(hub.disconnected)})
            continue
        _, rate, seconds = cmd
        n = int(rate * seconds)
        times = []
        t0 = time.monotonic()
        k = 0
        while k < n:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            while k < due:  # publish every event due; a late loop catches up
                ts = time.monotonic()
                times.append(ts)
                bus.publish(ScoreEvent(stream=STREAMS[seq % len(STREAMS)], ts=time.time(), window=seq,
                                       t_start=seq * 0.1, t_end=seq * 0.1 + 7.68, mos=3.8123, smoothed=3.9011,
                                       speech=0.812, level_dbfs=-27.3, model="distillmos", latency_ms=81.7))
                seq += 1
                k += 1
            await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        conn.send((seq - n, times, time.monotonic() - t0))
    bus.close()
    await pump
    await srv.close()


# --- minimal websocket clients ------------------------------------------------------------------


class Client(asyncio.Protocol):
    """Handshake, then parse server frames by hand; record (window, arrival) of score events."""

    def __init__(self, port: int, stalled: bool = False) -> None:
        self.port = port
        self.stalled = stalled
        self.buf = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.arrivals: list[tuple[int, float]] = []
        self.history_done = False
        self.other: list[str] = []
        self.closed = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                        .encode())

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self.open.set_exception(RuntimeError(self.buf[:end].decode(errors="replace")))
                return
            del self.buf[:end + 4]
            self.upgraded = True
            if self.stalled:
                self.transport.pause_reading()  # reads nothing more, ever
            self.open.set_result(None)
        buf = self.buf
        i = 0
        while True:
            if len(buf) - i < 2:
                break
            b0, b1 = buf[i], buf[i + 1]
            n, h = b1 & 0x7F, 2
            if n == 126:
                if len(buf) - i < 4:
                    break
                n, h = struct.unpack_from("!H", buf, i + 2)[0], 4
            elif n == 127:
                if len(buf) - i < 10:
                    break
                n, h = struct.unpack_from("!Q", buf, i + 2)[0], 10
            if len(buf) - i < h + n:
                break
            op = b0 & 0x0F
            payload = bytes(buf[i + h:i + h + n])
            i += h + n
            if op == 1:
                k = payload.find(b'"window":')
                if k >= 0 and payload.startswith(b'{"v":1,"type":"score"'):
                    if self.history_done:
                        self.arrivals.append((int(payload[k + 9:payload.index(b",", k)]), now))
                else:
                    kind = json.loads(payload)["type"]
                    if kind == "history_end":
                        self.history_done = True
                    elif kind not in ("hello", "stream_started"):
                        self.other.append(kind)
            elif op == 9:  # ping -> pong (masked, as clients must)
                mask = os.urandom(4)
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask +
                                     bytes(c ^ mask[j % 4] for j, c in enumerate(payload)))
            elif op == 8:
                self.closed = True
        del buf[:i]

    def connection_lost(self, exc) -> None:
        self.closed = True


async def open_clients(port: int, n: int, stalled: bool = False) -> list[Client]:
    loop = asyncio.get_running_loop()
    out = []
    for start in range(0, n, 50):  # in batches: the listen backlog is finite
        batch = []
        for _ in range(min(50, n - start)):
            sock = socket.socket()
            if stalled:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            _, proto = await loop.create_connection(lambda: Client(port, stalled), sock=sock)
            batch.append(proto)
        await asyncio.wait_for(asyncio.gather(*(c.open for c in batch)), 30)
        out += batch
    await asyncio.sleep(0.2)  # let hello + history arrive
    return out


def close_clients(clients: list[Client]) -> None:
    for c in clients:
        c.transport.abort()


async def ask(conn, msg):
    conn.send(msg)
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def run_phase(conn, clients: list[Client], rate: float, seconds: float, settle: float = 0.5) -> dict:
    """Publish at ``rate`` for ``seconds``; every client's delays and completeness."""
    for c in clients:
        c.arrivals.clear()
        c.other.clear()
    first, times, took = await ask(conn, ("publish", rate, seconds))
    n = len(times)
    deadline = time.monotonic() + settle + 5
    while time.monotonic() < deadline and any(len(c.arrivals) < n and not c.closed for c in clients):
        await asyncio.sleep(0.05)
    delays, complete = [], True
    for c in clients:
        wins = [w for w, _ in c.arrivals]
        if wins != list(range(first, first + n)):
            complete = False
        delays += [t - times[w - first] for w, t in c.arrivals if 0 <= w - first < n]
    delays.sort()
    pct = (lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] * 1e3) if delays else (lambda q: float("nan"))
    return {"rate": rate, "achieved": n / took, "complete": complete, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": delays[-1] * 1e3 if delays else float("nan"), "frames": len(delays),
            "dropped_notices": sum(c.other.count("dropped") for c in clients)}


async def max_rate(conn, clients, seconds, max_p99_ms, start=50.0, limit=100_000.0):
    best, rate = None, start
    while rate <= limit:
        r = await run_phase(conn, clients, rate, seconds)
        ok = r["complete"] and r["p99_ms"] < max_p99_ms and r["achieved"] >= 0.95 * rate
        print(f"    {len(clients):4d} clients x {rate:6.0f} events/s: achieved {r['achieved']:6.0f}/s, "
              f"p50 {r['p50_ms']:6.2f} ms, p99 {r['p99_ms']:7.2f} ms, {'ok' if ok else 'NOT sustained'}",
              flush=True)
        if not ok:
            break
        best, rate = r, rate * 2
    return best


async def main(args) -> None:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=server_main, args=(child, args.queue_size, args.stall_s,
                                                                      max(args.clients) + args.stall_clients + 10))
    proc.start()
    port = parent.recv()
    try:
        print(f"server pid {proc.pid} on 127.0.0.1:{port}; {os.cpu_count()} CPU cores shared by server and clients")
        print("\nfan-out: highest event rate every client gets completely, p99 delay < "
              f"{args.max_p99_ms:g} ms, held {args.seconds:g}s")
        fan = {}
        for n in args.clients:
            clients = await open_clients(port, n)
            fan[n] = await max_rate(parent, clients, args.seconds, args.max_p99_ms)
            close_clients(clients)
            await asyncio.sleep(0.5)
        base = fan[min(args.clients)]
        print("\n  clients  events/s  frames/s  vs 1 client")
        for n, r in fan.items():
            if r is None:
                print(f"  {n:7d}  (not even {50}/s)")
                continue
            frames = n * r["rate"]
            print(f"  {n:7d}  {r['rate']:8.0f}  {frames:8.0f}  x{frames / (base['rate'] * min(args.clients)):.1f}")

        n, rate = args.stall_base, args.stall_rate
        print(f"\nstalled clients: {n} clients at {rate:g} events/s for {args.stall_seconds:g}s, then the same with "
              f"{args.stall_clients} clients that read nothing (server: queue {args.queue_size} frames, "
              f"cut after {args.stall_s:g}s stalled)")
        single = await open_clients(port, 1)
        one = await run_phase(parent, single, rate, args.stall_seconds)
        close_clients(single)
        clients = await open_clients(port, n)
        alone = await run_phase(parent, clients, rate, args.stall_seconds)
        stalled = await open_clients(port, args.stall_clients, stalled=True)
        before = await ask(parent, ("stats",))
        loaded = await run_phase(parent, clients, rate, args.stall_seconds)
        await asyncio.sleep(0.5)
        after = await ask(parent, ("stats",))
        close_clients(clients + stalled)
        rows = [("1 client alone", one), (f"{n} clients", alone), (f"{n} + {args.stall_clients} stalled", loaded)]
        print("\n  case                      p50 ms   p99 ms   max ms  complete  dropped notices to readers")
        for name, r in rows:
            print(f"  {name:24s} {r['p50_ms']:7.2f}  {r['p99_ms']:7.2f}  {r['max_ms']:7.2f}  {str(r['complete']):8s}  "
                  f"{r['dropped_notices']}")
        print(f"\n  delay with stalled clients vs without: p50 x{loaded['p50_ms'] / alone['p50_ms']:.2f}, "
              f"p99 x{loaded['p99_ms'] / alone['p99_ms']:.2f}; vs 1 client alone: "
              f"p50 x{loaded['p50_ms'] / one['p50_ms']:.2f}, p99 x{loaded['p99_ms'] / one['p99_ms']:.2f}")
        print(f"  frames dropped for the stalled clients: {after['dropped'] - before['dropped']}; "
              f"clients cut as stalled: {after['disconnected'].get('stalled', 0)}")
    finally:
        parent.send(("quit",))
        proc.join(15)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,10,100,300,1000", help="client counts for the fan-out")
    ap.add_argument("--seconds", type=float, default=2.0, help="each fan-out step")
    ap.add_argument("--max-p99-ms", type=float, default=100.0)
    ap.add_argument("--stall-base", type=int, default=100, help="reading clients in the stalled-client test")
    ap.add_argument("--stall-clients", type=int, default=10)
    ap.add_argument("--stall-rate", type=float, default=200.0, help="events/s in the stalled-client test")
    ap.add_argument("--stall-seconds", type=float, default=12.0)
    ap.add_argument("--queue-size", type=int, default=1024, help="server: frames waiting per client")
    ap.add_argument("--stall-s", type=float, default=5.0, help="server: cut a client stalled this long")
    ap.add_argument("--quick", action="store_true", help="1,100,300 clients, shorter phases")
    a = ap.parse_args()
    if a.quick:
        a.clients, a.seconds, a.stall_seconds = "1,100,300", 1.0, 8.0
    a.clients = sorted(int(x) for x in a.clients.split(","))
    asyncio.run(main(a))
