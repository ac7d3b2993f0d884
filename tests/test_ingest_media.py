"""Media-stream websockets (``GET /media``): Twilio Media Streams JSON and raw PCM, as voice platforms fork calls.

The parsers are checked on real speech (G.711 encoded by the tests' own reference encoders); the endpoint runs
in a real aiohttp server on 127.0.0.1 with a real engine and a real model, and real websocket clients
(aiohttp's) publish to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from scoreq_live.bus import EventBus
from scoreq_live.core.events import Event, InputDropped, ScoreEvent, StreamEnded, StreamError, StreamStarted
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.ingest.media import (
    CallStopped,
    MediaIngest,
    MediaSource,
    ProtocolError,
    QueryError,
    RawFormat,
    RawParser,
    TrackAudio,
    TrackStarted,
    TwilioParser,
    parse_media_query,
)
from scoreq_live.offline import window_results
from scoreq_live.rtp.codecs import G711Decoder, codec_by_name
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sources.base import Normaliser, SourceError
from tests import media_tools as mt
from tests.helpers import MUSHRA, SCOREQ_PAIR, joined, speech_16k

CALL = "CA0123456789abcdef0123456789abcdef"


def ulaw_decode(data: bytes) -> np.ndarray:
    return G711Decoder(codec_by_name("PCMU", 0)).decode(data)


@pytest.fixture(scope="module")
def speech(data) -> dict[str, np.ndarray]:
    """Two different real recordings at 8 kHz (MUSHRA references joined, ~13 s each) and one at 16 kHz."""
    refs = sorted(MUSHRA.glob("stim_*/ref.wav"))
    return {"inbound": mt.to_8k(joined(refs[:4])), "outbound": mt.to_8k(joined(refs[4:8])),
            "wide": speech_16k(SCOREQ_PAIR / "ref.wav")}


def events_of(parser: TwilioParser | RawParser, messages: Sequence[str | bytes]) -> list[Any]:
    out: list[Any] = []
    for m in messages:
        out += parser.text(m) if isinstance(m, str) else parser.binary(m)
    return out


def audio_of(events: Sequence[Any], track: str) -> np.ndarray:
    return np.concatenate([e.samples for e in events if isinstance(e, TrackAudio) and e.track == track])


# --------------------------------------------------------------------------------------------------- parsers


def test_a_twilio_call_decodes_to_each_tracks_mulaw_audio(speech):
    ulaw = {t: mt.mulaw_encode(speech[t]) for t in ("inbound", "outbound")}
    msgs = [m for _, m in mt.twilio_call(ulaw, call_sid=CALL)]
    parser = TwilioParser(peer="127.0.0.1:5000")
    events = events_of(parser, msgs)
    started = [e for e in events if isinstance(e, TrackStarted)]
    assert [(e.track, e.name, e.rate) for e in started] == [("inbound", f"{CALL}-inbound", 8000),
                                                            ("outbound", f"{CALL}-outbound", 8000)]
    assert "audio/x-mulaw 8000 Hz" in started[0].detail and "127.0.0.1:5000" in started[0].detail
    for track in ("inbound", "outbound"):
        got = audio_of(events, track)
        assert np.array_equal(got, ulaw_decode(ulaw[track]))  # every chunk, in order, nothing filled in
        snr = 10 * np.log10(np.mean(speech[track] ** 2) / np.mean((got - speech[track]) ** 2))
        assert snr > 30, snr  # G.711 keeps speech at ~38 dB SNR: the encoder and the decoder agree
    assert isinstance(events[-1], CallStopped) and sum(isinstance(e, CallStopped) for e in events) == 1
    assert all(e.filled == 0 for e in events if isinstance(e, TrackAudio))


def test_twilio_timestamp_jumps_are_filled_with_silence_up_to_the_limit(speech):
    ulaw = {"inbound": mt.mulaw_encode(speech["inbound"][:8000 * 3])}  # 3 s, 150 chunks of 20 ms
    msgs = [m for _, m in mt.twilio_call(ulaw, skip=[("inbound", i) for i in range(20, 25)])]  # 100 ms lost
    events = events_of(TwilioParser(), msgs)
    audio = audio_of(events, "inbound")
    assert audio.size == 3 * 8000  # stream time = call time
    assert np.all(audio[20 * 160:25 * 160] == 0)
    assert [e.filled for e in events if isinstance(e, TrackAudio) and e.filled] == [5 * 160]

    # A jump longer than the limit is filled only up to it; the chunks after it follow directly (no new fill).
    msgs = [m for _, m in mt.twilio_call(ulaw, skip=[("inbound", i) for i in range(10, 110)])]  # 2 s lost
    events = events_of(TwilioParser(max_gap_s=0.5), msgs)
    assert [e.filled for e in events if isinstance(e, TrackAudio) and e.filled] == [4000]
    assert audio_of(events, "inbound").size == 3 * 8000 - 100 * 160 + 4000

    # A chunk arriving a little early or late (within one chunk) fills nothing.
    p = TwilioParser()
    p.text(json.dumps({"event": "start", "start": {"callSid": CALL, "mediaFormat": {
        "encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
    payload = base64.b64encode(ulaw["inbound"][:160]).decode()
    fills = [e.filled for ts in (0, 20, 45, 58, 80) for e in p.text(json.dumps(
        {"event": "media", "media": {"track": "inbound", "timestamp": str(ts), "payload": payload}}))
        if isinstance(e, TrackAudio)]
    assert fills == [0, 0, 0, 0, 0]


def _start(**fmt: Any) -> str:
    media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1, **fmt}
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                       "start": {"callSid": CALL, "tracks": ["inbound"], "mediaFormat": media_format}})


def _media(seq: int, ts: int, payload: str = "f39/fw==", track: str = "inbound") -> str:
    return json.dumps({"event": "media", "sequenceNumber": str(seq),
                       "media": {"track": track, "chunk": "1", "timestamp": str(ts), "payload": payload}})


@pytest.mark.parametrize(("messages", "code", "words"), [
    (["hello"], 1007, "not JSON"),
    (["[1, 2]"], 1008, "not a JSON object"),
    (["[" * 100_000], 1008, "nests JSON too deeply"),
    (['{"event": "start", "start": {"mediaFormat": {"encoding": ' + "[" * 990 + "]" * 990 + "}}}"], 1008,
     "nests JSON too deeply"),  # parsed, but too deep to be said back in the reason
    (['{"sequenceNumber": "1"}'], 1008, 'no "event"'),
    (['{"event": "hangup"}'], 1008, "unknown event"),
    ([_media(1, 0)], 1008, "media before start"),
    ([_start(), _media(2, 0, payload="not base64!")], 1007, "not valid base64"),
    ([_start(encoding="audio/opus")], 1008, "unsupported mediaFormat.encoding"),
    ([_start(sampleRate=16000)], 1008, "sampleRate"),
    ([_start(channels=2)], 1008, "channels"),
    ([_start(encoding="audio/l16", sampleRate=16000), _media(2, 0, payload="AAAA")], 1007, "16-bit samples"),
    ([_start(), _media(2, 0), _media(4, 20)], 1008, "sequenceNumber 4 follows 2 (expected 3)"),
    ([_start(), _media(2, 0), _media(2, 20)], 1008, "sequenceNumber 2 follows 2"),
    ([_start(), _media(2, 40), _media(3, 20)], 1008, "timestamp went backwards"),
    ([_start(), _media(2, 0, track="outbound")], 1008, "did not announce"),
    ([_start(), _start().replace('"sequenceNumber": "1"', '"sequenceNumber": "2"')], 1008, "second start"),
    ([_start(), '{"event": "stop", "sequenceNumber": "2"}', _media(3, 0)], 1008, "after stop"),
    ([_start(), b"\x00\x01"], 1008, "binary message"),
])
def test_twilio_protocol_errors_say_what_is_wrong(messages, code, words):
    parser = TwilioParser()
    with pytest.raises(ProtocolError) as err:
        events_of(parser, messages)
    assert err.value.code == code and words in str(err.value), str(err.value)


def test_twilio_stream_names_and_other_spellings():
    media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    first = json.dumps({"event": "media", "media": {"track": "inbound", "timestamp": "0", "payload": "f39/fw=="}})

    def name(start: dict[str, Any], top: dict[str, Any] | None = None, **kw: Any) -> str:
        p = TwilioParser(**kw)
        p.text(json.dumps({"event": "start", **(top or {}), "start": {"mediaFormat": media_format, **start}}))
        return next(e.name for e in p.text(first) if isinstance(e, TrackStarted))

    assert name({"callSid": CALL}) == f"{CALL}-inbound"
    assert name({"callSid": "bad name/with spaces"}, {"streamSid": "MZ42"}) == "MZ42-inbound"  # not a valid name
    assert name({"callSid": "x" * 60}, {"streamSid": "MZ42"}) == "MZ42-inbound"  # too long with -outbound
    assert name({}, fallback="media-7") == "media-7-inbound"
    assert name({"callSid": CALL}, name="desk3") == "desk3-inbound"  # ?stream= wins
    # Telnyx: snake_case keys, encodings by codec name, L16 as big-endian RTP payloads.
    p = TwilioParser()
    p.text(json.dumps({"event": "start", "sequence_number": "1", "stream_id": "32DE0DEA", "start": {
        "call_control_id": "v3:abc_DEF-1", "media_format": {"encoding": "L16", "sample_rate": 16000, "channels": 1}}}))
    x = (np.arange(320) % 64 - 32).astype(">i2")
    ev = p.text(json.dumps({"event": "media", "sequence_number": "2", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "5", "payload": base64.b64encode(x.tobytes()).decode()}}))
    assert ev[0].name == "v3:abc_DEF-1-inbound" and ev[0].rate == 16000
    assert np.array_equal(ev[1].samples, x.astype(np.float32) / 32768)


def test_raw_l16_mono_and_stereo_from_real_speech(speech):
    wide = speech["wide"]
    pcm = mt.pcm16(wide)
    frames = mt.raw_chunks(pcm.astype("<i2").tobytes(), 640)  # 20 ms at 16 kHz, as mod_audio_fork sends
    parser = RawParser(RawFormat("L16", 16000), "desk", peer="10.0.0.5:4000")
    events = events_of(parser, ['{"callSid": "abc", "sampleRate": 16000}', *frames])  # metadata text first
    assert [(e.track, e.name, e.rate) for e in events if isinstance(e, TrackStarted)] == [("", "desk", 16000)]
    assert np.array_equal(audio_of(events, ""), pcm.astype(np.float32) / 32768)

    other = mt.pcm16(speech["inbound"][:wide.size])  # a second, different recording on the right channel
    stereo = np.stack([pcm, other], axis=1).astype("<i2").tobytes()
    events = events_of(RawParser(RawFormat("L16", 16000, 2), "call"), mt.raw_chunks(stereo, 1280))
    assert [e.name for e in events if isinstance(e, TrackStarted)] == ["call-1", "call-2"]
    assert np.array_equal(audio_of(events, "1"), pcm.astype(np.float32) / 32768)
    assert np.array_equal(audio_of(events, "2"), other.astype(np.float32) / 32768)

    alaw = mt.alaw_encode(speech["inbound"])
    events = events_of(RawParser(RawFormat("PCMA", 8000), "a"), mt.raw_chunks(alaw, 160))
    got = audio_of(events, "")
    snr = 10 * np.log10(np.mean(speech["inbound"] ** 2) / np.mean((got - speech["inbound"]) ** 2))
    assert snr > 30, snr


def test_raw_protocol_errors():
    with pytest.raises(ProtocolError, match="not a whole number of samples") as err:
        RawParser(RawFormat("L16", 16000), "x").binary(b"\x00\x01\x02")
    assert err.value.code == 1007
    with pytest.raises(ProtocolError, match="not a whole number of samples"):
        RawParser(RawFormat("L16", 16000, 2), "x").binary(b"\x00" * 6)  # 1.5 stereo frames
    p = RawParser(RawFormat("PCMU", 8000), "x", max_text=3)
    for _ in range(3):
        assert p.text('{"meta": 1}') == []
    with pytest.raises(ProtocolError, match="more than 3 text messages"):
        p.text("{}")
    with pytest.raises(ProtocolError, match="longer than"):
        RawParser(RawFormat("PCMU", 8000), "x").text("x" * 20000)
    assert RawParser(RawFormat("PCMU", 8000), "x").binary(b"") == []


def test_the_query_chooses_the_format_and_is_checked():
    assert parse_media_query([]).raw is None
    assert parse_media_query([("token", "s3cret"), ("stream", "desk1")]).stream == "desk1"
    q = parse_media_query([("codec", "l16"), ("rate", "16000"), ("channels", "2"), ("stream", "room.4")])
    assert q.raw == RawFormat("L16", 16000, 2) and q.stream == "room.4"
    assert parse_media_query([("codec", "PCMU")]).raw == RawFormat("PCMU", 8000, 1)
    for items, words in [
        ([("codec", "opus")], "not supported"),
        ([("codec", "L16")], "needs its sample rate"),
        ([("codec", "L16"), ("rate", "96000")], "out of range"),
        ([("codec", "L16"), ("rate", "16k")], "not a whole number"),
        ([("codec", "PCMA"), ("rate", "16000")], "8000 Hz"),
        ([("codec", "PCMU"), ("channels", "3")], "channels=3"),
        ([("rate", "16000")], "need codec="),
        ([("stream", "bad name")], "not valid"),
        ([("stream", "x" * 60)], "too long"),
        ([("codec", "PCMU"), ("codec", "PCMA")], "twice"),
        ([("format", "twilio")], "unknown query key"),
    ]:
        with pytest.raises(QueryError, match=words):
            parse_media_query(items)


async def test_a_media_source_holds_a_bounded_backlog_and_ends_or_fails_after_it(speech):
    src = MediaSource("s", 8000, "test", backlog_s=2.0)
    for chunk in np.array_split(speech["inbound"][:8000 * 3], 150):  # 3 s while the engine takes nothing
        src.push(chunk)
    assert src.dropped_s == pytest.approx(1.0, abs=0.03)  # the oldest second went; the engine reports it
    src.end("closed")
    src.push(np.ones(10, np.float32))  # after the end: ignored
    got = np.concatenate([f async for f in src.frames()])
    assert np.array_equal(got, speech["inbound"][8000 * 3 - got.size:8000 * 3]) and src.end_reason == "closed"

    failing = MediaSource("f", 8000, "test")
    failing.push(speech["inbound"][:160])
    failing.fail("media websocket: sequenceNumber 9 follows 7 (expected 8)")
    failing.end("closed")  # the failure stands
    frames = []
    with pytest.raises(SourceError, match="follows 7"):
        async for f in failing.frames():
            frames.append(f)
    assert len(frames) == 1  # what came before the failure is still scored


# --------------------------------------------------------------------------------------------------- end to end


class Monitor:
    """A real engine with a :class:`MediaIngest`, served by a real aiohttp server on 127.0.0.1.

    ``events`` collects everything the engine publishes, as it comes; :meth:`stop` stops the monitor.
    """

    def __init__(self, scorer: Scorer, config: EngineConfig, ingest: MediaIngest) -> None:
        self.ingest = ingest
        self.bus = EventBus()
        self.sub = self.bus.subscribe(maxsize=100_000)
        self.engine = Engine(scorer, [ingest], config, self.bus)
        self.events: list[Event] = []
        self.url = ""
        self._runner = web.AppRunner(web.Application())
        self._tasks: list[asyncio.Task[None]] = []

    async def _collect(self) -> None:
        async for ev in self.sub:
            self.events.append(ev)

    async def __aenter__(self) -> Monitor:
        self._runner.app.router.add_get("/media", self.ingest.accept)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/media"
        self._tasks = [asyncio.create_task(self.engine.run()), asyncio.create_task(self._collect())]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not self.ingest.accepting and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert self.ingest.accepting
        return self

    async def stop(self) -> list[Event]:
        """Stop the monitor (its live streams end as ``stopped``); all its events."""
        self.engine.stop()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 60)
        return self.events

    async def until_scored(self, stream: str, windows: int, timeout: float = 60.0) -> None:
        """Until the first ``windows`` windows of ``stream`` have their events (scored or skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(scores(self.events, stream)) < windows:
            assert loop.time() < deadline, f"{stream}: {windows} windows not resolved in {timeout} s"
            await asyncio.sleep(0.005)

    async def until_ended(self, streams: set[str], timeout: float = 60.0) -> None:
        """Until each of ``streams`` has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not streams <= {e.stream for e in self.events if isinstance(e, StreamEnded)}:
            assert loop.time() < deadline, f"not ended in {timeout} s: {streams}"
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            await self._runner.cleanup()


def of(events: Sequence[Event], stream: str) -> list[Event]:
    return [e for e in events if e.stream == stream]


def scores(events: Sequence[Event], stream: str) -> list[ScoreEvent]:
    return [e for e in events if isinstance(e, ScoreEvent) and e.stream == stream]


@pytest.fixture
def tiny_scorer(tiny_nr):
    return Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=8)


TINY = EngineConfig(stream=StreamConfig(window_s=1.0, hop_s=0.5, model="tiny"), max_batch=8)

HELD_BACK = 4000  # 0.25 s at 16 kHz: more than the resampler keeps back from 8 kHz input until the stream ends


def window_ends(cfg: StreamConfig, samples: int) -> list[int]:
    """Where (16 kHz samples) each full window of a stream of ``samples`` (16 kHz) ends."""
    return list(range(cfg.window, samples + 1, cfg.hop))


async def send_in_step(ws: aiohttp.ClientWebSocketResponse, mon: Monitor,
                       messages: Sequence[tuple[float, str]], cfg: StreamConfig, streams: dict[str, str],
                       speed: float) -> None:
    """Send a Twilio call's messages at ``speed`` times real time, but no audio that completes a track's
    window while that track's window before still waits for its result, and the messages after the audio
    (``mark``, ``stop``) only once every window cut before them has its result.

    So no window is ever replaced by a newer one of its track (skipped as ``overloaded``) because the machine
    is slow: what the monitor scores is the call's audio, whatever the run times.  Where the scorer keeps up,
    nothing waits.  ``streams``: track -> stream name.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    held = 0.0  # time spent waiting for results: the pace goes on from where it was
    audio = {t: 0 for t in streams}  # each track's audio so far (16 kHz samples)
    for at, msg in messages:
        m = json.loads(msg)
        if m["event"] == "media":
            track = m["media"]["track"]
            upto = int(m["media"]["chunk"]) * mt.CHUNK_MS * 16  # this message's last sample, at 16 kHz
            audio[track] = upto
            need = {track: len(window_ends(cfg, upto)) - 1}  # all but the window this message may complete
        elif m["event"] in ("mark", "stop"):  # the end: the windows the audio sent cuts before the flush
            need = {t: len(window_ends(cfg, n - HELD_BACK)) for t, n in audio.items()}
        else:
            need = {}
        t_wait = loop.time()
        for track, n in need.items():
            await mon.until_scored(streams[track], n)
        held += loop.time() - t_wait
        wait = t0 + held + at / speed - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        await ws.send_str(msg)


async def test_a_twilio_call_with_both_tracks_scores_like_the_same_audio_offline(speech, bundled_nr):
    """A real call (two recordings, mu-law) at 4x real time: both tracks scored with the bundled model, ended
    by ``stop``; the inbound track's windows score as the same decoded audio does offline."""
    scorer = Scorer(bundled_nr, max_batch=8)
    window_s, _ = resolve_model("distillmos").windowing()
    cfg = StreamConfig(window_s=window_s, hop_s=2.0, model="distillmos")  # a longer hop: fewer windows to run
    ulaw = {t: mt.mulaw_encode(speech[t]) for t in ("inbound", "outbound")}
    inbound, outbound = f"{CALL}-inbound", f"{CALL}-outbound"
    # Every full window of the inbound track is cut before the stop (none needs what the resampler holds back
    # until the end), so each gets its own result, as offline; the tail is cut at the stop.
    n_in = 2 * len(ulaw["inbound"])
    assert not [e for e in window_ends(cfg, n_in) if e > n_in - HELD_BACK], "a window ends too near the end"
    # The sender waits for the monitor's results where it must (send_in_step), and meanwhile no media
    # flows: a generous inactivity timeout, and a latency budget no slow run overruns.  The test is about
    # the audio and its scores, not about pace.
    config = EngineConfig(stream=cfg, max_batch=8, max_latency_s=60.0)
    async with Monitor(scorer, config, MediaIngest(timeout_s=60.0)) as mon:
        async with aiohttp.ClientSession() as http, http.ws_connect(mon.url) as ws:
            await send_in_step(ws, mon, mt.twilio_call(ulaw, call_sid=CALL), cfg,
                               {"inbound": inbound, "outbound": outbound}, speed=4.0)
            msg = await ws.receive(timeout=60)  # the monitor closes after stop
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000, msg
        await mon.until_ended({inbound, outbound})
        events = await mon.stop()
    for stream in (inbound, outbound):
        mine = of(events, stream)
        assert isinstance(mine[0], StreamStarted) and mine[0].source == "media" and mine[0].rate == 8000
        assert isinstance(mine[-1], StreamEnded) and mine[-1].reason == "closed", mine[-1]
        assert not [e for e in mine if isinstance(e, (StreamError, InputDropped))]
        assert len([s for s in scores(events, stream) if s.mos is not None]) >= 3
    # Offline: the same mu-law bytes decoded, resampled by the same streaming resampler, windowed alike.
    norm = Normaliser(8000)
    decoded = np.concatenate([norm.process(ulaw_decode(ulaw["inbound"])), norm.flush()])
    offline = {round(e.t_start, 3): e.mos for e in window_results(decoded, scorer, cfg) if e.mos is not None}
    live = {round(e.t_start, 3): e.mos for e in scores(events, inbound) if e.mos is not None}
    assert live.keys() == offline.keys() and len(live) >= 3
    # The audio is the same sample for sample, so only the batch a window ran in differs: float rounding.
    diffs = [abs(live[t] - offline[t]) for t in live]
    assert max(diffs) < 0.01, (live, offline)


async def test_raw_l16_at_16khz_is_scored(speech, tiny_scorer):
    pcm = mt.pcm16(np.concatenate([speech["wide"], speech["wide"]])).astype("<i2").tobytes()  # ~11 s
    frames = [(i * 0.02, f) for i, f in enumerate(mt.raw_chunks(pcm, 640))]
    async with Monitor(tiny_scorer, TINY, MediaIngest(timeout_s=2.0)) as mon:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(mon.url + "?codec=L16&rate=16000&stream=agent-7") as ws:
            await ws.send_str(json.dumps({"callSid": "abc", "sampleRate": 16000, "mixType": "mono"}))
            await mt.send_paced(ws, frames, speed=8.0)
            await ws.close()
        await mon.until_ended({"agent-7"})
        events = await mon.stop()
    mine = of(events, "agent-7")
    assert isinstance(mine[0], StreamStarted) and mine[0].rate == 16000 and "L16 16000 Hz" in mine[0].detail
    assert isinstance(mine[-1], StreamEnded) and mine[-1].reason == "closed"
    assert abs(mine[-1].t - len(pcm) / 2 / 16000) < 0.01  # every sample arrived
    live = [s for s in scores(events, "agent-7") if s.mos is not None]
    assert len(live) >= 15 and all(1.0 <= s.mos <= 5.0 for s in live)


async def test_bad_clients_are_closed_with_a_reason_and_a_good_stream_goes_on(speech, tiny_scorer, caplog):
    long = np.concatenate([speech["inbound"], speech["outbound"]])  # ~26 s at 8 kHz
    ulaw = mt.mulaw_encode(long)
    good = [(i * 0.02, c) for i, c in enumerate(mt.raw_chunks(ulaw, 160))]
    ingest = MediaIngest(timeout_s=3.0)
    async with Monitor(tiny_scorer, TINY, ingest) as mon, aiohttp.ClientSession() as http:
        good_ws = await http.ws_connect(mon.url + "?codec=PCMU&stream=good")
        sender = asyncio.create_task(mt.send_paced(good_ws, good, speed=4.0))  # ~6.5 s
        await asyncio.sleep(0.5)

        async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
            msg = await ws.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra
            return ws.close_code, ""

        # Garbage on a Twilio connection.
        async with http.ws_connect(mon.url) as ws:
            await ws.send_str("\x00garbage{")
            assert await closed_with(ws) == (1007, "message is not JSON: Twilio Media Streams messages are JSON "
                                                   "objects")
        # JSON nested deeper than the parser goes (100,000 levels): a reason, not a traceback in the log.
        async with http.ws_connect(mon.url) as ws:
            await ws.send_str("[" * 100_000)
            code, reason = await closed_with(ws)
            assert code == 1008 and "nests JSON too deeply" in reason, (code, reason)
        # A call whose sequence numbers jump: its stream starts, then fails with the reason.
        call = mt.twilio_call({"inbound": ulaw[:8000 * 2]}, call_sid="CAbadseq", stop=False)
        sent = [m for _, m in call[:40]]
        bad = json.loads(call[41][1])  # skips one: sequence number +2
        async with http.ws_connect(mon.url) as ws:
            for m in [*sent, json.dumps(bad)]:
                await ws.send_str(m)
            code, reason = await closed_with(ws)
            assert code == 1008 and "expected" in reason and "follows" in reason, reason
        # A 10 MB frame: aiohttp refuses it from its header (1009); the raw stream it had started fails.
        async with http.ws_connect(mon.url + "?codec=PCMU&stream=huge") as ws:
            await ws.send_bytes(ulaw[:1600])
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await ws.send_bytes(b"\x00" * (10 * 1024 * 1024))
            code, _ = await closed_with(ws)
            assert code == 1009, code
        await mon.until_ended({"CAbadseq-inbound", "huge"})
        assert not any(isinstance(e, StreamEnded) and e.stream == "good" for e in mon.events)  # still live
        await sender
        await good_ws.close()
        await mon.until_ended({"good"})
        events = await mon.stop()
    errors = {e.stream: e.error for e in events if isinstance(e, StreamError)}
    assert set(errors) == {"CAbadseq-inbound", "huge"}, errors
    assert "sequenceNumber" in errors["CAbadseq-inbound"] and "1009" in errors["huge"]
    ended = {e.stream: e.reason for e in events if isinstance(e, StreamEnded)}
    assert ended == {"CAbadseq-inbound": "error", "huge": "error", "good": "closed"}, ended
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    # The good stream: every window in order, every one scored, nothing dropped, all of its audio there.
    mine = scores(events, "good")
    assert [s.window for s in mine] == list(range(len(mine))) and len(mine) >= 40
    assert all(s.mos is not None or s.reason in ("silent", "no_speech") for s in mine), \
        {s.reason for s in mine}
    assert not [e for e in of(events, "good") if isinstance(e, InputDropped)]
    end = of(events, "good")[-1]
    assert isinstance(end, StreamEnded) and abs(end.t - long.size / 8000) < 0.01


async def test_no_media_for_the_timeout_ends_a_call_as_inactive_and_a_dropped_one_as_disconnected(speech,
                                                                                                  tiny_scorer):
    ulaw = mt.mulaw_encode(speech["inbound"][:8000 * 2])
    async with Monitor(tiny_scorer, TINY, MediaIngest(timeout_s=0.5)) as mon, aiohttp.ClientSession() as http:
        async with http.ws_connect(mon.url) as ws:
            for _, m in mt.twilio_call({"inbound": ulaw}, call_sid="CAquiet", stop=False)[:-1]:  # no mark, no stop
                await ws.send_str(m)
            t0 = asyncio.get_running_loop().time()
            msg = await ws.receive(timeout=5)
            waited = asyncio.get_running_loop().time() - t0
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000 and msg.extra == "no media for 0.5 s"
            assert 0.3 < waited < 2.0, waited
        # A connection that goes away without stop or a close frame.
        ws = await http.ws_connect(mon.url + "?codec=PCMU&stream=dropped")
        await ws.send_bytes(ulaw[:8000])
        await asyncio.sleep(0.1)
        conn = ws._response.connection
        assert conn is not None and conn.transport is not None
        conn.transport.abort()  # the TCP connection is lost: no close frame
        await mon.until_ended({"CAquiet-inbound", "dropped"})
        events = await mon.stop()
    ended = {e.stream: e.reason for e in events if isinstance(e, StreamEnded)}
    assert ended == {"CAquiet-inbound": "inactive", "dropped": "disconnected"}, ended
    assert not [e for e in events if isinstance(e, StreamError)]


async def test_sessions_are_bounded_and_refused_after_the_monitor_stops(speech, tiny_scorer):
    ulaw = mt.mulaw_encode(speech["inbound"][:8000])
    ingest = MediaIngest(timeout_s=5.0, max_sessions=2)
    async with Monitor(tiny_scorer, TINY, ingest) as mon, aiohttp.ClientSession() as http:
        a = await http.ws_connect(mon.url + "?codec=PCMU&stream=a")
        b = await http.ws_connect(mon.url + "?codec=PCMU&stream=b")
        for ws in (a, b):
            await ws.send_bytes(ulaw)
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(mon.url + "?codec=PCMU&stream=c")
        assert err.value.status == 503 and err.value.headers is not None
        assert err.value.headers.get("Retry-After") == "5"
        async with http.get(mon.url, params={"codec": "L16"}) as r:  # checked before the upgrade
            assert r.status == 400 and "rate" in await r.text()
        async with http.get(mon.url) as r:
            assert r.status == 426
        await a.close()  # a slot is free again
        await mon.until_ended({"a"})
        c = await http.ws_connect(mon.url + "?codec=PCMU&stream=c")
        await c.send_bytes(ulaw)
        await asyncio.sleep(0.2)
        events = await mon.stop()  # live streams end as stopped; their websockets are closed (going away)
        for ws in (b, c):
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001, msg
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(mon.url + "?codec=PCMU&stream=d")
        assert err.value.status == 503
    ended = {e.stream: e.reason for e in events if isinstance(e, StreamEnded)}
    assert ended == {"a": "closed", "b": "stopped", "c": "stopped"}, ended
    assert not ingest.connections
