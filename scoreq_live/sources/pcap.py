"""Packet captures replayed through the live pipeline: every RTP stream of the capture becomes a stream.

``pcap:call.pcap`` (libpcap or pcapng) is read twice: once up front to find its RTP flows
(:func:`scoreq_live.rtp.capture.find_rtp_flows`), then packet by packet into one
:class:`~scoreq_live.rtp.receiver.RtpDemux` per destination address, with the capture timestamps
as arrival times, so jitter, loss, reordering and timeouts are what the capture recorded.  Each
stream's audio reaches the engine as an RTP port's does.

In real time the packets are handed over when the loop clock reaches their offset in the capture
(paced against the start, so sleeps do not drift); with ``fast`` there is no sleeping, and the
replay waits whenever a stream has more audio queued than the engine has taken, so scoring sets the
pace.  The scores are the same either way.  At the end of the capture every stream still running
ends with reason ``eof``, its jitter buffer flushed.

``pcap:FILE?codec=NAME&pt=N`` names the codec of a dynamic payload type that the capture's SDPs do
not declare and its packets do not identify.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import numpy as np

from scoreq_live.rtp.capture import (
    Capture,
    CaptureError,
    Datagram,
    Flow,
    FlowDemux,
    FlowEvent,
    find_rtp_flows,
    format_endpoint,
)
from scoreq_live.rtp.codecs import Codec, CodecError, parse_codec_query
from scoreq_live.rtp.receiver import NewStream, RtpStream, StreamFailed, StreamGone
from scoreq_live.sources.base import Source, SourceError, StreamSet
from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S, RtpSource

log = logging.getLogger(__name__)

STEP_S = 0.02  # real time: audio is handed over in steps of this much capture time
FAST_STEP_S = 0.1  # fast: the same, larger steps (fewer, longer chunks for the engine)
TICK_S = 0.1  # capture time between checks for holes given up and silent streams
MAX_QUEUED = 8  # fast: chunks a stream may have waiting for the engine before the replay waits for it
WAIT_S = 0.5  # fast: how often a wait for a stream's consumer looks again


class PcapStream(RtpSource):
    """One RTP stream of a capture.  Knows how much of its audio the engine has not taken yet."""

    kind = "pcap"

    def __init__(self, name: str, flow: Flow | None, stream: RtpStream | None, detail: str) -> None:
        super().__init__(name, stream, detail)
        self.flow = flow
        self.queued = 0  # chunks delivered and not yet taken
        self.taken = asyncio.Event()
        self.gone = False  # nobody reads this stream any more

    def deliver(self) -> None:
        before = len(self._chunks)
        super().deliver()
        self.queued += len(self._chunks) - before

    def end(self, reason: str) -> None:
        before = len(self._chunks)
        super().end(reason)
        self.queued += len(self._chunks) - before

    async def frames(self) -> AsyncIterator[np.ndarray]:
        try:
            async for x in super().frames():
                self.queued = max(self.queued - 1, 0)
                self.taken.set()
                yield x
        finally:
            self.gone = True
            self.taken.set()


def _split_spec(path: Path) -> tuple[Path, dict[int, Codec]]:
    """``call.pcap?codec=opus&pt=111`` -> (call.pcap, {111: opus}); a plain path as is."""
    text = str(path)
    if path.exists() or "?" not in text:
        return path, {}
    file, query = text.split("?", 1)
    try:
        return Path(file), parse_codec_query(query)
    except CodecError as e:
        raise SourceError(f"pcap:{text}: {e}") from None


class PcapReplay(StreamSet):
    """A capture file replayed: one stream per RTP flow (``NAME-<ssrc>``), ending with the capture."""

    kind = "pcap"

    def __init__(self, path: Path, name: str | None = None, fast: bool = False, timeout_s: float | None = None,
                 port: int | None = None, codecs: Mapping[int, Codec] | None = None) -> None:
        self.path, declared = _split_spec(Path(path))
        super().__init__(name or self.path.stem, f"pcap:{self.path}")
        self.fast = fast
        self.timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self.port = port
        self.codecs = {**declared, **(codecs or {})}
        self.flows: list[Flow] | None = None
        self.live: dict[tuple[tuple[str, int], int], PcapStream] = {}  # (destination, ssrc) -> its stream

    # -- opening -----------------------------------------------------------------------------------

    def _scan(self) -> list[Flow]:
        if self.flows is not None:
            return self.flows
        try:
            with Capture(self.path) as cap:
                flows = find_rtp_flows(cap.datagrams(), self.port, self.codecs)
        except CaptureError as e:
            raise SourceError(f"pcap:{self.path}: {e}") from None
        if not flows:
            where = f" to or from port {self.port}" if self.port is not None else ""
            raise SourceError(f"pcap:{self.path}: no RTP stream found in the capture{where}")
        self.flows = flows
        return flows

    def check(self) -> None:
        self._scan()

    def _name(self, ssrc: int) -> str:
        return f"{self.name}-{ssrc:08x}"

    def _detail(self, flow: Flow | None, ssrc: int, dst: tuple[str, int]) -> str:
        if flow is None:
            return f"to {format_endpoint(dst)} ssrc {ssrc:08x} in {self.path.name}"
        return f"{flow.describe()} in {self.path.name}"

    # -- replay ------------------------------------------------------------------------------------

    async def streams(self) -> AsyncIterator[Source]:
        loop = asyncio.get_running_loop()
        flows = self.flows if self.flows is not None else await loop.run_in_executor(None, self._scan)
        demux = FlowDemux(flows, timeout_s=self.timeout_s)
        step = FAST_STEP_S if self.fast else STEP_S
        try:
            cap = Capture(self.path)
        except CaptureError as e:
            raise SourceError(f"pcap:{self.path}: {e}") from None
        start = loop.time()
        try:
            datagrams: Iterator[Datagram] = cap.datagrams()
            handed = -step  # capture time up to which audio has been handed over
            ticked = 0.0
            new: list[PcapStream] = []
            while True:
                try:
                    d = next(datagrams)
                except StopIteration:
                    break
                except CaptureError as e:
                    raise SourceError(f"pcap:{self.path}: {e}") from None
                t = demux.arrival(d.ts)
                if t - handed >= step:
                    # Every packet before t is in: in real time, wait until t has come; hand over the audio.
                    if not self.fast:
                        async for ev in self._sleep_until(start, t, demux):
                            new += self._handle(ev)
                    for src in new:
                        yield src
                    new = []
                    self._deliver()
                    if self.fast:
                        await self._backpressure()
                    handed = t
                if t - ticked >= TICK_S:
                    for ev in demux.expire(t):
                        new += self._handle(ev)
                    ticked = t
                for ev in demux.feed(d):
                    new += self._handle(ev)
            if cap.stats.cut:
                log.warning("pcap:%s ends in the middle of a packet; replayed what was before it", self.path)
            for src in new:
                yield src
            self._deliver()
            for src in list(self.live.values()):
                src.end("eof")
            self.live.clear()
        finally:
            cap.close()
            for src in list(self.live.values()):
                src.end("stopped")
            self.live.clear()

    async def _sleep_until(self, start: float, t: float, demux: FlowDemux) -> AsyncIterator[FlowEvent]:
        """Real time: wait until the loop clock reaches capture time ``t``; streams expire on the way."""
        loop = asyncio.get_running_loop()
        while True:
            delay = start + t - loop.time()
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, TICK_S))
            now = min(loop.time() - start, t)
            if now < t:
                for ev in demux.expire(now):
                    yield ev
                self._deliver()

    async def _backpressure(self) -> None:
        """Fast: let the engine take the audio handed over before reading more of the capture."""
        await asyncio.sleep(0)
        while True:
            behind = [s for s in self.live.values() if s.queued > MAX_QUEUED and not s.gone]
            if not behind:
                return
            src = behind[0]
            src.taken.clear()
            # A timer, not asyncio.wait_for: before Python 3.12, wait_for can swallow a cancellation that comes
            # as the event is set, and the replay would never stop.
            timer = asyncio.get_running_loop().call_later(WAIT_S, src.taken.set)
            try:
                await src.taken.wait()
            finally:
                timer.cancel()

    def _deliver(self) -> None:
        for src in self.live.values():
            src.deliver()

    def _handle(self, fe: FlowEvent) -> list[PcapStream]:
        ev, key = fe.event, (fe.dst, fe.event.ssrc)
        if isinstance(ev, NewStream):
            started = PcapStream(self._name(ev.ssrc), fe.flow, ev.stream, self._detail(fe.flow, ev.ssrc, fe.dst))
            self.live[key] = started
            return [started]
        src = self.live.pop(key, None)
        if src is None:
            if isinstance(ev, StreamFailed):  # failed on its first packets: a stream only to say why
                failed = PcapStream(self._name(ev.ssrc), fe.flow, None, self._detail(fe.flow, ev.ssrc, fe.dst))
                failed.fail(ev.error)
                return [failed]
            return []
        if isinstance(ev, StreamGone):
            src.deliver()
            src.end(ev.reason)
        else:
            src.fail(ev.error)
        return []
