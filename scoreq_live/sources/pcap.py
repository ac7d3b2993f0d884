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
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from scoreq_live.rtp.capture import (
    Capture,
    CaptureError,
    Datagram,
    Endpoint,
    Flow,
    FlowDemux,
    FlowEvent,
    find_rtp_flows,
    format_endpoint,
)
from scoreq_live.rtp.codecs import Codec, CodecError, parse_codec_query
from scoreq_live.rtp.receiver import RtpStream
from scoreq_live.sources.base import Source, SourceError, StreamSet
from scoreq_live.sources.push import DemuxAdapter, RtpSource, wait_set
from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S

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


class CaptureStreams(DemuxAdapter[tuple[Endpoint, int], PcapStream]):
    """The streams of a capture: its datagrams in (:meth:`feed`, through a :class:`FlowDemux`), a
    :class:`PcapStream` per destination and SSRC out, for the replay and for offline scoring alike.

    Streams are named ``NAME-<ssrc>``; ``path`` is the capture, for their detail.
    """

    def __init__(self, name: str, path: Path) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self._ticked = 0.0  # capture time of the last expire

    def feed(self, demux: FlowDemux, d: Datagram, t: float) -> None:
        """The capture's next datagram, ``t`` its capture time (:meth:`FlowDemux.arrival`).

        Every :data:`TICK_S` of capture time, holes given up and silent streams are seen to first.
        """
        if t - self._ticked >= TICK_S:
            self.flow_events(demux.expire(t))
            self._ticked = t
        self.flow_events(demux.feed(d))

    def flow_events(self, events: Iterable[FlowEvent]) -> None:
        for fe in events:
            self.event((fe.dst, fe.event.ssrc), fe.event, functools.partial(self._source, fe.flow))

    def _source(self, flow: Flow | None, key: tuple[Endpoint, int], stream: RtpStream | None) -> PcapStream:
        dst, ssrc = key
        detail = flow.describe() if flow is not None else f"to {format_endpoint(dst)} ssrc {ssrc:08x}"
        if flow is not None and flow.dialog is not None:  # a SIP call's direction: named as a live capture names it
            name, detail, meta = flow.dialog.identity(self.name, ssrc, flow.src, flow.dst, flow.codec_name)
            src = PcapStream(self.free_name(name, f"{ssrc:08x}"), flow, stream, f"{detail} in {self.path.name}")
            src.call, src.meta = flow.dialog.call.call_id, meta
            return src
        src = PcapStream(f"{self.name}-{ssrc:08x}", flow, stream, f"{detail} in {self.path.name}")
        if flow is not None:
            src.meta = {"ssrc": f"{ssrc:08x}", "remote": format_endpoint(flow.src), "local": format_endpoint(flow.dst)}
        return src


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
        self.adapter = CaptureStreams(self.name, self.path)

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

    # -- replay ------------------------------------------------------------------------------------

    async def streams(self) -> AsyncIterator[Source]:
        loop = asyncio.get_running_loop()
        flows = self.flows if self.flows is not None else await loop.run_in_executor(None, self._scan)
        demux = FlowDemux(flows, timeout_s=self.timeout_s)
        step = FAST_STEP_S if self.fast else STEP_S
        live = self.adapter
        live.name = self.name  # as named when the replay starts (open_inputs makes names unique)
        try:
            cap = Capture(self.path)
        except CaptureError as e:
            raise SourceError(f"pcap:{self.path}: {e}") from None
        start = loop.time()
        try:
            datagrams: Iterator[Datagram] = cap.datagrams()
            handed = -step  # capture time up to which audio has been handed over
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
                        await self._sleep_until(start, t, demux)
                    for src in live.new():
                        yield src
                    live.deliver()
                    if self.fast:
                        await self._backpressure()
                    handed = t
                live.feed(demux, d, t)
            if cap.stats.cut:
                log.warning("pcap:%s ends in the middle of a packet; replayed what was before it", self.path)
            for src in live.new():
                yield src
            live.deliver()
            live.end_all("eof")
        finally:
            cap.close()
            live.end_all("stopped")

    async def _sleep_until(self, start: float, t: float, demux: FlowDemux) -> None:
        """Real time: wait until the loop clock reaches capture time ``t``; streams expire on the way."""
        loop = asyncio.get_running_loop()
        while True:
            delay = start + t - loop.time()
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, TICK_S))
            now = min(loop.time() - start, t)
            if now < t:
                self.adapter.flow_events(demux.expire(now))
                self.adapter.deliver()

    async def _backpressure(self) -> None:
        """Fast: let the engine take the audio handed over before reading more of the capture."""
        await asyncio.sleep(0)
        while True:
            behind = [s for s in self.adapter.live.values() if s.queued > MAX_QUEUED and not s.gone]
            if not behind:
                return
            src = behind[0]
            src.taken.clear()
            await wait_set(src.taken, WAIT_S)
