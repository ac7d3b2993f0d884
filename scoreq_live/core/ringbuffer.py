"""A fixed-capacity ring of float32 samples addressed by absolute sample index."""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """Keeps the most recent ``capacity`` samples of a stream.

    Samples are addressed by their absolute index since the stream started, so
    the window scheduler can ask for ``[start, end)`` without knowing where the
    ring wraps.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self.total = 0
        """Samples written since the stream started (the absolute end index)."""

    @property
    def oldest(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self.total - self.capacity)

    def write(self, samples: np.ndarray) -> None:
        """Append samples, overwriting the oldest ones when full."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        n = x.size
        if n == 0:
            return
        if n >= self.capacity:
            # Only the newest `capacity` samples can survive.
            x = x[-self.capacity:]
            skipped = n - self.capacity
            self.total += skipped
            n = self.capacity
        pos = self.total % self.capacity
        first = min(n, self.capacity - pos)
        self._data[pos:pos + first] = x[:first]
        if first < n:
            self._data[:n - first] = x[first:]
        self.total += n

    def views(self, start: int, end: int) -> tuple[np.ndarray, ...]:
        """Samples ``[start, end)`` as one or two views of the ring (no copy; valid until the next write)."""
        if start < self.oldest or end > self.total or start > end:
            raise IndexError(
                f"samples [{start}, {end}) not held (ring holds [{self.oldest}, {self.total}))"
            )
        n = end - start
        pos = start % self.capacity
        if pos + n <= self.capacity:
            return (self._data[pos:pos + n],)
        return (self._data[pos:], self._data[:n - (self.capacity - pos)])

    def read(self, start: int, end: int) -> np.ndarray:
        """Return a copy of samples ``[start, end)`` (absolute indices)."""
        parts = self.views(start, end)
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
