"""The bounded queue every consumer of events uses: the producer never waits.

A monitor must not let one slow consumer (a stalled websocket client, a
webhook endpoint that times out, a terminal that cannot keep up) slow the
scorer or the others.  So every queue between them is bounded and, when
full, drops its *oldest* item (the newest state matters most to a
dashboard), counting what it dropped.

:class:`DropOldest` is the plain container (no asyncio: the feed's per-client
queues live in the sans-I/O hub); :class:`AsyncDropOldest` adds waiting for an
item and closing, for consumers that run as tasks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldest(Generic[T]):
    """A FIFO of at most ``maxsize`` items; :meth:`put` never blocks and drops the oldest when full.

    ``dropped`` counts every item lost that way.  ``on_put`` (if given) is
    called after each put: the hook that wakes whoever drains the queue.
    """

    def __init__(self, maxsize: int, on_put: Callable[[], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.on_put = on_put
        self.dropped = 0
        self._items: deque[T] = deque()

    def put(self, item: T) -> bool:
        """Append ``item``; True when the oldest item was dropped to make room."""
        lost = len(self._items) >= self.maxsize
        if lost:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        if self.on_put is not None:
            self.on_put()
        return lost

    def get_nowait(self) -> T | None:
        """The oldest item, or None when empty."""
        return self._items.popleft() if self._items else None

    def take_all(self) -> list[T]:
        """Every item, oldest first; the queue is empty afterwards."""
        out = list(self._items)
        self._items.clear()
        return out

    def clear(self) -> None:
        """Discard every item (not counted as dropped: the consumer chose to)."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class AsyncDropOldest(DropOldest[T]):
    """A :class:`DropOldest` that a task can wait on, until it is closed and empty."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self._wake = asyncio.Event()
        self.closed = False

    def put(self, item: T) -> bool:
        lost = super().put(item)
        self._wake.set()
        return lost

    def close(self) -> None:
        """No more items will come: :meth:`get` returns what is left, then None."""
        self.closed = True
        self._wake.set()

    async def get(self) -> T | None:
        """The oldest item, waiting for one; None once closed and empty."""
        while not self._items:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()
