"""``sniff:IFACE``: live capture of SIP and RTP on a network interface (``sniff:any`` for all of them).

    scoreq-live -i sniff:eth0
    scoreq-live -i office=sniff:any?sip-ports=5060,5080&sip-only=1

A reader thread takes packets from an ``AF_PACKET`` socket (Linux; needs
``CAP_NET_RAW``) with the kernel's receive time of each, and hands them to
the event loop in batches; the kernel's drops (``PACKET_STATISTICS``) are
counted as capture drops, not network loss.  On the loop, :class:`LiveCalls`
(sans-I/O: datagrams and times in, streams out) follows the SIP dialogs
(:mod:`scoreq_live.sip`) and demultiplexes RTP per destination address and
SSRC: a stream whose destination a dialog's SDP names is named after the
call (``NAME-alice-to-bob-1a2b``: alice speaking), carries its Call-ID as
its call key and From/To in its ``meta``, and ends with the call's BYE,
CANCEL or error answer; other RTP is scored too (``NAME-<ssrc>``) unless
``sip-only=1``.  A call's stream also ends after ``--rtp-timeout`` without
packets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from scoreq_live.rtp.capture import CaptureStats, Datagram, Reassembler, format_endpoint, udp_of_ip
from scoreq_live.rtp.codecs import STATIC
from scoreq_live.rtp.packet import is_rtcp
from scoreq_live.rtp.receiver import DemuxEvent, RtpDemux, RtpStream
from scoreq_live.sip.dialog import DialogTracker
from scoreq_live.sip.message import SipError, looks_like_sip, parse, split_stream
from scoreq_live.sources.base import Source, SourceError, StreamSet
from scoreq_live.sources.push import DemuxAdapter, RtpSource

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
BATCH_S = 0.01  # the reader hands packets to the loop at least this often ...
BATCH_MAX = 512  # ... or when this many are waiting
RCVBUF = 32 * 1024 * 1024
MAX_DESTINATIONS = 4096  # RTP destinations followed at once (the least recently heard goes first)
MAX_TCP = 1024  # TCP connections to SIP ports followed at once
TICK_S = 0.1
DEFAULT_SIP_PORTS = (5060, 5061, 5080)


@dataclass(frozen=True)
class SniffSpec:
    """``sniff:IFACE[?filter=BPF&sip-ports=5060,5080&sip-only=1]``."""

    iface: str
    sip_ports: tuple[int, ...] = DEFAULT_SIP_PORTS
    sip_only: bool = False
    name: str | None = None
    filter: str = ""  # a BPF expression (tcpdump's syntax): only packets it accepts are read

    @property
    def prefix(self) -> str:
        return self.name or self.iface


DLT_RAW = 12  # packets from the network header on: what an AF_PACKET SOCK_DGRAM socket hands a filter
SO_ATTACH_FILTER = 26


def compile_filter(expression: str) -> bytes:
    """A BPF expression (``udp and net 10.0.0.0/8``) as the ``struct sock_fprog`` instructions the kernel takes.

    Compiled by libpcap (the library tcpdump uses, loaded when a filter is given); raises SourceError when it is
    not there or the expression does not compile.
    """
    import ctypes
    import ctypes.util

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(Insn))]

    name = ctypes.util.find_library("pcap")
    if name is None:
        raise SourceError("?filter= needs libpcap (Debian: libpcap0.8, which tcpdump installs)")
    lib = ctypes.CDLL(name)
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(Program), ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(Program)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    handle = lib.pcap_open_dead(DLT_RAW, 65535)
    prog = Program()
    try:
        if lib.pcap_compile(handle, ctypes.byref(prog), expression.encode(), 1, 0xFFFFFFFF) != 0:
            raise SourceError(f"?filter={expression!r}: {lib.pcap_geterr(handle).decode(errors='replace')}")
        insns = b"".join(struct.pack("HBBI", prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
                                     prog.bf_insns[i].k) for i in range(prog.bf_len))
        lib.pcap_freecode(ctypes.byref(prog))
    finally:
        lib.pcap_close(handle)
    return insns


def parse_sniff(arg: str, name: str | None = None) -> SniffSpec:
    iface, _, query = arg.partition("?")
    if not iface or len(iface) > 15 or not all(c.isalnum() or c in "._-@:" for c in iface):
        raise SourceError(f"sniff:{arg}: expected sniff:IFACE (an interface name such as eth0, or 'any')")
    ports: tuple[int, ...] = DEFAULT_SIP_PORTS
    sip_only = False
    bpf = ""
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "filter":
            bpf = value
            compile_filter(bpf)  # a typo is reported now
        elif key == "sip-ports":
            try:
                ports = tuple(int(p) for p in value.split(",") if p)
            except ValueError:
                raise SourceError(f"sniff:{arg}: sip-ports={value!r}: expected ports, e.g. 5060,5080") from None
            if not ports or not all(0 < p < 65536 for p in ports):
                raise SourceError(f"sniff:{arg}: sip-ports={value!r}: expected ports 1-65535")
        elif key == "sip-only":
            sip_only = value in ("1", "true", "yes", "")
        else:
            raise SourceError(f"sniff:{arg}: unknown option {key!r}; accepted: filter, sip-ports, sip-only")
    return SniffSpec(iface, ports, sip_only, name, bpf)


def tcp_of_ip(buf: bytes) -> tuple[Endpoint, Endpoint, int, bytes] | None:
    """(src, dst, sequence number, payload) of an unfragmented IPv4/IPv6 packet that is TCP, else None."""
    try:
        if buf[0] >> 4 == 4:
            ihl = (buf[0] & 0x0F) * 4
            if buf[9] != 6 or int.from_bytes(buf[6:8], "big") & 0x3FFF:  # not TCP, or a fragment
                return None
            total = int.from_bytes(buf[2:4], "big") or len(buf)
            src, dst = socket.inet_ntop(socket.AF_INET, buf[12:16]), socket.inet_ntop(socket.AF_INET, buf[16:20])
            seg = buf[ihl:total]
        elif buf[0] >> 4 == 6:
            if buf[6] != 6:  # extension headers before TCP are not followed
                return None
            src, dst = socket.inet_ntop(socket.AF_INET6, buf[8:24]), socket.inet_ntop(socket.AF_INET6, buf[24:40])
            seg = buf[40:40 + int.from_bytes(buf[4:6], "big")]
        else:
            return None
        sport, dport, seq = struct.unpack_from("!HHI", seg)
        off = (seg[12] >> 4) * 4
        if off < 20 or off > len(seg):
            return None
        return (src, sport), (dst, dport), seq, bytes(seg[off:])
    except (struct.error, IndexError, ValueError):
        return None


@dataclass
class LiveCalls:
    """Datagrams in (SIP and RTP of a live capture or a capture file), streams out.  Sans-I/O.

    :meth:`feed` takes each datagram with its arrival time (seconds, any fixed origin); :attr:`adapter`
    holds the streams (new ones from :meth:`DemuxAdapter.new`).  :meth:`expire` gives up holes and ends
    silent streams; call it as time goes on.
    """

    prefix: str
    timeout_s: float
    sip_ports: tuple[int, ...] = DEFAULT_SIP_PORTS
    sip_only: bool = False
    tracker: DialogTracker = field(default_factory=DialogTracker)
    adapter: DemuxAdapter[tuple[Endpoint, int], RtpSource] = field(default_factory=DemuxAdapter)
    demuxes: OrderedDict[Endpoint, RtpDemux] = field(default_factory=OrderedDict)
    heard: dict[Endpoint, float] = field(default_factory=dict)  # when each followed destination last got RTP
    # SIP over TCP: per connection direction, the next sequence number expected and the bytes not yet a message
    tcp: OrderedDict[tuple[Endpoint, Endpoint], tuple[int, bytearray]] = field(default_factory=OrderedDict)
    sip_errors: int = 0
    not_followed: int = 0  # RTP-like datagrams to destinations not followed (sip-only)

    def feed(self, d: Datagram, t: float) -> None:
        data = d.payload
        if looks_like_sip(data):  # on any port: SIP's first bytes never pass as RTP's
            self._sip(data, t)
            return
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        dst = d.dst
        if is_rtcp(data):
            # RTCP (BYE) to the RTP port (muxed) or the port above it: to that destination's demux
            demux = self.demuxes.get(dst) or self.demuxes.get((dst[0], dst[1] - 1))
            if demux is not None:
                key = dst if dst in self.demuxes else (dst[0], dst[1] - 1)
                self._events(key, demux.datagram(data, d.src, t))
            return
        demux = self.demuxes.get(dst)
        if demux is None:
            of = self.tracker.media(dst)
            if of is None and self.sip_only:
                self.not_followed += 1
                return
            codecs = dict(STATIC)
            if of is not None:
                codecs.update(of.call.codecs.get(dst, {}))
            if len(self.demuxes) >= MAX_DESTINATIONS:
                old, _ = self.demuxes.popitem(last=False)
                self.heard.pop(old, None)
                for live in [k for k in self.adapter.live if k[0] == old]:
                    self.adapter.gone(live, "inactive")
            demux = self.demuxes[dst] = RtpDemux(codecs, timeout_s=self.timeout_s)
        self.demuxes.move_to_end(dst)
        self.heard[dst] = t
        self._events(dst, demux.datagram(data, d.src, t))

    def segment(self, src: Endpoint, dst: Endpoint, seq: int, payload: bytes, t: float) -> None:
        """A TCP segment to or from a SIP port: its bytes join the connection's stream, whole messages go on.

        Segments are taken in order; a retransmission's bytes already seen are skipped, and after a gap (a
        segment the capture missed) the stream is taken up again at the next segment that starts a message.
        """
        if src[1] not in self.sip_ports and dst[1] not in self.sip_ports or not payload:
            return
        key = (src, dst)
        state = self.tcp.get(key)
        if state is None or seq != state[0]:
            if state is not None and 0 < (state[0] - seq) % 2**32 < len(payload):  # partly seen before
                cut = (state[0] - seq) % 2**32
                payload, seq = payload[cut:], state[0]
            elif state is not None and (state[0] - seq) % 2**32 < 2**31:  # wholly seen before
                return
            elif not looks_like_sip(payload):  # a gap: wait for a message to begin
                self.tcp.pop(key, None)
                return
            else:
                state = (seq, bytearray())
        buf = state[1]
        buf += payload
        self.tcp[key] = ((seq + len(payload)) % 2**32, buf)
        self.tcp.move_to_end(key)
        while len(self.tcp) > MAX_TCP:
            self.tcp.popitem(last=False)
        try:
            messages = split_stream(buf)
        except SipError as e:
            self.sip_errors += 1
            log.debug("sniff %s: SIP over TCP from %s cannot be followed: %s", self.prefix, format_endpoint(src), e)
            self.tcp.pop(key, None)
            return
        for m in messages:
            self._sip(m, t)

    def _sip(self, data: bytes, t: float) -> None:
        try:
            msg = parse(data)
        except SipError as e:
            self.sip_errors += 1
            log.debug("sniff %s: a SIP message that cannot be read: %s", self.prefix, e)
            return
        call = self.tracker.message(msg, t)
        if call is not None and call.ended is not None:
            # the call is over: its streams end now (their audio so far is scored)
            for addr in (*call.caller_media, *call.callee_media):
                for live in [k for k in self.adapter.live if k[0] == addr]:
                    self.adapter.gone(live, "bye")

    def expire(self, t: float) -> None:
        for dst, demux in list(self.demuxes.items()):
            self._events(dst, demux.expire(t))
            if not demux.streams and t - self.heard.get(dst, t) > 2 * self.timeout_s:
                del self.demuxes[dst]  # a destination heard from no more
                self.heard.pop(dst, None)
        self.tracker.expire(t)

    def _events(self, dst: Endpoint, events: list[DemuxEvent]) -> None:
        for ev in events:
            self.adapter.event((dst, ev.ssrc), ev, self._source)

    def _source(self, key: tuple[Endpoint, int], stream: RtpStream | None) -> RtpSource:
        dst, ssrc = key
        of = self.tracker.media(dst)
        src_addr = stream.source_addr if stream is not None else ("?", 0)
        if of is None:
            src = RtpSource(f"{self.prefix}-{ssrc:08x}", stream,
                            f"{stream.codec_name if stream else 'RTP'} from {format_endpoint(src_addr)} to "
                            f"{format_endpoint(dst)} ssrc {ssrc:08x}")
            src.meta = {"ssrc": f"{ssrc:08x}", "remote": format_endpoint(src_addr), "local": format_endpoint(dst)}
            return src
        name, detail, meta = of.identity(self.prefix, ssrc, src_addr, dst, stream.codec_name if stream else "")
        src = RtpSource(self.adapter.free_name(name, f"{ssrc:08x}"), stream, detail)
        src.call, src.meta = of.call.call_id, meta
        return src


class SniffInput(StreamSet):
    """A live capture on an interface: the streams :class:`LiveCalls` finds in it."""

    kind = "sniff"

    def __init__(self, spec: SniffSpec, timeout_s: float, max_calls: int = 10_000) -> None:
        super().__init__(spec.prefix, f"sniff:{spec.iface}")
        self.spec = spec
        self.calls = LiveCalls(spec.prefix, timeout_s, spec.sip_ports, spec.sip_only,
                               DialogTracker(max_calls=max_calls))
        self.stats = CaptureStats()
        self.frags = Reassembler(self.stats)
        self.kernel_drops = 0  # packets the kernel dropped before the reader took them
        self.packets = 0
        self._sock: socket.socket | None = None
        self._filter_buf: object = None  # the attached filter's instructions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = asyncio.Event()
        self._batches: list[list[tuple[float, bytes]]] = []
        self._lock = threading.Lock()

    def check(self) -> None:
        if self._sock is not None:
            return
        if not sys.platform.startswith("linux") or not hasattr(socket, "AF_PACKET"):
            raise SourceError(f"sniff:{self.spec.iface}: live capture needs Linux (AF_PACKET)")
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise SourceError(f"sniff:{self.spec.iface}: capturing needs CAP_NET_RAW: run as root, or grant it "
                              "once with: sudo setcap cap_net_raw+ep \"$(readlink -f \"$(which python3)\")\"") \
                from None
        try:
            if self.spec.iface != "any":
                sock.bind((self.spec.iface, ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if self.spec.filter:
                import ctypes

                insns = compile_filter(self.spec.filter)
                buf = ctypes.create_string_buffer(insns)
                self._filter_buf = buf  # the kernel copies it; kept for the call's duration
                fprog = struct.pack("HL", len(insns) // 8, ctypes.addressof(buf))
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            sock.settimeout(0.2)
        except OSError as e:
            sock.close()
            if e.errno == errno.ENODEV:
                raise SourceError(f"sniff:{self.spec.iface}: no such interface") from None
            raise SourceError(f"sniff:{self.spec.iface}: cannot capture: {e.strerror or e}") from None
        self._sock = sock

    def _reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: packets with their kernel receive times, in batches to the loop."""
        sock = self._sock
        assert sock is not None
        batch: list[tuple[float, bytes]] = []
        sent = time.monotonic()
        space = socket.CMSG_SPACE(_TIMESPEC.size)
        while not self._stop.is_set():
            try:
                data, anc, _, addr = sock.recvmsg(65535, space)
            except TimeoutError:
                data = b""
            except OSError as e:
                if self._stop.is_set():
                    return
                log.error("sniff %s: capture failed: %s", self.spec.iface, e)
                return
            if data:
                if addr[2] == PACKET_OUTGOING and addr[0] == "lo":
                    pass  # loopback shows each packet twice (sent, received): the received one is kept
                else:
                    at = time.time()
                    for level, kind, cdata in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= _TIMESPEC.size:
                            sec, nsec = _TIMESPEC.unpack_from(cdata)
                            at = sec + nsec * 1e-9
                    batch.append((at, data))
            now = time.monotonic()
            if batch and (len(batch) >= BATCH_MAX or now - sent >= BATCH_S):
                with self._lock:
                    self._batches.append(batch)
                batch, sent = [], now
                try:
                    loop.call_soon_threadsafe(self._wake.set)
                except RuntimeError:  # the loop has closed
                    return
            elif not batch:
                sent = now

    def _drops(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return
        _, drops = struct.unpack("II", raw)  # since the last read: the kernel resets them
        if drops:
            self.kernel_drops += drops
            log.warning("sniff %s: the kernel dropped %d packets (%d in all): the monitor did not read fast "
                        "enough; those packets count as capture drops, not as network loss", self.spec.iface,
                        drops, self.kernel_drops)

    async def streams(self) -> AsyncIterator[Source]:
        self.check()
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._reader, args=(loop,), name=f"sniff {self.spec.iface}",
                                        daemon=True)
        self._thread.start()
        wall0, mono0 = time.time(), loop.time()
        ticked = 0.0
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK_S)
                except TimeoutError:
                    pass
                self._wake.clear()
                with self._lock:
                    batches, self._batches = self._batches, []
                for batch in batches:
                    for at, data in batch:
                        self.packets += 1
                        udp = udp_of_ip(data, self.frags, self.stats)
                        if udp is None:
                            seg = tcp_of_ip(data)
                            if seg is not None:
                                self.calls.segment(*seg, mono0 + (at - wall0))
                            continue
                        src, dst, payload = udp
                        self.calls.feed(Datagram(at, src, dst, payload), mono0 + (at - wall0))
                    await asyncio.sleep(0)  # a burst is worked off in slices: the loop stays free
                now = loop.time()
                if now - ticked >= TICK_S:
                    self.calls.expire(now)
                    self._drops()
                    ticked = now
                self.calls.adapter.deliver()
                for stream in self.calls.adapter.new():
                    yield stream
        finally:
            self.calls.adapter.end_all("stopped")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def open_sniff(arg: str, name: str | None, timeout_s: float, max_calls: int = 10_000) -> SniffInput:
    return SniffInput(parse_sniff(arg, name), timeout_s, max_calls)
