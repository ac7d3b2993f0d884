"""Streams that a demux opens, as push sources for the engine; and the tick that drives such inputs.

An RTP port, a capture replay, offline capture scoring and a WebRTC endpoint all have the same
shape: something (an :class:`~scoreq_live.rtp.receiver.RtpDemux`, a
:class:`~scoreq_live.rtp.capture.FlowDemux`, a WHIP session) reports that a stream opened, releases
its audio, and reports it gone (with an end reason) or failed.  :class:`DemuxAdapter` is that one
bookkeeping: each stream, by key, is an :class:`RtpSource` (a :class:`PushSource` fed by its
:class:`~scoreq_live.rtp.receiver.RtpStream`), new ones wait in :meth:`DemuxAdapter.new` to be
handed to the engine (:meth:`StreamSet.streams`), and their ends reach the engine as the stream's
end reason or error.

:class:`Ticker` is the periodic wake-up those inputs run on (release due audio, check timeouts),
woken early when there is work; :func:`wait_set` is the wait beneath it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import numpy as np

from scoreq_live.core.events import NetQuality
from scoreq_live.rtp.receiver import DemuxEvent, NewStream, RtpStream, StreamGone
from scoreq_live.sources.base import PushSource

__all__ = ["DemuxAdapter", "RtpSource", "Ticker", "wait_set"]


async def wait_set(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set, or until ``timeout_s`` has passed (the event is set then).

    A timer, not :func:`asyncio.wait_for`: before Python 3.12, ``wait_for`` swallows a cancellation that
    comes just as the event is set (in the same loop turn), and the input waiting would never stop.
    """
    timer = asyncio.get_running_loop().call_later(timeout_s, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class Ticker:
    """Every ``period_s``, or at once when :meth:`wake` is called: what an input's loop waits on."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Work has come: the current (or next) :meth:`wait` returns now."""
        self._wake.set()

    async def wait(self) -> float:
        """Until woken or a period has passed; returns the loop time then."""
        await wait_set(self._wake, self.period_s)
        self._wake.clear()
        return asyncio.get_running_loop().time()


class RtpSource(PushSource):
    """One RTP stream (an SSRC of a port, a capture's flow, a WebRTC session): its receiver's audio, 16 kHz."""

    kind = "rtp"

    def __init__(self, name: str, stream: RtpStream | None, detail: str) -> None:
        super().__init__(name, detail)
        self.stream = stream

    # -- called by the input ------------------------------------------------------------------------

    def deliver(self) -> None:
        if self.stream is not None:
            self.push(self.stream.pull())

    def end(self, reason: str) -> None:
        """No more packets: release the jitter buffer's rest and end with ``reason`` (inactive, bye, eof)."""
        if self.done:
            return
        if self.stream is not None:
            self.push(self.stream.finish())
        super().end(reason)  # type: ignore[arg-type]  # one of EndReason, by the input's contract

    # -- Source -------------------------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        async for frames in self.held(self.frames()):  # already 16 kHz mono float32
            yield frames

    def net_window(self, t_start: float, t_end: float) -> NetQuality | None:
        if self.stream is None:
            return None
        return self.stream.net_window(t_start, t_end)

    def net_summary(self) -> dict[str, Any] | None:
        return None if self.stream is None else self.stream.summary()


K = TypeVar("K")
S = TypeVar("S", bound=RtpSource)


class DemuxAdapter(Generic[K, S]):
    """The live streams of an input, by key (an SSRC, a destination and SSRC, a session): events in, sources out.

    :meth:`event` takes a demux's events (``make(key, stream)`` builds the source of a new stream, or with
    ``stream=None`` one that only reports a stream that failed before it opened); :meth:`opened` and
    :meth:`gone` are the same for inputs that open and end streams themselves.  :meth:`deliver` pushes the
    audio released since; :meth:`new` gives the streams opened since it was last called, for the engine.
    """

    def __init__(self) -> None:
        self.live: dict[K, S] = {}
        self._new: list[S] = []

    def opened(self, key: K, src: S) -> S:
        self.live[key] = src
        self._new.append(src)
        return src

    def gone(self, key: K, reason: str) -> None:
        """The stream ended: its audio so far, then its end with ``reason``; an unknown key is ignored."""
        src = self.live.pop(key, None)
        if src is not None:
            src.deliver()
            src.end(reason)

    def event(self, key: K, ev: DemuxEvent, make: Callable[[K, RtpStream | None], S]) -> None:
        if isinstance(ev, NewStream):
            self.opened(key, make(key, ev.stream))
        elif isinstance(ev, StreamGone):
            self.gone(key, ev.reason)
        else:
            src = self.live.pop(key, None)
            if src is None:  # failed on its first packets: a stream only to say why
                src = make(key, None)
                self._new.append(src)
            src.fail(ev.error)

    def deliver(self) -> None:
        for src in self.live.values():
            src.deliver()

    def free_name(self, name: str, suffix: str) -> str:
        """``name``, or ``name-suffix`` when a live stream has it (a call's sender that changed its SSRC)."""
        if any(src.name == name for src in self.live.values()):
            return f"{name[:63 - len(suffix)]}-{suffix}"
        return name

    def new(self) -> list[S]:
        """The streams opened (or failed at once) since the last call, in order."""
        out, self._new = self._new, []
        return out

    def end_all(self, reason: str) -> None:
        """Every live stream ends with ``reason`` (the input stops, or a capture ends)."""
        live = list(self.live.values())
        self.live.clear()
        for src in live:
            src.end(reason)
