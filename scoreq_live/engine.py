"""The asyncio engine: sources -> stream cores -> batched scoring -> event bus.

It only moves data.  Windowing, gating, ordering and smoothing live in
:mod:`scoreq_live.core.stream`; the model lives behind
:class:`scoreq_live.scoring.scorer.Scorer`; outputs read the
:class:`scoreq_live.bus.EventBus`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scoreq_live.bus import EventBus
from scoreq_live.core.events import (
    EndReason,
    InputDropped,
    ScoreEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    new_id,
    qualified,
)
from scoreq_live.core.schedule import OVERLOADED, LiveScheduler
from scoreq_live.core.stream import StreamConfig, StreamCore, Window
from scoreq_live.scoring.runner import BatchScorer, Outcome, Runner, runner_for
from scoreq_live.sources.base import Source, SourceError, StreamSet

log = logging.getLogger(__name__)

RECENT_BATCHES = 1024  # run sizes kept for inspection (tests, benchmarks); older ones are only counted

BatchObserver = Callable[[int, float], None]
"""Called after every model run with (windows in the run, seconds it took)."""


@dataclass(frozen=True)
class EngineConfig:
    stream: StreamConfig = field(default_factory=StreamConfig)
    max_batch: int = 16
    # How long the first window of a batch waits for windows of other streams
    # that are due at the same moment (sources are not perfectly in step).
    batch_wait_s: float = 0.01
    # --fast: windows waiting for the scorer, across streams; a stream whose window finds
    # the queue full waits for room (every window is scored).
    max_pending: int = 256
    fast: bool = False
    # Live: the time from a window's last sample to its event (score or skip), in seconds.
    # None: the stream's hop plus twice the recent model run time (see Engine.latency_budget).
    max_latency_s: float | None = None
    # A scorer on an inference server: batches sent and not answered yet, at most (the live loop and --fast keep
    # taking windows meanwhile; the server's batcher merges what arrives together).
    max_inflight: int = 4


class _Stop:
    """Queued after the last window: the score loop ends when it reaches it."""


_STOP = _Stop()
_Item = tuple[StreamCore, Window] | _Stop


class ModelLane:
    """One model's scoring in the engine: its runner, the windows waiting for it, its runs in flight.

    A stream scored by several models has a lane per model (each with its own
    window and hop, :class:`~scoreq_live.core.stream.StreamConfig`); each lane
    batches its windows across streams and is scheduled on its own.
    """

    def __init__(self, index: int, stream: StreamConfig, runner: Runner, config: EngineConfig) -> None:
        self.index = index
        self.stream = stream
        self.runner = runner
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=config.max_pending)  # --fast
        self.schedule: LiveScheduler[StreamCore] = LiveScheduler(
            stream.hop_s, config.max_batch, config.batch_wait_s, config.max_latency_s)  # live
        self.wake = asyncio.Event()  # live: a window is waiting, or the run ends
        self.inflight: set[asyncio.Task[None]] = set()  # runs started and not answered
        self.room = asyncio.Event()  # set when a run in flight is answered
        self.batches: deque[int] = deque(maxlen=RECENT_BATCHES)  # sizes of the latest model runs
        self.runs = 0  # model runs made
        self.windows_run = 0  # windows those runs scored (or failed on)

    def describe(self) -> dict[str, object]:
        """The model as ``stream_started.models`` lists it."""
        names = self.runner.names or (self.stream.model,)
        return {"model": self.stream.model, "window_s": self.stream.window_s, "hop_s": self.stream.hop_s,
                "scores": [qualified(self.stream.model, n) for n in names]}


class Engine:
    """Runs sources concurrently and scores their windows in shared batches.

    The engine is the I/O between the parts: it pumps each source's chunks
    into its stream core (:mod:`scoreq_live.core.stream`), hands the windows
    to the scheduling rule of the run's kind, starts batches on a
    :class:`~scoreq_live.scoring.runner.Runner` while it has room, and
    publishes what the cores give back on the event bus.

    Live inputs follow :class:`~scoreq_live.core.schedule.LiveScheduler`: at
    most one window waiting per stream, fair batches, a latency budget
    (:attr:`latency_budget`); when the scorer cannot keep up every stream is
    thinned alike.  With ``fast`` (files played as fast as scoring allows)
    every window is scored in arrival order and the inputs wait for the scorer.

    ``sources`` are the inputs known at start: single streams (:class:`Source`)
    and inputs that open streams while the monitor runs (:class:`StreamSet`).
    :meth:`attach` adds a stream at any time.  ``scorer`` is run by the runner
    made for it (:func:`~scoreq_live.scoring.runner.runner_for`: a model on an
    inference server keeps several requests in flight and has its health
    followed, with ``fallback`` scoring while it is lost); or pass ``runner``.
    :attr:`cores` holds the live streams only: an ended stream is forgotten at
    once (the outputs keep what they show of it), so streams that come and go
    do not grow memory.

    ``extra`` adds models that score every stream besides the first, each
    a ``(StreamConfig, Runner)``: its own window and hop, its own batches
    (:class:`ModelLane`); their results are ``model_score`` events.
    """

    def __init__(self, scorer: BatchScorer | None, sources: Sequence[Source | StreamSet], config: EngineConfig,
                 bus: EventBus, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, fallback: BatchScorer | None = None,
                 runner: Runner | None = None, extra: Sequence[tuple[StreamConfig, Runner]] = ()) -> None:
        if runner is None:
            if scorer is None:
                raise ValueError("an engine needs a scorer or a runner")
            runner = runner_for(scorer, config.max_inflight, fallback)
        self.models = [ModelLane(0, config.stream, runner, config),
                       *(ModelLane(i + 1, sc, r, config) for i, (sc, r) in enumerate(extra))]
        self.sources = list(sources)
        self.config = config
        self.bus = bus
        self.clock = clock
        self.wall = wall
        self.cores: dict[str, StreamCore] = {}  # live streams by name
        self._inputs: dict[str, Source] = {}  # the source of each live stream
        self._tasks: set[asyncio.Task[None]] = set()  # pumps and stream sets still running
        self._set_tasks: set[asyncio.Task[None]] = set()  # the stream sets' own tasks among them
        self._endpoints: set[asyncio.Task[None]] = set()  # the endpoints' own tasks among those (StreamSet.endpoint)
        self._inputs_end = False  # True when some input is not an endpoint: the run ends when those have ended
        self._idle = asyncio.Event()  # set when no task is left
        self.streams_seen = 0  # streams attached since start
        self._closing = False
        self._resolved = asyncio.Condition()
        self._stop = asyncio.Event()
        self.batch_observers: list[BatchObserver] = []  # the metrics' hook (the first model's runs)

    # The first model's lane: what a monitor with one model has.
    @property
    def runner(self) -> Runner:
        return self.models[0].runner

    @property
    def schedule(self) -> LiveScheduler[StreamCore]:
        return self.models[0].schedule

    @property
    def batches(self) -> deque[int]:
        """Sizes of the first model's latest runs."""
        return self.models[0].batches

    @property
    def runs(self) -> int:
        return self.models[0].runs

    @property
    def windows_run(self) -> int:
        return self.models[0].windows_run

    @property
    def run_ema_s(self) -> float | None:
        """Recent seconds per model run (exponential moving average), None before the first."""
        return self.schedule.run_s

    @property
    def latency_budget(self) -> float:
        """Seconds a live window may take from its last sample to its event (score or skip).

        ``max_latency_s`` when set; else the hop plus twice the recent model run
        time: a window may wait for the run in flight and then take its own.
        """
        return self.schedule.budget

    def _publish_drained(self, core: StreamCore) -> None:
        source = self._inputs.get(core.name)
        for ev in core.drain(self.clock(), self.wall()):
            if source is not None and isinstance(ev, ScoreEvent):
                ev.net = source.net_window(ev.t_start, ev.t_end)
            self.bus.publish(ev)

    # -- streams that come and go ---------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._set_tasks.discard(task)
        self._endpoints.discard(task)
        self._check_idle()

    def _check_idle(self) -> None:
        # Idle: nothing runs but endpoints waiting for publishers, and some input was not an endpoint.
        if not self._tasks or (self._inputs_end and self._tasks <= self._endpoints):
            self._idle.set()

    def _unique(self, name: str) -> str:
        if name not in self.cores:
            return name
        n = 2
        while f"{name}-{n}" in self.cores:
            n += 1
        return f"{name}-{n}"

    def attach(self, source: Source) -> asyncio.Task[None]:
        """Run one more stream now (from inside the running engine); its name is made unique among live ones."""
        source.name = self._unique(source.name)
        core = self.cores[source.name] = StreamCore(  # reserved before the task runs
            source.name, self.config.stream, [m.stream for m in self.models[1:]])
        for lane, model in zip(core.lanes, self.models):
            lane.state = model.runner.new_state()  # the model family's, dropped with the core when the stream ends
        self._inputs[source.name] = source
        self.streams_seen += 1
        return self._spawn(self._pump(source), f"source:{source.name}")

    async def _watch(self, group: StreamSet) -> None:
        """Attach every stream a stream set opens; its failure is reported and ends only the set."""
        try:
            async for source in group.streams():
                self.attach(source)
                del source  # the engine's reference is in _inputs, dropped when the stream ends
        except asyncio.CancelledError:
            raise
        except SourceError as e:
            self.bus.publish(StreamError(stream=group.name, ts=self.wall(), error=str(e)))
        except Exception as e:
            log.exception("input %s failed", group.name)
            self.bus.publish(StreamError(stream=group.name, ts=self.wall(), error=f"{type(e).__name__}: {e}"))
        finally:
            group.close()

    async def _submit(self, core: StreamCore, window: Window) -> None:
        model = self.models[window.lane]
        if self.config.fast:
            await model.queue.put((core, window))
            return
        replaced = model.schedule.offer(core, window)
        if replaced is not None:
            core.resolve(replaced, None, OVERLOADED)  # a newer window replaces it: its skip goes out now
        model.wake.set()

    async def _pump(self, source: Source) -> None:
        core = self.cores[source.name]
        source.due_in = core.due_in  # the source gathers its blocks until a window is due (Source.held)
        started = False
        end_reason: EndReason = "eof"
        lost = 0.0  # input dropped before the source got it, reported so far
        try:
            async for chunk in source.chunks():
                if not started:
                    self._started(source)
                    started = True
                dropped = source.dropped_through_s
                if dropped > lost:
                    self.bus.publish(InputDropped(stream=source.name, ts=self.wall(), t=core.t,
                                                  dropped_s=dropped - lost, total_s=dropped))
                    lost = dropped
                for w in core.feed(chunk, self.clock()):
                    await self._submit(core, w)
                self._publish_drained(core)
            for w in core.finish(self.clock()):
                await self._submit(core, w)
            end_reason = source.end_reason
        except asyncio.CancelledError:
            end_reason = "stopped"
        except SourceError as e:
            end_reason = "error"
            self.bus.publish(StreamError(stream=source.name, ts=self.wall(), error=str(e)))
        except Exception as e:  # a broken stream must not take down the others
            log.exception("stream %s failed", source.name)
            end_reason = "error"
            self.bus.publish(StreamError(stream=source.name, ts=self.wall(), error=f"{type(e).__name__}: {e}"))
        finally:
            if end_reason == "stopped":
                core.abandon("stopped")  # shutting down: windows still queued will not be scored
            else:
                async with self._resolved:
                    await self._resolved.wait_for(lambda: core.pending == 0)
            self._publish_drained(core)
            if started or end_reason != "error":
                if not started:
                    self._started(source)
                self.bus.publish(StreamEnded(stream=source.name, ts=self.wall(), reason=end_reason,
                                             t=core.t, windows=core.windows, scored=core.scored,
                                             net=source.net_summary()))
            for model in self.models:
                model.schedule.forget(core)
            if self.cores.get(source.name) is core:  # forget it: the outputs keep what they show of it
                del self.cores[source.name]
                del self._inputs[source.name]

    def _started(self, source: Source) -> None:
        cfg = self.config.stream
        self.bus.publish(StreamStarted(
            stream=source.name, ts=self.wall(), source=source.kind, detail=source.detail,
            rate=source.rate, channels=source.channels, model=cfg.model, mode=cfg.mode,
            window_s=cfg.window_s, hop_s=cfg.hop_s, id=new_id(), call=source.call, meta=dict(source.meta) or None,
            models=[m.describe() for m in self.models[1:]] or None))

    # -- taking batches -----------------------------------------------------------------------------

    async def _collect(self, model: ModelLane, first: tuple[StreamCore, Window]
                       ) -> list[tuple[StreamCore, Window]]:
        """--fast: the first window and those queued behind it, up to a batch."""
        batch = [first]
        while len(batch) < self.config.max_batch:
            try:
                item = model.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, _Stop):
                model.queue.put_nowait(item)  # seen again after this batch
                break
            batch.append(item)
        return batch

    async def _score_loop(self, model: ModelLane) -> None:
        if not self.config.fast:
            await self._score_live(model)
            return
        while True:
            first = await model.queue.get()
            if isinstance(first, _Stop):
                await self._answered(model)
                return
            await self._wait_room(model)  # windows queue up meanwhile and join this batch
            await self._dispatch(model, await self._collect(model, first))
            del first  # hold nothing of a batch while waiting for the next: ended streams are freed now

    async def _score_live(self, model: ModelLane) -> None:
        """Live inputs: score the streams' waiting windows, fairly, within the latency budget."""
        cfg = self.config
        schedule = model.schedule
        while True:
            while not schedule.waiting:
                if self._closing:
                    await self._answered(model)
                    return
                model.wake.clear()
                await model.wake.wait()
            await self._wait_room(model)  # newer windows replace waiting ones meanwhile
            # Windows of other streams due at the same moment join this run (sources are not in step).
            deadline = self.clock() + cfg.batch_wait_s
            while not schedule.full and not self._closing:
                left = deadline - self.clock()
                if left <= 0:
                    break
                model.wake.clear()
                try:
                    await asyncio.wait_for(model.wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            take = schedule.take(self.clock())
            for core, w, reason in take.skipped:
                core.resolve(w, None, reason)
            for core in {core: None for core, _, _ in take.skipped}:
                self._publish_drained(core)
            if take.batch:
                await self._dispatch(model, take.batch)
            del take  # hold nothing of a batch while waiting for the next: ended streams are freed now
            await self._wake_enders()  # windows resolved here (skipped, replaced) may be a stream's last

    # -- runs in flight -----------------------------------------------------------------------------

    async def _wait_room(self, model: ModelLane) -> None:
        while len(model.inflight) >= model.runner.max_inflight:
            model.room.clear()
            await model.room.wait()

    async def _dispatch(self, model: ModelLane, batch: list[tuple[StreamCore, Window]]) -> None:
        """Start a run; the loop goes on taking windows while the runner has room for more.

        A runner with room for one run at a time (a local model) is awaited in
        place: nothing could be taken meanwhile anyway.
        """
        if model.runner.max_inflight == 1:
            await self._run(model, batch)
            return
        task = asyncio.get_running_loop().create_task(self._run(model, batch), name="run")
        model.inflight.add(task)

        def done(task: asyncio.Task[None]) -> None:
            model.inflight.discard(task)
            model.room.set()
            if not task.cancelled() and task.exception() is not None:
                log.error("a scoring run failed: %s", task.exception())

        task.add_done_callback(done)

    async def _answered(self, model: ModelLane) -> None:
        """Wait for every run in flight (the run is ending)."""
        while model.inflight:
            await asyncio.gather(*list(model.inflight), return_exceptions=True)

    async def _run(self, model: ModelLane, batch: list[tuple[StreamCore, Window]]) -> None:
        try:
            lane = model.index
            outcome = await model.runner.run([w.audio for _, w in batch], [core.lanes[lane].state for core, _ in batch],
                                             [w.start for _, w in batch])
            if outcome.took is not None:
                self._ran(model, len(batch), outcome.took)
            self._resolve(model, batch, outcome)
        finally:
            del batch
            await self._wake_enders()

    async def _wake_enders(self) -> None:
        """Ending streams wait for their last windows to be resolved: let them look again."""
        async with self._resolved:
            self._resolved.notify_all()

    def _ran(self, model: ModelLane, n: int, took: float) -> None:
        """Count a model run (local, or a request's round trip)."""
        model.batches.append(n)
        model.runs += 1
        model.windows_run += n
        model.schedule.ran(took)
        if model.index == 0:
            for observe in self.batch_observers:
                observe(n, took)

    def _resolve(self, model: ModelLane, batch: list[tuple[StreamCore, Window]], outcome: Outcome) -> None:
        touched: dict[str, StreamCore] = {}
        names = model.runner.names
        for i, ((core, w), v) in enumerate(zip(batch, outcome.values)):
            if not w.resolved:  # a stopped stream has given up on its windows already
                named = None
                if names and outcome.scores is not None:
                    named = dict(zip(names, (float(x) for x in outcome.scores[i])))
                core.resolve(w, v, outcome.reason, named)
            touched[core.name] = core
        for core in touched.values():
            self._publish_drained(core)

    # -- the run ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """End all streams now (their ``stream_ended`` says ``stopped``); safe from a signal handler."""
        self._stop.set()

    async def run(self, duration: float | None = None) -> None:
        """Run until every input has ended, :meth:`stop` is called, or ``duration`` seconds pass.

        An input that opens streams (an RTP port) never ends by itself, so a
        monitor with one runs until stopped or for ``duration``.
        """
        for model in self.models:
            await model.runner.start(self.bus.publish, self.wall)
        scorers = [asyncio.create_task(self._score_loop(m), name=f"scorer:{m.stream.model}") for m in self.models]
        self._idle.set()
        self._inputs_end = any(not (isinstance(s, StreamSet) and s.endpoint) for s in self.sources)
        for s in self.sources:
            if isinstance(s, StreamSet):
                task = self._spawn(self._watch(s), f"input:{s.name}")
                self._set_tasks.add(task)
                if s.endpoint:
                    self._endpoints.add(task)
            else:
                self.attach(s)
        self._check_idle()
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        idle = asyncio.create_task(self._idle.wait(), name="idle")
        either: set[asyncio.Future[Any]] = {idle, stopper}
        try:
            await asyncio.wait(either, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            idle.cancel()
            # Stream sets first, so that they attach nothing more; then the streams.
            for group in (self._set_tasks, self._tasks):
                while group:
                    batch = list(group)
                    for t in batch:
                        t.cancel()  # a no-op for tasks that have ended
                    await asyncio.gather(*batch, return_exceptions=True)
                    group.difference_update(batch)
            for model in self.models:
                await model.queue.put(_STOP)
            self._closing = True
            for model in self.models:
                model.wake.set()
            try:
                await asyncio.gather(*scorers)
            finally:
                for model in self.models:
                    await model.runner.aclose()
                self.bus.close()
