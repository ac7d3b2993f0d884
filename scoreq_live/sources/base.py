"""What every input has in common: raw frames in, 16 kHz mono float32 out."""

from __future__ import annotations

import abc
import asyncio
import collections
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import numpy as np

from scoreq_live.audio import to_mono_float
from scoreq_live.core import SAMPLE_RATE
from scoreq_live.core.events import EndReason, NetQuality
from scoreq_live.core.resample import Resampler
from scoreq_live.errors import ScoreqLiveError

HOLD_S = 0.5  # most audio gathered between two windows before it is processed (see Source.held)
DUE_MARGIN = 480  # 30 ms at 16 kHz: gathered audio goes on this early (the resampler holds some back)

STREAM_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""What a stream name given by a user or a publisher may be (``NAME=`` inputs, WHIP ``?stream=``)."""
CALL_KEY = re.compile(r"^[!-~]{1,128}$")
"""What a call key given by a publisher may be (WHIP and ``/media`` ``?call=``): printable ASCII, no spaces."""


class SourceError(ScoreqLiveError):
    """An input cannot be opened or has failed; the message is for the user."""


class Normaliser:
    """Downmix, convert to float32, clean NaN/Inf and resample one stream to 16 kHz.

    The resampler (:class:`scoreq_live.core.resample.Resampler`, the one RTP streams use too) is kept per
    stream, so chunk boundaries leave no clicks and the output is the same however the input was chunked.
    """

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise SourceError(f"invalid sample rate {rate}")
        self.rate = rate
        self._rs = Resampler(rate)

    def process(self, frames: np.ndarray) -> np.ndarray:
        return self._rs.process(to_mono_float(frames))

    def flush(self) -> np.ndarray:
        return self._rs.flush()


class Source(abc.ABC):
    """One input stream.

    Subclasses implement :meth:`frames`, an async iterator of raw
    ``[n, channels]`` (or ``[n]``) int or float arrays at :attr:`rate`; they set
    ``rate`` and ``channels`` before yielding the first frames.  Consumers
    iterate :meth:`chunks`, which yields normalised 16 kHz mono float32.
    """

    kind: ClassVar[str] = "source"

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail
        self.rate = 0
        self.channels = 0
        # Why the stream ended when frames() returns normally: "eof", or for packet streams "inactive"/"bye".
        self.end_reason: EndReason = "eof"
        # Set by the engine: 16 kHz samples the stream still needs before its next window is due (see held()).
        self.due_in: Callable[[], int] | None = None
        self._dropped_through: float | None = None  # set by held(): what dropped_through_s says
        # The call this stream is part of, as the input knows it (``stream_started.call``; "" for none),
        # and what it knows of who is on it (``stream_started.meta``: ssrc, addresses, callSid, ...).
        self.call = ""
        self.meta: dict[str, str] = {}

    def net_window(self, t_start: float, t_end: float) -> NetQuality | None:
        """What the network did to the audio between two stream times (seconds); None for inputs without one."""
        return None

    def net_summary(self) -> dict[str, Any] | None:
        """What the network did over the whole stream (``stream_ended.net``); None for inputs without one."""
        return None

    def check(self) -> None:  # noqa: B027 - optional hook: inputs that cannot fail early need nothing here
        """Fail early, with a :class:`SourceError` for the user, if the input cannot be opened."""

    @property
    def dropped_s(self) -> float:
        """Seconds of input lost before :meth:`frames` yielded them (0 for inputs that cannot lose any).

        The engine reports each increase as an ``input_dropped`` event.
        """
        return 0.0

    @property
    def dropped_through_s(self) -> float:
        """Seconds of input lost before the audio handed on so far (:attr:`dropped_s` when nothing is gathered).

        While :meth:`held` gathers blocks, a loss shows here only with the first audio after it, so the
        engine reports it at the stream time where the gap is.
        """
        return self.dropped_s if self._dropped_through is None else self._dropped_through

    @abc.abstractmethod
    def frames(self) -> AsyncIterator[np.ndarray]:
        """Raw frames at ``self.rate``; ends at end of stream, raises :class:`SourceError` on failure."""

    async def held(self, frames: AsyncIterator[np.ndarray]) -> AsyncIterator[np.ndarray]:
        """``frames`` gathered into one array until the stream's next window is (nearly) due.

        A live input delivers 20 ms blocks; resampling, the speech detector and
        the window bookkeeping cost about as much per call as per second of
        audio, so the blocks between two windows are handled in one call (at
        most :data:`HOLD_S` of them).  The gathered audio goes on just before
        the window it completes is due (:attr:`due_in`, minus the resampler's
        delay), so no window waits longer than it would block by block.  The
        first block is passed on at once: the stream has started when its
        first audio arrives.
        """
        due_in = self.due_in
        if due_in is None:
            async for f in frames:
                yield f
            return
        held: list[np.ndarray] = []
        n = 0
        limit = -1.0  # input samples to gather before the next yield; set once the rate is known
        async for f in frames:  # the first block goes on at once: the stream has started (stream_started)
            self._dropped_through = seen = self.dropped_s
            yield f
            break
        async for f in frames:
            if self.dropped_s != seen:  # input was lost before f: what was gathered goes on first
                if held:
                    yield held[0] if len(held) == 1 else np.concatenate(held)
                    held, n, limit = [], 0, -1.0
                self._dropped_through = seen = self.dropped_s  # reported with f's audio, where the gap is
            if limit < 0:  # the consumer's need changes only when it gets audio, i.e. after a yield
                limit = min(self.rate * HOLD_S, (due_in() - DUE_MARGIN) * self.rate / SAMPLE_RATE)
            held.append(f)
            n += f.shape[0]
            if n < limit:
                continue
            yield held[0] if len(held) == 1 else np.concatenate(held)
            held, n, limit = [], 0, -1.0
        if held:
            yield held[0] if len(held) == 1 else np.concatenate(held)

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        norm: Normaliser | None = None
        async for frames in self.held(self.frames()):
            if norm is None:
                norm = Normaliser(self.rate)
            out = norm.process(frames)
            if out.size:
                yield out
        if norm is not None:
            tail = norm.flush()
            if tail.size:
                yield tail


class PushSource(Source):
    """A stream whose audio another part pushes in: a port's RTP receiver, a WebRTC session, a websocket.

    The producer calls :meth:`push` with mono float32 audio at :attr:`rate`, then :meth:`end` (the stream
    ends with that reason once the engine has taken what is queued) or :meth:`fail` (it ends with a
    ``stream_error`` saying why, after the queued audio).  ``backlog_s``: at most this much audio waits
    for the engine, older audio is dropped and reported as ``input_dropped``; None: no bound, for
    producers that never run ahead of real time.
    """

    def __init__(self, name: str, detail: str = "", rate: int = SAMPLE_RATE, backlog_s: float | None = None) -> None:
        super().__init__(name, detail)
        self.rate = rate
        self.channels = 1
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._queued = 0  # samples in _chunks
        self._max = None if backlog_s is None else max(int(backlog_s * rate), 1)
        self._dropped = 0  # samples dropped because the engine fell behind
        self._wake = asyncio.Event()
        self.done = False
        self.failure: str | None = None

    def push(self, samples: np.ndarray) -> None:
        if self.done or not samples.size:
            return
        self._chunks.append(samples)
        self._queued += samples.size
        if self._max is not None:
            while self._queued > self._max and len(self._chunks) > 1:
                old = self._chunks.popleft()
                self._queued -= old.size
                self._dropped += old.size
        self._wake.set()

    def end(self, reason: EndReason) -> None:
        """No more audio: the stream ends with ``reason`` once the engine has taken what is queued."""
        if self.done:
            return
        self.end_reason = reason
        self.done = True
        self._wake.set()

    def fail(self, error: str) -> None:
        """The input broke: the stream fails with ``error`` (the audio already queued is still scored)."""
        if self.done:
            return
        self.failure = error
        self.done = True
        self._wake.set()

    @property
    def dropped_s(self) -> float:
        return self._dropped / self.rate

    def take(self) -> np.ndarray:
        """All the audio queued, taken at once: for a consumer that reads the stream whole, not by :meth:`frames`."""
        chunks = list(self._chunks)
        self._chunks.clear()
        self._queued = 0
        if not chunks:
            return np.zeros(0, np.float32)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    async def frames(self) -> AsyncIterator[np.ndarray]:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._queued -= chunk.size
                yield chunk
            if self.done:
                if self.failure is not None:
                    raise SourceError(self.failure)
                return
            self._wake.clear()
            await self._wake.wait()


class StreamSet(abc.ABC):
    """An input that opens streams while the monitor runs: an RTP port (one stream per sender), a capture.

    :meth:`streams` yields each new stream as a :class:`Source` when it
    appears; the engine runs it at once and ends it as any other.  The set
    ends when :meth:`streams` returns (a capture read to its end); a port
    listens until the monitor stops.
    """

    kind: ClassVar[str] = "streams"
    #: An endpoint waits for publishers (WHIP, media websockets) rather than being an input of its own: a
    #: monitor whose other inputs have all ended stops once the endpoints' live streams have ended too; a
    #: monitor with endpoints only runs until it is stopped.
    endpoint: ClassVar[bool] = False

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail

    def check(self) -> None:  # noqa: B027 - optional hook, as Source.check
        """Fail early, with a :class:`SourceError` for the user, if the input cannot be opened."""

    @abc.abstractmethod
    def streams(self) -> AsyncIterator[Source]:
        """New streams as they appear; raises :class:`SourceError` if the input as a whole fails."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the set holds (sockets); called once when the engine stops."""
