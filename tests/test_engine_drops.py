"""Input lost before the monitor got it (a sound card's dropped blocks) shows as events and metrics."""

import io
from collections.abc import AsyncIterator

import numpy as np
import soundfile as sf

from scoreq_live.bus import EventBus
from scoreq_live.core.events import InputDropped, ScoreEvent, StreamEnded
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.sinks.metrics import MetricsSink
from scoreq_live.sinks.status import StatusSink
from scoreq_live.sources.base import Source
from tests.helpers import EXAMPLES

CLEAN = EXAMPLES / "clean.wav"


class Gappy(Source):
    """Real speech delivered in 0.5 s blocks; ``lose`` blocks are lost on the way, as a stalled loop loses them."""

    kind = "mic"

    def __init__(self, lose: set[int]) -> None:
        super().__init__("leg")
        self.lose = lose
        self.lost_frames = 0

    @property
    def dropped_s(self) -> float:
        return self.lost_frames / self.rate if self.rate else 0.0

    async def frames(self) -> AsyncIterator[np.ndarray]:
        audio, self.rate = sf.read(CLEAN, dtype="float32")
        self.channels = 1
        block = self.rate // 2
        for k in range(0, audio.shape[0] // block):
            chunk = audio[k * block:(k + 1) * block]
            if k in self.lose:
                self.lost_frames += len(chunk)
                continue
            yield chunk


class Constant:
    def score(self, windows):
        return np.full(len(windows), 3.0)


async def test_each_loss_is_one_event_at_its_stream_time_and_counted_in_metrics():
    bus = EventBus()
    sub = bus.subscribe()
    engine = Engine(Constant(), [Gappy(lose={3, 4, 9})], EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=1.0),
                                                                      fast=True), bus)
    await engine.run()
    events = []
    while (ev := sub.get_nowait()) is not None:
        events.append(ev)
    drops = [e for e in events if isinstance(e, InputDropped)]
    # Noticed with the first block after each gap: blocks 3-4 lost after 1.5 s of audio, block 9 after 3.5 s more.
    assert [(round(d.t, 3), d.dropped_s, d.total_s) for d in drops] == [(1.5, 1.0, 1.0), (3.5, 0.5, 1.5)]
    assert any(isinstance(e, ScoreEvent) for e in events) and isinstance(events[-1], StreamEnded)
    assert drops[0].to_dict()["type"] == "input_dropped"

    metrics = MetricsSink("m", "nr")
    for ev in drops:
        metrics.update(ev)
    assert b'scoreq_live_input_dropped_seconds_total{stream="leg"} 1.5' in metrics.render()[0]
    metrics.update(events[-1])  # the stream ended: its series go
    assert b'stream="leg"' not in metrics.render()[0]

    out = io.StringIO()
    status_bus = EventBus()
    status_sub = status_bus.subscribe()
    for ev in drops:
        status_bus.publish(ev)
    status_bus.close()
    await StatusSink(out).run(status_sub)
    assert "stream leg: 1.00s of input dropped at 1.5s" in out.getvalue()
