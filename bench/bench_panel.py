"""Browser panel benchmark: many streams, replayed fast, in a real headless Chromium.

    python bench/bench_panel.py [--streams 20] [--speed 10] [--seconds 30] [--json out.json]
    python bench/bench_panel.py --serve [--port 8088]     # just serve, open the URL yourself

Real events (the bundled demo recordings scored by the bundled model, once,
with ``scoreq-live demo --fast --jsonl``) are replayed as ``--streams``
streams, looped and offset so they do not move in step, at ``--speed`` times
real time, with ``mos<3.3 for 3s`` alerts on the smoothed score (``distance>0.6`` in ref mode).  A small
replay server speaks the feed protocol the panel reads (hello, history,
history_end, live events) and serves the panel's files like the monitor does.

Measured in the page, over ``--seconds`` of replay after the history has been
drawn: the interval between animation frames (p50/p95/p99/max, frames over
50 ms), long tasks (main thread busy > 50 ms), and the panel's own drawing
time per frame.  Needs Playwright and Debian's chromium (see tests/browser.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from websockets.asyncio.server import broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

ROOT = Path(__file__).resolve().parents[1]
PANEL = ROOT / "scoreq_live" / "sinks" / "panel"
sys.path.insert(0, str(ROOT / "tests"))

RULES = {  # the alert rule the replay applies to the smoothed score, by mode
    "nr": {"rule": "mos<3.3 for 3s", "metric": "smoothed", "op": "<", "threshold": 3.3, "for_s": 3.0},
    "ref": {"rule": "distance>0.6 for 3s", "metric": "smoothed", "op": ">", "threshold": 0.6, "for_s": 3.0},
}


def record_demo_events() -> list[dict]:
    """The demo's real events: two recordings through the bundled model."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "demo.jsonl"
        subprocess.run([sys.executable, "-m", "scoreq_live", "demo", "--fast", "--no-tui", "-q", "--jsonl", str(out)],
                       check=True)
        return [json.loads(line) for line in out.read_text().splitlines()]


class Replay:
    """Loops recorded score events as ``n`` streams, in stream time, with simple alerts."""

    def __init__(self, events: list[dict], n: int, history_s: float = 300.0) -> None:
        self.history_s = history_s
        scores = [e for e in events if e["type"] == "score"]
        started = {e["stream"]: e for e in events if e["type"] == "stream_started"}
        self.sources = sorted({e["stream"] for e in scores})
        self.per_source = {s: [e for e in scores if e["stream"] == s] for s in self.sources}
        self.loop_s = max(e["t_end"] for e in scores) + 1.0
        first = next(iter(started.values()))
        self.model, self.mode = first["model"], first["mode"]
        self.window_s, self.hop_s = first["window_s"], first["hop_s"]
        self.names = [f"call-{k + 1:02d}" for k in range(n)]
        self.cursor = {name: 0 for name in self.names}  # index into the stream's endless sequence
        self.alert_state = {name: [None, False] for name in self.names}  # (since, active)
        self.history: list[dict] = []
        self.active: dict[str, dict] = {}

    def source_of(self, k: int) -> str:
        return self.sources[k % len(self.sources)]

    def event_at(self, name: str, i: int) -> dict:
        """The i-th score event of a stream: its recording looped, phase-shifted per stream."""
        k = self.names.index(name)
        seq = self.per_source[self.source_of(k)]
        shift = k * 3  # streams start at different points of their recording
        n = len(seq)
        base = seq[(i + shift) % n]
        e = dict(base)
        # Stream time runs on across loops and starts at 0 for every stream.
        offset = ((i + shift) // n - shift // n) * self.loop_s - seq[shift % n]["t_start"]
        e.update(stream=name, window=i, t_start=round(base["t_start"] + offset, 4),
                 t_end=round(base["t_end"] + offset, 4), ts=round(time.time(), 3))
        return e

    def next_due(self, name: str) -> float:
        return self.event_at(name, self.cursor[name])["t_end"]

    def take(self, name: str) -> list[dict]:
        e = self.event_at(name, self.cursor[name])
        self.cursor[name] += 1
        out = [e]
        since, active = self.alert_state[name]
        rule = RULES[self.mode]
        v = e["smoothed"]
        bad = v is not None and (v < rule["threshold"] if rule["op"] == "<" else v > rule["threshold"])
        if bad and since is None:
            since = e["t_end"]
        if not bad:
            since = None
        if bad and not active and e["t_end"] - since >= rule["for_s"]:
            a = {"v": 1, "type": "alert", "stream": name, "ts": e["ts"], **rule, "value": v,
                 "t": e["t_end"], "id": f"{name}:{rule['rule']}"}
            self.active[a["id"]] = a
            out.append(a)
            active = True
        elif not bad and active:
            a = {"v": 1, "type": "cleared", "stream": name, "ts": e["ts"], **rule, "value": v,
                 "t": e["t_end"], "id": f"{name}:{rule['rule']}"}
            self.active.pop(a["id"], None)
            out.append(a)
            active = False
        self.alert_state[name] = [since, active]
        self.history.extend(out)
        if len(self.history) > 2 * len(self.names) * self.history_s / self.hop_s:  # now and then: forget old
            horizon = e["t_end"] - self.history_s
            self.history = [h for h in self.history if h.get("t_end", h.get("t", 0)) >= horizon]
        return out

    def hello(self) -> dict:
        return {"v": 1, "type": "hello", "server": "scoreq-live replay", "schema": 1, "model": self.model,
                "mode": self.mode, "window_s": self.window_s, "hop_s": self.hop_s, "history_s": self.history_s,
                "bands": ({"good": None, "fair": None, "lower_is_better": True} if self.mode == "ref"
                          else {"good": 4.0, "fair": 3.0, "lower_is_better": False}),
                "streams": [{"stream": n, "state": "live", "source": "file",
                             "detail": f"examples/{self.source_of(k)}.wav"} for k, n in enumerate(self.names)],
                "alerts": list(self.active.values())}


class ReplayServer:
    """Serves the panel and replays a :class:`Replay` over ``/ws`` at ``speed`` x real time."""

    def __init__(self, replay: Replay, speed: float, prefill_s: float | None = None) -> None:
        # Before anyone connects: a full history, so a new page draws the whole chart span at once.
        self.replay, self.speed = replay, speed
        self.prefill_s = replay.history_s if prefill_s is None else prefill_s
        self.clients: set = set()
        self.lock = asyncio.Lock()  # no live event slips in while a client gets its history
        self.port = 0
        self.sent = 0

    def process_request(self, connection, request):
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return None
        if path == "/":
            f = PANEL / "index.html"
        elif path.startswith("/static/"):
            f = (PANEL / path[len("/static/"):]).resolve()
            if PANEL.resolve() not in f.parents:
                return connection.respond(404, "not found\n")
        else:
            return connection.respond(404, "not found\n")
        if not f.is_file():
            return connection.respond(404, "not found\n")
        body = f.read_bytes()
        ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-cache")])
        return Response(200, "OK", headers, body)

    async def handler(self, ws) -> None:
        async with self.lock:
            await ws.send(json.dumps(self.replay.hello()))
            for e in self.replay.history:
                await ws.send(json.dumps(e))
            await ws.send('{"v":1,"type":"history_end"}')
            self.clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            self.clients.discard(ws)

    async def play(self) -> None:
        r = self.replay
        for name in r.names:  # some history before anyone connects
            while r.next_due(name) < self.prefill_s:
                r.take(name)
        start = time.monotonic()
        t_base = self.prefill_s
        while True:
            now_t = t_base + (time.monotonic() - start) * self.speed
            async with self.lock:
                for name in r.names:
                    while r.next_due(name) <= now_t:
                        for e in r.take(name):
                            broadcast(self.clients, json.dumps(e))
                            self.sent += 1
            await asyncio.sleep(0.02)

    async def run(self, port: int, ready: threading.Event | None = None) -> None:
        async with serve(self.handler, "127.0.0.1", port, process_request=self.process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self.play()


def measure(url: str, seconds: float, viewport=(1920, 1080)) -> dict:
    from browser import chromium

    with chromium(viewport={"width": viewport[0], "height": viewport[1]}) as ctx:
        page = ctx.new_page()
        page.goto(url)
        page.wait_for_function("window.scoreqPanel && window.scoreqPanel.stats.hellos > 0 && "
                               "!window.scoreqPanel.state.replaying", timeout=30_000)
        page.wait_for_timeout(1000)
        first_ms = page.evaluate("window.scoreqPanel.stats.renderMsMax")  # includes drawing the history
        result = page.evaluate(
            """(ms) => new Promise((done) => {
                const longTasks = [];
                const obs = new PerformanceObserver((l) => {
                    for (const e of l.getEntries()) longTasks.push(e.duration);
                });
                obs.observe({ type: "longtask" });
                const s0 = { ...window.scoreqPanel.stats };
                window.scoreqPanel.stats.renderMsMax = 0;  // the worst frame of this window, not of the history load
                const gaps = [];
                let last = performance.now();
                const t0 = last;
                function tick(now) {
                    gaps.push(now - last); last = now;
                    if (now - t0 < ms) requestAnimationFrame(tick);
                    else {
                        obs.disconnect();
                        const s1 = window.scoreqPanel.stats;
                        done({ gaps, longTasks, events: s1.events - s0.events, frames: s1.frames - s0.frames,
                               renderMs: s1.renderMsTotal - s0.renderMsTotal, renderMsMax: s1.renderMsMax,
                               chartDraws: s1.chartDraws - s0.chartDraws,
                               heapMB: performance.memory ? performance.memory.usedJSHeapSize / 1e6 : null });
                    }
                }
                requestAnimationFrame(tick);
            })""",
            seconds * 1000,
        )
        cards = page.locator(".card").count()
        shot = ROOT / "test-artifacts" / "panel-bench.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
    gaps = sorted(result["gaps"][1:])
    q = lambda p: gaps[min(len(gaps) - 1, int(p * len(gaps)))]  # noqa: E731
    return {
        "cards": cards,
        "seconds": seconds,
        "events": result["events"],
        "events_per_s": round(result["events"] / seconds, 1),
        "frames": len(gaps),
        "fps": round(len(gaps) / seconds, 1),
        "frame_ms_p50": round(statistics.median(gaps), 2),
        "frame_ms_p95": round(q(0.95), 2),
        "frame_ms_p99": round(q(0.99), 2),
        "frame_ms_max": round(gaps[-1], 2),
        "frames_over_50ms": sum(g > 50 for g in gaps),
        "long_tasks": len(result["longTasks"]),
        "long_task_ms_total": round(sum(result["longTasks"]), 1),
        "panel_draw_ms_per_frame": round(result["renderMs"] / max(1, result["frames"]), 3),
        "panel_draw_ms_max": round(result["renderMsMax"], 2),
        "history_frame_ms": round(first_ms, 1),
        "chart_redraws_per_s": round(result["chartDraws"] / seconds, 1),
        "js_heap_mb": result["heapMB"] and round(result["heapMB"], 1),
        "screenshot": str(shot.relative_to(ROOT)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--speed", type=float, default=10.0, help="replay speed, times real time")
    p.add_argument("--seconds", type=float, default=30.0, help="how long to measure")
    p.add_argument("--serve", action="store_true", help="only serve the panel and the replay")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--events", metavar="JSONL", help="recorded events to replay (default: record the demo)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    a = p.parse_args()

    events = ([json.loads(line) for line in Path(a.events).read_text().splitlines()] if a.events
              else record_demo_events())
    server = ReplayServer(Replay(events, a.streams), a.speed)
    if a.serve:
        print(f"panel: http://127.0.0.1:{a.port or 8088}/", flush=True)
        asyncio.run(server.run(a.port or 8088))
        return
    ready = threading.Event()
    threading.Thread(target=lambda: asyncio.run(server.run(a.port, ready)), daemon=True).start()
    ready.wait(10)
    result = measure(f"http://127.0.0.1:{server.port}/", a.seconds)
    result.update(streams=a.streams, speed=a.speed)
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
