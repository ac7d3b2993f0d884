"""POST every ``alert`` and ``cleared`` event as JSON to a URL (``--alert-webhook``).

Delivery runs in its own task with its own bounded queue, and each request in
a worker thread: a slow or unreachable endpoint delays neither scoring nor the
other outputs.  Failed deliveries are retried with exponential backoff; when
the queue is full the oldest alert waiting is dropped (and counted).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from scoreq_live import __version__
from scoreq_live.bus import Subscription
from scoreq_live.core.events import AlertChange
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.queues import AsyncDropOldest
from scoreq_live.sinks.base import Sink

log = logging.getLogger(__name__)


class WebhookError(ScoreqLiveError):
    """A webhook URL that cannot be used."""


def check_url(url: str) -> str:
    """Accept http(s) URLs only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise WebhookError(f"--alert-webhook {url!r}: expected an http:// or https:// URL")
    return url


class WebhookSink(Sink):
    """Delivers alerts to ``url``.

    ``attempts``: tries per alert; the wait after the n-th failure is
    ``backoff_s * 2**(n-1)`` (at most ``max_backoff_s``).  ``timeout_s``: per
    request.  ``queue_size``: alerts waiting at most.  ``flush_s``: how long
    alerts still waiting may take once the monitor stops.
    """

    def __init__(self, url: str, attempts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 timeout_s: float = 5.0, queue_size: int = 1000, flush_s: float = 5.0) -> None:
        self.url = check_url(url)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self.flush_s = flush_s
        self._queue: AsyncDropOldest[bytes] = AsyncDropOldest(queue_size)
        self.delivered = 0
        self.failed = 0  # alerts given up after all attempts (or refused by the endpoint)

    @property
    def dropped(self) -> int:
        """Alerts dropped because the queue was full."""
        return self._queue.dropped

    async def run(self, events: Subscription) -> None:
        worker = asyncio.create_task(self._deliver_all(), name="webhook")
        try:
            async for ev in events:
                if isinstance(ev, AlertChange):  # alert and cleared
                    self._queue.put(ev.to_json().encode())
            # The monitor is stopping: give what is waiting a bounded time to go out.
            self._queue.close()
            try:
                await asyncio.wait_for(asyncio.shield(worker), self.flush_s)
            except asyncio.TimeoutError:
                if self._queue:
                    log.warning("webhook: %d alert(s) not delivered before stopping", len(self._queue))
        finally:
            worker.cancel()

    async def _deliver_all(self) -> None:
        while (body := await self._queue.get()) is not None:
            await self._deliver(body)

    async def _deliver(self, body: bytes) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                status = await asyncio.to_thread(self._post, body)
            except (urllib.error.URLError, OSError, ValueError) as e:
                status, why = None, str(getattr(e, "reason", e))
            else:
                why = f"HTTP {status}"
            if status is not None and 200 <= status < 300:
                self.delivered += 1
                return
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                log.warning("webhook %s refused an alert (%s); not retrying", self.url, why)
                self.failed += 1
                return
            if attempt < self.attempts:
                await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
        log.warning("webhook %s: alert not delivered after %d attempts (%s)", self.url, self.attempts, why)
        self.failed += 1

    def _post(self, body: bytes) -> int:
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"scoreq-live/{__version__}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 (http(s) checked)
                resp.read()
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
