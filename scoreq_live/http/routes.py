"""Routes that carry no live connection: the browser panel's files and ``/metrics``.

Each is a part (:class:`~scoreq_live.http.site.Routes`) a site adds; what
they answer is decided in :mod:`scoreq_live.http.policy`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from scoreq_live.http.policy import PAGES, Metrics, files_request
from scoreq_live.http.site import HttpSite, policy_request, web_response

__all__ = ["MetricsRoutes", "PanelRoutes"]


class PanelRoutes:
    """The browser panel from ``root``, without a token: its pages (``/`` and ``/index.html``, the live panel;
    ``/history`` and ``/history.html``, past calls) and ``/static/...``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def add_routes(self, site: HttpSite) -> None:
        for path in (*PAGES, "/static/{file:.*}"):
            site.router.add_route("*", path, self._files)

    async def _files(self, request: web.Request) -> web.StreamResponse:
        # The path as sent, not as routed: the policy unquotes it once and keeps it inside the folder.
        return web_response(files_request(policy_request(request), self.root))

    def listening(self, site: HttpSite) -> str:
        """``panel: http://ADDRESS/``, naming ``/metrics`` and the feed when the site serves them too."""
        also = [f"{name}: {path}" for name, path in (("metrics", "/metrics"), ("feed", "/ws")) if site.serves(path)]
        return f"panel: http://{site.address}/" + (f"  ({', '.join(also)})" if also else "")


class MetricsRoutes:
    """``/metrics``: what ``metrics`` renders (per scrape), with the site's token; 404 without metrics."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    def add_routes(self, site: HttpSite) -> None:
        policy = site.policy

        async def metrics(request: web.Request) -> web.StreamResponse:
            return web_response(policy.metrics_request(policy_request(request), self.metrics))

        site.router.add_route("*", "/metrics", metrics)

    def listening(self, site: HttpSite) -> None:
        return None
