"""What every input has in common: raw frames in, 16 kHz mono float32 out."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator
from typing import ClassVar

import numpy as np
import soxr

from scoreq_live.audio import to_mono_float
from scoreq_live.core import SAMPLE_RATE
from scoreq_live.core.events import EndReason, NetQuality
from scoreq_live.errors import ScoreqLiveError

STREAM_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""What a stream name given by a user or a publisher may be (``NAME=`` inputs, WHIP ``?stream=``)."""


class SourceError(ScoreqLiveError):
    """An input cannot be opened or has failed; the message is for the user."""


class Normaliser:
    """Downmix, convert to float32, clean NaN/Inf and resample one stream to 16 kHz.

    The resampler is a streaming soxr resampler kept per stream, so chunk
    boundaries leave no clicks and the output is the same however the input
    was chunked.
    """

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise SourceError(f"invalid sample rate {rate}")
        self.rate = rate
        self._rs = (None if rate == SAMPLE_RATE
                    else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"))

    def process(self, frames: np.ndarray, last: bool = False) -> np.ndarray:
        x = to_mono_float(frames)
        if self._rs is None:
            return x
        return self._rs.resample_chunk(x, last=last)

    def flush(self) -> np.ndarray:
        if self._rs is None:
            return np.zeros(0, dtype=np.float32)
        return self._rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


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

    def net_window(self, t_start: float, t_end: float) -> NetQuality | None:
        """What the network did to the audio between two stream times (seconds); None for inputs without one."""
        return None

    def check(self) -> None:  # noqa: B027 - optional hook: inputs that cannot fail early need nothing here
        """Fail early, with a :class:`SourceError` for the user, if the input cannot be opened."""

    @property
    def dropped_s(self) -> float:
        """Seconds of input lost before :meth:`frames` yielded them (0 for inputs that cannot lose any).

        The engine reports each increase as an ``input_dropped`` event.
        """
        return 0.0

    @abc.abstractmethod
    def frames(self) -> AsyncIterator[np.ndarray]:
        """Raw frames at ``self.rate``; ends at end of stream, raises :class:`SourceError` on failure."""

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        norm: Normaliser | None = None
        async for frames in self.frames():
            if norm is None:
                norm = Normaliser(self.rate)
            out = norm.process(frames)
            if out.size:
                yield out
        if norm is not None:
            tail = norm.flush()
            if tail.size:
                yield tail


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
