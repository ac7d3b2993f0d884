"""Incremental Distill-MOS where the monitor uses it: the default, the same scores as --no-incremental.

The stream is real speech with level changes (+-10 dB), a silence (the gate skips windows, so the
cache must be dropped or bridged) and a clean/coded switch; it runs through the engine as --fast does,
in real time with thinning forced, and through 'score'.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring.load import ScoringOptions, load_scorer
from scoreq_live.sources import FileSource
from tests.helpers import MUSHRA, SCOREQ_PAIR, speech_16k

TOLERANCE = 0.005  # MOS; measured differences are ~1e-5


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory, data):
    refs = [speech_16k(p) for p in sorted(MUSHRA.glob("stim_0*/ref.wav"))]
    clean, opus = speech_16k(SCOREQ_PAIR / "ref.wav"), speech_16k(SCOREQ_PAIR / "opus.wav")
    db = lambda g: np.float32(10 ** (g / 20))  # noqa: E731
    x = np.concatenate([refs[0], refs[1], db(10) * refs[2], db(10) * refs[3], db(-10) * refs[4],
                        np.zeros(10 * 16000, np.float32), refs[5], clean, opus, db(-10) * refs[6], refs[7]])
    x = (0.9 / np.max(np.abs(x)) * x).astype(np.float32)
    path = tmp_path_factory.mktemp("inc") / "levels.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    return path


def scores(events):
    return {(e.stream, e.window): (e.mos, e.reason) for e in events if isinstance(e, ScoreEvent)}


async def run(loaded, path, fast=True, max_latency_s=None, names=("a", "b")):
    bus = EventBus()
    sub = bus.subscribe(maxsize=100_000)
    cfg = EngineConfig(stream=loaded.stream, max_batch=loaded.scorer.max_batch, fast=fast,
                       max_latency_s=max_latency_s)
    await Engine(loaded.scorer, [FileSource(n, path, fast=fast) for n in names], cfg, bus).run()
    return [ev async for ev in sub]


def compare(inc, full):
    assert inc.keys() == full.keys()
    both = [(inc[k][0], full[k][0]) for k in inc if inc[k][0] is not None and full[k][0] is not None]
    assert len(both) >= 20
    worst = max(abs(a - b) for a, b in both)
    assert worst <= TOLERANCE, worst
    return worst


def test_incremental_is_the_default_and_scores_as_full_windows_do(stream_file):
    inc = load_scorer(ScoringOptions(device="cpu", max_batch=4))
    full = load_scorer(ScoringOptions(device="cpu", max_batch=4, incremental=False))
    assert inc.scorer.incremental is not None and full.scorer.incremental is None
    evs_inc = asyncio.run(run(inc, stream_file))
    evs_full = asyncio.run(run(full, stream_file))
    compare(scores(evs_inc), scores(evs_full))
    counts = inc.scorer.incremental_counts
    # Two streams, each: one first window, windows after the silence recomputed, most windows incremental.
    assert counts["incremental"] > counts["recomputed"] > 0 and counts["reasons"]["first"] == 2
    assert any(r in counts["reasons"] for r in ("skip", "peak"))


def test_thinned_windows_stay_exact(stream_file):
    """Thinning (an overloaded live monitor skips a stream's windows) makes a stream's starts jump: one skipped
    window, then runs of them. The scorer bridges or drops the cache; every score equals the full model's."""
    from scoreq_live.core.stream import StreamCore

    inc = load_scorer(ScoringOptions(device="cpu", max_batch=4))
    full = load_scorer(ScoringOptions(device="cpu", max_batch=4, incremental=False))
    core = StreamCore("a", inc.stream)
    x = speech_16k(stream_file)
    windows = [w for w in core.feed(x, 0.0) if w.end - w.start == inc.stream.window]
    kept = [w for k, w in enumerate(windows) if k % 3 != 1 and not 10 <= k < 14]  # every third, then four in a row
    state = inc.scorer.new_state()
    got = [inc.scorer.score_named([w.audio], [state], [w.start])[0, 0] for w in kept]
    want = full.scorer.score_named([w.audio for w in kept])[:, 0]
    assert np.abs(np.array(got) - want).max() <= TOLERANCE
    counts = inc.scorer.incremental_counts
    assert counts["incremental"] > 0 and counts["windows"] == len(kept)


def test_score_and_the_start_up_line_say_which(stream_file, tmp_path):
    outs = {}
    for flag in ((), ("--no-incremental",)):
        path = tmp_path / f"out{len(flag)}.json"
        proc = subprocess.run([sys.executable, "-m", "scoreq_live", "score", str(stream_file), "--json", str(path),
                               "--device", "cpu", *flag], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs[flag] = json.loads(path.read_text())[0]
    a, b = outs[()], outs[("--no-incremental",)]
    assert abs(a["mos"] - b["mos"]) < 1e-4
    assert max(abs(x["mos"] - y["mos"]) for x, y in zip(a["windows"], b["windows"]) if x["mos"] is not None) < 1e-3
    # The monitor says which at start.
    for flag, said in (((), "incremental"), (("--no-incremental",), "every window in full")):
        proc = subprocess.run([sys.executable, "-m", "scoreq_live", "--input", str(SCOREQ_PAIR / "ref.wav"), "--fast",
                               "--no-tui", "--device", "cpu", *flag], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stderr.split())  # the console wraps long lines
        line = text[text.index("scoring with"):][:400]
        assert said in line, line
