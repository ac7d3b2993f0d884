"""The bundled DNSMOS and PLCMOS graphs reproduce Microsoft's reference code (the ``speechmos`` wheel).

``models/fidelity/diagnostic.json`` (written by ``models/build_diagnostic.py``)
holds, for every .wav of the shared data, the values of the wheel's own code
and of the bundled graphs. Here the graphs are run with onnxruntime on the
real speech and compared with that record, and, where ``speechmos`` and
``librosa`` are installed (the ``test`` extra), with the reference code run
live: DNSMOS as shipped, PLCMOS as the limit of its random rater rounds.
"""

from __future__ import annotations

import importlib.util
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
RECORD = ROOT / "models" / "fidelity" / "diagnostic.json"
BUILD_SCRIPT = ROOT / "models" / "build_diagnostic.py"

SAMPLE_RATE = 16000
DNSMOS_WINDOW = 144160  # 9.01 s
PLC_WINDOW = 160000  # 10 s
TOLERANCE = 0.01  # on every score, against the reference
BATCH_TOLERANCE = 1e-5
# A few files for the live comparisons (the record covers them all): the SCOREQ pair, a clean
# reference, a 16 kHz band-limited and a low-rate codec (all short: DNSMOS tiles them).
LIVE_FILES = [
    "scoreq/ref.wav",
    "scoreq/opus.wav",
    "mushra/audio/stim_03/ref.wav",
    "mushra/audio/stim_03/prop_13_16k.wav",
    "mushra/audio/stim_05/lyra_32.wav",
]
SCORES = ("sig", "bak", "ovrl", "p808")
MULTI_WINDOW_FILE = "mushra/audio/stim_07/ref.wav"  # 2.2 s: tiled to 17.3 s, 7 windows


def load(path: Path) -> np.ndarray:
    """Mono float32 16 kHz (the build's preprocessing)."""
    x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE)
    return np.asarray(x, dtype=np.float32)


def tiled(x: np.ndarray, n: int) -> np.ndarray:
    """The first n samples of x repeated: speechmos.dnsmos' first window for a short clip."""
    return np.resize(x, n).astype(np.float32)


def padded(x: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x, (0, n - len(x))).astype(np.float32)


def session(path: Path | bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2  # CI machines have 2 cores
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def sub_graph(name: str, output: str) -> ort.InferenceSession:
    """The part of a bundled graph from ``audio`` to one inner tensor (the folded features)."""
    onnx = pytest.importorskip("onnx")
    model = onnx.utils.Extractor(onnx.load(str(BUNDLED / name))).extract_model(["audio"], [output])
    return session(model.SerializeToString())


def run(sess: ort.InferenceSession, audio: np.ndarray, batch: int = 4) -> np.ndarray:
    return np.concatenate([sess.run(None, {"audio": audio[i : i + batch]})[0] for i in range(0, len(audio), batch)])


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def dnsmos() -> ort.InferenceSession:
    return session(BUNDLED / "dnsmos.onnx")


@pytest.fixture(scope="module")
def personalized() -> ort.InferenceSession:
    return session(BUNDLED / "dnsmos-personalized.onnx")


@pytest.fixture(scope="module")
def plcmos() -> ort.InferenceSession:
    return session(BUNDLED / "plcmos.onnx")


@pytest.fixture(scope="module")
def clean(data) -> np.ndarray:
    """Clean speech, 5.4 s."""
    return load(data / "scoreq" / "ref.wav")


@pytest.fixture(scope="module")
def build_script():
    """models/build_diagnostic.py as a module: its PLCMOS head in numpy and speechmos' DNSMOS windowing."""
    spec = importlib.util.spec_from_file_location("build_diagnostic", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ contract


def test_io_signatures(dnsmos, personalized, plcmos):
    for sess, window, out, width in (
        (dnsmos, DNSMOS_WINDOW, "scores", 4),
        (personalized, DNSMOS_WINDOW, "scores", 4),
        (plcmos, PLC_WINDOW, "plcmos", 1),
    ):
        (inp,) = sess.get_inputs()
        (output,) = sess.get_outputs()
        assert (inp.name, inp.shape, inp.type) == ("audio", ["batch", window], "tensor(float)")
        assert (output.name, output.shape, output.type) == (out, ["batch", width], "tensor(float)")


def test_record_covers_the_data(record, data):
    on_disk = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.wav"))
    assert sorted(f["path"] for f in record["files"]) == on_disk


def test_batch_of_three_equals_singles(clean, dnsmos, personalized, plcmos):
    rng = np.random.default_rng(3)
    for sess, window in ((dnsmos, DNSMOS_WINDOW), (personalized, DNSMOS_WINDOW), (plcmos, PLC_WINDOW)):
        base = tiled(clean, window)
        audio = np.stack([base, 0.3 * base, base + 0.01 * rng.standard_normal(window).astype(np.float32)])
        (batched,) = sess.run(None, {"audio": audio})
        singles = np.concatenate([sess.run(None, {"audio": audio[i : i + 1]})[0] for i in range(3)])
        assert batched.shape == singles.shape == (3, sess.get_outputs()[0].shape[1])
        assert np.max(np.abs(batched - singles)) <= BATCH_TOLERANCE


def test_silence_scores_finite(dnsmos, personalized, plcmos):
    for sess, window in ((dnsmos, DNSMOS_WINDOW), (personalized, DNSMOS_WINDOW), (plcmos, PLC_WINDOW)):
        (out,) = sess.run(None, {"audio": np.zeros((1, window), np.float32)})
        assert all(math.isfinite(float(v)) for v in out[0])


# ------------------------------------------------------------ against the record (all files)


@pytest.mark.slow
def test_dnsmos_matches_record(record, data, dnsmos, personalized, build_script):
    """Files scored the way speechmos.dnsmos scores them (tiled, 1 s hops), against the recorded reference.

    Every file the reference scored in one window, and one scored in seven (the averaging, and the window
    speechmos skips); the build checked all 82 files, ~330 windows, which take minutes on 2 cores.
    """
    files = [f for f in record["files"] if f["dnsmos_windows"] == 1 or f["path"] == MULTI_WINDOW_FILE]
    assert len(files) >= 10
    worst = {}
    for f in files:
        windows = build_script.dnsmos_windows(load(data / f["path"]))
        for key, sess in (("dnsmos", dnsmos), ("personalized", personalized)):
            scores = run(sess, windows).astype(np.float64).mean(axis=0)
            for name, value in zip(SCORES, scores):
                diff = abs(value - f[f"{key}_{name}_ref"])
                if diff > worst.get(f"{key}_{name}", (0.0, ""))[0]:
                    worst[f"{key}_{name}"] = (diff, f["path"])
    for key, (diff, path) in worst.items():
        assert diff <= TOLERANCE, f"{key} {path}: |ONNX - reference| = {diff:.4g}"


@pytest.mark.slow
def test_plcmos_matches_record(record, data, plcmos):
    audio = np.stack([padded(load(data / f["path"]), PLC_WINDOW) for f in record["files"]])
    scores = run(plcmos, audio)[:, 0]
    diffs = {f["path"]: abs(float(s) - f["plcmos_ref_expectation"]) for f, s in zip(record["files"], scores)}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"{worst}: |ONNX - reference expectation| = {diffs[worst]:.4g}"


# ------------------------------------------------------------ against the reference, live


def test_dnsmos_matches_speechmos_live(data, dnsmos, personalized):
    pytest.importorskip("librosa")
    reference = pytest.importorskip("speechmos.dnsmos")
    for rel in LIVE_FILES:
        window = tiled(load(data / rel), DNSMOS_WINDOW)  # exactly one window: the reference scores just it
        for sess, mode in ((dnsmos, "dnsmos"), (personalized, "dnsmos_personalized")):
            ref = reference.run(window, SAMPLE_RATE, model_type=mode)
            expected = [ref["sig_mos"], ref["bak_mos"], ref["ovrl_mos"], ref["p808_mos"]]
            (ours,) = sess.run(None, {"audio": window[None]})
            diff = np.abs(ours[0].astype(np.float64) - np.array(expected))
            assert diff.max() <= TOLERANCE, f"{rel} {mode}: |ONNX - speechmos| = {dict(zip(SCORES, diff))}"


def test_plcmos_matches_speechmos_live(data, plcmos, build_script):
    """Against the reference's limit over rater rounds, and within the spread of its 15 random rounds.

    speechmos.plcmos averages 15 rounds, each with a random N(0, 1) rater
    embedding. Its expectation is computed here from the wheel's own features
    and graph: the graph's audio vector (an inner tensor) with 65536 rater
    draws through the head in numpy, after checking that the numpy head
    reproduces the graph for the same embeddings.
    """
    reference = pytest.importorskip("speechmos.plcmos")
    ref = reference.PLCMOS()
    parts = build_script.PlcParts(Path(ref.model_path).read_bytes())
    graph = session(parts.audio_branch_model().SerializeToString())
    draws = np.random.default_rng(7).standard_normal((1 << 16, 64))
    draws_bias = parts.rater_bias(draws)
    for i, rel in enumerate(LIVE_FILES):
        x = padded(load(data / rel), PLC_WINDOW)
        feat = np.float32(ref.stft_transform(x))[np.newaxis, np.newaxis]
        z = np.random.default_rng(i).standard_normal((4, 64)).astype(np.float32)
        outs = graph.run(None, {"degraded_audio": np.repeat(feat, 4, axis=0), "rater_embed": z})
        a = np.concatenate(outs[1:], axis=1)[:1]
        assert np.max(np.abs(parts.head(a, parts.rater_bias(z))[0] - outs[0])) <= 1e-5
        per_rater = parts.head(a, draws_bias)[0]
        (ours,) = plcmos.run(None, {"audio": x[None]})
        ours = float(ours[0, 0])
        assert abs(ours - per_rater.mean()) <= TOLERANCE, f"{rel}: ONNX {ours:.4f}, expectation {per_rater.mean():.4f}"
        np.random.seed(i)
        shipped = ref(x)["plcmos"]
        spread = 4 * per_rater.std() / math.sqrt(ref.embed_rounds)
        assert abs(ours - shipped) <= spread + TOLERANCE, f"{rel}: ONNX {ours:.4f}, 15 rounds {shipped:.4f}"


# ------------------------------------------------------------ folded features


def test_p808_features_match_librosa(data):
    """The mel sub-graph of dnsmos.onnx against speechmos' own librosa code, on real windows."""
    pytest.importorskip("librosa")
    reference = pytest.importorskip("speechmos.dnsmos")
    mel = sub_graph("dnsmos.onnx", "p808_features")
    melspec = reference.DNSMOS.audio_melspec  # uses no instance state: called with self=None
    for rel in LIVE_FILES[:3]:
        window = tiled(load(data / rel), DNSMOS_WINDOW)
        expected = melspec(None, window[:-160])  # [900, 120]: (power_to_db(ref=max) + 40) / 40, transposed
        (ours,) = mel.run(None, {"audio": window[None]})
        assert ours.shape == (1, 900, 120) == (1, *expected.shape)
        assert np.max(np.abs(ours[0] - expected)) <= 1e-3


def test_plcmos_features_match_reference(data):
    """The STFT sub-graph of plcmos.onnx against speechmos' numpy features, zero frames included."""
    reference = pytest.importorskip("speechmos.plcmos")
    ref = reference.PLCMOS()
    feats = sub_graph("plcmos.onnx", "plcmos_features")
    for x in (padded(load(data / LIVE_FILES[0]), PLC_WINDOW), np.zeros(PLC_WINDOW, np.float32)):
        expected = np.float32(ref.stft_transform(x))
        (ours,) = feats.run(None, {"audio": x[None]})
        assert ours.shape == (1, 1, 626, 257) == (1, 1, *expected.shape)
        assert np.max(np.abs(ours[0, 0] - expected)) <= 1e-4


# ------------------------------------------------------------ reaction to impairment


def test_noise_lowers_bak(clean, dnsmos, personalized):
    """White noise at 5 dB SNR: BAK (background) drops clearly, and so does OVRL."""
    window = tiled(clean, DNSMOS_WINDOW)
    noise = np.random.default_rng(0).standard_normal(DNSMOS_WINDOW)
    noise *= np.sqrt(np.mean(window.astype(np.float64) ** 2) / np.mean(noise**2) / 10 ** (5 / 10))
    noisy = (window + noise).astype(np.float32)
    assert np.max(np.abs(noisy)) <= 1.0
    for sess in (dnsmos, personalized):
        (scores,) = sess.run(None, {"audio": np.stack([window, noisy])})
        (sig_c, bak_c, ovrl_c, _), (_, bak_n, ovrl_n, _) = scores
        assert bak_c >= 3.5, scores
        assert bak_n <= bak_c - 1.0, scores
        assert ovrl_n <= ovrl_c - 0.5, scores
