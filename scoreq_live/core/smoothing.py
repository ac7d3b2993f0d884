"""Smoothing of a window-score series in stream time."""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

import numpy as np


class Smoother(Protocol):
    def update(self, t: float, value: float) -> float:
        """Add the score of the window ending at stream time ``t``; return the smoothed value."""

    @property
    def value(self) -> float | None:
        """The current smoothed value (None before the first score)."""


class EmaSmoother:
    """Exponential moving average with a time constant in seconds.

    The weight of a new score depends on the stream time since the previous
    one, so a gap (windows skipped for no speech) lets the new score count
    more, and the result does not depend on the hop.
    """

    def __init__(self, tau: float) -> None:
        if tau < 0:
            raise ValueError("time constant must be >= 0")
        self.tau = tau
        self._value: float | None = None
        self._t: float | None = None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, t: float, value: float) -> float:
        if self._value is None or self._t is None or self.tau == 0:
            self._value = value
        else:
            dt = max(0.0, t - self._t)
            alpha = 1.0 - math.exp(-dt / self.tau) if dt > 0 else 0.0
            self._value = self._value + alpha * (value - self._value)
        self._t = t
        return self._value


class MedianSmoother:
    """Median of the scores whose windows ended within the last ``span`` seconds.

    Robust to a single outlier window (a cough, a door) where the EMA is not.
    """

    def __init__(self, span: float) -> None:
        if span <= 0:
            raise ValueError("median span must be > 0")
        self.span = span
        self._items: deque[tuple[float, float]] = deque()
        self._value: float | None = None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, t: float, value: float) -> float:
        self._items.append((t, value))
        while self._items and self._items[0][0] <= t - self.span:
            self._items.popleft()
        self._value = float(np.median([v for _, v in self._items]))
        return self._value


def make_smoother(kind: str, seconds: float) -> Smoother:
    """The smoother ``--smoothing`` names, with its time constant or span in seconds."""
    if kind == "ema":
        return EmaSmoother(seconds)
    if kind == "median":
        return MedianSmoother(seconds)
    raise ValueError(f"unknown smoothing {kind!r} (use 'ema' or 'median')")
