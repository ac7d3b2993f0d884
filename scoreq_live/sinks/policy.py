"""What the feed answers to a request before a websocket upgrade, decided without any I/O on sockets.

The feed is served two ways (:mod:`scoreq_live.sinks.server`): on its own
websocket listener (``--ws``, the websockets library, which calls
:meth:`FeedPolicy.ws_request` from its ``process_request`` hook) and at
``/ws`` on an HTTP site (:meth:`FeedPolicy.feed_request`, after the site's
own Host check).  The checks every site shares (Host, token, Origin) are
:class:`~scoreq_live.http.policy.SitePolicy`'s; the feed adds its own:
``?streams=`` and the client count.  A request goes in with the number of
connected clients, and either a finished HTTP response comes out or None: go
on with the websocket handshake.  Every check happens before the upgrade, so
a refusal is an ordinary HTTP status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from websockets.http11 import Response

from scoreq_live.http.policy import HttpRequest, Listen, SitePolicy, only_get, response
from scoreq_live.sinks.feed import SubscriptionError, parse_streams

__all__ = ["PANEL_DIR", "FeedPolicy", "not_upgraded", "subscription"]

#: The browser panel's files, served by a site's :class:`~scoreq_live.http.routes.PanelRoutes`.
PANEL_DIR = Path(__file__).resolve().parent / "panel"


def not_upgraded(request: HttpRequest) -> Response:
    """The answer to a request for the feed that passed every check but is no websocket handshake.

    405 for methods other than GET and HEAD, else 426 (the server found no
    ``Upgrade: websocket``; HEAD never upgrades).
    """
    return only_get(request) or response(426, "this is the websocket feed: connect with a websocket client\n",
                                         headers={"Upgrade": "websocket"}, head=request.method == "HEAD")


def subscription(query: Mapping[str, list[str]]) -> frozenset[str] | None:
    """The streams a client asks for with ``?streams=`` (None: all); raises SubscriptionError."""
    return parse_streams(",".join(query.get("streams", [])) or None)


@dataclass(frozen=True)
class FeedPolicy(SitePolicy):
    """The feed's settings (the site's token and origins, and its own), and its decisions before an upgrade.

    ``max_clients``: websocket clients at once, on every listener together.
    ``ws``: where the standalone websocket listener listens (as asked, then as
    bound; only its host matters here).  ``panel_port``: the port of the site
    that serves the panel, once it is bound: the standalone feed accepts the
    panel's pages from that port on the same host name.
    """

    max_clients: int = 256
    ws: Listen | None = None
    panel_port: int | None = None

    @classmethod
    def under(cls, site: SitePolicy, max_clients: int, ws: Listen | None = None) -> FeedPolicy:
        """The feed's policy under a site's (its token and origins)."""
        return cls(token=site.token, allowed_origins=site.allowed_origins, max_clients=max_clients, ws=ws)

    def ws_request(self, request: HttpRequest, clients: int) -> Response | None:
        """The standalone websocket listener (``--ws``): a refusal, or None to go on with the handshake.

        Any path is the feed.  ``clients``: how many websocket clients are connected now.
        """
        return self.check_host(request, self.ws) or self.feed_request(request, clients, http=False)

    def feed_request(self, request: HttpRequest, clients: int, http: bool) -> Response | None:
        """The checks for the feed itself (Origin, token, ``?streams=``, client count) after the Host check.

        ``http``: asked at ``/ws`` on a site, else on the standalone listener.
        """
        query = request.query
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.headers.get("Host"), http,
                                                          self.panel_port):
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
