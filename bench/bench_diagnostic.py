"""Cost of the bundled DNSMOS and PLCMOS graphs per window, as ratios to Distill-MOS.

    python bench/bench_diagnostic.py             # about a minute
    python bench/bench_diagnostic.py --rounds 10 --threads 1

Each graph runs on one window of real speech (batch 1, onnxruntime on the
CPU, ``--threads`` intra-op threads). Rounds are interleaved (distillmos,
dnsmos, distillmos, personalized, distillmos, plcmos, ... ), each model's time
in a round being the median of ``--repeats`` runs, and every ratio is taken
against the Distill-MOS measurement just before it, so a change in machine
load hits both sides of a ratio alike. Medians over rounds are reported, with
the spread (min..max) of the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.helpers import DATA, speech_16k  # noqa: E402

BUNDLED = ROOT / "scoreq_live" / "bundled"
MODELS = {  # file: window in samples at 16 kHz
    "distillmos.onnx": 122880,
    "dnsmos.onnx": 144160,
    "dnsmos-personalized.onnx": 144160,
    "plcmos.onnx": 160000,
}
BASELINE = "distillmos.onnx"


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def window(speech: np.ndarray, n: int) -> np.ndarray:
    return np.resize(speech, n).astype(np.float32)[None]


def timed(sess: ort.InferenceSession, audio: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {"audio": audio})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs per model per round (median taken)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    speech = speech_16k(DATA / "scoreq" / "ref.wav")
    sessions = {name: session(BUNDLED / name, args.threads) for name in MODELS}
    inputs = {name: window(speech, n) for name, n in MODELS.items()}
    for name, sess in sessions.items():  # warm-up
        sess.run(None, {"audio": inputs[name]})

    times: dict[str, list[float]] = {name: [] for name in MODELS}
    ratios: dict[str, list[float]] = {name: [] for name in MODELS if name != BASELINE}
    for _ in range(args.rounds):
        for name in ratios:  # A B A C A D
            base = timed(sessions[BASELINE], inputs[BASELINE], args.repeats)
            own = timed(sessions[name], inputs[name], args.repeats)
            times[BASELINE].append(base)
            times[name].append(own)
            ratios[name].append(own / base)

    result = {
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "onnxruntime": ort.__version__,
        "machine": platform.processor() or platform.machine(),
        "batch": 1,
        "s_per_window": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_distillmos": {name: statistics.median(r) for name, r in ratios.items()},
        "ratio_spread": {name: [min(r), max(r)] for name, r in ratios.items()},
    }
    print(f"{'model':28s} {'window s':>8s} {'ms/window':>10s} {'x distillmos':>13s} {'spread':>14s}")
    for name, n in MODELS.items():
        ms = result["s_per_window"][name] * 1000
        if name == BASELINE:
            print(f"{name:28s} {n / 16000:8.2f} {ms:10.1f} {1.0:13.2f}")
        else:
            lo, hi = result["ratio_spread"][name]
            print(f"{name:28s} {n / 16000:8.2f} {ms:10.1f} {result['ratio_to_distillmos'][name]:13.2f} "
                  f"{lo:6.2f}..{hi:<6.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
