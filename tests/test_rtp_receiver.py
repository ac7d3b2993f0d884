"""The RTP demux end to end: real speech as G.711/L16 RTP packets, with loss, duplicates, reordering,
wrap-around, garbage, BYE, time-outs, timestamp jumps, DTMF and payload-type switches.

Every expected output is built offline from the same packets: decode each payload, put silence where
the receiver must conceal (G.711 conceals with silence) or fill a gap, and resample the whole with a
fresh resampler (:mod:`scoreq_live.core.resample`, every input's) in one go; the live demux must produce
exactly that, sample for sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soxr

from scoreq_live.core.resample import Resampler
from scoreq_live.rtp.codecs import STATIC, Codec, Decoder, codec_by_name, make_decoder
from scoreq_live.rtp.receiver import (
    GAP_SLACK_S,
    DemuxEvent,
    NewStream,
    RtpDemux,
    RtpStream,
    StreamFailed,
    StreamGone,
)
from tests.helpers import MUSHRA, joined, speech_16k
from tests.test_rtp_packet import rtcp_bye, rtcp_rr, rtcp_sdes, rtcp_sr, rtp_bytes

PCMU, PCMA = STATIC[0], STATIC[8]
L16_16K = codec_by_name("L16", 96, 16000, 1)
DTMF = codec_by_name("telephone-event", 101)
A = ("192.0.2.10", 40000)
B = ("192.0.2.20", 40002)
EVIL = ("198.51.100.66", 6666)
SSRC_A, SSRC_B = 0x1234ABCD, 0x0BADF00D
HELD_BACK = 2000  # 16 kHz samples: the resampler holds back up to 115 ms of 8 kHz input (see core.resample)


# ------------------------------------------------------------------------------------------ encoders


def mulaw_encode(x: np.ndarray) -> bytes:
    """G.711 mu-law from float samples (the G.711 segment encoder, bias 0x84, clip 32635)."""
    s = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int32)
    sign = (s < 0).astype(np.int32)
    mag = np.minimum(np.abs(s), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~((sign << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def alaw_encode(x: np.ndarray) -> bytes:
    """G.711 A-law as the nearest code word."""
    table = make_decoder(PCMA).decode(bytes(range(256)))
    order = np.argsort(table)
    values = table[order]
    i = np.clip(np.searchsorted(values, x), 1, 255)
    i -= (x - values[i - 1]) < (values[i] - x)
    return order[i].astype(np.uint8).tobytes()


def l16_encode(x: np.ndarray) -> bytes:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(">i2").tobytes()


@dataclass
class Pkt:
    """One packet to send: header fields, payload, send time; ``codec`` decodes it offline."""

    seq: int
    ts: int
    pt: int
    payload: bytes
    t: float
    codec: Codec | None
    marker: bool = False

    def data(self, ssrc: int) -> bytes:
        return rtp_bytes(self.seq, self.ts, ssrc, self.pt, self.payload, marker=self.marker)


def packetise(x8: np.ndarray, codec: Codec, seq0: int, ts0: int, t0: float = 100.0, ptime: float = 0.02,
              encode=mulaw_encode) -> list[Pkt]:
    """Speech at the codec's audio rate as packets of ``ptime``, one every ``ptime`` seconds."""
    n = int(round(codec.audio_rate * ptime))
    ts_step = int(round(codec.clock_rate * ptime))
    return [Pkt(seq0 + i, ts0 + i * ts_step, codec.pt, encode(x8[i * n:(i + 1) * n]), t0 + i * ptime, codec)
            for i in range(len(x8) // n)]


def offline(parts: list[tuple[int, np.ndarray | bytes | None, Codec]]) -> np.ndarray:
    """The expected output: each part is (n samples at the codec rate, payload or samples or None = silence)."""
    out: list[np.ndarray] = []
    run: list[np.ndarray] = []
    rate = 0
    decoders: dict[int, Decoder] = {}

    def close_run() -> None:
        if run:
            x = np.concatenate(run)
            r = Resampler(rate)
            out.append(np.concatenate([r.process(x), r.flush()]))
            run.clear()

    for n, what, codec in parts:
        if codec.audio_rate != rate:
            close_run()
            rate = codec.audio_rate
        if what is None:
            run.append(np.zeros(n, np.float32))
        elif isinstance(what, bytes):
            dec = decoders.setdefault(codec.pt, make_decoder(codec))
            run.append(dec.decode(what))
        else:
            run.append(what)
    close_run()
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def clean_parts(pkts: list[Pkt]) -> list[tuple[int, np.ndarray | bytes | None, Codec]]:
    return [(0, p.payload, p.codec) for p in pkts if p.codec is not None]


def run(datagrams: list[tuple[bytes, tuple[str, int], float]], demux: RtpDemux | None = None,
        tick_s: float = 0.1) -> tuple[RtpDemux, dict[int, np.ndarray], list[DemuxEvent], dict[int, RtpStream]]:
    """Feed the datagrams in arrival order (calling expire() every ``tick_s`` like the I/O layer does),
    pull after each, finish every stream at the end."""
    demux = demux or RtpDemux()
    audio: dict[int, list[np.ndarray]] = {}
    events: list[DemuxEvent] = []
    streams: dict[int, RtpStream] = {}
    next_tick = None
    for data, addr, t in sorted(datagrams, key=lambda d: d[2]):
        if next_tick is None:
            next_tick = t + tick_s
        while t >= next_tick:
            events += demux.expire(next_tick)
            next_tick += tick_s
        for ev in demux.datagram(data, addr, t):
            events.append(ev)
            if isinstance(ev, NewStream):
                streams[ev.ssrc] = ev.stream
        for ssrc, st in streams.items():
            audio.setdefault(ssrc, []).append(st.pull())
    for ssrc, st in streams.items():
        audio.setdefault(ssrc, []).append(st.finish())
    return demux, {k: np.concatenate(v) for k, v in audio.items()}, events, streams


def send(pkts: list[Pkt], ssrc: int = SSRC_A, addr: tuple[str, int] = A) -> list[tuple[bytes, tuple[str, int], float]]:
    return [(p.data(ssrc), addr, p.t) for p in pkts]


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    n = min(len(ref), len(x))
    return float(10 * np.log10(np.sum(ref[:n] ** 2) / max(np.sum((ref[:n] - x[:n]) ** 2), 1e-20)))


@pytest.fixture(scope="module")
def speech(data: Path) -> np.ndarray:
    """About 26 s of real speech (the MUSHRA references joined), 16 kHz."""
    return joined(sorted(MUSHRA.glob("stim_*/ref.wav")))


@pytest.fixture(scope="module")
def speech8(speech: np.ndarray) -> np.ndarray:
    return soxr.resample(speech, 16000, 8000).astype(np.float32)


@pytest.fixture(scope="module")
def short8(data: Path) -> np.ndarray:
    return soxr.resample(speech_16k(MUSHRA / "stim_02" / "ref.wav"), 16000, 8000).astype(np.float32)


# --------------------------------------------------------------------------------------------- tests


def test_in_order_stream_reproduces_the_audio_with_little_latency(speech8: np.ndarray) -> None:
    # sequence numbers and timestamps both wrap inside the stream
    pkts = packetise(speech8, PCMU, seq0=65535 - 40, ts0=2**32 - 160 * 70)
    demux = RtpDemux()
    got: list[np.ndarray] = []
    stream = None
    lag = []
    for i, (data, addr, t) in enumerate(send(pkts)):
        for ev in demux.datagram(data, addr, t):
            assert isinstance(ev, NewStream) and ev.ssrc == SSRC_A and i == 1  # confirmed by the 2nd packet
            stream = ev.stream
            assert (stream.codec_name, stream.source_addr) == ("PCMU", A)
        if stream is not None:
            got.append(stream.pull())
            lag.append((i + 1) * 320 - sum(len(g) for g in got))
    assert stream is not None
    got.append(stream.finish())
    y = np.concatenate(got)
    ref = offline(clean_parts(pkts))
    assert len(y) == len(ref) == len(pkts) * 320
    np.testing.assert_allclose(y, ref, atol=1e-6)
    # the decoded speech is the (narrowband) speech that was sent: G.711 and resampling keep > 25 dB
    assert snr_db(soxr.resample(speech8, 8000, 16000)[:len(y)], y) > 25
    # each packet's audio is out as soon as it arrives, but for what the resampler holds back
    assert max(lag) <= HELD_BACK
    tot = stream.totals()
    n = len(pkts)
    assert (tot["expected"], tot["received"], tot["lost"], tot["duplicated"], tot["late"]) == (n, n, 0, 0, 0)
    assert tot["output_s"] == pytest.approx(len(pkts) * 0.02)


def test_injected_loss_duplicates_reordering_and_late_packets_count_exactly(speech8: np.ndarray) -> None:
    pkts = packetise(speech8, PCMU, seq0=64900, ts0=2**32 - 160 * 500)
    n = len(pkts)
    assert n >= 1000
    rng = np.random.default_rng(7)
    idx = rng.permutation(np.arange(5, n - 5))
    lost = set(idx[:60].tolist())  # 4.5 %
    dups = set(idx[60:90].tolist())
    swapped = set(idx[90:130].tolist())  # arrive 30 ms late: after their successor, within the wait
    late = set(idx[130:138].tolist())  # arrive 400 ms late: their slot is long gone
    dgrams = []
    order: list[tuple[float, int]] = []
    for i, p in enumerate(pkts):
        if i in lost:
            continue
        delay = 0.03 if i in swapped else 0.4 if i in late else 0.0
        dgrams.append((p.data(SSRC_A), A, p.t + delay))
        order.append((p.t + delay, i))
        if i in dups:
            dgrams.append((p.data(SSRC_A), A, p.t + 0.005 + 0.05 * (i % 2)))
    highest, reordered = -1, 0
    for _, i in sorted(order):
        reordered += i < highest
        highest = max(highest, i)
    assert reordered >= len(swapped)
    demux, audio, events, streams = run(dgrams)
    assert [type(e) for e in events] == [NewStream]
    st = streams[SSRC_A]
    tot = st.totals()
    assert (tot["expected"], tot["received"], tot["lost"], tot["duplicated"], tot["late"]) == (
        n, n - len(lost), len(lost), len(dups), len(late))
    assert tot["loss_pct"] == pytest.approx(100 * len(lost) / n)
    assert tot["reordered"] == reordered
    assert tot["concealed_s"] == pytest.approx((len(lost) + len(late)) * 0.02)
    # lost and late packets are concealed (silence for G.711) in place: media time is kept exactly
    gone = lost | late
    ref = offline([(160, None, PCMU) if i in gone else (0, p.payload, PCMU) for i, p in enumerate(pkts)])
    assert len(audio[SSRC_A]) == len(ref) == n * 320
    np.testing.assert_allclose(audio[SSRC_A], ref, atol=1e-6)
    # per 1 s window of media time: exactly the packets whose audio lies there
    for w in range(n // 50):
        span = range(50 * w, 50 * w + 50)
        win = st.net_window(float(w), float(w + 1))
        want_lost = sum(i in lost for i in span)
        assert (win.expected, win.received, win.lost, win.duplicated, win.late) == (
            50, 50 - want_lost, want_lost, sum(i in dups for i in span), sum(i in late for i in span)), w
        assert win.concealed == pytest.approx(sum(i in gone for i in span) / 50)
        assert win.codec == "PCMU" and 0 < win.r_factor <= 93.3 and 1 <= win.mos_cq <= 4.5
        if want_lost == 0 and not any(i in late for i in span):
            assert win.loss_pct == 0 and win.r_factor == pytest.approx(93.2, abs=0.1)


def test_jitter_matches_an_injected_delay_variation(speech8: np.ndarray) -> None:
    pkts = packetise(speech8, PCMU, seq0=1000, ts0=12345)
    rng = np.random.default_rng(11)
    spread = 0.04
    delays = rng.uniform(0.0, spread, len(pkts))
    _, audio, _, streams = run([(p.data(SSRC_A), A, p.t + d) for p, d in zip(pkts, delays)])
    st = streams[SSRC_A]
    tot = st.totals()
    assert tot["lost"] == 0 and tot["received"] == len(pkts)
    assert tot["late"] <= 0.01 * len(pkts)
    # the current estimate is RFC 3550 A.8 over the packets in arrival order
    j, prev = 0.0, None
    for t, i in sorted((p.t + d, i) for i, (p, d) in enumerate(zip(pkts, delays))):
        if prev is not None:
            j += (abs(t - pkts[i].t - prev) - j) / 16
        prev = t - pkts[i].t
    assert tot["jitter_ms"] == pytest.approx(1000 * j, rel=1e-6)
    # uniform 0..40 ms one-way delay: the estimate hovers around the mean |D| = 40/3 ms
    want = 1000 * spread / 3
    assert tot["jitter_mean_ms"] == pytest.approx(want, rel=0.2)
    for w in range(1, int(len(pkts) * 0.02) - 4, 4):  # every 4 s window, not just on average
        assert st.net_window(float(w), float(w + 4)).jitter_ms == pytest.approx(want, rel=0.2), w
    assert len(audio[SSRC_A]) == len(pkts) * 320


def test_garbage_is_counted_and_leaves_the_stream_untouched(speech8: np.ndarray) -> None:
    pkts = packetise(speech8[:8000 * 6], PCMU, seq0=500, ts0=0)
    clean = send(pkts)
    _, want, _, _ = run(clean)
    rng = np.random.default_rng(5)
    good = pkts[10].data(SSRC_A)
    other = ("192.0.2.10", 40001)
    kinds = {
        "truncated": lambda: good[:int(rng.integers(0, 12))],
        "bad_version": lambda: bytes([good[0] & 0x3F]) + good[1:],
        "bad_csrc": lambda: bytes([0x8F]) + good[1:40],
        "bad_extension": lambda: bytes([0x90]) + good[1:12] + b"\xbe\xde\xff\xff" + good[12:40],
        "bad_padding": lambda: bytes([0xA0]) + good[1:-1] + b"\xff",
    }
    dgrams = list(clean)
    injected = {k: 0 for k in kinds}
    rtcp = 0
    for i, (_, _, t) in enumerate(clean):
        kind = list(kinds)[i % len(kinds)]
        dgrams.append((kinds[kind](), A, t + 0.001))
        injected[kind] += 1
        if i % 7 == 0:  # RTCP from the sender itself (RFC 5761 multiplexing)
            dgrams.append(((rtcp_sr(SSRC_A) + rtcp_sdes(SSRC_A)) if i % 2 else rtcp_rr(SSRC_A), A, t + 0.002))
            rtcp += 1
        junk = bytearray(rng.integers(0, 256, int(rng.integers(12, 200)), dtype=np.uint8).tobytes())
        junk[0], junk[1] = 0x80, junk[1] & 0x7F  # passes as RTP: a random SSRC that never confirms
        dgrams.append((bytes(junk), other, t + 0.003))
    demux, got, events, _ = run(dgrams)
    assert [type(e) for e in events] == [NewStream]
    assert np.array_equal(got[SSRC_A], want[SSRC_A])
    for kind, count in injected.items():
        assert demux.dropped[kind] == count, kind
    assert demux.rtcp_packets == rtcp
    assert demux.dropped["unconfirmed"] + len(demux._candidates) >= len(clean) - 2
    assert set(demux.streams) == {SSRC_A}


def test_two_ssrcs_on_one_port_are_two_streams(speech8: np.ndarray, short8: np.ndarray) -> None:
    a = packetise(speech8[:8000 * 4], PCMU, seq0=10, ts0=1000)
    b = packetise(short8, PCMA, seq0=60000, ts0=2**32 - 3000, t0=100.5, encode=alaw_encode)
    demux, audio, events, streams = run(send(a) + send(b, SSRC_B, B))
    assert [(type(e), e.ssrc) for e in events] == [(NewStream, SSRC_A), (NewStream, SSRC_B)]
    assert streams[SSRC_B].codec_name == "PCMA" and streams[SSRC_B].source_addr == B
    np.testing.assert_allclose(audio[SSRC_A], offline(clean_parts(a)), atol=1e-6)
    np.testing.assert_allclose(audio[SSRC_B], offline(clean_parts(b)), atol=1e-6)
    assert snr_db(soxr.resample(short8, 8000, 16000), audio[SSRC_B]) > 25


def test_ssrc_change_on_the_same_address_is_a_new_stream(speech8: np.ndarray) -> None:
    first = packetise(speech8[:8000 * 2], PCMU, seq0=1, ts0=0)
    second = packetise(speech8[8000 * 2:8000 * 4], PCMU, seq0=7000, ts0=99999, t0=first[-1].t + 0.02)
    _, audio, events, _ = run(send(first) + send(second, SSRC_B, A))
    assert [(type(e), e.ssrc) for e in events] == [(NewStream, SSRC_A), (NewStream, SSRC_B)]
    assert len(audio[SSRC_A]) == len(first) * 320 and len(audio[SSRC_B]) == len(second) * 320


def test_bye_ends_the_stream_and_only_its_sender_may_say_it(speech8: np.ndarray) -> None:
    pkts = packetise(speech8[:8000 * 4], PCMU, seq0=300, ts0=0)
    half = len(pkts) // 2
    t_bye = pkts[half - 1].t + 0.01
    dgrams = send(pkts[:half]) + send(pkts[half:half + 3])  # three stragglers after the BYE
    dgrams.append((rtcp_bye(SSRC_A), EVIL, t_bye - 0.005))  # someone else's BYE: ignored
    dgrams.append((rtcp_bye(SSRC_A), (A[0], A[1] + 7), t_bye - 0.004))  # the same host, another port: ignored
    dgrams.append((rtcp_rr(SSRC_A) + rtcp_bye(SSRC_A), (A[0], A[1] + 1), t_bye))  # its RTCP port
    demux, audio, events, _ = run(dgrams)
    assert [(type(e), e.ssrc) for e in events] == [(NewStream, SSRC_A), (StreamGone, SSRC_A)]
    gone = events[1]
    assert isinstance(gone, StreamGone) and gone.reason == "bye"
    assert demux.streams == {} and demux.dropped["after_bye"] == 3 and demux.dropped["bye_addr_mismatch"] == 2
    np.testing.assert_allclose(audio[SSRC_A], offline(clean_parts(pkts[:half])), atol=1e-6)


def test_expire_ends_a_silent_stream_and_releases_a_waiting_hole(speech8: np.ndarray) -> None:
    pkts = packetise(speech8[:8000 * 2], PCMU, seq0=0, ts0=0)
    del pkts[-2]  # a hole just before the end: the last packet waits behind it
    demux = RtpDemux(timeout_s=5.0)
    ev = []
    for data, addr, t in send(pkts):
        ev += demux.datagram(data, addr, t)
    st = ev[0].stream
    held = st.pull()
    t_end = pkts[-1].t
    assert len(held) <= (len(pkts) - 1) * 320  # the last one is held for the missing one
    assert demux.expire(t_end + 0.15) == []  # the wait (<= 100 ms) is over: it comes out
    assert len(held) + len(st.pull()) >= (len(pkts) + 1) * 320 - HELD_BACK
    assert demux.expire(t_end + 4.99) == [] and SSRC_A in demux.streams
    assert demux.expire(t_end + 5.0) == [StreamGone(SSRC_A, "inactive")]
    assert demux.streams == {} and st.ended and st.end_reason == "inactive"
    assert st.totals()["lost"] == 1


def test_timestamp_jumps_fill_the_gap_with_silence_capped(speech8: np.ndarray) -> None:
    x = speech8[:8000 * 3]
    pkts = packetise(x, PCMU, seq0=100, ts0=5000)
    a, b, c, d, e = pkts[:30], pkts[30:60], pkts[60:90], pkts[90:120], pkts[120:]
    # a talk-spurt pause of 1.5 s (timestamps and arrivals agree), marker on the first packet after it
    for p in b + c + d + e:
        p.ts += 12000
        p.t += 1.5
    b[0].marker = True
    # a bogus timestamp jump of 2^30 with no pause in arrival: at most the slack is filled
    for p in c + d + e:
        p.ts += 2**30
    # a jump backwards: the timestamps are followed from there, nothing is filled
    for p in d + e:
        p.ts -= 10**9
    # an hour-long pause: capped at max_gap_s
    for p in e:
        p.ts += 8000 * 3600
        p.t += 3600
    demux = RtpDemux(max_gap_s=10.0, timeout_s=1e9)
    _, audio, _, streams = run(send(pkts), demux, tick_s=1e9)
    bogus = int(round(GAP_SLACK_S * 8000))  # packets 20 ms apart show no pause: only the slack is filled
    ref = offline(clean_parts(a) + [(12000, None, PCMU)] + clean_parts(b) + [(bogus, None, PCMU)]
                  + clean_parts(c) + clean_parts(d) + [(80000, None, PCMU)] + clean_parts(e))
    assert len(audio[SSRC_A]) == len(ref)
    np.testing.assert_allclose(audio[SSRC_A], ref, atol=1e-6)
    tot = streams[SSRC_A].totals()
    assert tot["silence_s"] == pytest.approx(1.5 + bogus / 8000 + 10.0)
    assert tot["lost"] == 0 and tot["concealed_s"] == 0


def test_dtmf_events_are_counted_not_decoded(speech8: np.ndarray) -> None:
    pkts = packetise(speech8[:8000 * 3], PCMU, seq0=65500, ts0=0)
    event_start = pkts[50].ts
    for i in range(50, 60):  # 200 ms of telephone-event packets instead of audio, same sequence numbers
        p = pkts[i]
        p.pt, p.codec, p.marker = DTMF.pt, None, i == 50
        p.ts = event_start
        p.payload = bytes([5, 0x0A, 0, (i - 49) * 160 % 256])
    demux = RtpDemux({DTMF.pt: DTMF})
    _, audio, _, streams = run(send(pkts), demux)
    tot = streams[SSRC_A].totals()
    assert tot["telephone_events"] == 10 and tot["lost"] == 0 and tot["expected"] == len(pkts)
    ref = offline(clean_parts(pkts[:50]) + [(1600, None, PCMU)] + clean_parts(pkts[60:]))
    np.testing.assert_allclose(audio[SSRC_A], ref, atol=1e-6)


def test_payload_type_switches_continue_at_16k(speech8: np.ndarray, speech: np.ndarray) -> None:
    x8 = speech8[:8000 * 3]
    u = packetise(x8[:8000], PCMU, seq0=40, ts0=777)
    a = packetise(x8[8000:16000], PCMA, seq0=40 + len(u), ts0=777 + 8000, t0=101.0, encode=alaw_encode)
    x16 = speech[32000:48000]
    l16 = packetise(x16, L16_16K, seq0=40 + len(u) + len(a), ts0=4242, t0=102.0, encode=l16_encode)
    demux = RtpDemux({96: L16_16K})
    _, audio, events, streams = run(send(u + a + l16), demux)
    st = streams[SSRC_A]
    assert st.codec_name == "L16" and st.totals()["pt_switches"] == 2 and st.totals()["lost"] == 0
    ref = offline(clean_parts(u + a + l16))
    assert len(audio[SSRC_A]) == len(ref) == 48000
    np.testing.assert_allclose(audio[SSRC_A], ref, atol=1e-6)
    assert snr_db(speech[:48000], audio[SSRC_A]) > 20


def test_unknown_payload_type_fails_once_and_names_the_fix(speech8: np.ndarray) -> None:
    pkts = packetise(speech8[:8000], PCMU, seq0=1, ts0=0)
    for p in pkts:
        p.pt = 96
    demux = RtpDemux()
    events: list[DemuxEvent] = []
    for data, addr, t in send(pkts):
        events += demux.datagram(data, addr, t)
    assert len(events) == 1 and isinstance(events[0], StreamFailed) and events[0].ssrc == SSRC_A
    msg = events[0].error
    assert "96" in msg and "?codec=" in msg and "pt=96" in msg and "SDP" in msg
    assert demux.dropped["unknown_ssrc_after_failure"] == len(pkts) - 2 and demux.streams == {}
    # silent for the time-out: forgotten, so that it is reported again if it comes back
    assert demux.expire(pkts[-1].t + demux.timeout_s) == []
    again = send(pkts[:2])
    events = [ev for data, addr, t in again for ev in demux.datagram(data, addr, t + 60)]
    assert [type(e) for e in events] == [StreamFailed]


def test_a_hostile_sender_does_not_touch_other_streams(speech8: np.ndarray) -> None:
    pkts = packetise(speech8[:8000 * 4], PCMU, seq0=20000, ts0=0)
    clean = send(pkts)
    _, want, _, _ = run(clean)
    rng = np.random.default_rng(9)
    evil: list[tuple[bytes, tuple[str, int], float]] = []
    for i, (_, _, t) in enumerate(clean):
        # its own SSRC: wild sequence numbers and timestamps, undeclared payload types, odd sizes
        seq = i if i % 3 else int(rng.integers(0, 65536))
        payload = bytes(int(rng.choice([0, 1, 160, 1400]))) if i > 3 else bytes(160)  # it gets in first
        pt = int(rng.choice([0, 8, 96, 101, 127])) if i > 3 else 0
        evil.append((rtp_bytes(seq, int(rng.integers(0, 2**32)), SSRC_B, pt, payload), EVIL, t + 0.0005))
        # and the victim's SSRC, spoofed from another address, plus a spoofed BYE
        evil.append((rtp_bytes(int(rng.integers(0, 65536)), 0, SSRC_A, 0, bytes(160)), EVIL, t + 0.0007))
        if i % 50 == 0:
            evil.append((rtcp_bye(SSRC_A), EVIL, t + 0.0009))
    demux, got, events, streams = run(clean + evil)
    assert np.array_equal(got[SSRC_A], want[SSRC_A])
    assert streams[SSRC_A].totals()["expected"] == len(pkts)
    assert demux.dropped["addr_mismatch"] >= len(clean) - 1
    assert demux.dropped["bye_addr_mismatch"] == len(range(0, len(clean), 50))
    assert all(not (isinstance(e, StreamGone) and e.ssrc == SSRC_A) for e in events)
    # the hostile stream's own output stays near real time: its sequence and timestamp jumps buy no audio
    # beyond the slack; only what its (PCMU/PCMA) payloads carry is decoded on top
    assert SSRC_B in streams
    payload_s = sum(len(p) - 12 for p, _, _ in evil if p[1] & 0x7F in (0, 8) and p[8:12] == SSRC_B.to_bytes(4, "big"))
    assert len(got[SSRC_B]) / 16000 <= (pkts[-1].t - pkts[0].t) * 1.02 + 1.0 + payload_s / 8000


@pytest.mark.parametrize("senders", [129, 300])
def test_more_new_senders_than_candidate_places_are_all_accepted(speech8: np.ndarray, senders: int) -> None:
    """A monitor restarted under traffic: every sender's first packets arrive in the same order each 20 ms.

    More senders than the demux tracks while unconfirmed must not starve: each is accepted within a few
    packet intervals (the port's own cap on streams aside).
    """
    payload = mulaw_encode(speech8[:160])
    demux = RtpDemux(timeout_s=5.0, max_streams=1000)
    started: dict[int, int] = {}
    for k in range(12):  # 12 packet intervals
        for i in range(senders):
            ssrc = 0x10000 + i
            addr = ("127.0.0.1", 20000 + i)
            for ev in demux.datagram(rtp_bytes(1000 + k, 160 * k, ssrc, 0, payload), addr, 100.0 + 0.02 * k):
                if isinstance(ev, NewStream):
                    started[ev.ssrc] = k
    assert len(started) == senders, f"{senders - len(started)} of {senders} senders never accepted"
    assert max(started.values()) <= 10


# ------------------------------------------------------------------------------------ places on a port


def _sender(ssrc: int, addr: tuple[str, int], n: int, t0: float, every: float, payload: bytes = bytes(160),
            pt: int = 0) -> list[tuple[bytes, tuple[str, int], float]]:
    return [(rtp_bytes(500 + i, i * 160, ssrc, pt, payload), addr, t0 + i * every) for i in range(n)]


def _feed(demux: RtpDemux, dgrams: list[tuple[bytes, tuple[str, int], float]]) -> list:
    events = []
    for data, addr, t in sorted(dgrams, key=lambda d: d[2]):
        events += demux.datagram(data, addr, t)
    return events


def test_squatters_give_way_to_a_real_sender_on_a_full_port() -> None:
    """Four SSRCs hold every place with a packet a second; a real sender (50 packets/s) still gets one."""
    demux = RtpDemux(timeout_s=30.0, max_streams=4)
    squat = [_sender(0x5000 + k, ("192.0.2.99", 7000 + k), 20, 0.1 * k, 1.0) for k in range(4)]
    events = _feed(demux, [d for s in squat for d in s])
    assert len(demux.streams) == 4 and all(isinstance(e, NewStream) for e in events)
    events = _feed(demux, _sender(SSRC_A, A, 100, 20.0, 0.02))
    gone = [e for e in events if isinstance(e, StreamGone)]
    assert len(gone) == 1 and gone[0].reason == "evicted" and gone[0].ssrc in {0x5000 + k for k in range(4)}
    assert SSRC_A in demux.streams and len(demux.streams) == 4
    assert not any(isinstance(e, StreamFailed) for e in events)


def test_a_full_port_of_real_senders_refuses_a_new_one_once_and_takes_it_when_a_place_is_free() -> None:
    demux = RtpDemux(timeout_s=30.0, max_streams=2)
    talkers = _sender(SSRC_A, A, 200, 0.0, 0.02) + _sender(SSRC_B, B, 200, 0.001, 0.02)
    late = _sender(0x7777, ("192.0.2.77", 9000), 150, 1.0, 0.02)
    events = _feed(demux, talkers + late)
    failed = [e for e in events if isinstance(e, StreamFailed)]
    assert len(failed) == 1 and failed[0].ssrc == 0x7777 and "refused" in failed[0].error  # said once
    assert set(demux.streams) == {SSRC_A, SSRC_B}
    assert demux.dropped["refused_port_full"] >= 100
    # A talker hangs up (BYE from its own transport): the refused sender gets in with its next packets.
    events = demux.datagram(rtcp_bye(SSRC_A), (A[0], A[1] + 1), 4.01)
    events += _feed(demux, [(rtp_bytes(700 + i, 0, 0x7777, 0, bytes(160)), ("192.0.2.77", 9000), 4.02 + 0.02 * i)
                            for i in range(5)])
    assert [type(e) for e in events] == [StreamGone, NewStream] and 0x7777 in demux.streams


def test_header_only_packets_make_no_stream() -> None:
    demux = RtpDemux(timeout_s=5.0)
    events = _feed(demux, _sender(SSRC_A, A, 50, 0.0, 0.02, payload=b""))
    assert events == [] and demux.streams == {} and demux.dropped["empty"] == 50


def test_a_stream_that_switches_to_an_undeclared_payload_type_says_so_once() -> None:
    demux = RtpDemux(timeout_s=5.0)
    ok = _sender(SSRC_A, A, 100, 0.0, 0.02)
    odd = [(rtp_bytes(600, 100 * 160, SSRC_A, 96, bytes(160)), A, 2.0)]  # one stray packet: counted only
    switched = [(rtp_bytes(601 + i, (101 + i) * 160, SSRC_A, 96, bytes(160)), A, 2.02 + 0.02 * i)
                for i in range(80)]
    events = _feed(demux, ok + odd + _sender(SSRC_A, A, 1, 2.01, 0.02))
    assert [type(e) for e in events] == [NewStream]
    events = _feed(demux, switched)
    assert [type(e) for e in events] == [StreamFailed] and "payload type 96" in events[0].error
    assert SSRC_A not in demux.streams


def test_a_sender_flooding_faster_than_real_time_is_held_to_its_share(speech8: np.ndarray) -> None:
    """Real speech sent at 10x real time is cut to 1.5x (plus a burst) before decoding; a real-time sender,
    with 20 ms or 5 ms packets, loses nothing."""
    demux = RtpDemux(timeout_s=30.0)
    pkts = packetise(speech8[:8000 * 10], PCMU, seq0=100, ts0=0)  # 10 s of speech, 20 ms packets
    fast = [(p.data(SSRC_B), B, 100.0 + 0.002 * i) for i, p in enumerate(pkts)]  # all of it in 1 s
    small = packetise(speech8[:8000 * 2], PCMU, seq0=5000, ts0=0, t0=100.0, ptime=0.005)
    real = [(p.data(SSRC_A), A, p.t) for p in small]
    _feed(demux, fast + real)
    flood, ok = demux.streams[SSRC_B], demux.streams[SSRC_A]
    taken = len(pkts) - flood.over_rate
    assert 0.02 * taken <= 1.5 * 1.0 + 2.0 + 0.1  # the media it got in: 1.5 x 1 s of wall time + 2 s of burst
    assert flood.over_rate >= 0.6 * len(pkts)
    assert ok.over_rate == 0 and ok.totals()["received"] == len(small)
