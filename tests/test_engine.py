"""The asyncio engine with real files, real sources and a real ONNX session."""

import asyncio

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent, StreamEnded, StreamError, StreamStarted
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sources import FileSource, SourceError, open_inputs
from tests.helpers import MUSHRA, SCOREQ_PAIR, joined


class InStep(FileSource):
    """A file played in real time whose next block waits until every window cut so far has its result.

    The scorer is then never still busy with a window of the stream when the next one is cut, however slow
    the machine: no window can be replaced by a newer one (``overloaded``), whatever the run times.  Where
    the scorer keeps up, nothing waits and this is a plain real-time file.  ``engine`` is set by
    :func:`run_engine`.
    """

    engine: Engine | None = None

    async def _results_in(self, deadline_s: float = 60.0) -> None:
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        core = self.engine.cores.get(self.name)
        while core is not None and core.pending:
            assert loop.time() < end, f"{self.name}: a window has had no result for {deadline_s:g} s"
            await asyncio.sleep(0.005)

    async def frames(self):
        async for data in super().frames():
            await self._results_in()
            yield data
        await self._results_in()  # the tail window (cut at the end) never finds its predecessor waiting


async def run_engine(scorer, sources, config, runs=None):
    """Run an engine to the end; its events, and with ``runs`` a list of (windows, seconds) per model run."""
    bus = EventBus()
    sub = bus.subscribe()
    engine = Engine(scorer, sources, config, bus)
    for s in sources:
        if isinstance(s, InStep):
            s.engine = engine
    if runs is not None:
        engine.batch_observers.append(lambda n, took: runs.append((n, took)))
    await engine.run()
    events = []
    async for ev in sub:
        events.append(ev)
    return engine, events


def by_stream(events, name):
    return [e for e in events if e.stream == name]


@pytest.fixture
def tiny_scorer(tiny_nr):
    return Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=8)


@pytest.fixture
def long_24k_stereo(tmp_path, data):
    """A 24 s stereo 24 kHz stream joined from MUSHRA references (exercises downmix + resampling)."""
    import soxr

    x = joined(sorted(MUSHRA.glob("stim_0*/ref.wav")))
    y = soxr.resample(x, 16000, 24000)
    path = tmp_path / "long.wav"
    sf.write(path, np.stack([y, y], axis=1), 24000, subtype="PCM_16")
    return path


async def test_windows_of_many_streams_share_batched_runs(tiny_scorer, data):
    files = [f"s{i}={p}" for i, p in enumerate(sorted(MUSHRA.glob("stim_0*/ref.wav"))[:6])]
    cfg = EngineConfig(stream=StreamConfig(window_s=1.0, hop_s=0.5, model="tiny"), max_batch=8, fast=True)
    engine, events = await run_engine(tiny_scorer, open_inputs(files, fast=True), cfg)
    assert max(engine.batches) > 1, "windows of different streams should be scored together"
    for i in range(6):
        evs = by_stream(events, f"s{i}")
        assert isinstance(evs[0], StreamStarted) and isinstance(evs[-1], StreamEnded)
        scores = [e for e in evs if isinstance(e, ScoreEvent)]
        assert [e.window for e in scores] == list(range(len(scores)))
        assert all(e.mos is not None for e in scores if e.reason is None)


async def test_a_broken_stream_does_not_take_down_the_others(tiny_scorer, tmp_path, data):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    # check=False: the up-front check would refuse it; here it must fail inside the running engine.
    sources = open_inputs([f"good={SCOREQ_PAIR / 'ref.wav'}", f"bad={broken}"], fast=True, check=False)
    cfg = EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=1.0, model="tiny"), fast=True)
    _, events = await run_engine(tiny_scorer, sources, cfg)
    bad = by_stream(events, "bad")
    assert len(bad) == 1 and isinstance(bad[0], StreamError) and "broken.wav" in bad[0].error
    good = by_stream(events, "good")
    assert isinstance(good[-1], StreamEnded) and good[-1].scored >= 3


async def test_a_stream_that_fails_midway_keeps_its_scores_and_the_others_go_on(tiny_scorer, data):
    class Unplugged(FileSource):
        """A real file that stops with an error after 3 s, like a device unplugged mid-call."""

        async def frames(self):
            sent = 0
            async for block in super().frames():
                yield block
                sent += block.shape[0]
                if sent >= 3 * self.rate:
                    raise SourceError("device unplugged")

    sources = [Unplugged("a", SCOREQ_PAIR / "ref.wav", fast=True), FileSource("b", SCOREQ_PAIR / "opus.wav", fast=True)]
    cfg = EngineConfig(stream=StreamConfig(window_s=1.0, hop_s=0.5, model="tiny"), fast=True)
    _, events = await run_engine(tiny_scorer, sources, cfg)
    a = by_stream(events, "a")
    assert any(isinstance(e, StreamError) and "unplugged" in e.error for e in a)
    assert isinstance(a[-1], StreamEnded) and a[-1].reason == "error" and a[-1].scored >= 3
    assert isinstance(by_stream(events, "b")[-1], StreamEnded) and by_stream(events, "b")[-1].reason == "eof"


async def test_a_scorer_failure_marks_windows_and_keeps_going(tiny_nr, data):
    class Flaky(Scorer):
        calls = 0

        def score_named(self, windows, states=None, starts=None):  # what the engine runs: every named score
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("device lost")
            return super().score_named(windows, states, starts)

    scorer = Flaky(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=1)
    cfg = EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=1.0, model="tiny"), max_batch=1, fast=True)
    _, events = await run_engine(scorer, [FileSource("a", SCOREQ_PAIR / "ref.wav", fast=True)], cfg)
    scores = [e for e in events if isinstance(e, ScoreEvent)]
    assert scores[0].reason == "error" and scores[0].mos is None
    assert all(e.mos is not None for e in scores[1:])


async def test_fast_and_real_time_give_the_same_events(bundled_nr, data):
    scorer = Scorer(bundled_nr)
    stream = StreamConfig(window_s=4.0, hop_s=1.0, model="distillmos")
    path = SCOREQ_PAIR / "opus.wav"
    _, fast = await run_engine(scorer, [FileSource("x", path, fast=True)], EngineConfig(stream=stream, fast=True))
    runs = []
    live_cfg = EngineConfig(stream=stream)
    # In real time, each window is cut only once the stream's window before has its result: on a busy
    # machine a model run may outlast the 0.4 s between the last full window and the tail, which would then
    # replace it (``overloaded``), a difference of speed, not of events.
    _, live = await run_engine(scorer, [InStep("x", path, fast=False)], live_cfg, runs=runs)

    def key(evs):
        return [(e.window, e.t_start, e.t_end, e.reason, e.speech, e.level_dbfs)
                for e in evs if isinstance(e, ScoreEvent)]

    assert key(fast) == key(live) and len(key(fast)) == 3  # [0,4] [1,5] and the tail [2,5.4]
    f = [e.mos for e in fast if isinstance(e, ScoreEvent)]
    r = [e.mos for e in live if isinstance(e, ScoreEvent)]
    np.testing.assert_allclose(f, r, atol=1e-5)
    # Real time: each window is scored as soon as it is due, so its latency is the batch wait and its own
    # model run (no run for the window before is still going: see InStep).  Measured against this machine's
    # own run times (three times the longest, for scheduling), not against a number of seconds.
    lat = [e.latency_ms / 1000 for e in live if isinstance(e, ScoreEvent)]
    run_s = max(took for _, took in runs) + live_cfg.batch_wait_s
    assert max(lat) < 1.5 * 2 * run_s, (lat, runs)


async def test_real_time_file_takes_real_time(tiny_scorer, data):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    cfg = EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=1.0, model="tiny"))
    await run_engine(tiny_scorer, [FileSource("a", MUSHRA / "stim_04" / "ref.wav")], cfg)
    assert loop.time() - t0 >= 2.0  # 2.08 s of audio


async def test_monitor_timeline_over_a_resampled_stereo_stream_tracks_offline_scoring(bundled_nr, long_24k_stereo):
    from scoreq_live.offline import score_file

    scorer = Scorer(bundled_nr, max_batch=8)
    stream = StreamConfig(window_s=7.68, hop_s=2.0, model="distillmos")
    _, events = await run_engine(scorer, [FileSource("long", long_24k_stereo, fast=True)],
                                 EngineConfig(stream=stream, max_batch=8, fast=True))
    live = [e for e in events if isinstance(e, ScoreEvent)]
    offline = score_file(long_24k_stereo, scorer, stream)
    assert ([(round(e.t_start, 4), round(e.t_end, 4)) for e in live]
            == [(w["t_start"], w["t_end"]) for w in offline.windows])
    diffs = [abs(e.mos - w["mos"]) for e, w in zip(live, offline.windows) if e.mos is not None]
    assert len(diffs) >= 8 and max(diffs) < 0.02  # streaming vs one-shot resampling only
    live_mean = np.mean([e.mos for e in live if e.mos is not None])
    assert live_mean == pytest.approx(offline.value, abs=0.01)


async def test_live_overload_skips_windows_instead_of_growing_latency(bundled_nr, data):
    """Far more windows than the CPU can score: live inputs skip ('overloaded'), latency stays bounded."""
    scorer = Scorer(bundled_nr, max_batch=4)
    files = sorted(MUSHRA.glob("stim_0[1235]/ref.wav"))  # 2.7-3.6 s each, in real time
    sources = [FileSource(f"s{i}", p) for i, p in enumerate(files)]
    stream = StreamConfig(window_s=1.0, hop_s=0.05, model="distillmos")  # 20 windows/s per stream
    cfg = EngineConfig(stream=stream, max_batch=4)
    runs = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    _, events = await run_engine(scorer, sources, cfg, runs=runs)
    wall = loop.time() - t0
    scores = [e for e in events if isinstance(e, ScoreEvent)]
    overloaded = [e for e in scores if e.reason == "overloaded"]
    scored = [e for e in scores if e.mos is not None]
    assert overloaded and scored
    # Bounds in this machine's own model runs, not in seconds: a window waits at most a hop for its
    # stream's next one, or for the run in flight, and then for its own run; half as much again for
    # scheduling.  Scoring all the windows instead would take many times longer.
    run_s = max(took for _, took in runs) + cfg.batch_wait_s
    backlog_s = 1.5 * (stream.hop_s + 2 * run_s)
    longest = max(sf.info(p).duration for p in files)
    assert wall < longest + backlog_s, (wall, longest, runs)  # the longest file plus a bounded backlog
    assert max(e.latency_ms for e in scored) / 1000 < backlog_s, runs
    for i in range(len(files)):
        idx = [e.window for e in scores if e.stream == f"s{i}"]
        assert idx == list(range(len(idx)))
