"""Proves the PulseAudio fixture: a WAV played into the sink is captured by PortAudio bit-exact.

Capture runs in a subprocess so that PortAudio initialises with PULSE_SERVER set
(see tests/pulse.py). The child opens the stream, reports its first callback,
and records until told to stop; only then is the file played, since audio
played before the stream runs is lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import SCOREQ_PAIR

REF_WAV = SCOREQ_PAIR / "ref.wav"
RATE = 16000

# Child process: list devices, capture from "pulse" until a line arrives on stdin
# (or stdin closes), write the float32 samples raw to argv[1], report JSON on stdout.
CAPTURE_SCRIPT = r"""
import json, sys, threading, time
import numpy as np
import sounddevice as sd

out_path = sys.argv[1]
names = [d["name"] for d in sd.query_devices()]
blocks, first = [], threading.Event()
info = {}

def callback(indata, frames, t, status):
    if not first.is_set():
        info["t_first_callback"] = time.monotonic()
        info["first_frames"] = frames
        first.set()
    if status:
        info.setdefault("status", []).append(str(status))
    blocks.append(indata.copy())

with sd.InputStream(device="pulse", samplerate=16000, channels=1, dtype="float32",
                    latency="low", callback=callback) as stream:
    if not first.wait(10):
        print(json.dumps({"error": "no callback within 10 s", "devices": names}), flush=True)
        sys.exit(1)
    info["stream_latency_s"] = stream.latency
    print("READY", flush=True)
    sys.stdin.readline()  # parent says stop (or went away)
audio = np.concatenate(blocks)[:, 0] if blocks else np.zeros(0, np.float32)
audio.astype(np.float32).tofile(out_path)
info.update(devices=names, frames=int(audio.size))
print(json.dumps(info), flush=True)
"""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """Read one stdout line from proc, failing the test if none arrives in time."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        pytest.fail(f"capture child gave no output within {timeout} s")
    return proc.stdout.readline()


def _align(captured: np.ndarray, ref: np.ndarray) -> int:
    """Offset of ref inside captured, by FFT cross-correlation."""
    n = 1 << int(np.ceil(np.log2(captured.size + ref.size)))
    xc = np.fft.irfft(np.fft.rfft(captured.astype(np.float64), n) * np.conj(np.fft.rfft(ref.astype(np.float64), n)), n)
    return int(np.argmax(xc[: captured.size - ref.size + 1]))


def test_wav_played_into_sink_is_captured_bit_exact(data, pulse_server, tmp_path):
    t_start = time.monotonic()
    ref, sr = sf.read(REF_WAV, dtype="float32")  # int16 / 32768, like PulseAudio's s16 -> float32
    assert sr == RATE and ref.ndim == 1, "fixture file must be mono 16 kHz to be delivered unresampled"

    raw = tmp_path / "captured.f32"
    child = subprocess.Popen(
        [sys.executable, "-c", CAPTURE_SCRIPT, str(raw)],
        env=pulse_server.client_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _readline(child, timeout=15)
        if line.strip() != "READY":
            child.kill()
            out, err = child.communicate(timeout=5)
            pytest.fail(f"capture child failed: {line}{out}\n{err}")

        t_play = time.monotonic()
        player = pulse_server.play(REF_WAV)
        assert player.wait(timeout=ref.size / RATE + 5) == 0, "paplay failed"
        t_played = time.monotonic()
        time.sleep(0.5)  # margin for the tail still in flight to the capture side

        child.stdin.write("stop\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, f"capture child failed:\n{err}"
    info = json.loads(out.strip().splitlines()[-1])

    assert "pulse" in info["devices"], f"no 'pulse' device among {info['devices']}"
    captured = np.fromfile(raw, dtype=np.float32)
    assert captured.size >= ref.size, f"captured only {captured.size} frames"

    offset = _align(captured, ref)
    aligned = captured[offset : offset + ref.size]
    # Tolerance: the int16 samples must come back unchanged. Both sides are int16/32768,
    # so the difference is exactly 0; we allow < half an LSB (0.5/32768) so that only a
    # changed int16 value fails, not a float rounding detail.
    diff = np.abs(aligned - ref)
    assert diff.max() < 0.5 / 32768, (
        f"captured audio differs from file: max |diff| = {diff.max() * 32768:.2f} LSB, "
        f"{np.count_nonzero(diff)} of {ref.size} samples differ (offset {offset})"
    )
    # Nothing else reached the capture device: before and after the file there is digital silence.
    assert not np.any(captured[:offset]) and not np.any(captured[offset + ref.size :])
    assert not info.get("status"), f"stream reported over/underflows: {info['status']}"

    # Delay from launching paplay to its first sample arriving in the capture, for the record.
    t_first_sample = info["t_first_callback"] + (offset - info["first_frames"]) / RATE
    print(
        f"offset {offset} frames, paplay launch -> captured {1000 * (t_first_sample - t_play):.0f} ms, "
        f"stream latency {1000 * info['stream_latency_s']:.0f} ms, playback {t_played - t_play:.2f} s, "
        f"test {time.monotonic() - t_start:.2f} s"
    )
    # Playback runs in real time (the other steps are bounded by their own timeouts above).
    assert t_played - t_play < 2 * ref.size / RATE, f"playing {ref.size / RATE:.2f} s took {t_played - t_play:.2f} s"
