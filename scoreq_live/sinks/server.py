"""The live feed over the network: its own websocket listener (``--ws``), and ``/ws`` on HTTP sites.

A thin I/O layer around :class:`scoreq_live.sinks.feed.FeedHub`: it pumps the
event bus into the hub and, per websocket client, the frames the hub has for
it into the socket.  The standalone feed (``--ws``) is the ``websockets``
library's asyncio server, which the feed owns (its writes coalesced into
bursts).  On an HTTP site (:class:`~scoreq_live.http.site.HttpSite`, which
owns its socket and checks every request's Host) the feed is one part among
others: :meth:`FeedServer.add_routes` adds ``/ws`` (aiohttp's websockets),
the same feed.  What each request gets (Origin, token and client-count
checks, the responses) is decided in :mod:`scoreq_live.sinks.policy`, before
any upgrade, so a refusal is an ordinary HTTP status; this module only moves
bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, urlsplit

from aiohttp import WSMsgType, web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from scoreq_live.bus import Subscription
from scoreq_live.http.policy import HttpRequest, Listen, ServeError, SitePolicy, check_exposed
from scoreq_live.http.site import SERVER, HttpSite, policy_request, web_response
from scoreq_live.sinks.base import Sink
from scoreq_live.sinks.feed import FeedClient, FeedHub
from scoreq_live.sinks.policy import FeedPolicy, not_upgraded, subscription

# Listen and ServeError: the addresses and the error of FeedServer's own signature.
__all__ = ["DEFAULT_WS_PORT", "FeedServer", "Listen", "ServeError"]

log = logging.getLogger(__name__)

DEFAULT_WS_PORT = 8765
_CLOSE_S = 2.0  # a websocket's closing handshake; then its connection is cut
# Bytes a websocket client may have waiting in user space, in the transport, before its writer waits (as
# the websockets library's default write limit); aiohttp's writer looks every _WRITER_LIMIT bytes.
_WRITE_BUFFER = 32 * 1024
_WRITER_LIMIT = 8 * 1024


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


# --- aiohttp's websockets (/ws on a site) -------------------------------------------------------------


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
    web: bool  # served by aiohttp (/ws on a site), else by the websockets library (--ws)


class FeedServer(Sink):
    """A sink that serves the feed: on its own websocket listener (``ws``) and at ``/ws`` on HTTP sites.

    ``site.add(feed)`` adds ``/ws`` to a site (:meth:`add_routes`): there the
    site's token and origins apply, and this feed's client limit.  ``policy``:
    the token and origins of the ``ws`` listener (those of the sites, as the
    monitor assembles them); a token is required when ``ws`` is not loopback.
    ``max_clients``: websocket clients at once, everywhere together.
    ``max_message_bytes``: largest client message.  ``ws_required``: False for
    the default ``--ws`` address, which is skipped with a notice when in use.
    ``send_buffer_bytes``: the kernel send buffer of each client socket.  Fixed
    (not autotuned up to megabytes) so that a stalled client pins little memory
    and falls into its drop-oldest queue soon: 256 KiB still carries far more
    than a feed needs over a 200 ms round trip.  ``ping_interval``: seconds
    between pings; a pong is due within ``ping_timeout`` on ``--ws``, within
    half the interval on a site (aiohttp's heartbeat).
    """

    def __init__(self, hub: FeedHub, ws: Listen | None = None, *, ws_required: bool = True,
                 policy: SitePolicy | None = None, max_clients: int = 256, max_message_bytes: int = 16 * 1024,
                 ping_interval: float = 20.0, ping_timeout: float = 20.0, send_buffer_bytes: int = 256 * 1024,
                 notify: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        policy = policy or SitePolicy()
        check_exposed([ws], policy.token)
        self.hub = hub
        self.ws_listen = ws
        self.ws_required = ws_required
        # Every decision on a --ws request; replaced (it is frozen) as the listener and the panel's site bind.
        self.policy = FeedPolicy.under(policy, max_clients=max_clients, ws=ws)
        self.max_message_bytes = max_message_bytes
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.send_buffer_bytes = send_buffer_bytes
        self.notify = notify or (lambda line: None)
        self.clock = clock
        self.ws_address: Listen | None = None  # where it listens, once started (port 0 resolved)
        self.sites: list[HttpSite] = []  # the sites serving /ws
        self._servers: list[Server] = []
        self._conns: dict[FeedClient, _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- on a site ------------------------------------------------------------------

    def add_routes(self, site: HttpSite) -> None:
        """``/ws`` on ``site``, under the site's token and origins and this feed's client limit."""
        policy = FeedPolicy.under(site.policy, max_clients=self.policy.max_clients)

        async def feed(request: web.Request) -> web.StreamResponse:
            return await self._web_feed(request, policy)

        site.router.add_route("*", "/ws", feed)  # any method: the policy answers those that cannot upgrade
        site.app.on_shutdown.append(self._going_away)
        self.sites.append(site)

    def listening(self, site: HttpSite) -> None:
        """The site is bound: the panel's pages there may read the ``--ws`` listener too (same host name)."""
        if self.policy.panel_port is None and site.address is not None:
            self.policy = replace(self.policy, panel_port=site.address.port)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``ws`` (before any stream starts, so a busy port is an error up front)."""
        if self.ws_listen is None and not self.sites:
            raise ServeError("nothing to serve: no websocket address and no HTTP site")
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

    @staticmethod
    def _bound(srv: Server, asked: Listen) -> Listen:
        port = srv.sockets[0].getsockname()[1] if srv.sockets else asked.port
        return Listen(asked.host, port)

    async def run(self, sub: Subscription) -> None:
        """Feed the bus into the hub until the bus closes (the clients stay until :meth:`close`)."""
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
        """Stop listening on ``ws`` and close every client, wherever served (1001 going away); stalled ones are cut.

        The sites themselves stop listening when they close (their owner closes them after the feed).
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
        results = await asyncio.gather(self._close_ws_servers(), self._going_away(), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("feed: closing: %s", r, exc_info=r)

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

    async def _going_away(self, app: web.Application | None = None) -> None:
        """The clients on sites get 1001 (the feed, or a site, stops); those that cannot take it are cut."""
        peers = [p for p in self._conns.values() if p.web]
        await asyncio.gather(*(self._cut(p, CloseCode.GOING_AWAY, "the monitor is stopping", always=False)
                               for p in peers))

    # -- HTTP: the policy decides, before any upgrade ---------------------------------

    def _ws_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return self.policy.ws_request(HttpRequest.of(request), clients=len(self.hub.clients))

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

    async def _web_feed(self, request: web.Request, policy: FeedPolicy) -> web.StreamResponse:
        """A client of ``/ws`` on a site (aiohttp): the policy decides, then the upgrade."""
        req = policy_request(request)
        decided = policy.feed_request(req, clients=len(self.hub.clients), http=True)
        if decided is not None:
            return web_response(decided)
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, heartbeat=self.ping_interval or None,
                                   compress=False, timeout=_CLOSE_S, writer_limit=_WRITER_LIMIT)
        transport = request.transport
        if request.method != "GET" or transport is None or not ws.can_prepare(request).ok:
            return web_response(not_upgraded(req))
        streams = subscription(req.query)  # checked by the policy
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
