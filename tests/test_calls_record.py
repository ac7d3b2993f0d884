"""Stream and call records folded from events (scoreq_live.calls.record): pure, on hand-made event sequences."""

import numpy as np
import pytest

from scoreq_live.calls.record import JOIN_S, Recorder, summarise, worst_span
from scoreq_live.core.events import (
    AlertEvent,
    CallRecord,
    ClearedEvent,
    ScoreEvent,
    StreamEnded,
    StreamRecord,
    StreamStarted,
    event_from_dict,
)
from scoreq_live.sinks.bands import Bands


def started(name, ts, call="", mode="nr"):
    return StreamStarted(stream=name, ts=ts, source="rtp", detail=f"{name} detail", model="m", mode=mode,
                         window_s=4.0, hop_s=1.0, id=f"id-{name}-{ts}", call=call, meta={"ssrc": "1"})


def score(name, i, value, mode="nr", reason=None):
    kw = {"mos": value} if mode == "nr" else {"distance": value}
    return ScoreEvent(stream=name, ts=100.0 + i, window=i, t_start=float(i), t_end=i + 4.0, mode=mode,
                      reason=reason, **kw)


def feed(rec, events):
    out = []
    for ev in events:
        out += list(rec.feed(ev))
    return out


def test_a_stream_record_summarises_its_published_scores_bands_skips_alerts_and_network():
    rec = Recorder({"nr": Bands.for_mode("nr")})
    values = [4.5, 4.2, 3.5, 2.0, 2.1, 2.2, 4.4, 4.1, 3.9, 4.6, 4.0, 1.5]
    evs = [started("a", 10.0)]
    for i, v in enumerate(values):
        evs.append(score("a", i, v + 1e-6))  # published rounded to 4 digits: the record uses what was published
        if i == 3:
            evs.append(AlertEvent(stream="a", ts=0, rule="mos<3 for 2s", metric="mos", t=7.0, id="a:r"))
        if i == 6:
            evs.append(ClearedEvent(stream="a", ts=0, rule="mos<3 for 2s", metric="mos", t=10.0, id="a:r"))
    evs += [score("a", 12, None, reason="no_speech"), score("a", 13, None, reason="no_speech"),
            score("a", 14, None, reason="overloaded")]
    evs.append(AlertEvent(stream="a", ts=0, rule="mos<3 for 2s", metric="mos", t=15.0, id="a:r2"))
    net = {"codec": "PCMU", "loss_pct": 2.5, "max_burst": 3}
    out = feed(rec, [*evs, StreamEnded(stream="a", ts=50.0, reason="bye", t=18.0, windows=15, scored=12, net=net)])
    s, c = out
    assert isinstance(s, StreamRecord) and isinstance(c, CallRecord)
    assert s.id == "id-a-10.0" and s.started == 10.0 and s.ended == 50.0 and s.reason == "bye"
    assert s.scored == 12 and s.windows == 15 and s.skipped == {"no_speech": 2, "overloaded": 1}
    assert s.score["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert s.score["min"] == 1.5 and s.score["max"] == 4.6
    assert s.score["p10"] == pytest.approx(np.percentile(values, 10), abs=1e-4)
    good = sum(v >= 4 for v in values) / 12
    poor = sum(v < 3 for v in values) / 12
    assert s.bands == pytest.approx({"good": good, "fair": 1 - good - poor, "poor": poor}, abs=1e-4)
    assert s.net == net
    # Raised at 7 s, cleared at 10 s; the second one still raised at the end (18 s).
    assert s.alerts == [{"rule": "mos<3 for 2s", "metric": "mos", "t_raised": 7.0, "t_cleared": 10.0,
                         "duration_s": 3.0},
                        {"rule": "mos<3 for 2s", "metric": "mos", "t_raised": 15.0, "t_cleared": None,
                         "duration_s": 3.0}]
    assert s.alert_s == 6.0
    assert c.streams[0]["id"] == s.id and c.key == s.id and c.alerts == 2
    # JSON and back, as a relay receives it.
    assert event_from_dict(s.to_dict()) == s and event_from_dict(c.to_dict()) == c


def test_worst_span_is_the_lowest_mean_stretch_and_highest_for_distances():
    t0 = np.arange(20.0)
    v = np.full(20, 4.0)
    v[8:12] = 2.0  # windows starting 8..11 s are bad
    w = worst_span(t0, t0 + 4.0, v, lower_is_worse=True, span_s=10.0)
    # windows starting at s..s+6 end within 10 s of s: 7 windows; the worst such group holds all four bad ones
    assert w["mean"] == pytest.approx((4 * 2.0 + 3 * 4.0) / 7, abs=1e-5) and 5.0 <= w["t_start"] <= 8.0
    assert w["t_end"] - w["t_start"] <= 10.0
    d = worst_span(t0, t0 + 4.0, 5.0 - v, lower_is_worse=False, span_s=10.0)
    assert d["mean"] == pytest.approx(5.0 - w["mean"], abs=1e-5)
    # A stream shorter than the span: its windows as a whole.
    short = worst_span(t0[:3], t0[:3] + 4.0, np.array([3.0, 4.0, 5.0]), True, span_s=10.0)
    assert short == {"t_start": 0.0, "t_end": 6.0, "mean": 4.0}
    assert summarise([], [], [], "nr") is None


def test_streams_sharing_a_call_key_make_one_call_record_when_the_last_ends():
    rec = Recorder({"nr": Bands.for_mode("nr")})
    out = feed(rec, [started("in", 1.0, call="CA1"), started("out", 1.2, call="CA1"), started("solo", 1.5),
                     score("in", 0, 4.0), score("out", 0, 2.0), score("out", 1, 3.0), score("solo", 0, 3.3),
                     StreamEnded(stream="in", ts=20.0, t=19.0, windows=1, scored=1)])
    assert [type(e) for e in out] == [StreamRecord]  # "out" is still live: no call record yet
    out = feed(rec, [StreamEnded(stream="out", ts=21.0, t=19.8, windows=2, scored=2),
                     StreamEnded(stream="solo", ts=22.0, t=10.0, windows=1, scored=1)])
    recs = [e for e in out if isinstance(e, StreamRecord)]
    calls = [e for e in out if isinstance(e, CallRecord)]
    assert len(recs) == 2 and len(calls) == 2
    call = next(c for c in calls if c.key == "CA1")
    assert [s["stream"] for s in call.streams] == ["in", "out"]
    assert call.mean == pytest.approx(3.0) and call.min == 2.0 and call.worst_mean == pytest.approx(2.5)
    assert call.started == 1.0 and call.ended == 21.0
    assert all(r.call == call.id for r in recs if r.stream == "out")
    solo = next(c for c in calls if c.key != "CA1")
    assert solo.id != call.id and [s["stream"] for s in solo.streams] == ["solo"]

    # A late direction with the same key joins the call and the record is sent again, same id, two+one streams.
    out = feed(rec, [started("late", 30.0, call="CA1"), score("late", 0, 1.0),
                     StreamEnded(stream="late", ts=35.0, t=4.0, windows=1, scored=1)])
    again = [e for e in out if isinstance(e, CallRecord)]
    assert len(again) == 1 and again[0].id == call.id and len(again[0].streams) == 3
    assert again[0].worst_mean == 1.0

    # Long after the call's end, the same key is a new call.
    out = feed(rec, [started("next", 35.0 + JOIN_S + 1, call="CA1"),
                     StreamEnded(stream="next", ts=80.0 + JOIN_S, t=4.0, windows=0, scored=0)])
    assert [e for e in out if isinstance(e, CallRecord)][0].id != call.id


def test_distance_records_count_the_worst_as_the_highest():
    rec = Recorder({"ref": Bands.for_mode("ref", (0.3, 0.6))})
    out = feed(rec, [started("r", 0.0, mode="ref"), score("r", 0, 0.2, "ref"), score("r", 1, 0.7, "ref"),
                     StreamEnded(stream="r", ts=9.0, t=5.0, windows=2, scored=2)])
    s, c = out
    assert s.score["name"] == "distance" and s.bands == {"good": 0.5, "fair": 0.0, "poor": 0.5}
    assert c.min == 0.7 and c.worst_mean == pytest.approx(0.45)  # "min" is the worst window: the largest distance
