"""One resampler for every input: the same G.711 audio scores the same over RTP as from a file.

A few real recordings are sent over loopback RTP as PCMU, uniform 20 ms packets, no loss, to the real
monitor process (one socket, one SSRC per recording, all at once).  The same payloads, decoded with the
G.711 tables into 8 kHz samples and written as 8 kHz WAV files, are then played through the monitor as
files.  Both paths resample 8 kHz to 16 kHz with :mod:`scoreq_live.core.resample`, so every window sees the
same audio and each recording's mean MOS over RTP must equal its mean from the file (within 0.02; with a
resampler of its own, 6 dB down at 3.6 kHz, the RTP path scored these recordings 0.08-0.19 lower).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests import rtp_tools as rt
from tests.helpers import EXAMPLES, MUSHRA, joined, speech_16k
from tests.media_tools import mulaw_encode, to_8k
from tests.test_sources_rtp import events_until, start_monitor, wait_bound

PACKET = 160  # 20 ms of PCMU at 8 kHz
SECONDS = 14  # of each recording: seven full 7.68 s windows (1 s hop) and a last, shorter one
SSRC0 = 0x7E5A0000


@pytest.fixture(scope="module")
def recordings(data: Path) -> dict[str, list[bytes]]:
    """Name -> 20 ms PCMU payloads of ``SECONDS`` of real speech (clean, a low-bitrate codec, other speakers)."""
    mushra = joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:5])
    sources = {
        "clean": speech_16k(EXAMPLES / "clean.wav"),
        "lyra3": speech_16k(EXAMPLES / "lyra3.wav"),
        "mushra": mushra,
    }
    out = {}
    for name, x16 in sources.items():
        x8 = to_8k(x16)[:SECONDS * 8000]
        assert len(x8) == SECONDS * 8000, name
        payload = mulaw_encode(x8)
        out[name] = [payload[i:i + PACKET] for i in range(0, len(payload), PACKET)]
    return out


def scores(events: list[dict], stream: str) -> dict[float, float]:
    """Window start -> MOS of the windows the monitor scored in ``stream``, which must have ended cleanly."""
    mine = [e for e in events if e["stream"] == stream and e["type"] != "stream_record"]
    assert mine and mine[-1]["type"] == "stream_ended", (stream, [e["type"] for e in mine])
    assert not [e for e in mine if e["type"] in ("stream_error", "input_dropped")], mine
    return {e["t_start"]: e["mos"] for e in mine if e["type"] == "score" and e["mos"] is not None}


def test_pcmu_over_rtp_scores_like_the_same_samples_from_a_file(recordings, tmp_path):
    names = list(recordings)
    ssrcs = {name: SSRC0 + i for i, name in enumerate(names)}
    n = len(recordings[names[0]])
    # One socket sends the recordings' packets interleaved, each recording's every 20 ms, then one BYE for all.
    packets = [rt.rtp_packet(i, i * PACKET, ssrcs[name], 0, recordings[name][i]) for i in range(n) for name in names]
    packets.append(rt.rtcp_bye(ssrcs.values()))
    port = rt.free_udp_port()
    mon = start_monitor("-i", f"call=rtp://127.0.0.1:{port}", "--rtp-timeout", "2", "--duration", "90")
    try:
        wait_bound(port, mon)
        took = rt.send_packets(port, packets, rate_pps=50.0 * len(names))
        assert took < SECONDS + 1
        rtp_events = events_until(mon, {f"call-{s:08x}" for s in ssrcs.values()})
    finally:
        rt.stop_process(mon)  # type: ignore[arg-type]
    for name, ssrc in ssrcs.items():
        windows = [e for e in rtp_events if e["stream"] == f"call-{ssrc:08x}" and e["type"] == "score"]
        for e in windows:  # the precondition: every packet arrived in time, nothing was concealed
            net = e["net"]
            assert net["codec"] == "PCMU" and net["lost"] == net["late"] == net["concealed"] == 0, (name, net)
    live = {name: scores(rtp_events, f"call-{ssrc:08x}") for name, ssrc in ssrcs.items()}

    # The same payloads decoded (ITU G.711 tables) to 8 kHz samples, as files: int16 holds them exactly.
    inputs = []
    for name, payloads in recordings.items():
        wav = tmp_path / f"{name}.wav"
        sf.write(wav, rt.g711_decode(b"".join(payloads)), 8000, subtype="PCM_16")
        inputs += ["-i", f"{name}={wav}"]
    mon = start_monitor(*inputs, "--fast", "--duration", "90")
    try:
        out, err = mon.communicate(timeout=120)  # it stops by itself once its files have ended
    finally:
        rt.stop_process(mon)  # type: ignore[arg-type]
    assert mon.returncode == 0, err
    file_events = [json.loads(line) for line in out.splitlines() if line.strip()]
    files = {name: scores(file_events, name) for name in names}

    # Per recording, the mean over the windows scored in both runs (a live run on a busy machine may skip a
    # window as overloaded; the file run, played as fast as scoring allows, skips none).
    means = {}
    for name in names:
        both = sorted(live[name].keys() & files[name].keys())
        assert len(both) >= 5 and len(files[name]) >= len(live[name]), (name, live[name], files[name])
        means[name] = (np.mean([live[name][t] for t in both]), np.mean([files[name][t] for t in both]))
    diffs = {name: round(float(a - b), 4) for name, (a, b) in means.items()}
    assert all(abs(d) < 0.02 for d in diffs.values()), (diffs, live, files)
