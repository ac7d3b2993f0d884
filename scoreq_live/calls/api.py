"""``GET /api/calls`` and ``GET /api/calls/ID``: the store's call records over HTTP, as JSON.

A part of the HTTP layer (:class:`~scoreq_live.http.site.Routes`): the site's
token rules apply (as for ``/metrics``).  Queries run on a thread, each on a
connection of its own, at most :data:`MAX_QUERIES` at once (more wait), so
a client asking for much never holds up the event loop or the writer.

``/api/calls`` takes ``since`` (a duration back from now, ``1d``, or Unix
seconds), ``until`` (Unix seconds), ``below``/``above`` (the worst stream's
mean), ``stream`` (a name, ``*`` for any text), ``key``, ``limit`` (at most
:data:`MAX_LIMIT`) and ``offset``; it answers ``{"calls": [...], "total":
N, "limit": L, "offset": O, "mode": M, "bands": {...}}``, newest first.
``/api/calls/ID`` answers ``{"call": {...}, "streams": [...], "bands":
{...}}``, each stream with its record and its ``timeline`` (a list per
column).  Without ``--store`` both answer 404 with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from scoreq_live.calls.store import CallQuery, Connection, Store, StoreMissing, parse_age
from scoreq_live.errors import ConfigError
from scoreq_live.http.policy import HttpRequest, only_get, response
from scoreq_live.http.site import HttpSite, policy_request, web_response

MAX_LIMIT = 1000
MAX_QUERIES = 4

T = TypeVar("T")


def _number(query: Mapping[str, list[str]], name: str) -> float | None:
    if name not in query:
        return None
    text = query[name][0]
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"{name}={text[:40]!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number")
    return x


def parse_query(query: Mapping[str, list[str]], now: float) -> CallQuery:
    """``/api/calls``'s query string as a :class:`CallQuery`; ValueError says what is wrong."""
    since = None
    if "since" in query:
        text = query["since"][0]
        try:
            since = float(text) if text.replace(".", "", 1).isdigit() and float(text) > 1e9 else \
                now - parse_age(text, "since")
        except ConfigError as e:
            raise ValueError(str(e)) from None
    limit = _number(query, "limit")
    offset = _number(query, "offset")
    if limit is not None and not 0 < limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1..{MAX_LIMIT}")
    if offset is not None and offset < 0:
        raise ValueError("offset must be 0 or more")
    return CallQuery(since=since, until=_number(query, "until"), below=_number(query, "below"),
                     above=_number(query, "above"), stream=query["stream"][0] if "stream" in query else None,
                     key=query["key"][0] if "key" in query else None,
                     limit=int(limit) if limit is not None else 50, offset=int(offset) if offset is not None else 0)


def _json(status: int, body: Any, head: bool = False) -> web.Response:
    return web_response(response(status, json.dumps(body, separators=(",", ":"), allow_nan=False),
                                 "application/json", head=head))


class CallsRoutes:
    """The call-record API on a site; ``store`` None: answers that there is no store."""

    def __init__(self, store: Store | None, mode: str = "nr", bands: Mapping[str, Any] | None = None) -> None:
        self.store = store
        self.mode = mode
        self.bands = dict(bands or {})
        self._slots = asyncio.Semaphore(MAX_QUERIES)

    def add_routes(self, site: HttpSite) -> None:
        policy = site.policy

        async def calls(request: web.Request) -> web.StreamResponse:
            req = policy_request(request)
            refused = only_get(req) or policy.check_token(req, req.query)
            if refused is not None:
                return web_response(refused)
            return await self._calls(req)

        async def call(request: web.Request) -> web.StreamResponse:
            req = policy_request(request)
            refused = only_get(req) or policy.check_token(req, req.query)
            if refused is not None:
                return web_response(refused)
            return await self._call(req, request.match_info["id"])

        site.router.add_route("*", "/api/calls", calls)
        site.router.add_route("*", "/api/calls/{id}", call)

    def listening(self, site: HttpSite) -> str | None:
        if self.store is None:
            return None
        return f"call history: http://{site.address}/history  (api: /api/calls, store: {self.store})"

    async def _read(self, query: Callable[[Connection], T]) -> T:
        """``query`` on a connection of its own, on a thread, at most :data:`MAX_QUERIES` at once."""
        store = self.store
        assert store is not None

        def run() -> T:
            conn = store.connect()
            try:
                return query(conn)
            finally:
                conn.close()

        async with self._slots:
            return await asyncio.to_thread(run)

    def _no_store(self, head: bool) -> web.Response:
        return _json(404, {"error": "no call store here: start the monitor with --store PATH.db "
                                    "(or --store postgresql://...)"}, head)

    async def _calls(self, req: HttpRequest) -> web.Response:
        head = req.method == "HEAD"
        if self.store is None:
            return self._no_store(head)
        try:
            q = parse_query(req.query, time.time())
        except ValueError as e:
            return _json(400, {"error": str(e)}, head)
        try:
            rows, total = await self._read(lambda conn: conn.calls(q))
        except StoreMissing:  # the monitor has not written its first batch yet: no calls so far
            rows, total = [], 0
        except Exception as e:
            return _json(503, {"error": f"the store cannot be read: {_line(e)}"}, head)
        return _json(200, {"calls": rows, "total": total, "limit": q.limit, "offset": q.offset, "mode": self.mode,
                           "bands": self.bands}, head)

    async def _call(self, req: HttpRequest, call_id: str) -> web.Response:
        head = req.method == "HEAD"
        if self.store is None:
            return self._no_store(head)
        if not (0 < len(call_id) <= 128):
            return _json(404, {"error": "no such call"}, head)
        try:
            found = await self._read(lambda conn: conn.call(call_id))
        except StoreMissing:
            found = None
        except Exception as e:
            return _json(503, {"error": f"the store cannot be read: {_line(e)}"}, head)
        if found is None:
            return _json(404, {"error": f"no call {call_id!r}"}, head)
        found["bands"] = self.bands
        return _json(200, found, head)


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
