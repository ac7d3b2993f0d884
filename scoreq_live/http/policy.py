"""What an HTTP site answers to a request, decided without any I/O on sockets.

Every site (:mod:`scoreq_live.http.site`) and every route it serves decide
here, the way the websockets library keeps its own handshake checks in a
sans-I/O layer: a request goes in (method, path, headers), together with the
site's settings (:class:`SitePolicy`: the token and the browser origins
allowed) and the little live state a decision needs, and a finished HTTP
:class:`~websockets.http11.Response` comes out, or None: go on (with the
route's own work, or with a websocket handshake).  Nothing here touches a
socket or an event loop, so every refusal and every acceptance is testable
with plain data; the only I/O is reading the panel's own files from disk.

The site checks the ``Host`` of every request first (:meth:`SitePolicy.check_host`);
each route then takes what it needs: the token, the ``Origin``, its own limits.
The feed's own decisions (``?streams=``, the client count, the standalone
``--ws`` listener) are in :mod:`scoreq_live.sinks.policy`.
"""

from __future__ import annotations

import email.utils
import hmac
import ipaddress
import mimetypes
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from scoreq_live.errors import ScoreqLiveError

__all__ = [
    "PAGES", "TOKEN_ENV", "HttpRequest", "Listen", "Metrics", "ServeError", "SitePolicy", "check_exposed",
    "content_type", "files_request", "host_name", "only_get", "parse_listen", "response", "static_file", "unrouted",
]

TOKEN_ENV = "SCOREQ_LIVE_TOKEN"
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
    """Something cannot be served as asked (address in use, no token for a public address, ...)."""


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


def check_exposed(addresses: Iterable[Listen | None], token: str | None) -> None:
    """ServeError when any of ``addresses`` is beyond this machine and no token is set."""
    exposed = [str(a) for a in addresses if a is not None and not a.loopback]
    if exposed and not token:
        raise ServeError(f"listening on {', '.join(exposed)} (beyond this machine) needs a token: "
                         f"--token TOKEN or the environment variable {TOKEN_ENV}")


def host_name(host_header: str) -> str:
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

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string's values by name."""
        return parse_qs(urlsplit(self.path).query)


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


def only_get(request: HttpRequest) -> Response | None:
    """405 for methods other than GET and HEAD (which every route but the publishers' takes)."""
    if request.method not in ("GET", "HEAD"):
        return response(405, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
    return None


def unrouted(request: HttpRequest) -> Response:
    """The answer to a request no route of the site takes: 405 for methods other than GET and HEAD, else 404."""
    return only_get(request) or response(404, "not found\n", head=request.method == "HEAD")


#: The panel's pages by path: the live panel and the history of calls.
PAGES = {"/": "index.html", "/index.html": "index.html", "/history": "history.html", "/history.html": "history.html"}


def files_request(request: HttpRequest, root: Path) -> Response:
    """The panel's files from ``root``: its pages (:data:`PAGES`) and ``/static/...``, without a token.

    They carry no data: a page passes the ``?token=`` of its own address on.
    """
    refused = only_get(request)
    if refused is not None:
        return refused
    head = request.method == "HEAD"
    url = urlsplit(request.path)
    if url.path in PAGES:
        path = static_file(root, PAGES[url.path])
        extra = {"Referrer-Policy": "no-referrer"}  # a ?token= in the page URL must not leak
    elif url.path.startswith("/static/"):
        path = static_file(root, url.path[len("/static/"):])
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


# --- the policy a site's routes share ---------------------------------------------------------------


@dataclass(frozen=True)
class SitePolicy:
    """The settings every route of a site shares, and the checks taken from them.

    ``token``: clients must present it (``Authorization: Bearer TOKEN`` or
    ``?token=TOKEN``) for anything that carries data (the feed, ``/metrics``,
    publishing); None (or empty): no token.  ``allowed_origins``: browser
    origins allowed besides the panel's own (``"*"``: any); normalised on creation.
    """

    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__, once, so that every comparison below is plain.
        object.__setattr__(self, "token", self.token or None)
        object.__setattr__(self, "allowed_origins", frozenset(_origin(o) for o in self.allowed_origins))

    def check_host(self, request: HttpRequest, where: Listen | None) -> Response | None:
        """400 for a Host that cannot be a host name; 403 when a loopback server (``where``) is asked for by a
        name that is not its own."""
        host = request.headers.get("Host")
        if host is not None and (not host.isascii() or not host.isprintable() or " " in host):
            return response(400, f"the Host header {host!r} is not a host name\n")  # RFC 9112, 3.2
        # A loopback server only answers to loopback names (and allowed origins' hosts): a web page
        # whose own name re-resolves to 127.0.0.1 (DNS rebinding) must not read the feed or metrics.
        # Without an address to go by, check as if loopback: the stricter of the two.
        if where is not None and not where.loopback:
            return None
        if host is None:
            return None
        name = host_name(host).lower()
        if _is_loopback(name) or name in {host_name(urlsplit(o).netloc) for o in self.allowed_origins}:
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

    def origin_allowed(self, origin: str, host: str | None, http: bool = True, panel_port: int | None = None) -> bool:
        """Whether a browser page from ``origin`` may use what it asked for at ``host`` (its Host header).

        ``http``: asked on a site (the site's own pages are allowed: the
        panel's origin is the site's), else on the standalone websocket feed
        (``--ws``), where the panel's pages are allowed from ``panel_port`` on
        the same host name once that port is known.
        """
        if not origin.isascii():  # browsers send host names in ASCII (punycode); nothing else is echoed back
            return False
        o = _origin(origin)
        if "*" in self.allowed_origins or o in self.allowed_origins:
            return True
        if host is None:
            return False
        netloc = urlsplit(o).netloc
        if http:  # the panel this site serves uses it from its own origin
            return netloc == host.lower()
        if panel_port is not None:  # the standalone feed: the panel on the same host name
            name = host_name(host).lower()
            return netloc == f"{name}:{panel_port}" or (":" in name and netloc == f"[{name}]:{panel_port}")
        return False

    def metrics_request(self, request: HttpRequest, metrics: Metrics | None) -> Response:
        """``/metrics``: GET or HEAD, with the token; ``metrics`` is called only once every check passed."""
        refused = only_get(request) or self.check_token(request, request.query)
        if refused is not None:
            return refused
        head = request.method == "HEAD"
        if metrics is None:
            return response(404, "no metrics here\n", head=head)
        body, ctype = metrics()
        return response(200, body, ctype, head=head)
