"""The one event stream that every output reads.

Publishing never waits: each subscriber has a bounded queue, and a
subscriber that falls behind loses its oldest events (counted in
``dropped``) instead of slowing the scorer or the other subscribers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from scoreq_live.core.events import Event
from scoreq_live.queues import AsyncDropOldest

log = logging.getLogger(__name__)


class Subscription(AsyncDropOldest[Event]):
    """One consumer's view of the bus: its own bounded drop-oldest queue of events."""

    def __init__(self, bus: EventBus, maxsize: int, name: str) -> None:
        super().__init__(maxsize)
        self._bus = bus
        self.name = name

    @property
    def bus(self) -> EventBus:
        """The bus this subscription reads (an output publishes its own status events there)."""
        return self._bus

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        ev = await self.get()
        if ev is None:
            raise StopAsyncIteration
        return ev

    def unsubscribe(self) -> None:
        self._bus._subs.discard(self)
        self.close()


class EventBus:
    """Fans every published event out to all subscriptions, in publish order."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.closed = False
        self.published = 0
        # Callables event -> events that follow from it (alert rules, call records): what they return is
        # published right after the event itself, so every subscriber sees cause before effect.  What one
        # returns is also fed to those after it (the call records see the alerts the rules raise).
        self.derive: list[Callable[[Event], Iterable[Event]]] = []

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The current subscriptions (their ``name`` and ``dropped`` count feed the metrics)."""
        return tuple(self._subs)

    def subscribe(self, maxsize: int = 10_000, name: str = "") -> Subscription:
        sub = Subscription(self, maxsize, name)
        if self.closed:
            sub.close()
        else:
            self._subs.add(sub)
        return sub

    def publish(self, event: Event) -> None:
        self._publish(event, 0)

    def _publish(self, event: Event, first: int) -> None:
        self._deliver(event)
        for i in range(first, len(self.derive)):
            try:
                follows = list(self.derive[i](event))
            except Exception:  # a broken rule must not stop the event stream
                log.exception("deriving events from %s failed", event.type)
                continue
            for follow in follows:
                self._publish(follow, i + 1)

    def _deliver(self, event: Event) -> None:
        self.published += 1
        for sub in tuple(self._subs):
            sub.put(event)

    def close(self) -> None:
        self.closed = True
        for sub in tuple(self._subs):
            sub.close()
