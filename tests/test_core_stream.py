"""The stream core driven with plain data: no sockets, no sleeps, time passed in."""

import json

import numpy as np
import pytest

from scoreq_live.core.events import SCHEMA_VERSION
from scoreq_live.core.gate import NO_SPEECH, SILENT
from scoreq_live.core.stream import StreamConfig, StreamCore
from tests.helpers import SCOREQ_PAIR, speech_16k

CFG = StreamConfig(window_s=2.0, hop_s=1.0, model="m", mode="nr", smoothing_s=0.0)


def test_silent_windows_are_not_scored_and_carry_the_reason():
    core = StreamCore("s", CFG)
    assert core.feed(np.zeros(16000 * 4, np.float32), now=0.0) == []
    events = core.drain(now=0.0, wall=0.0)
    assert [e.window for e in events] == [0, 1, 2]
    assert all(e.mos is None and e.reason == SILENT for e in events)


def test_low_level_noise_without_speech_is_not_scored():
    rng = np.random.default_rng(1)
    core = StreamCore("s", CFG)
    noise = (rng.standard_normal(16000 * 3) * 0.003).astype(np.float32)  # about -50 dBFS hiss
    assert core.feed(noise, 0.0) == []
    assert {e.reason for e in core.drain(0.0, 0.0)} == {NO_SPEECH}


def test_events_leave_in_window_order_whatever_order_results_arrive(data):
    speech = speech_16k(SCOREQ_PAIR / "ref.wav")[:16000 * 3]
    x = np.concatenate([speech, np.zeros(16000 * 3, np.float32)])
    core = StreamCore("s", CFG)
    due = core.feed(x, now=10.0)
    assert [w.index for w in due] == [0, 1, 2]  # windows 3 and 4 are silence: resolved already
    assert core.drain(10.0, 0.0) == []  # window 0 still with the scorer
    core.resolve(due[2], 3.0)
    core.resolve(due[1], 2.0)
    assert core.drain(10.2, 0.0) == []
    core.resolve(due[0], 4.0)
    events = core.drain(10.5, 0.0)
    assert [e.window for e in events] == [0, 1, 2, 3, 4]
    assert [e.mos for e in events[:3]] == [4.0, 2.0, 3.0]
    assert events[0].latency_ms == pytest.approx(500.0)
    assert events[3].reason is not None and events[3].smoothed == 3.0  # the smoothed value is held over gaps


def test_nan_and_inf_never_reach_the_windows():
    core = StreamCore("s", StreamConfig(window_s=1.0, hop_s=1.0, min_speech=0.0, silence_dbfs=-200))
    x = np.full(16000, np.nan, np.float32)
    x[::7] = np.inf
    (w,) = core.feed(x, 0.0)
    assert np.all(np.isfinite(w.audio)) and core.non_finite == 16000


def test_score_event_json_has_the_documented_fields():
    core = StreamCore("call", StreamConfig(window_s=1.0, hop_s=1.0, min_speech=0.0, silence_dbfs=-200,
                                           model="m", mode="ref"))
    (w,) = core.feed(np.full(16000, 0.1, np.float32), 1.0)
    core.resolve(w, 0.25)
    (ev,) = core.drain(1.2, 1700000000.0)
    d = json.loads(ev.to_json())
    assert d["v"] == SCHEMA_VERSION and d["type"] == "score"
    assert set(d) == {"v", "type", "stream", "ts", "window", "t_start", "t_end", "mode", "distance",
                      "smoothed", "speech", "level_dbfs", "model", "latency_ms", "reason"}
    assert d["distance"] == 0.25 and "mos" not in d and d["t_end"] == 1.0


def test_abandoned_windows_leave_in_order_unscored_with_the_reason():
    core = StreamCore("s", StreamConfig(window_s=1.0, hop_s=1.0, min_speech=0.0, silence_dbfs=-200,
                                        smoothing_s=0.0))
    due = core.feed(np.full(16000 * 3, 0.1, np.float32), 0.0)
    assert [w.index for w in due] == [0, 1, 2] and core.pending == 3
    core.resolve(due[1], 3.5)
    assert core.abandon("stopped") == 2  # windows 0 and 2; window 1 came back in time
    assert core.pending == 0 and core.abandon("stopped") == 0
    events = core.drain(0.0, 0.0)
    assert [(e.window, e.mos, e.reason) for e in events] == [(0, None, "stopped"), (1, 3.5, None),
                                                             (2, None, "stopped")]
    assert core.scored == 1


def test_speech_windows_are_the_windows_the_monitor_would_score(data):
    from scoreq_live.core.stream import speech_windows

    speech = speech_16k(SCOREQ_PAIR / "ref.wav")[:16000 * 3]
    x = np.concatenate([speech, np.zeros(16000 * 3, np.float32)])
    windows = speech_windows(x, CFG)
    due = StreamCore("s", CFG).feed(x, 0.0)
    assert len(windows) == len(due) == 3  # the silent windows at the end are gated out
    assert all(np.array_equal(a, w.audio) for a, w in zip(windows, due))
