"""The live feed over the network: websockets (``--ws``) and HTTP (``--http``), and the publishers' site.

A thin I/O layer around :class:`scoreq_live.sinks.feed.FeedHub`: it pumps the
event bus into the hub and, per websocket client, the frames the hub has for
it into the socket.  The standalone feed (``--ws``) is the ``websockets``
library's asyncio server (its writes coalesced into bursts); the HTTP server
(``--http``) is an aiohttp application serving the panel's static files,
``/metrics`` and the same feed at ``/ws``, plus whatever routes an ingest
(:class:`HttpRoutes`: WHIP, media-stream websockets) adds to it; the ingest's
routes can also have a server of their own (``ingest_listen``) that serves
nothing else.  What each request gets (Host, Origin, token and client-count
checks, routing, the responses) is decided in :mod:`scoreq_live.sinks.policy`,
before any upgrade, so a refusal is an ordinary HTTP status; this module only
moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from aiohttp import WSMsgType, web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from scoreq_live import __version__
from scoreq_live.bus import Subscription
from scoreq_live.sinks.base import Sink
from scoreq_live.sinks.feed import FeedClient, FeedHub
from scoreq_live.sinks.policy import (
    PANEL_DIR,
    FeedPolicy,
    HttpRequest,
    Listen,
    Metrics,
    ServeError,
    not_upgraded,
    parse_listen,
    response,
    subscription,
)

# Listen, parse_listen and ServeError live with the policy; the command line imports them from here.
__all__ = [
    "DEFAULT_HTTP_PORT", "DEFAULT_WS_PORT", "TOKEN_ENV", "FeedServer", "HttpRoutes", "Listen", "ServeError",
    "parse_listen", "policy_request", "web_response",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "SCOREQ_LIVE_TOKEN"
DEFAULT_WS_PORT = 8765
DEFAULT_HTTP_PORT = 8080
SERVER = f"scoreq-live/{__version__}"
MAX_REQUEST_BODY = 1024 * 1024  # aiohttp's client_max_size; ingest handlers enforce smaller limits of their own
_CLOSE_S = 2.0  # a websocket's closing handshake; then its connection is cut
_SHUTDOWN_S = 2.0  # aiohttp: requests still running when the server stops get this long, then are cancelled
# Bytes a websocket client may have waiting in user space, in the transport, before its writer waits (as
# the websockets library's default write limit); aiohttp's writer looks every _WRITER_LIMIT bytes.
_WRITE_BUFFER = 32 * 1024
_WRITER_LIMIT = 8 * 1024


class HttpRoutes(Protocol):
    """Routes of an input fed over HTTP (WHIP, media-stream websockets), added to the server's application.

    ``add_routes`` is called once per site that serves them (the ``--http``
    application, and the application of ``ingest_listen``); ``policy()`` is the
    server's current :class:`FeedPolicy` (Host, token and Origin checks, reused
    for the ingest's requests), ``where()`` the address that site is bound to
    (None until it is: check as if loopback).
    """

    def add_routes(self, app: web.Application, policy: Callable[[], FeedPolicy],
                   where: Callable[[], Listen | None]) -> None: ...


# --- aiohttp <-> the policy's sans-I/O types ------------------------------------------------------------


def policy_request(request: web.BaseRequest) -> HttpRequest:
    """An aiohttp request as the policy reads it: method, path with its query as sent, headers."""
    return HttpRequest(request.method, request.raw_path, Headers(list(request.headers.items())))


def web_response(r: Response) -> web.Response:
    """A response the policy decided, as an aiohttp response (aiohttp decides whether the connection stays)."""
    headers = [(k, v) for k, v in r.headers.raw_items() if k.lower() != "connection"]
    # The policy's Content-Length is the body's a GET gets, HEAD included: aiohttp keeps it and sends no body.
    return web.Response(status=r.status_code, reason=r.reason_phrase, body=bytes(r.body), headers=headers)


async def _server_header(request: web.Request, resp: web.StreamResponse) -> None:
    """Every response of the aiohttp server names the monitor, not the library; never cached nor sniffed."""
    resp.headers["Server"] = SERVER
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Cache-Control", "no-store")


def _published(paths: Iterable[str], where: Listen) -> str | None:
    """The notice for the ingest routes a site serves, or None when it serves none."""
    got = set(paths)
    parts = []
    if "/whip" in got:
        parts.append(f"http://{where}/whip (WHIP)")
    if "/media" in got:
        parts.append(f"ws://{where}/media (media streams)")
    return "publish: " + ", ".join(parts) if parts else None


# --- the websockets library's server (--ws) ----------------------------------------------------------


class _FeedConnection(ServerConnection):
    """A server connection that writes a burst of queued frames with one system call.

    The library writes each frame with its own ``transport.write`` (a ``send()``
    each); for a feed fanned out to hundreds of clients that system call is
    the largest cost per frame.  Only the coalescing differs from the
    library's own ``send_data``.  This and :func:`_send_frames` lean on the
    library's internals (``send_data``, ``send_context``, ``protocol``): if a
    later version stops calling them, frames would silently go out one by one
    again, so the test suite counts the writes of a real burst and fails then.
    """

    def send_data(self) -> None:
        """Write everything the protocol has to send: consecutive frames joined into one write."""
        run: list[bytes] = []
        for data in self.protocol.data_to_send():
            if data:
                run.append(data)
                continue
            if run:
                self.transport.write(b"".join(run))
                run = []
            # End of stream: half-close the TCP connection, as the library does.
            if self.transport.can_write_eof():
                try:
                    self.transport.write_eof()
                except Exception:
                    pass
            else:
                self.transport.close()
        if run:
            self.transport.write(run[0] if len(run) == 1 else b"".join(run))


# Sending several frames in one go needs the connection's write context; without it, one by one.
_BURSTS = hasattr(ServerConnection, "send_context")
_BURST_FRAMES = 256  # frames written between two flow-control (drain) waits


async def _send_frames(ws: ServerConnection, frames: list[bytes]) -> None:
    """Send JSON text frames (already UTF-8) in order, a burst at a time."""
    if len(frames) == 1 or not _BURSTS:
        for f in frames:
            await ws.send(f, text=True)  # bytes already JSON: no decode/encode per client
        return
    for i in range(0, len(frames), _BURST_FRAMES):
        async with ws.send_context():  # checks the connection is open; on exit writes and drains
            for f in frames[i:i + _BURST_FRAMES]:
                ws.protocol.send_text(f)


async def _ws_messages(ws: ServerConnection) -> AsyncIterator[str | bytes]:
    async for msg in ws:
        yield msg


# --- aiohttp's websockets (/ws on --http) ------------------------------------------------------------


async def _send_web_frames(ws: web.WebSocketResponse, frames: list[bytes]) -> None:
    """Send JSON text frames (already UTF-8) in order; waits only when the socket's buffers are full."""
    for f in frames:
        await ws.send_frame(f, WSMsgType.TEXT)  # bytes already JSON: no decode/encode per client


async def _web_messages(ws: web.WebSocketResponse) -> AsyncIterator[str | bytes]:
    async for msg in ws:  # ends at the close; pings and pongs are answered inside
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            yield msg.data
        else:  # ERROR: too large (closed with 1009), not UTF-8, or the connection broke
            return


@dataclass(frozen=True)
class _Peer:
    """What the stall sweeper and :meth:`FeedServer.close` need of a client's connection, whoever serves it."""

    close: Callable[[int, str], Awaitable[object]]  # the closing handshake with a code and a reason
    abort: Callable[[], None]  # cut the TCP connection now
    web: bool  # served by aiohttp (--http), else by the websockets library (--ws)


class FeedServer(Sink):
    """A sink that serves the feed: websockets on ``ws`` and/or panel + metrics + ``/ws`` on ``http``.

    ``token``: clients must present it (``Authorization: Bearer TOKEN`` or
    ``?token=TOKEN``) for the feed and ``/metrics``; required when any address
    is not loopback.  ``allowed_origins``: browser origins allowed besides the
    panel's own (``"*"``: any).  ``max_clients``: websocket clients at once.
    ``max_message_bytes``: largest client message.  ``ws_required``: False for
    the default ``--ws`` address, which is skipped with a notice when in use.
    ``metrics``: callable returning ``(body, content_type)`` for ``/metrics``.
    ``send_buffer_bytes``: the kernel send buffer of each client socket.  Fixed
    (not autotuned up to megabytes) so that a stalled client pins little memory
    and falls into its drop-oldest queue soon: 256 KiB still carries far more
    than a feed needs over a 200 ms round trip.  ``ping_interval``: seconds
    between pings; a pong is due within ``ping_timeout`` on ``--ws``, within
    half the interval on ``--http`` (aiohttp's heartbeat).  ``ingest``: routes
    of inputs fed over HTTP, added to the ``http`` server and, when
    ``ingest_listen`` is given, served there alone.
    """

    def __init__(self, hub: FeedHub, ws: Listen | None = None, http: Listen | None = None, *,
                 ws_required: bool = True, token: str | None = None, allowed_origins: Iterable[str] = (),
                 max_clients: int = 256, max_message_bytes: int = 16 * 1024, panel_dir: Path = PANEL_DIR,
                 metrics: Metrics | None = None, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0, send_buffer_bytes: int = 256 * 1024,
                 notify: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ingest: HttpRoutes | None = None, ingest_listen: Listen | None = None) -> None:
        if ws is None and http is None and ingest_listen is None:
            raise ServeError("nothing to serve: no websocket and no HTTP address")
        if ingest_listen is not None and ingest is None:
            raise ServeError(f"nothing to serve on {ingest_listen}: no publishers' endpoints")
        exposed = [str(a) for a in (ws, http, ingest_listen) if a is not None and not a.loopback]
        if exposed and not token:
            raise ServeError(f"listening on {', '.join(exposed)} (beyond this machine) needs a token: "
                             f"--token TOKEN or the environment variable {TOKEN_ENV}")
        self.hub = hub
        self.ws_listen, self.http_listen, self.ingest_listen = ws, http, ingest_listen
        self.ws_required = ws_required
        # Every decision on a request; replaced (it is frozen) as the servers bind their ports.
        self.policy = FeedPolicy(token=token, allowed_origins=frozenset(allowed_origins), max_clients=max_clients,
                                 panel_dir=Path(panel_dir), ws=ws, http=http)
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.send_buffer_bytes = send_buffer_bytes
        self.notify = notify or (lambda line: None)
        self.clock = clock
        self.ingest = ingest
        self.ws_address: Listen | None = None  # where it listens, once started (port 0 resolved)
        self.http_address: Listen | None = None
        self.ingest_address: Listen | None = None
        self._servers: list[Server] = []
        self._runners: list[web.AppRunner] = []
        self._conns: dict[FeedClient, _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (before any stream starts, so a busy port is an error up front)."""
        try:
            if self.ws_listen is not None:
                try:
                    srv = await self._serve(self.ws_listen)
                    self.ws_address = self._bound(srv, self.ws_listen)
                    self.policy = replace(self.policy, ws=self.ws_address)
                    self.notify(f"feed: ws://{self.ws_address}/")
                except OSError as e:
                    if self.ws_required:
                        raise ServeError(f"cannot listen on {self.ws_listen} for --ws: {e.strerror or e}") from e
                    self.notify(f"feed: not serving websockets on {self.ws_listen} ({e.strerror or e}); "
                                "choose another with --ws HOST:PORT")
            if self.http_listen is not None:
                app, paths = self._app(lambda: self.http_address, panel=True)
                self.http_address = await self._site(app, self.http_listen, "--http")
                self.policy = replace(self.policy, http=self.http_address, panel_port=self.http_address.port)
                self.notify(f"panel: http://{self.http_address}/  (metrics: /metrics, feed: /ws)")
                if (line := _published(paths, self.http_address)) is not None:
                    self.notify(line)
            if self.ingest_listen is not None:
                app, paths = self._app(lambda: self.ingest_address, panel=False)
                self.ingest_address = await self._site(app, self.ingest_listen, "--whip")
                if (line := _published(paths, self.ingest_address)) is not None:
                    self.notify(line)
        except BaseException:
            await self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep(), name="feed-stall-sweeper")

    async def _serve(self, where: Listen) -> Server:
        srv = await serve(
            self._handle, where.host, where.port,
            process_request=self._ws_request,
            compression=None,  # per-client deflate would multiply CPU by the client count; frames are small
            max_size=self.max_message_bytes,
            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
            close_timeout=_CLOSE_S,
            server_header=SERVER,
            create_connection=_FeedConnection,
        )
        self._servers.append(srv)
        return srv

    def _app(self, where: Callable[[], Listen | None], panel: bool) -> tuple[web.Application, list[str]]:
        """An aiohttp application: the ingest's routes, then (``panel``) everything else through the policy.

        Also returns the paths the ingest added.
        """
        app = web.Application(client_max_size=MAX_REQUEST_BODY)
        app.on_response_prepare.append(_server_header)
        added: list[str] = []
        if self.ingest is not None:
            before = len(app.router.resources())
            self.ingest.add_routes(app, lambda: self.policy, where)
            added = [r.canonical for r in list(app.router.resources())[before:]]
        if panel:
            # Last, and matched after every more specific path: the panel, /metrics and /ws, decided by the
            # policy, which also answers every other path and method (404, 405).
            app.router.add_route("*", "/{path:.*}", self._http)
            app.on_shutdown.append(self._going_away)
        return app, added

    async def _site(self, app: web.Application, where: Listen, flag: str) -> Listen:
        """Serve ``app`` on ``where``; the address it is bound to."""
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S)
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.TCPSite(runner, where.host, where.port).start()
        except OSError as e:
            raise ServeError(f"cannot listen on {where} for {flag}: {e.strerror or e}") from e
        addresses = runner.addresses
        return Listen(where.host, addresses[0][1] if addresses else where.port)

    @staticmethod
    def _bound(srv: Server, asked: Listen) -> Listen:
        port = srv.sockets[0].getsockname()[1] if srv.sockets else asked.port
        return Listen(asked.host, port)

    async def run(self, sub: Subscription) -> None:
        """Feed the bus into the hub until the bus closes (the servers stay up until :meth:`close`)."""
        seen = 0
        async for ev in sub:
            if sub.dropped != seen:  # the feed's own bus queue overflowed: every client missed those
                self.hub.lost(sub.dropped - seen, self.clock())
                seen = sub.dropped
            try:
                self.hub.publish(ev, self.clock())
            except Exception:  # one event the feed cannot take must not end the feed
                log.exception("feed: cannot publish a %s event", ev.type)

    async def close(self) -> None:
        """Stop listening and close every connection (1001 going away); stalled ones are cut."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        # aiohttp: each runner stops its site, closes the feed's websockets (_going_away), then cancels
        # requests still running after _SHUTDOWN_S; the websockets server at the same time.
        results = await asyncio.gather(self._close_ws_servers(), *(r.cleanup() for r in self._runners),
                                       return_exceptions=True)
        self._runners.clear()
        for r in results:
            if isinstance(r, Exception):
                log.warning("feed: closing a server: %s", r, exc_info=r)

    async def _close_ws_servers(self) -> None:
        for srv in self._servers:
            srv.close()  # stops listening and closes its connections with 1001
        waits = [srv.wait_closed() for srv in self._servers]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), 3.0)
            except asyncio.TimeoutError:
                for peer in list(self._conns.values()):
                    if not peer.web:
                        peer.abort()
                await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in self._servers),
                                                      return_exceptions=True), 3.0)
        self._servers.clear()

    async def _going_away(self, app: web.Application) -> None:
        """The HTTP server stops: its feed clients get 1001; those that cannot take it are cut."""
        peers = [p for p in self._conns.values() if p.web]
        await asyncio.gather(*(self._cut(p, CloseCode.GOING_AWAY, "the monitor is stopping", always=False)
                               for p in peers))

    # -- HTTP: the policy decides, before any upgrade ---------------------------------

    def _ws_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return self.policy.ws_request(HttpRequest.of(request), clients=len(self.hub.clients))

    async def _http(self, request: web.Request) -> web.StreamResponse:
        """Any request to the HTTP server the ingest does not take: the panel, ``/metrics`` or ``/ws``."""
        req = policy_request(request)
        try:
            decided = self.policy.http_request(req, clients=len(self.hub.clients), metrics=self.metrics)
        except MultipleValuesError as e:  # e.g. two Origin or Authorization headers: no guessing which counts
            return web_response(response(400, f"header {e} given more than once\n"))
        if decided is not None:
            return web_response(decided)
        return await self._web_feed(request, req)  # /ws, and every check passed

    # -- websocket clients ---------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        """A client of the websockets server (``--ws``)."""
        assert ws.request is not None  # the handshake is done: the library parsed the request
        streams = subscription(parse_qs(urlsplit(ws.request.path).query))  # checked before the upgrade
        max_clients = self.policy.max_clients
        if len(self.hub.clients) >= max_clients:  # several handshakes raced past the HTTP check
            await ws.close(CloseCode.TRY_AGAIN_LATER, f"too many clients (at most {max_clients})")
            return
        self._set_send_buffer(ws.transport)
        peer = _Peer(close=ws.close, abort=ws.transport.abort, web=False)
        await self._pump(streams, peer, lambda frames: _send_frames(ws, frames), _ws_messages(ws))

    async def _web_feed(self, request: web.Request, req: HttpRequest) -> web.StreamResponse:
        """A client of the HTTP server's ``/ws`` (aiohttp), once the policy let it through."""
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, heartbeat=self.ping_interval or None,
                                   compress=False, timeout=_CLOSE_S, writer_limit=_WRITER_LIMIT)
        transport = request.transport
        if request.method != "GET" or transport is None or not ws.can_prepare(request).ok:
            return web_response(not_upgraded(req))
        streams = subscription(parse_qs(urlsplit(req.path).query))  # checked by the policy
        self._set_send_buffer(transport)
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=_WRITE_BUFFER)
        await ws.prepare(request)
        max_clients = self.policy.max_clients
        if len(self.hub.clients) >= max_clients:  # several handshakes raced past the HTTP check
            await ws.close(code=CloseCode.TRY_AGAIN_LATER, message=f"too many clients (at most {max_clients})".encode())
            return ws

        async def close(code: int, reason: str) -> None:
            await ws.close(code=code, message=reason.encode())

        peer = _Peer(close=close, abort=transport.abort, web=True)
        await self._pump(streams, peer, lambda frames: _send_web_frames(ws, frames), _web_messages(ws))
        return ws

    def _set_send_buffer(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and self.send_buffer_bytes:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
            except OSError:
                pass

    async def _pump(self, streams: frozenset[str] | None, peer: _Peer,
                    send: Callable[[list[bytes]], Awaitable[None]], messages: AsyncIterator[str | bytes]) -> None:
        """One feed client, whichever server: its frames out as they come, its messages in."""
        client = self.hub.connect(streams, self.clock())
        wake = asyncio.Event()
        client.on_ready = wake.set
        wake.set()
        self._conns[client] = peer
        reader = asyncio.create_task(self._read(messages, client))
        try:
            while True:
                await wake.wait()
                wake.clear()
                if client.closed:
                    break
                await send(client.take(self.clock()))
        except (ConnectionClosed, ConnectionError):
            pass
        finally:
            reader.cancel()
            self._conns.pop(client, None)
            self.hub.disconnect(client)

    async def _read(self, messages: AsyncIterator[str | bytes], client: FeedClient) -> None:
        try:
            async for msg in messages:
                self.hub.handle_message(client, msg, self.clock())
        except (ConnectionClosed, ConnectionError):
            pass  # too large (1009), gone, or closed by us
        finally:
            self.hub.disconnect(client)  # wakes the writer, which ends the connection

    async def _sweep(self) -> None:
        """Cut clients that took nothing for ``stall_s`` while frames waited (their pings may still pass)."""
        period = max(0.05, min(1.0, self.hub.stall_s / 4))
        while True:
            await asyncio.sleep(period)
            for client in self.hub.stalled(self.clock()):
                self.hub.disconnect(client, "stalled")
                peer = self._conns.get(client)
                if peer is not None:
                    reason = f"stalled for more than {self.hub.stall_s:g}s"
                    t = asyncio.create_task(self._cut(peer, CloseCode.POLICY_VIOLATION, reason))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _cut(peer: _Peer, code: int, reason: str, always: bool = True) -> None:
        """Close with ``code`` and ``reason``, then cut the connection (``always``, or when the close hangs)."""
        try:  # say why if its buffer has room; a client that reads nothing cannot complete the close
            await asyncio.wait_for(peer.close(code, reason), _CLOSE_S)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            always = True
        finally:
            if always:
                peer.abort()
