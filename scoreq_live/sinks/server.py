"""The live feed over the network: websockets (``--ws``) and HTTP (``--http``).

A thin I/O layer around :class:`scoreq_live.sinks.feed.FeedHub`: it pumps the
event bus into the hub and, per websocket client, the frames the hub has for
it into the socket.  Both servers are the ``websockets`` library's asyncio
server; the HTTP one answers plain GET requests from ``process_request``
(the panel's static files, ``/metrics``) and upgrades ``/ws`` to the same
feed.  What each request gets (Host, Origin, token and client-count checks,
routing, the responses) is decided in :mod:`scoreq_live.sinks.policy`, before
the upgrade, so a refusal is an ordinary HTTP status; this module only moves
bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
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
    parse_listen,
    subscription,
)

# Listen, parse_listen and ServeError live with the policy; the command line imports them from here.
__all__ = ["DEFAULT_HTTP_PORT", "DEFAULT_WS_PORT", "TOKEN_ENV", "FeedServer", "Listen", "ServeError", "parse_listen"]

log = logging.getLogger(__name__)

TOKEN_ENV = "SCOREQ_LIVE_TOKEN"
DEFAULT_WS_PORT = 8765
DEFAULT_HTTP_PORT = 8080


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
    than a feed needs over a 200 ms round trip.
    """

    def __init__(self, hub: FeedHub, ws: Listen | None = None, http: Listen | None = None, *,
                 ws_required: bool = True, token: str | None = None, allowed_origins: Iterable[str] = (),
                 max_clients: int = 256, max_message_bytes: int = 16 * 1024, panel_dir: Path = PANEL_DIR,
                 metrics: Metrics | None = None, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0, send_buffer_bytes: int = 256 * 1024,
                 notify: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ws is None and http is None:
            raise ServeError("nothing to serve: no websocket and no HTTP address")
        exposed = [str(a) for a in (ws, http) if a is not None and not a.loopback]
        if exposed and not token:
            raise ServeError(f"listening on {', '.join(exposed)} (beyond this machine) needs a token: "
                             f"--token TOKEN or the environment variable {TOKEN_ENV}")
        self.hub = hub
        self.ws_listen, self.http_listen = ws, http
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
        self.ws_address: Listen | None = None  # where it listens, once started (port 0 resolved)
        self.http_address: Listen | None = None
        self._servers: list[Server] = []
        self._conns: dict[FeedClient, ServerConnection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (before any stream starts, so a busy port is an error up front)."""
        try:
            if self.ws_listen is not None:
                try:
                    srv = await self._serve(self.ws_listen, http=False)
                    self.ws_address = self._bound(srv, self.ws_listen)
                    self.policy = replace(self.policy, ws=self.ws_address)
                    self.notify(f"feed: ws://{self.ws_address}/")
                except OSError as e:
                    if self.ws_required:
                        raise ServeError(f"cannot listen on {self.ws_listen} for --ws: {e.strerror or e}") from e
                    self.notify(f"feed: not serving websockets on {self.ws_listen} ({e.strerror or e}); "
                                "choose another with --ws HOST:PORT")
            if self.http_listen is not None:
                try:
                    srv = await self._serve(self.http_listen, http=True)
                except OSError as e:
                    raise ServeError(f"cannot listen on {self.http_listen} for --http: {e.strerror or e}") from e
                self.http_address = self._bound(srv, self.http_listen)
                self.policy = replace(self.policy, http=self.http_address, panel_port=self.http_address.port)
                self.notify(f"panel: http://{self.http_address}/  (metrics: /metrics, feed: /ws)")
        except BaseException:
            await self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep(), name="feed-stall-sweeper")

    async def _serve(self, where: Listen, http: bool) -> Server:
        srv = await serve(
            self._handle, where.host, where.port,
            process_request=self._http_request if http else self._ws_request,
            compression=None,  # per-client deflate would multiply CPU by the client count; frames are small
            max_size=self.max_message_bytes,
            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
            close_timeout=2.0,
            server_header=f"scoreq-live/{__version__}",
            create_connection=_FeedConnection,
        )
        self._servers.append(srv)
        return srv

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
        for srv in self._servers:
            srv.close()
        waits = [srv.wait_closed() for srv in self._servers]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), 3.0)
            except asyncio.TimeoutError:
                for ws in list(self._conns.values()):
                    ws.transport.abort()
                await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in self._servers),
                                                      return_exceptions=True), 3.0)
        self._servers.clear()

    # -- HTTP: the policy decides, before any upgrade ---------------------------------

    def _ws_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return self.policy.ws_request(HttpRequest.of(request), clients=len(self.hub.clients))

    def _http_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return self.policy.http_request(HttpRequest.of(request), clients=len(self.hub.clients), metrics=self.metrics)

    # -- websocket clients ---------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake is done: the library parsed the request
        streams = subscription(parse_qs(urlsplit(ws.request.path).query))  # checked before the upgrade
        max_clients = self.policy.max_clients
        if len(self.hub.clients) >= max_clients:  # several handshakes raced past the HTTP check
            await ws.close(CloseCode.TRY_AGAIN_LATER, f"too many clients (at most {max_clients})")
            return
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and self.send_buffer_bytes:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
            except OSError:
                pass
        client = self.hub.connect(streams, self.clock())
        wake = asyncio.Event()
        client.on_ready = wake.set
        wake.set()
        self._conns[client] = ws
        reader = asyncio.create_task(self._read(ws, client))
        try:
            while True:
                await wake.wait()
                wake.clear()
                if client.closed:
                    break
                await _send_frames(ws, client.take(self.clock()))
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()
            self._conns.pop(client, None)
            self.hub.disconnect(client)

    async def _read(self, ws: ServerConnection, client: FeedClient) -> None:
        try:
            async for msg in ws:
                self.hub.handle_message(client, msg, self.clock())
        except ConnectionClosed:
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
                ws = self._conns.get(client)
                if ws is not None:
                    t = asyncio.create_task(self._cut(ws, f"stalled for more than {self.hub.stall_s:g}s"))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _cut(ws: ServerConnection, reason: str) -> None:
        try:  # say why if its buffer has room; a client that reads nothing cannot complete the close
            await asyncio.wait_for(ws.close(CloseCode.POLICY_VIOLATION, reason), 2.0)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            ws.transport.abort()
