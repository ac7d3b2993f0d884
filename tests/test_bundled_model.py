"""The shipped Distill-MOS ONNX files reproduce the PyTorch model.

``models/fidelity/distillmos.json`` holds, for every .wav of the shared
data, the MOS and pooled embedding that the original PyTorch Distill-MOS
gave (written by ``models/export_distillmos.py``). Here the shipped ONNX
files are run with onnxruntime on CPU, with the same preprocessing, and must
give the same numbers. No torch is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile
import soxr

from tests.helpers import ROOT

BUNDLED = ROOT / "scoreq_live" / "bundled"
RECORD = ROOT / "models" / "fidelity" / "distillmos.json"

SAMPLE_RATE = 16000
WINDOW = 122880  # 7.68 s, Distill-MOS' fixed input length
BATCH = 8  # the batch axis is dynamic; batching cuts per-call overhead
MOS_TOLERANCE = 0.005
# Embedding tolerance (max abs over the 200 values). The export's own
# ONNX-vs-PyTorch gap is float32 rounding noise, 6.4e-4 at most on this data
# (the conv1d DFT and torch.stft's FFT round differently, and |X|^0.3
# amplifies it in quiet bins); 2e-3 leaves ~3x headroom for a different CPU's
# kernels. A real fault (wrong rate, window or weights) moves the embedding
# by O(0.1-1): its values spread with a standard deviation of about 0.7.
EMBEDDING_TOLERANCE = 2e-3

def load_window(path: Path) -> np.ndarray:
    """Mono float32 16 kHz, zero-padded at the end to one window (the export's preprocessing)."""
    x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE)
    x = np.asarray(x, dtype=np.float32)
    assert len(x) <= WINDOW, f"{path} is longer than one window"
    return np.pad(x, (0, WINDOW - len(x)))


def session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # CI machines have 2 cores
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(BUNDLED / name), opts, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, audio: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [sess.run(None, {"audio": audio[i : i + BATCH]})[0] for i in range(0, len(audio), BATCH)]
    )


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def windows(record, data) -> np.ndarray:
    return np.stack([load_window(data / f["path"]) for f in record["files"]])


@pytest.fixture(scope="module")
def mos_session() -> ort.InferenceSession:
    return session("distillmos.onnx")


def test_record_covers_the_data(record, data):
    on_disk = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.wav"))
    assert sorted(f["path"] for f in record["files"]) == on_disk


def test_io_signature(mos_session):
    (inp,) = mos_session.get_inputs()
    (out,) = mos_session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("audio", ["batch", WINDOW], "tensor(float)")
    assert (out.name, out.shape, out.type) == ("mos", ["batch", 1], "tensor(float)")

    emb = session("distillmos-embedding.onnx")
    (inp,) = emb.get_inputs()
    (out,) = emb.get_outputs()
    assert (inp.name, inp.shape) == ("audio", ["batch", WINDOW])
    assert (out.name, out.shape) == ("embedding", ["batch", 200])


def test_mos_matches_pytorch(record, windows, mos_session):
    mos = run_batched(mos_session, windows)
    assert mos.shape == (len(windows), 1)
    diffs = {f["path"]: abs(float(m) - f["mos_torch"]) for f, m in zip(record["files"], mos[:, 0])}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= MOS_TOLERANCE, f"{worst}: |ONNX - PyTorch| = {diffs[worst]:.4g}"


def test_embedding_matches_pytorch(record, windows):
    emb = run_batched(session("distillmos-embedding.onnx"), windows)
    expected = np.array([f["embedding_torch"] for f in record["files"]], dtype=np.float32)
    assert emb.shape == expected.shape
    diffs = np.abs(emb - expected).max(axis=1)
    worst = int(np.argmax(diffs))
    assert diffs[worst] <= EMBEDDING_TOLERANCE, (
        f"{record['files'][worst]['path']}: max |ONNX - PyTorch| = {diffs[worst]:.4g}"
    )


def test_silence_scores_finite(mos_session):
    (mos,) = mos_session.run(None, {"audio": np.zeros((1, WINDOW), np.float32)})
    assert math.isfinite(float(mos[0, 0]))
    assert 1.0 <= float(mos[0, 0]) <= 5.0
