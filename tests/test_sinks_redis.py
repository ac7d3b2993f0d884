"""Publishing events to Redis and relaying them: the envelope, the relay's exact gap count, a real broker.

The relay's core (:class:`scoreq_live.relay.Relay`) is driven with plain
envelopes; the publisher runs against a real ``redis-server`` on loopback,
which is absent at start, killed and restarted.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from scoreq_live.bus import EventBus
from scoreq_live.core.events import (
    AlertEvent,
    ClearedEvent,
    InputDropped,
    MonitorGap,
    NetQuality,
    ScoreEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    event_from_dict,
)
from scoreq_live.relay import Relay
from scoreq_live.sinks.redis import Backoff, BrokerError, RedisPublisher, envelope, parse_broker_url
from tests.redis_tools import RedisServer, free_port

# -- the URL ------------------------------------------------------------------------------


def test_the_path_of_a_redis_url_is_the_channel_and_the_password_stays_out_of_messages():
    a = parse_broker_url("redis://:s3cret@10.0.0.5:6380/calls/eu")
    assert (a.url, a.channel) == ("redis://:s3cret@10.0.0.5:6380", "calls/eu")
    assert str(a) == "redis://10.0.0.5:6380/calls/eu"
    b = parse_broker_url("rediss://broker.example")
    assert (b.url, b.channel) == ("rediss://broker.example:6379", "scoreq-live")


@pytest.mark.parametrize("url", ["http://host/ch", "redis:///ch", "host:6379", "redis://host:99999/x"])
def test_a_url_that_is_not_redis_is_an_error_that_says_what_is_expected(url):
    with pytest.raises(BrokerError, match="--publish") as e:
        parse_broker_url(url)
    assert "redis://" in str(e.value) or "port" in str(e.value)


# -- events back from JSON ----------------------------------------------------------------


def every_event():
    net = NetQuality("pcmu", 50, 48, 2, 0, 1, 4.0, 12.5, 0.04, 80.1, 3.9)
    return [
        StreamStarted("s", 1.0, source="file", detail="a.wav", rate=48000, channels=2, model="distillmos",
                      window_s=4.0, hop_s=1.0),
        ScoreEvent("s", 2.0, window=3, t_start=3.0, t_end=7.0, mos=3.25, smoothed=3.5, speech=0.8,
                   level_dbfs=-23.4, model="distillmos", latency_ms=35.2, net=net),
        ScoreEvent("s", 2.5, window=4, mode="ref", distance=0.31, reason=None),
        ScoreEvent("s", 2.6, window=5, reason="no_speech"),
        InputDropped("s", 3.0, t=7.5, dropped_s=0.02, total_s=0.04),
        AlertEvent("s", 4.0, rule="mos<3.0 for 5s", metric="mos", op="<", threshold=3.0, for_s=5.0, value=2.5,
                   t=9.0, id="s:mos<3.0 for 5s"),
        ClearedEvent("s", 5.0, rule="mos<3.0 for 5s", metric="mos", op="<", threshold=3.0, for_s=5.0, value=3.6,
                     t=12.0, id="s:mos<3.0 for 5s", reason="recovered"),
        StreamError("s", 6.0, error="decoder failed"),
        StreamEnded("s", 7.0, reason="bye", t=20.0, windows=17, scored=15),
        MonitorGap("", 8.0, monitor="m", missing=3, missing_total=5, dropped_total=2),
    ]


@pytest.mark.parametrize("ev", every_event(), ids=lambda e: e.type)
def test_every_event_comes_back_from_its_json_the_same(ev):
    back = event_from_dict(json.loads(ev.to_json()))
    assert back == ev and type(back) is type(ev)
    assert back.to_json() == ev.to_json()


def test_an_unknown_or_incomplete_event_is_a_value_error():
    with pytest.raises(ValueError, match="unknown event type 'nope'"):
        event_from_dict({"type": "nope", "stream": "s", "ts": 1.0})
    with pytest.raises(ValueError, match="stream"):
        event_from_dict({"type": "score", "ts": 1.0})


# -- the relay's core: envelopes in, events out -------------------------------------------


def env(seq, ev=None, monitor="a", run="r1", **body):
    if ev is not None:
        body["event"] = ev.to_dict()
    return envelope(monitor, run, seq, **body)


def score(stream="s", window=0):
    return ScoreEvent(stream, 1.0, window=window, mos=3.0)


def test_the_relay_names_streams_by_monitor_and_counts_holes_in_the_numbers_exactly():
    relay = Relay()
    assert [e.stream for e in relay.receive(env(1, score("clean")), 0.0)] == ["a/clean"]
    assert relay.receive(env(2, score()), 0.0)[0].stream == "a/s"
    out = relay.receive(env(6, score()), 0.0, wall=123.0)  # 3, 4 and 5 never came
    assert isinstance(out[0], MonitorGap) and out[0].stream == ""
    assert (out[0].monitor, out[0].missing, out[0].missing_total, out[0].ts) == ("a", 3, 3, 123.0)
    assert out[1].stream == "a/s"
    assert relay.receive(env(5, score()), 0.0) == []  # sent again across a reconnection: seen or given up
    assert relay.receive(env(6, score()), 0.0) == []
    t = relay.monitors["a"]
    assert (t.received, t.missing, t.duplicates, t.last_seq) == (3, 3, 2, 6)


def test_a_gap_record_says_what_the_monitor_dropped_and_a_heartbeat_reveals_a_lost_tail():
    relay = Relay()
    relay.receive(env(1, score()), 0.0)
    assert relay.receive(env(9, gap={"dropped": 4, "since": 1.0, "until": 2.0}), 0.0) == []
    out = relay.receive(env(10, score()), 0.0)
    assert out[0].missing == 8 and out[0].dropped_total == 4  # 4 dropped by the monitor, 4 lost on the way
    out = relay.receive(env(13, heartbeat=5.0), 0.0)  # 11..13 were sent: none arrived
    assert [e.missing for e in out] == [2 + 1]
    assert relay.receive(env(13, heartbeat=7.0), 0.0) == []
    t = relay.monitors["a"]
    assert (t.received, t.missing, t.dropped, t.received + t.missing) == (2, 11, 4, 13)
    assert not t.stopped
    assert [e.missing for e in relay.receive(env(15, bye=8.0), 0.0)] == [2]  # its last two never came
    assert t.stopped and t.missing == 13


def test_monitors_are_counted_apart_and_a_restarted_monitor_starts_its_numbering_again():
    relay = Relay()
    relay.receive(env(1, score(), monitor="a"), 0.0)
    relay.receive(env(40, score(), monitor="b"), 0.0)  # the relay started after b: nothing missing
    relay.receive(env(2, score(), monitor="a"), 0.0)
    assert relay.receive(env(1, score(), monitor="a", run="r2"), 0.0)[0].stream == "a/s"
    a, b = relay.monitors["a"], relay.monitors["b"]
    assert (a.received, a.missing, a.runs, b.received, b.missing) == (3, 0, 2, 1, 0)


def test_two_processes_sharing_a_name_are_still_counted_exactly(caplog):
    relay = Relay()
    for seq in range(1, 6):
        relay.receive(env(seq, score(), run="x"), 0.0)
        if seq != 3:  # y's 3rd event is lost
            relay.receive(env(seq, score(), run="y"), 0.0)
    t = relay.monitors["a"]
    assert (t.received, t.missing, t.duplicates, t.runs) == (9, 1, 0, 2)
    assert "two monitors publish as 'a' at once" in caplog.text


def test_alert_ids_are_made_unique_across_monitors_and_junk_is_counted_not_relayed():
    relay = Relay()
    alert = AlertEvent("s", 1.0, rule="mos<3.0", id="s:mos<3.0")
    assert relay.receive(env(1, alert, monitor="b"), 0.0)[0].id == "b/s:mos<3.0"
    for junk in (b"not json", b"{}", b'{"monitor":"a","run":"r","seq":"1"}', env(2, monitor="a", event={"x": 1}),
                 b'{"monitor":"","run":"r","seq":1}'):
        assert relay.receive(junk, 0.0) == []
    assert relay.malformed == 5


def test_backoff_doubles_to_its_limit_and_resets():
    b = Backoff(0.25, 1.0)
    assert [b.next() for _ in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.25


# -- against a real broker ------------------------------------------------------------------


class Listener:
    """A plain redis-py subscriber collecting the raw envelopes (and a Relay fed with them)."""

    def __init__(self, url: str, channel: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.channel = channel
        self.envelopes: list[dict] = []
        self.relay = Relay()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Listener:
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self.pubsub.subscribe(self.channel)
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            msg = await self.pubsub.get_message(timeout=1.0)
            if msg is not None:
                self.envelopes.append(json.loads(msg["data"]))
                self.relay.receive(msg["data"], time.monotonic())

    async def until(self, cond, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"not reached; got {len(self.envelopes)} envelopes"
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.pubsub.aclose()
        await self.client.aclose()


def events_of(listener):
    return [e for e in listener.envelopes if "event" in e]


async def test_every_event_goes_out_in_order_numbered_from_one(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        address = parse_broker_url(server.url("ch"))
        lines: list[str] = []
        pub = RedisPublisher(address, "edge-1", notify=lines.append)
        bus = EventBus()
        await pub.start()
        assert lines == [f"publish: redis://127.0.0.1:{server.port}/ch as monitor 'edge-1'"]
        task = asyncio.create_task(pub.run(bus.subscribe()))
        async with Listener(address.url, "ch") as listener:
            for i in range(500):
                bus.publish(score(window=i))
            await listener.until(lambda: len(events_of(listener)) == 500)
            got = events_of(listener)
            assert [e["seq"] for e in got] == list(range(1, 501))
            assert [e["event"]["window"] for e in got] == list(range(500))
            assert {(e["v"], e["monitor"], e["run"]) for e in got} == {(1, "edge-1", pub.run_id)}
            assert pub.batches < 500 / 4  # pipelined: many events per round trip
            # Quiet for a while: a heartbeat carries the last number.
            await listener.until(lambda: any("heartbeat" in e for e in listener.envelopes), timeout=pub.heartbeat_s * 3)
            assert [e["seq"] for e in listener.envelopes if "heartbeat" in e][0] == 500
        bus.close()
        await task
        await pub.close()
        assert (pub.published, pub.dropped) == (500, 0)


async def test_a_broker_down_at_start_blocks_nothing_and_what_the_buffer_dropped_is_reported(tmp_path):
    server = RedisServer(tmp_path / "redis")  # not started yet
    address = parse_broker_url(server.url("ch"))
    lines: list[str] = []
    pub = RedisPublisher(address, "m", buffer_size=20, backoff=Backoff(0.05, 0.2), notify=lines.append)
    bus = EventBus()
    t0 = time.perf_counter()
    await pub.start()
    task = asyncio.create_task(pub.run(bus.subscribe()))
    for i in range(100):
        bus.publish(score(window=i))
    await asyncio.sleep(0.3)
    assert time.perf_counter() - t0 < pub.timeout_s + 1.0
    assert "cannot reach" in lines[0] and "buffered" in lines[0]
    assert (pub.dropped, len(pub._buffer), pub.published) == (80, 20, 0)
    try:
        server.start()
        async with Listener(address.url, "ch") as listener:
            # The listener may subscribe after the publisher is back: count from what it saw.
            await listener.until(lambda: pub.published == 20 and not pub._buffer)
            bus.publish(score(window=100))
            await listener.until(lambda: any(e.get("seq") == 101 for e in listener.envelopes))
        gaps = [e for e in listener.envelopes if "gap" in e]
        assert pub.dropped == 80
        if gaps:  # the gap record went out after the listener subscribed
            assert gaps[0]["gap"]["dropped"] == 80 and gaps[0]["gap"]["since"] <= gaps[0]["gap"]["until"]
        windows = [e["event"]["window"] for e in events_of(listener)]
        assert windows[-1] == 100 and all(w >= 80 for w in windows)  # the oldest were dropped, never the newest
    finally:
        bus.close()
        await task
        await pub.close()
        server.stop()


async def test_a_broker_killed_and_restarted_loses_exactly_what_the_numbers_say(tmp_path):
    port = free_port()
    server = RedisServer(tmp_path / "redis", port).start()
    address = parse_broker_url(server.url("ch"))
    pub = RedisPublisher(address, "m", buffer_size=1000, backoff=Backoff(0.05, 0.2))
    bus = EventBus()
    await pub.start()
    task = asyncio.create_task(pub.run(bus.subscribe()))
    received: list[dict] = []
    relay = Relay()
    try:
        for phase in range(2):
            async with Listener(address.url, "ch") as listener:
                for i in range(phase * 100, phase * 100 + 100):
                    bus.publish(score(window=i))
                    await asyncio.sleep(0.002)
                await listener.until(lambda: not pub._buffer and pub.connected)
                await asyncio.sleep(0.2)
                if phase == 0:
                    server.kill()
                    for i in range(1000, 1050):  # published into the void: buffered, sent once it is back
                        bus.publish(score(window=i))
                    await asyncio.sleep(0.5)
                    assert pub.published <= 100 and not pub.connected
            received += listener.envelopes
            for e in listener.envelopes:
                relay.receive(json.dumps(e), 0.0)
            if phase == 0:
                server.start()
        # The 50 buffered during the outage went out after the restart, possibly before this listener
        # subscribed: whatever the listener missed, the relay counts exactly.
        t = relay.monitors["m"]
        assert t.received + t.missing == pub.seq == 250
        assert pub.dropped == 0 and t.dropped == 0
        assert t.received >= 200
    finally:
        bus.close()
        await task
        await pub.close()
        server.stop()


async def test_closing_right_after_the_bus_closes_still_sends_every_event_then_says_bye(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        address = parse_broker_url(server.url("ch"))
        pub = RedisPublisher(address, "m")
        bus = EventBus()
        await pub.start()
        task = asyncio.create_task(pub.run(bus.subscribe()))
        async with Listener(address.url, "ch") as listener:
            await asyncio.sleep(0)  # the publisher is waiting on the bus, as in a running monitor
            for i in range(50):
                bus.publish(score(window=i))
            bus.close()  # what a stopping monitor does, then it closes its outputs at once
            await pub.close()
            await listener.until(lambda: any("bye" in e for e in listener.envelopes))
        await task
        assert [e["seq"] for e in events_of(listener)] == list(range(1, 51))
        assert listener.envelopes[-1]["bye"] > 0 and listener.envelopes[-1]["seq"] == 50
        assert listener.relay.monitors["m"].stopped


async def test_a_password_in_the_url_is_used_and_a_wrong_one_is_reported_without_stopping_anything(tmp_path):
    with RedisServer(tmp_path / "redis", password="s3cret") as server:
        lines: list[str] = []
        good = RedisPublisher(parse_broker_url(server.url("ch")), "m", notify=lines.append)
        await good.start()
        wrong = RedisPublisher(parse_broker_url(server.url("ch").replace("s3cret", "nope")), "m",
                               notify=lines.append)
        await wrong.start()
        try:
            assert good.connected and not wrong.connected
            assert lines[0] == f"publish: redis://127.0.0.1:{server.port}/ch as monitor 'm'"
            assert "cannot reach" in lines[1] and "password" in lines[1].lower() and "nope" not in lines[1]
        finally:
            await good.close()
            await wrong.close()
