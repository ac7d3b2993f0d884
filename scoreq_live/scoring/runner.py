"""Running batches of windows: on a local model (an executor thread) or on an inference server (in flight).

One interface for the engine, :class:`Runner`: ``await run(windows, states)``
gives an :class:`Outcome` (the scores of each window, or why there are none,
and how long the model took) and never raises for a failing model;
``max_inflight`` says how many runs the engine may have started and not seen
answered; ``names`` and ``new_state`` are the model family's (named scores,
per-stream state).

- :class:`LocalRunner`: one run at a time on a thread of its own, so the
  event loop stays free while the model computes.
- :class:`RemoteRunner`: a :class:`~scoreq_live.scoring.scorer.RemoteScorer`;
  several requests in flight (the server's batcher merges what arrives
  together), the server's health followed by
  :class:`~scoreq_live.core.health.BackendHealth`: while it is lost, windows
  are skipped as ``backend_unavailable`` (or scored by a local fallback
  runner) and the server is probed with backoff; each change of state is
  published as a :class:`~scoreq_live.core.events.BackendStatus` event.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from scoreq_live.core.events import BackendStatus, SkipReason
from scoreq_live.core.health import BackendHealth
from scoreq_live.scoring.scorer import BackendUnavailable, RemoteScorer, Scorer

log = logging.getLogger(__name__)

ERROR: SkipReason = "error"
BACKEND_UNAVAILABLE: SkipReason = "backend_unavailable"


class BatchScorer(Protocol):
    """The least a local runner needs of a scorer: one number per window, for a batch of windows (blocking).

    A :class:`~scoreq_live.scoring.scorer.Scorer` gives more: every named score of
    its model's family, and per-stream state.
    """

    def score(self, windows: Sequence[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class Outcome:
    """What became of a batch: a value per window (``None``: not scored, ``reason`` says why).

    ``took`` is the model run's (or the request's round trip's) seconds, or
    ``None`` when no run was made (the windows were skipped at once).
    """

    values: Sequence[float | None]
    reason: SkipReason | None = None
    took: float | None = None
    scores: np.ndarray | None = None  # [N, len(names)]: every named score (the primary first), when scored

    @classmethod
    def failed(cls, n: int, reason: SkipReason, took: float | None = None) -> Outcome:
        return cls([None] * n, reason, took)

    @classmethod
    def scored(cls, scores: np.ndarray, took: float) -> Outcome:
        return cls([float(v) for v in scores[:, 0]], None, took, scores)


class Runner(abc.ABC):
    """Runs batches of windows for the engine."""

    max_inflight: int = 1  # runs started and not answered, at most
    names: tuple[str, ...] = ()  # the named scores of a window (empty: the primary score only, unnamed)

    def new_state(self) -> Any:
        """What the model keeps per stream between windows (``None``: nothing); handed back with its windows."""
        return None

    @abc.abstractmethod
    async def start(self, publish: Callable[[BackendStatus], None], now: Callable[[], float]) -> None:
        """Before the first batch (``publish`` takes status events, ``now`` gives Unix time)."""

    @abc.abstractmethod
    async def run(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None = None,
                  starts: Sequence[int] | None = None) -> Outcome:
        """Score a batch (``states``: each window's stream's; ``starts``: each window's first sample in its
        stream); a failure is an outcome (``error``), never raised."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """After the last batch."""


class LocalRunner(Runner):
    """A model on this machine, one run at a time on an executor thread."""

    def __init__(self, scorer: BatchScorer) -> None:
        self.scorer = scorer
        self.max_inflight = 1
        self.full = scorer if isinstance(scorer, Scorer) else None  # named scores and per-stream state
        self.names = self.full.names if self.full is not None else ()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")

    def new_state(self) -> Any:
        return self.full.new_state() if self.full is not None else None

    def _score(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None,
               starts: Sequence[int] | None = None) -> np.ndarray:
        if self.full is not None:
            return self.full.score_named(windows, states, starts)
        return np.asarray(self.scorer.score(windows), dtype=np.float64).reshape(-1, 1)

    async def start(self, publish: Callable[[BackendStatus], None], now: Callable[[], float]) -> None:
        return None  # nothing to connect to, no state to report

    async def run(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None = None,
                  starts: Sequence[int] | None = None) -> Outcome:
        t0 = time.perf_counter()
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._executor, self._score, windows, states,
                                                                      starts)
        except Exception as e:
            log.error("scoring a batch of %d windows failed: %s", len(windows), e)
            return Outcome.failed(len(windows), ERROR, time.perf_counter() - t0)
        return Outcome.scored(scores, time.perf_counter() - t0)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RemoteRunner(Runner):
    """A model on an inference server: requests in flight, the server's health followed, a local fallback."""

    def __init__(self, scorer: RemoteScorer, max_inflight: int = 4, fallback: LocalRunner | None = None) -> None:
        self.scorer = scorer
        self.max_inflight = max(1, max_inflight)
        self.fallback = fallback
        self.names = scorer.names
        self.health = BackendHealth(scorer.backend, fallback=fallback is not None)
        self._publish: Callable[[BackendStatus], None] = lambda ev: None
        self._now: Callable[[], float] = time.time
        self._probe: asyncio.Task[None] | None = None

    def _say(self, ev: BackendStatus | None) -> None:
        if ev is not None:
            self._publish(ev)

    async def start(self, publish: Callable[[BackendStatus], None], now: Callable[[], float]) -> None:
        self._publish, self._now = publish, now
        connected = self.scorer.connected  # else: started while the server was unreachable (with a fallback)
        self._say(self.health.start(connected, now()))
        if not connected:
            self._probe_soon()

    def new_state(self) -> Any:
        return self.scorer.new_state()

    async def run(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None = None,
                  starts: Sequence[int] | None = None) -> Outcome:
        if self.health.up:
            t0 = time.perf_counter()
            try:
                scores = await self.scorer.score_named_async(windows, states, starts)
            except BackendUnavailable as e:
                self._lost(str(e))
            except Exception as e:
                log.error("scoring a batch of %d windows failed: %s", len(windows), e)
                return Outcome.failed(len(windows), ERROR, time.perf_counter() - t0)
            else:
                return Outcome.scored(scores, time.perf_counter() - t0)
        if self.fallback is not None:
            return await self.fallback.run(windows, states, starts)
        # Skipped at once, not a model run: no request was made for them.
        return Outcome.failed(len(windows), BACKEND_UNAVAILABLE)

    def _lost(self, error: str) -> None:
        """The backend stopped answering: say so once, and probe it with backoff until it answers."""
        ev = self.health.lost(error, self._now())
        if ev is not None:
            log.warning("scoring backend lost: %s", error)
            self._say(ev)
        self._probe_soon()

    def _probe_soon(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._reconnect(), name="backend-probe")

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.health.retry_s)
            try:
                await self.scorer.probe()
            except BackendUnavailable as e:
                self.health.probe_failed()
                if str(e) != self.health.error:
                    log.info("scoring backend still unavailable: %s", e)
                continue
            except Exception as e:  # a bug in the probe must not end retries silently
                log.warning("probing the scoring backend failed: %s", e)
                self.health.probe_failed()
                continue
            log.warning("scoring backend back: %s", self.scorer.backend)
            self._say(self.health.recovered(self._now()))
            return

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self.scorer.aclose()
        if self.fallback is not None:
            await self.fallback.aclose()


def runner_for(scorer: BatchScorer, max_inflight: int = 4, fallback: BatchScorer | None = None) -> Runner:
    """The runner for a scorer: remote for a :class:`RemoteScorer` (with ``fallback`` while it is lost), else local."""
    if isinstance(scorer, RemoteScorer):
        return RemoteRunner(scorer, max_inflight, LocalRunner(fallback) if fallback is not None else None)
    return LocalRunner(scorer)
