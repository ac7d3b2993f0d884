"""RTP/RTCP header parsing: valid packets as another implementation (aiortc) reads them, bad ones by reason."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from aiortc.rtp import RtpPacket as AiortcPacket

from scoreq_live.rtp.packet import (
    DROP_BAD_CSRC,
    DROP_BAD_EXTENSION,
    DROP_BAD_PADDING,
    DROP_BAD_VERSION,
    DROP_TRUNCATED,
    RtpPacket,
    is_rtcp,
    parse_rtcp_bye,
    parse_rtp,
    rtcp_packet_types,
)

# ---------------------------------------------------------------------------------- builders (shared)


def rtp_bytes(seq: int, ts: int, ssrc: int, pt: int, payload: bytes, *, marker: bool = False,
              csrc: tuple[int, ...] = (), ext: bytes | None = None, padding: int = 0, version: int = 2) -> bytes:
    """An RTP packet, built field by field (RFC 3550 5.1)."""
    b0 = (version << 6) | (0x20 if padding else 0) | (0x10 if ext is not None else 0) | len(csrc)
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrc)
    if ext is not None:
        assert len(ext) % 4 == 0
        out += struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
    out += payload
    if padding:
        out += bytes(padding - 1) + bytes([padding])
    return out


def rtcp_sr(ssrc: int) -> bytes:
    """An RTCP sender report without report blocks (RFC 3550 6.4.1)."""
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 0, 0, 0, 0, 0)


def rtcp_rr(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def rtcp_bye(*ssrcs: int) -> bytes:
    return struct.pack("!BBH", 0x80 | len(ssrcs), 203, len(ssrcs)) + b"".join(struct.pack("!I", s) for s in ssrcs)


def rtcp_sdes(ssrc: int, cname: bytes = b"a@b") -> bytes:
    item = bytes([1, len(cname)]) + cname + b"\x00"
    item += bytes(-len(item) % 4)
    body = struct.pack("!I", ssrc) + item
    return struct.pack("!BBH", 0x81, 202, len(body) // 4) + body


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kwargs", [
    {},
    {"marker": True},
    {"csrc": (1, 2, 0xFFFFFFFF)},
    {"ext": b"\x10\xff\x00\x00"},
    {"padding": 4},
    {"csrc": (7,), "ext": bytes(8), "padding": 1, "marker": True},
])
def test_valid_packets_read_like_aiortc(kwargs: dict) -> None:
    payload = bytes(range(160))
    data = rtp_bytes(65535, 0xFFFFFFF0, 0xDEADBEEF, 111, payload, **kwargs)
    p = parse_rtp(data)
    assert isinstance(p, RtpPacket)
    ref = AiortcPacket.parse(data)
    assert (p.payload_type, p.marker, p.sequence, p.timestamp, p.ssrc, p.payload) == (
        ref.payload_type, bool(ref.marker), ref.sequence_number, ref.timestamp, ref.ssrc, ref.payload)
    assert p.payload == payload


def test_empty_payload_is_a_packet() -> None:
    p = parse_rtp(rtp_bytes(1, 2, 3, 0, b""))
    assert isinstance(p, RtpPacket) and p.payload == b""


@pytest.mark.parametrize(("data", "reason"), [
    (b"", DROP_TRUNCATED),
    (rtp_bytes(1, 2, 3, 0, b"")[:11], DROP_TRUNCATED),
    (rtp_bytes(1, 2, 3, 0, b"abcd", version=1), DROP_BAD_VERSION),
    (rtp_bytes(1, 2, 3, 0, b"abcd", version=0), DROP_BAD_VERSION),
    (rtp_bytes(1, 2, 3, 0, b"abcd", version=3), DROP_BAD_VERSION),
    # CSRC count 15 with only 4 bytes after the fixed header
    (bytes([0x8F]) + rtp_bytes(1, 2, 3, 0, b"abcd")[1:], DROP_BAD_CSRC),
    # extension header cut off, then an extension length running past the end
    (rtp_bytes(1, 2, 3, 0, b"", ext=b"")[:14], DROP_BAD_EXTENSION),
    (rtp_bytes(1, 2, 3, 0, b"", ext=b"")[:12] + b"\xbe\xde\x00\x09" + bytes(16), DROP_BAD_EXTENSION),
    # padding flag with a count of 0, and with a count longer than the payload
    (bytes([0xA0]) + rtp_bytes(1, 2, 3, 0, b"abc\x00")[1:], DROP_BAD_PADDING),
    (bytes([0xA0]) + rtp_bytes(1, 2, 3, 0, b"abc\x09")[1:], DROP_BAD_PADDING),
])
def test_bad_packets_are_dropped_by_reason(data: bytes, reason: str) -> None:
    assert parse_rtp(data) == reason


def test_rtcp_is_told_from_rtp() -> None:
    for pkt in (rtcp_sr(5), rtcp_rr(5), rtcp_bye(5), rtcp_sdes(5), rtcp_rr(1) + rtcp_bye(1, 2)):
        assert is_rtcp(pkt)
    assert not is_rtcp(rtp_bytes(1, 2, 3, 0, bytes(160)))
    assert not is_rtcp(rtp_bytes(1, 2, 3, 0, bytes(160), marker=True))  # marker + PT 0 = 128
    assert not is_rtcp(rtp_bytes(1, 2, 3, 111, bytes(160), marker=True))  # marker + PT 111 = 239
    assert rtcp_packet_types(rtcp_rr(1) + rtcp_sdes(1) + rtcp_bye(1)) == [201, 202, 203]


def test_bye_lists_its_sources_in_compound_packets() -> None:
    assert parse_rtcp_bye(rtcp_bye(0x11223344)) == [0x11223344]
    assert parse_rtcp_bye(rtcp_rr(9) + rtcp_sdes(9) + rtcp_bye(1, 2, 3)) == [1, 2, 3]
    assert parse_rtcp_bye(rtcp_sr(9) + rtcp_rr(9)) == []
    # a BYE whose length is shorter than its source count says: nothing past the malformed part
    bad = struct.pack("!BBH", 0x83, 203, 1) + struct.pack("!I", 7)
    assert parse_rtcp_bye(rtcp_bye(1) + bad) == [1]
    assert parse_rtcp_bye(rtcp_bye(1)[:6]) == []


def test_random_bytes_never_raise() -> None:
    rng = np.random.default_rng(1)
    reasons: set[str] = set()
    for _ in range(20000):
        data = rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
        r = parse_rtp(data)
        reasons.add(r if isinstance(r, str) else "packet")
        is_rtcp(data)
        parse_rtcp_bye(data)
    assert {DROP_TRUNCATED, DROP_BAD_VERSION, DROP_BAD_CSRC, "packet"} <= reasons


def test_garbage_is_rejected_cheaply() -> None:
    """50,000 bad datagrams must cost well under a second (the check is cheapest-first)."""
    rng = np.random.default_rng(2)
    junk = [rng.integers(0, 256, 172, dtype=np.uint8).tobytes() for _ in range(1000)]
    junk = [bytes([d[0] & 0x3F]) + d[1:] for d in junk]  # wrong version: the common garbage case
    short = [d[:7] for d in junk]
    start = time.perf_counter()
    for _ in range(25):
        for a, b in zip(junk, short):
            if not is_rtcp(a):
                parse_rtp(a)
            if not is_rtcp(b):
                parse_rtp(b)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"50,000 garbage datagrams took {elapsed:.2f} s"
