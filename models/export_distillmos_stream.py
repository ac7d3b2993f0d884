"""Export Distill-MOS as two graphs for exact streaming inference, and record their fidelity.

The monitor scores 7.68 s windows (122880 samples) every second, so
consecutive windows share 87 % of their audio, and most of Distill-MOS' time
goes into the CNN over the compressed STFT, whose receptive field along time
is small. Split at the CNN's output, the model can score that overlap once:

* ``<out-dir>/distillmos-cnn.onnx``: ``audio`` float32 [batch, samples]
  (samples dynamic, a multiple of 320) and ``peak`` float32 [batch, 1] ->
  ``features`` float32 [batch, samples / 320, 1024]. The block is divided by
  ``peak + 1e-8`` (the caller passes the peak of the *window* the block
  belongs to, so blocks of one window share its gain), reflect-padded at both
  ends exactly as the full model pads a window, and run through the CNN. The
  1024 values of a frame are the CNN's 256 channels x 4 frequency rows,
  channel-major, as distillmos flattens them; frames are the second axis so
  that a cache can slice them by time.
* ``<out-dir>/distillmos-head.onnx``: ``features`` float32 [batch, 384, 1024]
  (the 384 frames of one window) -> ``mos`` float32 [batch, 1]: input
  normalisation, 7-layer transformer, attention pooling and the linear head.

``head(cnn(window, max|window|))`` is the full model. Output frame ``F`` of a
block covers samples ``[320 F, 320 F + 320)`` and depends on samples
``[320 F - 1040, 320 F + 1200)``; the first 4 and the last 3 frames of a block
also depend on its edges (reflect padding of the STFT, zero padding of the
convolutions). So frames 4..380 of a window equal frames of any block that
holds them at least 4 frames from its start and 3 from its end, computed under
the same peak, and:

* frames 381..383 of a window are the last 3 frames of any block that ends
  where the window ends (the same end padding);
* frames 0..3 of a window are the first 4 frames of a block of 7 frames
  (2240 samples) that starts where the window starts.

``scoreq_live/scoring/streaming.py`` assembles windows from these pieces with
numpy slicing only (no torch). ``models/fidelity/distillmos-stream.json``
records, for streams made by joining every .wav under the data folder, each
window's MOS from that incremental path next to the full ``distillmos.onnx``
and (for each window) PyTorch's ``distillmos``.

Torch is needed for this export only. Install as for
``models/export_distillmos.py`` (whose classes this script imports), then run
from the repository root::

    .venv-export/bin/python models/export_distillmos_stream.py \\
        [--out-dir scoreq_live/bundled] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_distillmos as base  # noqa: E402  (stubs torchaudio, loads distillmos)

REPO_ROOT = base.REPO_ROOT
sys.path.insert(0, str(REPO_ROOT))
from scoreq_live.scoring import streaming  # noqa: E402

WINDOW = base.WINDOW
OPSET = base.OPSET
FRAME = 320  # samples per CNN output frame (STFT hop 160, time stride 2)
WINDOW_FRAMES = WINDOW // FRAME  # 384
MOS_TOLERANCE = 0.005
HOP = 16000  # the monitor's default hop


class DistillMosCnn(nn.Module):
    """Peak normalisation, compressed STFT and CNN of Distill-MOS on a block of any length.

    ``peak`` is the window's peak, passed in so that every block of a window
    is scaled as the full model scales the whole window.
    """

    def __init__(self, full: base.DistillMosExport) -> None:
        super().__init__()
        self.spectrum = full.spectrum
        self.cnn = full.cnn

    def forward(self, audio: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        x = audio / (peak + base.PEAK_EPS)  # the full model's x / (max|x| + 1e-8)
        feat = self.cnn(self.spectrum(x))  # [B, C, F, T]
        return torch.flatten(feat, 1, -2).permute(0, 2, 1)  # [B, T, C*F]


class DistillMosHead(nn.Module):
    """Everything after the CNN, on the 384 feature frames of one window (as DistillMosExport)."""

    def __init__(self, full: base.DistillMosExport) -> None:
        super().__init__()
        self.sqa = full.sqa

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        sqa = self.sqa
        h = sqa.norm_input(features.transpose(-1, -2)).transpose(-1, -2)
        h = sqa.transformer(h)
        h = sqa.norm_trans(h.transpose(-1, -2)).transpose(-1, -2)
        pool = sqa.pool
        att = pool.linear2(pool.activation(pool.linear1(h))).transpose(2, 1)
        att = F.softmax(att, dim=2)
        embedding = torch.bmm(att, h).squeeze(1)
        return 1 + 4 * sqa.sigmoid(pool.linear3(embedding))  # [B, 1]


def export_graph(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_name: str,
    dynamic_axes: dict,
    metadata: dict,
    fixed_output_dims: dict[int, int] | None = None,
) -> None:
    """Legacy (TorchScript) exporter, opset 17, doc strings stripped, metadata: as export_distillmos.export.

    ``fixed_output_dims`` names output axes whose size is fixed but which the
    exporter leaves symbolic (the flattened feature axis).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        node.doc_string = ""
    proto.graph.doc_string = ""
    for axis, size in (fixed_output_dims or {}).items():
        proto.graph.output[0].type.tensor_type.shape.dim[axis].dim_value = size
    proto.doc_string = "Distill-MOS (Microsoft, MIT licence); see LICENSE-distillmos.txt"
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


# ------------------------------------------------------------ checks


def check_graphs(cnn_sess, head_sess, full_sess, window: np.ndarray) -> dict:
    """Shapes on several lengths and batch sizes; head(cnn(window)) against the full graph."""
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        for frames in (7, 57, 100, WINDOW_FRAMES):
            audio = (0.1 * rng.standard_normal((batch, frames * FRAME))).astype(np.float32)
            peak = np.max(np.abs(audio), axis=1, keepdims=True)
            (feat,) = cnn_sess.run(None, {"audio": audio, "peak": peak})
            assert feat.shape == (batch, frames, 1024), feat.shape
    peak = np.max(np.abs(window))[None, None]
    (feat,) = cnn_sess.run(None, {"audio": window[None], "peak": peak})
    (mos_split,) = head_sess.run(None, {"features": feat})
    (mos_full,) = full_sess.run(None, {"audio": window[None]})
    # Interior frames of a block equal the window's frames; its edges match
    # the window's edges where the block shares that edge.
    block = window[-57 * FRAME :]
    (bfeat,) = cnn_sess.run(None, {"audio": block[None], "peak": peak})
    edge = window[: 7 * FRAME]
    (efeat,) = cnn_sess.run(None, {"audio": edge[None], "peak": peak})
    return {
        "split_vs_full_mos": float(abs(mos_split[0, 0] - mos_full[0, 0])),
        "end_block_interior_max_abs_diff": float(np.max(np.abs(bfeat[0, 4:] - feat[0, -53:]))),
        "end_block_first_frames_differ": bool(np.max(np.abs(bfeat[0, :4] - feat[0, -57:-53])) > 1e-3),
        "edge_block_max_abs_diff": float(np.max(np.abs(efeat[0, :4] - feat[0, :4]))),
    }


def make_streams(data: Path) -> dict[str, np.ndarray]:
    """Every .wav under the data folder, joined end to end into one stream per sub-folder."""
    streams: dict[str, list[np.ndarray]] = {}
    for path in sorted(data.rglob("*.wav")):
        streams.setdefault(path.relative_to(data).parts[0], []).append(base.load_audio(path))
    return {name: np.concatenate(parts) for name, parts in streams.items()}


def window_starts(n: int, hop: int = HOP) -> list[int]:
    """Full windows on the hop grid (the tail, shorter than a window, is not part of this check)."""
    return list(range(0, n - WINDOW + 1, hop))


def run_streams(scorer, streams: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Score all streams hop by hop, all streams in one call per hop, as the monitor would."""
    names = list(streams)
    starts = {k: window_starts(len(streams[k])) for k in names}
    caches = {k: streaming.StreamCache() for k in names}
    mos = {k: [] for k in names}
    totals: dict = {}
    for i in range(max(len(s) for s in starts.values())):
        active = [k for k in names if i < len(starts[k])]
        wins = [streams[k][starts[k][i] : starts[k][i] + WINDOW] for k in active]
        out, counters = scorer.score(wins, [starts[k][i] for k in active], [caches[k] for k in active])
        for k, m in zip(active, out):
            mos[k].append(float(m))
        streaming.merge_counters(totals, counters)
    totals["cache_nbytes"] = {k: caches[k].nbytes for k in names}
    return {k: np.array(v) for k, v in mos.items()}, totals


def full_scores(sess, stream: np.ndarray, starts: list[int], batch: int = 8) -> np.ndarray:
    wins = np.stack([stream[s : s + WINDOW] for s in starts])
    return np.concatenate([sess.run(None, {"audio": wins[i : i + batch]})[0][:, 0]
                           for i in range(0, len(wins), batch)])


def torch_scores(model, stream: np.ndarray, starts: list[int], batch: int = 8) -> np.ndarray:
    """distillmos' own forward on each window (one 122880-sample window: no segmenting)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            wins = np.stack([stream[s : s + WINDOW] for s in starts[i : i + batch]])
            out.append(model(torch.from_numpy(wins)).reshape(-1).numpy())
    return np.concatenate(out)


def timing_ab(full_sess, scorer, stream: np.ndarray, rounds: int) -> dict:
    """Seconds per window, full graph vs incremental, interleaved A/B over the same windows."""
    starts = window_starts(len(stream))
    a, b = [], []
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in starts:
            full_sess.run(None, {"audio": stream[s : s + WINDOW][None]})
        a.append((time.perf_counter() - t0) / len(starts))
        cache = streaming.StreamCache()
        t0 = time.perf_counter()
        rec = 0
        for s in starts:
            _, c = scorer.score([stream[s : s + WINDOW]], [s], [cache])
            rec += c["recomputed"] + c["fallback"]
        b.append((time.perf_counter() - t0) / len(starts))
        rates.append(rec / len(starts))
    return {
        "rounds": rounds,
        "windows_per_round": len(starts),
        "full_s_per_window_median": float(np.median(a)),
        "incremental_s_per_window_median": float(np.median(b)),
        "ratio_full_over_incremental": float(np.median(a) / np.median(b)),
        "recompute_rate": float(np.mean(rates)),
        "full_s_per_window": [round(v, 4) for v in a],
        "incremental_s_per_window": [round(v, 4) for v in b],
    }


# ------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "scoreq_live" / "bundled")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--record", type=Path, default=REPO_ROOT / "models" / "fidelity" / "distillmos-stream.json"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the checks")
    parser.add_argument("--timing-rounds", type=int, default=0,
                        help="interleaved A/B timing rounds at 1 thread (0: none)")
    parser.add_argument("--timing-seconds", type=float, default=60.0,
                        help="length of the stream excerpt timed")
    parser.add_argument("--no-torch-reference", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = base.distillmos.ConvTransformerSQAModel().eval()
    streams = make_streams(args.data)
    starts = {k: window_starts(len(v)) for k, v in streams.items()}
    torch_ref = {}
    if not args.no_torch_reference:  # distillmos as users run it (fast path on)
        torch_ref = {k: torch_scores(model, v, starts[k]) for k, v in streams.items()}

    torch.backends.mha.set_fastpath_enabled(False)  # the fused path does not trace
    full = base.DistillMosExport(model, "mos").eval()
    cnn, head = DistillMosCnn(full).eval(), DistillMosHead(full).eval()
    versions = {
        "distillmos": importlib.metadata.version("distillmos"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    meta = {
        "model": "Distill-MOS v7 (distill_mos_v7.pt)",
        "source": f"distillmos {versions['distillmos']} (Microsoft, MIT licence)",
        "exported_by": "models/export_distillmos_stream.py",
        "sample_rate": base.SAMPLE_RATE,
        "window_samples": WINDOW,
        "frame_samples": FRAME,
    }
    cnn_path = args.out_dir / "distillmos-cnn.onnx"
    head_path = args.out_dir / "distillmos-head.onnx"
    full_path = args.out_dir / "distillmos.onnx"
    export_graph(
        cnn,
        (torch.zeros(2, 57 * FRAME), torch.ones(2, 1)),
        cnn_path,
        ["audio", "peak"],
        "features",
        {"audio": {0: "batch", 1: "samples"}, "peak": {0: "batch"},
         "features": {0: "batch", 1: "frames"}},
        {**meta,
         "input": "audio: float32 [batch, samples], mono 16 kHz, samples a multiple of 320; "
         "peak: float32 [batch, 1], max|x| of the window the block belongs to",
         "output": "features: float32 [batch, samples / 320, 1024]; first 4 and last 3 frames "
         "depend on the block's edges (reflect padding as at a window's edges)"},
        fixed_output_dims={2: 1024},
    )
    export_graph(
        head,
        (torch.zeros(2, WINDOW_FRAMES, 1024),),
        head_path,
        ["features"],
        "mos",
        {"features": {0: "batch"}, "mos": {0: "batch"}},
        {**meta,
         "input": "features: float32 [batch, 384, 1024], distillmos-cnn.onnx on one window",
         "output": "mos: float32 [batch, 1], 1..5"},
    )

    sessions = {p: base.ort_session(p, args.threads) for p in (full_path, cnn_path, head_path)}
    full_sess, cnn_sess, head_sess = (sessions[p] for p in (full_path, cnn_path, head_path))
    longest = max(streams, key=lambda k: len(streams[k]))
    graph_checks = check_graphs(cnn_sess, head_sess, full_sess, streams[longest][:WINDOW])
    print(json.dumps(graph_checks, indent=1))

    # Torch check of the split itself (before ONNX): head(cnn) == full on a window.
    with torch.no_grad():
        w = torch.from_numpy(streams[longest][WINDOW : 2 * WINDOW][None].copy())
        split = head(cnn(w, torch.max(torch.abs(w), dim=1, keepdim=True).values))
        torch_split_diff = float(torch.max(torch.abs(split - full(w))))

    scorer = streaming.IncrementalDistillMos(full_sess, cnn_sess, head_sess)
    inc, counters = run_streams(scorer, streams)
    rows = []
    max_inc_full = max_inc_torch = max_full_torch = 0.0
    for name, stream in streams.items():
        ref = full_scores(full_sess, stream, starts[name])
        diff = np.abs(inc[name] - ref)
        max_inc_full = max(max_inc_full, float(diff.max()))
        row = {
            "stream": name,
            "seconds": round(len(stream) / base.SAMPLE_RATE, 3),
            "windows": len(starts[name]),
            "max_abs_diff_incremental_vs_full_onnx": float(diff.max()),
            "mean_abs_diff_incremental_vs_full_onnx": float(diff.mean()),
            "mos_full_onnx": [round(float(v), 6) for v in ref],
            "mos_incremental": [round(float(v), 6) for v in inc[name]],
        }
        if torch_ref:
            max_inc_torch = max(max_inc_torch, float(np.max(np.abs(inc[name] - torch_ref[name]))))
            max_full_torch = max(max_full_torch, float(np.max(np.abs(ref - torch_ref[name]))))
            row["mos_torch"] = [round(float(v), 6) for v in torch_ref[name]]
        rows.append(row)
        print(f"{name:10s} {row['seconds']:8.1f} s {row['windows']:4d} windows  "
              f"max |inc - full| {diff.max():.2e}  mean {diff.mean():.2e}")

    windows = counters["windows"]
    recompute_rate = (counters["recomputed"] + counters["fallback"]) / windows
    print(f"max |incremental - full ONNX| MOS: {max_inc_full:.2e} (limit {MOS_TOLERANCE})")
    if torch_ref:
        print(f"max |incremental - PyTorch| MOS: {max_inc_torch:.2e}; "
              f"max |full ONNX - PyTorch|: {max_full_torch:.2e}")
    print(f"torch head(cnn) vs full: {torch_split_diff:.2e}")
    print(f"counters: {json.dumps(counters)}  recompute rate {recompute_rate:.3f}")

    timings = {}
    if args.timing_rounds:
        one = {p: base.ort_session(p, 1) for p in (full_path, cnn_path, head_path)}
        timings = timing_ab(one[full_path],
                            streaming.IncrementalDistillMos(one[full_path], one[cnn_path], one[head_path]),
                            streams[longest][: int(args.timing_seconds * base.SAMPLE_RATE)],
                            args.timing_rounds)
        timings["stream"] = f"{longest}, first {args.timing_seconds:g} s"
        timings["threads"] = 1
        print(json.dumps({k: v for k, v in timings.items() if not isinstance(v, list)}, indent=1))

    record = {
        "model": "Distill-MOS v7, split into CNN and head for streaming",
        "distillmos_version": versions["distillmos"],
        "torch_version": versions["torch"],
        "onnx_version": versions["onnx"],
        "onnxruntime_version": versions["onnxruntime"],
        "exporter": "torch.onnx.export(dynamo=False), STFT as conv1d with float64 Hann-DFT basis",
        "opset": OPSET,
        "files_sha256": {p.name: base.sha256(p) for p in (cnn_path, head_path, full_path)},
        "inputs": {"distillmos-cnn.onnx": {"audio": ["batch", "samples"], "peak": ["batch", 1]},
                   "distillmos-head.onnx": {"features": ["batch", WINDOW_FRAMES, 1024]}},
        "outputs": {"distillmos-cnn.onnx": {"features": ["batch", "samples/320", 1024]},
                    "distillmos-head.onnx": {"mos": ["batch", 1]}},
        "window_samples": WINDOW,
        "hop_samples": HOP,
        "streams": "every .wav under the data folder, loaded as export_distillmos.load_audio does, "
        "joined end to end in sorted order, one stream per top-level folder; full windows only",
        "graph_checks": graph_checks,
        "torch_max_abs_diff_split_vs_full": torch_split_diff,
        "max_abs_diff_incremental_vs_full_onnx": max_inc_full,
        "max_abs_diff_incremental_vs_torch": max_inc_torch if torch_ref else None,
        "max_abs_diff_full_onnx_vs_torch": max_full_torch if torch_ref else None,
        "windows": windows,
        "recompute_rate": recompute_rate,
        "counters": counters,
        "timings": timings,
        "streams_detail": rows,
    }
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    if max_inc_full > MOS_TOLERANCE or not math.isfinite(max_inc_full):
        print("FIDELITY CHECK FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
