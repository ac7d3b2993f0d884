"""Build the bundled DNSMOS and PLCMOS ONNX graphs from the ``speechmos`` wheel and record their fidelity.

Microsoft's DNSMOS (P.835 SIG/BAK/OVRL and P.808) and PLCMOS are shipped as
ONNX files in the ``speechmos`` 0.0.1.1 wheel (MIT licence), with Python glue
that computes features (librosa mel spectrogram, numpy STFT), applies
polynomial fits and averages random rater embeddings. This script folds all
of that glue into the graphs, so that they run on raw audio with onnxruntime
alone, and writes:

* ``<out-dir>/dnsmos.onnx``: ``audio`` float32 [batch, 144160] -> ``scores``
  float32 [batch, 4] = SIG, BAK, OVRL (polynomial-fitted, as DNSMOS reports
  them) and P808 MOS;
* ``<out-dir>/dnsmos-personalized.onnx``: the same with the personalized
  P.835 model and its own polynomials (the P.808 column is the same model);
* ``<out-dir>/plcmos.onnx``: ``audio`` float32 [batch, 160000] -> ``plcmos``
  float32 [batch, 1], the mean over a fixed set of rater embeddings;
* ``models/fidelity/diagnostic.json``: the reference (the wheel's own code)
  and the graphs' values for every .wav under the data folder, checked by
  ``tests/test_diagnostic_models.py``.

No weights change: the original graphs are embedded node for node (converted
to opset 17 with ``onnx.version_converter``); only their inputs and the
post-processing are new ops.

Requirements (build time only; the graphs need onnxruntime alone)::

    pip install onnx onnxruntime librosa scipy soundfile soxr requests

(``speechmos.dnsmos`` imports ``requests`` without using it.) Run from the
repository root::

    python models/build_diagnostic.py [--wheel speechmos-0.0.1.1-py3-none-any.whl] \\
        [--out-dir scoreq_live/bundled] [--data ../shared/data]

Without ``--wheel`` the wheel is fetched with ``pip download``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import soundfile
import soxr
from onnx import TensorProto, helper, numpy_helper, version_converter
from onnx import compose as onnx_compose

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEEL_SPEC = "speechmos==0.0.1.1"
WHEEL_NAME = "speechmos-0.0.1.1-py3-none-any.whl"
OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.14 reads it
SAMPLE_RATE = 16000

# DNSMOS: 9.01 s windows (speechmos.dnsmos.INPUT_LENGTH); P.808 sees the first 144000 samples.
DNSMOS_INPUT_LENGTH = 9.01
DNSMOS_WINDOW = 144160
P808_SAMPLES = DNSMOS_WINDOW - 160
P808_N_FFT = 321  # frame_size + 1 in speechmos.dnsmos.audio_melspec
P808_HOP = 160
P808_N_MELS = 120
P808_FRAMES = 900  # librosa, centred: 1 + (144000 + 2 * 160 - 321) // 160
POWER_TO_DB_AMIN = 1e-10
POWER_TO_DB_TOP_DB = 80.0

# speechmos.dnsmos.DNSMOS.get_polyfit_val: numpy poly1d coefficients, highest degree first,
# for the raw [SIG, BAK, OVRL] outputs of the P.835 model.
POLY_DNSMOS = {
    "sig": [-0.08397278, 1.22083953, 0.0052439],
    "bak": [-0.13166888, 1.60915514, -0.39604546],
    "ovr": [-0.06766283, 1.11546468, 0.04602535],
}
POLY_PERSONALIZED = {
    "sig": [-0.01019296, 0.02751166, 1.19576786, -0.24348726],
    "bak": [-0.04976499, 0.44276479, -0.1644611, 0.96883132],
    "ovr": [-0.00533021, 0.005101, 1.18058466, -0.11236046],
}

# PLCMOS: speechmos.plcmos.PLCMOS.stft_transform: periodic Hamming 512, hop 256, rfft 512,
# 256 zeros before the first frame; feature = ln(|X|^2) / 20, exact zeros floored at -120 dB
# below the smallest non-zero power (all-zero input: -80 dB).
PLC_N_FFT = 512
PLC_HOP = 256
PLC_WINDOW = 160000  # 10 s, a multiple of the hop: 626 frames, none partial
PLC_ZERO_FLOOR = 1e-12  # ln(min) + (-120 dB) / 10 / log10(e) == ln(min * 1e-12)
PLC_ALL_ZERO = 1e-8  # -80 dB / 10 / log10(e) == ln(1e-8)
PLC_EMBED_DIM = 64
PLC_REF_ROUNDS = 15  # speechmos.plcmos.PLCMOS(embed_rounds=15)
# Deterministic rater handling: the mean over this fixed set of N(0, 1) rater embeddings.
PLC_RATERS = 4096
PLC_RATER_SEED = 20230713
PLC_EXPECTATION_DRAWS = 1 << 17  # for the reference's expectation over raters
PLC_EXPECTATION_SEED = 1

MAX_ABS_TARGET = 0.01


# ---------------------------------------------------------------- wheel


def fetch_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps", "--only-binary=:all:", "-d", str(dest)],
        check=True,
    )
    return dest / WHEEL_NAME


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------ graph helpers


class Builder:
    """Collects nodes and initialisers with unique, prefixed names."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, out: str | None = None, **attrs) -> str:
        out = out or self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def i64(self, values) -> str:
        return self.const(values, np.int64, "i")


def dft_power(b: Builder, frames: str, n_fft: int, window: str, dtype) -> str:
    """|rfft(frames * window)|^2 as one MatMul with a windowed DFT basis built in the graph.

    The basis ([n_fft, 2 * bins]: w[n] cos, w[n] sin) is computed from Range
    ops, so it costs no file size; onnxruntime folds it into a constant when
    the session is created. (k * n) mod n_fft keeps every angle exact.
    """
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    bins = n_fft // 2 + 1
    n = b.op("Range", [b.i64(0), b.i64(n_fft), b.i64(1)], "n")
    k = b.op("Range", [b.i64(0), b.i64(bins), b.i64(1)], "k")
    kn = b.op("Mul", [b.op("Unsqueeze", [n, b.i64([1])]), b.op("Unsqueeze", [k, b.i64([0])])], "kn")
    kn = b.op("Mod", [kn, b.i64(n_fft)], "kn_mod")
    step = b.const(2 * math.pi / n_fft, dtype, "step")
    angle = b.op("Mul", [b.op("Cast", [kn], to=elem), step], "angle")  # [n_fft, bins]
    w_angle = b.op("Mul", [b.op("Cast", [b.op("Unsqueeze", [n, b.i64([1])])], to=elem), step])  # [n_fft, 1]
    if window == "hann":  # scipy.signal.get_window("hann", N, fftbins=True)
        a0, a1 = 0.5, 0.5
    elif window == "hamming":  # np.hamming(N + 1)[:-1]
        a0, a1 = 0.54, 0.46
    else:
        raise ValueError(window)
    win = b.op("Sub", [b.const(a0, dtype), b.op("Mul", [b.const(a1, dtype), b.op("Cos", [w_angle])])], "window")
    basis = b.op(
        "Concat",
        [b.op("Mul", [win, b.op("Cos", [angle])]), b.op("Mul", [win, b.op("Sin", [angle])])],
        "basis",
        axis=1,
    )
    spec = b.op("MatMul", [frames, basis], "spec")  # [..., 2 * bins]
    sq = b.op("Mul", [spec, spec])
    re = b.op("Slice", [sq, b.i64([0]), b.i64([bins]), b.i64([-1])])
    im = b.op("Slice", [sq, b.i64([bins]), b.i64([2 * bins]), b.i64([-1])])
    return b.op("Add", [re, im], "power")


def overlapping_frames(b: Builder, padded: str, n_blocks: int, hop: int, frame_len: int) -> str:
    """Frames of frame_len samples every hop samples from [batch, n_blocks * hop], as [batch, frames, frame_len].

    Built from shifted views of the signal cut into hop-sized blocks (no
    gather), for frame_len <= 3 * hop.
    """
    blocks = b.op("Reshape", [padded, b.i64([-1, n_blocks, hop])], "blocks")
    whole, rest = divmod(frame_len, hop)
    n_frames = n_blocks - whole - (1 if rest else 0) + 1
    parts = []
    for j in range(whole):
        parts.append(b.op("Slice", [blocks, b.i64([j]), b.i64([j + n_frames]), b.i64([1])]))
    if rest:
        tail = b.op("Slice", [blocks, b.i64([whole]), b.i64([whole + n_frames]), b.i64([1])])
        parts.append(b.op("Slice", [tail, b.i64([0]), b.i64([rest]), b.i64([2])]))
    return b.op("Concat", parts, "frames", axis=2)


def load_converted(data: bytes, prefix: str) -> onnx.ModelProto:
    model = onnx.load_from_string(data)
    model = version_converter.convert_version(model, OPSET)
    return onnx_compose.add_prefix(model, prefix)


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def finish(nodes, inits, inputs, outputs, doc: str, metadata: dict, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    model.producer_name = "scoreq-live models/build_diagnostic.py"
    model.doc_string = doc
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    for node in model.graph.node:
        node.doc_string = ""
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------ DNSMOS


def p808_features(b: Builder, audio: str, out: str) -> str:
    """speechmos' audio_melspec(audio[:-160]) folded in: librosa 0.10+ melspectrogram and power_to_db.

    melspectrogram(sr=16000, n_fft=321, hop_length=160, n_mels=120): centred
    frames with 160 zeros each side (pad_mode "constant"), periodic Hann 321,
    |X|^2, Slaney mel filters; then (power_to_db(S, ref=np.max) + 40) / 40,
    with the max taken over each item's whole spectrogram. Output
    [batch, 900, 120] (frames, mels), as the P.808 model wants.
    """
    import librosa

    x = b.op("Slice", [audio, b.i64([0]), b.i64([P808_SAMPLES]), b.i64([1])], "p808_audio")
    half = P808_N_FFT // 2
    n_blocks = P808_FRAMES + 2
    right = n_blocks * P808_HOP - P808_SAMPLES - half
    padded = b.op("Pad", [x, b.i64([0, half, 0, right])], "padded", mode="constant")
    frames = overlapping_frames(b, padded, n_blocks, P808_HOP, P808_N_FFT)  # [B, 900, 321]
    power = dft_power(b, frames, P808_N_FFT, "hann", np.float32)  # [B, 900, 161]
    mel_fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=P808_N_FFT, n_mels=P808_N_MELS)  # [120, 161] float32
    mel = b.op("MatMul", [power, b.const(mel_fb.T, hint="mel_filters")], "mel")  # [B, 900, 120]
    to_db = 10.0 / math.log(10.0)
    amin = b.const(POWER_TO_DB_AMIN)
    log_spec = b.op("Mul", [b.op("Log", [b.op("Max", [mel, amin])]), b.const(to_db)])
    ref = b.op("ReduceMax", [mel], axes=[1, 2], keepdims=1)
    log_ref = b.op("Mul", [b.op("Log", [b.op("Max", [ref, amin])]), b.const(to_db)])
    log_spec = b.op("Sub", [log_spec, log_ref], "db")
    top = b.op("Sub", [b.op("ReduceMax", [log_spec], axes=[1, 2], keepdims=1), b.const(POWER_TO_DB_TOP_DB)])
    log_spec = b.op("Max", [log_spec, top])
    return b.op("Div", [b.op("Add", [log_spec, b.const(40.0)]), b.const(40.0)], out=out)


def polynomial(b: Builder, raw: str, polys: dict[str, list[float]]) -> str:
    """numpy.poly1d per column of raw [batch, 3] = (SIG, BAK, OVRL), by Horner's rule."""
    coefs = [polys["sig"], polys["bak"], polys["ovr"]]
    degree = len(coefs[0]) - 1
    y = b.op("Mul", [raw, b.const([c[0] for c in coefs])])
    for d in range(1, degree + 1):
        y = b.op("Add", [y, b.const([c[d] for c in coefs])])
        if d < degree:
            y = b.op("Mul", [y, raw])
    return y


def dnsmos_model(primary: bytes, p808: bytes, polys: dict, metadata: dict) -> onnx.ModelProto:
    p835 = load_converted(primary, "p835/")
    p808m = load_converted(p808, "p808/")
    b = Builder("fold/")
    audio = "audio"
    rename_input(p835.graph, p835.graph.input[0].name, audio)
    feats = p808_features(b, audio, out="p808_features")
    rename_input(p808m.graph, p808m.graph.input[0].name, feats)
    raw = p835.graph.output[0].name  # [B, 3] raw SIG, BAK, OVRL
    fitted = polynomial(b, raw, polys)
    p808_out = p808m.graph.output[0].name  # [B, 1]
    b.op("Concat", [fitted, p808_out], out="scores", axis=1)
    # The P.808 nodes read the features, and the final Concat reads the P.808 output.
    nodes = list(p835.graph.node) + list(b.nodes[:-1])
    nodes += list(p808m.graph.node) + [b.nodes[-1]]
    inits = list(p835.graph.initializer) + list(p808m.graph.initializer) + b.inits
    return finish(
        nodes,
        inits,
        [helper.make_tensor_value_info(audio, TensorProto.FLOAT, ["batch", DNSMOS_WINDOW])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
        "DNSMOS P.835 + P.808 (Microsoft, MIT licence), from speechmos 0.0.1.1; see LICENSE-speechmos.txt",
        metadata,
        "dnsmos",
    )


# ------------------------------------------------------------ PLCMOS


class PlcParts:
    """The pieces of plcmos_v2.onnx: audio branch, rater branch and head weights."""

    def __init__(self, data: bytes) -> None:
        model = onnx.load_from_string(data)
        self.model = model
        w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
        consts = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"
        }
        by_out = {n.output[0]: n for n in model.graph.node}
        final_add = by_out["plcmos"]
        mul = by_out[final_add.input[0]]
        self.scale = float(consts[mul.input[1]])
        self.offset = float(consts[final_add.input[1]])
        concat = next(n for n in model.graph.node if n.op_type == "Concat" and n.output[0] == "onnx::Gemm_350")
        self.audio_outputs = list(concat.input[:2])  # [B, 32] each: last GRU layer, forward and backward state
        self.rater_input = concat.input[2]
        self.w = w
        self.audio_dim = 64

    def rater_vectors(self, z: np.ndarray) -> np.ndarray:
        """The rater MLP (embed_dense*) on embeddings z [K, 64], float64."""
        w = self.w
        h = z.astype(np.float32).astype(np.float64)  # the reference casts its embeddings to float32
        layers = ["embed_dense1"] + [f"embed_dense2.{i}" for i in range(4)] + ["embed_dense3"]
        for name in layers:
            h = h @ w[f"{name}.weight"].T + w[f"{name}.bias"]
            h = np.where(h > 0, h, 0.1 * h)
        return h

    def rater_bias(self, z: np.ndarray) -> np.ndarray:
        """dense1's rater half plus its bias: [K, 32]."""
        r = self.rater_vectors(z)
        w1 = self.w["dense1.weight"]
        return r @ w1[:, self.audio_dim :].T + self.w["dense1.bias"]

    def head(self, a: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """MOS for audio vectors a [B, 64] and rater biases [K, 32]: [B, K], float64."""
        w = self.w
        h = (a.astype(np.float64) @ w["dense1.weight"][:, : self.audio_dim].T)[:, None, :] + bias[None]
        h = np.where(h > 0, h, 0.1 * h)
        for i in range(4):
            h = h @ w[f"dense2.{i}.weight"].T + w[f"dense2.{i}.bias"]
            h = np.where(h > 0, h, 0.1 * h)
        o = (h @ w["dense3.weight"].T + w["dense3.bias"])[..., 0]
        return self.scale / (1 + np.exp(-o)) + self.offset

    def audio_branch_model(self) -> onnx.ModelProto:
        """The original graph with the audio vector's two halves as extra outputs (for the reference)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for name in self.audio_outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        return model


def plc_raters() -> np.ndarray:
    return np.random.default_rng(PLC_RATER_SEED).standard_normal((PLC_RATERS, PLC_EMBED_DIM))


def plcmos_model(parts: PlcParts, bias: np.ndarray, metadata: dict) -> onnx.ModelProto:
    converted = version_converter.convert_version(parts.model, OPSET)
    branch = onnx.utils.Extractor(converted).extract_model(["degraded_audio"], parts.audio_outputs)
    branch = onnx_compose.add_prefix(branch, "plc/")
    b = Builder("fold/")
    audio = "audio"
    n_blocks = PLC_WINDOW // PLC_HOP + 2
    padded = b.op("Pad", [audio, b.i64([0, PLC_HOP, 0, PLC_HOP])], "padded", mode="constant")
    # Features in float64 as the reference (numpy rfft on float64 frames): the -120 dB floor of
    # exact zeros is relative to the smallest non-zero power, which float32 would not resolve.
    padded = b.op("Cast", [padded], to=TensorProto.DOUBLE)
    frames = overlapping_frames(b, padded, n_blocks, PLC_HOP, PLC_N_FFT)  # [B, 626, 512]
    power = dft_power(b, frames, PLC_N_FFT, "hamming", np.float64)  # [B, 626, 257]
    zero = b.const(0.0, np.float64)
    nonzero = b.op("Greater", [power, zero])
    smallest = b.op(
        "ReduceMin", [b.op("Where", [nonzero, power, b.const(np.inf, np.float64)])], axes=[1, 2], keepdims=1
    )
    floor = b.op(
        "Where",
        [b.op("IsInf", [smallest]), b.const(PLC_ALL_ZERO, np.float64),
         b.op("Mul", [smallest, b.const(PLC_ZERO_FLOOR, np.float64)])],
    )
    logp = b.op("Log", [b.op("Where", [nonzero, power, floor])])
    feat = b.op("Cast", [b.op("Div", [logp, b.const(20.0, np.float64)])], to=TensorProto.FLOAT)
    feat = b.op("Unsqueeze", [feat, b.i64([1])], out="plcmos_features")  # [B, 1, 626, 257]
    rename_input(branch.graph, branch.graph.input[0].name, feat)
    fwd, bwd = (o.name for o in branch.graph.output)
    head_nodes_start = len(b.nodes)
    a = b.op("Concat", [fwd, bwd], "audio_vector", axis=1)  # [B, 64]
    w = parts.w
    h = b.op("MatMul", [a, b.const(w["dense1.weight"][:, : parts.audio_dim].T, hint="dense1_audio")])
    # Stored as float16 (half the bytes); the rounding moves the mean score by < 1e-4 (measured, see record).
    rater_bias = b.op("Cast", [b.const(bias, np.float16, "rater_bias")], to=TensorProto.FLOAT)
    h = b.op("Add", [b.op("Unsqueeze", [h, b.i64([1])]), rater_bias])  # [B, K, 32]
    h = b.op("LeakyRelu", [h], alpha=0.1)
    for i in range(4):
        h = b.op("MatMul", [h, b.const(w[f"dense2.{i}.weight"].T, hint=f"dense2_{i}")])
        h = b.op("LeakyRelu", [b.op("Add", [h, b.const(w[f"dense2.{i}.bias"])])], alpha=0.1)
    o = b.op("Add", [b.op("MatMul", [h, b.const(w["dense3.weight"].T, hint="dense3")]), b.const(w["dense3.bias"])])
    mos = b.op("Add", [b.op("Mul", [b.op("Sigmoid", [o]), b.const(parts.scale)]), b.const(parts.offset)])
    b.op("ReduceMean", [mos], out="plcmos", axes=[1], keepdims=0)  # [B, K, 1] -> [B, 1]
    nodes = b.nodes[:head_nodes_start] + list(branch.graph.node) + b.nodes[head_nodes_start:]
    return finish(
        nodes,
        list(branch.graph.initializer) + b.inits,
        [helper.make_tensor_value_info(audio, TensorProto.FLOAT, ["batch", PLC_WINDOW])],
        [helper.make_tensor_value_info("plcmos", TensorProto.FLOAT, ["batch", 1])],
        "PLCMOS v2 (Microsoft, MIT licence), from speechmos 0.0.1.1; see LICENSE-speechmos.txt",
        metadata,
        "plcmos",
    )


# ------------------------------------------------------------ reference and checks


def load_audio(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz, as the monitor's offline loader does."""
    x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE)
    return np.asarray(x, dtype=np.float32)


def dnsmos_windows(audio: np.ndarray) -> np.ndarray:
    """The windows speechmos.dnsmos scores for one clip: tiled by doubling to >= 9.01 s, 1 s hops.

    Same arithmetic as the reference, quirk included: a window ends at
    int((i + 9.01) * 16000), which float rounding puts one sample short for
    i = 7..23 and 119..122 (i = 7: 256159), and the reference skips those.
    """
    while len(audio) < DNSMOS_WINDOW:
        audio = np.append(audio, audio)
    num_hops = int(np.floor(len(audio) / SAMPLE_RATE) - DNSMOS_INPUT_LENGTH) + 1
    windows = [
        audio[int(i * SAMPLE_RATE) : int((i + DNSMOS_INPUT_LENGTH) * SAMPLE_RATE)] for i in range(num_hops)
    ]
    return np.stack([w for w in windows if len(w) >= DNSMOS_WINDOW]).astype(np.float32)


def session(model: onnx.ModelProto | Path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the original PLCMOS graph declares a scalar output shape
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, audio: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([sess.run(None, {"audio": audio[i : i + batch]})[0] for i in range(0, len(audio), batch)])


def check_batch_axis(sess: ort.InferenceSession, window: int, width: int) -> float:
    """Rows are independent: a batch of 3 equals 3 single calls."""
    audio = (0.1 * np.random.default_rng(0).standard_normal((3, window))).astype(np.float32)
    (batched,) = sess.run(None, {"audio": audio})
    assert batched.shape == (3, width), batched.shape
    singles = np.concatenate([sess.run(None, {"audio": audio[i : i + 1]})[0] for i in range(3)])
    return float(np.max(np.abs(batched - singles)))


@contextlib.contextmanager
def wheel_on_path(wheel: Path):
    """Import the reference code from the wheel itself (not whatever speechmos is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        saved = {k: v for k, v in sys.modules.items() if k == "speechmos" or k.startswith("speechmos.")}
        for k in saved:
            del sys.modules[k]
        sys.path.insert(0, tmp)
        try:
            yield Path(tmp) / "speechmos"
        finally:
            sys.path.remove(tmp)
            for k in [k for k in sys.modules if k == "speechmos" or k.startswith("speechmos.")]:
                del sys.modules[k]
            sys.modules.update(saved)


def r6(x) -> float:
    return round(float(x), 6)


# ------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"{WHEEL_NAME} (default: pip download it)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "scoreq_live" / "bundled")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--record", type=Path, default=REPO_ROOT / "models" / "fidelity" / "diagnostic.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        wheel = args.wheel
        if wheel is None:
            wheel = fetch_wheel(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        wheel_bytes = wheel.read_bytes()
        with zipfile.ZipFile(wheel) as zf:
            files = {n: zf.read(n) for n in zf.namelist()}
        speechmos_dir = stack.enter_context(wheel_on_path(wheel))
        return build(args, wheel.name, wheel_bytes, files, speechmos_dir)


def build(args, wheel_name: str, wheel_bytes: bytes, files: dict[str, bytes], speechmos_dir: Path) -> int:
    import librosa

    originals = {
        "dnsmos": "speechmos/dnsmos_models/sig_bak_ovr.onnx",
        "personalized": "speechmos/pdnsmos_models/sig_bak_ovr.onnx",
        "p808": "speechmos/dnsmos_models/model_v8.onnx",
        "plcmos": "speechmos/plcmos_models/plcmos_v2.onnx",
    }
    provenance = {
        "wheel": wheel_name,
        "wheel_sha256": sha256_bytes(wheel_bytes),
        "original_sha256": {path.removeprefix("speechmos/"): sha256_bytes(files[path]) for path in originals.values()},
    }
    common = {
        "source": f"{wheel_name} (sha256 {provenance['wheel_sha256']}), Microsoft, MIT licence",
        "built_by": "models/build_diagnostic.py",
        "sample_rate": SAMPLE_RATE,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dnsmos_meta = {
        **common,
        "window_samples": DNSMOS_WINDOW,
        "input": f"audio: float32 [batch, {DNSMOS_WINDOW}], mono 16 kHz, 9.01 s, in [-1, 1]",
        "output": "scores: float32 [batch, 4] = SIG, BAK, OVRL (polynomial-fitted), P808_MOS",
    }
    paths = {
        "dnsmos": args.out_dir / "dnsmos.onnx",
        "personalized": args.out_dir / "dnsmos-personalized.onnx",
        "plcmos": args.out_dir / "plcmos.onnx",
    }
    onnx.save(
        dnsmos_model(files[originals["dnsmos"]], files[originals["p808"]], POLY_DNSMOS,
                     {**dnsmos_meta, "model": "DNSMOS P.835 sig_bak_ovr.onnx + P.808 model_v8.onnx"}),
        str(paths["dnsmos"]),
    )
    onnx.save(
        dnsmos_model(files[originals["personalized"]], files[originals["p808"]], POLY_PERSONALIZED,
                     {**dnsmos_meta,
                      "model": "personalized DNSMOS P.835 pdnsmos sig_bak_ovr.onnx + P.808 model_v8.onnx"}),
        str(paths["personalized"]),
    )
    parts = PlcParts(files[originals["plcmos"]])
    raters = plc_raters()
    bias = parts.rater_bias(raters)
    onnx.save(
        plcmos_model(parts, bias, {
            **common,
            "model": "PLCMOS v2 plcmos_v2.onnx",
            "window_samples": PLC_WINDOW,
            "input": f"audio: float32 [batch, {PLC_WINDOW}], mono 16 kHz, 10 s, in [-1, 1]",
            "output": "plcmos: float32 [batch, 1], mean over a fixed set of "
                      f"{PLC_RATERS} N(0, 1) rater embeddings (numpy default_rng({PLC_RATER_SEED}))",
        }),
        str(paths["plcmos"]),
    )
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    batch_diffs = {
        "dnsmos": check_batch_axis(sessions["dnsmos"], DNSMOS_WINDOW, 4),
        "personalized": check_batch_axis(sessions["personalized"], DNSMOS_WINDOW, 4),
        "plcmos": check_batch_axis(sessions["plcmos"], PLC_WINDOW, 1),
    }

    # ---- the reference: the wheel's own code
    dnsmos_mod = importlib.import_module("speechmos.dnsmos")
    plcmos_mod = importlib.import_module("speechmos.plcmos")
    ref_plc = plcmos_mod.PLCMOS()
    orig_plc = session(parts.audio_branch_model(), args.threads)
    draws = np.random.default_rng(PLC_EXPECTATION_SEED).standard_normal((PLC_EXPECTATION_DRAWS, PLC_EMBED_DIM))
    draws_bias = parts.rater_bias(draws)

    def plc_reference(x: np.ndarray, seed: int) -> dict:
        """The wheel's PLCMOS on x: as shipped (15 random rounds, seeded), its expectation, z = 0."""
        np.random.seed(seed)
        shipped = ref_plc(x)["plcmos"]
        feat = np.float32(ref_plc.stft_transform(x))[np.newaxis, np.newaxis, ...]
        z = np.random.default_rng(seed).standard_normal((4, PLC_EMBED_DIM)).astype(np.float32)
        outs = orig_plc.run(None, {"degraded_audio": np.repeat(feat, 4, 0), "rater_embed": z})
        a = np.concatenate(outs[1:], axis=1)
        # The head in numpy must reproduce the original graph for the same embeddings.
        decomposition = float(np.max(np.abs(parts.head(a[:1], parts.rater_bias(z))[0] - outs[0])))
        per_rater = parts.head(a[:1], draws_bias)[0]
        return {
            "shipped": float(shipped),
            "expectation": float(per_rater.mean()),
            "rater_std": float(per_rater.std()),
            "zero_embedding": float(parts.head(a[:1], parts.rater_bias(np.zeros((1, PLC_EMBED_DIM))))[0, 0]),
            "decomposition": decomposition,
            "features": feat[0, 0],
            "audio_vector": a[:1],
        }

    wavs = sorted(args.data.rglob("*.wav"))
    if not wavs:
        raise SystemExit(f"no .wav files under {args.data}")
    rows = []
    p808_reflect_diff = 0.0
    mel_diff = 0.0
    plc_feat_diff = 0.0
    decomposition = 0.0
    fp16_effect = 0.0
    rater_set_error = 0.0
    bias16 = bias.astype(np.float16).astype(np.float64)
    feat_model = onnx.utils.Extractor(onnx.load(str(paths["dnsmos"]))).extract_model(["audio"], ["p808_features"])
    feat_sess = session(feat_model, args.threads)
    plc_feat_model = onnx.utils.Extractor(onnx.load(str(paths["plcmos"]))).extract_model(["audio"], ["plcmos_features"])
    plc_feat_sess = session(plc_feat_model, args.threads)
    p808_sess = session(onnx.load_from_string(files[originals["p808"]]), args.threads)
    for index, path in enumerate(wavs):
        x = load_audio(path)
        rel = path.relative_to(args.data).as_posix()
        windows = dnsmos_windows(x)
        row = {"path": rel, "samples_16k": int(len(x)), "dnsmos_windows": len(windows)}
        for key, mode in (("dnsmos", "dnsmos"), ("personalized", "dnsmos_personalized")):
            ref = dnsmos_mod.run(x, SAMPLE_RATE, model_type=mode)
            ref_vals = [ref["sig_mos"], ref["bak_mos"], ref["ovrl_mos"], ref["p808_mos"]]
            ours = run_batched(sessions[key], windows).astype(np.float64).mean(axis=0)
            for name, r, o in zip(("sig", "bak", "ovrl", "p808"), ref_vals, ours):
                row[f"{key}_{name}_ref"] = r6(r)
                row[f"{key}_{name}_onnx"] = r6(o)
                row[f"{key}_{name}_abs_diff"] = float(abs(o - r))
        # Folded mel features vs librosa on the first window.
        seg = windows[0]
        mel_ref = dnsmos_mod.dnsmos.audio_melspec(seg[:-160]) if dnsmos_mod.dnsmos else None
        (mel_ours,) = feat_sess.run(None, {"audio": seg[None]})
        mel_diff = max(mel_diff, float(np.max(np.abs(mel_ours[0] - mel_ref))))
        # librosa < 0.10 centred with reflect padding: how much the P.808 MOS depends on it.
        mel_reflect = librosa.feature.melspectrogram(
            y=seg[:-160], sr=SAMPLE_RATE, n_fft=P808_N_FFT, hop_length=P808_HOP, n_mels=P808_N_MELS, pad_mode="reflect"
        )
        mel_reflect = ((librosa.power_to_db(mel_reflect, ref=np.max) + 40) / 40).T.astype(np.float32)
        p_const = p808_sess.run(None, {"input_1": mel_ref[None].astype(np.float32)})[0][0, 0]
        p_refl = p808_sess.run(None, {"input_1": mel_reflect[None]})[0][0, 0]
        p808_reflect_diff = max(p808_reflect_diff, float(abs(p_const - p_refl)))

        # PLCMOS on the file zero-padded to the window, and the reference on the unpadded file.
        if len(x) > PLC_WINDOW:
            raise SystemExit(f"{rel} is longer than the PLCMOS window")
        padded = np.pad(x, (0, PLC_WINDOW - len(x)))
        ref_padded = plc_reference(padded, seed=index)
        ref_unpadded = plc_reference(x, seed=index)
        (plc_ours,) = sessions["plcmos"].run(None, {"audio": padded[None]})
        (plc_feat,) = plc_feat_sess.run(None, {"audio": padded[None]})
        plc_feat_diff = max(plc_feat_diff, float(np.max(np.abs(plc_feat[0, 0] - ref_padded["features"]))))
        decomposition = max(decomposition, ref_padded["decomposition"], ref_unpadded["decomposition"])
        ours = float(plc_ours[0, 0])
        fixed = float(parts.head(ref_padded["audio_vector"], bias).mean())
        fixed16 = float(parts.head(ref_padded["audio_vector"], bias16).mean())
        fp16_effect = max(fp16_effect, abs(fixed16 - fixed))
        rater_set_error = max(rater_set_error, abs(fixed - ref_padded["expectation"]))
        row.update({
            "plcmos_ref_expectation": r6(ref_padded["expectation"]),
            "plcmos_ref_shipped_15_rounds": r6(ref_padded["shipped"]),
            "plcmos_ref_rater_std": r6(ref_padded["rater_std"]),
            "plcmos_ref_zero_embedding": r6(ref_padded["zero_embedding"]),
            "plcmos_onnx": r6(ours),
            "plcmos_abs_diff": abs(ours - ref_padded["expectation"]),
            "plcmos_abs_diff_shipped": abs(ours - ref_padded["shipped"]),
            "plcmos_ref_unpadded_expectation": r6(ref_unpadded["expectation"]),
            "plcmos_ref_unpadded_shipped_15_rounds": r6(ref_unpadded["shipped"]),
        })
        rows.append(row)
        print(
            f"{rel:44s} SIG {row['dnsmos_sig_onnx']:.3f} BAK {row['dnsmos_bak_onnx']:.3f} "
            f"OVRL {row['dnsmos_ovrl_onnx']:.3f} P808 {row['dnsmos_p808_onnx']:.3f} "
            f"PLCMOS {ours:.3f} (E {ref_padded['expectation']:.3f}, 15 rounds {ref_padded['shipped']:.3f})",
            flush=True,
        )

    def worst(key: str) -> float:
        return max(r[key] for r in rows)

    max_diffs = {
        f"{m}_{s}": worst(f"{m}_{s}_abs_diff")
        for m in ("dnsmos", "personalized")
        for s in ("sig", "bak", "ovrl", "p808")
    }
    max_diffs["plcmos_vs_expectation"] = worst("plcmos_abs_diff")
    shipped_spread = [abs(r["plcmos_ref_shipped_15_rounds"] - r["plcmos_ref_expectation"]) for r in rows]
    zero_gap = [abs(r["plcmos_ref_zero_embedding"] - r["plcmos_ref_expectation"]) for r in rows]
    record = {
        "models": "DNSMOS P.835, personalized DNSMOS P.835, DNSMOS P.808, PLCMOS v2",
        **provenance,
        "reference": "the wheel's own speechmos.dnsmos.run / speechmos.plcmos.PLCMOS on the same float32 arrays",
        "versions": {
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "librosa": importlib.metadata.version("librosa"),
            "numpy": np.__version__,
        },
        "opset": OPSET,
        "files_sha256": {p.name: sha256_bytes(p.read_bytes()) for p in paths.values()},
        "files_bytes": {p.name: p.stat().st_size for p in paths.values()},
        "inputs": {
            "dnsmos.onnx": {"audio": ["batch", DNSMOS_WINDOW]},
            "dnsmos-personalized.onnx": {"audio": ["batch", DNSMOS_WINDOW]},
            "plcmos.onnx": {"audio": ["batch", PLC_WINDOW]},
        },
        "outputs": {
            "dnsmos.onnx": {"scores": ["batch", 4], "columns": ["SIG", "BAK", "OVRL", "P808_MOS"]},
            "dnsmos-personalized.onnx": {"scores": ["batch", 4], "columns": ["SIG", "BAK", "OVRL", "P808_MOS"]},
            "plcmos.onnx": {"plcmos": ["batch", 1]},
        },
        "sample_rate": SAMPLE_RATE,
        "preprocessing": (
            'x, sr = soundfile.read(path, dtype="float32", always_2d=True); x = x.mean(axis=1); '
            "if sr != 16000: x = soxr.resample(x, sr, 16000); x = x.astype(float32). "
            "DNSMOS: reference speechmos.dnsmos.run(x, 16000) (tiles x by doubling to >= 9.01 s, averages "
            "9.01 s windows 1 s apart); ONNX: the same windows, scores averaged. "
            f"PLCMOS: x zero-padded at the end to {PLC_WINDOW} samples for both."
        ),
        "plcmos_raters": {
            "reference": f"mean over {PLC_REF_ROUNDS} rounds, each with np.random.normal(size=(1, 64)) as rater_embed",
            "onnx": f"mean over a fixed set of {PLC_RATERS} embeddings, "
                    f"numpy.random.default_rng({PLC_RATER_SEED}).standard_normal(({PLC_RATERS}, 64)); "
                    "the rater branch (embed_dense*) does not see the audio, so it is precomputed into "
                    "dense1's rater half plus bias ([K, 32]) and only the small head runs K times",
            "expectation": f"the reference's limit for many rounds: the original graph's audio vector with "
                           f"{PLC_EXPECTATION_DRAWS} other N(0, 1) embeddings (seed {PLC_EXPECTATION_SEED})",
            "max_abs_numpy_head_vs_original_graph": decomposition,
            "max_abs_shipped_15_rounds_vs_expectation": max(shipped_spread),
            "mean_abs_shipped_15_rounds_vs_expectation": float(np.mean(shipped_spread)),
            "max_rater_std": worst("plcmos_ref_rater_std"),
            "max_abs_zero_embedding_vs_expectation": max(zero_gap),
            "max_abs_fixed_set_vs_expectation_numpy_float64": rater_set_error,
            "max_abs_float16_storage_effect": fp16_effect,
        },
        "max_abs_diff": max_diffs,
        "max_abs_diff_p808_features_vs_librosa": mel_diff,
        "max_abs_diff_plcmos_features_vs_reference": plc_feat_diff,
        "max_abs_p808_librosa_constant_vs_reflect_padding": p808_reflect_diff,
        "max_abs_batch3_vs_single": batch_diffs,
        "target_max_abs_diff": MAX_ABS_TARGET,
        "files": rows,
    }
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("files_bytes", "max_abs_diff",
                                               "max_abs_diff_p808_features_vs_librosa",
                                               "max_abs_diff_plcmos_features_vs_reference",
                                               "max_abs_p808_librosa_constant_vs_reflect_padding",
                                               "max_abs_batch3_vs_single", "plcmos_raters")}, indent=1))
    ok = all(v <= MAX_ABS_TARGET for v in max_diffs.values())
    print(f"all within {MAX_ABS_TARGET}" if ok else f"NOT all within {MAX_ABS_TARGET}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
