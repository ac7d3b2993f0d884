"""Sliding-window scheduling: which ``[start, end)`` sample ranges are due."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowSpan:
    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class WindowScheduler:
    """Emits windows of ``window`` samples every ``hop`` samples.

    The first window ends once ``window`` samples have arrived; later ones
    follow on the hop grid.  When the stream ends, :meth:`finish` returns the
    tail: the next window on the hop grid, cut short at the end of the stream
    (or the whole stream, if it never filled one window).  Short windows are
    scored at their own length (or padded by the model's contract), never
    silently dropped.
    """

    def __init__(self, window: int, hop: int) -> None:
        if window <= 0 or hop <= 0:
            raise ValueError("window and hop must be positive")
        if hop > window:
            raise ValueError("hop must not exceed the window (samples would be skipped)")
        self.window = window
        self.hop = hop
        self._next = 0  # index of the next window to emit
        self._finished = False

    def _start(self, index: int) -> int:
        return index * self.hop

    @property
    def next_end(self) -> int:
        """The sample count at which the next window is complete."""
        return self._start(self._next) + self.window

    def due(self, total: int) -> list[WindowSpan]:
        """Windows that became complete now that ``total`` samples have arrived."""
        out = []
        while not self._finished and self._start(self._next) + self.window <= total:
            s = self._start(self._next)
            out.append(WindowSpan(self._next, s, s + self.window))
            self._next += 1
        return out

    def finish(self, total: int, min_samples: int = 1) -> WindowSpan | None:
        """The tail window at end of stream, if any samples were never covered."""
        if self._finished:
            return None
        self._finished = True
        if self._next == 0:
            if total >= min_samples:
                self._next = 1
                return WindowSpan(0, 0, total)
            return None
        last_end = self._start(self._next - 1) + self.window
        start = self._start(self._next)
        if total > last_end and total - start >= min_samples:
            span = WindowSpan(self._next, start, total)
            self._next += 1
            return span
        return None
