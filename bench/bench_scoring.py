"""Scoring benchmark: time per window and engine throughput, as ratios to a baseline run in the same process.

    python bench/bench_scoring.py [--model distillmos] [--repeat 20] [--streams 4] [--device cpu] [--json out.json]

Baseline: a plain ``InferenceSession.run`` of one window (what a naive script
does).  Against it: the monitor's IO-binding path at batch 1 and batch 8, and
the whole engine (files played with --fast through sources, VAD, batching and
the event bus) as windows per second, i.e. how many live streams at a 1 s hop
this machine keeps up with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoreq_live.audio import load_audio  # noqa: E402
from scoreq_live.bus import EventBus  # noqa: E402
from scoreq_live.core.stream import StreamConfig  # noqa: E402
from scoreq_live.engine import Engine, EngineConfig  # noqa: E402
from scoreq_live.scoring.catalogue import resolve_model  # noqa: E402
from scoreq_live.scoring.scorer import Scorer  # noqa: E402
from scoreq_live.scoring.session import OnnxModel, session_options  # noqa: E402
from scoreq_live.sources import FileSource  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: first runs allocate and pick kernels
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def windows_of(spec, n: int) -> np.ndarray:
    speech = load_audio(ROOT / "examples" / "clean.wav")
    length = spec.input_samples or int(spec.default_window_s * spec.sample_rate)
    starts = np.linspace(0, speech.size - length, n).astype(int)
    return np.stack([speech[s:s + length] for s in starts]).astype(np.float32)


async def engine_run(scorer, streams: int, window_s: float) -> tuple[float, int, list[int]]:
    src = ROOT / "examples" / "clean.wav"
    sources = [FileSource(f"s{i}", src, fast=True) for i in range(streams)]
    cfg = EngineConfig(stream=StreamConfig(window_s=window_s, hop_s=1.0, model=scorer.name), max_batch=8, fast=True)
    bus = EventBus()
    engine = Engine(scorer, sources, cfg, bus)
    t0 = time.perf_counter()
    await engine.run()
    return time.perf_counter() - t0, engine.windows_run, list(engine.batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="distillmos")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    a = ap.parse_args()

    spec = resolve_model(a.model)
    model = OnnxModel(spec, device=a.device, threads=a.threads)
    spec = model.spec
    x8 = windows_of(spec, 8)
    x1 = x8[:1]

    plain = ort.InferenceSession(str(spec.file), sess_options=session_options(a.threads),
                                 providers=[model.provider])
    base = timed(lambda: plain.run(None, {spec.input_name: x1}), a.repeat)
    io1 = timed(lambda: model.run(x1), a.repeat)
    io8 = timed(lambda: model.run(x8), max(3, a.repeat // 4)) / 8

    scorer = Scorer(model, max_batch=8)
    wall, windows, batches = asyncio.run(engine_run(scorer, a.streams, spec.default_window_s))
    eng = wall / windows
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = [
        ("plain session.run, batch 1 (baseline)", base, 1.0),
        ("IO binding, batch 1", io1, io1 / base),
        ("IO binding, batch 8 (per window)", io8, io8 / base),
        (f"engine, {a.streams} streams --fast (per window)", eng, eng / base),
    ]
    print(f"model {spec.name} on {model.device} ({model.provider}), {os.cpu_count()} cores, "
          f"onnxruntime {ort.__version__}, window {spec.default_window_s:g}s")
    for name, t, r in rows:
        print(f"  {name:<44} {t * 1000:8.1f} ms/window   x{r:5.2f} of baseline")
    print(f"  engine: {windows} windows in {wall:.1f}s, batch sizes {sorted(set(batches))}; "
          f"keeps up with about {1 / eng:.1f} live streams at a 1 s hop")
    print(f"  peak RSS {rss_mb:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "model": spec.name, "device": model.device, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "ms_per_window": {n: round(t * 1000, 2) for n, t, _ in rows},
            "ratio_to_baseline": {n: round(r, 3) for n, _, r in rows},
            "live_streams_at_1s_hop": round(1 / eng, 2), "peak_rss_mb": round(rss_mb)}, indent=1))


if __name__ == "__main__":
    main()
