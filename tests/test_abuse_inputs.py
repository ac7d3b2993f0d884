"""Inputs that are not what they look like: FIFOs and devices, an SDP too large to be one, audio headers that
claim more than the file holds, files longer than the limit, long files scored offline.

Each gives one clear error (or the documented result) at once: nothing blocks on a FIFO, reads a device
forever or allocates what a header claims.  Real files in a temporary folder, real processes where memory
is measured.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from scoreq_live import audio
from scoreq_live.audio import AudioError, load_audio
from scoreq_live.core.stream import StreamConfig
from scoreq_live.offline import score_file, window_results
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.references import StoredReferenceError, embed_files
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sources import FileSource, SourceError, make_inputs
from scoreq_live.sources.rtp import SDP_MAX_BYTES, specs_from_sdp

CLEAN = Path(__file__).resolve().parent.parent / "examples" / "clean.wav"
DEV_ZERO = Path("/dev/zero")
CONFIG = StreamConfig(window_s=4.0, hop_s=1.0, model="tiny")
needs_dev_zero = pytest.mark.skipif(not DEV_ZERO.exists(), reason="no /dev/zero here")


@pytest.fixture(scope="module")
def scorer(tiny_nr) -> Scorer:
    return Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"))


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@contextmanager
def never_blocks(fifo: Path, after_s: float = 5.0) -> Iterator[None]:
    """Fail (instead of hanging) when the code under test blocks opening ``fifo``: a writer is opened after
    ``after_s``, which releases a reader stuck there, and the test fails."""
    done = threading.Event()
    rescued: list[bool] = []

    def rescue() -> None:
        if not done.wait(after_s):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO unless a reader is waiting
                rescued.append(True)
            except OSError:
                pass

    t = threading.Thread(target=rescue, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
    assert not rescued, f"blocked opening the FIFO {fifo}"


def wav_claiming(path: Path, frames: int, held_s: float = 1.0) -> Path:
    """A 16 kHz 16-bit mono WAV whose header claims ``frames`` frames, holding ``held_s`` of noise."""
    x = (np.random.default_rng(0).standard_normal(int(16000 * held_s)) * 0.1).astype(np.float32)
    sf.write(path, x, 16000, subtype="PCM_16")
    b = bytearray(path.read_bytes())
    data = b.find(b"data")
    struct.pack_into("<I", b, data + 4, min(2 * frames, 0xFFFFFFFE))
    struct.pack_into("<I", b, 4, min(data + 4 + 2 * frames, 0xFFFFFFFE))
    path.write_bytes(b)
    return path


def flac_claiming(path: Path, frames: int) -> Path:
    """A 1 s FLAC whose STREAMINFO claims ``frames`` samples (36 bits, big-endian)."""
    sf.write(path, np.zeros(16000, np.float32), 16000, format="FLAC")
    b = bytearray(path.read_bytes())
    info = 8  # "fLaC", then the STREAMINFO block header
    b[info + 13] = (b[info + 13] & 0xF0) | ((frames >> 32) & 0x0F)
    b[info + 14:info + 18] = (frames & 0xFFFFFFFF).to_bytes(4, "big")
    path.write_bytes(b)
    return path


# -- 1. an SDP is a small regular file ------------------------------------------------------------------------


def test_an_sdp_fifo_is_refused_at_once_not_waited_on(tmp_path):
    fifo = tmp_path / "call.sdp"
    os.mkfifo(fifo)
    with never_blocks(fifo):
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=r"is a FIFO \(named pipe\), not a regular file; an SDP is a small"):
            make_inputs(str(fifo))
        with pytest.raises(SourceError, match="FIFO"):
            specs_from_sdp(fifo)  # the reader itself, without make_inputs' look first
        with pytest.raises(SourceError, match="FIFO"):
            make_inputs(f"call={fifo}")
        assert time.monotonic() - t0 < 2.0


@needs_dev_zero
def test_an_sdp_that_is_a_device_is_refused(tmp_path):
    with pytest.raises(SourceError, match="is a character device, not a regular file"):
        specs_from_sdp(DEV_ZERO)


def test_an_sdp_larger_than_64_kib_is_refused(tmp_path):
    sdp = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5004 RTP/AVP 0\r\n"
    fine = tmp_path / "fine.sdp"
    fine.write_text(sdp + "a=sendonly\r\n" * 1000)
    assert [s.port for s in specs_from_sdp(fine)] == [5004]
    big = tmp_path / "big.sdp"
    big.write_text(sdp + "a=x" + "x" * SDP_MAX_BYTES)
    with pytest.raises(SourceError, match="is larger than 64 KiB; an SDP is a small text file"):
        make_inputs(str(big))


# -- 2. FIFOs and devices given as audio ----------------------------------------------------------------------


def test_fifos_and_devices_given_as_audio_say_what_they_are(tmp_path, scorer):
    fifo = tmp_path / "live.wav"
    os.mkfifo(fifo)
    cases = [(fifo, r"a FIFO \(named pipe\)")] + ([(DEV_ZERO, "a character device")] if DEV_ZERO.exists() else [])
    with never_blocks(fifo):
        for path, kind in cases:
            with pytest.raises(SourceError, match=rf"is {kind}, not a regular file; give an audio file, or live "
                                                  r"audio as mic or rtp://HOST:PORT") as e:
                make_inputs(str(path))
            assert "no such file" not in str(e.value)
            with pytest.raises(SourceError, match=rf"is {kind}, not a regular file"):
                FileSource("x", path).check()  # opened without make_inputs
            with pytest.raises(AudioError, match=rf"it is {kind}, not a regular file; give an audio file"):
                load_audio(path)  # offline scoring and references
            res = score_file(path, scorer, CONFIG)  # 'score': a row saying so
            assert res.error is not None and "not a regular file" in res.error and not res.windows
    with pytest.raises(SourceError, match="no such file"):
        make_inputs(str(tmp_path / "nope.wav"))


def test_the_command_line_refuses_fifos_and_devices_with_one_error(tmp_path, tiny_nr):
    sdp, wav = tmp_path / "call.sdp", tmp_path / "live.wav"
    os.mkfifo(sdp)
    os.mkfifo(wav)
    with never_blocks(sdp, after_s=30), never_blocks(wav, after_s=30):
        for spec, kind in [(sdp, "a FIFO"), (wav, "a FIFO")] + ([(DEV_ZERO, "a character device")]
                                                                  if DEV_ZERO.exists() else []):
            out = cli("--input", spec, "--no-tui", "--model", tiny_nr, "--model-kind", "mos", timeout=60)
            assert out.returncode == 2, out.stderr
            assert out.stderr.count("scoreq-live: error") == 1 and f"is {kind}" in out.stderr, out.stderr
        out = cli("score", wav, *([DEV_ZERO] if DEV_ZERO.exists() else []), "--model", tiny_nr, "--model-kind",
                  "mos", "--json", "-", timeout=60)
    assert out.returncode == 1, out.stderr
    rows = json.loads(out.stdout)
    assert all("not a regular file" in r["error"] and r["windows"] == [] for r in rows)


# -- 3. headers that claim too much, files longer than the limit ----------------------------------------------

_MEASURE = """
import json, resource, sys, time
from pathlib import Path
from scoreq_live.audio import AudioError, load_audio
t = time.monotonic()
try:
    out = {"samples": int(load_audio(sys.argv[1]).size)}
except AudioError as e:
    out = {"error": str(e)}
out["s"] = time.monotonic() - t
out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def measured_load(path: Path) -> dict:
    """load_audio in a fresh process: what it returned or said, how long it took, its peak memory."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_wav_header_claiming_2_31_frames_on_a_small_file_reads_what_the_file_holds(tmp_path):
    path = wav_claiming(tmp_path / "claims.wav", 2**31 - 1, held_s=1.0)
    got = measured_load(path)
    # libsndfile trusts the file's size over a WAV header: the one second that is there, quickly, in little memory
    assert got.get("samples") == 16000 and got["s"] < 5 and got["maxrss_mb"] < 250, got


def test_a_huge_sparse_wav_is_refused_by_its_header_without_reading_it(tmp_path):
    path = wav_claiming(tmp_path / "sparse.wav", 2**31 - 1)
    os.truncate(path, 44 + 2 * (2**31 - 1))  # the 4 GiB the header claims, as a hole
    if path.stat().st_blocks * 512 > 64 << 20:
        pytest.skip("this file system does not keep sparse files")
    got = measured_load(path)
    # before: read whole, 4 GiB of 16-bit samples as float32 (a 1 GiB one peaked at 4.2 GB resident)
    assert "37.3 h long (so its header says), more than the 4.0 h limit" in got.get("error", ""), got
    assert got["s"] < 5 and got["maxrss_mb"] < 250, got


def test_a_flac_header_claiming_2_31_frames_is_refused_before_reading(tmp_path, scorer):
    path = flac_claiming(tmp_path / "claims.flac", 2**31)
    with pytest.raises(AudioError, match=r"is 37.3 h long \(so its header says\), more than the 4.0 h limit; cut it"):
        load_audio(path)
    res = score_file(path, scorer, CONFIG)
    assert res.error is not None and "raise --max-duration" in res.error and res.value is None


def test_a_header_claiming_more_frames_than_its_bytes_hold_is_refused(tmp_path):
    path = tmp_path / "claims.sds"
    sf.write(path, np.zeros(16000, np.float32), 16000, format="SDS", subtype="PCM_16")
    b = bytearray(path.read_bytes())
    struct.pack_into("<I", b, 10, 0x7FFFFFF0)  # the sample count of an SDS header
    path.write_bytes(b)
    if sf.info(str(path)).frames * 2 <= path.stat().st_size:
        pytest.skip("this libsndfile does not trust an SDS header's length")
    with pytest.raises(AudioError, match=r"its header claims \d+ frames .* more than its \d+ bytes hold; the file "
                                         r"is truncated or corrupt"):
        load_audio(path)


def test_reading_stops_at_the_limit_where_the_header_does_not_tell(tmp_path, monkeypatch):
    path = tmp_path / "three.wav"
    sf.write(path, np.zeros(3 * 8000, np.float32), 8000)
    with pytest.raises(AudioError, match=r"is 3.0 s long \(so its header says\), more than the 1.0 s limit"):
        load_audio(path, max_duration_s=1.0)
    monkeypatch.setattr(audio, "_UNKNOWN_FRAMES", 0)  # as for a stream whose length libsndfile does not know
    with pytest.raises(AudioError, match=r"is longer than the 1.0 s limit; cut it"):
        load_audio(path, max_duration_s=1.0)
    assert load_audio(path, max_duration_s=None).size == 3 * 16000


def test_references_read_files_with_the_same_checks(tmp_path, tiny_ref):
    model = OnnxModel(resolve_model(str(tiny_ref)), device="cpu")
    fifo = tmp_path / "clean.wav"
    os.mkfifo(fifo)
    long = flac_claiming(tmp_path / "long.flac", 2**31)
    with never_blocks(fifo):
        with pytest.raises(StoredReferenceError, match="FIFO"):
            list(embed_files(model, [fifo], CONFIG))
    with pytest.raises(StoredReferenceError, match="more than the 4.0 h limit"):
        list(embed_files(model, [long], CONFIG))


# -- offline scoring reads long files block by block ----------------------------------------------------------


def test_offline_scoring_streams_a_long_file_with_the_whole_file_results(tmp_path, scorer):
    x, rate = sf.read(CLEAN, dtype="float32")
    y = soxr.resample(x, rate, 48000)
    seconds = 180
    stereo = np.stack([y, 0.5 * y], axis=1)
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", 48000, 2, "PCM_16") as f:
        for k in range(0, seconds * 48000, stereo.shape[0]):
            f.write(stereo[:min(stereo.shape[0], seconds * 48000 - k)])
    whole_f32 = seconds * 48000 * 2 * 4  # the file at its own rate and channels, as float32: 69 MB

    tracemalloc.start()
    res = score_file(path, scorer, CONFIG)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res.error is None and res.duration_s == pytest.approx(seconds, abs=0.01)
    assert peak < whole_f32 / 2, f"peak {peak / 1e6:.1f} MB while scoring"  # whole, it was more than whole_f32

    # The same windows and scores as the whole signal fed at once, read with the one-shot resampler.
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    one_shot = np.clip(soxr.resample(data.mean(axis=1), 48000, 16000), -1, 1)
    assert np.array_equal(load_audio(path), one_shot)
    events = window_results(one_shot, scorer, CONFIG)
    assert [w["mos"] for w in res.windows] == [None if e.mos is None else round(e.mos, 5) for e in events]
    assert len(res.windows) == seconds - 3


def test_score_max_duration_on_the_command_line(tmp_path, tiny_nr):
    path = tmp_path / "three.wav"
    sf.write(path, np.zeros(3 * 16000, np.float32), 16000)
    model = ("--model", tiny_nr, "--model-kind", "mos")
    out = cli("score", path, "--max-duration", "1", *model, "--json", "-")
    assert out.returncode == 1, out.stderr
    [row] = json.loads(out.stdout)
    assert "more than the 1.0 s limit; cut it, or raise --max-duration" in row["error"]
    out = cli("score", path, "--max-duration", "0", *model)
    assert out.returncode == 2 and "--max-duration must be a positive number" in out.stderr


def test_a_fifo_given_as_a_reference_says_what_it_is(tmp_path):
    import pytest

    from scoreq_live.errors import ConfigError
    from scoreq_live.scoring.load import _split_references

    fifo = tmp_path / "ref.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="FIFO"):
        _split_references([str(fifo)])
