"""RTP call legs end to end: real senders (ffmpeg, sipp) on loopback, the real monitor process, the bundled model.

The monitor runs as a user runs it (``scoreq-live monitor -i rtp://...``); the tests wait until its port is
bound (a test socket can no longer bind it) before the senders start.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.core.stream import StreamConfig
from scoreq_live.offline import window_results
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from tests import rtp_tools as rt
from tests.helpers import MUSHRA, joined


def start_monitor(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "scoreq_live", "monitor", *args, "--no-tui", "--jsonl", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_bound(port: int, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until the monitor holds ``port`` (binding it here fails), or fail with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the monitor exited early: {proc.stderr.read() if proc.stderr else ''}")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return
        finally:
            s.close()
        time.sleep(0.05)
    pytest.fail(f"the monitor did not bind port {port} in {timeout} s")


def events_until(proc: subprocess.Popen[str], ended: set[str], timeout: float = 120.0) -> list[dict]:
    """The monitor's events until every stream in ``ended`` has ended; then it is stopped as Ctrl-C stops it."""
    assert proc.stdout is not None
    events, left = [], set(ended)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break  # it exited (its --duration is the backstop)
        ev = json.loads(line)
        events.append(ev)
        if ev["type"] == "stream_ended":
            left.discard(ev["stream"])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return events + [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory, data) -> Path:
    """About 20 s of real speech (MUSHRA references joined), 16 kHz mono."""
    path = tmp_path_factory.mktemp("rtp") / "speech.wav"
    sf.write(path, joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:7]), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def bundled_scorer():
    return Scorer(OnnxModel(resolve_model("distillmos"), device="cpu"), max_batch=8)


def offline_mean(scorer: Scorer, audio: np.ndarray) -> float:
    window_s, hop_s = resolve_model("distillmos").windowing()  # the monitor's defaults for the model
    cfg = StreamConfig(window_s=window_s, hop_s=hop_s, model="distillmos")
    vals = [e.mos for e in window_results(audio, scorer, cfg) if e.mos is not None]
    assert len(vals) >= 5
    return float(np.mean(vals))


def test_pcmu_and_opus_from_ffmpeg_score_like_the_same_audio_decoded_offline(speech_wav, bundled_scorer):
    rt.require_ffmpeg()
    pa, pb = rt.free_udp_port(), rt.free_udp_port()
    mon = start_monitor("-i", f"legA=rtp://127.0.0.1:{pa}", "-i", f"legB=rtp://127.0.0.1:{pb}?codec=opus&pt=97",
                        "--rtp-timeout", "1", "--duration", "90")
    senders = []
    try:
        wait_bound(pa, mon)
        wait_bound(pb, mon)
        senders = [rt.ffmpeg_rtp(speech_wav, pa, "pcmu", ssrc=0x1234ABCD),
                   rt.ffmpeg_rtp(speech_wav, pb, "opus", ssrc=0x00C0FFEE)]
        for s in senders:
            assert s.wait(60) == 0
        events = events_until(mon, {"legA-1234abcd", "legB-00c0ffee"})
    finally:
        for s in senders:
            rt.stop_process(s)
        rt.stop_process(mon)  # type: ignore[arg-type]
    for stream, codec in (("legA-1234abcd", "pcmu"), ("legB-00c0ffee", "opus")):
        mine = [e for e in events if e["stream"] == stream and e["type"] != "stream_record"]
        assert mine and mine[0]["type"] == "stream_started" and mine[0]["source"] == "rtp", [e["type"] for e in mine]
        assert mine[-1]["type"] == "stream_ended" and mine[-1]["reason"] == "inactive"
        scores = [e for e in mine if e["type"] == "score"]
        live = [e["mos"] for e in scores if e["mos"] is not None]
        assert len(live) >= 5
        net = scores[-1]["net"]
        assert net["codec"] == ("PCMU" if codec == "pcmu" else "opus") and net["lost"] == 0
        assert net["received"] > 0 and net["loss_pct"] == 0 and 1 <= net["mos_cq"] <= 4.5
        ref = offline_mean(bundled_scorer, rt.encode_like_ffmpeg(speech_wav, codec))
        assert abs(float(np.mean(live)) - ref) < 0.3, (stream, np.mean(live), ref)
