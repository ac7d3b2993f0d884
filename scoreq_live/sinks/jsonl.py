"""Every event as one JSON object per line, to a file or stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from scoreq_live.bus import Subscription


class JsonlSink:
    def __init__(self, target: str | Path) -> None:
        self.target = str(target)

    def _open(self) -> tuple[TextIO, bool]:
        if self.target == "-":
            return sys.stdout, False
        return open(self.target, "w", encoding="utf-8", buffering=1), True

    async def run(self, sub: Subscription) -> None:
        out, close = self._open()
        try:
            async for ev in sub:
                out.write(ev.to_json() + "\n")
                if sub.dropped:
                    pass  # counted on the subscription; a file sink is never slow enough in practice
            out.flush()
        finally:
            if close:
                out.close()
