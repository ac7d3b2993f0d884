"""What every output is: a task that reads the event bus, with optional start, close and engine hooks."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from scoreq_live.bus import Subscription

if TYPE_CHECKING:
    from scoreq_live.engine import Engine


class Sink(abc.ABC):
    """An output of the monitor.

    The monitor awaits :meth:`start` of every sink before any stream starts (a
    server binds its port there, so a busy port stops the monitor up front),
    calls :meth:`attach` once the engine exists, runs :meth:`run` as a task on
    its own bus subscription until the bus closes, and awaits :meth:`close` at
    the end.  Only :meth:`run` is required.
    """

    async def start(self) -> None:  # noqa: B027 (an optional hook: most sinks acquire nothing)
        """Acquire what the sink needs before streams start; raise a ScoreqLiveError if it cannot."""

    def attach(self, engine: Engine) -> None:  # noqa: B027 (an optional hook)
        """Watch the engine itself (model runs, for metrics), not only its events."""

    @abc.abstractmethod
    async def run(self, events: Subscription) -> None:
        """Consume events until the subscription ends."""

    async def close(self) -> None:  # noqa: B027 (an optional hook)
        """Release what :meth:`start` acquired; called once, after the inputs end (and any linger)."""
