"""Prometheus metrics folded from plain events, read back with prometheus_client's own parser."""

from prometheus_client.parser import text_string_to_metric_families

from scoreq_live.bus import EventBus
from scoreq_live.core.events import AlertEvent, ClearedEvent, ScoreEvent, StreamError, StreamStarted
from scoreq_live.sinks.metrics import MetricsSink


def samples(metrics: MetricsSink) -> dict:
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_ref_mode_distances_alert_series_and_removal_on_stream_error():
    m = MetricsSink(model="distillmos-embedding", mode="ref")
    m.update(StreamStarted(stream="x", ts=0, mode="ref"))
    m.update(ScoreEvent(stream="x", ts=0, mode="ref", distance=0.42, smoothed=0.4, speech=0.7))
    alert = dict(stream="x", ts=0, rule="distance>0.3 for 5s", metric="distance", op=">", threshold=0.3,
                 for_s=5.0, id="x:distance>0.3 for 5s")
    m.update(AlertEvent(value=0.42, t=9.0, **alert))
    s = samples(m)
    assert s[("scoreq_live_distance", (("stream", "x"),))] == 0.42
    assert s[("scoreq_live_distance_smoothed", (("stream", "x"),))] == 0.4
    assert not [k for k in s if k[0] == "scoreq_live_mos"]
    assert s[("scoreq_live_alert_active", (("rule", "distance>0.3 for 5s"), ("stream", "x")))] == 1
    m.update(ClearedEvent(value=0.2, t=20.0, **alert))
    s = samples(m)
    assert not [k for k in s if k[0] == "scoreq_live_alert_active"]
    assert s[("scoreq_live_alerts_total", (("rule", "distance>0.3 for 5s"),))] == 1
    m.update(AlertEvent(value=0.5, t=30.0, **alert))
    m.update(StreamError(stream="x", ts=0, error="gone"))
    assert not [k for k in samples(m) if ("stream", "x") in k[1]]


def test_drops_of_every_consumer_are_reported():
    class Engine:  # what attach() reads: the engine's bus and its batch observers
        bus = EventBus()
        batch_observers: list = []

    m = MetricsSink()
    m.attach(Engine)
    slow = Engine.bus.subscribe(maxsize=2, name="TerminalSink")
    for i in range(5):
        Engine.bus.publish(StreamStarted(stream=str(i), ts=0))
    m.watch_drops("webhook", lambda: 7)
    Engine.batch_observers[0](4, 0.2)
    s = samples(m)
    assert s[("scoreq_live_events_dropped_total", (("consumer", "TerminalSink"),))] == 3 == slow.dropped
    assert s[("scoreq_live_events_dropped_total", (("consumer", "webhook"),))] == 7
    assert s[("scoreq_live_batch_windows_sum", ())] == 4 and s[("scoreq_live_inference_seconds_sum", ())] == 0.2


def test_every_named_score_is_a_series_and_goes_with_its_stream():
    m = MetricsSink(model="multi", mode="nr")
    m.update(StreamStarted(stream="room", ts=0))
    m.update(ScoreEvent(stream="room", ts=0, mos=3.1, smoothed=3.1, speech=0.9,
                        scores={"mos": 3.1, "dnsmos.sig": 3.4, "dnsmos.bak": 1.9}))
    m.update(ScoreEvent(stream="room", ts=1, reason="no_speech"))  # unscored: the latest scores stand
    s = samples(m)
    assert s[("scoreq_live_score", (("score", "dnsmos.bak"), ("stream", "room")))] == 1.9
    assert s[("scoreq_live_score", (("score", "mos"), ("stream", "room")))] == 3.1
    assert s[("scoreq_live_mos", (("stream", "room"),))] == 3.1
    m.update(StreamError(stream="room", ts=2, error="gone"))
    assert not [k for k in samples(m) if k[0] == "scoreq_live_score"]


async def test_the_event_loops_lag_is_measured_while_the_sink_runs():
    import asyncio
    import time

    bus = EventBus()
    m = MetricsSink()
    task = asyncio.create_task(m.run(bus.subscribe()))
    await asyncio.sleep(0.35)  # a few samples of a loop that keeps up
    quiet = samples(m)[("scoreq_live_loop_lag_max_seconds", ())]
    time.sleep(1.2)  # something holds the loop
    await asyncio.sleep(0.25)
    s = samples(m)
    bus.close()
    await task
    assert quiet < 1.0 <= s[("scoreq_live_loop_lag_max_seconds", ())]
    assert s[("scoreq_live_loop_lag_seconds_count", ())] >= 3
    assert s[("scoreq_live_loop_lag_seconds_bucket", (("le", "0.5"),))] < s[("scoreq_live_loop_lag_seconds_count", ())]
