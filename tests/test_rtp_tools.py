"""The RTP test tools themselves: real senders, the impairment proxy, hand-made packets, pcap files.

A plain UDP socket (:class:`UdpCollector`) is the receiver: what it counts is what went over the wire.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import MUSHRA, speech_16k
from tests.rtp_tools import (
    CODECS,
    ImpairmentProxy,
    RtpFlow,
    UdpCollector,
    encode_like_ffmpeg,
    ffmpeg_rtp,
    ffmpeg_sdp,
    flood,
    g711_decode,
    garbage,
    parse_rtp_header,
    pcm_s16,
    read_pcap_udp,
    require_ffmpeg,
    require_sipp,
    rtcp_bye,
    rtp_packet,
    send_packets,
    sipp_rtp,
    stop_process,
    write_pcap,
)

SECONDS = 1.0  # excerpt length: 50 packets of 20 ms


@pytest.fixture
def wav(data) -> Path:
    return MUSHRA / "stim_01" / "ref.wav"


@pytest.fixture
def ffmpeg() -> None:
    require_ffmpeg()


def _best_corr(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """Largest normalised correlation of a and b over lags -max_lag..max_lag."""
    n = min(len(a), len(b)) - 2 * max_lag
    a0 = a[max_lag:max_lag + n]
    best = 0.0
    for lag in range(-max_lag, max_lag + 1):
        b0 = b[max_lag + lag:max_lag + lag + n]
        best = max(best, float(np.dot(a0, b0) / (np.linalg.norm(a0) * np.linalg.norm(b0) + 1e-12)))
    return best


def _run_ffmpeg(wav: Path, rx: UdpCollector, **kw) -> None:
    proc = ffmpeg_rtp(wav, rx.port, duration_s=SECONDS, **kw)
    try:
        assert proc.wait(timeout=15) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        stop_process(proc)
    rx.wait_quiet(0.2, timeout=3)


# ---------------------------------------------------------------------------------------------------------------
# ffmpeg
# ---------------------------------------------------------------------------------------------------------------


def test_ffmpeg_pcmu_20ms_packets_with_asked_ssrc_pt_and_real_speech(wav, ffmpeg):
    with UdpCollector() as rx:
        t0 = time.monotonic()
        _run_ffmpeg(wav, rx, codec="pcmu", ssrc=0xDEADBEEF, payload_type=0, seq=65500)
        took = time.monotonic() - t0
        arrivals = np.array([t for t, _, _ in rx.packets])
        pkts = rx.rtp()
    assert len(rx.packets) == len(pkts) == 50  # rtcp="off": every datagram is RTP
    assert {len(d) for d in rx.datagrams()} == {172}  # 12-byte header + 160 bytes = 20 ms of PCMU
    assert {(p.ssrc, p.pt) for p in pkts} == {(0xDEADBEEF, 0)}
    assert [p.seq for p in pkts] == [(65500 + i) % 65536 for i in range(50)]  # wraps after 65535
    assert set(np.diff([p.ts for p in pkts]) % (1 << 32)) == {160}
    # -re paces the packets at 20 ms (the WAV demuxer reads one 20 ms block per packet)
    gaps = np.diff(arrivals) * 1000
    assert 0.8 < arrivals[-1] - arrivals[0] < 1.3 and took < 5
    assert np.median(gaps) == pytest.approx(20, abs=2)
    # the payload is the speech: compare with the source at 8 kHz as ffmpeg resamples it
    audio = np.concatenate([g711_decode(p.payload) for p in pkts])
    src = pcm_s16(wav, 8000, duration_s=SECONDS).astype(np.float32) / 32768
    assert len(audio) == 8000 and len(src) == 8000
    assert np.corrcoef(audio, src)[0, 1] > 0.999


@pytest.mark.parametrize("codec,size,step,pt", [("pcma", 172, 160, 8), ("g722", 172, 160, 9), ("opus", None, 960, 97)])
def test_ffmpeg_other_codecs(wav, ffmpeg, codec, size, step, pt):
    with UdpCollector() as rx:
        _run_ffmpeg(wav, rx, codec=codec, realtime=False, ssrc=0x1234)
        pkts = rx.rtp()
    assert len(pkts) in (50, 51)  # Opus: one more (the encoder's look-ahead flushed at the end)
    assert {(p.ssrc, p.pt) for p in pkts} == {(0x1234, pt)}
    assert set(np.diff([p.ts for p in pkts]) % (1 << 32)) == {step}
    sizes = {len(p.payload) + 12 for p in pkts}
    if size:
        assert sizes == {size}
    else:
        assert max(sizes) < 200  # Opus at 32 kbit/s: ~80 bytes per 20 ms frame
    if codec == "pcma":
        audio = np.concatenate([g711_decode(p.payload, "alaw") for p in pkts])
        src = pcm_s16(wav, 8000, duration_s=SECONDS).astype(np.float32) / 32768
        assert np.corrcoef(audio, src)[0, 1] > 0.999


def test_ffmpeg_payload_type_override_and_rtcp_mux_bye(wav, ffmpeg):
    with UdpCollector() as rx:
        _run_ffmpeg(wav, rx, codec="opus", ssrc=77, payload_type=111, rtcp="mux", send_bye=True)
        datagrams = rx.datagrams()
        sources = {addr for _, _, addr in rx.packets}
        pkts = rx.rtp()
    assert {p.pt for p in pkts} == {111}
    rtcp = [d for d in datagrams if 200 <= d[1] <= 204]
    assert rtcp, "sender reports come to the same port"
    # the last datagram: a compound SR + BYE naming the SSRC
    last = rtcp[-1]
    assert last[1] == 200
    bye = last[4 * (struct.unpack("!H", last[2:4])[0] + 1):]
    assert bye[1] == 203 and struct.unpack("!I", bye[4:8])[0] == 77
    assert len(sources) == 2  # RTCP leaves from the sender's RTP port + 1


def test_ffmpeg_sdp_names_port_and_codec_and_sends_nothing(ffmpeg):
    with UdpCollector() as rx:
        sdp = ffmpeg_sdp(rx.port, "opus", payload_type=111)
        pcmu = ffmpeg_sdp(rx.port, "pcmu")
        time.sleep(0.1)
        assert rx.packets == []
    assert f"m=audio {rx.port} RTP/AVP 111" in sdp and "a=rtpmap:111 opus/48000/2" in sdp
    assert "c=IN IP4 127.0.0.1" in sdp
    assert f"m=audio {rx.port} RTP/AVP 0" in pcmu


@pytest.mark.parametrize("codec,min_corr", [("pcmu", 0.98), ("pcma", 0.98), ("g722", 0.95), ("opus", 0.9)])
def test_encode_like_ffmpeg_is_the_speech_through_the_codec(wav, ffmpeg, codec, min_corr):
    ref = speech_16k(wav)[: int(SECONDS * 16000)]
    out = encode_like_ffmpeg(wav, codec, duration_s=SECONDS)
    assert out.dtype == np.float32 and abs(len(out) - len(ref)) <= 320
    assert _best_corr(out, ref, 40) > min_corr


# ---------------------------------------------------------------------------------------------------------------
# Hand-made packets
# ---------------------------------------------------------------------------------------------------------------


def test_rtp_packet_builder_valid_and_broken():
    ok = parse_rtp_header(rtp_packet(7, 1600, 0xABCD, 0, b"x" * 160, marker=True, csrcs=[1, 2],
                                     extension=(0xBEDE, b"abc"), padding=4))
    assert ok is not None and (ok.seq, ok.ts, ok.ssrc, ok.marker, ok.cc) == (7, 1600, 0xABCD, True, 2)
    assert ok.payload == b"x" * 160
    assert len(rtp_packet()) == 172
    assert parse_rtp_header(rtp_packet(version=1)) is None
    assert parse_rtp_header(rtp_packet(truncate=11)) is None
    assert parse_rtp_header(rtp_packet(payload=b"", csrc_count=15)) is None  # claims 60 bytes of CSRCs
    assert parse_rtp_header(rtp_packet(payload=b"", extension=(1, b""), extension_words=1000)) is None
    assert parse_rtp_header(rtcp_bye([5])) is None  # RTCP is not RTP
    assert rtcp_bye([5], "bye")[:2] == b"\x81\xcb" and len(rtcp_bye([5], "bye")) % 4 == 0
    assert garbage(30, 1) == garbage(30, 1) != garbage(30, 2)


def test_send_packets_paces_and_flood_floods():
    with UdpCollector() as rx:
        took = send_packets(rx.port, [rtp_packet(i) for i in range(20)], 100)
        assert rx.wait_for(20, 2)
        assert 0.17 < took < 0.5
        rx.wait_quiet(0.1)
        n0 = len(rx.packets)
        fast = flood(rx.port, 500, None)
        assert rx.wait_for(n0 + 500, 3)
        assert fast < 0.5
    seqs = [p.seq for p in rx.rtp()[n0:]]
    assert seqs == list(range(500))


# ---------------------------------------------------------------------------------------------------------------
# Impairment proxy
# ---------------------------------------------------------------------------------------------------------------


def _through(proxy: ImpairmentProxy, rx: UdpCollector, n: int, rate: int, seq0: int = 0) -> list[int]:
    """Send n packets at ``rate`` through the proxy, RTP timestamps matching the rate (8 kHz clock)."""
    with proxy:
        send_packets(proxy.port, [rtp_packet(seq0 + i, 8000 // rate * i) for i in range(n)], rate)
        assert proxy.wait_idle(5)
        rx.wait_quiet(0.1, timeout=3)
    return [p.seq for p in rx.rtp()]


def test_proxy_explicit_drop_duplicate_reorder_match_receiver():
    with UdpCollector() as rx:
        proxy = ImpairmentProxy(rx.port, drop_at={3, 10, 11}, duplicate_at={5}, reorder_at={20}, reorder_k=3,
                                flush_after_s=0.1)
        got = _through(proxy, rx, 40, 400, seq0=65530)
    assert got == proxy.sent_seqs
    assert proxy.dropped_seqs == [(65530 + i) % 65536 for i in (3, 10, 11)]
    assert all(s not in got for s in proxy.dropped_seqs)
    assert proxy.duplicated_seqs == [65535] and got.count(65535) == 2
    late = (65530 + 20) % 65536
    assert proxy.reordered_seqs == [late]
    assert got.index(late) == got.index(late - 1) + 4  # three later packets went first
    assert proxy.counts() == {"received": 40, "dropped": 3, "duplicated": 1, "reordered": 1, "sent_rtp": 38,
                              "other": 0, "overflow": 0}


def test_proxy_random_and_bursty_loss_is_seeded_and_recorded():
    runs = []
    for _ in range(2):
        with UdpCollector() as rx:
            proxy = ImpairmentProxy(rx.port, seed=42, loss=0.02, gilbert=(0.05, 0.3), duplicate=0.02, reorder=0.02)
            got = _through(proxy, rx, 1000, 2000)
        assert got == proxy.sent_seqs
        assert sorted(set(range(1000)) - set(got)) == proxy.dropped_seqs
        assert all(got.count(s) == 2 for s in proxy.duplicated_seqs)
        runs.append((proxy.dropped_seqs, proxy.duplicated_seqs, proxy.reordered_seqs))
    assert runs[0] == runs[1]  # same seed, same decisions
    loss = len(runs[0][0]) / 1000
    assert 0.08 < loss < 0.30  # 0.05 / 0.35 bursts + 2 % random = ~16 %
    bursts = np.diff(np.flatnonzero(np.diff(np.r_[0, np.isin(np.arange(1000), runs[0][0]), 0])))[::2]
    assert bursts.max() >= 3  # Gilbert-Elliott losses come in bursts


def test_proxy_jitter_in_order_and_reordering():
    with UdpCollector() as rx:
        proxy = ImpairmentProxy(rx.port, seed=1, jitter="uniform", jitter_ms=(0, 40), keep_order=True)
        got = _through(proxy, rx, 100, 100)
        arrivals = np.array([t for t, _, _ in rx.packets])
    assert got == list(range(100))
    delays = proxy.injected_delays_ms
    assert len(delays) == 100 and 0 <= min(delays.values()) and max(delays.values()) <= 40
    assert all(proxy.dwell_ms[s] >= delays[s] - 0.5 for s in range(100))  # in order: never shorter than drawn
    # the receiver's own RFC 3550 jitter agrees with the proxy's account of what it sent
    j, ts = 0.0, np.arange(100) * 80
    for k in range(1, 100):
        j += (abs((arrivals[k] - arrivals[k - 1]) * 8000 - (ts[k] - ts[k - 1])) - j) / 16
    assert j / 8 == pytest.approx(proxy.rfc3550_jitter_ms(8000), abs=1.0)
    assert proxy.rfc3550_jitter_ms(8000) > 3 > proxy.rfc3550_jitter_ms(8000, "in")

    with UdpCollector() as rx:
        proxy = ImpairmentProxy(rx.port, seed=1, jitter="normal", jitter_ms=(30, 15), keep_order=False)
        got = _through(proxy, rx, 100, 100)
    assert got == proxy.sent_seqs and sorted(got) == list(range(100))
    assert got != list(range(100))  # jitter larger than the 10 ms interval lets packets overtake


def test_proxy_between_ffmpeg_and_receiver(wav, ffmpeg):
    with UdpCollector() as rx, ImpairmentProxy(rx.port, seed=3, loss=0.1, duplicate=0.05) as proxy:
        proc = ffmpeg_rtp(wav, proxy.port, "pcmu", ssrc=9, duration_s=SECONDS, realtime=False)
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            stop_process(proc)
        assert proxy.wait_idle(3)
        rx.wait_quiet(0.1, timeout=3)
    assert [p.seq for p in rx.rtp()] == proxy.sent_seqs
    assert proxy.counts()["received"] == 50 and proxy.counts()["dropped"] > 0


# ---------------------------------------------------------------------------------------------------------------
# pcap files and sipp
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_write_pcap_two_calls_readable_with_right_flows(wav, ffmpeg, tmp_path, suffix):
    import av

    pcmu = RtpFlow(wav, "pcmu", ("10.1.0.1", 40000), ("10.1.0.2", 50000), ssrc=0xA, duration_s=SECONDS)
    opus = RtpFlow(MUSHRA / "stim_02" / "ref.wav", "opus", ("10.2.0.1", 41000), ("10.2.0.2", 51000), ssrc=0xB,
                   start_s=0.5, seq0=65000, duration_s=SECONDS, drop_at=frozenset({7}))
    sip = (0.0, ("10.1.0.1", 5060), ("10.1.0.2", 5060), b"INVITE sip:x@10.1.0.2 SIP/2.0\r\n\r\n")
    path = tmp_path / f"call{suffix}"
    counts = write_pcap(path, [pcmu, opus], extra=[sip])
    assert counts == {0xA: 50, 0xB: 50}  # Opus: 51 frames, one left out
    assert path.read_bytes()[:4] == (b"\x0a\x0d\x0d\x0a" if suffix == ".pcapng" else b"\xd4\xc3\xb2\xa1")
    rows = read_pcap_udp(path)
    assert len(rows) == 101
    times = [t for t, *_ in rows]
    assert times == sorted(times) and times[0] == pytest.approx(1_700_000_000.0)
    flows: dict[tuple, list] = {}
    for t, src, dst, payload in rows:
        flows.setdefault((src, dst), []).append((t, payload))
    assert set(flows) == {(pcmu.src, pcmu.dst), (opus.src, opus.dst), (sip[1], sip[2])}
    a = [parse_rtp_header(p) for _, p in flows[(pcmu.src, pcmu.dst)]]
    b = [parse_rtp_header(p) for _, p in flows[(opus.src, opus.dst)]]
    assert all(h is not None for h in a + b)
    assert [h.seq for h in a] == list(range(1000, 1050)) and {h.pt for h in a} == {0}
    assert 65007 not in [h.seq for h in b] and {h.pt for h in b} == {111} and b[0].seq == 65000
    assert np.diff([t for t, _ in flows[(pcmu.src, pcmu.dst)]]) == pytest.approx(np.full(49, 0.02), abs=2e-6)
    # the payloads are the speech
    pcm = np.concatenate([g711_decode(h.payload) for h in a])
    src = pcm_s16(wav, 8000, duration_s=SECONDS).astype(np.float32) / 32768
    assert np.corrcoef(pcm, src)[0, 1] > 0.999
    dec = av.CodecContext.create("opus", "r")
    frames = [f for h in b[:20] for f in dec.decode(av.Packet(h.payload))]
    assert sum(f.samples for f in frames) == 20 * 960 and frames[0].sample_rate == 48000


def test_sipp_replays_pcap_rtp_to_the_port(wav, ffmpeg, tmp_path):
    require_sipp()
    pcap = tmp_path / "caller.pcap"
    write_pcap(pcap, [RtpFlow(wav, "pcmu", ssrc=0x5117, seq0=100, duration_s=SECONDS)])
    sent = [payload for *_, payload in read_pcap_udp(pcap)]
    with UdpCollector() as rx, sipp_rtp(pcap, rx.port) as call:
        call.wait(timeout=15)
        rx.wait_quiet(0.2, timeout=3)
        arrivals = np.array([t for t, _, _ in rx.packets])
        sources = {addr for _, _, addr in rx.packets}
    assert rx.datagrams() == sent  # byte for byte: SSRC, seq, timestamps and payload as captured
    assert sources == {("127.0.0.1", call.rtp_source_port)}
    assert np.median(np.diff(arrivals)) * 1000 == pytest.approx(20, abs=2)


def test_codec_table_consistent():
    assert {c.static_pt for c in CODECS.values()} == {0, 8, 9, None}
    assert CODECS["g722"].clock_rate == 8000 and CODECS["g722"].audio_rate == 16000


@pytest.mark.parametrize("law,fmt", [("ulaw", "mulaw"), ("alaw", "alaw")])
def test_g711_decode_is_bit_exact_with_ffmpeg(ffmpeg, law, fmt):
    import subprocess

    every = bytes(range(256))
    r = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", fmt, "-ar", "8000", "-ac", "1", "-i", "-",
                        "-f", "s16le", "-"], input=every, capture_output=True, timeout=30, check=True)
    assert np.array_equal(np.frombuffer(r.stdout, np.int16), (g711_decode(every, law) * 32768).astype(np.int16))
