"""The feed hub without sockets: hello, history, stream states, per-client queues, subscriptions."""

import json

import pytest

from scoreq_live.core.events import AlertEvent, ClearedEvent, ScoreEvent, StreamEnded, StreamError, StreamStarted
from scoreq_live.sinks.feed import FeedHub, FeedInfo, SubscriptionError, default_bands, parse_streams

INFO = FeedInfo(model="distillmos", mode="nr", window_s=7.68, hop_s=1.0, bands=default_bands("nr"))


def started(stream, ts=0.0):
    return StreamStarted(stream=stream, ts=ts, source="file", detail=f"{stream}.wav", rate=16000, channels=1,
                         model="distillmos", window_s=7.68, hop_s=1.0)


def score(stream, window, mos=3.5):
    return ScoreEvent(stream=stream, ts=100.0 + window, window=window, t_start=float(window),
                      t_end=window + 7.68, mos=mos, smoothed=mos, speech=0.9, model="distillmos")


def frames(client, now=0.0):
    return [json.loads(f) for f in client.take(now)]


def kinds(msgs):
    return [(m["type"], m.get("stream"), m.get("window")) for m in msgs]


def test_hello_then_history_in_original_order_then_history_end():
    hub = FeedHub(INFO)
    hub.publish(started("a"), 0)
    hub.publish(started("b"), 0)
    for w in range(3):
        hub.publish(score("a", w), 0)
        hub.publish(score("b", w), 0)
    msgs = frames(hub.connect(None, 0))
    hello = msgs[0]
    assert hello["type"] == "hello" and hello["v"] == 1 and hello["schema"] == 1
    assert hello["server"].startswith("scoreq-live ") and hello["model"] == "distillmos" and hello["mode"] == "nr"
    assert hello["window_s"] == 7.68 and hello["hop_s"] == 1.0 and hello["history_s"] == 300
    assert hello["bands"] == {"good": 4.0, "fair": 3.0, "lower_is_better": False}
    assert hello["subscribed"] == "*" and hello["alerts"] == []
    assert hello["streams"] == [
        {"stream": "a", "state": "live", "source": "file", "detail": "a.wav", "error": None},
        {"stream": "b", "state": "live", "source": "file", "detail": "b.wav", "error": None}]
    assert kinds(msgs[1:]) == [("stream_started", "a", None), ("stream_started", "b", None)] + [
        ("score", s, w) for w in range(3) for s in "ab"] + [("history_end", None, None)]
    assert msgs[3] == score("a", 0).to_dict()  # history frames are the ordinary events


def test_history_keeps_the_last_history_s_of_stream_time_and_the_stream_started():
    hub = FeedHub(INFO, history_s=10.0)
    hub.publish(started("a"), 0)
    for w in range(40):
        hub.publish(score("a", w), 0)
    msgs = frames(hub.connect(None, 0))
    windows = [m["window"] for m in msgs if m["type"] == "score"]
    assert msgs[1]["type"] == "stream_started"
    assert windows == list(range(29, 40))  # t_end within 10 s of the newest (46.68)


def test_stream_states_follow_the_lifecycle_and_ended_streams_are_forgotten_later():
    hub = FeedHub(INFO, history_s=60.0)
    for s in ("eof", "stop", "bad", "gone"):
        hub.publish(started(s), 0)
    hub.publish(StreamEnded(stream="eof", ts=1, reason="eof", t=3.0), 1.0)
    hub.publish(StreamEnded(stream="stop", ts=1, reason="stopped", t=3.0), 1.0)
    hub.publish(StreamError(stream="bad", ts=1, error="device unplugged"), 1.0)
    hub.publish(StreamEnded(stream="bad", ts=1, reason="error", t=2.0), 1.0)
    states = {s["stream"]: (s["state"], s["error"]) for s in frames(hub.connect(None, 2.0))[0]["streams"]}
    assert states == {"eof": ("ended", None), "stop": ("stopped", None), "bad": ("error", "device unplugged"),
                      "gone": ("live", None)}
    later = frames(hub.connect(None, 62.0))[0]["streams"]
    assert [s["stream"] for s in later] == ["gone"]


def test_live_events_follow_the_history_and_each_client_gets_its_subscription():
    hub = FeedHub(INFO)
    hub.publish(started("a"), 0)
    hub.publish(started("b"), 0)
    everyone, only_b = hub.connect(None, 0), hub.connect(frozenset({"b"}), 0)
    frames(everyone)
    hello_b = frames(only_b)
    assert hello_b[0]["subscribed"] == ["b"] and len(hello_b[0]["streams"]) == 2  # all listed, b's history
    assert kinds(hello_b[1:]) == [("stream_started", "b", None), ("history_end", None, None)]
    for w in range(3):
        hub.publish(score("a", w), 1)
        hub.publish(score("b", w), 1)
    assert kinds(frames(everyone)) == [("score", s, w) for w in range(3) for s in "ab"]
    assert kinds(frames(only_b)) == [("score", "b", w) for w in range(3)]


def test_a_client_that_falls_behind_loses_its_oldest_frames_and_is_told_how_many():
    hub = FeedHub(INFO, queue_size=5)
    hub.publish(started("a"), 0)
    slow, fast = hub.connect(None, 0), hub.connect(None, 0)
    frames(slow), frames(fast)
    for w in range(12):
        hub.publish(score("a", w), 1)
        assert [m["window"] for m in frames(fast)] == [w]  # the fast client is not affected
    msgs = frames(slow)
    assert msgs[0] == {"v": 1, "type": "dropped", "count": 7}
    assert [m["window"] for m in msgs[1:]] == [7, 8, 9, 10, 11]  # the newest, in order
    assert slow.dropped == 7 and hub.dropped == 7
    hub.publish(score("a", 12), 2)
    assert [m["type"] for m in frames(slow)] == ["score"]  # counted once: no new notice without new losses


def test_the_first_frames_are_never_dropped_however_long_the_history():
    hub = FeedHub(INFO, queue_size=3)
    hub.publish(started("a"), 0)
    for w in range(50):
        hub.publish(score("a", w), 0)
    c = hub.connect(None, 0)
    msgs = frames(c)
    assert msgs[0]["type"] == "hello" and msgs[-1]["type"] == "history_end" and len(msgs) == 53


def test_a_subscribe_message_resyncs_the_client_without_gaps_or_doubles():
    hub = FeedHub(INFO)
    hub.publish(started("a"), 0)
    hub.publish(started("b"), 0)
    c = hub.connect(frozenset({"a"}), 0)
    frames(c)
    hub.publish(score("a", 0), 1)
    hub.publish(score("b", 0), 1)  # not subscribed yet, and queued frames for "a" are still untaken
    hub.handle_message(c, json.dumps({"type": "subscribe", "streams": ["a", "b"]}), 2)
    msgs = frames(c)
    assert msgs[0]["type"] == "hello" and msgs[0]["subscribed"] == ["a", "b"]
    assert kinds(msgs[1:]) == [("stream_started", "a", None), ("stream_started", "b", None),
                               ("score", "a", 0), ("score", "b", 0), ("history_end", None, None)]
    hub.handle_message(c, '{"type":"subscribe","streams":"*"}', 3)
    assert frames(c)[0]["subscribed"] == "*"
    hub.handle_message(c, '{"type":"subscribe","streams":[]}', 3)
    assert frames(c)[0]["subscribed"] == "*"


@pytest.mark.parametrize("message, error", [
    ("not json", "JSON"), ('["subscribe"]', "unknown message type"), ('{"type":"pause"}', "unknown message type"),
    ('{"type":"subscribe","streams":[1,2]}', "list of stream names"),
    ('{"type":"subscribe","streams":{"a":1}}', "list of stream names"),
])
def test_bad_client_messages_get_an_error_frame_and_change_nothing(message, error):
    hub = FeedHub(INFO)
    c = hub.connect(frozenset({"a"}), 0)
    frames(c)
    hub.handle_message(c, message, 1)
    (msg,) = frames(c)
    assert msg["type"] == "error" and error in msg["error"] and c.streams == frozenset({"a"})


def test_alerts_are_in_the_history_and_active_ones_in_hello():
    hub = FeedHub(INFO)
    hub.publish(started("a"), 0)
    common = dict(stream="a", ts=5.0, rule="mos<3.0 for 10s", metric="mos", op="<", threshold=3.0, for_s=10.0,
                  id="a:mos<3.0 for 10s")
    hub.publish(AlertEvent(value=2.7, t=12.0, **common), 1)
    hello = frames(hub.connect(None, 1))[0]
    assert hello["alerts"] == [AlertEvent(value=2.7, t=12.0, **common).to_dict()]
    assert frames(hub.connect(frozenset({"b"}), 1))[0]["alerts"] == []
    hub.publish(ClearedEvent(value=3.4, t=30.0, **common), 2)
    msgs = frames(hub.connect(None, 2))
    assert msgs[0]["alerts"] == [] and [m["type"] for m in msgs[2:4]] == ["alert", "cleared"]


def test_stalled_clients_are_those_that_take_nothing_while_frames_wait():
    hub = FeedHub(INFO, stall_s=10.0)
    hub.publish(started("a"), 0)
    reader, idle_ok, stuck = (hub.connect(None, 0) for _ in range(3))
    for c in (reader, idle_ok, stuck):
        c.take(0)
    assert hub.stalled(100.0) == []  # nothing waiting: idle is not stalled
    hub.publish(score("a", 0), 101.0)
    reader.take(105.0)
    idle_ok.take(111.5)
    hub.publish(score("a", 1), 112.0)
    assert hub.stalled(112.0) == [stuck]
    hub.disconnect(stuck, "stalled")
    assert stuck.closed and hub.disconnected == {"stalled": 1} and stuck not in hub.clients
    hub.disconnect(stuck)  # idempotent
    assert hub.disconnected == {"stalled": 1}


def test_events_the_feed_itself_missed_are_reported_to_every_client():
    hub = FeedHub(INFO)
    a, b = hub.connect(None, 0), hub.connect(None, 0)
    frames(a), frames(b)
    hub.lost(3, 1.0)
    assert frames(a) == frames(b) == [{"v": 1, "type": "dropped", "count": 3}]


def test_subscriptions_from_query_strings_and_messages():
    assert parse_streams(None) is None and parse_streams("") is None and parse_streams("*") is None
    assert parse_streams([]) is None and parse_streams(["*"]) is None
    assert parse_streams("a, b,") == frozenset({"a", "b"}) and parse_streams(["x"]) == frozenset({"x"})
    with pytest.raises(SubscriptionError):
        parse_streams([str(i) for i in range(1001)])
    assert default_bands("ref", (0.3, 0.6)) == {"good": 0.3, "fair": 0.6, "lower_is_better": True}
    assert default_bands("ref") == {"good": None, "fair": None, "lower_is_better": True}


def test_a_storm_of_subscribe_messages_costs_one_snapshot_when_the_client_reads(monkeypatch):
    """3,000 subscribes from a client that reads nothing: the history is copied once, when it reads, for the
    latest subscription, with the live events of the meantime in it once and the answers to bad messages."""
    hub = FeedHub(INFO)
    for s in "abcdefghij":
        hub.publish(started(s), 0)
        for w in range(50):
            hub.publish(score(s, w), 0)
    c = hub.connect(None, 0)
    frames(c)
    made = []
    real = hub._snapshot
    monkeypatch.setattr(hub, "_snapshot", lambda client: made.append(1) or real(client))
    for i in range(3000):
        hub.handle_message(c, json.dumps({"type": "subscribe", "streams": ["a", "b"] if i % 2 else ["c"]}), 1)
        if i == 1500:
            hub.publish(score("a", 50), 1)  # live meanwhile: in the snapshot, once
            hub.handle_message(c, "not json", 1)  # answered after the snapshot
    assert made == [] and c.pending > 0  # nothing copied while it does not read (and its wait is measured)
    msgs = frames(c, 2)
    assert len(made) == 1
    assert msgs[0]["type"] == "hello" and msgs[0]["subscribed"] == ["a", "b"]
    windows = [(m["stream"], m["window"]) for m in msgs if m["type"] == "score"]
    assert windows.count(("a", 50)) == 1 and len(windows) == 2 * 50 + 1
    assert kinds(msgs)[-2:] == [("history_end", None, None), ("error", None, None)]
    hub.publish(score("b", 50), 3)
    assert kinds(frames(c, 3)) == [("score", "b", 50)]  # live again
