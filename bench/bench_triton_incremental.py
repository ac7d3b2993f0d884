"""Incremental Distill-MOS through Triton against every window in full through Triton.

    python bench/bench_triton_incremental.py            # about 3 minutes on two cores
    python bench/bench_triton_incremental.py --quick    # a smoke run

A real Triton server (PyTriton's, see tests/triton_tools.py) serves ``distillmos`` and its streaming split
(``distillmos-cnn``, ``distillmos-head``) on loopback, each an onnxruntime session with one thread. A monitor
(the engine, ``--fast``) scores ``--streams`` streams of real speech through it two ways: incremental (the
feature caches here, CNN blocks and heads sent) and ``--no-incremental`` (every window sent to
``distillmos``). Rounds are interleaved (incremental, full, incremental, ...) and the ratio is taken round by
round. Reported: windows per second each way and their ratio, the bytes sent and received per window (the
inputs and outputs of every request, counted as they are made), the share of windows recomputed in full,
and the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoreq_live.bus import EventBus  # noqa: E402
from scoreq_live.core.events import ScoreEvent  # noqa: E402
from scoreq_live.engine import Engine, EngineConfig  # noqa: E402
from scoreq_live.scoring.catalogue import BUNDLED_DIR  # noqa: E402
from scoreq_live.scoring.load import LoadedScorer, ScoringOptions, load_scorer  # noqa: E402
from scoreq_live.scoring.triton import TritonModel  # noqa: E402
from scoreq_live.sources import open_inputs  # noqa: E402
from tests.triton_tools import TritonServer  # noqa: E402

MODELS = {
    "distillmos": (BUNDLED_DIR / "distillmos.onnx", "audio", "mos"),
    "distillmos-cnn": (BUNDLED_DIR / "distillmos-cnn.onnx", "audio+peak", "features"),
    "distillmos-head": (BUNDLED_DIR / "distillmos-head.onnx", "features", "mos"),
}


class Traffic:
    """Bytes of every request's inputs and of its output, counted on the models' ``infer_async``."""

    def __init__(self) -> None:
        self.sent = self.received = 0

    def watch(self, model: TritonModel) -> None:
        inner = model.infer_async

        async def counted(feeds: dict[str, np.ndarray]) -> np.ndarray:
            self.sent += sum(v.nbytes for v in feeds.values())
            out = await inner(feeds)
            self.received += out.nbytes
            return out

        model.infer_async = counted  # type: ignore[method-assign]


async def run(loaded: LoadedScorer, files: list[str], traffic: Traffic) -> tuple[float, dict[tuple, float], int]:
    """Seconds for the whole run, each window's score, windows scored."""
    bus = EventBus()
    sub = bus.subscribe()
    engine = Engine(loaded.scorer, open_inputs(files, fast=True),
                    EngineConfig(stream=loaded.stream, max_batch=4, fast=True), bus)
    t0 = time.perf_counter()
    await engine.run()
    took = time.perf_counter() - t0
    scores = {(e.stream, e.window): e.mos for e in [ev async for ev in sub]
              if isinstance(e, ScoreEvent) and e.mos is not None}
    return took, scores, len(scores)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.streams = 1, 2
    clips = [ROOT / "examples" / "clean.wav", ROOT / "examples" / "lyra3.wav"]
    files = [f"s{k}={clips[k % len(clips)]}" for k in range(args.streams)]
    rows: dict[str, list[float]] = {"incremental": [], "full": []}
    traffic = {k: Traffic() for k in rows}
    windows = {k: 0 for k in rows}
    scores: dict[str, dict[tuple, float]] = {}
    counts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tr") as home:
        server = TritonServer(MODELS, Path(home), delay_us=0)
        server.start()
        try:
            base = ScoringOptions(device="cpu", max_batch=4, backend=server.url("distillmos"), backend_timeout_s=600)
            loaded = {"incremental": load_scorer(base, fast=True),
                      "full": load_scorer(replace(base, incremental=False), fast=True)}
            assert loaded["incremental"].scorer.incremental is not None
            for key, ld in loaded.items():
                inc = getattr(ld.scorer, "remote_incremental", None)
                for m in [ld.scorer.model, *([inc.cnn, inc.head] if inc is not None else [])]:
                    traffic[key].watch(m)  # type: ignore[arg-type]
            for r in range(args.rounds):
                for key, ld in loaded.items():
                    took, got, n = asyncio.run(run(ld, files, traffic[key]))
                    rows[key].append(n / took)
                    windows[key] += n
                    scores[key] = got
                print(f"round {r + 1}: incremental {rows['incremental'][-1]:.2f} windows/s, "
                      f"full {rows['full'][-1]:.2f}", file=sys.stderr)
            counts = loaded["incremental"].scorer.incremental_counts
        finally:
            server.stop()
    ratio = [a / b for a, b in zip(rows["incremental"], rows["full"])]
    diff = max(abs(scores["incremental"][k] - scores["full"][k]) for k in scores["full"])
    report = {
        "streams": args.streams, "rounds": args.rounds,
        "windows_per_s": {k: statistics.median(v) for k, v in rows.items()},
        "incremental_vs_full": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)},
        "bytes_per_window": {k: {"sent": traffic[k].sent / windows[k], "received": traffic[k].received / windows[k]}
                             for k in rows},
        "recomputed_share": counts["recomputed"] / max(1, counts["windows"]),
        "counts": counts,
        "max_score_difference": diff,
    }
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
