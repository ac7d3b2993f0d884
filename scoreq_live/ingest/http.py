"""The HTTP side of the ingest endpoints: WHIP (``/whip``) and media-stream websockets (``/media``).

:class:`IngestRoutes` is a part (:class:`~scoreq_live.http.site.Routes`) of
an HTTP site: the ``--http`` site, beside the panel, or a site of its own
(``--whip``).  The same rules as for the feed apply, decided by the site's
:class:`~scoreq_live.http.policy.SitePolicy`: a loopback site answers to
loopback names only (DNS rebinding; the site checks that before any route),
a token is required when one is set
(``Authorization: Bearer``, the way RFC 9725 authenticates WHIP clients, or
``?token=``), and a browser page may publish only from the panel's own origin
or an ``--allowed-origin``; the CORS preflight (``OPTIONS``) says so to the
browser.  WHIP per RFC 9725: ``POST /whip`` with ``Content-Type:
application/sdp`` answers ``201 Created`` with the SDP answer and the
session's ``Location``; ``DELETE`` on it ends the session; ``PATCH`` (trickle
ICE, ICE restart) is not supported (``501``): clients send their candidates
in the offer, as browsers do once gathering completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from aiohttp import web

from scoreq_live.http.policy import SitePolicy
from scoreq_live.http.site import HttpSite, policy_request, read_body, web_response
from scoreq_live.ingest.whip import WhipError, WhipIngest
from scoreq_live.sources.base import StreamSet

__all__ = ["IngestRoutes", "MediaEndpoint"]

SDP = "application/sdp"
_CORS_MAX_AGE = "600"


class MediaEndpoint(Protocol):
    """What ``/media`` needs of the media-stream ingest: accept one websocket connection."""

    async def accept(self, request: web.Request) -> web.StreamResponse: ...


def _reply(status: int, text: str = "", headers: Mapping[str, str] | None = None) -> web.Response:
    """A plain-text answer (the server adds its name and the no-store, nosniff headers to every response)."""
    if text and not text.endswith("\n"):
        text += "\n"
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8", headers=headers)


class IngestRoutes:
    """``/whip`` (and ``/whip/{session}``) for :class:`WhipIngest`; ``/media`` for the media-stream ingest."""

    def __init__(self, whip: WhipIngest | None, media: MediaEndpoint | None = None) -> None:
        self.whip = whip
        self.media = media

    @property
    def inputs(self) -> list[StreamSet]:
        """The endpoints as the engine's inputs (stream sets whose streams are the publishers)."""
        return [i for i in (self.whip, self.media) if isinstance(i, StreamSet)]

    def add_routes(self, site: HttpSite) -> None:
        """Add the ingest routes to ``site``, whose policy decides access (the site has checked the Host)."""
        policy = site.policy
        if self.whip is not None:
            endpoint = _WhipEndpoint(self.whip, policy, site.body_timeout_s)
            site.router.add_route("*", "/whip", endpoint.collection)
            site.router.add_route("*", "/whip/{session}", endpoint.resource)
        if self.media is not None:
            media = self.media

            async def media_route(request: web.Request) -> web.StreamResponse:
                refused = _check(request, policy, cors=False)
                if refused is not None:
                    return refused
                return await media.accept(request)

            site.router.add_get("/media", media_route)

    def listening(self, site: HttpSite) -> str | None:
        """``publish: ...``: where publishers send their streams on ``site``."""
        parts = []
        if self.whip is not None:
            parts.append(f"http://{site.address}/whip (WHIP)")
        if self.media is not None:
            parts.append(f"ws://{site.address}/media (media streams)")
        return "publish: " + ", ".join(parts) if parts else None


def _check(request: web.Request, policy: SitePolicy, cors: bool) -> web.Response | None:
    """Origin and token, in that order (the site checked the Host first); a refusal or None."""
    req = policy_request(request)
    origin = request.headers.get("Origin")
    if origin is not None and not policy.origin_allowed(origin, request.headers.get("Host"), http=True):
        return _reply(403, f"origin {origin!r} may not publish here; add it with --allowed-origin")
    refused = policy.check_token(req, {k: request.query.getall(k) for k in request.query})
    if refused is not None:
        resp = web_response(refused)
        if cors and origin is not None:
            resp.headers.update(_cors(origin))
        return resp
    return None


def _cors(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": "Location, Link, ETag, Accept-Patch, Retry-After"}


class _WhipEndpoint:
    def __init__(self, whip: WhipIngest, policy: SitePolicy, body_timeout_s: float):
        self.whip = whip
        self.policy = policy
        self.body_timeout_s = body_timeout_s

    def _preflight(self, request: web.Request, methods: str) -> web.Response:
        headers = {"Allow": methods}
        if request.path == "/whip":
            headers["Accept-Post"] = SDP
        origin = request.headers.get("Origin")
        if origin is not None:
            if not self.policy.origin_allowed(origin, request.headers.get("Host"), http=True):
                return _reply(403, f"origin {origin!r} may not publish here; add it with --allowed-origin")
            headers.update(_cors(origin))
            headers["Access-Control-Allow-Methods"] = methods
            headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, If-Match"
            headers["Access-Control-Max-Age"] = _CORS_MAX_AGE
        return web.Response(status=204, headers=headers)

    async def collection(self, request: web.Request) -> web.StreamResponse:
        """``/whip``: OPTIONS (preflight) and POST (a new session)."""
        if request.method == "OPTIONS":
            return self._preflight(request, "POST, OPTIONS")
        if request.method != "POST":
            return _reply(405, "POST an SDP offer here (WHIP)", {"Allow": "POST, OPTIONS"})
        refused = _check(request, self.policy, cors=True)
        if refused is not None:
            return refused
        origin = request.headers.get("Origin")
        cors = _cors(origin) if origin is not None else {}
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != SDP:
            return _reply(415, f"the body must be an SDP offer with Content-Type: {SDP} (got {ctype or 'none'!r})",
                          {"Accept-Post": SDP, **cors})
        limit = self.whip.settings.max_offer_bytes
        if request.content_length is not None and request.content_length > limit:
            return _reply(413, f"the offer is larger than {limit} bytes", cors)
        try:
            body = await read_body(request, limit, self.body_timeout_s)
        except asyncio.TimeoutError:
            resp = _reply(408, f"the offer did not arrive within {self.body_timeout_s:g} s", cors)
            resp.force_close()
            return resp
        if len(body) > limit:
            return _reply(413, f"the offer is larger than {limit} bytes", cors)
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            return _reply(400, "the offer is not UTF-8 text", cors)
        if not sdp.lstrip().startswith("v=0"):
            return _reply(400, "the body is not an SDP offer (it must start with v=0)", cors)
        peer = request.remote or ""
        try:
            session, answer = await self.whip.offer(sdp, request.query.get("stream"), peer=peer,
                                                    call=request.query.get("call"))
        except WhipError as e:
            return _reply(e.status, str(e), {**e.headers, **cors})
        location = f"/whip/{session.id}"
        headers = {"Location": location, "ETag": f'"{session.id}"', **cors}
        return web.Response(status=201, text=answer, content_type=SDP, headers=headers)

    async def resource(self, request: web.Request) -> web.StreamResponse:
        """``/whip/{session}``: DELETE ends it; PATCH is not supported; OPTIONS (preflight)."""
        methods = "DELETE, PATCH, OPTIONS"
        if request.method == "OPTIONS":
            return self._preflight(request, methods)
        if request.method not in ("DELETE", "PATCH"):
            return _reply(405, "DELETE ends the session", {"Allow": methods})
        refused = _check(request, self.policy, cors=True)
        if refused is not None:
            return refused
        origin = request.headers.get("Origin")
        cors = _cors(origin) if origin is not None else {}
        sid = request.match_info["session"]
        if request.method == "PATCH":
            if sid not in self.whip.sessions:
                return _reply(404, "no such WHIP session", cors)
            return _reply(501, "trickle ICE and ICE restarts are not supported: send every candidate in the offer",
                          cors)
        if not await self.whip.delete(sid):
            return _reply(404, "no such WHIP session (it has ended or never existed)", cors)
        return _reply(200, "session ended", cors)
