"""`scoreq-live bench` on a real ONNX model: every measurement runs and its report holds together."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from scoreq_live.bench import BLOCK_S, LIVE_RATE, ClipSource, measure_memory, speech_clip
from scoreq_live.core.stream import StreamConfig


async def _collect(src: ClipSource) -> np.ndarray:
    return np.concatenate([f async for f in src.frames()])


def test_clip_source_loops_real_speech_in_blocks():
    clip = speech_clip()
    assert clip.dtype == np.float32 and clip.size > 20 * LIVE_RATE
    duration = clip.size / LIVE_RATE + 3.0  # past the loop point
    src = ClipSource("s", clip, duration, fast=True, offset=1000)
    out = asyncio.run(_collect(src))
    block = int(LIVE_RATE * BLOCK_S)
    assert out.size == int(duration * LIVE_RATE) // block * block
    np.testing.assert_array_equal(out[:5000], clip[1000:6000])
    wrap = clip.size - 1000  # the loop point: the clip starts again
    np.testing.assert_array_equal(out[wrap:wrap + 5000], clip[:5000])


def test_memory_per_stream_counts_the_ring_and_window():
    stream = StreamConfig(window_s=2.0, hop_s=0.5, model="x")
    m = measure_memory(stream, speech_clip(), 20, 8)
    # A stream holds at least its ring buffer (window + hop of float32 at 16 kHz) and stays well under 1 MB.
    ring_mb = (2.0 + 0.5) * 16000 * 4 / 2**20
    assert ring_mb < m["mb_per_stream"] < 1.0, m


@pytest.mark.slow
def test_bench_command_reports_every_measurement(tiny_nr, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "scoreq_live", "bench", "--model", str(tiny_nr), "--model-kind", "mos",
         "--window", "1", "--hop", "0.5", "--quick", "--soak-s", "20", "--soak-streams", "10",
         "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["model"] == tiny_nr.stem and rep["device"] == "cpu" and rep["hop_s"] == 0.5
    assert len(rep["rounds"]["bare"]) == len(rep["rounds"]["naive"]) == len(rep["rounds"]["engine"]) == 2
    for key in ("bare", "naive", "engine"):
        s = rep["windows_per_s"][key]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    # Ratios are taken round by round, from the same rounds.
    ratios = [e / b for e, b in zip(rep["rounds"]["engine"], rep["rounds"]["bare"])]
    assert rep["engine_vs_bare"]["median"] == pytest.approx(float(np.median(ratios)))
    assert rep["max_score_difference_vs_naive"] < 1e-4  # the monitor scores what the naive loop scores
    assert rep["host"]["streams_per_core"] > 10
    assert 0 < rep["memory"]["mb_per_stream"] < 1.0
    trials = rep["capacity_trials"]
    assert trials and all(t["budget_ms"] > 0 for t in trials)
    assert rep["capacity_streams"] == max([t["streams"] for t in trials if t["ok"]], default=0)
    assert rep["capacity_streams"] >= 1  # a tiny model keeps up with at least one live stream
    soak = rep["soak"]
    assert soak["simulated_s"] == 20 and soak["windows"] > 0 and soak["rss_growth"] is not None
    assert set(rep["goals"]) == {"engine_vs_bare", "capacity_vs_naive", "host_streams_per_core", "mb_per_stream",
                                 "soak_rss_growth"}
    assert "goal" in r.stdout and "live capacity" in r.stdout


def test_bench_refuses_nonsense(tiny_nr):
    r = subprocess.run([sys.executable, "-m", "scoreq_live", "bench", "--model", str(tiny_nr), "--model-kind", "mos",
                        "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "at least 1" in r.stderr


def test_bench_refuses_a_backend_before_loading_anything():
    # bench measures the model on this machine (its bare and naive baselines run the ONNX file): a Triton
    # backend is refused in one line, before any model loads or any server is asked.
    r = subprocess.run([sys.executable, "-m", "scoreq_live", "bench", "--backend", "triton://127.0.0.1:1/distillmos"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot use --backend" in r.stderr, r.stderr
    assert r.stderr.count("scoreq-live: error") == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
