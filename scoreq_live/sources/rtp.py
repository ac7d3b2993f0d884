"""RTP inputs: a UDP port where every sender (SSRC) becomes its own stream while the monitor runs.

``rtp://HOST:PORT[?codec=NAME&pt=N&rate=R&channels=C]`` listens on one port
(an empty host means 127.0.0.1; ``0.0.0.0`` or ``[::]`` listen on every
interface).  An SDP file (``call.sdp``) names the port and the dynamic payload
types.  The packets themselves are handled by the sans-I/O
:class:`scoreq_live.rtp.receiver.RtpDemux`; this module only moves datagrams
from the socket to it and its audio to the engine.

The receive path: the socket's protocol callback appends each datagram to a
bounded deque (overflow counted, never blocking) and wakes one task, which
hands the whole backlog to the demux in one go and then delivers the audio
the jitter buffers released, so a flood on one port costs that port's
datagrams, not the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from scoreq_live.core.events import new_id
from scoreq_live.files import FileKindError, read_small
from scoreq_live.rtp.codecs import STATIC, Codec, CodecError, parse_codec_query, parse_sdp
from scoreq_live.rtp.receiver import RtpDemux, RtpStream
from scoreq_live.sources.base import PushSource, Source, SourceError, StreamSet
from scoreq_live.sources.push import DemuxAdapter, RtpSource, Ticker

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
QUEUE_DATAGRAMS = 4096  # datagrams waiting for the demux per port; more are dropped and counted
TICK_S = 0.1  # how often silent streams are checked for the timeout
RCVBUF = 4 << 20  # ask the kernel for a 4 MiB receive buffer: bursts wait there, not in Python
SDP_MAX_BYTES = 64 * 1024  # an SDP is a few hundred bytes; a larger .sdp is not one
MAX_READ = 256  # datagrams read per readiness of the socket: a flood cannot hold the event loop for long
# The kernel's receive time of each datagram (SO_TIMESTAMPNS, Linux): arrival times, jitter and the inactivity
# timeout follow when a packet really came, not when a late event loop got round to reading it.
SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None  # also SCM_TIMESTAMPNS (asm-generic)
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


class CallGroup:
    """Streams that are one call while they are live together (the senders to the ports of one SDP).

    A stream joining while another member is live gets that call's key; one joining when none is live
    starts a new call.
    """

    def __init__(self) -> None:
        self.key = ""
        self.members: list[PushSource] = []

    def join(self, source: PushSource) -> str:
        self.members = [m for m in self.members if not m.done]
        if not self.members:
            self.key = new_id()
        self.members.append(source)
        return self.key


@dataclass(frozen=True)
class RtpSpec:
    """One RTP port to listen on, and what its dynamic payload types are."""

    host: str
    port: int
    codecs: Mapping[int, Codec] = field(default_factory=dict)  # on top of the static payload types
    name: str | None = None  # the NAME of NAME=rtp://..., the prefix of its streams' names
    # The ports of one SDP file describe one session: their streams live together are one call.
    group: CallGroup | None = field(default=None, compare=False)

    @property
    def prefix(self) -> str:
        return self.name or str(self.port)


def parse_rtp_url(url: str, name: str | None = None) -> RtpSpec:
    """``rtp://HOST:PORT[?codec=...&pt=...]`` as an :class:`RtpSpec`; raises :class:`SourceError`."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as e:
        raise SourceError(f"--input {url!r}: {e}") from None
    if parts.scheme != "rtp" or port is None or parts.path not in ("", "/"):
        raise SourceError(f"--input {url!r}: RTP inputs look like rtp://HOST:PORT, rtp://:5004 or "
                          "rtp://0.0.0.0:5004?codec=opus&pt=111")
    if port == 0:
        raise SourceError(f"--input {url!r}: give the port to listen on")
    try:
        codecs = parse_codec_query(parts.query) if parts.query else {}
    except CodecError as e:
        raise SourceError(f"--input {url!r}: {e}") from None
    return RtpSpec(parts.hostname or "127.0.0.1", port, codecs, name)


def specs_from_sdp(path: Path, name: str | None = None) -> list[RtpSpec]:
    """The audio ports an SDP file describes, each with its payload types; raises :class:`SourceError`.

    An SDP is a few lines of text: only a regular file of at most :data:`SDP_MAX_BYTES` is read (a FIFO
    would block the start, a device would never end).
    """
    try:
        media = parse_sdp(read_small(path, SDP_MAX_BYTES).decode("utf-8", "replace"))
    except FileKindError as e:
        raise SourceError(f"--input {str(path)!r} {e}; an SDP is a small text file (a few lines)") from None
    except (OSError, CodecError) as e:
        raise SourceError(f"--input {str(path)!r}: {e}") from None
    out = []
    group = CallGroup()
    for i, m in enumerate(media):
        label = name if name is None or len(media) == 1 else f"{name}{i + 1}"
        out.append(RtpSpec(m.addr or "127.0.0.1", m.port, dict(m.codecs), label, group))
    return out


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SourceError(f"rtp://{host}:{port}: cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise SourceError(f"rtp://{host}:{port}: cannot listen: {e.strerror or e}") from None
    sock.setblocking(False)
    if SO_TIMESTAMPNS is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:  # no kernel timestamps: arrival is when the datagram is read
            pass
    return sock


class RtpPort(StreamSet):
    """One UDP port: a stream per SSRC, started by its first packet, ended by timeout or RTCP BYE."""

    kind = "rtp"

    def __init__(self, spec: RtpSpec, timeout_s: float = DEFAULT_TIMEOUT_S, queue: int = QUEUE_DATAGRAMS) -> None:
        super().__init__(spec.prefix, f"rtp://{spec.host}:{spec.port}")
        self.spec = spec
        self.timeout_s = timeout_s
        codecs = dict(STATIC)
        codecs.update(spec.codecs)
        self.demux = RtpDemux(codecs, timeout_s=timeout_s)
        self._sock: socket.socket | None = None
        self._backlog: collections.deque[tuple[bytes, tuple[str, int], float]] = collections.deque()
        self._queue_max = queue
        self._ticker = Ticker(TICK_S)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received = 0  # datagrams taken from the socket
        self.kernel_times = 0  # of which the kernel said when they arrived
        self.overflow = 0  # datagrams dropped because the demux fell behind
        self.adapter: DemuxAdapter[int, RtpSource] = DemuxAdapter()  # a stream per ssrc

    def check(self) -> None:
        if self._sock is None:
            self._sock = _bind(self.spec.host, self.spec.port)

    @property
    def address(self) -> tuple[str, int]:
        """Where the port listens (the real port when 0 was asked for)."""
        self.check()
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return host, port

    def _readable(self) -> None:
        self._drain(MAX_READ)

    def _drain(self, limit: int) -> int:
        """Read up to ``limit`` datagrams waiting in the socket (with the kernel's receive times); how many."""
        sock, loop = self._sock, self._loop
        assert sock is not None and loop is not None
        now, wall = loop.time(), time.time()
        n = 0
        while n < limit:
            try:
                data, ancdata, _flags, addr = sock.recvmsg(65536, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # an ICMP error for something this socket sent: nothing to read
                log.debug("rtp port %s: %s", self.spec.port, e)
                continue
            n += 1
            at = now
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(cdata)
                    at = min(now, now - (wall - (sec + nsec * 1e-9)))  # the kernel's wall clock on the loop's
                    self.kernel_times += 1
            self._received(data, addr, at)
        return n

    def _received(self, data: bytes, addr: tuple[str, int], at: float) -> None:
        self.received += 1
        if len(self._backlog) >= self._queue_max:
            self.overflow += 1
            return
        self._backlog.append((data, addr, at))
        if len(self._backlog) == 1:
            self._ticker.wake()

    def _name(self, ssrc: int) -> str:
        return f"{self.name}-{ssrc:08x}"

    async def streams(self) -> AsyncIterator[Source]:
        self.check()
        sock = self._sock
        assert sock is not None
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(sock, self._readable)
        try:
            while True:
                await self._ticker.wait()
                # What the kernel holds is read before any stream is judged silent: after the loop was
                # stalled, a call's packets are waiting there (their receive times tell when they came).
                while self._drain(MAX_READ) == MAX_READ and len(self._backlog) < self._queue_max:
                    pass
                backlog, self._backlog = self._backlog, collections.deque()
                verdict_at = loop.time()  # everything that came before is in `backlog`
                for k, (data, addr, at) in enumerate(backlog):
                    if k and not k % MAX_READ:
                        await asyncio.sleep(0)  # a flood's backlog is worked off in slices: the loop stays free
                    for ev in self.demux.datagram(data, addr, at):
                        self.adapter.event(ev.ssrc, ev, self._source)
                for ev in self.demux.expire(verdict_at):
                    self.adapter.event(ev.ssrc, ev, self._source)
                self.adapter.deliver()
                for src in self.adapter.new():
                    yield src
        finally:
            loop.remove_reader(sock)
            self.adapter.end_all("stopped")

    def _source(self, ssrc: int, stream: RtpStream | None) -> RtpSource:
        if stream is None:  # failed on its first packet
            return RtpSource(self._name(ssrc), None, f"to :{self.spec.port} ssrc {ssrc:08x}")
        host, port = stream.source_addr[:2]
        src = RtpSource(self._name(ssrc), stream,
                        f"{stream.codec_name} from {host}:{port} to :{self.spec.port} ssrc {ssrc:08x}")
        src.meta = {"ssrc": f"{ssrc:08x}", "remote": f"{host}:{port}", "local": f"{self.spec.host}:{self.spec.port}"}
        if self.spec.group is not None:
            src.call = self.spec.group.join(src)
        return src

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
