"""An HTTP site: one listen address, one aiohttp application, and the policy its routes share.

A site owns what every route on it shares: the socket (bound in
:meth:`HttpSite.start`, released in :meth:`HttpSite.close`), the limits on a
request (the size of its body, how long one may still run once the site
stops), the headers of every response (the server's name, never cached, never
sniffed), how long a connection may take to send a request's head
(:data:`IDLE_TIMEOUT_S`: slow and idle connections are closed), and the rules
of :class:`~scoreq_live.http.policy.SitePolicy`: the ``Host`` of every
request is checked before any route sees it (DNS rebinding), a header sent
twice that a check reads is refused, and a request no route takes gets the
policy's 404 or 405.  A malformed request gets 400 and one debug line in the
log, never a traceback.  :func:`serving` runs sites as a server process
should: its open-file limit raised (:mod:`scoreq_live.http.limits`), and
failed accepts said once in a while, not once per connection.  The routes
themselves come from parts (:class:`Routes`), each adding its own, the way
aiohttp applications nest sub-applications: the feed's ``/ws``
(:mod:`scoreq_live.sinks.server`), the panel's files and ``/metrics``
(:mod:`scoreq_live.http.routes`), WHIP and ``/media``
(:mod:`scoreq_live.ingest.http`).  Each route then takes what it
needs of the policy (the token, the ``Origin``) and decides in the sans-I/O
policy modules; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import InvalidHeader
from websockets.http11 import Response

from scoreq_live import __version__
from scoreq_live.http.limits import quiet_accept_errors, raise_open_files
from scoreq_live.http.policy import HttpRequest, Listen, ServeError, SitePolicy, check_exposed, response, unrouted

__all__ = ["BODY_TIMEOUT_S", "DEFAULT_HTTP_PORT", "IDLE_TIMEOUT_S", "SERVER", "HttpSite", "Routes", "policy_request",
           "read_body", "serving", "web_response"]

log = logging.getLogger(__name__)
_requests_log = log.getChild("requests")  # aiohttp's own messages about a site's connections

DEFAULT_HTTP_PORT = 8080
SERVER = f"scoreq-live/{__version__}"
MAX_REQUEST_BODY = 1024 * 1024  # aiohttp's client_max_size; routes enforce smaller limits of their own
_SHUTDOWN_S = 2.0  # requests still running when a site stops get this long, then are cancelled
# A connection must send a complete request head within this long of opening, and of the end of its previous
# response (keep-alive), or it is closed: slow headers (slowloris) and idle connections hold no file for long.
# A request being answered (a websocket, a WHIP offer) is not timed by it.
IDLE_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0  # a request body a route reads (a WHIP offer) must have come whole within this long
_LINGER_S = 2.0  # after an answer given before the body came whole, the rest is read (and dropped) this long


class Routes(Protocol):
    """A part of a site: the routes it serves (the feed, the panel, ``/metrics``, WHIP, ``/media``...).

    ``add_routes`` is called once, before the site starts: it adds the part's
    routes to ``site.router`` and reads ``site.policy`` (token, origins) for
    its own checks.  ``listening`` is called once the site is bound
    (``site.address``): a line telling the user where the routes are, or None.
    """

    def add_routes(self, site: HttpSite) -> None: ...

    def listening(self, site: HttpSite) -> str | None: ...


# --- aiohttp <-> the policy's sans-I/O types ------------------------------------------------------------


def _as_sent(value: str) -> str:
    """A header value as its bytes (which aiohttp decodes as UTF-8, undecodable bytes escaped), one char each.

    HTTP allows any byte from 0x80 in a value (obs-text); the policy compares values as they were sent.
    """
    return value if value.isascii() else value.encode("utf-8", "surrogateescape").decode("latin-1")


def policy_request(request: web.BaseRequest) -> HttpRequest:
    """An aiohttp request as the policy reads it: method, path with its query as sent, headers."""
    return HttpRequest(request.method, request.raw_path,
                       Headers([(k, _as_sent(v)) for k, v in request.headers.items()]))


def web_response(r: Response) -> web.Response:
    """A response the policy decided, as an aiohttp response (aiohttp decides whether the connection stays)."""
    headers = [(k, v) for k, v in r.headers.raw_items() if k.lower() != "connection"]
    # The policy's Content-Length is the body's a GET gets, HEAD included: aiohttp keeps it and sends no body.
    return web.Response(status=r.status_code, reason=r.reason_phrase, body=bytes(r.body), headers=headers)


async def read_body(request: web.BaseRequest, limit: int, timeout_s: float) -> bytes:
    """The request's body, whole, or its first ``limit`` + 1 bytes when it is longer (the route refuses it).

    Raises :class:`asyncio.TimeoutError` when it has not come within ``timeout_s`` (a client sending it
    slowly, or announcing more than it sends).
    """
    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = await request.content.readany()
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)[:limit + 1]

    return await asyncio.wait_for(read(), timeout_s)


async def _server_header(request: web.Request, resp: web.StreamResponse) -> None:
    """Every response of a site names the monitor, not the library; never cached nor sniffed."""
    resp.headers["Server"] = SERVER
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Cache-Control", "no-store")


class _MalformedRequests(logging.Filter):
    """aiohttp logs each request it cannot parse (answered 400) with a traceback: one debug line instead.

    A scanner or a broken client is not the monitor's error; an exception in a route still logs its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        log.debug("malformed request from %s answered %s: %s", peer, exc.code, exc.message or type(exc).__name__)
        return False


_requests_log.addFilter(_MalformedRequests())


# --- the site --------------------------------------------------------------------------------------------


class HttpSite:
    """One HTTP listener (``listen``) and the routes its parts add (:meth:`add`), under one ``policy``.

    ``flag``: the option that asked for it, named when its address cannot be
    used.  Listening beyond loopback needs a token (:class:`ServeError` here,
    before anything listens).  ``idle_timeout_s``: how long a connection may
    take to send a complete request head, from its opening and from the end of
    its previous response; then it is closed.  ``body_timeout_s``: how long a
    route waits for a body it reads (:func:`read_body`).
    """

    def __init__(self, listen: Listen, policy: SitePolicy | None = None, *, flag: str = "--http",
                 notify: Callable[[str], None] | None = None, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.policy = policy or SitePolicy()
        check_exposed([listen], self.policy.token)
        if not (idle_timeout_s > 0 and body_timeout_s > 0):
            raise ValueError(f"timeouts must be positive (got {idle_timeout_s}, {body_timeout_s})")
        self.listen = listen
        self.flag = flag
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s
        self.notify = notify or (lambda line: None)
        self.app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=[self._checked])
        self.app.on_response_prepare.append(_server_header)
        self.parts: list[Routes] = []
        self.address: Listen | None = None  # where it listens, once started (port 0 resolved)
        self._runner: web.AppRunner | None = None

    @property
    def router(self) -> web.UrlDispatcher:
        return self.app.router

    def add(self, *parts: Routes) -> HttpSite:
        """Add each part's routes (before :meth:`start`); the site, for chaining."""
        for part in parts:
            part.add_routes(self)
            self.parts.append(part)
        return self

    def serves(self, path: str) -> bool:
        """Whether a part added a route for exactly ``path``."""
        return any(r.canonical == path for r in self.router.resources())

    async def start(self) -> None:
        """Listen; a busy address is a :class:`ServeError` naming the flag."""
        # Last, and matched after every route of the parts: whatever no route takes, the policy answers.
        self.router.add_route("*", "/{path:.*}", self._unrouted)
        # aiohttp's keep-alive timer runs from a connection's opening and from each response, and closes the
        # connection if no complete request head has come by then: the head timeout and the idle one.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=_SHUTDOWN_S,
                               keepalive_timeout=self.idle_timeout_s, lingering_time=_LINGER_S,
                               logger=_requests_log)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, self.listen.host, self.listen.port).start()
        except OSError as e:
            await self.close()
            raise ServeError(f"cannot listen on {self.listen} for {self.flag}: {e.strerror or e}") from e
        addresses = runner.addresses
        self.address = Listen(self.listen.host, addresses[0][1] if addresses else self.listen.port)
        for part in self.parts:
            if (line := part.listening(self)) is not None:
                self.notify(line)

    async def close(self) -> None:
        """Stop listening; requests still running get a little while (``on_shutdown`` hooks run first)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request, routed or not: the Host first (DNS rebinding), then its route."""
        try:
            refused = self.policy.check_host(policy_request(request), self.listen)
            if refused is not None:
                return web_response(refused)
            return await handler(request)
        except MultipleValuesError as e:  # e.g. two Origin or Authorization headers: no guessing which counts
            return web_response(response(400, f"header {e} given more than once\n"))
        except InvalidHeader as e:  # a value HTTP does not allow (aiohttp lets some through)
            return web_response(response(400, f"{e}\n"))

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        return web_response(unrouted(policy_request(request)))


@contextlib.asynccontextmanager
async def serving(sites: Sequence[HttpSite]) -> AsyncIterator[None]:
    """Every site listening inside the block (all or none: a busy address closes the others); closed after.

    As a server process: the open-file limit is raised first (the first site's ``notify`` says how many
    connections that holds), and within the block failed accepts are logged once in a while, not each.
    """
    files = raise_open_files()
    with quiet_accept_errors():
        try:
            for site in sites:
                await site.start()
            if sites and files is not None:
                sites[0].notify(files.describe())
            yield
        finally:
            results = await asyncio.gather(*(s.close() for s in sites), return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    log.warning("closing an HTTP site: %s", r, exc_info=r)
