"""RTP codecs: payload-type table, ``?codec=`` and SDP parsing, and decoders checked on real speech.

Speech is encoded the way a sender would (aiortc's encoders, i.e. FFmpeg through PyAV), cut into
20 ms packets and decoded packet by packet with our decoders; the output must match the input
(after the codec's own delay) as closely as each codec allows.
"""

from __future__ import annotations

import fractions
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soxr

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.rtp.codecs import (
    STATIC,
    AvOpusDecoder,
    Codec,
    CodecError,
    G711Decoder,
    G722Decoder,
    L16Decoder,
    OpusDecoder,
    codec_by_name,
    libopus_available,
    make_decoder,
    parse_codec_query,
    parse_sdp,
)
from tests.helpers import MUSHRA, joined, speech_16k

# --------------------------------------------------------------------------------------------- helpers


def _speech(name: str = "stim_01") -> np.ndarray:
    return speech_16k(MUSHRA / name / "ref.wav")


def _s16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def _frames(sig: np.ndarray, rate: int, n: int) -> Iterator[Any]:
    """(channels, samples) int16 signal as PyAV frames of n samples."""
    from av import AudioFrame

    layout = "mono" if sig.shape[0] == 1 else "stereo"
    for k, i in enumerate(range(0, sig.shape[1] - n + 1, n)):
        chunk = np.ascontiguousarray(sig[:, i:i + n].T.reshape(1, -1))  # packed s16
        f = AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
        f.sample_rate = rate
        f.pts = k * n
        f.time_base = fractions.Fraction(1, rate)
        yield f


def _encode(encoder: Any, sig: np.ndarray, rate: int, n: int) -> list[bytes]:
    packets: list[bytes] = []
    for f in _frames(sig, rate, n):
        out, _ = encoder.encode(f)
        packets += out
    return packets


def _align(ref: np.ndarray, y: np.ndarray, max_lag: int) -> tuple[int, float, float]:
    """(lag, correlation, SNR dB) of y against ref at the lag (0..max_lag) where y best matches ref."""
    n = min(len(ref), len(y))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(y[:n], size) * np.conj(np.fft.rfft(ref[:n], size)), size)
    lag = int(np.argmax(xc[:max_lag + 1]))
    a, b = ref[:n - lag].astype(np.float64), y[lag:n].astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1])
    snr = float(10 * np.log10(np.sum(a * a) / np.sum((a - b) ** 2)))
    return lag, corr, snr


# --------------------------------------------------------------------------------------------- table


def test_static_payload_types() -> None:
    assert STATIC[0] == Codec("PCMU", 0, 8000, 8000, 1, True)
    assert STATIC[8] == Codec("PCMA", 8, 8000, 8000, 1, True)
    assert STATIC[9] == Codec("G722", 9, 8000, 16000, 1, True)  # 8000 clock, 16 kHz audio
    assert STATIC[10] == Codec("L16", 10, 44100, 44100, 2, True)
    assert STATIC[11] == Codec("L16", 11, 44100, 44100, 1, True)
    assert sorted(STATIC) == [0, 8, 9, 10, 11]


def test_codec_by_name() -> None:
    assert codec_by_name("opus", 111) == Codec("opus", 111, 48000, 48000, 2, True)
    assert codec_by_name("OPUS", 96, 48000, 2).name == "opus"
    assert codec_by_name("pcmu", 0) == STATIC[0]
    assert codec_by_name("G722", 9, 8000) == STATIC[9]
    assert codec_by_name("L16", 96, 16000) == Codec("L16", 96, 16000, 16000, 1, True)
    assert codec_by_name("L16", 97, 48000, 2).channels == 2
    dtmf = codec_by_name("telephone-event", 101, 8000)
    assert (dtmf.name, dtmf.decodable, dtmf.clock_rate) == ("telephone-event", False, 8000)
    assert codec_by_name("telephone-event", 110, 48000).clock_rate == 48000
    assert not codec_by_name("CN", 13).decodable


@pytest.mark.parametrize(("args", "needle"), [
    (("G729", 18), "unsupported codec 'G729'"),
    (("opus", 111, 16000), "48000"),
    (("G722", 9, 16000), "8000"),
    (("PCMU", 0, 16000), "8000"),
    (("PCMA", 8, None, 2), "mono"),
    (("L16", 96), "rate"),
    (("opus", 128), "0..127"),
    (("opus", 111, None, 3), "1 or 2"),
])
def test_codec_by_name_errors(args: tuple, needle: str) -> None:
    with pytest.raises(CodecError, match=needle) as e:
        codec_by_name(*args)
    assert isinstance(e.value, ScoreqLiveError)


# --------------------------------------------------------------------------------------------- ?codec=


def test_parse_codec_query() -> None:
    assert parse_codec_query("codec=opus&pt=111") == {111: Codec("opus", 111, 48000, 48000, 2, True)}
    assert parse_codec_query("?codec=L16&rate=16000&pt=96") == {96: Codec("L16", 96, 16000, 16000, 1, True)}
    assert parse_codec_query("codec=L16&rate=8000&channels=2&pt=97")[97].channels == 2
    assert parse_codec_query("codec=PCMU") == {0: STATIC[0]}
    assert parse_codec_query("codec=pcma") == {8: STATIC[8]}
    assert parse_codec_query("codec=G722") == {9: STATIC[9]}
    assert parse_codec_query("codec=PCMU&pt=100") == {100: Codec("PCMU", 100, 8000, 8000, 1, True)}
    assert parse_codec_query("codec=L16&channels=2") == {10: STATIC[10]}
    assert parse_codec_query("codec=L16&rate=44100") == {11: STATIC[11]}
    assert parse_codec_query("pt=8") == {8: STATIC[8]}
    assert parse_codec_query("") == {}


@pytest.mark.parametrize(("query", "needles"), [
    ("codec=opus", ["pt=", "dynamic"]),
    ("codec=opus&pt=111&bitrate=32000", ["'bitrate'", "codec, pt, rate, channels"]),
    ("codec=opus&pt=abc", ["pt='abc'", "whole number"]),
    ("codec=opus&pt=111&rate=16000", ["48000"]),
    ("codec=speex&pt=97", ["'speex'", "PCMU, PCMA, G722, L16, opus"]),
    ("codec=opus&pt=200", ["200", "0..127"]),
    ("codec=opus&codec=PCMU&pt=111", ["'codec'", "twice"]),
    ("codec=L16&pt=96", ["L16", "rate"]),
    ("codec=L16", ["pt=", "rate="]),
    ("codec", ["no value"]),
    ("pt=96", ["codec=<name>"]),
])
def test_parse_codec_query_errors(query: str, needles: list[str]) -> None:
    with pytest.raises(CodecError) as e:
        parse_codec_query(query)
    for needle in needles:
        assert needle in str(e.value)


# --------------------------------------------------------------------------------------------- SDP

_SIP_SDP = """v=0
o=alice 2890844526 2890844526 IN IP4 host.example.com
s=call
c=IN IP4 192.0.2.10
t=0 0
m=audio 49170 RTP/AVP 0 8 9 18 101 13
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=ptime:20
m=video 51372 RTP/AVP 99 96
a=rtpmap:99 h263-1998/90000
a=rtpmap:96 opus/48000/2
m=audio 49180 RTP/AVP 96 97 11
c=IN IP4 198.51.100.7/127
a=rtpmap:96 opus/48000/2
a=rtpmap:97 L16/16000/2
m=audio 0 RTP/AVP 0
"""


def test_parse_sdp_audio_sections() -> None:
    media = parse_sdp(_SIP_SDP.replace("\n", "\r\n"))
    assert [(m.addr, m.port) for m in media] == [("192.0.2.10", 49170), ("198.51.100.7", 49180)]
    first, second = media
    assert first.codecs[0] == STATIC[0] and first.codecs[8] == STATIC[8] and first.codecs[9] == STATIC[9]
    assert first.codecs[101].name == "telephone-event" and not first.codecs[101].decodable
    assert first.codecs[13].name == "CN" and not first.codecs[13].decodable
    assert 18 not in first.codecs and "G729" in first.unsupported[18]
    # the video section's rtpmap for 96 must not leak into audio; the second audio section has its own
    assert 96 not in first.codecs
    assert second.codecs[96] == Codec("opus", 96, 48000, 48000, 2, True)
    assert second.codecs[97] == Codec("L16", 97, 16000, 16000, 2, True)
    assert second.codecs[11] == STATIC[11]


def test_parse_sdp_session_addr_absent() -> None:
    media = parse_sdp("v=0\ns=-\nt=0 0\nm=audio 5004 RTP/AVP 111\na=rtpmap:111 OPUS/48000/2\n")
    assert media[0].addr is None and media[0].port == 5004 and media[0].codecs[111].name == "opus"


@pytest.mark.parametrize(("sdp", "needle"), [
    ("v=0\ns=-\nc=IN IP4 192.0.2.1\nt=0 0\nm=video 5000 RTP/AVP 96\na=rtpmap:96 VP8/90000\n", "no audio"),
    ("v=0\ns=-\nt=0 0\nm=audio 5000 RTP/AVP 18\n", "G729"),
    ("v=0\ns=-\nt=0 0\nm=audio 5000 RTP/AVP 97\na=rtpmap:97 AMR-WB/16000\n", "AMR-WB"),
    ("v=0\ns=-\nt=0 0\nm=audio 0 RTP/AVP 0\n", "disabled"),
    ("v=0\ns=-\nt=0 0\nm=audio 9 UDP/TLS/RTP/SAVPF 111\na=rtpmap:111 opus/48000/2\n", "SRTP"),
    ("v=0\ns=-\nt=0 0\nm=audio 5000 RTP/AVP 101\na=rtpmap:101 telephone-event/8000\n", "no decodable codec"),
])
def test_parse_sdp_errors(sdp: str, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        parse_sdp(sdp)


# --------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize(("name", "ffmpeg"), [("PCMU", "pcm_mulaw"), ("PCMA", "pcm_alaw")])
def test_g711_table_matches_ffmpeg(name: str, ffmpeg: str) -> None:
    import av

    codes = bytes(range(256))
    ctx = av.CodecContext.create(ffmpeg, "r")
    ctx.format = "s16"
    ctx.layout = "mono"
    ctx.sample_rate = 8000
    expected = np.concatenate([f.to_ndarray().reshape(-1) for f in ctx.decode(av.Packet(codes))])
    ours = make_decoder(STATIC[0 if name == "PCMU" else 8]).decode(codes)
    assert ours.dtype == np.float32 and ours.shape == (256,)
    np.testing.assert_array_equal(ours * 32768.0, expected.astype(np.float32))


@pytest.mark.parametrize("name", ["PCMU", "PCMA"])
def test_g711_round_trip(data: object, name: str) -> None:
    from aiortc.codecs.g711 import PcmaEncoder, PcmuEncoder

    x8 = soxr.resample(_speech(), 16000, 8000).astype(np.float32)
    s = _s16(x8)
    packets = _encode(PcmuEncoder() if name == "PCMU" else PcmaEncoder(), s[None], 8000, 160)
    assert len(packets) >= 100 and {len(p) for p in packets} == {160}
    dec = make_decoder(STATIC[0 if name == "PCMU" else 8])
    assert isinstance(dec, G711Decoder) and not dec.plc
    outs = [dec.decode(p) for p in packets]
    assert all(o.shape == (160,) and o.dtype == np.float32 for o in outs)
    y = np.concatenate(outs)
    ref = s[:len(y)].astype(np.float32) / 32768.0
    lag, corr, snr = _align(ref, y, 40)
    assert lag == 0  # G.711 is sample by sample
    assert snr > 30.0, snr  # 8-bit companding of speech: about 35-38 dB
    assert dec.conceal(160).tolist() == [0.0] * 160


def test_g722_round_trip(data: object) -> None:
    from aiortc.codecs.g722 import G722Encoder

    s = _s16(_speech("stim_02"))
    packets = _encode(G722Encoder(), s[None], 16000, 320)
    assert len(packets) >= 100 and {len(p) for p in packets} == {160}  # 64 kbit/s: 160 bytes per 20 ms
    dec = make_decoder(STATIC[9])
    assert isinstance(dec, G722Decoder) and not dec.plc
    outs = [dec.decode(p) for p in packets]
    assert all(o.shape == (320,) and o.dtype == np.float32 for o in outs)  # 16 kHz out of an 8000 clock
    y = np.concatenate(outs)
    lag, corr, snr = _align(s.astype(np.float32) / 32768.0, y, 200)
    assert 10 <= lag <= 40, lag  # the QMF filter bank delays by about 22 samples
    assert corr > 0.99 and snr > 20.0, (corr, snr)
    assert not dec.conceal(320).any()


def _opus_packets(sig16: np.ndarray) -> list[bytes]:
    from aiortc.codecs.opus import OpusEncoder

    return _encode(OpusEncoder(), sig16, 16000, 320)


def test_libopus_found() -> None:
    # PyAV's wheels ship libopus, and most systems have it: Opus streams get real concealment.
    assert libopus_available()
    assert isinstance(make_decoder(codec_by_name("opus", 111)), OpusDecoder)


@pytest.mark.parametrize("kind", ["libopus-ctypes", "libopus-ffmpeg", "opus-ffmpeg"])
def test_opus_round_trip(data: object, kind: str) -> None:
    x = _speech()
    packets = _opus_packets(_s16(x)[None])
    assert len(packets) >= 100
    opus = codec_by_name("opus", 111)
    dec = OpusDecoder(opus) if kind == "libopus-ctypes" else AvOpusDecoder(opus, kind.split("-")[0])
    assert dec.plc is (kind == "libopus-ctypes")
    outs = [dec.decode(p) for p in packets]
    assert all(o.shape == (960,) and o.dtype == np.float32 for o in outs)  # 20 ms at 48 kHz, mono
    y = np.concatenate(outs)
    ref = soxr.resample(x, 16000, 48000).astype(np.float32)
    lag, corr, _ = _align(ref, y, 2000)
    assert 200 <= lag <= 500, lag  # encoder lookahead + resampling
    assert corr > 0.85, corr  # perceptual codec at 96 kbit/s: waveform close, not exact
    assert dec.errors == 0


def test_opus_stereo_is_downmixed(data: object) -> None:
    x = _speech()
    s = _s16(x)
    packets = _opus_packets(np.stack([s, np.zeros_like(s)]))  # left speech, right silent
    for dec in (OpusDecoder(codec_by_name("opus", 111)), AvOpusDecoder(codec_by_name("opus", 111))):
        y = np.concatenate([dec.decode(p) for p in packets])
        ref = soxr.resample(x, 16000, 48000).astype(np.float32)
        lag, corr, _ = _align(ref, y, 2000)
        gain = float(np.dot(ref[:len(y) - lag], y[lag:]) / np.dot(ref[:len(y) - lag], ref[:len(y) - lag]))
        assert corr > 0.8, corr
        assert 0.35 < gain < 0.65, gain  # (L + R) / 2


def _log_spectrum(v: np.ndarray) -> np.ndarray:
    """Log power spectrum of a 20 ms slot at 48 kHz, 0..8 kHz in 50 Hz bins."""
    spec = np.abs(np.fft.rfft(v * np.hanning(len(v))))[:161]
    return np.log10(spec**2 + 1e-10)


def test_opus_plc_conceals_with_speech_like_audio(data: object) -> None:
    x = joined([MUSHRA / s / "ref.wav" for s in ("stim_01", "stim_02", "stim_03")])
    packets = _opus_packets(_s16(x)[None])
    clean = OpusDecoder(codec_by_name("opus", 111))
    ref = [clean.decode(p) for p in packets]
    lossy = OpusDecoder(codec_by_name("opus", 111))
    zeros = AvOpusDecoder(codec_by_name("opus", 111))
    lost = set(range(5, len(packets), 10))  # 10 % isolated losses
    out, silent = [], []
    for i, p in enumerate(packets):
        out.append(lossy.conceal(960) if i in lost else lossy.decode(p))
        silent.append(zeros.conceal(960) if i in lost else zeros.decode(p))
    assert all(len(o) == 960 for o in out)
    assert all(not silent[i].any() for i in lost)  # the fallback decoder conceals with zeros
    slots = sorted(i for i in lost if np.sqrt(np.mean(ref[i] ** 2)) > 0.005)  # losses inside speech
    assert len(slots) >= 20
    energy = sum(float(np.sum(out[i] ** 2)) for i in slots) / sum(float(np.sum(ref[i] ** 2)) for i in slots)
    assert 0.3 < energy < 1.5, energy  # about as loud as the lost speech: not silence, not a blast
    # the first 5 ms continue the waveform (silence would leave all of it as error: ratio 1)
    head = 240
    err = sum(float(np.sum((ref[i][:head] - out[i][:head]) ** 2)) for i in slots)
    assert err < 0.7 * sum(float(np.sum(ref[i][:head] ** 2)) for i in slots), err
    # the spectrum is that of the lost slot, clearly more than that of some other speech slot
    same = np.mean([np.corrcoef(_log_spectrum(ref[i]), _log_spectrum(out[i]))[0, 1] for i in slots])
    other = np.mean([np.corrcoef(_log_spectrum(ref[i]), _log_spectrum(out[slots[(k + 3) % len(slots)]]))[0, 1]
                     for k, i in enumerate(slots)])
    assert same > 0.7 and same > other + 0.1, (same, other)
    # the decoder carries on after a loss: the packets that follow decode close to the clean ones
    after = [i + 1 for i in lost if i + 1 < len(packets)]
    a = np.concatenate([ref[i] for i in after])
    b = np.concatenate([out[i] for i in after])
    assert float(np.corrcoef(a, b)[0, 1]) > 0.7
    # lengths that are not whole 2.5 ms steps come out exactly as asked
    assert lossy.conceal(1000).shape == (1000,) and lossy.conceal(0).shape == (0,)
    assert lossy.conceal(48000).shape == (48000,)


@pytest.mark.parametrize("kind", [OpusDecoder, AvOpusDecoder])
def test_bad_opus_payload_is_counted_not_raised(kind: type) -> None:
    dec = kind(codec_by_name("opus", 111))
    out = dec.decode(b"\xff\xff")  # code-3 packet claiming 63 frames of 20 ms: invalid
    assert out.shape == (960,) and dec.errors == 1
    assert dec.decode(b"").shape == (960,) and dec.errors == 2
    # and the decoder still decodes good packets afterwards
    good = _opus_packets(np.zeros((1, 3200), np.int16))
    assert all(dec.decode(p).shape == (960,) for p in good) and dec.errors == 2


def test_l16_decoder(data: object) -> None:
    s = _s16(_speech()[:16000])
    mono = make_decoder(codec_by_name("L16", 96, 16000))
    assert isinstance(mono, L16Decoder)
    y = mono.decode(s.astype(">i2").tobytes())
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, s.astype(np.float32) / 32768.0)
    # stereo, interleaved: averaged; a torn last frame is dropped
    right = (s // 2).astype(np.int16)
    inter = np.stack([s, right], axis=1).astype(">i2").tobytes()
    st = make_decoder(STATIC[10])
    y2 = st.decode(inter + b"\x01\x02\x03")
    assert y2.shape == (16000,)
    np.testing.assert_allclose(y2, (s.astype(np.float32) + right) / 2 / 32768.0, atol=1e-7)
    # 20 ms at 16 kHz mono is 640 bytes -> 320 samples
    assert mono.decode(b"\x00" * 640).shape == (320,)


def test_make_decoder_refuses_events() -> None:
    with pytest.raises(CodecError, match="telephone-event"):
        make_decoder(codec_by_name("telephone-event", 101))
