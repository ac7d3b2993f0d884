"""Packet captures: reading pcap/pcapng, finding the RTP calls in them, scoring them and replaying them live.

The captures are written by :func:`tests.rtp_tools.write_pcap` from real speech (PyAV's PCMU and Opus
encoders); hand-made frames cover the other link types, IPv6 and IP fragments.  The command line runs
as a user runs it, with the bundled model.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.rtp.capture import Capture, CaptureError, find_rtp_flows, read_datagrams
from scoreq_live.sources import make_inputs
from scoreq_live.sources.base import SourceError
from tests.helpers import MUSHRA, SCOREQ_PAIR, joined
from tests.rtp_tools import RtpFlow, encode_like_ffmpeg, require_ffmpeg, rtcp_bye, rtp_packet, write_pcap

SSRC_A, SSRC_B, SSRC_C = 0x1A2B3C4D, 0x0BADCAFE, 0xFEEDF00D
A_SRC, A_DST = ("192.168.1.10", 16384), ("192.168.1.20", 20000)  # call 1, PCMU both ways
C_SRC, C_DST = ("10.0.0.5", 30000), ("10.0.0.6", 31000)  # call 2, Opus one way
B_DROPS = frozenset({50, 100, 150, 200, 250, 300, 301, 302, 303, 304})  # lost before the capture point
SDP = ("v=0\r\no=- 1 1 IN IP4 10.0.0.6\r\ns=-\r\nc=IN IP4 10.0.0.6\r\nt=0 0\r\n"
       "m=audio 31000 RTP/AVP 111 101\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:101 telephone-event/48000\r\n")


def run(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def sip_invite(sdp: str) -> bytes:
    body = sdp.encode()
    head = (f"INVITE sip:bob@10.0.0.6 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5060\r\nCall-ID: 1@10.0.0.5\r\n"
            f"CSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def dns_like(n: int) -> list[tuple[float, tuple[str, int], tuple[str, int], bytes]]:
    """Queries and answers that pass a first-byte RTP check half of the time (ids 0x80xx/0x81xx)."""
    out = []
    for i in range(n):
        query = struct.pack("!HHHHHH", 0x8000 + i, 0x0100, 1, 0, 0, 0) + b"\x03www\x07example\x03com\0\0\1\0\1"
        out.append((0.05 + 0.2 * i, ("10.0.0.5", 40053), ("10.0.0.53", 53), query))
        out.append((0.06 + 0.2 * i, ("10.0.0.53", 53), ("10.0.0.5", 40053), query[:2] + b"\x81\x80" + query[4:]))
    return out


@pytest.fixture(scope="module")
def speech(data, tmp_path_factory) -> dict[str, Path]:
    """Three stretches of real speech, as 16 kHz WAV files, one per RTP stream."""
    require_ffmpeg()
    folder = tmp_path_factory.mktemp("speech")
    parts = {"a": [MUSHRA / f"stim_0{i}" / "ref.wav" for i in (1, 2, 3, 4)],
             "b": [MUSHRA / f"stim_0{i}" / "ref.wav" for i in (5, 6, 7, 8)],
             "c": [SCOREQ_PAIR / "ref.wav", MUSHRA / "stim_03" / "ref.wav"]}
    out = {}
    for key, paths in parts.items():
        out[key] = folder / f"{key}.wav"
        sf.write(out[key], joined(paths), 16000, subtype="PCM_16")
    return out


def call_flows(speech: dict[str, Path]) -> list[RtpFlow]:
    return [
        # sequence numbers and timestamps wrap early in the call
        RtpFlow(speech["a"], "pcmu", A_SRC, A_DST, ssrc=SSRC_A, seq0=65500, ts0=0xFFFFF000),
        RtpFlow(speech["b"], "pcmu", A_DST, A_SRC, ssrc=SSRC_B, start_s=0.3, drop_at=B_DROPS),
        RtpFlow(speech["c"], "opus", C_SRC, C_DST, ssrc=SSRC_C, start_s=1.0, payload_type=111),
    ]


@pytest.fixture(scope="module")
def captures(speech, tmp_path_factory) -> dict[str, Any]:
    """The same two calls as pcap (with the SIP INVITE whose SDP names Opus) and as pcapng (no SIP: the Opus
    payload type is recognised from its packets); DNS traffic, a stray two-packet "flow" and an RTCP BYE for
    the Opus stream after its last packet."""
    folder = tmp_path_factory.mktemp("captures")
    flows = call_flows(speech)
    c_end = 1.0 + 0.02 * (sf.info(speech["c"]).frames // 320 + 2)
    extra = dns_like(30) + [
        (0.7, ("172.16.0.9", 7000), ("172.16.0.10", 7002), rtp_packet(5, 0, 0x77777777)),
        (0.72, ("172.16.0.9", 7000), ("172.16.0.10", 7002), rtp_packet(6, 160, 0x77777777)),
        (c_end + 0.1, (C_SRC[0], C_SRC[1] + 1), C_DST, rtcp_bye([SSRC_C])),
    ]
    out: dict[str, Any] = {}
    for fmt in ("pcap", "pcapng"):
        path = out[fmt] = folder / f"call.{fmt}"
        sip = [(0.5, ("10.0.0.5", 5060), ("10.0.0.6", 5060), sip_invite(SDP))] if fmt == "pcap" else []
        counts = write_pcap(path, flows, extra=extra + sip)
        assert set(counts) == {SSRC_A, SSRC_B, SSRC_C}
    out["counts"] = counts
    return out


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_flows_found_with_addresses_ssrc_and_codec(captures, fmt):
    counts = captures["counts"]
    with Capture(captures[fmt]) as cap:
        assert cap.format == fmt and cap.link_name == "Ethernet"
        flows = find_rtp_flows(cap.datagrams())
        assert cap.stats.udp == cap.stats.frames and not cap.stats.cut and cap.stats.truncated == 0
    by_ssrc = {f.ssrc: f for f in flows}
    assert set(by_ssrc) == {SSRC_A, SSRC_B, SSRC_C}  # not the DNS, the two stray packets, the SIP or the BYE
    a, b, c = by_ssrc[SSRC_A], by_ssrc[SSRC_B], by_ssrc[SSRC_C]
    assert (a.src, a.dst, b.src, b.dst, c.src, c.dst) == (A_SRC, A_DST, A_DST, A_SRC, C_SRC, C_DST)
    assert (a.codec_name, b.codec_name, c.codec_name) == ("PCMU", "PCMU", "opus")
    assert a.packets == counts[SSRC_A] and b.packets == counts[SSRC_B] and c.packets == counts[SSRC_C]
    assert c.pt == 111 and c.codec is not None and c.codec.clock_rate == 48000
    assert c.codec_from[111] == ("sdp" if fmt == "pcap" else "packets")
    assert [f.ssrc for f in flows] == [SSRC_A, SSRC_B, SSRC_C]  # in order of their first packet
    # the port filter matches the source or the destination port
    assert {f.ssrc for f in find_rtp_flows(read_datagrams(captures[fmt]), port=A_DST[1])} == {SSRC_A, SSRC_B}
    assert {f.ssrc for f in find_rtp_flows(read_datagrams(captures[fmt]), port=C_DST[1])} == {SSRC_C}
    assert find_rtp_flows(read_datagrams(captures[fmt]), port=9) == []


def test_garbage_udp_is_not_a_flow(tmp_path):
    rng = np.random.default_rng(3)
    extra = dns_like(40)
    for i in range(200):  # random datagrams whose first byte says RTP version 2
        data = bytes([0x80]) + rng.integers(0, 256, 171, dtype=np.uint8).tobytes()
        extra.append((0.01 * i, ("10.9.0.1", 9000), ("10.9.0.2", 9001), data))
    for i in range(20):  # valid RTP headers, but the sequence numbers jump about: not a stream
        extra.append((0.02 * i, ("10.9.0.3", 9100), ("10.9.0.4", 9102), rtp_packet(int(rng.integers(0, 65536)),
                                                                                     160 * i, 0x55AA55AA)))
    for i in range(20):  # steady sequence numbers but payload type 200-ish (RTCP) / 80 (unassigned)
        extra.append((0.02 * i, ("10.9.0.5", 9200), ("10.9.0.6", 9202), rtp_packet(i, 160 * i, 0x66, pt=80)))
    path = tmp_path / "noise.pcap"
    write_pcap(path, [], extra=extra)
    assert len(list(read_datagrams(path))) == len(extra)
    assert find_rtp_flows(read_datagrams(path)) == []


def _last_record(data: bytes) -> int:
    """Offset of the last packet record of a little-endian pcap file."""
    off, last = 24, 24
    while off < len(data):
        last = off
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
    return last


def test_cut_and_corrupt_captures(captures, tmp_path):
    whole = captures["pcap"].read_bytes()
    total = len(list(read_datagrams(captures["pcap"])))
    last = _last_record(whole)
    # cut in the middle of the last packet's data, and in the middle of its record header
    for cut, truncated, flag in ((len(whole) - 30, 1, False), (last + 8, 0, True)):
        p = tmp_path / "cut.pcap"
        p.write_bytes(whole[:cut])
        with Capture(p) as cap:
            got = list(cap.datagrams())
            assert cap.stats.truncated == truncated and cap.stats.cut is flag
        assert len(got) == total - 1
        assert {f.ssrc for f in find_rtp_flows(iter(got))} == {SSRC_A, SSRC_B, SSRC_C}
    ng = captures["pcapng"].read_bytes()
    p = tmp_path / "cut.pcapng"
    p.write_bytes(ng[:len(ng) // 2])
    with Capture(p) as cap:
        assert 0 < len(list(cap.datagrams())) < total and cap.stats.cut
    # nothing readable: a clear error
    p = tmp_path / "head.pcap"
    p.write_bytes(whole[:24 + 5])
    with Capture(p) as cap, pytest.raises(CaptureError, match="no packet can be read"):
        list(cap.datagrams())
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"RIFF....WAVEfmt not a capture at all")
    with pytest.raises(CaptureError, match="not a packet capture"):
        Capture(bad)
    bad.write_bytes(whole[:10])
    with pytest.raises(CaptureError, match="cannot read the pcap header"):
        Capture(bad)
    with pytest.raises(CaptureError, match="no such capture file"):
        Capture(tmp_path / "missing.pcap")


def test_dynamic_payload_types_recognised_or_reported():
    from scoreq_live.rtp.capture import Datagram, FlowDemux, format_endpoint
    from scoreq_live.rtp.receiver import NewStream, StreamFailed

    src, dst, v6 = ("10.0.0.1", 7000), ("10.0.0.2", 8000), (("2001:db8::1", 7000), ("2001:db8::2", 8000))
    rng = np.random.default_rng(1)
    grams = []
    for i in range(50):  # L16 mono, 16 kHz clock, 20 ms packets, with an RFC 4733 DTMF event in the middle
        t = 100.0 + 0.02 * i
        if 20 <= i < 25:
            grams.append(Datagram(t, src, dst, rtp_packet(i, 320 * 20, 0xD7, pt=101, payload=b"\x05\x0a\x00\xa0")))
        else:
            grams.append(Datagram(t, src, dst, rtp_packet(i, 320 * i, 0xD7, pt=98, payload=b"\x01\x02" * 320)))
    for i in range(50):  # some codec on payload type 96 that neither an SDP nor its packets say
        size = int(rng.integers(20, 60))
        grams.append(Datagram(100.0 + 0.02 * i, *v6, rtp_packet(i, 160 * i, 0xE8, pt=96, payload=b"\x11" * size)))
    grams.sort(key=lambda d: d.ts)
    flows = {f.ssrc: f for f in find_rtp_flows(grams)}
    l16, unknown = flows[0xD7], flows[0xE8]
    assert l16.pt == 98 and l16.codec is not None and (l16.codec.name, l16.codec.clock_rate) == ("L16", 16000)
    assert l16.codecs[101].name == "telephone-event" and l16.codec_from == {98: "packets", 101: "packets"}
    assert unknown.codec is None and unknown.codec_name == "payload type 96"
    assert format_endpoint(unknown.src) == "[2001:db8::1]:7000"
    demux = FlowDemux(flows.values(), timeout_s=5.0)
    events = [fe for d in grams for fe in demux.feed(d)]
    new = [fe for fe in events if isinstance(fe.event, NewStream)]
    failed = [fe for fe in events if isinstance(fe.event, StreamFailed)]
    assert [fe.flow for fe in new] == [l16] and [fe.flow for fe in failed] == [unknown]
    assert "payload type 96" in failed[0].event.error and "no SDP in the capture" in failed[0].event.error
    stream = new[0].event.stream
    audio = stream.finish()
    assert stream.totals()["telephone_events"] == 5 and stream.totals()["lost"] == 0
    assert audio.size == pytest.approx(50 * 320, abs=400)  # the DTMF event's 100 ms filled, not dropped


# ---------------------------------------------------------------------------------------------- link types


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _ipv4(src: str, dst: str, body: bytes, ident: int = 1, flags_frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, flags_frag, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + body


def _ipv6(src: str, dst: str, body: bytes, nxt: int = 17) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nxt, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + body


ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
LINKS = {  # link type -> (frame builder for an IP packet, IP version)
    "ethernet-vlan": (1, lambda ip, v: ETH + b"\x81\x00\x00\x2a" + (b"\x08\x00" if v == 4 else b"\x86\xdd") + ip),
    "ethernet-qinq": (1, lambda ip, v: ETH + b"\x88\xa8\x00\x01\x81\x00\x00\x2a\x08\x00" + ip),
    "sll": (113, lambda ip, v: struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 8, 0x0800 if v == 4 else 0x86DD) + ip),
    "sll2": (276, lambda ip, v: struct.pack("!HHIHBB8s", 0x0800 if v == 4 else 0x86DD, 0, 3, 1, 0, 6, b"\x02" * 8)
             + ip),
    "raw": (101, lambda ip, v: ip),
    "null": (0, lambda ip, v: struct.pack("<I", 2 if v == 4 else 30) + ip),
    "loop": (108, lambda ip, v: struct.pack("!I", 2 if v == 4 else 24) + ip),
}


def _write(path: Path, linktype: int, frames: list[bytes], fmt: str = "pcap") -> None:
    import dpkt

    with open(path, "wb") as fh:
        w = (dpkt.pcapng.Writer(fh, linktype=linktype) if fmt == "pcapng"
             else dpkt.pcap.Writer(fh, linktype=linktype, nano=True))
        for i, f in enumerate(frames):
            w.writepkt(f, ts=1_700_000_000.0 + 0.02 * i)


@pytest.mark.parametrize("link, version", [(link, v) for link in sorted(LINKS) for v in (4, 6)
                                           if (link, v) != ("ethernet-qinq", 6)])
def test_link_types_and_ip_versions(tmp_path, link, version):
    linktype, frame = LINKS[link]
    src, dst = ("10.1.1.1", "10.1.1.2") if version == 4 else ("2001:db8::1", "2001:db8::2")
    frames = []
    for i in range(12):
        udp = _udp(5004, 6006, rtp_packet(100 + i, 160 * i, 0xC0FFEE, payload=bytes([i]) * 160))
        frames.append(frame(_ipv4(src, dst, udp) if version == 4 else _ipv6(src, dst, udp), version))
    path = tmp_path / f"{link}.pcap"
    _write(path, linktype, frames, fmt="pcapng" if link == "sll2" else "pcap")
    got = list(read_datagrams(path))
    assert [(d.src, d.dst) for d in got] == [((src, 5004), (dst, 6006))] * 12
    assert got[3].payload[12:] == bytes([3]) * 160 and got[1].ts - got[0].ts == pytest.approx(0.02, abs=1e-6)
    (flow,) = find_rtp_flows(iter(got))
    assert (flow.src, flow.dst, flow.ssrc, flow.codec_name, flow.packets) == ((src, 5004), (dst, 6006), 0xC0FFEE,
                                                                              "PCMU", 12)


def test_ethernet_padding_fragments_and_other_protocols(tmp_path):
    small = _ipv4("10.0.0.1", "10.0.0.2", _udp(1000, 2000, b"hi"))  # 32 bytes: Ethernet pads it to 46
    frames = [ETH + b"\x08\x00" + small + b"\x00" * 14]
    body = _udp(1000, 2000, bytes(range(256)) * 8)  # 2056 bytes in three fragments
    pieces = [body[0:1000], body[1000:2000], body[2000:]]
    offsets = [0, 1000, 2000]
    for k in (2, 0, 1):  # out of order
        more = 0x2000 if k < 2 else 0
        frames.append(ETH + b"\x08\x00" + _ipv4("10.0.0.1", "10.0.0.2", pieces[k], 7, more | offsets[k] // 8))
    frames.append(ETH + b"\x08\x00" + _ipv4("10.0.0.1", "10.0.0.2", pieces[1], 8, 0x2000 | 125))  # never completed
    tcp = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, b"\n\0\0\1", b"\n\0\0\2") + b"\0" * 20
    frames += [ETH + b"\x08\x00" + tcp, ETH + b"\x08\x06" + b"\0" * 28]  # TCP, ARP
    frames.append(ETH + b"\x08\x00" + _ipv4("10.0.0.1", "10.0.0.2", _udp(1, 2, b"x" * 100))[:60])  # snap length
    path = tmp_path / "mixed.pcap"
    _write(path, 1, frames)
    with Capture(path) as cap:
        got = list(cap.datagrams())
        stats = cap.stats
    assert [d.payload for d in got] == [b"hi", bytes(range(256)) * 8]
    assert stats.fragments == 4 and stats.fragments_dropped == 1
    assert stats.not_udp == 2 and stats.truncated == 1 and stats.frames == len(frames)


# ---------------------------------------------------------------------------------------------- replay input


def test_replay_input_checks_the_file(captures, tmp_path):
    (replay,) = make_inputs(f"pcap:{captures['pcapng']}")
    assert replay.name == "call"
    replay.check()
    (named,) = make_inputs(f"leg=pcap:{captures['pcap']}")
    assert named.name == "leg"
    (declared,) = make_inputs(f"pcap:{captures['pcap']}?codec=L16&rate=16000&pt=98")
    assert declared.path == captures["pcap"] and declared.codecs[98].clock_rate == 16000 and declared.name == "call"
    with pytest.raises(SourceError, match="codec"):
        make_inputs(f"pcap:{captures['pcap']}?codec=nope&pt=98")
    with pytest.raises(SourceError, match="no such capture file"):
        make_inputs(f"pcap:{tmp_path / 'nope.pcap'}")[0].check()
    noise = tmp_path / "noise.pcap"
    write_pcap(noise, [], extra=dns_like(5))
    with pytest.raises(SourceError, match="no RTP stream"):
        make_inputs(f"pcap:{noise}")[0].check()


def _events(out: subprocess.CompletedProcess[str]) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_monitor_replays_each_rtp_stream_fast(captures, fmt):
    events = _events(run("-i", f"pcap:{captures[fmt]}", "--fast", "--no-tui", "--jsonl", "-", "-q", "--no-ws"))
    names = {f"call-{s:08x}": s for s in (SSRC_A, SSRC_B, SSRC_C)}
    started = {e["stream"]: e for e in events if e["type"] == "stream_started"}
    ended = {e["stream"]: e for e in events if e["type"] == "stream_ended"}
    assert set(started) == set(ended) == set(names)
    assert started["call-1a2b3c4d"]["source"] == "pcap"
    assert "PCMU from 192.168.1.10:16384 to 192.168.1.20:20000" in started["call-1a2b3c4d"]["detail"]
    assert "opus from 10.0.0.5:30000 to 10.0.0.6:31000" in started["call-feedf00d"]["detail"]
    assert {n: e["reason"] for n, e in ended.items()} == {"call-1a2b3c4d": "eof", "call-0badcafe": "eof",
                                                          "call-feedf00d": "bye"}
    for name in names:
        scores = [e for e in events if e["type"] == "score" and e["stream"] == name]
        assert len(scores) >= 2 and all(e["net"]["codec"] in ("PCMU", "opus") for e in scores)
        assert sum(e["mos"] is not None for e in scores) >= 2
        assert ended[name]["windows"] == len(scores)
    b = [e["net"] for e in events if e["type"] == "score" and e["stream"] == "call-0badcafe"]
    assert max(n["lost"] for n in b) >= 5 and all(n["lost"] <= len(B_DROPS) for n in b)
    a = [e["net"] for e in events if e["type"] == "score" and e["stream"] == "call-1a2b3c4d"]
    assert all(n["lost"] == 0 and n["loss_pct"] == 0 for n in a)


def test_monitor_replays_in_real_time(speech, tmp_path):
    path = tmp_path / "short.pcap"
    write_pcap(path, [RtpFlow(speech["a"], "pcmu", A_SRC, A_DST, ssrc=SSRC_A, duration_s=2.5)])
    t0 = time.monotonic()
    events = _events(run("-i", f"short=pcap:{path}", "--no-tui", "--jsonl", "-", "-q", "--no-ws"))
    took = time.monotonic() - t0
    start = next(e for e in events if e["type"] == "stream_started")
    end = next(e for e in events if e["type"] == "stream_ended")
    assert start["stream"] == "short-1a2b3c4d" and end["reason"] == "eof"
    assert end["ts"] - start["ts"] >= 2.2 and took >= 2.4  # paced by the capture's timestamps
    assert end["t"] == pytest.approx(2.5, abs=0.05)


# ---------------------------------------------------------------------------------------------- offline scoring


def test_score_capture_one_result_per_rtp_stream(captures, speech, tmp_path):
    refs = {}
    for key, codec in (("a", "pcmu"), ("c", "opus")):  # the same coded speech, decoded by ffmpeg, as WAV files
        refs[key] = tmp_path / f"decoded_{key}.wav"
        sf.write(refs[key], encode_like_ffmpeg(speech[key], codec), 16000, subtype="FLOAT")
    out = run("score", captures["pcap"], captures["pcapng"], refs["a"], refs["c"], "--json", "-",
              "--csv", tmp_path / "s.csv")
    assert out.returncode == 0, out.stderr
    results = {r["file"]: r for r in json.loads(out.stdout)}
    counts = captures["counts"]
    for fmt in ("pcap", "pcapng"):
        a, b, c = (results[f"{captures[fmt]}#{s:08x}"] for s in (SSRC_A, SSRC_B, SSRC_C))
        assert (a["src"], a["dst"], a["codec"]) == ("192.168.1.10:16384", "192.168.1.20:20000", "PCMU")
        assert (b["src"], b["dst"], b["codec"]) == ("192.168.1.20:20000", "192.168.1.10:16384", "PCMU")
        assert (c["src"], c["dst"], c["codec"]) == ("10.0.0.5:30000", "10.0.0.6:31000", "opus")
        assert a["net"]["received"] == a["net"]["expected"] == counts[SSRC_A] and a["net"]["lost"] == 0
        assert b["net"]["received"] == counts[SSRC_B] and b["net"]["lost"] == len(B_DROPS)
        assert b["net"]["loss_pct"] == pytest.approx(100 * len(B_DROPS) / (counts[SSRC_B] + len(B_DROPS)), abs=1e-3)
        assert b["net"]["mos_cq"] < a["net"]["mos_cq"]
        assert all("net" in w for w in a["windows"] + b["windows"] + c["windows"])
        assert max(w["net"]["lost"] for w in b["windows"]) >= 5
        for r, key in ((a, "a"), (c, "c")):
            ref = results[str(refs[key])]
            assert "net" not in ref and "src" not in ref
            assert len(r["windows"]) == len(ref["windows"])
            assert r["mos"] == pytest.approx(ref["mos"], abs=0.3), (r["file"], r["mos"], ref["mos"])
            assert r["duration_s"] == pytest.approx(ref["duration_s"], abs=0.1)
    assert results[f"{captures['pcap']}#{SSRC_A:08x}"]["mos"] == pytest.approx(
        results[f"{captures['pcapng']}#{SSRC_A:08x}"]["mos"], abs=1e-6)
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0].startswith("file,mos,duration_s,windows,scored_windows,error,src,dst,codec,expected,")
    assert len(rows) == 1 + 6 + 2


def test_score_capture_without_rtp_and_with_port_filter(captures, tmp_path):
    noise = tmp_path / "noise.pcapng"
    write_pcap(noise, [], extra=dns_like(10))
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(b"\xd4\xc3\xb2\xa1" + b"\x00" * 6)
    dumped = tmp_path / "call.dump"  # a capture by its magic number, whatever its name
    dumped.write_bytes(captures["pcap"].read_bytes())
    out = run("score", noise, damaged, dumped, "--rtp-port", C_DST[1], "--json", "-")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["file"] for r in results] == [str(noise), str(damaged), f"{dumped}#{SSRC_C:08x}"]
    assert "no RTP stream" in results[0]["error"] and results[0]["mos"] is None
    assert "header" in results[1]["error"]
    assert results[2]["mos"] > 2 and results[2]["codec"] == "opus"
