"""The live feed over the network: websockets (``--ws``) and HTTP (``--http``).

A thin I/O layer around :class:`scoreq_live.sinks.feed.FeedHub`: it pumps the
event bus into the hub and, per websocket client, the frames the hub has for
it into the socket.  Both servers are the ``websockets`` library's asyncio
server; the HTTP one answers plain GET requests from ``process_request``
(the panel's static files, ``/metrics``) and upgrades ``/ws`` to the same
feed.  Every check (Host, Origin, token, client count) happens before the
upgrade, so a refusal is an ordinary HTTP status.
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import ipaddress
import logging
import mimetypes
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from scoreq_live import __version__
from scoreq_live.bus import Subscription
from scoreq_live.sinks.feed import FeedClient, FeedHub, SubscriptionError, parse_streams

log = logging.getLogger(__name__)

PANEL_DIR = Path(__file__).resolve().parent / "panel"
TOKEN_ENV = "SCOREQ_LIVE_TOKEN"
DEFAULT_WS_PORT = 8765
DEFAULT_HTTP_PORT = 8080
LOOPBACK_NAMES = {"localhost"}

_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".txt": "text/plain; charset=utf-8",
}


class _FeedConnection(ServerConnection):
    """A server connection that writes a burst of queued frames with one system call.

    The library writes each frame with its own ``transport.write`` (a ``send()``
    each); for a feed fanned out to hundreds of clients that system call is
    the largest cost per frame.  Only the coalescing differs from the
    library's own ``send_data``; if a later version no longer calls this
    method, frames simply go out one by one again.
    """

    def send_data(self) -> None:
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


class ServeError(Exception):
    """The feed cannot be served as asked (address in use, no token for a public address, ...)."""


@dataclass(frozen=True)
class Listen:
    """A ``HOST:PORT`` to listen on; port 0 picks a free one."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Reachable from this machine only."""
        return _is_loopback(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str, default_port: int) -> Listen:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1), or ``HOST`` (default port)."""
    t = text.strip()
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif t.count(":") == 1:
        host, port = t.split(":")
    elif t.isdigit():
        host, port = "", t
    else:
        host, port = t, ""
    try:
        p = int(port) if port else default_port
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise ServeError(f"cannot read listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{default_port}")
    return Listen(host or "127.0.0.1", p)


def _host_name(host_header: str) -> str:
    """The name part of a ``Host`` header (``[::1]:80`` -> ``::1``)."""
    h = host_header.strip()
    if h.startswith("["):
        return h[1:].partition("]")[0]
    return h.rpartition(":")[0] if h.count(":") == 1 else h


def _origin(value: str) -> str:
    """An origin normalised for comparison: lower case, no trailing slash."""
    return value.strip().rstrip("/").lower()


def static_file(root: Path, rel: str) -> Path | None:
    """The file ``rel`` (URL path, %-encoded) under ``root``, or None: no dot-files, no way out, no folders."""
    rel = unquote(rel)
    if "\x00" in rel or "\\" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    base = root.resolve()
    try:
        path = base.joinpath(*parts).resolve()  # resolves symlinks too, so none can point outside
        path.relative_to(base)
    except (ValueError, OSError):
        return None
    return path if path.is_file() else None


def content_type(path: Path) -> str:
    """The Content-Type for a panel file (UTF-8 for text)."""
    t = _TYPES.get(path.suffix.lower())
    if t is None:
        t = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return t


def _response(status: int, body: bytes | str, ctype: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None, head: bool = False) -> Response:
    if isinstance(body, str):
        body = body.encode()
    h = Headers()
    h["Date"] = email.utils.formatdate(usegmt=True)
    h["Connection"] = "close"
    h["Content-Type"] = ctype
    h["Content-Length"] = str(len(body))
    h["X-Content-Type-Options"] = "nosniff"
    h["Cache-Control"] = "no-store"
    for k, v in (headers or {}).items():
        h[k] = v
    return Response(status, HTTPStatus(status).phrase, h, b"" if head else body)


class FeedServer:
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
                 metrics: Callable[[], tuple[bytes, str]] | None = None, ping_interval: float = 20.0,
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
        self.token = token or None
        self.allowed_origins = {_origin(o) for o in allowed_origins}
        self.max_clients = max_clients
        self.max_message_bytes = max_message_bytes
        self.panel_dir = Path(panel_dir)
        self.metrics = metrics
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.send_buffer_bytes = send_buffer_bytes
        self.notify = notify or (lambda line: None)
        self.clock = clock
        self.ws_address: Listen | None = None  # where it listens, once started (port 0 resolved)
        self.http_address: Listen | None = None
        self._servers: list[Server] = []
        self._conns: dict[FeedClient, ServerConnection] = {}
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (before any stream starts, so a busy port is an error up front)."""
        try:
            if self.ws_listen is not None:
                try:
                    srv = await self._serve(self.ws_listen, http=False)
                    self.ws_address = self._bound(srv, self.ws_listen)
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

    # -- HTTP: every check happens here, before any upgrade ------------------------

    def _check_host(self, request: Request, where: Listen) -> Response | None:
        # A loopback server only answers to loopback names (and allowed origins' hosts): a web page
        # whose own name re-resolves to 127.0.0.1 (DNS rebinding) must not read the feed or metrics.
        if not where.loopback:
            return None
        host = request.headers.get("Host")
        if host is None:
            return None
        name = _host_name(host).lower()
        if _is_loopback(name) or name in {_host_name(urlsplit(o).netloc) for o in self.allowed_origins}:
            return None
        return _response(403, f"host {host!r} is not served here; use 127.0.0.1 or localhost, or list the "
                              "page's origin with --allowed-origin\n")

    def _check_token(self, request: Request, query: dict[str, list[str]]) -> Response | None:
        if self.token is None:
            return None
        given = None
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif query.get("token"):
            given = query["token"][0]
        if given is None:
            return _response(401, "a token is required: 'Authorization: Bearer TOKEN' header or ?token=TOKEN\n",
                             headers={"WWW-Authenticate": 'Bearer realm="scoreq-live"'})
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return _response(401, "wrong token\n",
                             headers={"WWW-Authenticate": 'Bearer realm="scoreq-live", error="invalid_token"'})
        return None

    def _origin_allowed(self, origin: str, host: str | None, http: bool) -> bool:
        o = _origin(origin)
        if "*" in self.allowed_origins or o in self.allowed_origins:
            return True
        if host is None:
            return False
        netloc = urlsplit(o).netloc
        if http:  # the panel this server serves connects from its own origin
            return netloc == host.lower()
        if self.http_address is not None:  # the standalone feed: the panel on the same host name
            return netloc == f"{_host_name(host).lower()}:{self.http_address.port}" or (
                ":" in _host_name(host) and netloc == f"[{_host_name(host).lower()}]:{self.http_address.port}")
        return False

    def _feed_request(self, request: Request, query: dict[str, list[str]], http: bool) -> Response | None:
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host"), http):
            return _response(403, f"origin {origin!r} is not allowed; add it with --allowed-origin\n")
        refused = self._check_token(request, query)
        if refused is not None:
            return refused
        try:
            parse_streams(",".join(query.get("streams", [])) or None)
        except SubscriptionError as e:
            return _response(400, f"bad ?streams=: {e}\n")
        if len(self.hub.clients) >= self.max_clients:
            return _response(503, f"too many clients (at most {self.max_clients}); try again later\n",
                             headers={"Retry-After": "5"})
        return None  # go on with the websocket handshake (which refuses non-upgrade requests with 426)

    def _ws_request(self, connection: ServerConnection, request: Request) -> Response | None:
        refused = self._check_host(request, self.ws_address or self.ws_listen)
        if refused is not None:
            return refused
        return self._feed_request(request, parse_qs(urlsplit(request.path).query), http=False)

    def _http_request(self, connection: ServerConnection, request: Request) -> Response | None:
        refused = self._check_host(request, self.http_address or self.http_listen)
        if refused is not None:
            return refused
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == "/ws":
            return self._feed_request(request, query, http=True)
        method = getattr(request, "method", "GET")  # websockets < 15 parses GET only
        if method not in ("GET", "HEAD"):
            return _response(405, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
        head = method == "HEAD"
        if url.path == "/metrics":
            refused = self._check_token(request, query)
            if refused is not None:
                return refused
            if self.metrics is None:
                return _response(404, "no metrics here\n", head=head)
            body, ctype = self.metrics()
            return _response(200, body, ctype, head=head)
        if url.path in ("/", "/index.html"):
            path = static_file(self.panel_dir, "index.html")
            extra = {"Referrer-Policy": "no-referrer"}  # a ?token= in the page URL must not leak
        elif url.path.startswith("/static/"):
            path = static_file(self.panel_dir, url.path[len("/static/"):])
            extra = {}
        else:
            return _response(404, "not found\n", head=head)
        if path is None:
            return _response(404, "not found\n", head=head)
        try:
            body = path.read_bytes()
        except OSError:
            return _response(404, "not found\n", head=head)
        return _response(200, body, content_type(path), headers=extra, head=head)

    # -- websocket clients ---------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        if len(self.hub.clients) >= self.max_clients:  # several handshakes raced past the HTTP check
            await ws.close(CloseCode.TRY_AGAIN_LATER, f"too many clients (at most {self.max_clients})")
            return
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and self.send_buffer_bytes:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
            except OSError:
                pass
        client = self.hub.connect(parse_streams(",".join(query.get("streams", [])) or None), self.clock())
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
