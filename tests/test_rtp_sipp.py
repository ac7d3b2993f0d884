"""sipp as a second, independent RTP sender into the real monitor process.

A SIP call on loopback between two sipp processes whose caller replays, with ``play_pcap_audio``, a capture
of real speech as PCMU to the port the answer's SDP names: the monitor's ``rtp://`` input.  The capture is
made here (:func:`tests.rtp_tools.write_pcap`), so the test knows every packet that went over the wire and
can check the monitor's network numbers against them, and its scores against the same PCMU payloads
decoded offline.  sipp sends no RTCP, so the stream ends by the monitor's inactivity timeout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from tests import rtp_tools as rt
from tests.helpers import MUSHRA, joined
from tests.test_sources_rtp import events_until, offline_mean, start_monitor, wait_bound

SSRC = 0x51BB0C01
PACKET_MS = 20


@pytest.fixture(scope="module")
def call_pcap(tmp_path_factory, data) -> Path:
    """A capture of one PCMU call leg: about 16.5 s of real speech (five MUSHRA references joined)."""
    rt.require_ffmpeg()  # write_pcap encodes through ffmpeg's resampler
    d = tmp_path_factory.mktemp("sipp")
    wav = d / "speech.wav"
    sf.write(wav, joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:5]), 16000, subtype="PCM_16")
    pcap = d / "caller.pcap"
    counts = rt.write_pcap(pcap, [rt.RtpFlow(wav, "pcmu", ssrc=SSRC, seq0=65500, ts0=0xFFFF0000,
                                             packet_ms=PACKET_MS)])
    assert list(counts) == [SSRC]
    return pcap


def pcap_payloads(pcap: Path) -> list[bytes]:
    """The RTP payloads of the capture, in order (what sipp replays, byte for byte)."""
    headers = [rt.parse_rtp_header(p) for *_, p in rt.read_pcap_udp(pcap)]
    assert all(h is not None and h.ssrc == SSRC for h in headers)
    return [h.payload for h in headers if h is not None]


def test_sipp_call_scores_like_the_same_pcmu_decoded_offline(call_pcap):
    rt.require_sipp()
    payloads = pcap_payloads(call_pcap)
    n = len(payloads)
    port = rt.free_udp_port()
    mon = start_monitor("-i", f"call=rtp://127.0.0.1:{port}", "--rtp-timeout", "1", "--duration", "90")
    try:
        wait_bound(port, mon)
        with rt.sipp_rtp(call_pcap, port) as call:
            call.wait()
            events = events_until(mon, {f"call-{SSRC:08x}"})
    finally:
        rt.stop_process(mon)  # type: ignore[arg-type]

    events = [e for e in events if e["type"] not in ("stream_record", "call_record")]  # the stream's own events
    streams = {e["stream"] for e in events}
    assert streams == {f"call-{SSRC:08x}"}, streams
    assert events[0]["type"] == "stream_started" and events[0]["source"] == "rtp"
    assert "PCMU" in events[0]["detail"] and f":{call.rtp_source_port} " in events[0]["detail"], events[0]
    assert events[-1]["type"] == "stream_ended" and events[-1]["reason"] == "inactive", events[-1]
    assert not [e for e in events if e["type"] in ("stream_error", "input_dropped")]

    scores = [e for e in events if e["type"] == "score"]
    live = [e["mos"] for e in scores if e["mos"] is not None]
    assert len(live) >= 5, [e.get("skipped") for e in scores]
    # Network numbers: packet i's audio lies at media time i * 20 ms, so each window received exactly the
    # capture's packets of its span, none lost, late or duplicated; together the windows span the capture.
    step = PACKET_MS / 1000
    for e in scores:
        net = e["net"]
        inside = sum(1 for i in range(n) if e["t_start"] - 1e-9 <= i * step < e["t_end"] - 1e-9)
        assert net["codec"] == "PCMU" and net["received"] == net["expected"] == inside, (e["window"], net, inside)
        assert net["lost"] == net["late"] == net["duplicated"] == 0 and net["loss_pct"] == 0, net
        assert net["concealed"] == 0 and net["mos_cq"] > 4.0, net
    assert min(e["t_start"] for e in scores) == 0
    assert max(e["t_end"] for e in scores) == pytest.approx(n * step, abs=0.01)

    # The same payloads decoded offline (G.711 tables, 8 -> 16 kHz) and scored with the monitor's defaults.
    decoded = soxr.resample(rt.g711_decode(b"".join(payloads)), 8000, 16000, quality="HQ").astype(np.float32)
    ref = offline_mean(Scorer(OnnxModel(resolve_model("distillmos"), device="cpu"), max_batch=8), decoded)
    assert abs(float(np.mean(live)) - ref) < 0.3, (np.mean(live), ref)
