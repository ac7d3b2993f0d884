"""Alert rules and their evaluation in stream time, driven with plain events."""

import json

import pytest

from scoreq_live.bus import EventBus
from scoreq_live.core.alerts import AlertEvaluator, RuleError, check_rule_mode, parse_rule
from scoreq_live.core.events import (
    AlertEvent,
    ClearedEvent,
    NetQuality,
    ScoreEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
)


def score(t, mos=None, stream="a", mode="nr", distance=None, smoothed=None, speech=0.8):
    return ScoreEvent(stream=stream, ts=1000.0 + t, window=int(t), t_start=max(0.0, t - 4), t_end=t, mode=mode,
                      mos=mos, distance=distance, smoothed=smoothed, speech=speech, model="m")


def run(rules, values, hop=1.0, **kw):
    """Feed one score per hop; return [(type, t, value)] of the alert events."""
    ev = AlertEvaluator([parse_rule(r) for r in rules])
    out = []
    for i, v in enumerate(values):
        for a in ev.feed(score((i + 1) * hop, v, **kw)):
            out.append((a.type, a.t, a.value))
    return out


@pytest.mark.parametrize("text, canonical, metric, op, threshold, for_s", [
    ("mos<3.0 for 10s", "mos<3.0 for 10s", "mos", "<", 3.0, 10.0),
    ("  MOS < 3   for 10  ", "mos<3.0 for 10s", "mos", "<", 3.0, 10.0),
    ("distance>0.6 for 5s", "distance>0.6 for 5s", "distance", ">", 0.6, 5.0),
    ("smoothed<3.5 for 500ms", "smoothed<3.5 for 0.5s", "smoothed", "<", 3.5, 0.5),
    ("level<-50 for 1m", "level_dbfs<-50.0 for 60s", "level_dbfs", "<", -50.0, 60.0),
    ("speech<0.1", "speech<0.1", "speech", "<", 0.1, 0.0),
    ("latency>500 for 2s hysteresis 50", "latency_ms>500.0 for 2s hysteresis 50", "latency_ms", ">", 500.0, 2.0),
])
def test_rules_parse_to_one_canonical_form(text, canonical, metric, op, threshold, for_s):
    r = parse_rule(text)
    assert (r.text, r.metric, r.op, r.threshold, r.for_s) == (canonical, metric, op, threshold, for_s)
    assert parse_rule(r.text) == r


@pytest.mark.parametrize("text, message", [
    ("mos <= 3", "cannot read"), ("pesq<3 for 2s", "unknown metric"), ("mos<3 for 2h", "cannot read"),
    ("mos<3 for", "cannot read"), ("", "cannot read"), ("mos<nan", "cannot read"),
])
def test_bad_rules_are_refused_with_what_is_wrong(text, message):
    with pytest.raises(RuleError, match=message):
        parse_rule(text)


def test_rules_on_a_score_the_mode_does_not_give_are_refused():
    with pytest.raises(RuleError, match="distances, not a MOS"):
        check_rule_mode(parse_rule("mos<3"), "ref")
    with pytest.raises(RuleError, match="MOS, not a distance"):
        check_rule_mode(parse_rule("distance>0.5"), "nr")
    check_rule_mode(parse_rule("smoothed<3"), "ref")


def test_raises_only_after_the_condition_held_for_the_duration_and_clears_after_recovering_as_long():
    # Good for 5 s, bad from t=6; "for 4s" counts from the first bad window (t=6) -> raised at t=10.
    values = [4.2] * 5 + [2.5] * 10 + [4.0] * 10
    assert run(["mos<3.0 for 4s"], values) == [("alert", 10.0, 2.5), ("cleared", 20.0, 4.0)]


def test_a_score_hovering_at_the_threshold_does_not_flap():
    hover = [2.95, 3.05] * 30  # across the threshold at every window, inside the 0.1 dead band
    out = run(["mos<3.0 for 4s"], [4.0] * 3 + hover)
    assert [k for k, _, _ in out] == ["alert"]  # raised once, never cleared while it hovers
    # Without hysteresis the same scores would raise and clear again and again.
    flappy = run(["mos<3.0 hysteresis 0"], [4.0] * 3 + hover)
    assert len(flappy) > 20


def test_dead_band_neither_resets_a_pending_raise_nor_starts_a_clear():
    # Pending from t=1; 3.05 (dead band) at t=3 does not reset it; raised at t=5.
    assert run(["mos<3.0 for 4s"], [2.5, 2.5, 3.05, 2.5, 2.5]) == [("alert", 5.0, 2.5)]
    # A clearly good window (>= 3.1) resets the wait: raised 4 s after the next bad window.
    assert run(["mos<3.0 for 4s"], [2.5, 2.5, 3.2, 2.5, 2.5, 2.5, 2.5, 2.5]) == [("alert", 8.0, 2.5)]
    # Once raised, dead-band windows do not count towards clearing, and a bad one restarts the wait.
    out = run(["mos<3.0 for 2s"], [2.5] * 3 + [3.05] * 5 + [3.5, 3.5, 2.9, 3.5, 3.5, 3.5])
    assert out == [("alert", 3.0, 2.5), ("cleared", 14.0, 3.5)]


def test_unscored_windows_are_no_evidence_either_way():
    # Bad at t=1, silence, bad at t=6: held from 1 to 6. Good from t=8 (a gap at 9): cleared at 12.
    values = [2.5, 2.5, None, None, None, 2.5, None, 4.0, None, 4.0, 4.0, 4.0]
    assert run(["mos<3.0 for 4s"], values) == [("alert", 6.0, 2.5), ("cleared", 12.0, 4.0)]


def test_distance_rules_alert_above_the_threshold():
    values = [0.2, 0.2, 0.8, 0.9, 0.7, 0.62, 0.59, 0.5, 0.5, 0.5]
    # margin 5 % of 0.6 = 0.03: 0.59 is in the dead band, 0.5 is clearly good.
    ev = AlertEvaluator([parse_rule("distance>0.6 for 2s")])
    got = []
    for i, d in enumerate(values):
        got += [(a.type, a.t) for a in ev.feed(score(i + 1.0, None, mode="ref", distance=d))]
    assert got == [("alert", 5.0), ("cleared", 10.0)]


def test_alert_events_carry_the_rule_and_pair_by_id():
    ev = AlertEvaluator([parse_rule("mos<3.0 for 1s")])
    out = []
    for i, v in enumerate([2.0, 2.0, 4.0, 4.0]):
        out += ev.feed(score(i + 1.0, v, stream="call-7"))
    alert, cleared = out
    assert isinstance(alert, AlertEvent) and isinstance(cleared, ClearedEvent)
    d = alert.to_dict()
    assert d == {"v": 1, "type": "alert", "stream": "call-7", "ts": 1002.0, "rule": "mos<3.0 for 1s",
                 "metric": "mos", "op": "<", "threshold": 3.0, "for_s": 1.0, "value": 2.0, "t": 2.0,
                 "id": "call-7:mos<3.0 for 1s"}
    c = cleared.to_dict()
    assert c["type"] == "cleared" and c["id"] == d["id"] and c["value"] == 4.0 and c["reason"] == "recovered"


def test_streams_are_independent_and_an_ended_stream_clears_its_alerts():
    ev = AlertEvaluator([parse_rule("mos<3.0"), parse_rule("speech<0.5 for 1s")])
    out = []
    for t in (1.0, 2.0):
        out += ev.feed(score(t, 2.0, stream="a", speech=0.1))
        out += ev.feed(score(t, 4.0, stream="b"))
    assert sorted((a.stream, a.rule) for a in out) == [("a", "mos<3.0"), ("a", "speech<0.5 for 1s")]
    assert {s for s, _ in ev.active()} == {"a"}
    ended = ev.feed(StreamEnded(stream="a", ts=5.0, t=2.5))
    assert [(a.type, a.reason, a.t) for a in ended] == [("cleared", "stream_ended", 2.5)] * 2
    assert ev.active() == [] and ev.feed(StreamError(stream="a", ts=6.0, error="x")) == []
    # A stream that starts again starts clean.
    ev.feed(score(1.0, 2.0, stream="b"))
    ev.feed(StreamStarted(stream="b", ts=7.0))
    assert ev.active() == []


def test_the_bus_publishes_alert_events_right_after_their_cause():
    bus = EventBus()
    sub = bus.subscribe()
    bus.derive.append(AlertEvaluator([parse_rule("mos<3.0")]).feed)
    bus.publish(score(1.0, 4.0))
    bus.publish(score(2.0, 2.0))
    bus.publish(score(3.0, 2.0))
    got = []
    while (e := sub.get_nowait()) is not None:
        got.append((e.type, getattr(e, "t_end", getattr(e, "t", None))))
    assert got == [("score", 1.0), ("score", 2.0), ("alert", 2.0), ("score", 3.0)]


def net(loss_pct, jitter_ms):
    return NetQuality(codec="PCMU", expected=200, received=round(200 * (1 - loss_pct / 100)), lost=0, duplicated=0,
                      late=0, loss_pct=loss_pct, jitter_ms=jitter_ms, concealed=loss_pct / 100, r_factor=80.0,
                      mos_cq=4.0)


def test_loss_and_jitter_rules_read_the_windows_network_numbers():
    assert parse_rule("loss>5 for 10s").text == "loss_pct>5.0 for 10s"
    assert parse_rule("jitter>30 for 10s").text == "jitter_ms>30.0 for 10s"
    ev = AlertEvaluator([parse_rule("loss>5 for 3s"), parse_rule("jitter>30 for 3s")])
    out = []
    # loss 8 % for 4 windows, then 0 %; jitter 40 ms throughout; windows without net (a file) are no evidence.
    for i, (loss, jit) in enumerate([(8, 40)] * 4 + [(0, 40)] * 5):
        e = score(float(i + 1), 4.0)
        e.net = net(loss, jit)
        out += [(a.type, a.metric, a.t, a.value) for a in ev.feed(e)]
    out += [(a.type, a.metric, a.t, a.value) for a in ev.feed(score(10.0, 4.0))]
    assert ("alert", "loss_pct", 4.0, 8.0) in out and ("alert", "jitter_ms", 4.0, 40.0) in out
    assert ("cleared", "loss_pct", 8.0, 0.0) in out
    assert not any(a[0] == "cleared" and a[1] == "jitter_ms" for a in out)


def test_score_events_carry_net_only_for_packet_streams():
    e = score(4.0, 3.5)
    assert "net" not in e.to_dict()
    e.net = net(2.5, 12.3456)
    d = json.loads(e.to_json())["net"]
    assert d["loss_pct"] == 2.5 and d["jitter_ms"] == 12.346 and d["codec"] == "PCMU" and d["received"] == 195


def test_a_rule_on_a_named_score_reads_the_events_scores():
    ev = AlertEvaluator([parse_rule("dnsmos.bak<3 for 2s")])
    out = []
    for i, bak in enumerate([3.5, 2.5, 2.4, 2.2, None, 3.6, 3.7, 3.8]):
        e = score(i + 1.0, mos=3.9)
        e.scores = None if bak is None else {"mos": 3.9, "dnsmos.bak": bak}
        out += [(a.type, a.t, a.value) for a in ev.feed(e)]
    # Held from t=2 to t=4 (2 s): raised; the unscored window is no evidence; clear 2 s past the margin.
    assert out == [("alert", 4.0, 2.2), ("cleared", 8.0, 3.8)]


def test_a_named_score_the_model_does_not_give_is_refused_and_typos_are_not_named_scores():
    rule = parse_rule("dnsmos.sig<3")
    check_rule_mode(rule, "nr", ("mos", "dnsmos.sig"))
    with pytest.raises(RuleError, match="no model gives a score 'dnsmos.sig'.*their scores: mos"):
        check_rule_mode(rule, "nr", ("mos",))
    with pytest.raises(RuleError, match="unknown metric 'moss'"):
        parse_rule("moss<3")
