"""The alert webhook against real local HTTP servers: slow, refusing, and absent."""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scoreq_live.bus import EventBus
from scoreq_live.core.events import AlertEvent, ScoreEvent
from scoreq_live.sinks.webhook import WebhookError, WebhookSink


def alert(i):
    return AlertEvent(stream="a", ts=float(i), rule="mos<3.0", metric="mos", op="<", threshold=3.0, value=2.0,
                      t=float(i), id="a:mos<3.0")


class Endpoint:
    def __init__(self, status=204, delay=0.0):
        self.bodies, self.status, self.delay = [], status, delay
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(ep.delay)
                ep.bodies.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(ep.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


async def test_a_slow_endpoint_delays_nothing_and_its_queue_is_bounded():
    ep = Endpoint(delay=0.5)
    try:
        bus = EventBus()
        sub = bus.subscribe(name="WebhookSink")
        hook = WebhookSink(ep.url, queue_size=10, flush_s=2.0)
        task = asyncio.create_task(hook.run(sub))
        t0 = time.perf_counter()
        for i in range(50):
            bus.publish(alert(i))
            bus.publish(ScoreEvent(stream="a", ts=0.0))  # not sent: only alert and cleared events are
        await asyncio.sleep(0.1)
        # The loop never waited for a request: one request alone takes the endpoint's delay.
        blocked = time.perf_counter() - t0 >= 0.1 + ep.delay
        assert not blocked and sub.get_nowait() is None, "the sink keeps reading its events"
        assert hook.dropped == 40  # ten waiting (the newest), the older ones dropped
        bus.close()
        await asyncio.wait_for(task, 5)  # flush_s bounds the wait for what is still queued
        delivered = [b["t"] for _, b in ep.bodies]
        assert 2 <= len(delivered) <= 5 and delivered == [float(i) for i in range(40, 40 + len(delivered))]
        assert all(ct == "application/json" for ct, _ in ep.bodies)
    finally:
        ep.close()


async def test_a_refusing_endpoint_is_not_retried_and_an_absent_one_is_given_up():
    ep = Endpoint(status=400)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        absent = f"http://127.0.0.1:{s.getsockname()[1]}/"  # nothing listens there once closed
    try:
        for url in (ep.url, absent):  # the endpoint sees the one attempt; the absent one none
            bus = EventBus()
            hook = WebhookSink(url, attempts=3, backoff_s=0.01)
            task = asyncio.create_task(hook.run(bus.subscribe()))
            bus.publish(alert(1))
            bus.close()
            await asyncio.wait_for(task, 10)
            assert hook.failed == 1 and hook.delivered == 0
        assert len(ep.bodies) == 1
    finally:
        ep.close()


def test_only_http_urls_are_taken():
    with pytest.raises(WebhookError):
        WebhookSink("file:///etc/passwd")
