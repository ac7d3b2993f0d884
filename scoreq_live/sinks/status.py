"""Stream lifecycle on stderr, for runs without the terminal panel (services, pipes)."""

from __future__ import annotations

import sys

from scoreq_live.bus import Subscription
from scoreq_live.core.events import AlertEvent, ClearedEvent, StreamEnded, StreamError, StreamStarted


class StatusSink:
    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr

    async def run(self, sub: Subscription) -> None:
        async for ev in sub:
            if isinstance(ev, StreamError):
                print(f"scoreq-live: stream {ev.stream}: error: {ev.error}", file=self.stream, flush=True)
            elif isinstance(ev, StreamStarted):
                print(f"scoreq-live: stream {ev.stream}: started ({ev.source} {ev.detail}, {ev.rate} Hz, "
                      f"{ev.channels} ch)", file=self.stream, flush=True)
            elif isinstance(ev, ClearedEvent):
                print(f"scoreq-live: stream {ev.stream}: cleared {ev.rule} at {ev.t:.1f}s ({ev.reason})",
                      file=self.stream, flush=True)
            elif isinstance(ev, AlertEvent):
                print(f"scoreq-live: stream {ev.stream}: ALERT {ev.rule} at {ev.t:.1f}s ({ev.metric} {ev.value:.3g})",
                      file=self.stream, flush=True)
            elif isinstance(ev, StreamEnded):
                print(f"scoreq-live: stream {ev.stream}: ended ({ev.reason}) after {ev.t:.1f}s, "
                      f"{ev.scored}/{ev.windows} windows scored", file=self.stream, flush=True)
