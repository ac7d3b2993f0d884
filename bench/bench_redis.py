"""One feed for many monitors: what publishing to Redis and relaying cost.

Starts its own redis-server on a free loopback port (Debian's ``redis-server``
must be installed) and measures:

- publish throughput: events a :class:`RedisPublisher` gets through to a
  subscriber per second, with the event loop offering them as fast as it can;
- intake cost: what the monitor's loop pays per event (numbering and
  buffering), with the broker up and with it down (the drop-oldest path), and
  the envelope's serialisation the sender does on the same loop;
- relay latency: from an event's creation in a monitor process to its
  arrival at a websocket client of ``scoreq-live feed --subscribe`` (separate
  processes), at a steady rate;
- relay throughput: a burst of events from the publisher until the websocket
  client has them all (what one relay process can pass on per second).

    python bench/bench_redis.py             # about 30 seconds
    python bench/bench_redis.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoreq_live.bus import EventBus  # noqa: E402
from scoreq_live.core.events import ScoreEvent  # noqa: E402
from scoreq_live.sinks.redis import Backoff, RedisPublisher, parse_broker_url  # noqa: E402
from tests.redis_tools import RedisServer, free_port  # noqa: E402


def score(i: int, stream: str = "call-0") -> ScoreEvent:
    return ScoreEvent(stream, time.time(), window=i, t_start=float(i), t_end=i + 4.0, mos=3.5, smoothed=3.4,
                      speech=0.8, level_dbfs=-24.0, model="distillmos", latency_ms=30.0)


async def throughput(url: str, n: int) -> dict:
    import redis.asyncio as aioredis

    address = parse_broker_url(url)
    sub = aioredis.Redis.from_url(address.url)
    pubsub = sub.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(address.channel)
    got = 0
    done = asyncio.Event()

    async def read() -> None:
        nonlocal got
        while got < n:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and b'"event"' in msg["data"]:
                got += 1
        done.set()

    reader = asyncio.create_task(read())
    pub = RedisPublisher(address, "bench", buffer_size=n)  # room for the whole burst: throughput, not drops
    bus = EventBus()
    await pub.start()
    task = asyncio.create_task(pub.run(bus.subscribe(maxsize=n + 1)))
    events = [score(i, f"call-{i % 100}") for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, 500):  # as a busy monitor would: bursts, with the loop free in between
        for ev in events[i:i + 500]:
            bus.publish(ev)
        await asyncio.sleep(0)
    offered = time.perf_counter() - t0
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    bus.close()
    await task
    await pub.close()
    reader.cancel()
    await pubsub.aclose()
    await sub.aclose()
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed),
            "batches": pub.batches, "events_per_batch": round(n / max(1, pub.batches), 1),
            "offer_us_per_event": round(offered / n * 1e6, 2)}


async def intake_down(n: int) -> dict:
    """put() with the broker unreachable: numbering, buffering and dropping the oldest."""
    address = parse_broker_url(f"redis://127.0.0.1:{free_port()}/x")
    pub = RedisPublisher(address, "bench", buffer_size=1000, backoff=Backoff(10, 10))
    events = [score(i) for i in range(n)]
    t0 = time.perf_counter()
    for ev in events:
        pub.put(ev)
    dt = time.perf_counter() - t0
    return {"events": n, "us_per_event": round(dt / n * 1e6, 3), "dropped": pub.dropped}


def serialise(n: int) -> dict:
    """What the sender spends on the monitor's loop per event before the round trip: the envelope's JSON."""
    from scoreq_live.sinks.redis import envelope

    events = [score(i) for i in range(n)]
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        envelope("bench", "run", i, event=ev.to_dict())
    dt = time.perf_counter() - t0
    return {"events": n, "us_per_event": round(dt / n * 1e6, 2)}


async def latency(url: str, rate: float, seconds: float, burst: int) -> dict:
    from websockets.asyncio.client import connect

    feed = subprocess.Popen([sys.executable, "-m", "scoreq_live", "feed", "--subscribe", url, "--ws", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = None
        assert feed.stderr is not None
        for line in feed.stderr:
            if m := re.search(r"feed: ws://127\.0\.0\.1:(\d+)/", line):
                port = int(m[1])
            if "relay: subscribed" in line:
                break
        assert port is not None
        pub = RedisPublisher(parse_broker_url(url), "bench", buffer_size=burst)
        bus = EventBus()
        await pub.start()
        task = asyncio.create_task(pub.run(bus.subscribe()))
        delays: list[float] = []
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            while json.loads(await ws.recv())["type"] != "history_end":
                pass

            async def read() -> None:
                while True:
                    msg = json.loads(await ws.recv())
                    if msg["type"] == "score":
                        delays.append(time.time() - msg["ts"])

            reader = asyncio.create_task(read())
            n = int(rate * seconds)
            t0 = time.monotonic()
            for i in range(n):
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                bus.publish(score(i, f"call-{i % 20}"))
            await asyncio.sleep(1.0)
            steady = list(delays)
            delays.clear()
            t1 = time.perf_counter()
            for i in range(burst):
                bus.publish(score(i, f"call-{i % 20}"))
                if i % 500 == 0:
                    await asyncio.sleep(0)
            deadline = time.monotonic() + 120
            while len(delays) < burst and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            burst_s = time.perf_counter() - t1
            reader.cancel()
        bus.close()
        await task
        await pub.close()
    finally:
        feed.terminate()
        feed.wait(10)
    ms = sorted(d * 1000 for d in steady)
    return {"rate_per_s": rate, "received": len(ms), "sent": int(rate * seconds),
            "p50_ms": round(statistics.median(ms), 2), "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
            "max_ms": round(ms[-1], 2),
            "burst": {"events": burst, "received": len(delays), "seconds": round(burst_s, 3),
                      "events_per_s": round(len(delays) / burst_s)}}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 20_000 if args.quick else 100_000
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        url = server.url("bench")
        report = {
            "throughput": await throughput(url, n),
            "intake_broker_down": await intake_down(n),
            "serialise": serialise(n),
            "relay_latency": await latency(url, 200.0, 5.0 if args.quick else 15.0, n // 5),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
