"""``scoreq-live bench``: how many streams this machine scores, measured against baselines in the same run.

Five measurements of one model on one device of this machine (a local ONNX session: the bare and naive
baselines run the model file themselves, so a ``--backend`` server is refused):

- **bare**: the model alone, ``session.run`` on ready windows in the monitor's batch sizes;
- **naive**: what a script does (a session with default options, one run per window per stream);
- **engine**: the whole monitor (``--fast``, N streams of real speech through sources, resampling, the
  speech gate, windows, batching, events);
- **host**: the monitor with a scorer that returns at once, i.e. everything but the model, as streams per
  CPU core at the hop (batches of up to 16, as an ingest monitor sending to an inference server runs);
- **capacity**: live streams (real-time paced, start times spread over a hop) sustained with the 99th
  percentile latency within the budget and at most 1 % of windows thinned.

bare, naive and engine run interleaved (bare naive engine, bare naive engine, ...) and ratios are taken
round by round, so a change in machine load hits each side of a ratio alike; medians and the spread are
reported.  Then memory per stream and a simulated soak (host side, ``--soak-s`` seconds of 50 streams,
resident memory sampled throughout) check for growth.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr

from scoreq_live.audio import examples_dir, load_audio
from scoreq_live.bus import EventBus
from scoreq_live.core import SAMPLE_RATE
from scoreq_live.core.events import ScoreEvent
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.errors import ConfigError
from scoreq_live.scoring.load import LoadedScorer, ScoringOptions, load_scorer
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.sources.base import Source

if TYPE_CHECKING:
    from scoreq_live.scoring.session import OnnxModel

LIVE_RATE = 48_000  # bench streams arrive at 48 kHz (WebRTC, sound devices), so the host side resamples
BLOCK_S = 0.02  # and in 20 ms blocks, as RTP and WebRTC deliver them
# The host side is measured as an ingest monitor that sends its windows to an inference server runs it: batches of
# up to 16 (the model's own batch sizes are a property of the model on this device, measured with it).
HOST_BATCH = 16

GOALS = {
    "engine_vs_bare": ("engine throughput / bare session.run", ">=", 0.9),
    "capacity_vs_naive": ("live capacity / naive loop", ">=", 2.0),
    "host_streams_per_core": ("host side, streams per core", ">=", 2000.0),
    "mb_per_stream": ("memory per stream, MB", "<=", 1.0),
    "soak_rss_growth": ("resident memory growth over the soak", "<=", 0.05),
}

NOT_LOCAL = ("bench measures scoring on this machine (the model file in a local session) and cannot use "
             "--backend; measure a Triton server with its own perf_analyzer")


def rss_mb() -> float:
    """Resident memory of this process now, in MB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ClipSource(Source):
    """Real speech from memory, looped to ``duration_s``, in 20 ms blocks at 48 kHz.

    Live: each block is released when the wall clock reaches it (after ``delay_s``); ``fast``: at once.
    """

    kind = "bench"

    def __init__(self, name: str, clip48: np.ndarray, duration_s: float, fast: bool, delay_s: float = 0.0,
                 offset: int = 0) -> None:
        super().__init__(name, "bench speech")
        self.clip = clip48
        self.duration_s = duration_s
        self.fast = fast
        self.delay_s = delay_s
        self.offset = offset % clip48.size
        self.rate = LIVE_RATE
        self.channels = 1

    async def frames(self) -> AsyncIterator[np.ndarray]:
        block = int(LIVE_RATE * BLOCK_S)
        total = int(self.duration_s * LIVE_RATE) // block * block
        clip, size = self.clip, self.clip.size  # shared by every stream: a copy each would be the memory measured
        loop = asyncio.get_running_loop()
        if self.delay_s > 0 and not self.fast:
            await asyncio.sleep(self.delay_s)
        t0 = loop.time()
        pos = self.offset
        for sent in range(0, total, block):
            if self.fast:
                if sent % (block * 50) == 0:
                    await asyncio.sleep(0)
            else:
                delay = t0 + (sent + block) / LIVE_RATE - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            end = pos + block
            yield clip[pos:end] if end <= size else np.concatenate((clip[pos:], clip[:end - size]))
            pos = end % size


class NullScorer:
    """A scorer that returns at once: the engine measured without the model."""

    def score(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        return np.full(len(windows), 3.0)


@dataclass
class EngineRun:
    wall_s: float
    cpu_s: float
    windows_run: int
    scored: int
    overloaded: int
    latencies_ms: list[float]
    peak_rss_mb: float
    budget_s: float
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (fraction done, MB)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else 0.0


async def run_engine(scorer: Any, sources: Sequence[Source], stream: StreamConfig, max_batch: int, fast: bool,
                     sample_every_s: float = 0.25, progress: Callable[[Engine], float] | None = None,
                     keep_latencies: bool = True) -> EngineRun:
    """Run sources through the engine; count what it did and sample resident memory while it runs.

    ``progress``: what fraction of the run is done (recorded with each memory sample).  Without
    ``keep_latencies`` nothing grows with the run (the soak must not measure its own records).
    """
    bus = EventBus()
    sub = bus.subscribe(maxsize=1_000_000 if keep_latencies else 1024, name="bench")
    engine = Engine(scorer, sources, EngineConfig(stream=stream, max_batch=max_batch, fast=fast), bus)
    latencies: list[float] = []
    counts = {"scored": 0, "overloaded": 0}
    samples: list[tuple[float, float]] = []
    peak = rss_mb()

    async def read() -> None:
        async for ev in sub:
            if isinstance(ev, ScoreEvent):
                if ev.value is not None:
                    counts["scored"] += 1
                    if keep_latencies:
                        latencies.append(ev.latency_ms)
                elif ev.reason == "overloaded":
                    counts["overloaded"] += 1

    async def sample() -> None:
        nonlocal peak
        while True:
            await asyncio.sleep(sample_every_s)
            now = rss_mb()
            peak = max(peak, now)
            samples.append((progress(engine) if progress else 0.0, now))

    reader = asyncio.create_task(read())
    sampler = asyncio.create_task(sample())
    c0, t0 = time.process_time(), time.perf_counter()
    await engine.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sampler.cancel()
    await reader
    return EngineRun(wall, cpu, engine.windows_run, counts["scored"], counts["overloaded"], latencies,
                     max(peak, rss_mb()), engine.latency_budget, samples)


def speech_clip() -> np.ndarray:
    """The bundled clean speech recording at 48 kHz (the host side resamples it, as for a live input)."""
    x16 = load_audio(examples_dir() / "clean.wav")
    return soxr.resample(x16, SAMPLE_RATE, LIVE_RATE).astype(np.float32)


def windows_of(clip48: np.ndarray, window_s: float, hop_s: float, n: int) -> list[np.ndarray]:
    x = soxr.resample(clip48, LIVE_RATE, SAMPLE_RATE).astype(np.float32)
    length, hop = int(round(window_s * SAMPLE_RATE)), int(round(hop_s * SAMPLE_RATE))
    reps = int(np.ceil((length + hop * n) / x.size)) + 1
    x = np.tile(x, reps)
    return [x[i * hop:i * hop + length].copy() for i in range(n)]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class BenchOptions:
    rounds: int = 5
    windows: int = 16  # per round, for bare / naive / engine
    streams: int = 4  # engine --fast streams
    host_streams: int = 200
    host_s: float = 20.0
    capacity_s: float = 12.0  # seconds of scoring per capacity trial, after the first window fills
    capacity_trials: int = 4
    incremental_s: float = 20.0  # seconds of audio per stream in the incremental-vs-full rounds
    soak_streams: int = 50
    soak_s: float = 3600.0
    memory_streams: int = 200


def _say(msg: str) -> None:
    print(msg, flush=True)


def load_bench_scorer(opts: ScoringOptions) -> LoadedScorer:
    """The scorer to bench: the model on this machine (``--backend`` is refused before anything loads)."""
    if opts.backend:
        raise ConfigError(NOT_LOCAL)
    if opts.extra_models:
        raise ConfigError("bench measures one model at a time: give one --model (run it once per model)")
    return load_scorer(opts)


def local_model(scoring: LoadedScorer) -> OnnxModel:
    """The local ONNX session a bench measures (its file is what the bare and naive baselines run)."""
    from scoreq_live.scoring.session import OnnxModel

    if not isinstance(scoring.model, OnnxModel):
        raise ConfigError(NOT_LOCAL)
    return scoring.model


def bench(scoring: LoadedScorer, opts: BenchOptions, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run every measurement for a scorer loaded on this machine (:func:`load_bench_scorer`); the report."""
    import onnxruntime as ort

    from scoreq_live.scoring.session import session_options

    model, scorer, stream = local_model(scoring), scoring.scorer, scoring.stream
    spec = model.spec
    plan = scorer.plan
    clip = speech_clip()
    hop = stream.hop_s
    windows = windows_of(clip, stream.window_s, hop, opts.windows)
    padded = [np.stack([w]) for w in windows]
    name = spec.input_name
    providers = [model.provider] if model.provider == "CPUExecutionProvider" else [model.provider,
                                                                                  "CPUExecutionProvider"]
    bare_session = ort.InferenceSession(str(spec.file), session_options(model.threads), providers=providers)
    naive_session = ort.InferenceSession(str(spec.file), providers=providers)  # a script's default options
    batch = np.concatenate(padded)

    def bare() -> float:
        t0 = time.perf_counter()
        k = 0
        for size in plan.split(len(windows)):
            bare_session.run(None, {name: batch[k:k + size]})
            k += size
        return len(windows) / (time.perf_counter() - t0)

    naive_out: list[float] = []

    def naive() -> float:
        naive_out.clear()
        t0 = time.perf_counter()
        for x in padded:
            naive_out.append(float(np.ravel(naive_session.run(None, {name: x})[0])[0]))
        return len(windows) / (time.perf_counter() - t0)

    per_stream = max(1, opts.windows // opts.streams)
    engine_s = stream.window_s + (per_stream - 1) * hop + 0.01

    long_counts: dict[str, Any] = {"windows": 0, "incremental": 0, "recomputed": 0, "fallback": 0, "reasons": {}}

    def engine_with(which: Scorer, seconds: float, counted: bool = False) -> Callable[[], float]:
        def engine() -> float:
            sources = [ClipSource(f"s{i}", clip, seconds, fast=True, offset=i * 7919 * 48)
                       for i in range(opts.streams)]
            before = {**which.incremental_counts, "reasons": dict(which.incremental_counts["reasons"])}
            r = asyncio.run(run_engine(which, sources, stream, which.max_batch, fast=True))
            if counted:  # how the incremental scorer computed these windows
                after = which.incremental_counts
                for k in ("windows", "incremental", "recomputed", "fallback"):
                    long_counts[k] += after[k] - before[k]
                for k, v in after["reasons"].items():
                    long_counts["reasons"][k] = long_counts["reasons"].get(k, 0) + v - before["reasons"].get(k, 0)
            return r.windows_run / r.wall_s
        return engine

    runs: list[tuple[str, Callable[[], float]]] = [("bare", bare), ("naive", naive),
                                                   ("engine", engine_with(scorer, engine_s))]
    # With incremental scoring (the default for Distill-MOS): the same engine on longer streams (a stream's
    # first window is always computed in full), against the same engine scoring every window in full.
    full_scorer = Scorer(scorer.model, scorer.reference, plan=scorer.plan) if scorer.incremental else None
    if full_scorer is not None:
        long_s = stream.window_s + opts.incremental_s
        runs += [("engine_long", engine_with(scorer, long_s, counted=True)),
                 ("engine_full", engine_with(full_scorer, long_s))]
    for _, f in runs:  # warm: first runs of each session and the engine's imports
        f()
    long_counts.update(windows=0, incremental=0, recomputed=0, fallback=0, reasons={})
    rows: dict[str, list[float]] = {key: [] for key, _ in runs}
    say(f"bench: {opts.rounds} interleaved rounds of {len(windows)} windows ({', '.join(rows)} x{opts.streams})")
    for r in range(opts.rounds):
        for key, f in runs:
            rows[key].append(f())
        say(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()) + " windows/s")
    engine_vs_bare = [e / b for e, b in zip(rows["engine"], rows["bare"])]
    incremental = _incremental_report(scorer, windows, hop, rows, long_counts) if full_scorer else None
    naive_vs_bare = [n / b for n, b in zip(rows["naive"], rows["bare"])]

    # Equal accuracy: the monitor's scores of these windows against the naive loop's.
    ours = scorer.embed(windows)[:, 0]
    accuracy = float(np.max(np.abs(ours - np.array(naive_out)))) if spec.kind == "mos" else None

    say(f"host side: {opts.host_streams} streams x {opts.host_s:g}s of 48 kHz speech, no model")
    host_sources = [ClipSource(f"h{i}", clip, opts.host_s, fast=True, offset=i * 4801)
                    for i in range(opts.host_streams)]
    host = asyncio.run(run_engine(NullScorer(), host_sources, stream, HOST_BATCH, fast=True))
    host_per_core = opts.host_streams * opts.host_s / host.cpu_s

    say(f"memory: {opts.memory_streams} live streams at once, no model (Python allocations traced)")
    memory = measure_memory(stream, clip, opts.memory_streams, HOST_BATCH)

    naive_wps = statistics.median(rows["naive"])
    naive_capacity = naive_wps * hop
    engine_wps = statistics.median(rows["engine"])
    say(f"capacity: live streams at a {hop:g}s hop, p99 latency within the budget, at most 1 % thinned")
    # The throughput that sizes the first trial: incremental scoring's, measured on streams longer than two windows.
    start_wps = statistics.median(rows["engine_long"]) if full_scorer is not None else engine_wps
    trials = capacity_trials(scorer, stream, clip, start_wps, opts, say)
    sustained = [t["streams"] for t in trials if t["ok"]]
    capacity = max(sustained) if sustained else 0
    if full_scorer is not None and incremental is not None:
        say("capacity, every window in full (--no-incremental):")
        full_trials = capacity_trials(full_scorer, stream, clip, statistics.median(rows["engine_full"]), opts, say)
        done = [t["streams"] for t in full_trials if t["ok"]]
        incremental.update(capacity_full_streams=max(done) if done else 0, capacity_full_trials=full_trials)

    say(f"soak: {opts.soak_streams} streams x {opts.soak_s:g}s simulated (host side), resident memory sampled")
    soak = run_soak(stream, clip, opts)

    report: dict[str, Any] = {
        "model": spec.name, "device": model.device, "provider": model.provider, "cores": os.cpu_count(),
        "machine": platform.machine(), "onnxruntime": ort.__version__, "window_s": stream.window_s,
        "hop_s": hop, "batch_sizes": list(plan.sizes), "batch_ms_per_window": plan.cost_ms,
        "windows_per_s": {k: spread(v) for k, v in rows.items()},
        "rounds": rows,
        "engine_vs_bare": spread(engine_vs_bare),
        "naive_vs_bare": spread(naive_vs_bare),
        "max_score_difference_vs_naive": accuracy,
        "host": {"streams": opts.host_streams, "seconds": opts.host_s, "cpu_s": host.cpu_s,
                 "streams_per_core": host_per_core},
        "memory": memory,
        "naive_capacity_streams": naive_capacity,
        "capacity_streams": capacity,
        "capacity_trials": trials,
        "capacity_vs_naive": capacity / naive_capacity if naive_capacity > 0 else None,
        "soak": soak,
        "incremental": incremental,
    }
    report["goals"] = check_goals(report)
    return report


def _incremental_report(scorer: Scorer, windows: list[np.ndarray], hop_s: float, rows: dict[str, list[float]],
                        counts: dict[str, Any]) -> dict[str, Any]:
    """Incremental against full scoring: speed (interleaved rounds), exactness on one stream, recomputes, memory."""
    n, recomputed = counts["windows"], counts["recomputed"]
    state = scorer.new_state()
    hop = int(round(hop_s * SAMPLE_RATE))
    got = [scorer.score_named([w], [state], [k * hop])[0, 0] for k, w in enumerate(windows)]
    want = scorer.embed(windows)[:, 0]
    return {
        "vs_full": spread([i / f for i, f in zip(rows["engine_long"], rows["engine_full"])]),
        "windows": n, "recompute_rate": recomputed / n if n else None,
        "reasons": counts["reasons"],
        "max_difference_vs_full": float(np.max(np.abs(np.array(got) - want))),
        "cache_bytes_per_stream": int(getattr(state, "nbytes", 0)),
    }


def measure_memory(stream: StreamConfig, clip: np.ndarray, n: int, max_batch: int) -> dict[str, Any]:
    """Memory of ``n`` live streams (real-time paced, no model): traced Python/numpy allocations and RSS.

    Sampled while every stream is past its first window, so a stream's ring buffer, speech detector,
    resampler, gathered input and waiting window are all counted.
    """
    import tracemalloc

    duration = stream.window_s + 3 * stream.hop_s
    sources = [ClipSource(f"m{i}", clip, duration, fast=False, delay_s=stream.hop_s * i / n, offset=i * 4801)
               for i in range(n)]
    tracemalloc.start()
    try:
        base, base_rss = tracemalloc.get_traced_memory()[0], rss_mb()
        traced: list[float] = []
        rss: list[float] = []

        async def go() -> None:
            async def sample() -> None:
                t0 = time.perf_counter()
                while True:
                    await asyncio.sleep(0.1)
                    if time.perf_counter() - t0 > stream.window_s + stream.hop_s * 1.5:
                        traced.append(tracemalloc.get_traced_memory()[0] - base)
                        rss.append(rss_mb() - base_rss)

            sampler = asyncio.create_task(sample())
            await run_engine(NullScorer(), sources, stream, max_batch, fast=False, sample_every_s=1.0)
            sampler.cancel()

        asyncio.run(go())
    finally:
        tracemalloc.stop()
    traced_mb = max(traced, default=0.0) / 2**20
    return {"streams": n, "mb_per_stream": traced_mb / n, "traced_mb": traced_mb,
            "rss_mb_per_stream": max(rss, default=0.0) / n}


def capacity_trials(scorer: Scorer, stream: StreamConfig, clip: np.ndarray, engine_wps: float, opts: BenchOptions,
                    say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Live runs at rising or falling stream counts, starting from the measured engine throughput."""
    hop = stream.hop_s
    n = max(1, int(engine_wps * hop * 0.9))
    step = max(1, n // 6)
    trials: list[dict[str, Any]] = []
    tried: dict[int, bool] = {}
    duration = stream.window_s + opts.capacity_s
    for _ in range(opts.capacity_trials):
        if n in tried or n < 1:
            break
        sources = [ClipSource(f"c{i}", clip, duration, fast=False, delay_s=hop * i / n, offset=i * 9601)
                   for i in range(n)]
        r = asyncio.run(run_engine(scorer, sources, stream, scorer.max_batch, fast=False))
        # Sustained: the 99th percentile within the budget and at most 1 % of windows thinned (a window thinned
        # now and then is the budget doing its job on a noisy machine; more means the scorer is behind).
        ok = r.scored > 0 and r.overloaded <= 0.01 * (r.scored + r.overloaded) and r.p99_ms <= r.budget_s * 1000
        tried[n] = ok
        trials.append({"streams": n, "ok": ok, "scored": r.scored, "overloaded": r.overloaded,
                       "p50_ms": float(np.percentile(r.latencies_ms, 50)) if r.latencies_ms else None,
                       "p99_ms": r.p99_ms, "budget_ms": r.budget_s * 1000})
        say(f"  {n} streams: {'sustained' if ok else 'not sustained'} (p99 {r.p99_ms:.0f} ms, budget "
            f"{r.budget_s * 1000:.0f} ms, {r.overloaded} thinned of {r.scored + r.overloaded})")
        if ok:
            if (n + step) in tried:
                break
            n += step
        else:
            if any(ok_n for m, ok_n in tried.items() if m < n) or n == 1:
                break
            n = max(1, min(n - 1, int(n * 0.85)))
    return trials


def run_soak(stream: StreamConfig, clip: np.ndarray, opts: BenchOptions) -> dict[str, Any]:
    """Host side over ``soak_s`` seconds of ``soak_streams`` streams, as fast as it goes; memory sampled."""
    sources = [ClipSource(f"k{i}", clip, opts.soak_s, fast=True, offset=i * 4801) for i in range(opts.soak_streams)]

    def done(engine: Engine) -> float:  # the least advanced live stream's time, as a fraction of the soak
        return min((c.t for c in engine.cores.values()), default=opts.soak_s) / opts.soak_s

    r = asyncio.run(run_engine(NullScorer(), sources, stream, HOST_BATCH, fast=True, sample_every_s=0.5,
                               progress=done, keep_latencies=False))
    after_warm = [m for f, m in r.rss_samples if f >= 0.1]
    start = after_warm[0] if after_warm else (r.rss_samples[0][1] if r.rss_samples else rss_mb())
    end = r.rss_samples[-1][1] if r.rss_samples else rss_mb()
    return {"streams": opts.soak_streams, "simulated_s": opts.soak_s, "wall_s": r.wall_s, "cpu_s": r.cpu_s,
            "windows": r.windows_run, "rss_mb_at_10pct": start, "rss_mb_end": end,
            "rss_growth": (end - start) / start if start else None,
            "rss_mb_samples": [(round(f, 3), round(m, 1))
                               for f, m in r.rss_samples[:: max(1, len(r.rss_samples) // 40)]]}


def check_goals(report: dict[str, Any]) -> dict[str, Any]:
    values = {
        "engine_vs_bare": report["engine_vs_bare"]["median"],
        "capacity_vs_naive": report["capacity_vs_naive"],
        "host_streams_per_core": report["host"]["streams_per_core"],
        "mb_per_stream": report["memory"]["mb_per_stream"],
        "soak_rss_growth": report["soak"]["rss_growth"],
    }
    out = {}
    for key, (what, op, goal) in GOALS.items():
        v = values[key]
        met = None if v is None else (v >= goal if op == ">=" else v <= goal)
        out[key] = {"what": what, "value": v, "goal": f"{op} {goal:g}", "met": met}
    return out


def render(report: dict[str, Any]) -> str:
    """The report as a table for a terminal."""
    w = report["windows_per_s"]
    lines = [
        f"{report['model']} on {report['device'].upper()} ({report['provider']}), {report['cores']} cores, "
        f"onnxruntime {report['onnxruntime']}, window {report['window_s']:g}s, hop {report['hop_s']:g}s, "
        f"batch sizes {report['batch_sizes']}",
        "",
        f"{'windows per second':<40}{'median':>10}{'min':>10}{'max':>10}",
    ]
    for key, label in (("bare", "bare session.run"), ("naive", "naive loop (default session, batch 1)"),
                       ("engine", "engine --fast"), ("engine_long", "engine --fast, longer streams"),
                       ("engine_full", "the same, --no-incremental")):
        if key not in w:
            continue
        s = w[key]
        lines.append(f"{label:<40}{s['median']:>10.2f}{s['min']:>10.2f}{s['max']:>10.2f}")
    for key, label in (("engine_vs_bare", "engine / bare"), ("naive_vs_bare", "naive / bare")):
        s = report[key]
        lines.append(f"{label:<40}{s['median']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}")
    acc = report["max_score_difference_vs_naive"]
    if acc is not None:
        lines.append(f"{'largest score difference vs naive':<40}{acc:>10.2g}")
    inc = report.get("incremental")
    capacity = f"live capacity: {report['capacity_streams']} streams"
    if inc:
        s = inc["vs_full"]
        lines.append(f"{'incremental / full':<40}{s['median']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}")
        lines.append(f"incremental: {100 * (inc['recompute_rate'] or 0):.0f} % of windows recomputed in full "
                     f"({', '.join(f'{k} {v}' for k, v in inc['reasons'].items() if v)}); largest difference vs "
                     f"full {inc['max_difference_vs_full']:.2g}; feature cache "
                     f"{inc['cache_bytes_per_stream'] / 1e6:.2f} MB per stream")
        capacity += f" (every window in full: {inc.get('capacity_full_streams', 'n/a')})"
    lines += [
        "",
        f"{capacity} (naive loop: {report['naive_capacity_streams']:.1f})",
        f"host side: {report['host']['streams_per_core']:.0f} streams per core; "
        f"{report['memory']['mb_per_stream']:.3f} MB per stream ({report['memory']['rss_mb_per_stream']:.3f} MB "
        "resident)",
        f"soak: {report['soak']['streams']} streams x {report['soak']['simulated_s']:g}s in "
        f"{report['soak']['wall_s']:.0f}s, resident memory {report['soak']['rss_mb_at_10pct']:.0f} -> "
        f"{report['soak']['rss_mb_end']:.0f} MB",
        "",
        f"{'goal':<42}{'value':>12}  {'target':<10}",
    ]
    for g in report["goals"].values():
        v = g["value"]
        shown = "n/a" if v is None else f"{v:.3g}"
        mark = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        lines.append(f"{g['what']:<42}{shown:>12}  {g['goal']:<10}{mark}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    text = json.dumps(report, indent=1, default=float)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
