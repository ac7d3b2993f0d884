"""Which live windows the scorer runs next, and which it gives up on: fair and within a latency budget.

Pure: no asyncio, no clock.  The engine offers each stream's windows as they
are cut (:meth:`LiveScheduler.offer`), takes a batch whenever the scorer has
room (:meth:`LiveScheduler.take`, the time passed in) and reports how long
each model run took (:meth:`LiveScheduler.ran`).  The rules:

- each stream has at most one window waiting; a newer window replaces it, and
  the replaced one is skipped as ``overloaded`` at once;
- a batch takes the streams served least recently first, so that when the
  scorer cannot keep up every stream is thinned alike (scored at a longer
  effective hop) instead of some streams starving;
- a window that could no longer be scored within the latency budget (its
  wait so far plus the run it would take) is skipped as ``overloaded``.

The budget is ``max_latency_s`` when set, else the hop plus twice the recent
model run time: a window may wait for the run in flight and then take its own.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from scoreq_live.core.events import SkipReason
from scoreq_live.core.stream import Window

K = TypeVar("K", bound=Hashable)

OVERLOADED: SkipReason = "overloaded"
RUN_EMA_ALPHA = 0.25  # weight of the latest model run in the run time the latency budget follows


@dataclass
class Take(Generic[K]):
    """One call's result: the windows to run now, and the windows given up (with why), per stream key."""

    batch: list[tuple[K, Window]] = field(default_factory=list)
    skipped: list[tuple[K, Window, SkipReason]] = field(default_factory=list)


class LiveScheduler(Generic[K]):
    """The waiting windows of live streams, one per stream (``K`` is whatever names a stream to the caller)."""

    def __init__(self, hop_s: float, max_batch: int, batch_wait_s: float = 0.0,
                 max_latency_s: float | None = None) -> None:
        self.hop_s = hop_s
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = batch_wait_s
        self.max_latency_s = max_latency_s
        self.run_s: float | None = None  # recent seconds per model run (exponential moving average)
        self._slots: dict[K, Window] = {}  # the one window each stream has waiting
        self._served: dict[K, int] = {}  # the take that last served each stream
        self._takes = 0

    @property
    def budget(self) -> float:
        """Seconds a live window may take from its last sample to its event (score or skip)."""
        if self.max_latency_s is not None:
            return self.max_latency_s
        return self.hop_s + 2.0 * (self.run_s or 0.0)

    @property
    def waiting(self) -> int:
        """Streams with a window waiting."""
        return len(self._slots)

    @property
    def full(self) -> bool:
        """Enough windows wait to fill a batch (no reason to wait for more)."""
        return len(self._slots) >= self.max_batch

    def offer(self, key: K, window: Window) -> Window | None:
        """A stream's newest window; returns the one it replaces, if that was still waiting (skip it: overloaded)."""
        waiting = self._slots.get(key)
        self._slots[key] = window
        if waiting is not None and not waiting.resolved:
            return waiting
        return None

    def forget(self, key: K) -> None:
        """The stream has ended: drop what is kept of it."""
        self._slots.pop(key, None)
        self._served.pop(key, None)

    def ran(self, took: float) -> None:
        """A model run (or a request's round trip) took ``took`` seconds: the budget follows recent runs."""
        ema = self.run_s
        self.run_s = took if ema is None else ema + RUN_EMA_ALPHA * (took - ema)

    def take(self, now: float) -> Take[K]:
        """The next run's windows (streams served least recently first) and those that can no longer make it.

        ``now`` is the clock of the windows' ``arrival``.  Windows already
        resolved (their stream was stopped) are dropped silently.
        """
        out: Take[K] = Take()
        budget = self.budget
        run_s = self.run_s or 0.0  # the run this batch will take
        # A budget shorter than a run (and the batch wait) cannot be kept by any window: then only newer
        # windows replacing waiting ones thin the streams, and each stream's newest window is scored in turn.
        keepable = run_s + self.batch_wait_s < budget
        order = sorted(self._slots.items(), key=lambda kw: (self._served.get(kw[0], -1), kw[1].arrival))
        for key, w in order:
            if w.resolved:
                del self._slots[key]
            elif keepable and now - w.arrival + run_s > budget:
                del self._slots[key]
                out.skipped.append((key, w, OVERLOADED))
            elif len(out.batch) < self.max_batch:
                del self._slots[key]
                out.batch.append((key, w))
                self._served[key] = self._takes
        if out.batch:
            self._takes += 1
        return out
