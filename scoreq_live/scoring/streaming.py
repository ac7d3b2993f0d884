"""Exact streaming Distill-MOS: consecutive windows share their CNN features.

Distill-MOS scores 7.68 s windows (122880 samples); at the monitor's 1 s hop
consecutive windows share 87 % of their audio, and most of the model's time
is its CNN over the compressed STFT, whose receptive field along time is
small. ``distillmos-cnn.onnx`` and ``distillmos-head.onnx`` (made by
``models/export_distillmos_stream.py``) split the model there, so that
``head(cnn(window, peak))`` is ``distillmos.onnx``, and feature frames of the
shared audio are computed once:

* One CNN output frame covers 320 samples. Frames 4..380 of a window depend
  only on the audio and on the window's peak (the model divides each window
  by ``max|x| + 1e-8``), so they equal the same frames of the previous window
  when the peak is the same, and the frames of any block of audio that holds
  them 4 frames from its start and 3 from its end, scaled by that peak.
* Frames 0..3 and 381..383 depend on the window's edges; they come from a
  7-frame block at the window's start and from the end of the block that
  brings the new frames (which ends where the window ends).

So at a hop of ``d`` frames (50 at 1 s) a window costs one CNN run on
``d + 7`` frames, one on 7 frames and the head, instead of the CNN on all 384
frames and the head. The result is the full model's up to float32 rounding:
no approximation is made. Whenever that is not possible the window is scored
in full (counted, with the reason):

* ``first``: the cache is empty (a new stream, or it was dropped);
* ``peak``: the window's peak differs from the peak the cached frames were
  computed under (a louder sample entered, or the loudest one left);
* ``off_grid``: the start is not a whole number of 320-sample frames after
  the previous window's start;
* ``not_after``: the start is not after the previous window's start;
* ``skip``: the start jumped past everything the cache holds (more than
  376 frames, about 7.5 s: overload thinning, silence gating);
* ``evicted``: the start advanced by less than the cache's ``hop``, whose
  frames were already dropped.

Those windows run the CNN on the whole window and the head, and the cache is
refilled from their features. Windows shorter than 122880 samples (a stream's
zero-padded tail) and windows given no cache run ``distillmos.onnx`` itself
(``fallback``, reasons ``short`` and ``no_cache``); a short window drops its
stream's cache.

This module needs numpy and onnxruntime only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

WINDOW = 122880  # samples in one Distill-MOS window (7.68 s at 16 kHz)
FRAME = 320  # samples per CNN output frame
WINDOW_FRAMES = WINDOW // FRAME  # 384
FRONT_EDGE = 4  # frames 0..3 of a block depend on its start edge
END_EDGE = 3  # its last 3 frames depend on its end edge
EDGE_BLOCK_FRAMES = FRONT_EDGE + END_EDGE  # a block whose frames 0..3 are exact
INTERIOR = slice(FRONT_EDGE, WINDOW_FRAMES - END_EDGE)  # window frames 4..380
INTERIOR_FRAMES = WINDOW_FRAMES - FRONT_EDGE - END_EDGE  # 377
DEFAULT_HOP = 16000

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"


class Session(Protocol):
    """What the scorer needs of a model: onnxruntime's ``InferenceSession.run`` signature."""

    def run(self, output_names: Any, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class StreamCache:
    """Feature frames of one stream, carried from one window to the next.

    Holds the interior frames (4..380) of the last window scored, keyed by
    absolute frame index ``(start - phase) // 320`` of the stream, the peak
    they were computed under, and that window's start. Only frames that a
    window ``hop`` samples later still needs are kept: (380 - 4 + 1 - hop/320)
    frames of 1024 float32 values (1.34 MB at the default 1 s hop). A window
    that advances by less than ``hop`` is scored in full (``evicted``); one
    that advances by more is still incremental as long as the cached frames
    reach it.
    """

    def __init__(self, hop: int = DEFAULT_HOP) -> None:
        if hop <= 0:
            raise ValueError("hop must be positive")
        self.hop = int(hop)
        self.version = 0  # counts every change of what the cache holds
        self.clear()

    def clear(self) -> None:
        """Drop everything: the next window is scored in full."""
        self.version += 1
        self.frames: np.ndarray | None = None  # [n, 1024] float32, frames first..first+n-1
        self.first = 0  # absolute index of frames[0]
        self.peak: np.float32 | None = None
        self.start: int | None = None  # start sample of the last window scored
        self.phase = 0  # start % 320 of the window that filled the cache

    @property
    def nbytes(self) -> int:
        """Bytes of cached feature frames."""
        return 0 if self.frames is None else int(self.frames.nbytes)

    def index(self, start: int) -> int:
        """Absolute frame index of a window start on this cache's grid."""
        return (start - self.phase) // FRAME

    def _store(self, start: int, peak: np.float32, interior: np.ndarray, planned: int | None = None) -> None:
        """Keep the interior frames of the window at ``start`` that the next window can use.

        ``planned``: the :attr:`version` the window was planned under. When another pass stored a later
        window meanwhile (runs of one stream in flight together on a server), that one is kept.
        """
        if planned is not None and planned != self.version and self.start is not None and start <= self.start:
            return
        self.version += 1
        if self.start is None or (start - self.phase) % FRAME:
            self.phase = start % FRAME
        keep_from = min(max(1, self.hop // FRAME), INTERIOR_FRAMES)
        # A copy: a view would pin the whole batch of features in memory.
        self.frames = np.array(interior[keep_from:], dtype=np.float32, copy=True)
        self.first = self.index(start) + FRONT_EDGE + keep_from
        self.peak = peak
        self.start = int(start)

    def _plan(self, start: int, peak: np.float32) -> tuple[str | None, int]:
        """(None, hop in frames) when the window can be assembled from this cache, else (reason, 0)."""
        if self.start is None or self.frames is None:
            return "first", 0
        if (start - self.start) % FRAME:
            return "off_grid", 0
        d = (start - self.start) // FRAME
        if d <= 0:
            return "not_after", 0
        if d >= INTERIOR_FRAMES:
            return "skip", 0
        if self.index(start) + FRONT_EDGE < self.first:
            return "evicted", 0
        if peak != self.peak:
            return "peak", 0
        return None, d


def merge_counters(total: dict, counters: dict) -> dict:
    """Add the counters of one ``score`` call into a running total (in place; returned)."""
    for key, value in counters.items():
        if isinstance(value, dict):
            merge_counters(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


class IncrementalDistillMos:
    """Scores Distill-MOS windows of many streams, reusing each stream's CNN features.

    ``full``, ``cnn`` and ``head`` are sessions of ``distillmos.onnx``,
    ``distillmos-cnn.onnx`` and ``distillmos-head.onnx``: onnxruntime
    ``InferenceSession`` objects, or anything with the same
    ``run(output_names, input_feed) -> list[np.ndarray]`` method. Each model
    run takes at most ``max_batch`` rows (larger batches are split).
    """

    def __init__(self, full: Session, cnn: Session, head: Session, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.full, self.cnn, self.head = full, cnn, head
        self.max_batch = int(max_batch)

    @classmethod
    def from_files(
        cls,
        directory: Path | str = BUNDLED_DIR,
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        max_batch: int = 16,
    ) -> IncrementalDistillMos:
        """Open the three graphs (the bundled ones by default) with onnxruntime."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        directory = Path(directory)
        full, cnn, head = (
            ort.InferenceSession(str(directory / name), opts, providers=list(providers))
            for name in ("distillmos.onnx", "distillmos-cnn.onnx", "distillmos-head.onnx")
        )
        return cls(full, cnn, head, max_batch=max_batch)

    # ---------------------------------------------------------------- runs

    def _run(self, session: Session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One output, in chunks of at most max_batch rows."""
        n = len(next(iter(feeds.values())))
        outs = [
            session.run(None, {k: v[i : i + self.max_batch] for k, v in feeds.items()})[0]
            for i in range(0, n, self.max_batch)
        ]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    # ---------------------------------------------------------------- scoring

    def score(
        self,
        windows: Sequence[np.ndarray],
        starts: Sequence[int],
        caches: Sequence[StreamCache | None],
    ) -> tuple[np.ndarray, dict]:
        """MOS of each window, and counters of how each was computed.

        ``windows[i]`` is 1-D float32 mono 16 kHz audio of 122880 samples (or
        fewer: a tail, zero-padded here), ``starts[i]`` its first sample's
        index in its stream, ``caches[i]`` that stream's ``StreamCache``
        (``None``: score in full, keep nothing). Windows of many streams go
        into one call and their model runs are batched together; a stream
        may appear more than once (its windows are then taken in order).
        Returns (``mos`` float32 [N], counters: ``windows``, ``incremental``,
        ``recomputed``, ``fallback`` and ``reasons`` {reason: count}).
        """
        graphs = {"full": self.full, "cnn": self.cnn, "head": self.head}
        return drive(plan_scoring(windows, starts, caches), lambda c: self._run(graphs[c.graph], c.feeds))


@dataclass(frozen=True)
class Call:
    """One model run the incremental scorer needs: which graph (``full``, ``cnn``, ``head``) on which inputs."""

    graph: Graph
    feeds: dict[str, np.ndarray]


Graph = Literal["full", "cnn", "head"]
Steps = Generator[list[Call], list[np.ndarray], tuple[np.ndarray, dict]]


def plan_scoring(windows: Sequence[np.ndarray], starts: Sequence[int],
                 caches: Sequence[StreamCache | None]) -> Steps:
    """The incremental scorer without its models: yields the model runs it needs, takes back their outputs.

    A generator: each ``yield`` is a list of independent :class:`Call` (run
    them in any order or at once); ``send`` their outputs, in that order.
    Its return value is :meth:`IncrementalDistillMos.score`'s. The caches
    change only once a pass's heads are back, so a run that fails midway
    (an exception thrown in, or the generator dropped) leaves every cache as
    it was before that pass. Local sessions and an inference server drive
    the same plan.
    """
    n = len(windows)
    if len(starts) != n or len(caches) != n:
        raise ValueError("windows, starts and caches must have the same length")
    mos = np.zeros(n, dtype=np.float32)
    counters: dict = {"windows": n, "incremental": 0, "recomputed": 0, "fallback": 0, "reasons": {}}
    # A cache may be used once per pass; a stream's later windows go into later passes.
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, cache in enumerate(caches):
        r = 0 if cache is None else seen.get(id(cache), 0)
        if cache is not None:
            seen[id(cache)] = r + 1
        while len(rounds) <= r:
            rounds.append([])
        rounds[r].append(i)
    for idx in rounds:
        yield from _plan_pass(idx, windows, starts, caches, mos, counters)
    return mos, counters


def drive(steps: Steps, run: Callable[[Call], np.ndarray]) -> tuple[np.ndarray, dict]:
    """Carry out a plan with a blocking ``run``, one call after another."""
    try:
        calls = next(steps)
        while True:
            calls = steps.send([run(c) for c in calls])
    except StopIteration as done:
        return done.value


async def drive_async(steps: Steps, run: Callable[[Call], Awaitable[np.ndarray]]) -> tuple[np.ndarray, dict]:
    """Carry out a plan with an awaitable ``run``: the calls of each step in flight together."""
    try:
        calls = next(steps)
        while True:
            calls = steps.send(list(await asyncio.gather(*(run(c) for c in calls))))
    except StopIteration as done:
        return done.value


def _cnn_call(blocks: list[np.ndarray], peaks: list[np.float32]) -> Call:
    return Call("cnn", {"audio": np.stack(blocks), "peak": np.asarray(peaks, dtype=np.float32).reshape(-1, 1)})


def _plan_pass(idx: list[int], windows: Sequence[np.ndarray], starts: Sequence[int],
               caches: Sequence[StreamCache | None], mos: np.ndarray,
               counters: dict[str, Any]) -> Generator[list[Call], list[np.ndarray], None]:
    reasons = counters["reasons"]
    full_jobs: list[tuple[int, np.ndarray]] = []
    recompute: list[tuple[int, np.ndarray, np.float32]] = []
    incremental: list[tuple[int, np.ndarray, np.float32, int]] = []
    planned: dict[int, int] = {}  # each window's cache's version when it was planned
    held: dict[int, tuple[np.ndarray, int, int]] = {}  # (frames, first, window's frame index) planned from
    for i in idx:
        x = np.asarray(windows[i], dtype=np.float32)
        if x.ndim != 1 or len(x) > WINDOW:
            raise ValueError(f"window {i}: expected 1-D audio of at most {WINDOW} samples, got {x.shape}")
        cache = caches[i]
        if len(x) < WINDOW or cache is None:
            why = "short" if len(x) < WINDOW else "no_cache"
            reasons[why] = reasons.get(why, 0) + 1
            counters["fallback"] += 1
            if cache is not None:
                cache.clear()
            full_jobs.append((i, np.pad(x, (0, WINDOW - len(x)))))
            continue
        peak = np.max(np.abs(x))
        reason, d = cache._plan(int(starts[i]), peak)
        planned[i] = cache.version
        if reason is None:
            counters["incremental"] += 1
            incremental.append((i, x, peak, d))
            # What the cache holds now: another pass may store into it before this one's runs are back.
            assert cache.frames is not None  # planned incremental: it holds frames
            held[i] = (cache.frames, cache.first, cache.index(int(starts[i])))
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
            counters["recomputed"] += 1
            recompute.append((i, x, peak))

    # First step, all independent: the full model, then CNN runs on whole windows, on end blocks grouped by
    # length, and on front edges.
    calls: list[Call] = []
    if full_jobs:
        calls.append(Call("full", {"audio": np.stack([x for _, x in full_jobs])}))
    if recompute:
        calls.append(_cnn_call([x for _, x, _ in recompute], [p for _, _, p in recompute]))
    by_len: dict[int, list[int]] = {}
    for k, (_, _, _, d) in enumerate(incremental):
        by_len.setdefault(d, []).append(k)
    for d, ks in by_len.items():
        length = (d + EDGE_BLOCK_FRAMES) * FRAME
        calls.append(_cnn_call([incremental[k][1][-length:] for k in ks], [incremental[k][2] for k in ks]))
    if incremental:
        calls.append(_cnn_call([x[: EDGE_BLOCK_FRAMES * FRAME] for _, x, _, _ in incremental],
                               [p for _, _, p, _ in incremental]))
    if not calls:
        return
    outs = iter((yield calls))
    if full_jobs:
        mos[[i for i, _ in full_jobs]] = next(outs)[:, 0]
    if not (recompute or incremental):
        return

    feats: list[np.ndarray] = []  # one [384, D] per window that goes to the head
    rows: list[int] = []
    if recompute:
        for (i, _, _), f in zip(recompute, next(outs)):
            feats.append(f)
            rows.append(i)
    if incremental:
        ends: dict[int, np.ndarray] = {}
        for ks in by_len.values():
            for k, f in zip(ks, next(outs)):
                ends[k] = f
        fronts = next(outs)
        for k, (i, _, _, d) in enumerate(incremental):
            frames, first, index = held[i]
            f = np.empty((WINDOW_FRAMES, fronts.shape[-1]), dtype=np.float32)
            f[:FRONT_EDGE] = fronts[k, :FRONT_EDGE]
            lo = index + FRONT_EDGE - first
            reuse = INTERIOR_FRAMES - d  # window frames 4 .. 380 - d come from the cache
            f[FRONT_EDGE : FRONT_EDGE + reuse] = frames[lo : lo + reuse]
            f[FRONT_EDGE + reuse :] = ends[k][FRONT_EDGE:]
            feats.append(f)
            rows.append(i)

    (out,) = yield [Call("head", {"features": np.stack(feats)})]
    mos[rows] = out[:, 0]
    peaks = {i: p for i, _, p in recompute}
    peaks.update({i: p for i, _, p, _ in incremental})
    for i, f in zip(rows, feats):
        kept = caches[i]
        assert kept is not None  # windows without a cache took the full model above
        kept._store(int(starts[i]), peaks[i], f[INTERIOR], planned[i])
