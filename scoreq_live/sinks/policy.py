"""What the feed's servers answer to a request, decided without any I/O on sockets.

The feed's two servers (:mod:`scoreq_live.sinks.server`) call into this module,
the websockets server (``--ws``) from its ``process_request`` hook, the aiohttp
server (``--http``) from its request handler, the way the websockets library
keeps its own handshake checks in a sans-I/O layer: a request goes in (method,
path, headers), together with the server's settings (:class:`FeedPolicy`) and
the little live state a decision needs (the number of connected clients, the
metrics), and either a finished HTTP :class:`~websockets.http11.Response` comes
out (the aiohttp server converts it), or None: go on with the websocket handshake.  Nothing here touches a socket
or an event loop, so every refusal and every acceptance is testable with plain
data; the only I/O is reading the panel's own files from disk.

Every check happens before the upgrade, so a refusal is an ordinary HTTP status.
"""

from __future__ import annotations

import email.utils
import hmac
import ipaddress
import mimetypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.sinks.feed import SubscriptionError, parse_streams

__all__ = [
    "PANEL_DIR", "FeedPolicy", "HttpRequest", "Listen", "Metrics", "ServeError", "content_type", "parse_listen",
    "not_upgraded", "response", "static_file", "subscription",
]

PANEL_DIR = Path(__file__).resolve().parent / "panel"
LOOPBACK_NAMES = frozenset({"localhost"})

# The panel's file types, text ones in UTF-8; anything else goes by mimetypes.
_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".txt": "text/plain; charset=utf-8",
}

#: What ``/metrics`` serves: a callable returning ``(body, content_type)``, called per scrape.
Metrics = Callable[[], tuple[bytes, str]]


class ServeError(ScoreqLiveError):
    """The feed cannot be served as asked (address in use, no token for a public address, ...)."""


# --- listen addresses -----------------------------------------------------------------------------


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
        raise ServeError(
            f"cannot read listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{default_port}") from None
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


# --- the panel's files ------------------------------------------------------------------------------


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


# --- requests and responses -------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """What a decision needs from a request: method, path (with its query, as sent) and headers."""

    method: str
    path: str
    headers: Headers = field(default_factory=Headers)

    @classmethod
    def of(cls, request: Request) -> HttpRequest:
        """The websockets library's parsed request (before version 17 it parses GET only and has no method)."""
        return cls(getattr(request, "method", "GET"), request.path, request.headers)

    @classmethod
    def build(cls, path: str, headers: Mapping[str, str] | None = None, method: str = "GET") -> HttpRequest:
        """A request from plain values (tests, tools)."""
        return cls(method, path, Headers(headers or {}))


def response(status: int, body: bytes | str, ctype: str = "text/plain; charset=utf-8",
             headers: Mapping[str, str] | None = None, head: bool = False) -> Response:
    """A complete HTTP response: never cached, never sniffed, connection closed; no body for HEAD.

    ``Connection: close`` is for the websockets server, which closes after any
    plain HTTP answer; the aiohttp server leaves it out and keeps connections alive.
    """
    if isinstance(body, str):
        body = body.encode()
    h = Headers()
    h["Date"] = email.utils.formatdate(usegmt=True)
    h["Connection"] = "close"
    h["Content-Type"] = ctype
    h["Content-Length"] = str(len(body))  # of the body a GET would get, HEAD included
    h["X-Content-Type-Options"] = "nosniff"
    h["Cache-Control"] = "no-store"
    for k, v in (headers or {}).items():
        h[k] = v
    return Response(status, HTTPStatus(status).phrase, h, b"" if head else body)


def not_upgraded(request: HttpRequest) -> Response:
    """The answer to a request for the feed that passed every check but is no websocket handshake.

    405 for methods other than GET and HEAD, else 426 (the server found no
    ``Upgrade: websocket``; HEAD never upgrades).
    """
    if request.method not in ("GET", "HEAD"):
        return response(405, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
    return response(426, "this is the websocket feed: connect with a websocket client\n",
                    headers={"Upgrade": "websocket"}, head=request.method == "HEAD")


def subscription(query: Mapping[str, list[str]]) -> frozenset[str] | None:
    """The streams a client asks for with ``?streams=`` (None: all); raises SubscriptionError."""
    return parse_streams(",".join(query.get("streams", [])) or None)


# --- the policy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedPolicy:
    """The feed servers' settings, and every decision taken from them before a websocket upgrade.

    ``token``: clients must present it (``Authorization: Bearer TOKEN`` or
    ``?token=TOKEN``) for the feed and ``/metrics``; None (or empty): no token.
    ``allowed_origins``: browser origins allowed besides the panel's own
    (``"*"``: any); normalised on creation.  ``max_clients``: websocket clients
    at once.  ``panel_dir``: the folder of the panel's files.  ``ws`` and
    ``http``: where the websocket and the HTTP server listen (as asked, then as
    bound; only their host matters here).  ``panel_port``: the port the HTTP
    server is bound to, once it is: the standalone websocket feed accepts the
    panel's pages from that port on the same host name.
    """

    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    max_clients: int = 256
    panel_dir: Path = PANEL_DIR
    ws: Listen | None = None
    http: Listen | None = None
    panel_port: int | None = None

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, once, so that every comparison below is plain.
        object.__setattr__(self, "token", self.token or None)
        object.__setattr__(self, "allowed_origins", frozenset(_origin(o) for o in self.allowed_origins))

    # -- the two entry points: one per server ------------------------------------------------------

    def ws_request(self, request: HttpRequest, clients: int) -> Response | None:
        """The standalone websocket server (``--ws``): a refusal, or None to go on with the handshake.

        Any path is the feed.  ``clients``: how many websocket clients are connected now.
        """
        refused = self.check_host(request, self.ws)
        if refused is not None:
            return refused
        return self.feed_request(request, clients, http=False)

    def http_request(self, request: HttpRequest, clients: int, metrics: Metrics | None = None) -> Response | None:
        """The HTTP server (``--http``): the panel, ``/metrics``, and ``/ws`` (None: go on with the handshake).

        ``clients``: how many websocket clients are connected now; ``metrics``:
        what ``/metrics`` serves (called only once the request passed every check).
        """
        refused = self.check_host(request, self.http)
        if refused is not None:
            return refused
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == "/ws":
            return self.feed_request(request, clients, http=True)
        if request.method not in ("GET", "HEAD"):
            return response(405, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
        head = request.method == "HEAD"
        if url.path == "/metrics":
            refused = self.check_token(request, query)
            if refused is not None:
                return refused
            if metrics is None:
                return response(404, "no metrics here\n", head=head)
            body, ctype = metrics()
            return response(200, body, ctype, head=head)
        # The panel's own files carry no data: they load without a token (the page passes ?token= on).
        if url.path in ("/", "/index.html"):
            path = static_file(self.panel_dir, "index.html")
            extra = {"Referrer-Policy": "no-referrer"}  # a ?token= in the page URL must not leak
        elif url.path.startswith("/static/"):
            path = static_file(self.panel_dir, url.path[len("/static/"):])
            extra = {}
        else:
            return response(404, "not found\n", head=head)
        if path is None:
            return response(404, "not found\n", head=head)
        try:
            body = path.read_bytes()
        except OSError:
            return response(404, "not found\n", head=head)
        return response(200, body, content_type(path), headers=extra, head=head)

    # -- the checks ---------------------------------------------------------------------------------

    def check_host(self, request: HttpRequest, where: Listen | None) -> Response | None:
        """403 when a loopback server (``where``) is asked for by a name that is not its own."""
        # A loopback server only answers to loopback names (and allowed origins' hosts): a web page
        # whose own name re-resolves to 127.0.0.1 (DNS rebinding) must not read the feed or metrics.
        # Without an address to go by, check as if loopback: the stricter of the two.
        if where is not None and not where.loopback:
            return None
        host = request.headers.get("Host")
        if host is None:
            return None
        name = _host_name(host).lower()
        if _is_loopback(name) or name in {_host_name(urlsplit(o).netloc) for o in self.allowed_origins}:
            return None
        return response(403, f"host {host!r} is not served here; use 127.0.0.1 or localhost, or list the "
                             "page's origin with --allowed-origin\n")

    def check_token(self, request: HttpRequest, query: Mapping[str, list[str]]) -> Response | None:
        """401 without the token or with a wrong one (compared in constant time); None when none is set."""
        if self.token is None:
            return None
        given = None
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif query.get("token"):
            given = query["token"][0]
        if given is None:
            return response(401, "a token is required: 'Authorization: Bearer TOKEN' header or ?token=TOKEN\n",
                            headers={"WWW-Authenticate": 'Bearer realm="scoreq-live"'})
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return response(401, "wrong token\n",
                            headers={"WWW-Authenticate": 'Bearer realm="scoreq-live", error="invalid_token"'})
        return None

    def origin_allowed(self, origin: str, host: str | None, http: bool) -> bool:
        """Whether a browser page from ``origin`` may read the feed asked for at ``host`` (its Host header).

        ``http``: asked on the HTTP server's ``/ws`` (the panel's own origin is
        allowed), else on the standalone websocket server (the panel's origin on
        the HTTP port, same host name, is allowed once that port is known).
        """
        o = _origin(origin)
        if "*" in self.allowed_origins or o in self.allowed_origins:
            return True
        if host is None:
            return False
        netloc = urlsplit(o).netloc
        if http:  # the panel this server serves connects from its own origin
            return netloc == host.lower()
        if self.panel_port is not None:  # the standalone feed: the panel on the same host name
            name = _host_name(host).lower()
            return netloc == f"{name}:{self.panel_port}" or (":" in name and netloc == f"[{name}]:{self.panel_port}")
        return False

    def feed_request(self, request: HttpRequest, clients: int, http: bool) -> Response | None:
        """The checks for the feed itself (Origin, token, ``?streams=``, client count) after the Host check."""
        query = parse_qs(urlsplit(request.path).query)
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("Host"), http):
            return response(403, f"origin {origin!r} is not allowed; add it with --allowed-origin\n")
        refused = self.check_token(request, query)
        if refused is not None:
            return refused
        try:
            subscription(query)
        except SubscriptionError as e:
            return response(400, f"bad ?streams=: {e}\n")
        if clients >= self.max_clients:
            return response(503, f"too many clients (at most {self.max_clients}); try again later\n",
                            headers={"Retry-After": "5"})
        return None  # go on with the websocket handshake (which refuses non-upgrade requests with 426)
