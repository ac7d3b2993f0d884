"""Scoring through Triton Inference Server against scoring locally: the round-trip overhead per window.

    python bench/bench_triton.py            # about 2 minutes on two cores
    python bench/bench_triton.py --quick    # a smoke run

A real Triton server (PyTriton's, from its own virtual environment, see tests/triton_tools.py) serves the
bundled Distill-MOS on loopback, an onnxruntime session with one thread inside its Python callable; the
local side is the same ONNX file in scoreq-live's own session, also with one thread, so both compute the
same thing at the same speed and the difference is what going through Triton adds: serialising the batch,
gRPC (or HTTP) on loopback, Triton's scheduler and dynamic batcher queue (``--delay-us``, default 0 here),
and PyTriton's hand-over to its Python process.  A production repository (``models triton-repo``) runs the
ONNX Runtime backend inside Triton instead, without that last hand-over.

Rounds are interleaved (local, gRPC, HTTP, local, ...) so that the machine's other load falls on all
alike; each reports the median over rounds of the seconds per batch, per window, and the overhead per
window (remote minus local, round by round).  Real speech windows (examples/clean.wav), batch sizes 1 and 8.
Distill-MOS takes ~170 ms a window on one thread here, which varies by more than the overhead from round to
round, so a second model with the same input and output but almost no computation (tests/tiny_models.py,
one strided convolution) shows the transport alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoreq_live.audio import load_audio  # noqa: E402
from scoreq_live.scoring.catalogue import BUNDLED_DIR, resolve_model  # noqa: E402
from scoreq_live.scoring.session import OnnxModel  # noqa: E402
from scoreq_live.scoring.triton import TritonModel  # noqa: E402
from tests.triton_tools import TritonServer  # noqa: E402


def windows(n: int) -> np.ndarray:
    x = load_audio(ROOT / "examples" / "clean.wav")
    hop = (x.size - 122_880) // max(1, n)
    return np.stack([x[k * hop:k * hop + 122_880] for k in range(n)]).astype(np.float32)


async def measure(args: argparse.Namespace, server: TritonServer, name: str) -> dict[str, object]:
    spec = resolve_model("distillmos")
    if name != "distillmos":
        spec = spec.with_file(server.models[name][0])
    local = OnnxModel(spec, device="cpu", threads=1)
    grpc = TritonModel(spec, server.url(name), timeout_s=60)
    http = TritonModel(spec, server.url(name, "triton+http"), timeout_s=60)
    sides = {"local": None, "grpc": grpc, "http": http}
    report: dict[str, object] = {}
    for size in args.sizes:
        batch = windows(size)
        want = local.run(batch)
        for m in (grpc, http):  # warm up, and check that both sides compute the same
            got = await m.run_async(batch)
            assert np.abs(got - want).max() < 1e-5, "Triton and local scores differ"
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for side, m in sides.items():
                t0 = time.perf_counter()
                if m is None:
                    local.run(batch)
                else:
                    await m.run_async(batch)
                times[side].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row: dict[str, object] = {k: {"batch_s": round(v, 5), "per_window_ms": round(v / size * 1000, 2)}
                                  for k, v in med.items()}
        for k in ("grpc", "http"):
            # Overhead per window of each round against the local run of the same round, then the median.
            over = [(r - loc) / size * 1000 for r, loc in zip(times[k], times["local"])]
            row[f"{k}_overhead_ms_per_window"] = round(statistics.median(over), 2)
            row[f"{k}_overhead_ms_per_window_iqr"] = [round(q, 2) for q in np.percentile(over, [25, 75])]
        report[f"batch_{size}"] = row
        print(f"{name} batch {size}: local {med['local'] / size * 1000:.1f} ms/window, "
              f"gRPC {med['grpc'] / size * 1000:.1f} ms/window (+{row['grpc_overhead_ms_per_window']} ms), "
              f"HTTP {med['http'] / size * 1000:.1f} ms/window (+{row['http_overhead_ms_per_window']} ms)",
              flush=True)
    await grpc.aclose()
    await http.aclose()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--delay-us", type=int, default=0, help="Triton's max_queue_delay_microseconds (default 0)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.sizes = 3, [1]
    with tempfile.TemporaryDirectory(prefix="tr") as home:
        from tests.tiny_models import build

        tiny = build(Path(home) / "tiny.onnx", fixed=122_880, input_name="audio", output_name="mos")
        server = TritonServer({"distillmos": (BUNDLED_DIR / "distillmos.onnx", "audio", "mos"),
                               "transport": (tiny, "audio", "mos")}, Path(home), delay_us=args.delay_us)
        server.start()
        report: dict[str, object] = {}
        try:
            for name in ("transport", "distillmos"):
                report[name] = asyncio.run(measure(args, server, name))
        finally:
            server.stop()
    report["rounds"] = args.rounds
    report["delay_us"] = args.delay_us
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
