"""A remote scoring backend's health: up, down or on the fallback, and when to probe it again.

Pure: no asyncio, no clock (times are passed in).  The runner that talks to
the server reports what happened (:meth:`BackendHealth.start`,
:meth:`BackendHealth.lost`, :meth:`BackendHealth.probe_failed`,
:meth:`BackendHealth.recovered`); the machine says which
:class:`~scoreq_live.core.events.BackendStatus` event each change makes
(one per change, none for a repeat), whether batches may be sent, and how
long to wait before the next probe (``first_s``, doubling to ``max_s``).
"""

from __future__ import annotations

from scoreq_live.core.events import BackendState, BackendStatus

RETRY_FIRST_S = 0.5  # a lost backend is probed after this long, then at doubling intervals ...
RETRY_MAX_S = 10.0  # ... of at most this


class BackendHealth:
    """The state of one backend (``backend``: its URL, for the events)."""

    def __init__(self, backend: str, fallback: bool, first_s: float = RETRY_FIRST_S,
                 max_s: float = RETRY_MAX_S) -> None:
        self.backend = backend
        self.fallback = fallback  # a local model scores while the backend is lost
        self.first_s = first_s
        self.max_s = max_s
        self.state: BackendState | None = None  # None: not started
        self.since = 0.0
        self.error = ""
        self.retry_s = first_s  # the wait before the next probe

    @property
    def up(self) -> bool:
        """Batches may be sent to the backend."""
        return self.state == "up"

    def _to(self, state: BackendState, now: float, error: str = "") -> BackendStatus | None:
        if state == self.state:
            return None
        self.state, self.error, self.since = state, error, now
        return BackendStatus(stream="", ts=now, state=state, backend=self.backend, error=error, since=now)

    def start(self, connected: bool, now: float, error: str = "") -> BackendStatus | None:
        """The monitor starts: ``up`` when the backend answered at start, else lost from the outset."""
        if connected:
            return self._to("up", now)
        self.state = "up"  # lost from "up": one event, down or fallback
        return self.lost(error or f"{self.backend} was unreachable at start", now)

    def lost(self, error: str, now: float) -> BackendStatus | None:
        """A request found the backend unavailable; an event the first time only (probe from now on)."""
        if self.state != "up":
            return None
        self.retry_s = self.first_s
        return self._to("fallback" if self.fallback else "down", now, error)

    def probe_failed(self) -> float:
        """A probe failed: the wait before the next one (doubling, at most ``max_s``)."""
        self.retry_s = min(self.retry_s * 2, self.max_s)
        return self.retry_s

    def recovered(self, now: float) -> BackendStatus | None:
        """A probe succeeded: the backend is up again."""
        self.retry_s = self.first_s
        return self._to("up", now)
