"""The terminal panel rendered to text, as a person at an 80-column terminal sees it."""


from rich.console import Console

from scoreq_live.bus import EventBus
from scoreq_live.core.events import NetQuality, ScoreEvent, StreamEnded, StreamError, StreamStarted
from scoreq_live.sinks.terminal import PanelState, TerminalSink, render, sparkline


def events():
    yield StreamStarted(stream="alice-uplink", ts=0, source="mic", model="distillmos", mode="nr")
    yield StreamStarted(stream="bob", ts=0, source="file", model="distillmos", mode="nr")
    for k in range(70):
        speech = k % 10 != 9
        yield ScoreEvent(stream="alice-uplink", ts=0, window=k, t_start=k, t_end=k + 4, mos=4.3 if speech else None,
                         smoothed=4.25, speech=0.8 if speech else 0.0, level_dbfs=-24.0, model="distillmos",
                         reason=None if speech else "no_speech")
        yield ScoreEvent(stream="bob", ts=0, window=k, t_start=k, t_end=k + 4, mos=2.1, smoothed=2.2,
                         speech=0.6, level_dbfs=-31.0, model="distillmos")
    yield StreamEnded(stream="bob", ts=0)
    yield StreamError(stream="carol", ts=0, error="input device 'USB' stopped delivering audio")


def test_panel_fits_80_columns_and_shows_each_stream():
    state = PanelState()
    for ev in events():
        state.update(ev)
    console = Console(record=True, width=80)
    console.print(render(state, 80))
    text = console.export_text()
    lines = text.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines)
    alice = next(line for line in lines if line.startswith("alice"))
    bob = next(line for line in lines if line.startswith("bob"))
    carol = next(line for line in lines if line.startswith("carol"))
    # alice's last window had no speech: no current score, the smoothed one stays, the state says why
    assert "4.25" in alice and "–" in alice and "no speech" in alice and "-24dB" in alice
    assert "2.10" in bob and "2.20" in bob and "ended" in bob
    assert "error" in carol
    assert "▇" in alice or "█" in alice  # high scores draw high bars
    assert "▂" in bob or "▃" in bob


def test_sparkline_leaves_gaps_where_nothing_was_scored():
    pts = [(float(t), 5.0 if t % 2 else None) for t in range(60)]
    s = sparkline(pts, 1.0, 5.0, 20, span=20.0)
    assert " " in s and "█" in s and len(s) == 20


async def test_terminal_sink_renders_a_live_event_stream():
    console = Console(record=True, width=80, force_terminal=True)
    sink = TerminalSink(console, title="test")
    bus = EventBus()
    sub = bus.subscribe()
    for ev in events():
        bus.publish(ev)
    bus.close()
    await sink.run(sub)
    text = console.export_text()
    assert "alice-uplink" in text and "bob" in text and "stopped delivering audio" in text


def test_active_alerts_show_in_one_line_under_the_table_until_cleared():
    from scoreq_live.core.events import AlertEvent, ClearedEvent

    sink = TerminalSink(Console(record=True, width=80), title="t")
    common = dict(stream="bob", ts=0, rule="mos<3.0 for 10s", metric="mos", op="<", threshold=3.0, for_s=10.0,
                  id="bob:mos<3.0 for 10s")
    for ev in events():
        sink.state.update(ev)
    sink.state.update(AlertEvent(value=2.1, t=14.0, **common))
    sink.console.print(sink.renderable())
    text = sink.console.export_text()
    line = next(ln for ln in text.splitlines() if "alerts" in ln)
    assert "bob mos<3.0 for 10s (at 2.1)" in line and len(line) <= 80
    sink.state.update(ClearedEvent(value=3.4, t=40.0, **common))
    sink.console.print(sink.renderable())
    assert "alerts" not in sink.console.export_text()


def test_packet_streams_show_loss_and_jitter_and_ended_rows_are_forgotten():
    state = PanelState(forget_s=30.0, max_ended=1)
    for i, name in enumerate(["legA-1234abcd", "legA-00c0ffee", "legA-0badcafe"]):
        state.update(StreamStarted(stream=name, ts=10.0 * i, source="rtp", model="distillmos", mode="nr"))
        e = ScoreEvent(stream=name, ts=10.0 * i + 5, window=0, t_start=0, t_end=7.68, mos=3.6, smoothed=3.6,
                       speech=0.8, level_dbfs=-28.0, model="distillmos")
        e.net = NetQuality("PCMU", 384, 371, 13, 0, 0, 3.39 * (i + 1), 4.2, 0.03, 66.9, 3.44)
        state.update(e)
        state.update(StreamEnded(stream=name, ts=10.0 * i + 8, reason="inactive"))
    console = Console(record=True, width=80)
    console.print(render(state, 80))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80 and "jitter" in lines[0]
    row = next(line for line in lines if line.startswith("legA-0badcafe"))  # the full name fits
    assert "10.2%" in row and "4ms" in row and "ended" in row
    # A new call at 48 s: the row that ended 40 s ago goes (older than 30 s); of the two that ended 30 s
    # and 20 s ago only the newest stays (at most one ended row).
    state.update(StreamStarted(stream="legA-feedf00d", ts=48.0, source="rtp", model="distillmos", mode="nr"))
    assert list(state.rows) == ["legA-0badcafe", "legA-feedf00d"]
    state.update(StreamStarted(stream="legA-00000001", ts=57.0, source="rtp", model="distillmos", mode="nr"))
    assert list(state.rows) == ["legA-0badcafe", "legA-feedf00d", "legA-00000001"]  # ended 29 s ago: kept
    state.update(StreamStarted(stream="legA-00000002", ts=59.0, source="rtp", model="distillmos", mode="nr"))
    assert "legA-0badcafe" not in state.rows


def test_a_stream_thinned_by_an_overloaded_scorer_says_so_and_keeps_its_latest_score():
    state = PanelState()
    state.update(StreamStarted(stream="leg", ts=100.0, source="rtp", model="distillmos", mode="nr"))
    for k in range(6):  # every other window skipped: the scorer is behind
        thinned = k % 2 == 1
        state.update(ScoreEvent(stream="leg", ts=100.0 + k, window=k, t_start=k, t_end=k + 4,
                                mos=None if thinned else 3.8, smoothed=3.7, speech=0.9, level_dbfs=-20.0,
                                model="distillmos", reason="overloaded" if thinned else None))

    def line(now):
        console = Console(record=True, width=80)
        console.print(render(state, 80, now=now))
        return next(ln for ln in console.export_text().splitlines() if ln.startswith("leg"))

    assert "thinned" in line(106.0) and "3.80" in line(106.0) and "–" not in line(106.0)
    assert "thinned" not in line(120.0) and "live" in line(120.0)  # caught up: no skips for a while


def test_a_model_with_named_scores_gets_a_compact_scores_column():
    state = PanelState()
    state.update(StreamStarted(stream="room", ts=0, source="rtp", model="multi", mode="nr"))
    state.update(StreamStarted(stream="desk", ts=0, source="rtp", model="multi", mode="nr"))
    state.update(ScoreEvent(stream="room", ts=0, window=0, t_start=0, t_end=4, mos=3.1, smoothed=3.1, speech=0.9,
                            level_dbfs=-30.0, model="multi",
                            scores={"mos": 3.1, "dnsmos.sig": 3.42, "dnsmos.bak": 1.87}))
    for width in (80, 120):
        console = Console(record=True, width=width)
        console.print(render(state, width))
        lines = console.export_text().rstrip("\n").splitlines()
        assert all(len(line) <= width for line in lines)
        assert "scores" in lines[0]
        room = next(line for line in lines if line.startswith("room"))
        assert "3.10" in room and "sig 3.42" in room
    wide = Console(record=True, width=120)
    wide.print(render(state, 120))
    assert "bak 1.87" in wide.export_text()
    plain = PanelState()
    for ev in events():
        plain.update(ev)
    console = Console(record=True, width=80)
    console.print(render(plain, 80))
    assert "scores" not in console.export_text()  # a one-score model: no column
