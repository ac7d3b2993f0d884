"""The one event stream that every output reads.

Publishing never waits: each subscriber has a bounded queue, and a
subscriber that falls behind loses its oldest events (counted in
``dropped``) instead of slowing the scorer or the other subscribers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Iterable

from scoreq_live.core.events import Event

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, bus: "EventBus", maxsize: int, name: str) -> None:
        self._bus = bus
        self._queue: deque[Event] = deque()
        self._maxsize = maxsize
        self._wake = asyncio.Event()
        self._closed = False
        self.name = name
        self.dropped = 0

    def _put(self, event: Event) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._wake.set()

    def _close(self) -> None:
        self._closed = True
        self._wake.set()

    async def get(self) -> Event | None:
        """The next event, or None once the bus is closed and the queue is empty."""
        while not self._queue:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    def get_nowait(self) -> Event | None:
        return self._queue.popleft() if self._queue else None

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        ev = await self.get()
        if ev is None:
            raise StopAsyncIteration
        return ev

    def unsubscribe(self) -> None:
        self._bus._subs.discard(self)
        self._close()


class EventBus:
    """Fans every published event out to all subscriptions, in publish order."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.closed = False
        self.published = 0
        # Callables event -> events that follow from it (alert rules): what they return is
        # published right after the event itself, so every subscriber sees cause before effect.
        self.derive: list[Callable[[Event], Iterable[Event]]] = []

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The current subscriptions (their ``name`` and ``dropped`` count feed the metrics)."""
        return tuple(self._subs)

    def subscribe(self, maxsize: int = 10_000, name: str = "") -> Subscription:
        sub = Subscription(self, maxsize, name)
        if self.closed:
            sub._close()
        else:
            self._subs.add(sub)
        return sub

    def publish(self, event: Event) -> None:
        self._deliver(event)
        for derive in self.derive:
            try:
                follows = list(derive(event))
            except Exception:  # a broken rule must not stop the event stream
                log.exception("deriving events from %s failed", event.type)
                continue
            for follow in follows:
                self._deliver(follow)

    def _deliver(self, event: Event) -> None:
        self.published += 1
        for sub in tuple(self._subs):
            sub._put(event)

    def close(self) -> None:
        self.closed = True
        for sub in tuple(self._subs):
            sub._close()
