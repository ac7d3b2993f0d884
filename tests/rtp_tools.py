"""Real RTP senders and network tools for the RTP tests, all on loopback (127.0.0.1) only.

* :func:`ffmpeg_rtp` - ffmpeg sends a speech file as RTP (PCMU, PCMA, G.722, Opus), paced in real time;
  :func:`ffmpeg_sdp` returns the SDP ffmpeg writes for such a stream (``-sdp_file``).
* :func:`encode_like_ffmpeg` - the same audio through the same codec, decoded offline: the reference a
  product test compares its scores (or decoded audio) against.
* :class:`ImpairmentProxy` - a UDP proxy between sender and receiver that drops (random, Gilbert-Elliott
  bursts), duplicates, reorders and delays packets with a seeded generator and records exactly what it did.
* :func:`rtp_packet`, :func:`rtcp_bye`, :func:`send_packets`, :func:`flood` - hand-made packets (also broken
  ones) and paced senders.
* :func:`sipp_rtp` - sipp as a second, independent sender: a SIP call on loopback whose caller replays the
  RTP of a pcap file to the port the answer's SDP names.
* :func:`write_pcap` - a capture (pcap or pcapng) of RTP streams made from real speech, with dpkt.
* :class:`UdpCollector`, :func:`parse_rtp_header`, :func:`g711_decode` - an independent receiving side, so
  tests can check what really went over the wire.

ffmpeg and sipp come from Debian (``ffmpeg``, ``sip-tester``; see ``.ci/install-system.sh``).  Tests call
:func:`require_ffmpeg` / :func:`require_sipp`: without the tool the test is skipped, except on CI (``CI``
set), where it fails.  sipp replays a pcap through a raw socket, so it also needs root or CAP_NET_RAW on
its binary (``setcap cap_net_raw+ep``, which ``.ci/install-system.sh`` grants).
"""

from __future__ import annotations

import heapq
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from tests.helpers import stop_process  # re-exported: the RTP tests stop their senders with it

__all__ = [
    "CODECS", "FfmpegCodec", "ImpairmentProxy", "PacketRecord", "RtpFlow", "RtpHeader", "SippCall", "UdpCollector",
    "encode_like_ffmpeg", "encode_packets", "ffmpeg_available", "ffmpeg_rtp", "ffmpeg_sdp", "flood",
    "free_udp_port", "g711_decode", "garbage", "parse_rtp_header", "pcm_s16", "read_pcap_udp", "require_ffmpeg",
    "require_sipp", "rtcp_bye", "rtp_packet", "send_packets", "sipp_available", "sipp_rtp", "stop_process",
    "write_pcap",
]

LOOPBACK = "127.0.0.1"
CodecName = Literal["pcmu", "pcma", "g722", "opus"]
OPUS_BITRATE = 32000
OPUS_FRAME_MS = (10, 20, 40, 60)  # the libopus frame durations that are whole milliseconds


@dataclass(frozen=True)
class FfmpegCodec:
    """How ffmpeg (and PyAV, for pcap files) encodes one RTP audio codec."""

    name: str           # "pcmu", ...
    encoder: str        # ffmpeg encoder
    audio_rate: int     # rate the encoder runs at (G.722: 16000)
    clock_rate: int     # RTP timestamp units per second (G.722: 8000, RFC 3551)
    static_pt: int | None  # RTP/AVP static payload type; None: dynamic (ffmpeg picks 97)
    raw_format: str     # ffmpeg muxer for the offline round trip
    rtpmap: str         # encoding name/clock[/channels] as in SDP
    bytes_per_ms: int   # payload bytes per millisecond for the constant-rate codecs; 0 for Opus


CODECS: dict[str, FfmpegCodec] = {
    "pcmu": FfmpegCodec("pcmu", "pcm_mulaw", 8000, 8000, 0, "mulaw", "PCMU/8000", 8),
    "pcma": FfmpegCodec("pcma", "pcm_alaw", 8000, 8000, 8, "alaw", "PCMA/8000", 8),
    "g722": FfmpegCodec("g722", "g722", 16000, 8000, 9, "g722", "G722/8000", 8),
    "opus": FfmpegCodec("opus", "libopus", 48000, 48000, None, "ogg", "opus/48000/2", 0),
}
FFMPEG_OPUS_PT = 97  # the dynamic payload type ffmpeg's RTP muxer gives Opus when none is asked for


def _codec(codec: str) -> FfmpegCodec:
    try:
        return CODECS[codec.lower()]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Tool availability
# ---------------------------------------------------------------------------------------------------------------


def ffmpeg_available() -> tuple[bool, str]:
    """(True, "") when ffmpeg can send RTP here, else (False, why)."""
    if shutil.which("ffmpeg") is None:
        return False, "ffmpeg not found (Debian package ffmpeg; see .ci/install-system.sh)"
    return True, ""


def sipp_available() -> tuple[bool, str]:
    """(True, "") when sipp can replay a pcap here, else (False, why).

    sipp's ``play_pcap_audio`` writes the UDP headers itself through a raw socket, which needs root or
    CAP_NET_RAW (of this process, or granted to the sipp binary as a file capability); the Debian build must
    have pcap play compiled in (``sipp -v`` names ``PCAP``).
    """
    path = shutil.which("sipp")
    if path is None:
        return False, "sipp not found (Debian package sip-tester; see .ci/install-system.sh)"
    try:
        out = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"sipp -v failed: {e}"
    if "PCAP" not in out.stdout + out.stderr:
        return False, "this sipp was built without pcap play (sipp -v does not name PCAP)"
    if not (_raw_socket_allowed() or _file_grants_net_raw(path)):
        return False, ("sipp's pcap play needs a raw socket: run as root, or grant the sipp binary CAP_NET_RAW "
                       "(setcap cap_net_raw+ep, as .ci/install-system.sh does)")
    return True, ""


CAP_NET_RAW = 13  # linux/capability.h


def _raw_socket_allowed() -> bool:
    """Whether this process may open a raw socket (root, or CAP_NET_RAW of its own); sipp inherits that."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP).close()
    except PermissionError:
        return False
    return True


def _file_grants_net_raw(path: str) -> bool:
    """Whether executing ``path`` gives CAP_NET_RAW: a file capability with it permitted and effective
    (``setcap cap_net_raw+ep``), which the kernel honours only within the bounding set and without
    no_new_privs."""
    try:
        xattr = os.getxattr(os.path.realpath(path), "security.capability")
    except OSError:  # no file capabilities, or a file system without extended attributes
        return False
    if len(xattr) < 8:
        return False
    magic, permitted = struct.unpack_from("<II", xattr)  # struct vfs_cap_data: magic_etc, data[0].permitted
    if not (magic & 1 and permitted >> CAP_NET_RAW & 1):  # VFS_CAP_FLAGS_EFFECTIVE
        return False
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return True  # cannot tell; let sipp try
    bounding = int(status.get("CapBnd", "0").strip() or "0", 16)
    return bool(bounding >> CAP_NET_RAW & 1) and status.get("NoNewPrivs", "0").strip() == "0"


def _require(ok_reason: tuple[bool, str]) -> None:
    import pytest

    ok, reason = ok_reason
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)


def require_ffmpeg() -> None:
    """Skip the calling test without ffmpeg; fail instead on CI, which installs it."""
    _require(ffmpeg_available())


def require_sipp() -> None:
    """Skip the calling test when sipp cannot replay a pcap here; fail instead on CI."""
    _require(sipp_available())


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# ffmpeg
# ---------------------------------------------------------------------------------------------------------------

_WAV_BYTES = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}


def _wav_max_size(wav: Path, packet_ms: int) -> list[str]:
    """``-max_size`` for ffmpeg's WAV demuxer: one ``packet_ms`` block per demuxed packet.

    ``-re`` paces by demuxed packet; the demuxer's default (4096 bytes, 43 ms of 24 kHz stereo) makes ffmpeg
    send RTP packets in pairs every ~40 ms.  Blocks of one packet duration give one packet every 20 ms.
    """
    if wav.suffix.lower() != ".wav":
        return []
    import soundfile as sf

    info = sf.info(str(wav))
    width = _WAV_BYTES.get(info.subtype)
    if width is None:
        return []
    frames = max(1, info.samplerate * packet_ms // 1000)
    block = frames * width * info.channels
    # The demuxer takes 1024 bytes at least: a smaller packet's worth becomes the first multiple above it.
    return ["-max_size", str(block * -(-1024 // block))]


def _encoder_args(c: FfmpegCodec, packet_ms: int, opus_bitrate: int) -> list[str]:
    """Filter + encoder options that make one encoder frame per ``packet_ms`` RTP packet."""
    if c.name == "opus":
        if packet_ms not in OPUS_FRAME_MS:
            raise ValueError(f"opus packet_ms must be one of {OPUS_FRAME_MS}, not {packet_ms}")
        return ["-af", f"aresample={c.audio_rate}", "-ar", str(c.audio_rate), "-c:a", c.encoder,
                "-b:a", str(opus_bitrate), "-frame_duration", str(packet_ms), "-application", "voip"]
    if packet_ms <= 0 or packet_ms > 120:
        raise ValueError(f"packet_ms must be 1..120, not {packet_ms}")
    # asetnsamples: frames of exactly one packet's samples (the last padded with silence), so that the RTP
    # muxer, which cuts each encoded frame into packets of at most -packetsize bytes, sends equal packets.
    n = c.audio_rate * packet_ms // 1000
    return ["-af", f"aresample={c.audio_rate},asetnsamples=n={n}", "-ar", str(c.audio_rate), "-c:a", c.encoder]


def _signed32(ssrc: int) -> int:
    """ffmpeg's ``-ssrc`` is a signed 32-bit option: 0xFFFFFFFB is passed as -5."""
    if not 0 <= ssrc <= 0xFFFFFFFF:
        raise ValueError(f"ssrc out of range: {ssrc}")
    return ssrc - (1 << 32) if ssrc >= 1 << 31 else ssrc


def _ffmpeg_rtp_cmd(
    inputs: list[str],
    port: int,
    c: FfmpegCodec,
    *,
    ssrc: int | None,
    payload_type: int | None,
    packet_ms: int,
    seq: int | None,
    rtcp: str,
    send_bye: bool,
    sdp_file: Path | None,
    opus_bitrate: int,
) -> list[str]:
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", *inputs, "-vn", "-ac", "1"]
    cmd += _encoder_args(c, packet_ms, opus_bitrate)
    if c.bytes_per_ms:
        cmd += ["-packetsize", str(12 + c.bytes_per_ms * packet_ms)]  # RTP header + one packet's payload
    if ssrc is not None:
        cmd += ["-ssrc", str(_signed32(ssrc))]
    if payload_type is not None:
        if not 0 <= payload_type <= 127:
            raise ValueError(f"payload_type must be 0..127, not {payload_type}")
        cmd += ["-payload_type", str(payload_type)]
    if seq is not None:
        cmd += ["-seq", str(seq & 0xFFFF)]
    flags = []
    if rtcp == "off":
        flags.append("skip_rtcp")
    elif rtcp not in ("mux", "next_port"):
        raise ValueError(f"rtcp must be 'off', 'mux' or 'next_port', not {rtcp!r}")
    if send_bye:
        flags.append("send_bye")
    if flags:
        cmd += ["-rtpflags", "+".join(flags)]
    if sdp_file is not None:
        cmd += ["-sdp_file", str(sdp_file)]
    url = f"rtp://{LOOPBACK}:{port}"
    if rtcp == "mux":
        url += f"?rtcpport={port}"
    return [*cmd, "-f", "rtp", url]


def ffmpeg_rtp(
    wav: str | os.PathLike[str],
    port: int,
    codec: CodecName = "pcmu",
    realtime: bool = True,
    ssrc: int | None = None,
    payload_type: int | None = None,
    packet_ms: int = 20,
    *,
    seq: int | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    rtcp: Literal["off", "mux", "next_port"] = "off",
    send_bye: bool = False,
    sdp_file: str | os.PathLike[str] | None = None,
    opus_bitrate: int = OPUS_BITRATE,
) -> subprocess.Popen[bytes]:
    """Start ffmpeg sending ``wav`` (mono mix) as RTP to 127.0.0.1:``port``; returns the running process.

    One RTP packet per ``packet_ms`` (PCMU/PCMA/G.722: ``-packetsize 12+8*packet_ms`` with frames of exactly
    one packet; Opus: ``-frame_duration packet_ms``), paced by ``-re`` when ``realtime`` (otherwise as fast as
    ffmpeg can).  ``ssrc``/``payload_type``/``seq`` map to the RTP muxer's options (default: random SSRC and
    first sequence number; PT 0/8/9 for PCMU/PCMA/G.722 and 97 for Opus).  ``start_s``/``duration_s`` cut
    an excerpt.  ``rtcp``: "off" sends no RTCP (``-rtpflags skip_rtcp``: every datagram is RTP), "mux" sends
    RTCP sender reports to the same port, "next_port" to ``port + 1``.  ``send_bye`` ends with an RTCP
    SR+BYE compound packet (even with ``rtcp="off"``); RTCP leaves from the sender's RTP port + 1, so a
    muxed BYE has a different source port than the RTP packets.  ``sdp_file`` makes ffmpeg write its SDP.

    Stop it with :func:`stop_process` in a ``finally``; ``proc.wait(timeout)`` returns once all is sent
    (exit status 0), its stderr holds ffmpeg's errors.
    """
    require = ffmpeg_available()
    if not require[0]:
        raise RuntimeError(require[1])
    c = _codec(codec)
    path = Path(wav)
    inputs: list[str] = _wav_max_size(path, packet_ms)
    if realtime:
        inputs.append("-re")
    if start_s:
        inputs += ["-ss", f"{start_s:.3f}"]
    if duration_s is not None:
        inputs += ["-t", f"{duration_s:.3f}"]
    inputs += ["-i", str(path)]
    cmd = _ffmpeg_rtp_cmd(inputs, port, c, ssrc=ssrc, payload_type=payload_type, packet_ms=packet_ms, seq=seq,
                          rtcp=rtcp, send_bye=send_bye, sdp_file=Path(sdp_file) if sdp_file else None,
                          opus_bitrate=opus_bitrate)
    # stdout gets the SDP (ffmpeg prints it for RTP outputs): not wanted.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ffmpeg_sdp(
    port: int,
    codec: CodecName = "pcmu",
    payload_type: int | None = None,
    packet_ms: int = 20,
    *,
    rtcp: Literal["off", "mux", "next_port"] = "off",
) -> str:
    """The SDP ffmpeg writes (``-sdp_file``) for :func:`ffmpeg_rtp` with the same arguments.

    Made by a run on zero seconds of silence (``-t 0``): nothing is sent to ``port``.
    """
    require = ffmpeg_available()
    if not require[0]:
        raise RuntimeError(require[1])
    c = _codec(codec)
    with tempfile.TemporaryDirectory(prefix="scoreq-sdp-") as d:
        out = Path(d) / "stream.sdp"
        # "-t 0" after "-i": an output option (as an input option it does not end the endless anullsrc)
        inputs = ["-f", "lavfi", "-i", f"anullsrc=r={c.audio_rate}:cl=mono", "-t", "0"]
        cmd = _ffmpeg_rtp_cmd(inputs, port, c, ssrc=None, payload_type=payload_type, packet_ms=packet_ms,
                              seq=None, rtcp=rtcp, send_bye=False, sdp_file=out, opus_bitrate=OPUS_BITRATE)
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing the SDP: {r.stderr.decode(errors='replace')[-2000:]}")
        return out.read_text()


def _ffmpeg_read(wav: str | os.PathLike[str], start_s: float, duration_s: float | None) -> list[str]:
    """An ffmpeg command line up to its input: ``wav`` (an excerpt of it), audio only, mixed to mono."""
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error"]
    if start_s:
        cmd += ["-ss", f"{start_s:.3f}"]
    if duration_s is not None:
        cmd += ["-t", f"{duration_s:.3f}"]
    return [*cmd, "-i", str(wav), "-vn", "-ac", "1"]


def pcm_s16(
    wav: str | os.PathLike[str], rate: int, *, start_s: float = 0.0, duration_s: float | None = None
) -> np.ndarray:
    """``wav`` as ffmpeg hands it to the encoder: mono int16 at ``rate`` (ffmpeg's resampler and downmix)."""
    cmd = [*_ffmpeg_read(wav, start_s, duration_s), "-af", f"aresample={rate}", "-ar", str(rate), "-f", "s16le", "-"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg could not read {wav}: {r.stderr.decode(errors='replace')[-2000:]}")
    return np.frombuffer(r.stdout, np.int16).copy()


def encode_like_ffmpeg(
    wav: str | os.PathLike[str],
    codec: CodecName,
    packet_ms: int = 20,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    opus_bitrate: int = OPUS_BITRATE,
) -> np.ndarray:
    """``wav`` through the codec exactly as :func:`ffmpeg_rtp` encodes it, decoded by ffmpeg: float32 16 kHz mono.

    Same downmix, resampler, framing and encoder options; the encoded stream goes through a raw/ogg file
    instead of RTP and comes back through ffmpeg's decoder and resampler.  Opus: the ogg container drops the
    encoder's pre-skip (312 samples at 48 kHz), which a plain RTP decoder plays, so an RTP-decoded Opus stream
    leads this reference by 6.5 ms.
    """
    require = ffmpeg_available()
    if not require[0]:
        raise RuntimeError(require[1])
    c = _codec(codec)
    enc = [*_ffmpeg_read(wav, start_s, duration_s), *_encoder_args(c, packet_ms, opus_bitrate), "-f", c.raw_format, "-"]
    r = subprocess.run(enc, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg encode ({c.name}) failed: {r.stderr.decode(errors='replace')[-2000:]}")
    dec = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", c.raw_format]
    if c.raw_format in ("mulaw", "alaw"):
        dec += ["-ar", str(c.audio_rate), "-ac", "1"]
    dec += ["-i", "-", "-ac", "1", "-af", "aresample=16000", "-ar", "16000", "-f", "f32le", "-"]
    r2 = subprocess.run(dec, input=r.stdout, capture_output=True, timeout=60)
    if r2.returncode != 0:
        raise RuntimeError(f"ffmpeg decode ({c.name}) failed: {r2.stderr.decode(errors='replace')[-2000:]}")
    return np.frombuffer(r2.stdout, np.float32).copy()


def encode_packets(
    wav: str | os.PathLike[str],
    codec: CodecName,
    packet_ms: int = 20,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    opus_bitrate: int = OPUS_BITRATE,
) -> list[bytes]:
    """RTP payloads of ``wav``: one encoded frame of ``packet_ms`` per entry (PyAV's encoders; for pcap files).

    The input is :func:`pcm_s16` (ffmpeg's resampler), cut into frames of one packet, the last padded with
    silence.  Opus yields one packet more than there are frames (the encoder's look-ahead, flushed at the end).
    """
    import av

    c = _codec(codec)
    if c.name == "opus" and packet_ms not in OPUS_FRAME_MS:
        raise ValueError(f"opus packet_ms must be one of {OPUS_FRAME_MS}, not {packet_ms}")
    x = pcm_s16(wav, c.audio_rate, start_s=start_s, duration_s=duration_s)
    n = c.audio_rate * packet_ms // 1000
    x = np.concatenate([x, np.zeros((-len(x)) % n, np.int16)])
    ctx: Any = av.CodecContext.create(c.encoder, "w")  # an AudioCodecContext
    ctx.sample_rate = c.audio_rate
    ctx.layout = "mono"
    ctx.format = "s16"
    if c.name == "opus":
        ctx.bit_rate = opus_bitrate
        ctx.options = {"frame_duration": str(packet_ms), "application": "voip"}
    out: list[bytes] = []
    for i in range(0, len(x), n):
        frame = av.AudioFrame.from_ndarray(x[i:i + n].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = c.audio_rate
        frame.pts = i
        out += [bytes(p) for p in ctx.encode(frame)]
    out += [bytes(p) for p in ctx.encode(None)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Packets: builders, parser, G.711 decoder
# ---------------------------------------------------------------------------------------------------------------


def rtp_packet(
    seq: int = 0,
    ts: int = 0,
    ssrc: int = 0x5C0DE001,
    pt: int = 0,
    payload: bytes = b"\xff" * 160,
    *,
    marker: bool = False,
    version: int = 2,
    csrcs: Sequence[int] = (),
    csrc_count: int | None = None,
    extension: tuple[int, bytes] | None = None,
    extension_words: int | None = None,
    padding: int = 0,
    padding_count: int | None = None,
    truncate: int | None = None,
) -> bytes:
    """One RTP packet (RFC 3550 section 5.1), valid by default (PCMU silence), or broken on purpose.

    ``csrcs``: the CSRC list; ``csrc_count`` overrides the CC field (bogus: more than listed, e.g. 15).
    ``extension``: (profile id, data; data is zero-padded to whole 32-bit words); ``extension_words``
    overrides its length field (bogus: longer than the packet).  ``padding``: that many padding bytes (P bit
    set, last byte = count); ``padding_count`` overrides the last byte (bogus: more than the payload).
    ``version`` other than 2 gives a bad-version packet; ``truncate`` cuts the result to that many bytes.
    """
    b0 = (version & 3) << 6 | (0x20 if padding else 0) | (0x10 if extension is not None else 0)
    b0 |= (len(csrcs) if csrc_count is None else csrc_count) & 0x0F
    out = bytearray(struct.pack("!BBHII", b0, (0x80 if marker else 0) | (pt & 0x7F), seq & 0xFFFF,
                                ts & 0xFFFFFFFF, ssrc & 0xFFFFFFFF))
    for c in csrcs:
        out += struct.pack("!I", c & 0xFFFFFFFF)
    if extension is not None:
        profile, data = extension
        data = data + b"\0" * ((-len(data)) % 4)
        words = len(data) // 4 if extension_words is None else extension_words
        out += struct.pack("!HH", profile & 0xFFFF, words & 0xFFFF) + data
    out += payload
    if padding:
        count = padding if padding_count is None else padding_count
        out += b"\0" * (padding - 1) + bytes([count & 0xFF])
    return bytes(out if truncate is None else out[:truncate])


def rtcp_bye(ssrcs: Iterable[int], reason: str | None = None) -> bytes:
    """An RTCP BYE packet (RFC 3550 section 6.6) for ``ssrcs``."""
    ids = list(ssrcs)
    body = b"".join(struct.pack("!I", s & 0xFFFFFFFF) for s in ids)
    if reason is not None:
        r = reason.encode()[:255]
        body += bytes([len(r)]) + r
        body += b"\0" * ((-len(body)) % 4)
    return struct.pack("!BBH", 0x80 | len(ids), 203, len(body) // 4) + body


def garbage(n: int, seed: int = 0) -> bytes:
    """``n`` random bytes (seeded): a datagram that is no RTP at all (mostly; check the first byte if it matters)."""
    return random.Random(seed).randbytes(n)


@dataclass(frozen=True)
class RtpHeader:
    """The fixed header and payload of one RTP packet, as an independent check of what went over the wire."""

    version: int
    padding: bool
    extension: bool
    cc: int
    marker: bool
    pt: int
    seq: int
    ts: int
    ssrc: int
    payload: bytes


def parse_rtp_header(data: bytes) -> RtpHeader | None:
    """Parse an RTP packet (CSRCs, extension and padding skipped); None if it is not one or is RTCP (PT 72..76)."""
    if len(data) < 12 or data[0] >> 6 != 2 or 200 <= data[1] <= 204:
        return None
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    off = 12 + 4 * (b0 & 0x0F)
    end = len(data)
    if b0 & 0x10:
        if end < off + 4:
            return None
        off += 4 + 4 * struct.unpack("!H", data[off + 2:off + 4])[0]
    if b0 & 0x20:
        end -= data[-1]
    if off > end:
        return None
    return RtpHeader(2, bool(b0 & 0x20), bool(b0 & 0x10), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc,
                     bytes(data[off:end]))


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.float32) / 32768.0


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(a & 0x80, t, -t).astype(np.float32) / 32768.0


_G711 = {"ulaw": _ulaw_table(), "alaw": _alaw_table()}


def g711_decode(data: bytes, law: Literal["ulaw", "alaw"] = "ulaw") -> np.ndarray:
    """G.711 (PCMU ``ulaw`` / PCMA ``alaw``) bytes to float32 in [-1, 1) (ITU-T G.711 tables)."""
    return _G711[law][np.frombuffer(data, np.uint8)]


# ---------------------------------------------------------------------------------------------------------------
# Plain UDP: receiver, paced senders
# ---------------------------------------------------------------------------------------------------------------


class UdpCollector:
    """A plain UDP socket on 127.0.0.1 that records every datagram (arrival time, data, source) in a thread.

    ``with UdpCollector() as rx: ...send to rx.port...; rx.wait_quiet(0.3)``; then ``rx.packets`` holds
    ``(arrival_s, data, (host, port))`` tuples, ``arrival_s`` from ``time.monotonic()``.  Stops by itself after
    ``max_seconds`` or ``max_packets``.
    """

    def __init__(self, port: int = 0, *, max_packets: int = 100_000, max_seconds: float = 60.0):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((LOOPBACK, port))
        self._sock.settimeout(0.05)
        self.port: int = int(self._sock.getsockname()[1])
        self.packets: list[tuple[float, bytes, tuple[str, int]]] = []
        self._max_packets = max_packets
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"udp-collector-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self._max_seconds
        while not self._stop.is_set() and time.monotonic() < end and len(self.packets) < self._max_packets:
            try:
                data, addr = self._sock.recvfrom(65535)
            except OSError:  # including the 50 ms receive timeout
                continue
            with self._lock:
                self.packets.append((time.monotonic(), data, addr))

    def datagrams(self) -> list[bytes]:
        with self._lock:
            return [d for _, d, _ in self.packets]

    def rtp(self) -> list[RtpHeader]:
        """The datagrams that parse as RTP, in arrival order."""
        return [h for h in map(parse_rtp_header, self.datagrams()) if h is not None]

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` datagrams arrived; False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.packets) >= n:
                return True
            time.sleep(0.01)
        return len(self.packets) >= n

    def wait_quiet(self, quiet_s: float = 0.3, timeout: float = 10.0) -> None:
        """Wait until nothing arrived for ``quiet_s`` (and at least ``quiet_s`` passed), at most ``timeout``."""
        start = time.monotonic()
        end = start + timeout
        while time.monotonic() < end:
            with self._lock:
                last = self.packets[-1][0] if self.packets else start
            if time.monotonic() - last >= quiet_s:
                return
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> UdpCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_packets(
    port: int,
    packets: Iterable[bytes],
    rate_pps: float | None = 50.0,
    *,
    sock: socket.socket | None = None,
) -> float:
    """Send datagrams to 127.0.0.1:``port``, packet i at start + i / ``rate_pps`` (None: back to back).

    Paced on an absolute schedule (no drift).  ``sock``: send from this socket (same source address for
    several calls); otherwise a fresh one.  Returns the seconds it took.
    """
    own = sock is None
    s = sock if sock is not None else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    try:
        for i, p in enumerate(packets):
            if rate_pps:
                wait = start + i / rate_pps - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            s.sendto(p, (LOOPBACK, port))
    finally:
        if own:
            s.close()
    return time.monotonic() - start


def flood(
    port: int,
    n: int,
    rate: float | None = None,
    *,
    ssrc: int = 0xF100D000,
    pt: int = 0,
    payload_size: int = 160,
    seq0: int = 0,
) -> float:
    """Send ``n`` valid RTP packets (PCMU silence, seq/ts counting up by 1 / ``payload_size``) at ``rate``
    packets per second (None: as fast as possible).  Returns the seconds it took."""
    payload = b"\xff" * payload_size
    pkts = (rtp_packet(seq0 + i, i * payload_size, ssrc, pt, payload) for i in range(n))
    return send_packets(port, pkts, rate)


# ---------------------------------------------------------------------------------------------------------------
# Impairment proxy
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PacketRecord:
    """What the proxy did with one RTP packet (times in seconds since the proxy started)."""

    index: int          # arrival order among the RTP packets the proxy got (0-based)
    seq: int
    ssrc: int
    ts: int
    arrival_s: float
    dropped: bool = False
    duplicated: bool = False
    held: int = 0       # held back until this many later packets went out (0: not held)
    delay_s: float = 0.0  # the delay drawn for it (jitter); see ``sent_s`` for when it really left
    sent_s: list[float] = field(default_factory=list)  # one entry per copy sent (two when duplicated)


@dataclass
class _Held:
    remaining: int
    rec: PacketRecord
    data: bytes


def _is_rtp(data: bytes) -> bool:
    return len(data) >= 12 and data[0] >> 6 == 2 and not 200 <= data[1] <= 204


class ImpairmentProxy:
    """A UDP proxy on 127.0.0.1 that impairs RTP on its way to 127.0.0.1:``target_port`` and records the truth.

    Send to ``proxy.port``; the receiver sees datagrams coming from that port.  Per RTP packet, in arrival
    order, it draws (seeded, independent of the outcome, so a seed always gives the same decisions for the
    same packet index):

    * drop: ``index in drop_at``, or ``loss`` (independent), or Gilbert-Elliott ``gilbert=(p, r)``: per packet
      the state first moves good->bad with probability p or bad->good with r, then a packet in the bad state is
      lost (mean loss p/(p+r), mean burst 1/r packets, G.107 BurstR = 1/(p+r)).
    * duplicate (kept packets): ``index in duplicate_at`` or probability ``duplicate``; the copy leaves right
      after the original.
    * reorder (kept packets): ``index in reorder_at`` or probability ``reorder``: held back until ``reorder_k``
      later packets went out, so it arrives ``reorder_k`` positions late; held packets are let go when nothing
      arrives for ``flush_after_s`` (or at stop).
    * delay: ``jitter="uniform"`` with ``jitter_ms=(low, high)``, or ``"normal"`` with ``(mean, std)`` clipped
      at 0.  ``keep_order=True``: packets leave in the order they entered the delay stage (a packet never
      overtakes an earlier one; its delay is stretched instead); False: each leaves at its own time, so
      jitter larger than the packet interval reorders.

    RTCP and non-RTP datagrams are forwarded at once, untouched, and only counted (``other``).  Bounded: at most
    ``max_packets`` RTP packets are handled (later ones are dropped and counted in ``overflow``), and the proxy
    stops after ``max_seconds``.  The truth: ``records`` (one :class:`PacketRecord` per RTP packet),
    ``sent`` ((time, seq) per datagram sent, in order) and the summaries below.  Read them after ``stop()``
    (or ``wait_idle()``).  The seq-based summaries assume one SSRC; with several, use ``records``.
    """

    def __init__(
        self,
        target_port: int,
        *,
        listen_port: int = 0,
        seed: int = 0,
        loss: float = 0.0,
        gilbert: tuple[float, float] | None = None,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        reorder_k: int = 2,
        jitter: Literal["none", "uniform", "normal"] = "none",
        jitter_ms: tuple[float, float] = (0.0, 0.0),
        keep_order: bool = True,
        drop_at: Iterable[int] = (),
        duplicate_at: Iterable[int] = (),
        reorder_at: Iterable[int] = (),
        max_packets: int = 20_000,
        max_seconds: float = 30.0,
        flush_after_s: float = 0.3,
    ):
        for name, p in (("loss", loss), ("duplicate", duplicate), ("reorder", reorder), *(
                (f"gilbert[{i}]", g) for i, g in enumerate(gilbert or ()))):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, not {p}")
        if reorder_k < 1:
            raise ValueError("reorder_k must be >= 1")
        if jitter not in ("none", "uniform", "normal"):
            raise ValueError(f"jitter must be 'none', 'uniform' or 'normal', not {jitter!r}")
        self.target: tuple[str, int] = (LOOPBACK, int(target_port))
        self.loss, self.gilbert, self.duplicate = loss, gilbert, duplicate
        self.reorder, self.reorder_k = reorder, reorder_k
        self.jitter, self.jitter_ms, self.keep_order = jitter, jitter_ms, keep_order
        self.drop_at, self.duplicate_at, self.reorder_at = frozenset(drop_at), frozenset(duplicate_at), frozenset(
            reorder_at)
        self.max_packets, self.max_seconds, self.flush_after_s = max_packets, max_seconds, flush_after_s
        self._rng = random.Random(seed)
        self._bad = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((LOOPBACK, listen_port))
        self._sock.setblocking(False)
        self.port: int = int(self._sock.getsockname()[1])
        self.records: list[PacketRecord] = []
        self.sent: list[tuple[float, int]] = []
        self.other = 0
        self.overflow = 0
        self._held: list[_Held] = []
        self._heap: list[tuple[float, int, bytes, PacketRecord]] = []
        self._counter = 0
        self._last_release = 0.0
        self._last_arrival = 0.0
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> ImpairmentProxy:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"impairment-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop; held and delayed packets still pending are sent at once (their ``sent_s`` shows when)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> ImpairmentProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is held or waiting for its delay (held packets go after ``flush_after_s``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._held and not self._heap:
                    return True
            time.sleep(0.01)
        return False

    # -- the loop --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        import select

        deadline = self._t0 + self.max_seconds
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            with self._lock:
                if self._held and now - self._last_arrival >= self.flush_after_s:
                    self._flush_held(now)
                self._send_due(now)
                wait = min(0.02, deadline - now)
                if self._heap:
                    wait = min(wait, self._heap[0][0] - now)
                if self._held:
                    wait = min(wait, self._last_arrival + self.flush_after_s - now)
            ready, _, _ = select.select([self._sock], [], [], max(0.0, wait))
            if not ready:
                continue
            while True:
                try:
                    data, addr = self._sock.recvfrom(65535)
                except (BlockingIOError, OSError):
                    break
                with self._lock:
                    self._handle(data, addr, time.monotonic())
        with self._lock:  # let everything pending go now
            self._flush_held(time.monotonic())
            self._send_due(float("inf"))

    def _send(self, data: bytes, seq: int) -> float:
        try:
            self._sock.sendto(data, self.target)
        except OSError:
            pass  # nobody listening (ICMP unreachable reported on a later send): the packet is gone anyway
        t = time.monotonic() - self._t0
        self.sent.append((t, seq))
        return t

    def _send_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, _, data, rec = heapq.heappop(self._heap)
            rec.sent_s.append(self._send(data, rec.seq))

    def _draw_delay(self) -> float:
        a, b = self.jitter_ms
        if self.jitter == "uniform":
            return self._rng.uniform(a, b) / 1000.0
        if self.jitter == "normal":
            return max(0.0, self._rng.gauss(a, b)) / 1000.0
        return 0.0

    def _handle(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        if addr[0] != LOOPBACK:
            return
        if not _is_rtp(data):
            self.other += 1
            self._send(data, -1)
            return
        if len(self.records) >= self.max_packets:
            self.overflow += 1
            return
        self._last_arrival = now
        i = len(self.records)
        u_loss, u_ge, u_dup, u_reorder = (self._rng.random() for _ in range(4))
        delay = self._draw_delay()
        if self.gilbert is not None:
            p, r = self.gilbert
            self._bad = (u_ge >= r) if self._bad else (u_ge < p)
        dropped = i in self.drop_at or (self.gilbert is not None and self._bad) or u_loss < self.loss
        seq, ts, ssrc = struct.unpack("!HII", data[2:12])
        rec = PacketRecord(i, seq, ssrc, ts, now - self._t0, dropped=dropped, delay_s=delay)
        rec.duplicated = not dropped and (i in self.duplicate_at or u_dup < self.duplicate)
        if not dropped and (i in self.reorder_at or u_reorder < self.reorder):
            rec.held = self.reorder_k
        self.records.append(rec)
        if dropped:
            return
        if rec.held:
            self._held.append(_Held(rec.held, rec, data))
            return
        self._emit(rec, data, now)
        for h in self._held:
            h.remaining -= 1
        released = [h for h in self._held if h.remaining <= 0]
        self._held = [h for h in self._held if h.remaining > 0]
        for h in released:
            self._emit(h.rec, h.data, now)
        self._send_due(time.monotonic())

    def _flush_held(self, now: float) -> None:
        held, self._held = self._held, []
        for h in held:
            self._emit(h.rec, h.data, now)

    def _emit(self, rec: PacketRecord, data: bytes, now: float) -> None:
        release = now + rec.delay_s
        if self.keep_order:
            release = max(release, self._last_release)
        self._last_release = max(self._last_release, release)
        for _ in range(2 if rec.duplicated else 1):
            self._counter += 1
            heapq.heappush(self._heap, (release, self._counter, data, rec))

    # -- the truth -------------------------------------------------------------------------------------------

    @property
    def dropped_seqs(self) -> list[int]:
        return [r.seq for r in self.records if r.dropped]

    @property
    def duplicated_seqs(self) -> list[int]:
        return [r.seq for r in self.records if r.duplicated]

    @property
    def reordered_seqs(self) -> list[int]:
        """Packets held back (sent after later ones)."""
        return [r.seq for r in self.records if r.held]

    @property
    def sent_seqs(self) -> list[int]:
        """RTP sequence numbers in the order they left (duplicates twice; RTCP/other not included)."""
        return [s for _, s in self.sent if s >= 0]

    @property
    def injected_delays_ms(self) -> dict[int, float]:
        """The jitter delay drawn per seq (kept packets)."""
        return {r.seq: r.delay_s * 1000.0 for r in self.records if not r.dropped}

    @property
    def dwell_ms(self) -> dict[int, float]:
        """How long each kept packet really stayed in the proxy (first copy): drawn delay, holding, ordering."""
        return {r.seq: (r.sent_s[0] - r.arrival_s) * 1000.0 for r in self.records if r.sent_s}

    def counts(self) -> dict[str, int]:
        recs = self.records
        return {
            "received": len(recs),
            "dropped": sum(r.dropped for r in recs),
            "duplicated": sum(r.duplicated for r in recs),
            "reordered": sum(bool(r.held) for r in recs),
            "sent_rtp": len(self.sent_seqs),
            "other": self.other,
            "overflow": self.overflow,
        }

    def rfc3550_jitter_ms(self, clock_rate: int, side: Literal["in", "out"] = "out") -> float:
        """RFC 3550 (A.8) interarrival jitter of the kept packets, in ms, as seen entering ("in") or leaving
        ("out", first copies, in the order they left) the proxy.  "out" is what a receiver right behind the
        proxy should measure (give or take the loopback's own scheduling)."""
        kept = [r for r in self.records if r.sent_s]
        if side == "out":
            kept.sort(key=lambda r: r.sent_s[0])
            times = [r.sent_s[0] for r in kept]
        else:
            times = [r.arrival_s for r in kept]
        j = 0.0
        for k in range(1, len(kept)):
            d = (times[k] - times[k - 1]) * clock_rate - ((kept[k].ts - kept[k - 1].ts + (1 << 31)) % (1 << 32)
                                                          - (1 << 31))
            j += (abs(d) - j) / 16.0
        return j / clock_rate * 1000.0


# ---------------------------------------------------------------------------------------------------------------
# pcap files
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RtpFlow:
    """One RTP stream (one direction of a call) for :func:`write_pcap`."""

    wav: Path
    codec: CodecName = "pcmu"
    src: tuple[str, int] = ("10.0.0.1", 40000)
    dst: tuple[str, int] = ("10.0.0.2", 50000)
    ssrc: int = 0x11223344
    payload_type: int | None = None  # None: the static PT, 111 for Opus
    start_s: float = 0.0             # capture time of the first packet, relative to the file's base time
    seq0: int = 1000
    ts0: int = 0
    packet_ms: int = 20
    offset_s: float = 0.0            # where in ``wav`` to start
    duration_s: float | None = None  # how much of ``wav`` (None: all)
    drop_at: frozenset[int] = frozenset()  # packet indices left out of the capture (lost before the tap)

    @property
    def pt(self) -> int:
        if self.payload_type is not None:
            return self.payload_type
        static = _codec(self.codec).static_pt
        return 111 if static is None else static


def _mac(ip: str) -> bytes:
    return b"\x02\x00" + socket.inet_aton(ip)


def _frame(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ip_id: int) -> bytes:
    import dpkt

    udp = dpkt.udp.UDP(sport=src[1], dport=dst[1], data=payload)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=socket.inet_aton(src[0]), dst=socket.inet_aton(dst[0]), p=dpkt.ip.IP_PROTO_UDP, ttl=64,
                    id=ip_id & 0xFFFF, data=udp)
    ip.len = len(ip)
    eth = dpkt.ethernet.Ethernet(src=_mac(src[0]), dst=_mac(dst[0]), type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(eth)


def write_pcap(
    path: str | os.PathLike[str],
    calls: Sequence[RtpFlow],
    *,
    base_time: float = 1_700_000_000.0,
    extra: Sequence[tuple[float, tuple[str, int], tuple[str, int], bytes]] = (),
    fmt: Literal["pcap", "pcapng"] | None = None,
) -> dict[int, int]:
    """Write a capture of RTP streams made from real speech: Ethernet/IPv4/UDP frames, capture timestamps.

    Each flow's packet i is stamped ``base_time + start_s + i * packet_ms / 1000`` and carries seq ``seq0 + i``
    and timestamp ``ts0 + i * samples`` (RTP clock), both wrapping.  Packets of all flows are written in time
    order; ``extra`` adds other UDP datagrams (time relative to base_time, src, dst, payload), e.g. SIP.
    ``fmt``: "pcap" (libpcap, microseconds) or "pcapng"; default from the suffix (``.pcapng`` -> pcapng).
    Returns the number of RTP packets written per SSRC.
    """
    import dpkt

    out = Path(path)
    fmt = fmt or ("pcapng" if out.suffix.lower() == ".pcapng" else "pcap")
    frames: list[tuple[float, int, bytes]] = []
    counts: dict[int, int] = {}
    order = 0
    for flow in calls:
        c = _codec(flow.codec)
        payloads = encode_packets(flow.wav, flow.codec, flow.packet_ms, start_s=flow.offset_s,
                                  duration_s=flow.duration_s)
        step = c.clock_rate * flow.packet_ms // 1000
        for i, payload in enumerate(payloads):
            if i in flow.drop_at:
                continue
            pkt = rtp_packet(flow.seq0 + i, flow.ts0 + i * step, flow.ssrc, flow.pt, payload, marker=i == 0)
            t = flow.start_s + i * flow.packet_ms / 1000.0
            frames.append((t, order, _frame(flow.src, flow.dst, pkt, order)))
            order += 1
            counts[flow.ssrc] = counts.get(flow.ssrc, 0) + 1
    for t, src, dst, payload in extra:
        frames.append((t, order, _frame(src, dst, payload, order)))
        order += 1
    frames.sort()
    with open(out, "wb") as fh:
        writer: dpkt.pcap.Writer | dpkt.pcapng.Writer
        if fmt == "pcapng":
            writer = dpkt.pcapng.Writer(fh, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        else:
            writer = dpkt.pcap.Writer(fh, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for t, _, frame in frames:
            writer.writepkt(frame, ts=base_time + t)
    return counts


def read_pcap_udp(path: str | os.PathLike[str]) -> list[tuple[float, tuple[str, int], tuple[str, int], bytes]]:
    """Every IPv4/UDP datagram of a pcap or pcapng file (Ethernet): (capture time, src, dst, payload)."""
    import dpkt

    out = []
    with open(path, "rb") as fh:
        magic = fh.read(4)
        fh.seek(0)
        reader = dpkt.pcapng.Reader(fh) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(fh)
        for ts, buf in reader:
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.udp.UDP):
                continue
            udp = ip.data
            out.append((float(ts), (socket.inet_ntoa(ip.src), udp.sport), (socket.inet_ntoa(ip.dst), udp.dport),
                        bytes(udp.data)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# sipp
# ---------------------------------------------------------------------------------------------------------------

_SIPP_UAS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- The called side: answers with an SDP that names the monitor's address and port, so the caller's
     play_pcap_audio sends the RTP there. -->
<scenario name="scoreq monitor answer">
  <recv request="INVITE" crlf="true"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:[local_ip]:[local_port];transport=[transport]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=monitor 1 1 IN IP4 {addr}
s=-
c=IN IP4 {addr}
t=0 0
m=audio {port} RTP/AVP {pt}
a=rtpmap:{pt} {rtpmap}
a=recvonly
]]></send>
  <recv request="ACK" crlf="true"/>
  <recv request="BYE"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
</scenario>
"""

_SIPP_UAC = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- The caller: INVITE, ACK the answer, replay the RTP of a pcap to the answer's media address, BYE. -->
<scenario name="scoreq pcap caller">
  <send retrans="500"><![CDATA[
INVITE sip:monitor@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:monitor@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: sip:sipp@[local_ip]:[local_port]
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=sipp 1 1 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP {pt}
a=rtpmap:{pt} {rtpmap}
a=sendonly
]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rtd="true"/>
  <send><![CDATA[
ACK sip:monitor@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:monitor@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Contact: sip:sipp@[local_ip]:[local_port]
Max-Forwards: 70
Content-Length: 0

]]></send>
  <nop><action><exec play_pcap_audio={pcap}/></action></nop>
  <pause milliseconds="{pause_ms}"/>
  <send retrans="500"><![CDATA[
BYE sip:monitor@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:monitor@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 2 BYE
Contact: sip:sipp@[local_ip]:[local_port]
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""


class SippCall:
    """One SIP call between two sipp processes on 127.0.0.1 whose caller replays the RTP of ``pcap`` to
    127.0.0.1:``port``.  Made and started by :func:`sipp_rtp`.

    sipp's ``play_pcap_audio`` sends each UDP payload of the capture unchanged (SSRC, seq, timestamps as
    captured), paced by the capture timestamps, from 127.0.0.1:``rtp_source_port`` (the caller's media port)
    to the media address of the 200 OK's SDP.  Both sipp processes run with ``-m 1`` and a global timeout.
    """

    def __init__(self, pcap: Path, port: int, *, payload_type: int, rtpmap: str, timeout_s: float | None):
        self.pcap = Path(pcap).resolve()
        self.port = port
        times = [t for t, *_ in read_pcap_udp(self.pcap)]
        if not times:
            raise ValueError(f"{pcap}: no UDP packets to replay")
        self.duration_s = max(times) - min(times)
        self.timeout_s = timeout_s if timeout_s is not None else self.duration_s + 10.0
        self.sip_port = free_udp_port()
        self.uas_media_port = free_udp_port()
        self.rtp_source_port = free_udp_port()
        self._dir = Path(tempfile.mkdtemp(prefix="scoreq-sipp-"))
        fill = {"addr": LOOPBACK, "port": port, "pt": payload_type, "rtpmap": escape(rtpmap)}
        (self._dir / "uas.xml").write_text(_SIPP_UAS.format(**fill))
        pause_ms = int(self.duration_s * 1000) + 300  # the whole replay, then BYE
        (self._dir / "uac.xml").write_text(_SIPP_UAC.format(pt=payload_type, rtpmap=escape(rtpmap),
                                                            pcap=quoteattr(str(self.pcap)), pause_ms=pause_ms))
        self.uas: subprocess.Popen[bytes] | None = None
        self.uac: subprocess.Popen[bytes] | None = None

    def _sipp(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        cmd = ["sipp", *args, "-sf", f"{name}.xml", "-i", LOOPBACK, "-mi", LOOPBACK, "-m", "1", "-nostdin",
               "-timeout", f"{int(self.timeout_s) + 1}s", "-timeout_error", "-trace_err"]
        with open(self._dir / f"{name}.out", "wb") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(cmd, cwd=self._dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def start(self) -> SippCall:
        ok, reason = sipp_available()
        if not ok:
            raise RuntimeError(reason)
        self.uas = self._sipp("uas", ["-p", str(self.sip_port), "-mp", str(self.uas_media_port)])
        self.uac = self._sipp("uac", [f"{LOOPBACK}:{self.sip_port}", "-p", str(free_udp_port()),
                                      "-mp", str(self.rtp_source_port)])
        return self

    def logs(self) -> str:
        """The tail of both sipps' output and error logs, for failure messages."""
        parts = []
        for f in sorted(self._dir.glob("*.out")) + sorted(self._dir.glob("*errors.log")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the call to end (replay done, BYE answered); RuntimeError with the logs if sipp failed."""
        limit = timeout if timeout is not None else self.timeout_s + 5
        assert self.uac is not None and self.uas is not None, "start() first"
        try:
            rcs = (self.uac.wait(timeout=limit), self.uas.wait(timeout=5))
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"sipp call did not end within {limit:.0f} s\n{self.logs()}") from None
        if rcs != (0, 0):
            raise RuntimeError(f"sipp failed (caller rc {rcs[0]}, called rc {rcs[1]})\n{self.logs()}")

    def stop(self) -> None:
        """Kill both sipps if still running.  The logs stay until :meth:`close`."""
        stop_process(self.uac)
        stop_process(self.uas)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SippCall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sipp_rtp(
    pcap: str | os.PathLike[str],
    port: int,
    *,
    payload_type: int = 0,
    rtpmap: str = "PCMU/8000",
    timeout_s: float | None = None,
) -> SippCall:
    """Start a loopback SIP call in which sipp replays the RTP of ``pcap`` to 127.0.0.1:``port``.

    A sipp UAS answers with an SDP naming 127.0.0.1:``port`` (``payload_type``/``rtpmap``); a sipp UAC
    calls it, runs ``<exec play_pcap_audio=...>`` (which sends to that address) and hangs up after the
    capture's duration plus 0.3 s.  Make the pcap with :func:`write_pcap` (one flow; its destination port is
    the base sipp maps onto ``port``).  Use as ``with sipp_rtp(...) as call: call.wait()``.
    """
    call = SippCall(Path(pcap), port, payload_type=payload_type, rtpmap=rtpmap, timeout_s=timeout_s)
    try:
        return call.start()
    except BaseException:
        call.close()
        raise
