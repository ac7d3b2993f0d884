"""How many windows go into one model run: chosen by measuring this machine, not assumed.

On a GPU the cost per window falls steeply with the batch size; on a CPU it
hardly does (Distill-MOS on two cores: 85 ms per window alone, 79 ms in twos,
78 ms in fours), while each larger batch shape grows onnxruntime's memory
arena (by about 0.1 GB per window for that model) and makes every window of
the run wait for the whole run.  So the batch sizes are measured at start:
sizes 1, 2, 4, ... are timed against each other, interleaved, and the
largest size that is still cheaper per window than half its size by more than
the tolerance is the cap.  Only powers of two up to the cap are ever run, so
every shape used is warmed up before the first live window and the arena
stops growing.

A measurement is kept in a small JSON file beside the downloaded models,
keyed by model file, provider, threads, cores, input length and onnxruntime
version, so that later starts only warm up.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from scoreq_live.scoring.spec import ModelSpec

log = logging.getLogger(__name__)

TOLERANCE = 0.05  # a batch twice as large must be this much cheaper per window to be worth its latency
ROUNDS = 3  # interleaved timings of each pair of sizes
PlanSource = Literal["measured", "cached", "given"]


def powers_up_to(cap: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``cap``, and ``cap`` itself when it is not a power of two."""
    cap = max(1, int(cap))
    sizes = []
    b = 1
    while b <= cap:
        sizes.append(b)
        b *= 2
    if sizes[-1] != cap:
        sizes.append(cap)
    return tuple(sizes)


@dataclass(frozen=True)
class BatchPlan:
    """The run sizes a scorer may use, and what they were chosen from."""

    sizes: tuple[int, ...]  # ascending, starting at 1
    source: PlanSource = "given"
    cost_ms: dict[int, float] = field(default_factory=dict)  # measured time per window, by run size

    def __post_init__(self) -> None:
        if not self.sizes or self.sizes[0] != 1 or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"batch sizes must ascend from 1, got {self.sizes}")

    @classmethod
    def up_to(cls, cap: int, source: PlanSource = "given", cost_ms: dict[int, float] | None = None) -> BatchPlan:
        return cls(powers_up_to(cap), source, dict(cost_ms or {}))

    @property
    def cap(self) -> int:
        """The most windows in one run."""
        return self.sizes[-1]

    def split(self, n: int) -> list[int]:
        """Run sizes for ``n`` windows: the largest allowed size first, so only planned shapes run."""
        out: list[int] = []
        for size in reversed(self.sizes):
            while n >= size:
                out.append(size)
                n -= size
        return out

    def describe(self) -> str:
        sizes = ", ".join(map(str, self.sizes))
        if not self.cost_ms:
            return f"batch sizes {sizes} ({self.source})"
        costs = ", ".join(f"{b}: {ms:.1f}" for b, ms in sorted(self.cost_ms.items()))
        return f"batch sizes {sizes} ({self.source}; ms per window by batch size {costs})"

    def to_dict(self) -> dict[str, object]:
        return {"sizes": list(self.sizes), "cost_ms": {str(k): round(v, 3) for k, v in self.cost_ms.items()}}


Run = Callable[[np.ndarray], object]


def measure(run: Run, length: int, limit: int, *, tolerance: float = TOLERANCE, rounds: int = ROUNDS,
            clock: Callable[[], float] = time.perf_counter) -> BatchPlan:
    """Time run sizes 1, 2, 4, ... (at most ``limit``) in interleaved pairs and choose the cap.

    Each step times the best size so far against twice that size, A B A B, so
    a change in machine load hits both alike; the larger size is taken only
    when its median time per window is lower by more than ``tolerance``.
    Every size timed has run at least once, so its shape is warm.
    """
    limit = max(1, int(limit))
    rng = np.random.default_rng(0)
    x = (0.05 * rng.standard_normal((1, length))).astype(np.float32)  # speech-level noise, no denormal zeros
    batches: dict[int, np.ndarray] = {}

    def batch(b: int) -> np.ndarray:
        if b not in batches:
            batches[b] = np.repeat(x, b, axis=0)
        return batches[b]

    samples: dict[int, list[float]] = {}

    def timed(b: int) -> None:
        t0 = clock()
        run(batch(b))
        samples.setdefault(b, []).append((clock() - t0) / b)

    best = 1
    run(batch(1))  # the first run of a shape pays for its allocations and kernel choices
    while best * 2 <= limit:
        nxt = best * 2
        run(batch(nxt))
        for _ in range(rounds):
            timed(best)
            timed(nxt)
        if statistics.median(samples[nxt]) < statistics.median(samples[best]) * (1.0 - tolerance):
            best = nxt
        else:
            break
    if not samples:  # limit 1: nothing to compare, but report what one window costs
        timed(1)
    cost = {b: 1000.0 * statistics.median(v) for b, v in samples.items()}
    return BatchPlan.up_to(best, "measured", cost)


def warm_up(run: Run, length: int, plan: BatchPlan) -> None:
    """Run every planned size once, so the first live window pays no first-run cost."""
    x = np.zeros((plan.cap, length), dtype=np.float32)
    x[:] = 0.05 * np.random.default_rng(0).standard_normal(length).astype(np.float32)
    for b in plan.sizes:
        run(x[:b])


def _cache_file() -> Path:
    from scoreq_live.scoring.store import models_dir

    return models_dir() / "batch-plans.json"


def cache_key(model_file: str | Path, provider: str, threads: int | None, length: int, limit: int) -> str:
    import onnxruntime as ort

    p = Path(model_file).resolve()
    st = p.stat()
    return "|".join(map(str, (p, st.st_size, st.st_mtime_ns, provider, threads or 0, os.cpu_count(),
                              length, limit, ort.__version__)))


def load_cached(key: str) -> BatchPlan | None:
    try:
        entry = json.loads(_cache_file().read_text()).get(key)
        if not entry:
            return None
        return BatchPlan(tuple(int(b) for b in entry["sizes"]), "cached",
                         {int(k): float(v) for k, v in entry.get("cost_ms", {}).items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(key: str, plan: BatchPlan) -> None:
    """Remember a measurement; a cache that cannot be written only costs the next start a measurement."""
    path = _cache_file()
    try:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = plan.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot keep the batch measurement in %s: %s", path, e)


class LocalModel(Protocol):
    """What a plan is measured on: a loaded local session (:class:`~scoreq_live.scoring.session.OnnxModel`)."""

    spec: ModelSpec
    provider: str
    threads: int | None

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def plan_for(model: LocalModel, length: int, limit: int, *, given: int | None = None,
             cache: bool = True) -> BatchPlan:
    """The batch plan for a loaded model, every planned shape warmed up.

    ``given``: the user's ``--max-batch``: powers of two up to it, not measured.
    Else a cached measurement for this model, machine and length, or a new one.
    """
    run: Run = model.run
    if given is not None:
        plan = BatchPlan.up_to(given, "given")
        warm_up(run, length, plan)
        return plan
    key = None
    if cache and model.spec.file is not None:
        key = cache_key(model.spec.file, model.provider, model.threads, length, limit)
        cached = load_cached(key)
        if cached is not None and cached.cap <= limit:
            warm_up(run, length, cached)
            return cached
    t0 = time.perf_counter()
    plan = measure(run, length, limit)
    log.info("measured %s in %.1fs", plan.describe(), time.perf_counter() - t0)
    if key is not None:
        store(key, plan)
    return plan
