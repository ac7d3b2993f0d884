"""Streams that appear and end while the engine runs (what an RTP port or a WebRTC server does)."""

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent, StreamEnded, StreamError, StreamStarted
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sinks.feed import FeedHub, FeedInfo
from scoreq_live.sinks.metrics import MetricsSink
from scoreq_live.sinks.terminal import PanelState
from scoreq_live.sources import FileSource, Source, SourceError, StreamSet
from tests.helpers import MUSHRA


@pytest.fixture
def tiny_scorer(tiny_nr):
    return Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=8)


class Calls(StreamSet):
    """Opens ``n`` file streams, ``gap_s`` apart, then ends (or, with ``forever``, waits to be stopped)."""

    def __init__(self, files, n, gap_s=0.0, forever=False, fail_after=None):
        super().__init__("calls")
        self.files, self.n, self.gap_s, self.forever, self.fail_after = files, n, gap_s, forever, fail_after

    async def streams(self) -> AsyncIterator[Source]:
        for i in range(self.n):
            if self.fail_after is not None and i == self.fail_after:
                raise SourceError("the port went away")
            yield FileSource(f"call{i}", self.files[i % len(self.files)], fast=True)
            await asyncio.sleep(self.gap_s)
        if self.forever:
            await asyncio.Event().wait()


CFG = EngineConfig(stream=StreamConfig(window_s=1.0, hop_s=0.5, model="tiny"), max_batch=8, fast=True)


async def run(scorer, inputs, duration=None):
    bus = EventBus()
    sub = bus.subscribe(maxsize=100_000)
    engine = Engine(scorer, inputs, CFG, bus)
    await engine.run(duration=duration)
    return engine, [ev async for ev in sub]


async def test_streams_opened_at_run_time_are_scored_and_forgotten(tiny_scorer, data):
    files = sorted(MUSHRA.glob("stim_0*/ref.wav"))[:3]
    engine, events = await run(tiny_scorer, [Calls(files, 5, gap_s=0.05)])
    for i in range(5):
        mine = [e for e in events if e.stream == f"call{i}"]
        assert isinstance(mine[0], StreamStarted) and isinstance(mine[-1], StreamEnded)
        assert mine[-1].reason == "eof" and sum(isinstance(e, ScoreEvent) and e.mos is not None for e in mine) > 3
    assert engine.streams_seen == 5 and engine.cores == {}  # ended streams are not kept


async def test_a_stream_set_runs_beside_plain_sources_until_stopped(tiny_scorer, data):
    files = sorted(MUSHRA.glob("stim_0*/ref.wav"))[:2]
    plain = FileSource("plain", files[0], fast=True)
    engine, events = await run(tiny_scorer, [plain, Calls(files, 2, forever=True)], duration=3.0)
    ended = {e.stream: e.reason for e in events if isinstance(e, StreamEnded)}
    assert ended == {"plain": "eof", "call0": "eof", "call1": "eof"}  # the set itself is not a stream


async def test_names_of_live_streams_stay_unique(tiny_scorer, data):
    f = sorted(MUSHRA.glob("stim_0*/ref.wav"))[0]

    class Same(StreamSet):
        async def streams(self):
            for _ in range(3):
                yield FileSource("leg", f, fast=True)

    _, events = await run(tiny_scorer, [Same("same")])
    assert sorted(e.stream for e in events if isinstance(e, StreamStarted)) == ["leg", "leg-2", "leg-3"]


async def test_a_failing_stream_set_is_reported_and_its_streams_finish(tiny_scorer, data):
    files = sorted(MUSHRA.glob("stim_0*/ref.wav"))[:2]
    _, events = await run(tiny_scorer, [Calls(files, 4, fail_after=2)])
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [(e.stream, e.error) for e in errors] == [("calls", "the port went away")]
    assert {e.stream for e in events if isinstance(e, StreamEnded) and e.reason == "eof"} == {"call0", "call1"}


async def test_hundreds_of_short_streams_do_not_grow_the_outputs(tiny_scorer, data):
    """Calls come and go: the feed, the metrics and the terminal panel forget ended streams."""
    import numpy as np
    import soundfile as sf

    x, sr = sf.read(sorted(MUSHRA.glob("stim_0*/ref.wav"))[0], dtype="float32")
    clip = x[: int(1.2 * sr)]

    class Clip(Source):
        kind = "test"

        async def frames(self):
            self.rate, self.channels = sr, clip.shape[1] if clip.ndim > 1 else 1
            yield clip
            await asyncio.sleep(0)

    class ManyCalls(StreamSet):
        def __init__(self, n):
            super().__init__("many")
            self.n = n

        async def streams(self):
            for i in range(self.n):
                yield Clip(f"c{i}")
                await asyncio.sleep(0)

    hub = FeedHub(FeedInfo("tiny", "nr", 1.0, 0.5), history_s=0.0)  # forget ended streams at once
    metrics = MetricsSink("tiny", "nr")
    panel = PanelState(forget_s=0.0)

    ended_after_last_start: set[str] = set()

    async def one_run(n):
        bus = EventBus()
        sub = bus.subscribe(maxsize=100_000)
        engine = Engine(tiny_scorer, [ManyCalls(n)], CFG, bus)
        await engine.run()
        async for ev in sub:
            hub.publish(ev, ev.ts + 1.0)
            metrics.update(ev)
            panel.update(ev)
            if ev.type == "stream_started":
                ended_after_last_start.clear()
            elif ev.type == "stream_ended":
                ended_after_last_start.add(ev.stream)
        return engine

    await one_run(20)  # warm-up: caches, the session's arenas
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = await one_run(200)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert engine.streams_seen == 200 and engine.cores == {}
    # What the feed and the panel still show are the last calls only (those that ended after the last start:
    # which ones those are depends on how the run interleaved, so it is read off the events themselves).
    last = ended_after_last_start
    assert len(last) < 100, f"{len(last)} streams ended after the last start: the streams did not overlap"
    assert set(hub.streams) <= last and set(panel.rows) <= last and len(panel.rows) <= panel.max_ended
    text = metrics.render()[0].decode()
    assert "c199" not in text and "c5\"" not in text  # no series left of ended streams
    assert 'scoreq_live_streams_started_total 220.0' in text
    # What stays after 200 calls is a few kilobytes of counters, not their windows or audio.
    clip_bytes = np.asarray(clip).nbytes
    assert grown < 5 * clip_bytes, f"{grown} bytes kept after 200 streams"
