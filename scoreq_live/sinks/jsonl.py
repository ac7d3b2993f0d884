"""Every event as one JSON object per line, to a file or stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from scoreq_live.bus import Subscription
from scoreq_live.sinks.base import Sink


class JsonlSink(Sink):
    """Writes each event as it comes, line-buffered, so ``tail -f`` and pipes see it at once."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)

    def _open(self) -> tuple[TextIO, bool]:
        if self.target == "-":
            return sys.stdout, False
        return open(self.target, "w", encoding="utf-8", buffering=1), True

    async def run(self, events: Subscription) -> None:
        out, close = self._open()
        try:
            async for ev in events:
                out.write(ev.to_json() + "\n")
            out.flush()
        finally:
            if close:
                out.close()
