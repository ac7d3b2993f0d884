"""The microphone path for real: PortAudio capturing a PulseAudio null sink fed from a WAV file.

The monitor runs as a user would run it (``python -m scoreq_live --input mic:pulse``)
in a subprocess, so PortAudio initialises with the private server's environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import soundfile as sf

from tests.helpers import MUSHRA, joined


def monitor(env, *args):
    return subprocess.Popen([sys.executable, "-m", "scoreq_live", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_events(proc, until, timeout):
    """Read JSON lines from the monitor until ``until(event)`` is true or time runs out."""
    import selectors

    events = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        events.append(json.loads(line))
        if until(events[-1]):
            return events
    raise AssertionError(f"timed out; got {[e['type'] for e in events]}; stderr: {proc.stderr.read()[-2000:]}")


def test_devices_lists_the_capture_device(pulse_server):
    out = subprocess.run([sys.executable, "-m", "scoreq_live", "devices"], env=pulse_server.client_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "pulse" in out.stdout


def test_live_capture_is_scored_and_stops_cleanly(pulse_server, tmp_path, data):
    speech = joined(sorted(MUSHRA.glob("stim_0[123]/ref.wav")))  # about 10 s of clean speech
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="PCM_16")
    proc = monitor(pulse_server.client_env(), "--input", "call=mic:pulse", "--jsonl", "-", "--no-tui",
                   "--window", "4", "--hop", "1", "--duration", "60", "-q")
    try:
        # stream_started comes with the first captured block: only then is anything played.
        first = read_events(proc, lambda e: e["type"] == "stream_started", timeout=30)
        assert first[-1]["source"] == "mic" and first[-1]["stream"] == "call"
        player = pulse_server.play(wav)
        player.wait(timeout=30)
        # Playback is over; wait for windows that cover only the silence after it.
        events = read_events(proc, lambda e: e["type"] == "score" and e["reason"] == "silent"
                             and e["t_start"] > speech.size / 16000 + 1, timeout=30)
        proc.send_signal(signal.SIGINT)
        tail = read_events(proc, lambda e: e["type"] == "stream_ended", timeout=30)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    scores = [e for e in events + tail if e["type"] == "score"]
    assert tail[-1]["reason"] == "stopped"
    scored = [e["mos"] for e in scores if e["mos"] is not None]
    assert len(scored) >= 4, scores
    assert all(1.0 <= m <= 5.0 for m in scored)
    # Clean speech captured bit-exact scores like clean speech: the same windows of the file
    # scored offline land in the same range (windows are offset by the playback start).
    from scoreq_live.offline import score_file
    from scoreq_live.scoring.load import ScoringOptions, load_scorer

    loaded = load_scorer(ScoringOptions(window_s=4, hop_s=1, device="cpu"))
    # What one model run of a window takes on this machine, the first one cold as in the monitor.
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        loaded.scorer.score([speech[:16000 * 4]])
        runs.append(time.perf_counter() - t0)
    offline = score_file(wav, loaded.scorer, loaded.stream)
    assert abs(np.mean(scored) - offline.value) < 0.35, (scored, offline.value)
    assert any(e["reason"] == "silent" and e["mos"] is None for e in scores)  # silence is never scored
    # Scored in real time: no window waited longer than the run before it and its own.  Measured against
    # those run times, not a number of seconds; twice that, as the monitor's runs share the machine with
    # the capture and are not the runs timed here.
    latency_s = max(e["latency_ms"] for e in scores) / 1000
    assert latency_s < 2 * 2 * max(runs), (latency_s, runs)


def test_no_capture_device_gives_one_clear_line(tmp_path):
    # No server at the address PortAudio's pulse plugin is sent to, and no autospawn: no capture device.
    (tmp_path / "client.conf").write_text("autospawn = no\n")
    env = dict(os.environ, PULSE_SERVER=f"unix:{tmp_path}/no-such-socket",
               PULSE_CLIENTCONFIG=str(tmp_path / "client.conf"))
    out = subprocess.run([sys.executable, "-m", "scoreq_live", "--input", "mic", "--no-tui", "-q"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("scoreq-live")]
    assert len(lines) == 1 and "--input FILE" in lines[0], out.stderr
