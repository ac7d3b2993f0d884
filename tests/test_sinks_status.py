"""The stderr status (--no-tui): thinning said once when it starts and once when it ends, never per window."""

from __future__ import annotations

import asyncio
import io

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent, StreamEnded, StreamStarted
from scoreq_live.sinks.status import StatusSink
from scoreq_live.sinks.terminal import THINNED_S


def _score(stream: str, ts: float, window: int, mos: float | None, reason: str | None = None) -> ScoreEvent:
    return ScoreEvent(stream=stream, ts=ts, window=window, mos=mos, reason=reason)  # type: ignore[arg-type]


def test_thinning_start_and_end_lines():
    bus = EventBus()
    sub = bus.subscribe()
    out = io.StringIO()
    sink = StatusSink(out)
    t = 1000.0
    bus.publish(StreamStarted(stream="a", ts=t, source="file", detail="x.wav", rate=16000, channels=1, model="m",
                              mode="nr", window_s=4.0, hop_s=1.0))
    events = []
    for k in range(12):  # every other window skipped for 12 s: thinned, said once
        events.append(_score("a", t + k, k, None if k % 2 else 3.0, "overloaded" if k % 2 else None))
    events.append(_score("b", t + 5, 0, None, "overloaded"))  # another stream, its own state
    k0 = 12
    for k in range(k0, k0 + int(THINNED_S) + 3):  # scored again, every window
        events.append(_score("a", t + k, k, 3.5))
    events.append(StreamEnded(stream="b", ts=t + 30, reason="eof", t=30.0, windows=1, scored=0))
    for ev in events:
        bus.publish(ev)
    bus.close()
    asyncio.run(sink.run(sub))
    lines = out.getvalue().splitlines()
    thinned_a = [line for line in lines if line.startswith("scoreq-live: stream a: thinned")]
    back_a = [line for line in lines if "stream a: no longer thinned" in line]
    assert len(thinned_a) == 1 and len(back_a) == 1, lines
    assert "(6 windows skipped as overloaded)" in back_a[0]
    assert lines.index(thinned_a[0]) < lines.index(back_a[0])
    assert sum("stream b: thinned" in line for line in lines) == 1
    assert not any("stream b: no longer" in line for line in lines)  # it ended instead
    assert "b" not in sink._thinned
