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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from scoreq_live.bus import EventBus
from scoreq_live.core.events import (
    BackendState,
    BackendStatus,
    EndReason,
    InputDropped,
    ScoreEvent,
    SkipReason,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from scoreq_live.core.stream import StreamConfig, StreamCore, Window
from scoreq_live.scoring.scorer import BackendUnavailable
from scoreq_live.sources.base import Source, SourceError, StreamSet

log = logging.getLogger(__name__)

OVERLOADED: SkipReason = "overloaded"
ERROR: SkipReason = "error"
BACKEND_UNAVAILABLE: SkipReason = "backend_unavailable"
RETRY_FIRST_S = 0.5  # a lost backend is probed after this long, then at doubling intervals ...
RETRY_MAX_S = 10.0  # ... of at most this
RECENT_BATCHES = 1024  # run sizes kept for inspection (tests, benchmarks); older ones are only counted
RUN_EMA_ALPHA = 0.25  # weight of the latest model run in the run time the latency budget follows


class BatchScorer(Protocol):
    """What the engine needs of a scorer: one number per window, for a batch of windows (blocking)."""

    def score(self, windows: Sequence[np.ndarray]) -> np.ndarray: ...


class AsyncBatchScorer(BatchScorer, Protocol):
    """A scorer whose model is on an inference server: batches are awaited, several in flight at once."""

    @property
    def asynchronous(self) -> bool: ...

    @property
    def backend(self) -> str: ...

    async def score_async(self, windows: Sequence[np.ndarray]) -> np.ndarray: ...

    async def probe(self) -> None: ...


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


class Engine:
    """Runs sources concurrently and scores their windows in shared batches.

    Live inputs are scored within a latency budget (:attr:`latency_budget`):
    each stream has at most one window waiting for the scorer, a newer window
    replaces it (the older one is skipped as ``overloaded`` at once), batches
    take the streams served least recently first, and a window that could no
    longer be scored within the budget is skipped.  When the scorer cannot keep
    up, every stream is thinned alike (scored at a longer effective hop) and
    latency stays bounded.  With ``fast`` (files played as fast as scoring
    allows) every window is scored and the inputs wait for the scorer.

    ``sources`` are the inputs known at start: single streams (:class:`Source`)
    and inputs that open streams while the monitor runs (:class:`StreamSet`).
    :meth:`attach` adds a stream at any time.

    A scorer on an inference server (``asynchronous``, see
    :class:`AsyncBatchScorer`) gets no executor thread: each batch is sent as a
    task and the loops keep taking windows while fewer than ``max_inflight``
    batches are unanswered.  When the server is lost (:class:`BackendUnavailable`)
    windows are skipped as ``backend_unavailable`` (or scored by ``fallback``),
    the server is probed with backoff, and :class:`BackendStatus` events say so;
    no stream ends for it.  :attr:`cores` holds the live
    streams only: an ended stream is forgotten at once (the outputs keep what
    they show of it), so streams that come and go do not grow memory.
    """

    def __init__(self, scorer: BatchScorer, sources: Sequence[Source | StreamSet], config: EngineConfig,
                 bus: EventBus, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, fallback: BatchScorer | None = None) -> None:
        self.scorer = scorer
        # A remote scorer (``score_async``): batches go out as tasks, and windows are skipped as
        # backend_unavailable (or scored by ``fallback``, a local model) while the server is lost.
        self.remote: AsyncBatchScorer | None = scorer if getattr(scorer, "asynchronous", False) else None  # type: ignore[assignment]
        self.fallback = fallback if self.remote is not None else None
        self.backend_state: BackendState | None = None  # None: no remote backend
        self.backend_since = 0.0
        self.backend_error = ""
        self._inflight: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()  # set when a request in flight is answered
        self._probe: asyncio.Task[None] | None = None
        self._takes = 0  # batches taken (live): the order in which streams were last served
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
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=config.max_pending)  # --fast
        self._slots: dict[StreamCore, Window] = {}  # live: the one window each stream has waiting
        self._served: dict[StreamCore, int] = {}  # live: the run that last took a window of each stream
        self._wake = asyncio.Event()  # live: a window is waiting, or the run ends
        self._closing = False
        self.run_ema_s: float | None = None  # recent seconds per model run (exponential moving average)
        self._resolved = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._stop = asyncio.Event()
        self.batches: deque[int] = deque(maxlen=RECENT_BATCHES)  # sizes of the latest model runs
        self.runs = 0  # model runs made
        self.windows_run = 0  # windows those runs scored (or failed on)
        self.batch_observers: list[BatchObserver] = []  # the metrics' hook

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
        self.cores[source.name] = StreamCore(source.name, self.config.stream)  # reserved before the task runs
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

    @property
    def latency_budget(self) -> float:
        """Seconds a live window may take from its last sample to its event (score or skip).

        ``max_latency_s`` when set; else the hop plus twice the recent model run
        time: a window may wait for the run in flight and then take its own.
        """
        if self.config.max_latency_s is not None:
            return self.config.max_latency_s
        return self.config.stream.hop_s + 2.0 * (self.run_ema_s or 0.0)

    async def _submit(self, core: StreamCore, window: Window) -> None:
        if self.config.fast:
            await self._queue.put((core, window))
            return
        waiting = self._slots.get(core)
        if waiting is not None and not waiting.resolved:
            core.resolve(waiting, None, OVERLOADED)  # a newer window replaces it: its skip goes out now
        self._slots[core] = window
        self._wake.set()

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
                                             t=core.t, windows=core.windows, scored=core.scored))
            self._slots.pop(core, None)
            self._served.pop(core, None)
            if self.cores.get(source.name) is core:  # forget it: the outputs keep what they show of it
                del self.cores[source.name]
                del self._inputs[source.name]

    def _started(self, source: Source) -> None:
        cfg = self.config.stream
        self.bus.publish(StreamStarted(
            stream=source.name, ts=self.wall(), source=source.kind, detail=source.detail,
            rate=source.rate, channels=source.channels, model=cfg.model, mode=cfg.mode,
            window_s=cfg.window_s, hop_s=cfg.hop_s))

    async def _collect(self, first: tuple[StreamCore, Window]) -> list[tuple[StreamCore, Window]]:
        batch = [first]
        deadline = self.clock() + (0 if self.config.fast else self.config.batch_wait_s)
        while len(batch) < self.config.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - self.clock()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if isinstance(item, _Stop):
                self._queue.put_nowait(item)  # seen again after this batch
                break
            batch.append(item)
        return batch

    async def _score_loop(self) -> None:
        if not self.config.fast:
            await self._score_live()
            return
        while True:
            first = await self._queue.get()
            if isinstance(first, _Stop):
                await self._answered()
                return
            if self.remote is not None:
                await self._wait_room()  # windows queue up meanwhile and join this batch
                self._dispatch(await self._collect(first))
            else:
                await self._score_batch(await self._collect(first))
            del first  # hold nothing of a batch while waiting for the next: ended streams are freed now
            async with self._resolved:
                self._resolved.notify_all()

    async def _score_live(self) -> None:
        """Live inputs: score the streams' waiting windows, fairly, within the latency budget."""
        cfg = self.config
        while True:
            while not self._slots:
                if self._closing:
                    await self._answered()
                    return
                self._wake.clear()
                await self._wake.wait()
            if self.remote is not None:
                await self._wait_room()  # newer windows replace waiting ones meanwhile, as for a local run
            # Windows of other streams due at the same moment join this run (sources are not in step).
            deadline = self.clock() + cfg.batch_wait_s
            while len(self._slots) < cfg.max_batch and not self._closing:
                left = deadline - self.clock()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if batch and self.remote is not None:
                self._dispatch(batch)
            elif batch:
                await self._score_batch(batch)
            del batch  # hold nothing of a batch while waiting for the next: ended streams are freed now
            async with self._resolved:
                self._resolved.notify_all()

    def _take(self) -> list[tuple[StreamCore, Window]]:
        """The next run's windows: streams served least recently first; those past the budget are skipped."""
        now = self.clock()
        budget = self.latency_budget
        run_s = self.run_ema_s or 0.0  # the run this batch will take
        # A budget shorter than a run (and the batch wait) cannot be kept by any window: then only newer
        # windows replacing waiting ones thin the streams, and each stream's newest window is scored in turn.
        keepable = run_s + self.config.batch_wait_s < budget
        order = sorted(self._slots.items(), key=lambda cw: (self._served.get(cw[0], -1), cw[1].arrival))
        batch: list[tuple[StreamCore, Window]] = []
        skipped: list[StreamCore] = []
        for core, w in order:
            if w.resolved:  # given up when its stream was stopped
                del self._slots[core]
            elif keepable and now - w.arrival + run_s > budget:
                del self._slots[core]
                core.resolve(w, None, OVERLOADED)
                skipped.append(core)
            elif len(batch) < self.config.max_batch:
                del self._slots[core]
                batch.append((core, w))
                self._served[core] = self._takes
        for core in skipped:
            self._publish_drained(core)
        if batch:
            self._takes += 1
        return batch

    async def _score_batch(self, batch: list[tuple[StreamCore, Window]],
                           scorer: BatchScorer | None = None) -> None:
        audio = [w.audio for _, w in batch]
        t0 = time.perf_counter()
        values: Sequence[float | None]
        reason: SkipReason | None = None
        try:
            values = list(await asyncio.get_running_loop().run_in_executor(
                self._executor, (scorer or self.scorer).score, audio))
        except Exception as e:
            log.error("scoring a batch of %d windows failed: %s", len(batch), e)
            values, reason = [None] * len(batch), ERROR
        self._ran(batch, values, reason, time.perf_counter() - t0)

    def _ran(self, batch: list[tuple[StreamCore, Window]], values: Sequence[float | None],
             reason: SkipReason | None, took: float) -> None:
        """Count a model run (local or a request's round trip) and publish its windows' events."""
        self.batches.append(len(batch))
        self.runs += 1
        self.windows_run += len(batch)
        ema = self.run_ema_s
        self.run_ema_s = took if ema is None else ema + RUN_EMA_ALPHA * (took - ema)
        for observe in self.batch_observers:
            observe(len(batch), took)
        self._resolve(batch, values, reason)

    def _resolve(self, batch: list[tuple[StreamCore, Window]], values: Sequence[float | None],
                 reason: SkipReason | None) -> None:
        touched: dict[str, StreamCore] = {}
        for (core, w), v in zip(batch, values):
            if not w.resolved:  # a stopped stream has given up on its windows already
                core.resolve(w, None if v is None else float(v), reason)
            touched[core.name] = core
        for core in touched.values():
            self._publish_drained(core)

    # -- a scorer on an inference server ------------------------------------------------------------

    async def _wait_room(self) -> None:
        while len(self._inflight) >= max(1, self.config.max_inflight):
            self._room.clear()
            await self._room.wait()

    def _dispatch(self, batch: list[tuple[StreamCore, Window]]) -> None:
        """Send a batch without waiting for its answer (the loop goes on taking windows)."""
        task = asyncio.get_running_loop().create_task(self._score_remote(batch), name="request")
        self._inflight.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("a scoring request failed: %s", task.exception())

    async def _answered(self) -> None:
        """Wait for every request in flight (the run is ending)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def _score_remote(self, batch: list[tuple[StreamCore, Window]]) -> None:
        assert self.remote is not None
        try:
            if self.backend_state == "up":
                t0 = time.perf_counter()
                try:
                    values = list(await self.remote.score_async([w.audio for _, w in batch]))
                except BackendUnavailable as e:
                    self._backend_lost(str(e))
                except Exception as e:
                    log.error("scoring a batch of %d windows failed: %s", len(batch), e)
                    self._ran(batch, [None] * len(batch), ERROR, time.perf_counter() - t0)
                    return
                else:
                    self._ran(batch, values, None, time.perf_counter() - t0)
                    return
            if self.fallback is not None:
                await self._score_batch(batch, self.fallback)
            else:
                # Skipped at once, not counted as a model run: no request was made for them.
                self._resolve(batch, [None] * len(batch), BACKEND_UNAVAILABLE)
        finally:
            del batch
            async with self._resolved:
                self._resolved.notify_all()

    def _set_backend(self, state: BackendState, error: str = "") -> None:
        if state == self.backend_state:
            return
        self.backend_state, self.backend_error, self.backend_since = state, error, self.wall()
        assert self.remote is not None
        self.bus.publish(BackendStatus(stream="", ts=self.backend_since, state=state, backend=self.remote.backend,
                                       error=error, since=self.backend_since))

    def _backend_lost(self, error: str) -> None:
        """The backend stopped answering: say so once, and probe it with backoff until it answers."""
        if self.backend_state != "up":
            return
        log.warning("scoring backend lost: %s", error)
        self._set_backend("fallback" if self.fallback is not None else "down", error)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._reconnect(), name="backend-probe")

    async def _reconnect(self) -> None:
        assert self.remote is not None
        wait = RETRY_FIRST_S
        while True:
            await asyncio.sleep(wait)
            try:
                await self.remote.probe()
            except BackendUnavailable as e:
                wait = min(wait * 2, RETRY_MAX_S)
                if str(e) != self.backend_error:
                    log.info("scoring backend still unavailable: %s", e)
                continue
            except Exception as e:  # a bug in the probe must not end retries silently
                log.warning("probing the scoring backend failed: %s", e)
                wait = min(wait * 2, RETRY_MAX_S)
                continue
            log.warning("scoring backend back: %s", self.remote.backend)
            self._set_backend("up")
            return

    def stop(self) -> None:
        """End all streams now (their ``stream_ended`` says ``stopped``); safe from a signal handler."""
        self._stop.set()

    async def run(self, duration: float | None = None) -> None:
        """Run until every input has ended, :meth:`stop` is called, or ``duration`` seconds pass.

        An input that opens streams (an RTP port) never ends by itself, so a
        monitor with one runs until stopped or for ``duration``.
        """
        scorer_task = asyncio.create_task(self._score_loop(), name="scorer")
        if self.remote is not None:
            if getattr(getattr(self.remote, "model", None), "connected", True):
                self._set_backend("up")
            else:  # started while the server was unreachable (with a local model to fall back on)
                self.backend_state = "up"
                self._backend_lost(f"{self.remote.backend} was unreachable at start")
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
            await self._queue.put(_STOP)
            self._closing = True
            self._wake.set()
            try:
                await scorer_task
            finally:
                if self._probe is not None:
                    self._probe.cancel()
                    await asyncio.gather(self._probe, return_exceptions=True)
                close = getattr(getattr(self.remote, "model", None), "aclose", None)
                if close is not None:
                    await close()
                self._executor.shutdown(wait=False, cancel_futures=True)
                self.bus.close()
