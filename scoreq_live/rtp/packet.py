"""RTP and RTCP datagrams: header parsing that never raises, for one datagram at a time.

:func:`parse_rtp` returns either an :class:`RtpPacket` or the reason the datagram was dropped (one of
the ``DROP_*`` strings), so that a receiver can count bad packets by reason.  The checks are ordered
cheapest first (length, version) so that a flood of garbage costs a few attribute look-ups per
datagram.  :func:`is_rtcp` recognises RTCP multiplexed on the RTP port (RFC 5761 section 4: the
second byte of an RTCP packet is its packet type, 192..223, which as an RTP header would be the
marker bit with one of the payload types 64..95 that RFC 5761 reserves for this purpose), and
:func:`parse_rtcp_bye` reads the sources a (compound) RTCP packet says goodbye for.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

DROP_TRUNCATED = "truncated"  # shorter than the 12-byte fixed header
DROP_BAD_VERSION = "bad_version"  # version field is not 2
DROP_BAD_CSRC = "bad_csrc"  # the CSRC count says more CSRC entries than the datagram holds
DROP_BAD_EXTENSION = "bad_extension"  # the header extension runs past the end of the datagram
DROP_BAD_PADDING = "bad_padding"  # padding flag set with a padding count of 0 or longer than the payload

RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_BYE, RTCP_APP = 200, 201, 202, 203, 204

_HEADER = struct.Struct("!BBHII")
_U16 = struct.Struct("!H")
_RTCP_HEADER = struct.Struct("!BBH")
_U32 = struct.Struct("!I")


@dataclass(slots=True)
class RtpPacket:
    """The parts of an RTP packet a receiver uses; ``payload`` excludes CSRCs, extension and padding."""

    payload_type: int
    marker: bool
    sequence: int  # 16 bits
    timestamp: int  # 32 bits
    ssrc: int  # 32 bits
    payload: bytes


def parse_rtp(data: bytes) -> RtpPacket | str:
    """The RTP packet in ``data``, or the drop reason (``DROP_*``) when it is not a valid RTP packet.

    Never raises.  Does not check for RTCP: call :func:`is_rtcp` first on a port that may carry both.
    """
    n = len(data)
    if n < 12:
        return DROP_TRUNCATED
    b0 = data[0]
    if b0 >> 6 != 2:
        return DROP_BAD_VERSION
    off = 12 + ((b0 & 0x0F) << 2)
    if off > n:
        return DROP_BAD_CSRC
    if b0 & 0x10:
        if off + 4 > n:
            return DROP_BAD_EXTENSION
        off += 4 + (_U16.unpack_from(data, off + 2)[0] << 2)
        if off > n:
            return DROP_BAD_EXTENSION
    end = n
    if b0 & 0x20:
        pad = data[n - 1]
        if pad == 0 or off + pad > n:
            return DROP_BAD_PADDING
        end = n - pad
    _, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
    return RtpPacket(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, bytes(data[off:end]))


def is_rtcp(data: bytes) -> bool:
    """True when ``data`` looks like RTCP (version 2, packet type 192..223) rather than RTP (RFC 5761 4)."""
    return len(data) >= 8 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


def _rtcp_packets(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(first byte, packet type, offset, length) of each RTCP packet of a compound datagram, in order.

    Stops at the first malformed one (not version 2, or longer than what is left).
    """
    off, n = 0, len(data)
    while off + 4 <= n:
        b0, pt, words = _RTCP_HEADER.unpack_from(data, off)
        length = (words + 1) * 4
        if b0 >> 6 != 2 or off + length > n:
            return
        yield b0, pt, off, length
        off += length


def rtcp_packet_types(data: bytes) -> list[int]:
    """The packet types of the RTCP packets in a compound datagram, in order; stops at the first malformed one."""
    return [pt for _, pt, _, _ in _rtcp_packets(data)]


def parse_rtcp_bye(data: bytes) -> list[int]:
    """The SSRCs an RTCP BYE in ``data`` ends (RFC 3550 6.6), from every BYE in a compound packet.

    Never raises: a malformed packet ends the walk, keeping what was read before it.
    """
    ssrcs: list[int] = []
    for b0, pt, off, length in _rtcp_packets(data):
        if pt == RTCP_BYE:
            count = b0 & 0x1F
            if 4 + 4 * count > length:
                break
            ssrcs += [_U32.unpack_from(data, off + 4 + 4 * i)[0] for i in range(count)]
    return ssrcs
