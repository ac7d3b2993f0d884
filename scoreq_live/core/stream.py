"""Per-stream state: ring buffer -> windows -> speech gate -> ordered, smoothed events.

:class:`StreamCore` is sans-I/O: the engine feeds it samples with the current
time, hands the windows it returns to the scorer, reports results back with
:meth:`StreamCore.resolve`, and publishes whatever :meth:`StreamCore.drain`
releases.  Events leave in window order even when gated windows resolve
before earlier windows come back from the scorer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scoreq_live.core import SAMPLE_RATE
from scoreq_live.core.events import Mode, ModelScore, ScoreEvent, SkipReason, qualified
from scoreq_live.core.gate import NO_SPEECH, SILENT, SpeechDetector, level_dbfs
from scoreq_live.core.ringbuffer import RingBuffer
from scoreq_live.core.smoothing import make_smoother
from scoreq_live.core.windowing import WindowScheduler, WindowSpan


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is windowed, gated and smoothed."""

    window_s: float = 4.0
    hop_s: float = 1.0
    min_speech: float = 0.2  # fraction of 30 ms frames with speech needed to score a window
    silence_dbfs: float = -60.0  # below this RMS level a window is "silent", whatever the VAD says
    vad_aggressiveness: int = 2
    smoothing: Literal["ema", "median"] = "ema"
    smoothing_s: float = 5.0
    min_tail_s: float = 0.5  # shorter end-of-stream tails are not worth a score
    model: str = ""
    mode: Mode = "nr"

    @property
    def window(self) -> int:
        return int(round(self.window_s * SAMPLE_RATE))

    @property
    def hop(self) -> int:
        return int(round(self.hop_s * SAMPLE_RATE))


@dataclass
class Window:
    """One window of one stream, ready for the scorer.

    Its samples stay in the stream's ring buffer while the window waits (a
    live window is scored or replaced within about a hop, long before the ring
    overwrites them); the stream keeps a copy only when the ring is about to
    overwrite a window still waiting (files played ``--fast``, a backlog).  So
    a live stream costs its ring, not its ring and a copy of its window.
    """

    stream: str
    index: int  # the window's number among its lane's windows
    start: int  # absolute sample index at 16 kHz
    end: int
    speech: float
    level_dbfs: float
    arrival: float  # time the window's last sample arrived (engine clock)
    reason: SkipReason | None = None  # why it will not be scored, if it will not
    value: float | None = None
    scores: dict[str, float] | None = None  # every named score of the model's family, when scored
    resolved: bool = False
    ring: RingBuffer | None = field(default=None, repr=False)  # where the samples are, until kept or resolved
    kept: np.ndarray | None = field(default=None, repr=False)  # the samples, once the ring was about to lose them
    lane: int = 0  # which of the stream's models it is for (0: the first, whose events are ``score`` events)

    @property
    def audio(self) -> np.ndarray:
        """The window's samples (a copy; empty once the window is resolved)."""
        if self.kept is not None:
            return self.kept
        if self.ring is None:
            return np.zeros(0, dtype=np.float32)
        return self.ring.read(self.start, self.end)

    def keep(self) -> None:
        """Copy the samples out of the ring, which is about to overwrite them."""
        if self.kept is None and self.ring is not None:
            self.kept = self.ring.read(self.start, self.end)
        self.ring = None

    def release(self) -> None:
        self.kept = None
        self.ring = None

    @property
    def needs_scoring(self) -> bool:
        return self.reason is None

    @property
    def t_start(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def t_end(self) -> float:
        return self.end / SAMPLE_RATE


class Lane:
    """One model's part of a stream: its windows, their order, smoothing, and the model's per-stream state."""

    def __init__(self, index: int, config: StreamConfig) -> None:
        self.index = index
        self.config = config
        self.scheduler = WindowScheduler(config.window, config.hop)
        self.smoother = make_smoother(config.smoothing, config.smoothing_s)
        self.named_smoothers: dict[str, Any] = {}  # an additional model's, one per named score
        self.order: deque[Window] = deque()
        self.windows = 0
        self.scored = 0
        self.state: Any = None  # the model family's per-stream state (kept by the engine, opaque here)

    def smooth_named(self, t: float, scores: dict[str, float] | None) -> dict[str, float] | None:
        """Each named score smoothed over this lane's windows (``scores`` None: the values so far)."""
        cfg = self.config
        if scores is not None:
            for k, v in scores.items():
                sm = self.named_smoothers.get(k)
                if sm is None:
                    sm = self.named_smoothers[k] = make_smoother(cfg.smoothing, cfg.smoothing_s)
                sm.update(t, v)
        out = {k: sm.value for k, sm in self.named_smoothers.items() if sm.value is not None}
        return out or None


class StreamCore:
    """Windowing, gating, ordering and smoothing for one stream.

    ``config`` is the stream's first model's; ``extra`` one config per
    additional model (``--model A --model B``), each cutting its own windows
    with its own window and hop from the same ring buffer and speech gate.
    Windows carry their ``lane`` (0: the first model); the first model's
    results leave :meth:`drain` as :class:`ScoreEvent`, the others' as
    :class:`ModelScore`.
    """

    def __init__(self, name: str, config: StreamConfig, extra: Sequence[StreamConfig] = ()) -> None:
        self.name = name
        self.config = config
        self.lanes = [Lane(0, config), *(Lane(i + 1, c) for i, c in enumerate(extra))]
        # One window plus a hop of the longest model, plus slack for late scheduling.
        cap = max(c.window + c.hop for c in (config, *extra)) + SAMPLE_RATE
        self.ring = RingBuffer(cap)
        self.vad = SpeechDetector(config.vad_aggressiveness, capacity_frames=cap // 480 + 2)
        self.non_finite = 0  # samples that arrived as NaN/Inf and were zeroed

    # The first model's lane, as a stream scored by one model has only that.
    @property
    def windows(self) -> int:
        return self.lanes[0].windows

    @property
    def scored(self) -> int:
        return self.lanes[0].scored

    @property
    def state(self) -> Any:
        return self.lanes[0].state

    @state.setter
    def state(self, value: Any) -> None:
        self.lanes[0].state = value

    @property
    def t(self) -> float:
        """Stream time in seconds: samples received / 16 kHz."""
        return self.ring.total / SAMPLE_RATE

    def due_in(self) -> int:
        """Samples still to arrive before the next window of any model is complete (0 or less: it is due)."""
        return min(lane.scheduler.next_end for lane in self.lanes) - self.ring.total

    def feed(self, samples: np.ndarray, now: float) -> list[Window]:
        """Add 16 kHz mono float32 samples; return the windows that now need scoring."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            # Never let NaN/Inf reach the VAD or the model.
            self.non_finite += int(x.size - np.count_nonzero(finite))
            x = np.where(finite, x, 0.0).astype(np.float32)
        out: list[Window] = []
        # Cut large inputs (a whole file, a late burst) at the shortest hop so every window
        # is taken before the ring overwrites it.
        step = min(lane.config.hop for lane in self.lanes)
        for k in range(0, max(x.size, 1), step):
            piece = x[k:k + step]
            lost = self.ring.total + piece.size - self.ring.capacity  # samples before this index are overwritten
            for lane in self.lanes:
                for w in lane.order:
                    if not w.resolved and w.ring is not None and w.start < lost:
                        w.keep()
            self.ring.write(piece)
            self.vad.feed(piece)
            for lane in self.lanes:
                out += self._make(lane, lane.scheduler.due(self.ring.total), now)
        return out

    def finish(self, now: float) -> list[Window]:
        """End of stream: each model's tail window, if one is due."""
        out: list[Window] = []
        for lane in self.lanes:
            tail = lane.scheduler.finish(self.ring.total, int(lane.config.min_tail_s * SAMPLE_RATE))
            out += self._make(lane, [tail] if tail else [], now)
        return out

    def _make(self, lane: Lane, spans: Iterable[WindowSpan], now: float) -> list[Window]:
        out = []
        cfg = lane.config
        for span in spans:
            level = level_dbfs(self.ring.views(span.start, span.end))
            speech = self.vad.fraction(span.start, span.end)
            reason: SkipReason | None = None
            if level < cfg.silence_dbfs:
                reason = SILENT
            elif speech < cfg.min_speech:
                reason = NO_SPEECH
            w = Window(self.name, span.index, span.start, span.end, speech, level, now, reason, lane=lane.index)
            if reason is not None:
                w.resolved = True  # its samples are not needed
            else:
                w.ring = self.ring
            lane.order.append(w)
            lane.windows += 1
            if reason is None:
                out.append(w)
        return out

    def resolve(self, window: Window, value: float | None, reason: SkipReason | None = None,
                scores: dict[str, float] | None = None) -> None:
        """Record the scorer's result (or why there is none) for a window.

        ``value`` is the model's primary score; ``scores`` every named score of the model, the primary included.
        """
        window.value = value
        window.scores = scores if value is not None else None
        window.reason = reason if value is None else None
        window.resolved = True
        window.release()

    def abandon(self, reason: SkipReason) -> int:
        """Give up on every window still waiting for a scorer (``reason`` says why); returns how many.

        Their events come out of :meth:`drain` in order, unscored, like any skipped window.
        """
        n = 0
        for lane in self.lanes:
            for w in lane.order:
                if not w.resolved:
                    self.resolve(w, None, reason)
                    n += 1
        return n

    @property
    def pending(self) -> int:
        """Windows handed to a scorer and not resolved yet."""
        return sum(1 for lane in self.lanes for w in lane.order if not w.resolved)

    def drain(self, now: float, wall: float) -> list[ScoreEvent | ModelScore]:
        """Events for resolved windows at the head of each model's order, oldest first.

        ``now`` is the engine clock (for latency), ``wall`` the Unix time stamped on the events.
        """
        out: list[ScoreEvent | ModelScore] = []
        for lane in self.lanes:
            cfg = lane.config
            while lane.order and lane.order[0].resolved:
                w = lane.order.popleft()
                if w.value is not None:
                    lane.scored += 1
                latency = max(0.0, (now - w.arrival) * 1000.0)
                if lane.index:
                    named = None if w.value is None else {qualified(cfg.model, k): v
                                                          for k, v in (w.scores or {cfg.model: w.value}).items()}
                    out.append(ModelScore(
                        stream=self.name, ts=wall, model=cfg.model, window=w.index, t_start=w.t_start,
                        t_end=w.t_end, scores=named, smoothed=lane.smooth_named(w.t_end, named), speech=w.speech,
                        level_dbfs=w.level_dbfs, latency_ms=latency, reason=w.reason))
                    continue
                smoothed: float | None
                if w.value is not None:
                    smoothed = lane.smoother.update(w.t_end, w.value)
                else:
                    smoothed = lane.smoother.value
                out.append(ScoreEvent(
                    stream=self.name,
                    ts=wall,
                    window=w.index,
                    t_start=w.t_start,
                    t_end=w.t_end,
                    mode=cfg.mode,
                    mos=w.value if cfg.mode == "nr" else None,
                    distance=w.value if cfg.mode != "nr" else None,
                    smoothed=smoothed,
                    speech=w.speech,
                    level_dbfs=w.level_dbfs,
                    model=cfg.model,
                    latency_ms=latency,
                    reason=w.reason,
                    scores=w.scores,
                ))
        return out


def speech_windows(audio: np.ndarray, config: StreamConfig) -> list[np.ndarray]:
    """The windows of a whole signal that the monitor would score (speech-gated), cut as it cuts them."""
    core = StreamCore("signal", config)
    return [w.audio for w in core.feed(audio, 0.0) + core.finish(0.0)]
