"""The feed and the HTTP sites over real sockets on 127.0.0.1: real websocket clients, real HTTP requests.

Every test starts its own servers on free ports and bounds its waits.
"""

import asyncio
import base64
import contextlib
import json
import os
import socket
import statistics
import time

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scoreq_live import __version__
from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent, StreamEnded, StreamStarted
from scoreq_live.http.policy import Listen, ServeError, SitePolicy
from scoreq_live.http.routes import MetricsRoutes, PanelRoutes
from scoreq_live.http.site import HttpSite, policy_request, web_response
from scoreq_live.ingest.http import IngestRoutes
from scoreq_live.ingest.media import MediaIngest
from scoreq_live.ingest.whip import WhipIngest
from scoreq_live.sinks.feed import FeedHub, FeedInfo, default_bands
from scoreq_live.sinks.metrics import MetricsSink
from scoreq_live.sinks.policy import PANEL_DIR
from scoreq_live.sinks.server import _BURST_FRAMES, _BURSTS, FeedServer, _FeedConnection

INFO = FeedInfo(model="distillmos", mode="nr", window_s=7.68, hop_s=1.0, bands=default_bands("nr"))
LOCAL = Listen("127.0.0.1", 0)


def started(stream):
    return StreamStarted(stream=stream, ts=time.time(), source="file", detail=f"{stream}.wav", rate=16000,
                         channels=1, model="distillmos", window_s=7.68, hop_s=1.0)


def score(stream, window, mos=3.5):
    return ScoreEvent(stream=stream, ts=time.time(), window=window, t_start=float(window), t_end=window + 7.68,
                      mos=mos, smoothed=mos, speech=0.9, level_dbfs=-25.0, model="distillmos", latency_ms=80.0)


class Served:
    """A feed and the sites serving it, as the tests read them: the feed's own (``hub``, ``ws_address``...)
    and the sites' addresses; :meth:`close` closes them as a monitor does (the feed, then the sites)."""

    def __init__(self, feed, http_site, own_site):
        self.feed, self.http_site, self.own_site = feed, http_site, own_site
        self.sites = [s for s in (http_site, own_site) if s is not None]

    def __getattr__(self, name):  # hub, clock, _servers, _conns
        return getattr(self.feed, name)

    @property
    def ws_address(self):
        return self.feed.ws_address if self.feed is not None else None

    @property
    def http_address(self):
        return self.http_site.address if self.http_site is not None else None

    @property
    def ingest_address(self):
        return self.own_site.address if self.own_site is not None else None

    async def close(self):
        if self.feed is not None:
            await self.feed.close()
        for site in self.sites:
            await site.close()


def serve(hub, ws=LOCAL, http=LOCAL, metrics=None, token=None, allowed_origins=(), panel_dir=PANEL_DIR,
          ingest=None, ingest_listen=None, notify=None, **feed_kw):
    """The feed on its own websockets (``ws``) and on a site (``http``) with the panel and ``/metrics``, the
    ``ingest`` routes there and on a site of their own (``ingest_listen``): parts put together by hand."""
    policy = SitePolicy(token=token, allowed_origins=frozenset(allowed_origins))
    srv = FeedServer(hub, ws, policy=policy, notify=notify, **feed_kw) if ws or http else None
    http_site = own_site = None
    if http is not None:
        http_site = HttpSite(http, policy, notify=notify).add(PanelRoutes(panel_dir), MetricsRoutes(metrics))
        http_site.add(*(p for p in (srv, ingest) if p is not None))
    if ingest_listen is not None:
        own_site = HttpSite(ingest_listen, policy, flag="--whip", notify=notify).add(ingest)
    return Served(srv, http_site, own_site)


@contextlib.asynccontextmanager
async def feed(hub_kw=None, metrics=None, **kw):
    """A running feed on free loopback ports fed by its own bus (the sites listen first, as in a monitor)."""
    hub = FeedHub(INFO, **(hub_kw or {}))
    srv = serve(hub, metrics=metrics.render if metrics else None, **kw)
    for site in srv.sites:
        await site.start()
    bus = EventBus()
    tasks = []
    if srv.feed is not None:
        await srv.feed.start()
        tasks.append(asyncio.create_task(srv.feed.run(bus.subscribe(name="FeedServer"))))
    if metrics is not None:
        metrics.watch_feed(hub)
        tasks.append(asyncio.create_task(metrics.run(bus.subscribe(name="MetricsSink"))))
    try:
        yield srv, bus
    finally:
        bus.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await asyncio.wait_for(srv.close(), 10)


def ws_url(srv, path="/ws", http=True):
    return f"ws://127.0.0.1:{(srv.http_address if http else srv.ws_address).port}{path}"


async def http_get(port, path, headers=None, method="GET", body=b""):
    """One raw HTTP/1.1 request (no client-side path normalisation): (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body:
        head["Content-Length"] = str(len(body))
    writer.write((f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
                  + "\r\n").encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, hdrs, body


async def read_until_history_end(ws):
    msgs = []
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        msgs.append(m)
        if m["type"] == "history_end":
            return msgs


async def refused(url, **kw):
    with pytest.raises(InvalidStatus) as e:
        async with connect(url, open_timeout=10, **kw):
            pass
    return e.value.response.status_code, e.value.response.body.decode()


def small_rcvbuf_socket(port):
    """A connected socket whose receive buffer is tiny: a client that stops reading stalls at once."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


class EchoRoutes:
    """A tiny ingest: ``POST /whip`` answers its body back and ``GET /media`` a word, both after the site's token
    check (the site checks the Host before any route)."""

    def __init__(self):
        self.bodies = []

    def listening(self, site):
        return f"publish: http://{site.address}/whip (WHIP), ws://{site.address}/media (media streams)"

    def add_routes(self, site):
        def refused(request):
            req = policy_request(request)
            no = site.policy.check_token(req, req.query)
            return web_response(no) if no is not None else None

        async def whip(request):
            if (no := refused(request)) is not None:
                return no
            body = await request.read()  # the server's limit on request bodies applies
            self.bodies.append(body)
            return web.Response(status=201, body=body, content_type="application/sdp")

        async def media(request):
            return refused(request) or web.Response(text="media")

        site.router.add_post("/whip", whip)
        site.router.add_get("/media", media)


# --- fan-out ----------------------------------------------------------------------------------


async def test_hundreds_of_clients_receive_the_same_events_in_order():
    n_clients, n_events = 300, 60
    async with feed(max_clients=400) as (srv, bus):
        bus.publish(started("a"))
        bus.publish(score("a", 0))
        clients = []
        for i in range(0, n_clients, 50):  # in batches: the listen backlog is finite
            clients += await asyncio.gather(*(connect(ws_url(srv, http=i % 100 == 0), open_timeout=20)
                                              for _ in range(50)))
        histories = await asyncio.gather(*(read_until_history_end(ws) for ws in clients))
        assert all([m["type"] for m in h] == ["hello", "stream_started", "score", "history_end"] for h in histories)

        async def collect(ws):
            got = []
            while len(got) < n_events:
                m = json.loads(await ws.recv())
                got.append((m["type"], m.get("window")))
            return got

        readers = [asyncio.create_task(collect(ws)) for ws in clients]
        t0 = time.perf_counter()
        for w in range(1, n_events + 1):
            bus.publish(score("a", w))
            if w % 10 == 0:
                await asyncio.sleep(0.005)
        results = await asyncio.wait_for(asyncio.gather(*readers), 60)
        took = time.perf_counter() - t0
        expected = [("score", w) for w in range(1, n_events + 1)]
        assert all(r == expected for r in results)
        assert srv.hub.dropped == 0
        print(f"\n{n_clients} clients x {n_events} events: {n_clients * n_events / took:.0f} frames/s delivered")
        await asyncio.gather(*(ws.close() for ws in clients))


async def test_a_client_that_never_reads_neither_delays_the_others_and_is_cut_off():
    n_clients, rate, phase = 20, 200.0, 240
    async with feed(hub_kw=dict(queue_size=50, stall_s=1.5), send_buffer_bytes=8192) as (srv, bus):
        bus.publish(started("a"))
        clients = [await connect(ws_url(srv)) for _ in range(n_clients)]
        for ws in clients:
            await read_until_history_end(ws)
        published: dict[int, float] = {}
        arrivals: list[dict[int, float]] = [{} for _ in clients]

        async def collect(i, ws):
            async for msg in ws:
                m = json.loads(msg)
                assert m["type"] == "score", m  # never a `dropped` notice for a client that keeps up
                arrivals[i][m["window"]] = time.perf_counter()

        readers = [asyncio.create_task(collect(i, ws)) for i, ws in enumerate(clients)]

        async def publish(first, count):
            t0 = time.perf_counter()
            for k in range(count):
                await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
                published[first + k] = time.perf_counter()
                bus.publish(score("a", first + k))

        def delays(windows):
            return sorted(arrivals[i][w] - published[w] for i in range(n_clients) for w in windows)

        def p50_p95(d):
            return statistics.median(d), d[int(0.95 * len(d))]

        await publish(0, phase)  # baseline: nobody stalled
        stalled = await connect(ws_url(srv), sock=small_rcvbuf_socket(srv.http_address.port), max_queue=1)
        await asyncio.sleep(0.05)
        await publish(phase, phase)  # the same load with a client that reads nothing (for less than stall_s)
        assert srv.hub.dropped > 0, "the stalled client's queue overflowed (drop-oldest)"
        # It is cut off once it has taken nothing for stall_s (the deadline only bounds a hang).
        deadline = time.monotonic() + 10
        while not srv.hub.disconnected.get("stalled") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert srv.hub.disconnected["stalled"] == 1 and len(srv.hub.clients) == n_clients
        await publish(2 * phase, phase)  # baseline again, once it is gone
        await asyncio.sleep(0.3)
        assert all(len(a) == 3 * phase for a in arrivals), "every client got every event"
        before, loaded, after = (p50_p95(delays(range(k * phase, (k + 1) * phase))) for k in range(3))
        print(f"\ndelay to {n_clients} clients, p50/p95 ms: alone {before[0] * 1e3:.2f}/{before[1] * 1e3:.2f}, "
              f"with a stalled client {loaded[0] * 1e3:.2f}/{loaded[1] * 1e3:.2f}, "
              f"alone again {after[0] * 1e3:.2f}/{after[1] * 1e3:.2f}; dropped for it: {srv.hub.dropped}")
        # Relative to the same clients' delays without it, measured before it came and after it was cut (the
        # worse of the two, so that a machine busy with something else for a while is not read as its cost).
        # A server that waited on the stalled client would delay the others by up to stall_s: 100x and more.
        base = (max(before[0], after[0]), max(before[1], after[1]))
        assert loaded[0] < 3 * base[0] and loaded[1] < 4 * base[1], (before, loaded, after)
        stalled.transport.abort()
        for t in readers:
            t.cancel()
        await asyncio.gather(*(ws.close() for ws in clients))


async def test_a_client_that_falls_behind_is_told_exactly_how_many_events_it_lost():
    async with feed(hub_kw=dict(queue_size=20, stall_s=30), send_buffer_bytes=8192) as (srv, bus):
        bus.publish(started("a"))
        slow = await connect(ws_url(srv), sock=small_rcvbuf_socket(srv.http_address.port), max_queue=1)
        await read_until_history_end(slow)
        total = 2000
        for w in range(total):
            bus.publish(score("a", w))
            if w % 50 == 0:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        windows, lost = [], 0
        while len(windows) + lost < total:
            m = json.loads(await asyncio.wait_for(slow.recv(), 10))
            if m["type"] == "dropped":
                lost += m["count"]
            else:
                windows.append(m["window"])
        assert lost > 0 and windows == sorted(windows) and windows[-1] == total - 1
        assert len(windows) + lost == total and srv.hub.dropped == lost
        await slow.close()


async def test_a_burst_of_frames_goes_out_in_a_few_writes_not_one_per_frame():
    # The coalescing leans on the websockets library's internals (ServerConnection.send_context calling
    # send_data, protocol.send_text); a version that stops using them would send one write per frame again
    # and only get slower.  Count the writes on the real transport of a real connection (of --ws: the
    # websockets library's server).
    n = 3 * _BURST_FRAMES
    async with feed(hub_kw=dict(queue_size=2 * n)) as (srv, bus):
        bus.publish(started("a"))
        async with connect(ws_url(srv, "/", http=False)) as ws:
            await read_until_history_end(ws)
            (conn,) = srv._servers[0].connections
            assert _BURSTS and isinstance(conn, _FeedConnection)
            transport, writes = conn.transport, []
            real_write = transport.write

            def counted(data):
                writes.append(len(data))
                real_write(data)

            transport.write = counted
            for w in range(n):  # queued at once: the client's writer takes them in one go
                srv.hub.publish(score("a", w), srv.clock())
            got = [json.loads(await asyncio.wait_for(ws.recv(), 10))["window"] for _ in range(n)]
            assert got == list(range(n))
            assert 0 < len(writes) <= n // _BURST_FRAMES + 1, f"{len(writes)} writes for {n} frames"


# --- history, subscription ---------------------------------------------------------------------


async def test_a_reconnecting_client_gets_hello_and_the_history_again():
    async with feed() as (srv, bus):
        bus.publish(started("a"))
        for w in range(3):
            bus.publish(score("a", w))
        async with connect(ws_url(srv, "/", http=False)) as ws:
            first = await read_until_history_end(ws)
            bus.publish(score("a", 3))
            assert json.loads(await ws.recv())["window"] == 3
        bus.publish(score("a", 4))
        bus.publish(StreamEnded(stream="a", ts=time.time(), reason="eof", t=12.0, windows=5, scored=5))
        async with connect(ws_url(srv, "/any/path", http=False)) as ws:
            again = await read_until_history_end(ws)
        assert [m["type"] for m in first] == ["hello", "stream_started", "score", "score", "score", "history_end"]
        assert [m.get("window") for m in again if m["type"] == "score"] == [0, 1, 2, 3, 4]
        assert again[-2]["type"] == "stream_ended" and again[0]["streams"][0]["state"] == "ended"


async def test_subscription_by_query_string_and_by_message():
    async with feed() as (srv, bus):
        for s in ("a", "b", "c"):
            bus.publish(started(s))
        async with connect(ws_url(srv) + "?streams=b,c") as ws:
            hello, *history = await read_until_history_end(ws)
            assert hello["subscribed"] == ["b", "c"] and {m["stream"] for m in history[:-1]} == {"b", "c"}
            for s in ("a", "b", "c"):
                bus.publish(score(s, 0))
            assert [json.loads(await ws.recv())["stream"] for _ in range(2)] == ["b", "c"]
            await ws.send(json.dumps({"type": "subscribe", "streams": ["a"]}))
            hello, *history = await read_until_history_end(ws)
            assert hello["subscribed"] == ["a"] and [m["stream"] for m in history[:-1]] == ["a", "a"]
            bus.publish(score("c", 1))
            bus.publish(score("a", 1))
            m = json.loads(await ws.recv())
            assert (m["stream"], m["window"]) == ("a", 1)
            await ws.send("{nonsense")
            assert json.loads(await ws.recv())["type"] == "error"
        code, body = await refused(ws_url(srv) + "?streams=" + ",".join(str(i) for i in range(1001)))
        assert code == 400 and "streams" in body


# --- security and limits -----------------------------------------------------------------------


async def test_without_the_token_clients_are_refused_with_401():
    async with feed(token="s3cret") as (srv, bus):
        for url in (ws_url(srv), ws_url(srv, "/", http=False)):
            code, body = await refused(url)
            assert code == 401 and "token" in body
            code, body = await refused(url + "?token=wrong")
            assert code == 401 and "wrong token" in body
            async with connect(url + "?token=s3cret") as ws:
                assert json.loads(await ws.recv())["type"] == "hello"
            async with connect(url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
                assert json.loads(await ws.recv())["type"] == "hello"
        port = srv.http_address.port
        status, headers, _ = await http_get(port, "/metrics")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert (await http_get(port, "/metrics", {"Authorization": "Bearer s3cret"}))[0] == 404  # no metrics here
        # Two tokens in one request: no guessing which one counts.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer s3cret\r\n"
                     "Authorization: Bearer other\r\nConnection: close\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        # The panel's own files carry no data: they load without a token (the page passes ?token= on).
        assert (await http_get(port, "/static/nope.js"))[0] == 404


async def test_listening_beyond_loopback_needs_a_token():
    hub = FeedHub(INFO)
    with pytest.raises(ServeError, match="needs a token"):
        FeedServer(hub, ws=Listen("0.0.0.0", 8765))
    with pytest.raises(ServeError, match="needs a token"):
        HttpSite(Listen("::", 8080))
    token = SitePolicy(token="t")
    FeedServer(hub, ws=Listen("0.0.0.0", 8765), policy=token)  # not started: nothing listens
    with pytest.raises(ServeError, match="needs a token"):
        HttpSite(Listen("0.0.0.0", 8081), flag="--whip")
    HttpSite(Listen("0.0.0.0", 8081), token, flag="--whip").add(EchoRoutes())
    with pytest.raises(ServeError, match="nothing to serve"):
        await FeedServer(hub).start()  # no websocket address, and no site serves it


async def test_browser_origins_are_checked():
    async with feed(allowed_origins=["https://noc.example.com"]) as (srv, bus):
        http_port = srv.http_address.port
        code, body = await refused(ws_url(srv), origin="http://evil.example")
        assert code == 403 and "origin" in body
        code, _ = await refused(ws_url(srv, "/", http=False), origin="http://evil.example")
        assert code == 403
        code, _ = await refused(ws_url(srv), origin="null")  # a file:// page
        assert code == 403
        ok = [(ws_url(srv), f"http://127.0.0.1:{http_port}"),  # the panel, same origin
              (ws_url(srv, "/", http=False), f"http://127.0.0.1:{http_port}"),  # the panel, to --ws
              (ws_url(srv), "https://noc.example.com")]
        for url, origin in ok:
            async with connect(url, origin=origin) as ws:
                assert json.loads(await ws.recv())["type"] == "hello"
        # A page whose name re-resolves to 127.0.0.1 (DNS rebinding) reads neither the feed nor the metrics.
        status, _, body = await http_get(http_port, "/metrics", {"Host": f"attacker.example:{http_port}"})
        assert status == 403 and b"host" in body


async def test_client_count_limit_and_message_size_limit():
    async with feed(max_clients=3, max_message_bytes=1024) as (srv, bus):
        clients = [await connect(ws_url(srv, http=i % 2 == 0)) for i in range(3)]
        for ws in clients:
            await read_until_history_end(ws)
        code, body = await refused(ws_url(srv))
        assert code == 503 and "too many clients" in body
        await clients[0].close()
        await asyncio.sleep(0.1)
        async with connect(ws_url(srv)) as ws:  # a place is free again
            assert json.loads(await ws.recv())["type"] == "hello"
        watcher = await connect(ws_url(srv, http=False))
        await read_until_history_end(watcher)
        for big in clients[1:]:  # one on --ws, one on --http
            await big.send(json.dumps({"type": "subscribe", "streams": ["x" * 200] * 20}))
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    await asyncio.wait_for(big.recv(), 5)
            assert e.value.rcvd.code == 1009  # message too big
        await asyncio.sleep(0.1)
        assert len(srv.hub.clients) == 1  # the others are unaffected
        bus.publish(started("a"))
        assert json.loads(await asyncio.wait_for(watcher.recv(), 5))["type"] == "stream_started"
        await watcher.close()


async def test_pings_keep_answering_clients_and_drop_silent_ones():
    async def silent(port, path):
        """A websocket client that reads everything and answers nothing, pings included."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101 ")
        while await reader.read(65536):
            pass
        writer.close()

    async with feed(ping_interval=0.3, ping_timeout=0.3) as (srv, bus):
        answering = [await connect(ws_url(srv, http=http)) for http in (True, False)]
        for ws in answering:
            await read_until_history_end(ws)
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(silent(srv.http_address.port, "/ws"), silent(srv.ws_address.port, "/")),
                               10)
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.3)
        assert len(srv.hub.clients) == 2
        bus.publish(started("a"))
        for ws in answering:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "stream_started"
            await ws.close()


# --- HTTP: panel files, metrics -----------------------------------------------------------------


async def test_http_serves_the_panel_files_safely(panel):
    async with feed(panel_dir=panel, ws=None) as (srv, bus):
        port = srv.http_address.port
        status, h, body = await http_get(port, "/")
        assert status == 200 and body.startswith(b"<!doctype html>") and h["content-type"].startswith("text/html")
        assert h["referrer-policy"] == "no-referrer" and h["x-content-type-options"] == "nosniff"
        assert (await http_get(port, "/?token=x"))[0] == 200
        for path, ctype in (("/static/panel.js", "text/javascript"), ("/static/panel.css", "text/css"),
                            ("/static/vendor/lib.min.js", "text/javascript")):
            status, h, body = await http_get(port, path)
            assert status == 200 and h["content-type"].startswith(ctype) and int(h["content-length"]) == len(body)
        status, h, body = await http_get(port, "/static/panel.js", method="HEAD")
        assert status == 200 and body == b"" and h["content-length"] == "17"
        for bad in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/vendor/", "/static/vendor",
                    "/static/", "/static/.secret", "/static/link.txt", "/static//etc/passwd",
                    "/static/..%2f..%2foutside.txt", "/static/vendor%5c..%5cpanel.js", "/nothing", "/index.htm"):
            assert (await http_get(port, bad))[0] == 404, bad
        assert (await http_get(port, "/static/panel.js", method="DELETE"))[0] == 405
        status, h, _ = await http_get(port, "/whip", method="POST", body=b"v=0\r\n")  # no ingest here
        assert status == 405 and h["allow"] == "GET, HEAD"
        status, _, body = await http_get(port, "/ws")  # no upgrade
        assert status == 426
        # Connections stay open between requests (HTTP/1.1 keep-alive).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(f"GET /static/panel.js HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ") and b"close" not in head.lower()
            assert await asyncio.wait_for(reader.readexactly(17), 10) == b"console.log('hi')"
        writer.close()


async def test_the_default_panel_folder_is_served():
    async with feed(ws=None) as (srv, bus):
        status, h, body = await http_get(srv.http_address.port, "/")
        assert status == 200 and h["content-type"].startswith("text/html") and b"<html" in body.lower()


async def test_metrics_parse_with_prometheus_own_parser_and_ended_streams_leave_no_series():
    metrics = MetricsSink(model="distillmos", mode="nr")
    async with feed(metrics=metrics) as (srv, bus):
        port = srv.http_address.port
        async with connect(ws_url(srv)):  # one client, counted by the metrics
            for s in ("a", "b"):
                bus.publish(started(s))
            for w in range(3):
                bus.publish(score("a", w, mos=2.5 + w))
                bus.publish(score("b", w))
            bus.publish(ScoreEvent(stream="b", ts=time.time(), window=3, t_end=11.0, mos=None, reason="no_speech",
                                   speech=0.05, model="distillmos"))
            metrics.observe_batch(2, 0.08)
            await asyncio.sleep(0.1)

            async def scrape():
                status, h, body = await http_get(port, "/metrics")
                assert status == 200 and h["content-type"].startswith("text/plain")
                samples = {}
                for fam in text_string_to_metric_families(body.decode()):
                    for s in fam.samples:
                        samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
                return samples

            m = await scrape()
            assert m[("scoreq_live_mos", (("stream", "a"),))] == 4.5
            assert m[("scoreq_live_mos_smoothed", (("stream", "b"),))] == 3.5
            assert m[("scoreq_live_speech_ratio", (("stream", "b"),))] == 0.05
            assert m[("scoreq_live_level_dbfs", (("stream", "a"),))] == -25.0
            assert m[("scoreq_live_windows_total", (("result", "scored"), ("stream", "b")))] == 3
            assert m[("scoreq_live_windows_total", (("result", "no_speech"), ("stream", "b")))] == 1
            assert m[("scoreq_live_inference_seconds_count", ())] == 1
            assert m[("scoreq_live_connected_clients", ())] == 1
            assert m[("scoreq_live_events_dropped_total", (("consumer", "websocket"),))] == 0
            assert m[("scoreq_live_streams", ())] == 2
            assert m[("scoreq_live_build_info", (("mode", "nr"), ("model", "distillmos"), ("version", "0.1.0")))] == 1
            bus.publish(StreamEnded(stream="a", ts=time.time(), reason="eof", t=10.0, windows=3, scored=3))
            await asyncio.sleep(0.1)
            m = await scrape()
            assert not [k for k in m if ("stream", "a") in k[1]], "no series left for the ended stream"
            assert ("scoreq_live_mos", (("stream", "b"),)) in m and m[("scoreq_live_streams", ())] == 1


# --- closing --------------------------------------------------------------------------------------------


async def test_close_says_going_away_to_every_client_and_cuts_the_ones_that_read_nothing():
    async with feed(hub_kw=dict(queue_size=20, stall_s=60), send_buffer_bytes=8192) as (srv, bus):
        bus.publish(started("a"))
        codes: dict[str, int | None] = {}

        async def read_to_the_end(name, ws):
            try:
                async for _ in ws:
                    pass
            finally:
                codes[name] = ws.close_code

        readers = []
        for http in (True, False):
            ws = await connect(ws_url(srv, http=http))
            readers.append(asyncio.create_task(read_to_the_end("http" if http else "ws", ws)))
        port = {True: srv.http_address.port, False: srv.ws_address.port}
        stalled = [await connect(ws_url(srv, http=http), sock=small_rcvbuf_socket(port[http]), max_queue=1)
                   for http in (True, False)]
        for w in range(2000):  # far more than the stalled clients' buffers hold: their writers wait
            bus.publish(score("a", w))
            if w % 50 == 0:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        assert len(srv.hub.clients) == 4 and srv.hub.dropped > 0
        t0 = time.monotonic()
        await asyncio.wait_for(srv.close(), 10)
        took = time.monotonic() - t0
        await asyncio.wait_for(asyncio.gather(*readers), 5)
        assert codes == {"http": 1001, "ws": 1001}, codes
        print(f"\nclose took {took:.2f}s")
        assert took < 6, f"close took {took:.1f}s"
        assert not srv.hub.clients and not srv._conns
        for ws in stalled:
            ws.transport.abort()


# --- inputs fed over HTTP (the ingest hook) ---------------------------------------------------------------


async def test_ingest_routes_on_the_http_server_and_on_a_site_of_their_own_under_the_same_rules(panel):
    routes, lines = EchoRoutes(), []
    async with feed(token="s3cret", panel_dir=panel, ingest=routes, ingest_listen=LOCAL,
                    notify=lines.append) as (srv, bus):
        http_port, own_port = srv.http_address.port, srv.ingest_address.port
        auth = {"Authorization": "Bearer s3cret"}
        assert lines.index(f"panel: http://127.0.0.1:{http_port}/  (metrics: /metrics, feed: /ws)") == 0
        for port in (http_port, own_port):
            line = f"publish: http://127.0.0.1:{port}/whip (WHIP), ws://127.0.0.1:{port}/media (media streams)"
            assert line in lines, lines
            status, h, body = await http_get(port, "/whip", auth, method="POST", body=b"v=0\r\n")
            assert status == 201 and body == b"v=0\r\n" and h["content-type"] == "application/sdp"
            assert h["server"] == f"scoreq-live/{__version__}" and h["cache-control"] == "no-store"
            assert (await http_get(port, "/whip?token=s3cret", method="POST", body=b"x"))[0] == 201
            status, h, _ = await http_get(port, "/whip", method="POST", body=b"x")
            assert status == 401 and h["www-authenticate"].startswith("Bearer")
            assert (await http_get(port, "/whip?token=wrong", method="POST", body=b"x"))[0] == 401
            # A page whose name re-resolves to 127.0.0.1 (DNS rebinding) publishes nothing.
            status, _, body = await http_get(port, "/whip", {**auth, "Host": f"attacker.example:{port}"},
                                             method="POST", body=b"x")
            assert status == 403 and b"host" in body
            assert (await http_get(port, "/media", auth))[2] == b"media"
            assert (await http_get(port, "/media"))[0] == 401
            status, _, _ = await http_get(port, "/whip", auth, method="POST", body=b"x" * (1024 * 1024 + 1))
            assert status == 413  # the server's limit on request bodies: 1 MiB
        assert routes.bodies == [b"v=0\r\n", b"x"] * 2
        # The site of their own serves the ingest's routes and nothing else.
        for path in ("/", "/index.html", "/static/panel.js", "/metrics?token=s3cret", "/ws?token=s3cret", "/x"):
            status, h, _ = await http_get(own_port, path, auth)
            assert status == 404 and h["server"] == f"scoreq-live/{__version__}", path
        code, _ = await refused(f"ws://127.0.0.1:{own_port}/ws?token=s3cret")
        assert code == 404
        # A method /whip does not take is, as on the panel's site, a request no route takes.
        assert (await http_get(own_port, "/whip", auth))[0] == 404
        # Beside them, the HTTP server still serves the panel and the feed, and refuses what nobody takes.
        status, h, _ = await http_get(http_port, "/")
        assert status == 200 and h["server"] == f"scoreq-live/{__version__}"
        async with connect(ws_url(srv) + "?token=s3cret") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
        assert (await http_get(http_port, "/whip/abc", auth, method="DELETE"))[0] == 405
        assert (await http_get(http_port, "/whip", auth))[0] == 404
        assert (await http_get(http_port, "/nothing"))[0] == 404


async def test_a_site_for_publishers_alone():
    lines = []
    async with feed(ws=None, http=None, ingest=EchoRoutes(), ingest_listen=LOCAL, notify=lines.append) as (srv, bus):
        port = srv.ingest_address.port
        assert srv.http_address is None and srv.ws_address is None
        assert lines == [f"publish: http://127.0.0.1:{port}/whip (WHIP), ws://127.0.0.1:{port}/media (media streams)"]
        assert (await http_get(port, "/whip", method="POST", body=b"v=0"))[:3:2] == (201, b"v=0")
        assert (await http_get(port, "/"))[0] == 404


async def test_the_publishers_endpoints_say_where_they_are_and_take_their_own_methods():
    lines = []
    site = HttpSite(LOCAL, flag="--whip", notify=lines.append).add(IngestRoutes(WhipIngest(), MediaIngest()))
    await site.start()
    try:
        port = site.address.port
        assert lines == [f"publish: http://127.0.0.1:{port}/whip (WHIP), ws://127.0.0.1:{port}/media (media streams)"]
        status, h, body = await http_get(port, "/whip")
        assert status == 405 and h["allow"] == "POST, OPTIONS" and b"WHIP" in body
        status, h, body = await http_get(port, "/whip", {"Host": f"attacker.example:{port}"})
        assert status == 403 and b"host" in body  # the site checks the Host before any route
        status, h, body = await http_get(port, "/media", method="POST")
        assert status == 405 and h["allow"] == "GET, HEAD" and h["server"] == f"scoreq-live/{__version__}"
        for path in ("/", "/ws", "/metrics", "/nothing"):
            status, _, body = await http_get(port, path)
            assert (status, body) == (404, b"not found\n"), path
    finally:
        await site.close()
