"""Stream lifecycle on stderr, for runs without the terminal panel (services, pipes)."""

from __future__ import annotations

import sys
from typing import TextIO

from scoreq_live.bus import Subscription
from scoreq_live.core.events import (
    AlertEvent,
    ClearedEvent,
    Event,
    InputDropped,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from scoreq_live.sinks.base import Sink


class StatusSink(Sink):
    """One line per lifecycle event and alert (scores are for the other outputs)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    async def run(self, events: Subscription) -> None:
        async for ev in events:
            line = self.line(ev)
            if line is not None:
                print(f"scoreq-live: stream {ev.stream}: {line}", file=self.stream, flush=True)

    @staticmethod
    def line(ev: Event) -> str | None:
        """What to say about ``ev`` (None: nothing; scores are for the other outputs)."""
        if isinstance(ev, StreamError):
            return f"error: {ev.error}"
        if isinstance(ev, StreamStarted):
            return f"started ({ev.source} {ev.detail}, {ev.rate} Hz, {ev.channels} ch)"
        if isinstance(ev, AlertEvent):
            value = "–" if ev.value is None else f"{ev.value:.3g}"
            return f"ALERT {ev.rule} at {ev.t:.1f}s ({ev.metric} {value})"
        if isinstance(ev, ClearedEvent):
            return f"cleared {ev.rule} at {ev.t:.1f}s ({ev.reason})"
        if isinstance(ev, InputDropped):
            return (f"{ev.dropped_s:.2f}s of input dropped at {ev.t:.1f}s ({ev.total_s:.2f}s in all; "
                    "the monitor fell behind the sound card)")
        if isinstance(ev, StreamEnded):
            return f"ended ({ev.reason}) after {ev.t:.1f}s, {ev.scored}/{ev.windows} windows scored"
        return None
