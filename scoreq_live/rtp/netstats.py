"""Network numbers of one RTP stream per window of its media time (the 16 kHz output, t = 0 at its first sample).

A stream records what happens to each packet at the media position the packet's audio occupies in
the output: a released packet or a lost one counts as *expected* there, a packet that arrived (in
time or late) as *received*, duplicates and late packets where their timestamp maps to.  Concealed
output samples are recorded as sample ranges.  Everything goes into 10 ms buckets kept in a ring
covering the last ``history_s`` seconds (60 by default), so a long call does not grow memory, and
:meth:`NetHistory.window` sums the buckets of ``[t0, t1)`` into a :class:`NetWindow`.

Window numbers:

* ``loss_pct``: RFC 3550 A.3 over the window, ``(expected - received) / expected``, clamped at 0.
* ``jitter_ms``: the RFC 3550 A.8 interarrival jitter estimate *averaged over the window's packets*
  (the estimate after each packet, mean over the packets whose audio lies in the window); the current
  estimate when no packet of the window arrived.  The average, not the value at the window's end: with
  its gain of 1/16 the running estimate wanders +-25 % around the true mean |D| from one moment to the
  next, the window's average stays within a few per cent of it.
* ``concealed``: fraction of the window's released samples that are concealment (lost or late packets).
* ``r_factor`` / ``mos_cq``: ITU-T G.107 (:mod:`scoreq_live.rtp.emodel`) from the packets the listener
  misses (lost + late, i.e. concealed slots, per cent of expected), with G.107 BurstR estimated from
  the window's loss runs (mean run length x (1 - loss ratio); 1 for random loss), the codec's Bpl
  with or without PLC, and no delay term (the one-way delay is not known to a receiver without RTCP).
"""

from __future__ import annotations

import math

import numpy as np

from scoreq_live.core.events import NetQuality
from scoreq_live.rtp import emodel

SAMPLE_RATE = 16000
BUCKET = 160  # samples per bucket: 10 ms at 16 kHz

# columns of the count table
_EXPECTED, _RECEIVED, _DUPLICATED, _LATE, _MISSED, _RUNS, _CONCEALED, _JITTER_N = range(8)


NetWindow = NetQuality
"""One window's network numbers: the ``net`` of score events (:class:`scoreq_live.core.events.NetQuality`)."""


def burst_ratio(missed: int, runs: int, expected: int) -> float:
    """G.107 BurstR from ``missed`` packets in ``runs`` runs out of ``expected``: 1 for random loss."""
    if missed <= 0 or runs <= 0 or expected <= 0 or missed >= expected:
        return 1.0
    return max(1.0, (missed / runs) * (1.0 - missed / expected))


def quality(codec: str, missed_pct: float, burst_r: float, plc: bool) -> tuple[float, float]:
    """(R, MOS-CQ) from the E-model; a codec it does not know is rated like linear PCM (Ie 0)."""
    name = codec if codec.lower() in {c.lower() for c in emodel.codecs()} else "L16"
    r = emodel.r_factor(name, missed_pct, burst_r, 0.0, plc)
    return r, emodel.mos_cq(r)


class NetHistory:
    """Per-bucket counters over the last ``history_s`` seconds of one stream's media time."""

    def __init__(self, history_s: float = 60.0) -> None:
        self.n = max(int(math.ceil(history_s * SAMPLE_RATE / BUCKET)), 1)
        self._ids = np.full(self.n, -1, np.int64)  # which bucket each ring row holds now
        self._counts = np.zeros((self.n, 8), np.int32)
        self._jitter = np.zeros(self.n)  # sum of the estimates after the bucket's packets, seconds
        self._newest = -1

    def _row(self, bucket: int) -> int:
        """Ring row for ``bucket`` (reset when it held an older bucket); -1 when too old to keep."""
        i = bucket % self.n
        held = int(self._ids[i])
        if held != bucket:
            if held > bucket or bucket <= self._newest - self.n:
                return -1
            self._ids[i] = bucket
            self._counts[i] = 0
            self._jitter[i] = 0.0
            if bucket > self._newest:
                self._newest = bucket
        return i

    def add(self, pos: float, column: int, count: int = 1) -> None:
        i = self._row(int(pos) // BUCKET)
        if i >= 0:
            self._counts[i, column] += count

    def add_packet(self, pos: float, received: bool) -> None:
        """A released packet slot: expected there, and received when it is a packet."""
        i = self._row(int(pos) // BUCKET)
        if i >= 0:
            self._counts[i, _EXPECTED] += 1
            if received:
                self._counts[i, _RECEIVED] += 1

    def add_missed(self, pos: float, step: float, k: int) -> None:
        """``k`` consecutive slots given up, the first at ``pos``, one every ``step`` samples (one run)."""
        if k <= 0:
            return
        buckets = ((pos + step * np.arange(k)) // BUCKET).astype(np.int64)
        ids, counts = np.unique(buckets, return_counts=True)
        for j, (b, n) in enumerate(zip(ids.tolist(), counts.tolist())):
            i = self._row(b)
            if i >= 0:
                self._counts[i, _EXPECTED] += n
                self._counts[i, _MISSED] += n
                if j == 0:
                    self._counts[i, _RUNS] += 1

    def add_duplicate(self, pos: float) -> None:
        self.add(pos, _DUPLICATED)

    def add_late(self, pos: float) -> None:
        i = self._row(int(pos) // BUCKET)
        if i >= 0:
            self._counts[i, _RECEIVED] += 1
            self._counts[i, _LATE] += 1

    def add_concealed(self, start: float, end: float) -> None:
        """Output samples ``[start, end)`` are concealment."""
        a, b = int(round(start)), int(round(end))
        while a < b:
            bucket = a // BUCKET
            top = min((bucket + 1) * BUCKET, b)
            i = self._row(bucket)
            if i >= 0:
                self._counts[i, _CONCEALED] += top - a
            a = top

    def add_jitter(self, pos: float, jitter_s: float) -> None:
        """The jitter estimate after a packet whose audio lies at ``pos``."""
        i = self._row(int(pos) // BUCKET)
        if i >= 0:
            self._jitter[i] += jitter_s
            self._counts[i, _JITTER_N] += 1

    def window(self, t0: float, t1: float, released: float, codec: str, plc: bool,
               current_jitter_s: float) -> NetWindow:
        """The numbers of media time ``[t0, t1)`` s; ``released``: output samples released so far."""
        s0 = max(int(round(t0 * SAMPLE_RATE)), 0)
        s1 = max(int(round(t1 * SAMPLE_RATE)), s0)
        b0 = s0 // BUCKET
        b1 = -(-s1 // BUCKET)
        b0 = max(b0, b1 - self.n)
        buckets = np.arange(b0, b1, dtype=np.int64)
        rows = buckets % self.n
        rows = rows[self._ids[rows] == buckets]
        c = self._counts[rows].sum(axis=0, dtype=np.int64) if rows.size else np.zeros(8, np.int64)
        expected, received = int(c[_EXPECTED]), int(c[_RECEIVED])
        missed = int(c[_MISSED])
        lost = max(expected - received, 0)
        samples = max(min(s1, int(released)) - s0, 0)
        concealed = min(int(c[_CONCEALED]) / samples, 1.0) if samples else 0.0
        jitter_s = float(self._jitter[rows].sum()) / int(c[_JITTER_N]) if c[_JITTER_N] else current_jitter_s
        missed_pct = 100.0 * missed / expected if expected else 0.0
        r, mos = quality(codec, missed_pct, burst_ratio(missed, int(c[_RUNS]), expected), plc)
        return NetWindow(
            codec=codec, expected=expected, received=received, lost=lost, duplicated=int(c[_DUPLICATED]),
            late=int(c[_LATE]), loss_pct=100.0 * lost / expected if expected else 0.0, jitter_ms=1000.0 * jitter_s,
            concealed=concealed, r_factor=r, mos_cq=mos)
