"""Streaming Distill-MOS (scoreq_live.scoring.streaming) scores exactly what the full model scores.

The incremental path assembles each window's CNN features from the previous
window's cache, a block of new audio and a block at the window's front edge,
then runs the head. Here it is compared window by window with the bundled
``distillmos.onnx`` on real speech joined into a ~60 s stream that changes
level by +-10 dB, has a silence and switches from clean to Opus-coded speech.
No torch is needed.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from scoreq_live.scoring.streaming import (
    BUNDLED_DIR,
    FRAME,
    INTERIOR_FRAMES,
    WINDOW,
    IncrementalDistillMos,
    StreamCache,
    merge_counters,
    plan_scoring,
)
from tests.helpers import speech_16k as load

SR = 16000
HOP = 16000
MOS_TOLERANCE = 0.005


def session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(BUNDLED_DIR / name), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def scorer() -> IncrementalDistillMos:
    return IncrementalDistillMos(
        session("distillmos.onnx"), session("distillmos-cnn.onnx"), session("distillmos-head.onnx")
    )


@pytest.fixture(scope="module")
def stream(data) -> np.ndarray:
    """~60 s: speech at 0, +10 and -10 dB, a silence, clean then Opus-coded speech, coded codecs."""
    mushra = data / "mushra" / "audio"
    refs = [load(mushra / f"stim_{n:02d}" / "ref.wav") for n in range(1, 9)]
    coded = [load(mushra / f"stim_{n:02d}" / name) for n, name in
             ((7, "lyra_6.wav"), (8, "encodec_6.wav"), (1, "audiodec_8.wav"), (2, "lyra_6.wav"))]
    clean, opus = load(data / "scoreq" / "ref.wav"), load(data / "scoreq" / "opus.wav")
    db = lambda g: np.float32(10 ** (g / 20))  # noqa: E731
    parts = [
        refs[0], refs[1],                    # 0 dB
        db(10) * refs[2], db(10) * refs[3],  # +10 dB
        db(-10) * refs[4], db(-10) * refs[5],  # -10 dB
        np.zeros(3 * SR, np.float32),        # silence
        clean, opus,                         # clean -> coded switch
        *coded,
        refs[6], refs[7],
        clean, db(-10) * opus,
    ]
    x = np.concatenate(parts)
    return (0.9 / np.max(np.abs(x)) * x).astype(np.float32)  # loudest part just below full scale


@pytest.fixture(scope="module")
def starts(stream) -> list[int]:
    return list(range(0, len(stream) - WINDOW + 1, HOP))


def full_mos(scorer, windows: list[np.ndarray]) -> np.ndarray:
    padded = np.stack([np.pad(w, (0, WINDOW - len(w))) for w in windows])
    return np.concatenate([scorer.full.run(None, {"audio": padded[i : i + 8]})[0][:, 0]
                           for i in range(0, len(padded), 8)])


@pytest.fixture(scope="module")
def reference(scorer, stream, starts) -> np.ndarray:
    return full_mos(scorer, [stream[s : s + WINDOW] for s in starts])


def run_stream(scorer, stream, starts, cache=None):
    cache = cache or StreamCache()
    mos, totals, per_window = [], {}, []
    for s in starts:
        m, c = scorer.score([stream[s : s + WINDOW]], [s], [cache])
        mos.append(float(m[0]))
        per_window.append(c)
        merge_counters(totals, c)
    return np.array(mos), totals, per_window, cache


def test_incremental_matches_full_model(scorer, stream, starts, reference):
    assert 55 <= len(stream) / SR <= 70
    mos, totals, _, cache = run_stream(scorer, stream, starts)
    diff = np.abs(mos - reference)
    rate = (totals["recomputed"] + totals["fallback"]) / totals["windows"]
    print(f"\n{len(starts)} windows: max |incremental - full| = {diff.max():.2e}, "
          f"mean {diff.mean():.2e}; recompute rate {rate:.3f}; counters {totals}; "
          f"cache {cache.nbytes} bytes")
    assert diff.max() <= MOS_TOLERANCE
    assert totals["incremental"] >= len(starts) // 2  # the point of it
    assert totals["reasons"].get("first") == 1
    assert totals["reasons"].get("peak", 0) >= 1  # the level changes force recomputes
    assert set(totals["reasons"]) <= {"first", "peak"}
    # The scores move with the stream (level does not, quality does): not a constant.
    assert np.ptp(reference) > 0.3


def test_recompute_when_a_louder_peak_enters_and_leaves(scorer, stream):
    x = stream[: 21 * SR].copy()
    burst_at = 12 * SR
    x[burst_at : burst_at + 800] = 0.95 * np.sin(2 * np.pi * 1000 * np.arange(800) / SR)
    starts = list(range(0, len(x) - WINDOW + 1, HOP))
    mos, _, per_window, _ = run_stream(scorer, x, starts)
    ref = full_mos(scorer, [x[s : s + WINDOW] for s in starts])
    assert np.max(np.abs(mos - ref)) <= MOS_TOLERANCE

    def inside(s):
        return s < burst_at + 800 and s + WINDOW > burst_at

    entered = next(k for k, s in enumerate(starts) if inside(s))
    left = next(k for k, s in enumerate(starts) if k > entered and not inside(s))
    assert per_window[entered]["reasons"] == {"peak": 1}
    assert per_window[left]["reasons"] == {"peak": 1}
    # While the burst is the peak of every window, nothing is recomputed.
    for k in range(entered + 1, left):
        assert per_window[k]["incremental"] == 1, (k, per_window[k])


def test_fallbacks_are_full_and_exact(scorer, stream):
    # A spike of the same height every second: every window has the same peak,
    # so only the case under test decides how a window is scored.
    stream = 0.5 * stream
    stream[::SR] = 0.95
    cache = StreamCache()
    cases = [  # (start, length, expected kind, expected reason)
        (0, WINDOW, "recomputed", "first"),
        (HOP, WINDOW, "incremental", None),
        (2 * HOP + 160, WINDOW, "recomputed", "off_grid"),  # half a frame off the grid
        (3 * HOP + 160, WINDOW, "incremental", None),  # the cache follows the new grid
        (5 * HOP + 160, WINDOW, "incremental", None),  # one window thinned out: still covered
        (15 * HOP + 160, WINDOW, "recomputed", "skip"),  # 10 s later: nothing cached is reusable
        (16 * HOP + 160, WINDOW, "incremental", None),  # refilled from the recomputed window
        (16 * HOP + 160 + 8000, WINDOW, "recomputed", "evicted"),  # half a hop: frames dropped
        (16 * HOP + 160, WINDOW, "recomputed", "not_after"),  # backwards
        (17 * HOP, WINDOW // 2, "fallback", "short"),  # a zero-padded tail
    ]
    windows = [stream[s : s + n] for s, n, _, _ in cases]
    ref = full_mos(scorer, windows)
    for (s, _, kind, reason), w, r in zip(cases, windows, ref):
        m, c = scorer.score([w], [s], [cache])
        assert c[kind] == 1, (s, kind, c)
        assert c["reasons"] == ({} if reason is None else {reason: 1}), (s, c)
        assert abs(float(m[0]) - float(r)) <= MOS_TOLERANCE
    assert cache.nbytes == 0  # the short tail dropped the cache
    m, c = scorer.score([windows[0]], [0], [None])
    assert c["fallback"] == 1 and c["reasons"] == {"no_cache": 1}
    assert abs(float(m[0]) - float(ref[0])) <= MOS_TOLERANCE


def test_many_streams_in_one_call_match_each_alone(scorer, stream):
    # Three streams of different content and level, misaligned in time.
    streams = [stream[: 20 * SR], 0.3 * stream[10 * SR : 30 * SR], stream[25 * SR : 45 * SR][::-1].copy()]
    streams = [s.astype(np.float32) for s in streams]
    offsets = [0, 3 * HOP + 160, 7 * HOP + 37]  # each stream on its own clock and frame grid
    n_windows = 20 - 8 + 1
    alone = []
    for x, off in zip(streams, offsets):
        cache, mos = StreamCache(), []
        for k in range(n_windows):
            m, _ = scorer.score([x[k * HOP : k * HOP + WINDOW]], [off + k * HOP], [cache])
            mos.append(float(m[0]))
        alone.append(mos)
    caches = [StreamCache() for _ in streams]
    together = np.zeros((3, n_windows))
    totals: dict = {}
    for k in range(n_windows):
        ws = [x[k * HOP : k * HOP + WINDOW] for x in streams]
        m, c = scorer.score(ws, [off + k * HOP for off in offsets], caches)
        merge_counters(totals, c)
        together[:, k] = m
    assert totals["incremental"] > 0
    assert np.max(np.abs(together - np.array(alone))) <= 1e-4
    # Two consecutive windows of one stream in one call are taken in order.
    cache = StreamCache()
    m, c = scorer.score([streams[0][:WINDOW], streams[0][HOP : HOP + WINDOW]], [0, HOP], [cache, cache])
    assert c["recomputed"] + c["incremental"] == 2
    assert np.max(np.abs(m - alone[0][:2])) <= 1e-4


def test_cache_memory_is_bounded(scorer, stream, starts):
    _, totals, _, cache = run_stream(scorer, stream, starts[:12])
    frames = cache.frames
    per_frame = frames.shape[1] * 4
    print(f"\ncache: {cache.nbytes} bytes ({frames.shape[0]} frames of {per_frame} bytes)")
    # Only the frames a window one hop later needs: interior frames minus one hop.
    assert frames.shape[0] == INTERIOR_FRAMES - HOP // FRAME
    assert cache.nbytes == frames.shape[0] * per_frame < 1.5e6
    assert frames.base is None  # its own copy, not a view pinning a whole batch
    # The cache does not grow with the stream.
    _, _, _, longer = run_stream(scorer, stream, starts[:30])
    assert longer.nbytes == cache.nbytes
    # A coarser hop keeps fewer frames.
    coarse = StreamCache(hop=2 * HOP)
    run_stream(scorer, stream, starts[:3:2], cache=coarse)
    assert coarse.nbytes == (INTERIOR_FRAMES - 2 * HOP // FRAME) * per_frame


def test_runs_of_one_stream_in_flight_together_stay_exact(scorer, stream, starts):
    """A server may have several calls of one stream in flight: each window is assembled from what the cache
    held when it was planned, and a later window's features are not overwritten by an earlier one's."""
    graphs = {"full": scorer.full, "cnn": scorer.cnn, "head": scorer.head}

    def run(calls):
        return [scorer._run(graphs[c.graph], c.feeds) for c in calls]

    cache = StreamCache()
    first = scorer.score([stream[:WINDOW]], [0], [cache])[0]
    # Windows 1..3 planned together, then answered one after another out of order: window 3 is assembled after
    # window 2 stored its features, and window 1 comes back last.
    order = [2, 3, 1]
    plans = {k: plan_scoring([stream[k * HOP : k * HOP + WINDOW]], [k * HOP], [cache]) for k in order}
    pending = {k: next(p) for k, p in plans.items()}
    mos = {0: float(first[0])}
    for k in order:
        try:
            while True:
                pending[k] = plans[k].send(run(pending[k]))
        except StopIteration as done:
            mos[k] = float(done.value[0][0])
    want = full_mos(scorer, [stream[k * HOP : k * HOP + WINDOW] for k in range(4)])
    assert np.max(np.abs(np.array([mos[k] for k in range(4)]) - want)) <= MOS_TOLERANCE
    assert cache.start == 3 * HOP  # the latest window's features are what the cache keeps
    m, c = scorer.score([stream[4 * HOP : 4 * HOP + WINDOW]], [4 * HOP], [cache])
    assert abs(float(m[0]) - float(full_mos(scorer, [stream[4 * HOP : 4 * HOP + WINDOW]])[0])) <= MOS_TOLERANCE
