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
    ScoreEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from scoreq_live.sinks.base import Sink
from scoreq_live.sinks.terminal import THINNED_S


class StatusSink(Sink):
    """One line per lifecycle event and alert, and when a stream starts and stops being thinned.

    Scores are for the other outputs.  A stream is thinned while windows of it are skipped as
    ``overloaded``; it is said once when that starts and once when a window is scored again after
    :data:`THINNED_S` seconds without such a skip (with how many were skipped), never per window.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._thinned: dict[str, tuple[float, int]] = {}  # stream -> (ts of the latest overloaded skip, skips)

    async def run(self, events: Subscription) -> None:
        async for ev in events:
            thinning = self.thinning(ev)  # first: it also forgets a stream that ended
            line = self.line(ev) or thinning
            if line is not None:
                print(f"scoreq-live: stream {ev.stream}: {line}", file=self.stream, flush=True)

    def thinning(self, ev: Event) -> str | None:
        """The start or end of a stream's thinning, if ``ev`` marks one."""
        if isinstance(ev, ScoreEvent):
            seen = self._thinned.get(ev.stream)
            if ev.reason == "overloaded":
                self._thinned[ev.stream] = (ev.ts, (seen[1] if seen else 0) + 1)
                if seen is None:
                    return "thinned: scoring cannot keep up, some windows are skipped (overloaded)"
            elif seen is not None and ev.value is not None and ev.ts - seen[0] > THINNED_S:
                del self._thinned[ev.stream]
                return f"no longer thinned ({seen[1]} windows skipped as overloaded)"
        elif isinstance(ev, StreamEnded):
            self._thinned.pop(ev.stream, None)
        return None

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
