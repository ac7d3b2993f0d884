"""What every output is: a task that reads the event bus, with optional start, close and engine hooks."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scoreq_live.bus import EventBus, Subscription

if TYPE_CHECKING:
    from scoreq_live.engine import Engine

log = logging.getLogger(__name__)


class Sink(abc.ABC):
    """An output of the monitor.

    The monitor awaits :meth:`start` of every sink before any stream starts (a
    server binds its port there, so a busy port stops the monitor up front),
    calls :meth:`attach` once the engine exists, runs :meth:`run` as a task on
    its own bus subscription until the bus closes, and awaits :meth:`close` at
    the end.  Only :meth:`run` is required.
    """

    lost = 0  # events this output could not deliver (each output reports its own failures as it has them)

    async def start(self) -> None:  # noqa: B027 (an optional hook: most sinks acquire nothing)
        """Acquire what the sink needs before streams start; raise a ScoreqLiveError if it cannot."""

    def attach(self, engine: Engine) -> None:  # noqa: B027 (an optional hook)
        """Watch the engine itself (model runs, for metrics), not only its events."""

    @abc.abstractmethod
    async def run(self, events: Subscription) -> None:
        """Consume events until the subscription ends."""

    async def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release what :meth:`start` acquired; called once, after the inputs end (and any linger)."""


async def start_sinks(sinks: Sequence[Sink], bus: EventBus) -> list[asyncio.Task[None]]:
    """Start every sink in order, then run each on its own subscription of ``bus``.

    All or none: when one cannot start (a busy port), those already started are closed and the error raised.
    """
    started: list[Sink] = []
    try:
        for s in sinks:
            await s.start()
            started.append(s)
    except BaseException:
        await close_sinks(started)
        raise
    return [asyncio.create_task(s.run(bus.subscribe(name=type(s).__name__))) for s in sinks]


async def close_sinks(sinks: Sequence[Sink], tasks: Sequence[asyncio.Task[None]] = ()) -> None:
    """Close every sink (one failing to close does not keep the others open), then wait for their tasks."""
    for s in sinks:
        try:
            await s.close()
        except Exception:
            log.exception("closing %s failed", type(s).__name__)
    await asyncio.gather(*tasks, return_exceptions=True)
