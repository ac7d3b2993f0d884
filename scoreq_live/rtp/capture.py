"""Packet captures (pcap, pcapng): the UDP datagrams they hold, and which of them are RTP calls.

:class:`Capture` opens a capture written by tcpdump, Wireshark/dumpcap, sipp, ... (libpcap or pcapng,
told apart by the file's magic number, read with dpkt) and yields its UDP datagrams as
:class:`Datagram` ``(ts, src, dst, payload)``, ``ts`` being the capture time in seconds.  Link types:
Ethernet (802.1Q / 802.1ad VLAN tags), Linux cooked capture v1 and v2 (``tcpdump -i any``), raw IP,
and BSD loopback/null; network layers IPv4 and IPv6 (extension headers skipped).  IP fragments are
reassembled when all of them are in the capture (a few pending datagrams at most); the others are
counted and left out, as are frames cut short by the snap length.  Everything that is not UDP is
skipped and counted in :attr:`Capture.stats`.

A capture that ends in the middle of a packet (tcpdump killed, a copy cut short) yields what was
read before the cut; :class:`CaptureError` only when not even one packet can be read.

:func:`find_rtp_flows` groups the datagrams by (source, destination, SSRC) and keeps the groups that
are RTP calls: valid RTP headers, an audio payload type, several packets whose sequence numbers
advance.  Each flow's codec is its static payload type, or a dynamic one named by an SDP found in
the capture (SIP over UDP), or else recognised from the packets (Opus, L16, telephone-event).

Nothing here opens a socket or reads a clock: the caller feeds the datagrams, with their capture
times as arrival times, to :class:`scoreq_live.rtp.receiver.RtpDemux`.
"""

from __future__ import annotations

import collections
import socket
import statistics
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.files import special_kind
from scoreq_live.rtp.codecs import STATIC, Codec, CodecError, codec_by_name, parse_sdp
from scoreq_live.rtp.packet import is_rtcp, parse_rtp
from scoreq_live.rtp.receiver import DemuxEvent, RtpDemux, StreamFailed
from scoreq_live.sip.dialog import DialogTracker, MediaOf
from scoreq_live.sip.message import SipError, looks_like_sip
from scoreq_live.sip.message import parse as parse_sip

Endpoint = tuple[str, int]

PCAP_MAGICS = frozenset({
    b"\xa1\xb2\xc3\xd4", b"\xd4\xc3\xb2\xa1",  # microseconds, big / little endian
    b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1",  # nanoseconds
    b"\xa1\xb2\xcd\x34", b"\x34\xcd\xb2\xa1",  # Kuznetzov's modified libpcap
})
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # section header block type
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")

# Link-layer header types (tcpdump.org/linktypes.html); the values found in pcap and pcapng files.
LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in the capturing host's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6 (some writers use DLT_RAW's 12 or 14 instead)
LINKTYPE_LOOP = 108  # OpenBSD loopback: address family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
LINK_NAMES = {LINKTYPE_NULL: "loopback (null)", LINKTYPE_ETHERNET: "Ethernet", LINKTYPE_RAW: "raw IP",
              12: "raw IP", 14: "raw IP", LINKTYPE_LOOP: "loopback", LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
              LINKTYPE_IPV4: "raw IPv4", LINKTYPE_IPV6: "raw IPv6", LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)"}

_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
_ETH_VLAN = (0x8100, 0x88A8, 0x9100)
_AF_INET6 = (10, 24, 28, 30)  # AF_INET6 on Linux, the BSDs, macOS/FreeBSD
_IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options (skipped); 44 is the fragment header
_IPPROTO_UDP = 17
_IPV6_FRAGMENT = 44
_MAX_REASSEMBLY = 64  # fragmented datagrams being put together at once (oldest given up first)

# RTP payload types that can be audio: the RFC 3551 static audio range and the dynamic range.  35..95 are
# unassigned or (72..76) collide with RTCP, so a "flow" there is not RTP.
AUDIO_PTS = frozenset(range(0, 35)) | frozenset(range(96, 128))
MIN_PACKETS = 8  # fewer packets than this is not a call
MAX_SEQ_STEP = 100  # a sequence step of 1..MAX_SEQ_STEP between successive packets is an RTP-like step
MIN_GOOD_STEPS = 0.6  # share of successive packets whose sequence number steps forward like that
_OPUS_STEPS = (120, 240, 480, 960, 1920, 2880)  # 2.5..60 ms at 48 kHz
_CLOCKS = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class CaptureError(ScoreqLiveError):
    """A capture file that cannot be read at all; the message says why."""


class Datagram(NamedTuple):
    """One UDP datagram of a capture."""

    ts: float  # capture time, seconds since the epoch
    src: Endpoint
    dst: Endpoint
    payload: bytes


@dataclass
class CaptureStats:
    """What reading a capture met besides UDP datagrams."""

    frames: int = 0  # link-layer frames read
    udp: int = 0  # UDP datagrams yielded
    not_udp: int = 0  # other protocols (TCP, ICMP, ARP, ...)
    truncated: int = 0  # cut short by the snap length, or malformed headers
    fragments: int = 0  # IP fragments seen
    fragments_dropped: int = 0  # fragments of datagrams that could not be put together
    cut: bool = False  # the file ended in the middle of a packet (or was corrupt from there on)


def capture_format(path: Path) -> str | None:
    """"pcap" or "pcapng" from the file's first bytes; None for anything else (or an unreadable file)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return None
    if magic == PCAPNG_MAGIC:
        return "pcapng"
    if magic in PCAP_MAGICS:
        return "pcap"
    return None


def is_capture(path: Path) -> bool:
    """A file to read as a capture: a .pcap/.pcapng/.cap name, or a file that starts with a capture magic."""
    return path.suffix.lower() in CAPTURE_SUFFIXES or (path.is_file() and capture_format(path) is not None)


def format_endpoint(ep: Endpoint) -> str:
    """``ip:port``, with IPv6 addresses in brackets."""
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Reassembler:
    """Puts fragmented IP datagrams back together (RFC 791 / RFC 8200), with bounded state."""

    def __init__(self, stats: CaptureStats) -> None:
        self.stats = stats
        self._parts: collections.OrderedDict[tuple[Any, ...], dict[int, bytes]] = collections.OrderedDict()
        self._total: dict[tuple[Any, ...], int] = {}

    def add(self, key: tuple[Any, ...], offset: int, more: bool, data: bytes) -> bytes | None:
        """One fragment; the whole upper-layer payload once every fragment is there, else None."""
        self.stats.fragments += 1
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= _MAX_REASSEMBLY:
                old, dropped = self._parts.popitem(last=False)
                self._total.pop(old, None)
                self.stats.fragments_dropped += len(dropped)
            parts = self._parts[key] = {}
        parts[offset] = data
        if not more:
            self._total[key] = offset + len(data)
        total = self._total.get(key)
        if total is None:
            return None
        pos = 0
        while pos < total:
            piece = parts.get(pos)
            if piece is None or not piece:
                return None
            pos += len(piece)
        if pos != total:
            return None
        del self._parts[key]
        del self._total[key]
        out = bytearray()
        pos = 0
        while pos < total:
            out += parts[pos]
            pos += len(parts[pos])
        return bytes(out)

    def finish(self) -> None:
        self.stats.fragments_dropped += sum(len(p) for p in self._parts.values())
        self._parts.clear()
        self._total.clear()


class Capture:
    """An open capture file; iterate :meth:`datagrams` for its UDP datagrams in file order.

    Raises :class:`CaptureError` when the file is missing, is not a capture, or uses a link type
    this reader does not know.  Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | Path) -> None:
        import dpkt  # type: ignore[import-untyped]  # no type information shipped

        self.path = Path(path)
        if not self.path.is_file():
            kind = special_kind(self.path)
            raise CaptureError(f"no such capture file: {self.path}" if kind is None else
                               f"{self.path} is {kind}, not a regular file; give a capture file")
        fmt = capture_format(self.path)
        if fmt is None:
            raise CaptureError(f"{self.path} is not a packet capture (neither pcap nor pcapng)")
        self.format = fmt
        self.stats = CaptureStats()
        self._fh: IO[bytes] = open(self.path, "rb")  # closed by close()
        try:
            self._reader: Any = dpkt.pcapng.Reader(self._fh) if fmt == "pcapng" else dpkt.pcap.Reader(self._fh)
        except Exception as e:  # dpkt raises ValueError, NeedData, UnpackError, struct.error on a bad header
            self._fh.close()
            raise CaptureError(f"{self.path}: cannot read the {fmt} header ({_why(e)}); the file is damaged "
                               "or truncated") from None
        self.link_type = int(self._reader.datalink()) & 0xFFFF  # the upper bits may say an FCS is present
        if self.link_type not in LINK_NAMES:
            self._fh.close()
            known = ", ".join(sorted(set(LINK_NAMES.values())))
            raise CaptureError(f"{self.path}: link type {self.link_type} is not supported (supported: {known})")
        self._used = False

    @property
    def link_name(self) -> str:
        return LINK_NAMES[self.link_type]

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def datagrams(self) -> Iterator[Datagram]:
        """The UDP datagrams, in file order; can be iterated once.

        Raises :class:`CaptureError` when the very first packet record cannot be read; a damaged or cut
        record later ends the iteration (``stats.cut``) with everything before it yielded.
        """
        if self._used:
            raise RuntimeError("Capture.datagrams() can be iterated only once")
        self._used = True
        frags = Reassembler(self.stats)
        it = iter(self._reader)
        link = self.link_type
        while True:
            try:
                ts, buf = next(it)
            except StopIteration:
                break
            except Exception as e:  # a record cut short or corrupt: keep what was read before it
                if self.stats.frames == 0:
                    raise CaptureError(f"{self.path}: no packet can be read ({_why(e)}); the file is damaged "
                                       "or truncated") from None
                self.stats.cut = True
                break
            self.stats.frames += 1
            got = _udp(link, bytes(buf), frags, self.stats)
            if got is not None:
                self.stats.udp += 1
                yield Datagram(float(ts), got[0], got[1], got[2])
        frags.finish()


def _why(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_datagrams(path: str | Path) -> Iterator[Datagram]:
    """Every UDP datagram of a capture file (see :class:`Capture`)."""
    with Capture(path) as cap:
        yield from cap.datagrams()


# ---------------------------------------------------------------------------------------------- decoding


def _udp(link: int, buf: bytes, frags: Reassembler,
         stats: CaptureStats) -> tuple[Endpoint, Endpoint, bytes] | None:
    """(src, dst, payload) of a frame that is a UDP datagram, else None (counted)."""
    net = _network(link, buf)
    if net is None:
        stats.not_udp += 1
        return None
    version, off = net
    try:
        if version == 4:
            return _ipv4(buf, off, frags, stats)
        return _ipv6(buf, off, frags, stats)
    except (struct.error, IndexError, ValueError):  # a header cut short
        stats.truncated += 1
        return None


def udp_of_ip(buf: bytes, frags: Reassembler, stats: CaptureStats) -> tuple[Endpoint, Endpoint, bytes] | None:
    """(src, dst, payload) of an IPv4/IPv6 packet that is UDP (fragments put together), else None (counted)."""
    if not buf:
        return None
    try:
        if buf[0] >> 4 == 4:
            return _ipv4(buf, 0, frags, stats)
        if buf[0] >> 4 == 6:
            return _ipv6(buf, 0, frags, stats)
    except (struct.error, IndexError, ValueError):
        stats.truncated += 1
        return None
    stats.not_udp += 1
    return None


def _network(link: int, buf: bytes) -> tuple[int, int] | None:
    """(IP version, offset of the IP header) of a link-layer frame; None for anything but IPv4/IPv6."""
    n = len(buf)
    if link == LINKTYPE_ETHERNET:
        if n < 14:
            return None
        off, etype = 14, int.from_bytes(buf[12:14], "big")
        while etype in _ETH_VLAN and off + 4 <= n:  # 802.1Q / 802.1ad tags, possibly stacked
            etype = int.from_bytes(buf[off + 2:off + 4], "big")
            off += 4
        return _by_ethertype(etype, off)
    if link == LINKTYPE_LINUX_SLL:
        return _by_ethertype(int.from_bytes(buf[14:16], "big"), 16) if n >= 16 else None
    if link == LINKTYPE_LINUX_SLL2:
        return _by_ethertype(int.from_bytes(buf[0:2], "big"), 20) if n >= 20 else None
    if link in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if n < 4:
            return None
        fam = {int.from_bytes(buf[0:4], "big"), int.from_bytes(buf[0:4], "little")}
        if 2 in fam:
            return 4, 4
        if fam & set(_AF_INET6):
            return 6, 4
        return None
    # raw IP: the version nibble says which
    if n < 1:
        return None
    version = buf[0] >> 4
    if link == LINKTYPE_IPV4 and version != 4 or link == LINKTYPE_IPV6 and version != 6:
        return None
    return (version, 0) if version in (4, 6) else None


def _by_ethertype(etype: int, off: int) -> tuple[int, int] | None:
    if etype == _ETH_IPV4:
        return 4, off
    if etype == _ETH_IPV6:
        return 6, off
    return None


def _ipv4(buf: bytes, off: int, frags: Reassembler, stats: CaptureStats) -> tuple[Endpoint, Endpoint, bytes] | None:
    b0 = buf[off]
    ihl = (b0 & 0x0F) * 4
    if b0 >> 4 != 4 or ihl < 20:
        stats.truncated += 1
        return None
    total = int.from_bytes(buf[off + 2:off + 4], "big")
    if total == 0:  # TCP segmentation offload captures leave it 0: take the frame's length
        total = len(buf) - off
    if total < ihl or off + total > len(buf):
        stats.truncated += 1  # cut by the snap length (or a bogus length)
        return None
    flags_frag = int.from_bytes(buf[off + 6:off + 8], "big")
    proto = buf[off + 9]
    if proto != _IPPROTO_UDP:
        stats.not_udp += 1
        return None
    src = socket.inet_ntop(socket.AF_INET, buf[off + 12:off + 16])
    dst = socket.inet_ntop(socket.AF_INET, buf[off + 16:off + 20])
    body = buf[off + ihl:off + total]  # Ethernet padding after the IP datagram left out
    more, frag_off = bool(flags_frag & 0x2000), (flags_frag & 0x1FFF) * 8
    if more or frag_off:
        ident = int.from_bytes(buf[off + 4:off + 6], "big")
        whole = frags.add((4, src, dst, ident), frag_off, more, body)
        if whole is None:
            return None
        body = whole
    return _udp_payload(body, src, dst, stats)


def _ipv6(buf: bytes, off: int, frags: Reassembler, stats: CaptureStats) -> tuple[Endpoint, Endpoint, bytes] | None:
    if buf[off] >> 4 != 6:
        stats.truncated += 1
        return None
    plen = int.from_bytes(buf[off + 4:off + 6], "big")
    nxt = buf[off + 6]
    if plen == 0 or off + 40 + plen > len(buf):  # a jumbogram, or cut by the snap length
        stats.truncated += 1
        return None
    src = socket.inet_ntop(socket.AF_INET6, buf[off + 8:off + 24])
    dst = socket.inet_ntop(socket.AF_INET6, buf[off + 24:off + 40])
    body = buf[off + 40:off + 40 + plen]
    frag: tuple[int, bool, int] | None = None
    while nxt in _IPV6_EXT or nxt == _IPV6_FRAGMENT:
        if len(body) < 8:
            stats.truncated += 1
            return None
        if nxt == _IPV6_FRAGMENT:
            fo = int.from_bytes(body[2:4], "big")
            frag = (fo & 0xFFF8, bool(fo & 1), int.from_bytes(body[4:8], "big"))
            nxt, body = body[0], body[8:]
        else:
            length = (body[1] + 1) * 8
            nxt, body = body[0], body[length:]
    if nxt != _IPPROTO_UDP:
        stats.not_udp += 1
        return None
    if frag is not None and (frag[0] or frag[1]):
        whole = frags.add((6, src, dst, frag[2]), frag[0], frag[1], body)
        if whole is None:
            return None
        body = whole
    return _udp_payload(body, src, dst, stats)


def _udp_payload(body: bytes, src: str, dst: str, stats: CaptureStats) -> tuple[Endpoint, Endpoint, bytes] | None:
    if len(body) < 8:
        stats.truncated += 1
        return None
    sport, dport, ulen = struct.unpack_from("!HHH", body)
    if ulen == 0:  # UDP over IPv6 jumbograms, or offloaded checksums: the IP length rules
        ulen = len(body)
    if ulen < 8 or ulen > len(body):
        stats.truncated += 1
        return None
    return (src, sport), (dst, dport), body[8:ulen]


# ---------------------------------------------------------------------------------------------- RTP flows


@dataclass
class Flow:
    """One RTP stream found in a capture: one sender's SSRC from one address to another."""

    src: Endpoint
    dst: Endpoint
    ssrc: int
    packets: int
    first_s: float  # capture time of its first and last packet
    last_s: float
    payload_types: dict[int, int]  # payload type -> packets
    codecs: dict[int, Codec] = field(default_factory=dict)  # the payload types that could be identified
    codec_from: dict[int, str] = field(default_factory=dict)  # pt -> "static", "sdp" or "packets"
    # The SIP call whose SDP names the flow's destination (and which direction of it the flow is), if any.
    dialog: MediaOf | None = field(default=None, compare=False)

    @property
    def pt(self) -> int:
        """The payload type of most of its packets (DTMF events and comfort noise do not count)."""
        audio = {pt: n for pt, n in self.payload_types.items()
                 if pt not in self.codecs or self.codecs[pt].decodable}
        pool = audio or self.payload_types
        return max(pool, key=lambda pt: (pool[pt], -pt))

    @property
    def codec(self) -> Codec | None:
        """The codec of its main payload type; None when it could not be identified."""
        return self.codecs.get(self.pt)

    @property
    def codec_name(self) -> str:
        c = self.codec
        return c.name if c is not None else f"payload type {self.pt}"

    @property
    def duration_s(self) -> float:
        return self.last_s - self.first_s

    @property
    def key(self) -> tuple[Endpoint, Endpoint, int]:
        return self.src, self.dst, self.ssrc

    def describe(self) -> str:
        return (f"{self.codec_name} from {format_endpoint(self.src)} to {format_endpoint(self.dst)} "
                f"ssrc {self.ssrc:08x}")


class _FlowStats:
    __slots__ = ("packets", "first_s", "last_s", "last_seq", "good", "pts", "sizes", "ts_steps", "first_ts",
                 "last_ts", "main_pt")

    def __init__(self, ts: float) -> None:
        self.packets = 0
        self.first_s = ts
        self.last_s = ts
        self.last_seq = -1
        self.good = 0
        self.pts: collections.Counter[int] = collections.Counter()
        self.sizes: dict[int, list[int]] = {}  # pt -> payload sizes (the first few hundred)
        self.ts_steps: dict[int, list[int]] = {}  # pt -> timestamp step per sequence step (sampled)
        self.first_ts: dict[int, tuple[float, int]] = {}  # pt -> (capture time, RTP timestamp) of its first
        self.last_ts: dict[int, tuple[float, int, int]] = {}  # pt -> (capture time, RTP timestamp, seq) latest


_SAMPLE = 400  # payload sizes / timestamp steps kept per payload type, for recognising the codec


class _SdpBook:
    """Payload types declared by the SDPs of SIP messages in the capture, by media address and by port."""

    def __init__(self) -> None:
        self.by_addr: dict[Endpoint, dict[int, Codec]] = {}
        self.by_port: dict[int, dict[int, Codec]] = {}
        self.tracker = DialogTracker()  # the calls, as a live capture follows them (names, call keys)

    def sip(self, payload: bytes, ts: float) -> None:
        """A SIP message of the capture, for the calls (one that cannot be read is left out)."""
        try:
            self.tracker.message(parse_sip(payload), ts)
        except SipError:
            pass

    def offer(self, payload: bytes) -> None:
        head = payload[:16]
        if not (head.startswith(b"SIP/2.0") or b" sip:" in payload[:64].lower() or b" sips:" in payload[:64].lower()):
            return
        sep = payload.find(b"\r\n\r\n")
        if sep < 0 or b"application/sdp" not in payload[:sep].lower():
            return
        try:
            media = parse_sdp(payload[sep + 4:].decode("utf-8", "replace"))
        except CodecError:
            return
        for m in media:
            if m.addr:
                self.by_addr.setdefault((m.addr, m.port), {}).update(m.codecs)
            self.by_port.setdefault(m.port, {}).update(m.codecs)

    def codecs_for(self, dst: Endpoint) -> Mapping[int, Codec]:
        return self.by_addr.get(dst) or self.by_port.get(dst[1]) or {}


def find_rtp_flows(datagrams: Iterable[Datagram], port: int | None = None,
                   codecs: Mapping[int, Codec] | None = None) -> list[Flow]:
    """The RTP streams among ``datagrams``, in order of their first packet.

    A group of datagrams with the same source, destination and SSRC is a flow when it has at least
    :data:`MIN_PACKETS` valid RTP packets with an audio payload type and most successive packets step
    the sequence number forward by a little (so DNS, SIP, RTCP, STUN or random UDP never pass).
    ``port``: only datagrams from or to that UDP port.  ``codecs``: payload types declared by the
    caller, over the static ones and those SDPs in the capture declare.
    """
    groups: dict[tuple[Endpoint, Endpoint, int], _FlowStats] = {}
    sdp = _SdpBook()
    for d in datagrams:
        data = d.payload
        if len(data) < 12 or data[0] >> 6 != 2:
            if data[:3] in (b"INV", b"SIP", b"UPD", b"ACK", b"PRA"):
                sdp.offer(data)
            if looks_like_sip(data):
                sdp.sip(data, d.ts)
            continue
        if port is not None and d.src[1] != port and d.dst[1] != port:
            continue
        if is_rtcp(data):
            continue
        pkt = parse_rtp(data)
        if isinstance(pkt, str) or pkt.payload_type not in AUDIO_PTS:
            continue
        key = (d.src, d.dst, pkt.ssrc)
        st = groups.get(key)
        if st is None:
            st = groups[key] = _FlowStats(d.ts)
        st.packets += 1
        st.last_s = d.ts
        if st.last_seq >= 0 and 1 <= (pkt.sequence - st.last_seq) % 65536 <= MAX_SEQ_STEP:
            st.good += 1
        pt = pkt.payload_type
        st.pts[pt] += 1
        sizes = st.sizes.setdefault(pt, [])
        if len(sizes) < _SAMPLE:
            sizes.append(len(pkt.payload))
        prev = st.last_ts.get(pt)
        if prev is not None:
            dseq = (pkt.sequence - prev[2]) % 65536
            steps = st.ts_steps.setdefault(pt, [])
            if 1 <= dseq <= 3 and len(steps) < _SAMPLE:
                steps.append(((pkt.timestamp - prev[1]) % (1 << 32)) // dseq)
        else:
            st.first_ts[pt] = (d.ts, pkt.timestamp)
        st.last_ts[pt] = (d.ts, pkt.timestamp, pkt.sequence)
        st.last_seq = pkt.sequence
    flows: list[Flow] = []
    for (src, dst, ssrc), st in groups.items():
        if st.packets < MIN_PACKETS or st.good < MIN_GOOD_STEPS * (st.packets - 1):
            continue
        flow = Flow(src, dst, ssrc, st.packets, st.first_s, st.last_s, dict(st.pts))
        flow.dialog = sdp.tracker.media(dst)
        declared = sdp.codecs_for(dst)
        for pt in st.pts:
            if codecs and pt in codecs:
                flow.codecs[pt], flow.codec_from[pt] = codecs[pt], "given"
            elif pt in declared:
                flow.codecs[pt], flow.codec_from[pt] = declared[pt], "sdp"
            elif pt in STATIC:
                flow.codecs[pt], flow.codec_from[pt] = STATIC[pt], "static"
            elif pt == 13:
                flow.codecs[pt], flow.codec_from[pt] = codec_by_name("CN", 13), "static"
        audio_clock = next((c.clock_rate for c in flow.codecs.values() if c.decodable), None)
        for pt in sorted(st.pts, key=lambda p: -st.pts[p]):  # the main one first: its clock helps the others
            if pt in flow.codecs:
                continue
            guess = _recognise(pt, st, audio_clock)
            if guess is not None:
                flow.codecs[pt], flow.codec_from[pt] = guess, "packets"
                if guess.decodable and audio_clock is None:
                    audio_clock = guess.clock_rate
        flows.append(flow)
    flows.sort(key=lambda f: f.first_s)
    return flows


def _clock_estimate(pt: int, st: _FlowStats) -> float | None:
    """RTP timestamp units per second of capture time over the payload type's packets, if measurable."""
    first, last = st.first_ts.get(pt), st.last_ts.get(pt)
    if first is None or last is None:
        return None
    span = last[0] - first[0]
    if span < 0.5:
        return None
    return ((last[1] - first[1]) % (1 << 32)) / span


def _snap(rate: float) -> int | None:
    best = min(_CLOCKS, key=lambda c: abs(c - rate))
    return best if abs(best - rate) <= 0.1 * best else None


def _recognise(pt: int, st: _FlowStats, audio_clock: int | None) -> Codec | None:
    """A dynamic payload type's codec from what its packets look like (no SDP said it)."""
    sizes = st.sizes.get(pt) or []
    steps = st.ts_steps.get(pt) or []
    if not sizes:
        return None
    # RFC 4733 telephone events: 4-byte event blocks, the timestamp held for the whole event
    if all(s and s % 4 == 0 and s <= 16 for s in sizes) and (not steps or statistics.median(steps) == 0):
        return codec_by_name("telephone-event", pt, audio_clock or 8000)
    if not steps:
        return None
    step = int(statistics.median(steps))
    measured = _clock_estimate(pt, st)
    clock = _snap(measured) if measured is not None else None
    size = int(statistics.median(sizes))
    if step > 0 and all(s == size for s in sizes):
        for channels in (1, 2):
            if size == 2 * channels * step:  # L16: two bytes per sample per channel
                rate = clock or _snap(step * 50.0)  # without timing, 20 ms packets are the usual
                if rate is not None:
                    return codec_by_name("L16", pt, rate, channels)
    if step in _OPUS_STEPS and clock in (None, 48000) and _opus_like(sizes):
        return codec_by_name("opus", pt)
    return None


def _opus_like(sizes: list[int]) -> bool:
    """Opus packets: 1..1275 bytes each (RFC 6716 3.4); a real encoder's sizes vary (VBR) or are all equal (CBR)."""
    return all(1 <= s <= 1275 for s in sizes)


# ---------------------------------------------------------------------------------------------- replay


class FlowEvent(NamedTuple):
    """What a flow's destination demux reported, with the flow it concerns (None when it is not one of them)."""

    dst: Endpoint
    flow: Flow | None
    event: DemuxEvent


class FlowDemux:
    """The datagrams of chosen flows into one :class:`RtpDemux` per destination, capture times as arrival times.

    Feed it every datagram of the capture in file order (:meth:`feed`); it passes on the RTP packets
    of ``flows`` and the RTCP sent to their ports (or the ports above them), nothing else, so stray
    packets that only look like RTP never become streams.  Arrival times are capture times relative
    to the first datagram fed (:attr:`now` is the latest); call :meth:`expire` as capture time goes
    on so that holes are given up and silent streams end.
    """

    def __init__(self, flows: Iterable[Flow], *, timeout_s: float, history_s: float = 60.0) -> None:
        self.flows: dict[tuple[Endpoint, Endpoint, int], Flow] = {}
        self._by_dst: dict[tuple[Endpoint, int], Flow] = {}
        per_dst: dict[Endpoint, dict[int, Codec]] = {}
        for f in flows:
            self.flows[f.key] = f
            self._by_dst.setdefault((f.dst, f.ssrc), f)
            per_dst.setdefault(f.dst, {}).update(f.codecs)
        self.demuxes = {dst: RtpDemux(c, timeout_s=timeout_s, history_s=history_s) for dst, c in per_dst.items()}
        self._rtcp: dict[Endpoint, Endpoint] = {}
        for dst in per_dst:
            self._rtcp[(dst[0], dst[1] + 1)] = dst
        for dst in per_dst:
            self._rtcp[dst] = dst
        self.t0: float | None = None
        self.now = 0.0

    def arrival(self, ts: float) -> float:
        """Capture time ``ts`` on the demuxes' time base (seconds since the first datagram fed)."""
        if self.t0 is None:
            self.t0 = ts
        return ts - self.t0

    def feed(self, d: Datagram) -> list[FlowEvent]:
        """One datagram of the capture; returns the events it caused."""
        t = self.now = max(self.now, self.arrival(d.ts))
        data = d.payload
        if is_rtcp(data):
            dst = self._rtcp.get(d.dst)
            if dst is None:
                return []
            return self._events(dst, self.demuxes[dst].datagram(data, d.src, t))
        if len(data) < 12 or d.dst not in self.demuxes:
            return []
        ssrc = int.from_bytes(data[8:12], "big")
        if (d.src, d.dst, ssrc) not in self.flows:
            return []
        return self._events(d.dst, self.demuxes[d.dst].datagram(data, d.src, t))

    def expire(self, now_s: float | None = None) -> list[FlowEvent]:
        """Let every demux give up holes and end silent streams at ``now_s`` (default: the latest arrival)."""
        now = self.now if now_s is None else now_s
        out: list[FlowEvent] = []
        for dst, demux in self.demuxes.items():
            out += self._events(dst, demux.expire(now))
        return out

    def _events(self, dst: Endpoint, events: list[DemuxEvent]) -> list[FlowEvent]:
        out = []
        for ev in events:
            flow = self._by_dst.get((dst, ev.ssrc))
            if isinstance(ev, StreamFailed) and flow is not None and flow.codec is None:
                ev = StreamFailed(ev.ssrc, undeclared_message(flow))
            out.append(FlowEvent(dst, flow, ev))
        return out


def undeclared_message(flow: Flow) -> str:
    return (f"RTP stream {flow.ssrc:08x} from {format_endpoint(flow.src)} to {format_endpoint(flow.dst)} uses "
            f"payload type {flow.pt}, which no SDP in the capture declares and which its packets do not identify; "
            f"name its codec as in pcap:FILE?codec=NAME&pt={flow.pt} (e.g. codec=opus, or codec=L16&rate=16000)")
