"""Export Distill-MOS (Microsoft, MIT licence) to ONNX and record its fidelity.

Distill-MOS is a compact no-reference speech-quality model: a CNN over a
compressed complex STFT, a 7-layer transformer, attention pooling and a
linear head that gives a MOS in 1..5 for one 7.68 s window of 16 kHz audio.
This script loads the pretrained weights shipped inside the ``distillmos``
wheel (no network) and writes:

* ``<out-dir>/distillmos.onnx``: ``audio`` float32 [batch, 122880] ->
  ``mos`` float32 [batch, 1];
* ``<out-dir>/distillmos-embedding.onnx``: ``audio`` float32 [batch, 122880]
  -> ``embedding`` float32 [batch, 200], the attention-pooled vector that the
  head (``1 + 4 * sigmoid(linear(embedding))``) turns into the MOS;
* ``models/fidelity/distillmos.json``: PyTorch vs ONNX scores and embeddings
  for every .wav under the data folder, checked by
  ``tests/test_bundled_model.py`` without torch.

Both graphs normalise each window to its peak (as distillmos does), so the
caller only resamples to 16 kHz, downmixes and zero-pads to 122880 samples.
``torch.stft`` is replaced by a conv1d with a Hann-windowed DFT basis built
in float64, which the legacy exporter turns into plain Conv/Pow ops that
match PyTorch closely (complex STFT does not export with it, and the dynamo
exporter's STFT is off by up to 0.012 MOS once |X|^0.3 amplifies it).

Torch is needed for this export only, never at run time. Install::

    python3 -m venv .venv-export
    .venv-export/bin/pip install -r models/requirements-export.txt
    .venv-export/bin/pip install --no-deps distillmos==0.9.1 xls-r-sqa==0.1.0

Run from the repository root::

    .venv-export/bin/python models/export_distillmos.py \\
        [--out-dir scoreq_live/bundled] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import soundfile
import soxr
import torch
import torch.nn.functional as F
from torch import nn

# distillmos imports torchaudio at module level, but only its CLI uses it;
# a stub lets the model import without the (large) torchaudio wheel.
sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
import distillmos  # noqa: E402
from distillmos import sqa as distillmos_sqa  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
WINDOW = distillmos_sqa.SEQ_LEN  # 122880 samples = 7.68 s
OPSET = 17
PEAK_EPS = 1e-8  # distillmos: x / (max|x| + 1e-8)
MAG_FLOOR = 1e-12  # distillmos: clip(|X|, 1e-12) ** 0.3 * X / clip(|X|, 1e-12)
MOS_TOLERANCE = 0.005
MOS_TARGET = 4e-4
PREPROCESSING = (
    'x, sr = soundfile.read(path, dtype="float32", always_2d=True); '
    "x = x.mean(axis=1); "
    'if sr != 16000: x = soxr.resample(x, sr, 16000)  # default quality "HQ"; '
    "x = x.astype(float32); "
    "ONNX input: x zero-padded at the end to 122880 samples, shape [1, 122880]; "
    "PyTorch reference: distillmos ConvTransformerSQAModel()(x[None]) on the unpadded x"
)


# ---------------------------------------------------------------- audio I/O


def load_audio(path: Path) -> np.ndarray:
    """Read a file as mono float32 at 16 kHz, as the monitor's offline loader does."""
    x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE)
    return np.asarray(x, dtype=np.float32)


def pad_window(x: np.ndarray) -> np.ndarray:
    """Zero-pad (at the end) a signal of at most one window to exactly WINDOW samples."""
    if len(x) > WINDOW:
        raise ValueError(f"{len(x)} samples is longer than one window ({WINDOW})")
    return np.pad(x, (0, WINDOW - len(x))).astype(np.float32)


# ------------------------------------------------------------ export model


class DftSpectrum(nn.Module):
    """Compressed complex STFT of distillmos, as a strided conv1d.

    Same framing as distillmos' ``_complex_compressed``: reflect-pad by
    (win - hop) / 2, periodic Hann window, n_fft = win = 320, hop = 160,
    no centring. Output [batch, 2 (re, im), 161, frames] with |X| compressed
    to |X|^0.3 and the phase kept.
    """

    def __init__(self, win_length: int, hop_length: int) -> None:
        super().__init__()
        self.hop_length = hop_length
        self.pad = (win_length - hop_length) // 2
        self.n_bins = win_length // 2 + 1
        # Basis in float64 so the only float32 rounding is the final cast;
        # (k * n) mod N keeps the angles exact for every bin.
        n = torch.arange(win_length, dtype=torch.float64)
        window = torch.hann_window(win_length, periodic=True, dtype=torch.float64)
        k = torch.arange(self.n_bins, dtype=torch.float64)
        angle = 2 * math.pi * torch.remainder(k[:, None] * n[None, :], win_length) / win_length
        real = window * torch.cos(angle)
        imag = -window * torch.sin(angle)  # e^{-j w n}, as torch.stft
        basis = torch.cat([real, imag], dim=0)[:, None, :]  # [2 * bins, 1, win]
        self.register_buffer("basis", basis.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[:, None, :], (self.pad, self.pad), mode="reflect")
        spec = F.conv1d(x, self.basis, stride=self.hop_length)  # [B, 2*bins, T]
        spec = torch.stack([spec[:, : self.n_bins], spec[:, self.n_bins :]], dim=1)
        # Same operation order as distillmos, so float32 rounding matches.
        mag = torch.sum(spec**2, dim=1, keepdim=True) ** 0.5
        mag = torch.clip(mag, MAG_FLOOR)
        return mag**0.3 * spec / mag


class DistillMosExport(nn.Module):
    """Distill-MOS on one fixed-length window, ready for the legacy ONNX exporter.

    Reuses the pretrained submodules of ``distillmos.ConvTransformerSQAModel``
    and differs from its forward only in the STFT (see ``DftSpectrum``) and
    in taking exactly one 122880-sample window per row (no segmenting).
    ``output`` selects the MOS or the attention-pooled embedding.
    """

    def __init__(self, model: distillmos.ConvTransformerSQAModel, output: str) -> None:
        super().__init__()
        if output not in ("mos", "embedding"):
            raise ValueError(output)
        self.output = output
        self.spectrum = DftSpectrum(model.cnn.win_length, model.cnn.hop_length)
        self.cnn = model.cnn.cnn
        self.sqa = model.transformer_pool_attn

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        # Peak normalisation per window, inside the model like distillmos.
        x = audio / (torch.max(torch.abs(audio), dim=1, keepdim=True).values + PEAK_EPS)
        feat = self.cnn(self.spectrum(x))  # [B, C, F, T]
        feat = torch.flatten(feat, 1, -2).permute(0, 2, 1)  # [B, T, C*F]

        sqa = self.sqa  # xls_r_sqa SingleLayerModel, unrolled to expose the pool
        h = sqa.norm_input(feat.transpose(-1, -2)).transpose(-1, -2)
        h = sqa.transformer(h)
        h = sqa.norm_trans(h.transpose(-1, -2)).transpose(-1, -2)
        pool = sqa.pool
        att = pool.linear2(pool.activation(pool.linear1(h))).transpose(2, 1)
        att = F.softmax(att, dim=2)
        embedding = torch.bmm(att, h).squeeze(1)  # [B, 200]
        if self.output == "embedding":
            return embedding
        return 1 + 4 * sqa.sigmoid(pool.linear3(embedding))  # [B, 1]


def head(model: distillmos.ConvTransformerSQAModel, embedding: torch.Tensor) -> torch.Tensor:
    """The PyTorch head that maps an embedding to the MOS."""
    sqa = model.transformer_pool_attn
    return 1 + 4 * sqa.sigmoid(sqa.pool.linear3(embedding))


def export(module: nn.Module, path: Path, output_name: str, metadata: dict) -> None:
    """Export with the legacy (TorchScript) exporter, dynamic batch, fixed length."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.zeros(2, WINDOW),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["audio"],
            output_names=[output_name],
            dynamic_axes={"audio": {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    # Drop per-node doc strings (source locations of the export machine).
    for node in proto.graph.node:
        node.doc_string = ""
    proto.graph.doc_string = ""
    proto.doc_string = "Distill-MOS (Microsoft, MIT licence); see LICENSE-distillmos.txt"
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def ort_session(path: Path, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ checks


def reference(model, x: np.ndarray) -> tuple[float, np.ndarray]:
    """MOS and pooled embedding from distillmos' own forward on the whole file.

    The embedding is the input of the head's linear layer, captured by a hook
    so the original code path is untouched.
    """
    captured = []
    hook = model.transformer_pool_attn.pool.linear3.register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            mos = model(torch.from_numpy(x)[None])
    finally:
        hook.remove()
    (embedding,) = captured  # one window per file: all files are <= 7.68 s
    return float(mos.reshape(-1)[0]), embedding[0].numpy()


def check_batch_axis(mos_sess, emb_sess) -> None:
    """The exported graphs must not have a batch size baked in."""
    rng = np.random.default_rng(0)
    for batch in (1, 3, 8):
        audio = (0.1 * rng.standard_normal((batch, WINDOW))).astype(np.float32)
        (mos,) = mos_sess.run(None, {"audio": audio})
        (emb,) = emb_sess.run(None, {"audio": audio})
        assert mos.shape == (batch, 1), mos.shape
        assert emb.shape[0] == batch, emb.shape
        # Rows are independent: batched scores equal single-row scores.
        (first,) = mos_sess.run(None, {"audio": audio[:1]})
        assert abs(float(first[0, 0]) - float(mos[0, 0])) < 1e-4


def time_per_window(fn, batch: int, repeats: int) -> float:
    """Median wall time per window (seconds) of fn(batch_audio)."""
    audio = (0.1 * np.random.default_rng(1).standard_normal((batch, WINDOW))).astype(np.float32)
    fn(audio)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(audio)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch


# ------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "scoreq_live" / "bundled")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--record", type=Path, default=REPO_ROOT / "models" / "fidelity" / "distillmos.json"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for timing")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = distillmos.ConvTransformerSQAModel().eval()  # weights from the wheel

    # The reference is distillmos as users run it (fused attention on), so
    # its scores are taken before the fast path is switched off for export.
    files = sorted(args.data.rglob("*.wav"))
    if not files:
        parser.error(f"no .wav files under {args.data}")
    refs = {}
    for path in files:
        x = load_audio(path)
        mos, embedding = reference(model, x)
        mos_padded, _ = reference(model, pad_window(x))
        refs[path] = (x, mos, embedding, mos_padded)
    silence_torch, _ = reference(model, np.zeros(WINDOW, np.float32))

    # The fused attention fast path does not trace; the unfused path does.
    torch.backends.mha.set_fastpath_enabled(False)
    versions = {
        "distillmos": importlib.metadata.version("distillmos"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    meta = {
        "model": "Distill-MOS v7 (distill_mos_v7.pt)",
        "source": f"distillmos {versions['distillmos']} (Microsoft, MIT licence)",
        "exported_by": "models/export_distillmos.py",
        "sample_rate": SAMPLE_RATE,
        "window_samples": WINDOW,
        "input": "audio: float32 [batch, 122880], mono 16 kHz, zero-padded; "
        "peak-normalised inside the model",
    }
    mos_path = args.out_dir / "distillmos.onnx"
    emb_path = args.out_dir / "distillmos-embedding.onnx"
    wrapped_mos = DistillMosExport(model, "mos").eval()
    wrapped_emb = DistillMosExport(model, "embedding").eval()
    export(wrapped_mos, mos_path, "mos", {**meta, "output": "mos: float32 [batch, 1], 1..5"})
    export(
        wrapped_emb,
        emb_path,
        "embedding",
        {**meta, "output": "embedding: float32 [batch, 200], attention-pooled, "
         "MOS = 1 + 4 * sigmoid(w . embedding + b)"},
    )
    mos_sess, emb_sess = ort_session(mos_path), ort_session(emb_path)
    check_batch_axis(mos_sess, emb_sess)
    embedding_dim = emb_sess.get_outputs()[0].shape[1]

    rows = []
    wrapper_diff = 0.0
    for path in files:
        x, mos_torch, emb_torch, mos_padded = refs[path]
        window = pad_window(x)[None]
        (mos_onnx,) = mos_sess.run(None, {"audio": window})
        (emb_onnx,) = emb_sess.run(None, {"audio": window})
        with torch.no_grad():
            # The head applied to the ONNX embedding must give the MOS.
            mos_head = float(head(model, torch.from_numpy(emb_onnx))[0, 0])
            wrapper_diff = max(
                wrapper_diff,
                abs(float(wrapped_mos(torch.from_numpy(window))[0, 0]) - mos_torch),
            )
        rows.append(
            {
                "path": path.relative_to(args.data).as_posix(),
                "samples_16k": int(len(x)),
                "mos_torch": round(mos_torch, 6),
                "mos_torch_zero_padded": round(mos_padded, 6),
                "mos_onnx": round(float(mos_onnx[0, 0]), 6),
                "abs_diff_mos": float(abs(float(mos_onnx[0, 0]) - mos_torch)),
                "mos_head_on_onnx_embedding": round(mos_head, 6),
                "abs_diff_head_on_onnx_embedding": abs(mos_head - mos_torch),
                "embedding_torch": [round(float(v), 6) for v in emb_torch],
                "embedding_max_abs_diff": float(np.max(np.abs(emb_onnx[0] - emb_torch))),
            }
        )

    (silence_onnx,) = mos_sess.run(None, {"audio": np.zeros((1, WINDOW), np.float32)})
    silence_onnx = float(silence_onnx[0, 0])
    max_mos = max(r["abs_diff_mos"] for r in rows)
    max_emb = max(r["embedding_max_abs_diff"] for r in rows)
    max_head = max(r.pop("abs_diff_head_on_onnx_embedding") for r in rows)
    max_pad = max(abs(r["mos_torch_zero_padded"] - r["mos_torch"]) for r in rows)

    print(f"{'file':44s} {'torch':>8s} {'onnx':>8s} {'|dMOS|':>9s} {'|dEmb|':>9s}")
    for r in rows:
        print(
            f"{r['path']:44s} {r['mos_torch']:8.4f} {r['mos_onnx']:8.4f} "
            f"{r['abs_diff_mos']:9.2e} {r['embedding_max_abs_diff']:9.2e}"
        )
    print(f"files: {len(rows)}  embedding dim: {embedding_dim}  opset: {OPSET}")
    print(
        f"max |ONNX - PyTorch| MOS:        {max_mos:.2e} "
        f"(limit {MOS_TOLERANCE}, target {MOS_TARGET})"
    )
    print(f"max |ONNX - PyTorch| embedding:  {max_emb:.2e}")
    print(f"max |head(ONNX emb) - PyTorch|:  {max_head:.2e}")
    print(f"max |wrapper - distillmos| (torch, no fast path): {wrapper_diff:.2e}")
    print(f"max |unpadded - zero-padded| distillmos MOS: {max_pad:.2e}")
    print(f"silence: PyTorch {silence_torch:.4f}  ONNX {silence_onnx:.4f}")

    timings = {}
    if not args.no_timing:
        for batch in (1, 8):
            timings[f"onnxruntime_cpu_batch{batch}_s_per_window"] = time_per_window(
                lambda a: mos_sess.run(None, {"audio": a}), batch, 10 if batch == 1 else 3
            )
        torch.backends.mha.set_fastpath_enabled(True)  # distillmos as users run it
        with torch.no_grad():
            for batch in (1, 8):
                timings[f"torch_cpu_batch{batch}_s_per_window"] = time_per_window(
                    lambda a: model(torch.from_numpy(a)), batch, 10 if batch == 1 else 3
                )
        timings["threads"] = args.threads
        for key, value in timings.items():
            print(f"{key}: {value * 1000:.1f} ms" if "_s_" in key else f"{key}: {value}")

    record = {
        "model": "Distill-MOS v7",
        "distillmos_version": versions["distillmos"],
        "torch_version": versions["torch"],
        "onnx_version": versions["onnx"],
        "onnxruntime_version": versions["onnxruntime"],
        "exporter": "torch.onnx.export(dynamo=False), STFT as conv1d with float64 Hann-DFT basis",
        "opset": OPSET,
        "files_sha256": {p.name: sha256(p) for p in (mos_path, emb_path)},
        "inputs": {"audio": ["batch", WINDOW]},
        "outputs": {"mos": ["batch", 1], "embedding": ["batch", embedding_dim]},
        "sample_rate": SAMPLE_RATE,
        "window_samples": WINDOW,
        "preprocessing": PREPROCESSING,
        "embedding_dim": embedding_dim,
        "max_abs_diff_mos": max_mos,
        "max_abs_diff_embedding": max_emb,
        "max_abs_diff_head_on_onnx_embedding": max_head,
        "distillmos_zero_pads_short_input": max_pad == 0.0,
        "max_abs_diff_unpadded_vs_zero_padded": max_pad,
        "silence_mos_torch": silence_torch,
        "silence_mos_onnx": silence_onnx,
        "timings": timings,
        "files": rows,
    }
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")

    ok = max_mos <= MOS_TOLERANCE and math.isfinite(silence_onnx) and max_head <= MOS_TOLERANCE
    if not ok:
        print("FIDELITY CHECK FAILED", file=sys.stderr)
        return 1
    if max_mos > MOS_TARGET:
        print(f"warning: max |dMOS| {max_mos:.2e} is above the target {MOS_TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
