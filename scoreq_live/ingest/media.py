"""Media-stream websockets: live call audio forked to the monitor over a websocket (``GET /media``).

Voice platforms fork a call's audio to analytics services this way.  Two wire
formats are understood; the URL's query chooses:

* **Twilio Media Streams** (no ``codec=`` in the query), the JSON format that
  Telnyx, SignalWire and others copy: text messages ``connected``, ``start``
  (``streamSid``, ``start.callSid``, ``start.tracks``, ``start.mediaFormat``),
  ``media`` (``media.track``, ``media.timestamp`` in ms, ``media.payload``:
  base64 audio), ``mark``, ``dtmf``, ``error`` (all three ignored) and ``stop``.
  Telnyx's snake_case spellings (``sequence_number``, ``stream_id``,
  ``call_control_id``, ``media_format``, ``sample_rate``) are accepted too.
  Formats: ``audio/x-mulaw`` and ``audio/x-alaw`` at 8000 Hz, ``audio/l16`` at
  8000 or 16000 Hz (big-endian, as RTP payloads are), mono.  Each track of a
  call is its own stream, ``CALLSID-inbound`` and ``CALLSID-outbound`` (the
  ``streamSid`` when the call SID is not a valid stream name; ``?stream=NAME``
  replaces both), starting with the track's first ``media``.  Every message
  that carries a ``sequenceNumber`` must carry the previous one plus 1 (lost or
  reordered messages are an error).  A jump in a track's ``media.timestamp``
  of more than one chunk is filled with silence (at most the timeout's worth
  per jump), so stream time follows call time; a timestamp going backwards is
  an error.  ``customParameters`` are ignored.
* **Raw PCM**, as FreeSWITCH's mod_audio_fork, jambonz ``listen`` and
  Asterisk's websocket channel send it: ``?codec=L16&rate=16000`` (L16: signed
  16-bit little-endian, 8000..48000 Hz; also ``PCMU``/``PCMA`` at 8000 Hz),
  ``&channels=2`` for stereo (interleaved), ``&stream=NAME``.  Binary messages
  are audio and must hold whole samples (of every channel); text messages are
  metadata (those tools send a JSON text first) and are ignored, up to
  :data:`MAX_TEXT_MESSAGES` of at most :data:`MAX_TEXT_BYTES` each.  A mono
  connection is the stream ``NAME``; a stereo one is two streams, ``NAME-1``
  and ``NAME-2`` (mod_audio_fork's stereo mode puts the caller on the first
  channel and the callee on the second).  Without ``stream=`` the name is
  ``media-N``.

``token`` may also be in the query (the HTTP server checks it); any other key
is refused with 400, as are bad values.  The parsers (:class:`TwilioParser`,
:class:`RawParser`) are sans-I/O: they turn one message into events and raise
:class:`ProtocolError`; :class:`MediaIngest` moves messages from the websocket
to them and their audio to the engine.

How a connection's streams end: ``stop`` or a websocket close from the client:
``closed``; the connection lost without either: ``disconnected``; no media for
the timeout: ``inactive`` (the websocket is closed, 1000, saying so); a
protocol error: the websocket is closed with 1007 (undecodable data: not JSON,
bad base64, torn samples) or 1008 (anything else) and the reason, and each of
the connection's streams fails with that reason (``stream_error``, then ended
with ``error``); a message over the size limit: aiohttp closes with 1009 and
the streams fail the same way.  When the monitor stops, live streams end with
``stopped`` and their websockets are closed (1001).

Connections are taken only while the monitor runs, and at most ``max_sessions``
at once: otherwise 503 with ``Retry-After``, before the upgrade (as are 400 for
a bad query and 426 for a request without an upgrade).  Each stream holds at
most :data:`BACKLOG_S` of audio the engine has not taken yet (older audio is
dropped and reported as ``input_dropped``), so a connection's memory is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from scoreq_live.core.events import EndReason, new_id
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.rtp.codecs import G711Decoder, codec_by_name
from scoreq_live.sources.base import CALL_KEY, STREAM_NAME, PushSource, Source, StreamSet

__all__ = [
    "CallStopped", "MediaEvent", "MediaIngest", "MediaQuery", "MediaSource", "ProtocolError", "QueryError",
    "RawFormat", "RawParser", "TrackAudio", "TrackStarted", "TwilioParser", "parse_media_query",
]

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0  # websocket pings; a client that stops answering them is disconnected
CLOSE_TIMEOUT_S = 2.0  # how long a close waits for the client's close frame
BACKLOG_S = 10.0  # audio a stream may hold for the engine; older audio is dropped (and reported) beyond it
MAX_TEXT_MESSAGES = 256  # metadata text messages a raw PCM connection may send
MAX_TEXT_BYTES = 16 * 1024  # ... each at most this long
RETRY_AFTER_S = 5
_REASON_BYTES = 123  # what a websocket close frame has room for
_TRACKS = ("inbound", "outbound")
_QUERY_KEYS = ("codec", "rate", "channels", "stream", "call", "token")
_SEQ_DIGITS = 18

# ------------------------------------------------------------------------------------------------- errors


class QueryError(ScoreqLiveError):
    """The ``/media`` URL's query cannot be used (HTTP 400); the message says what is accepted."""


class ProtocolError(ScoreqLiveError):
    """A message breaks the protocol; the connection is closed with ``code`` (1007 or 1008) and the message."""

    def __init__(self, reason: str, code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        super().__init__(reason)
        self.code = int(code)


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(reason, WSCloseCode.INVALID_TEXT)  # 1007: the data itself cannot be decoded


# ------------------------------------------------------------------------------------------------- query


@dataclass(frozen=True)
class RawFormat:
    """The audio of a raw PCM connection: ``codec`` (L16, PCMU, PCMA), ``rate`` (Hz), ``channels`` (1 or 2)."""

    codec: str
    rate: int
    channels: int = 1

    @property
    def sample_bytes(self) -> int:
        return 2 if self.codec == "L16" else 1

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel: binary messages are whole numbers of these."""
        return self.sample_bytes * self.channels


@dataclass(frozen=True)
class MediaQuery:
    """What a ``/media`` URL asks for: raw PCM of ``raw``'s format (None: Twilio JSON), a stream name or None."""

    raw: RawFormat | None = None
    stream: str | None = None
    call: str | None = None  # ?call=KEY: the call the streams belong to (streams of one key form one call record)


_RAW_CODECS = {"l16": "L16", "pcmu": "PCMU", "pcma": "PCMA"}
_RAW_RATES = (8000, 48000)


def parse_media_query(items: Iterable[tuple[str, str]]) -> MediaQuery:
    """The query of a ``/media`` URL as (key, value) pairs; raises :class:`QueryError` naming what is wrong."""
    values: dict[str, str] = {}
    for key, value in items:
        if key not in _QUERY_KEYS:
            raise QueryError(f"unknown query key {key!r}; accepted: {', '.join(_QUERY_KEYS)}")
        if key in values:
            raise QueryError(f"query key {key!r} is given twice")
        values[key] = value
    stream = values.get("stream")
    if stream is not None and not STREAM_NAME.match(stream):
        raise QueryError(f"stream name {stream!r} is not valid: 1-64 of A-Z a-z 0-9 _ . : -")
    call = values.get("call")
    if call is not None and not CALL_KEY.match(call):
        raise QueryError(f"call key {call[:80]!r} is not valid: 1-128 printable characters without spaces")
    if "codec" not in values:
        extra = [k for k in ("rate", "channels") if k in values]
        if extra:
            raise QueryError(f"{' and '.join(extra)} need codec= (raw PCM: ?codec=L16&rate=16000); Twilio Media "
                             "Streams messages carry their own format")
        if stream is not None and not STREAM_NAME.match(f"{stream}-outbound"):
            raise QueryError(f"stream name {stream!r} is too long: its tracks are named {stream}-inbound and "
                             f"{stream}-outbound, which must be at most 64 characters")
        return MediaQuery(None, stream, call)

    codec = _RAW_CODECS.get(values["codec"].strip().lower())
    if codec is None:
        raise QueryError(f"codec={values['codec']!r} is not supported; raw PCM codecs: L16 (signed 16-bit "
                         "little-endian), PCMU, PCMA")
    ints: dict[str, int] = {}
    for key in ("rate", "channels"):
        if key in values:
            v = values[key].strip()
            if not v.isdigit() or len(v) > 6:
                raise QueryError(f"{key}={values[key]!r} is not a whole number")
            ints[key] = int(v)
    channels = ints.get("channels", 1)
    if channels not in (1, 2):
        raise QueryError(f"channels={channels} is not supported: 1 (mono) or 2 (stereo, interleaved)")
    rate = ints.get("rate")
    if codec == "L16":
        if rate is None:
            raise QueryError("codec=L16 needs its sample rate: rate=<Hz>, e.g. ?codec=L16&rate=16000")
        if not _RAW_RATES[0] <= rate <= _RAW_RATES[1]:
            raise QueryError(f"rate={rate} is out of range: L16 rates are {_RAW_RATES[0]}..{_RAW_RATES[1]} Hz")
    elif rate not in (None, 8000):
        raise QueryError(f"{codec} is 8000 Hz; rate={rate} is not possible (leave rate out)")
    if stream is not None and channels == 2 and not STREAM_NAME.match(f"{stream}-2"):
        raise QueryError(f"stream name {stream!r} is too long: a stereo connection's streams are {stream}-1 and "
                         f"{stream}-2, which must be at most 64 characters")
    return MediaQuery(RawFormat(codec, rate or 8000, channels), stream, call)


# ------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TrackStarted:
    """A track's first audio: a new stream ``name`` at ``rate`` Hz.  ``track``: inbound/outbound, or 1/2 (raw)."""

    track: str
    name: str
    rate: int
    detail: str
    call: str = ""  # the call's key (a Twilio callSid, ?call=); "" for none
    meta: tuple[tuple[str, str], ...] = ()  # what the connection says of the stream (callSid, track, peer)


@dataclass(frozen=True)
class TrackAudio:
    """Audio of one track: float32 mono at the track's rate, ``filled`` samples of silence for a gap first."""

    track: str
    samples: np.ndarray
    filled: int = 0


@dataclass(frozen=True)
class CallStopped:
    """The publisher ended the call (Twilio ``stop``): every track ends, reason ``closed``."""


MediaEvent = TrackStarted | TrackAudio | CallStopped


def _decoder(codec: str, channels: int, big_endian: bool) -> Callable[[bytes], np.ndarray]:
    """A function from payload bytes (whole samples) to float32 ``[n, channels]``."""
    if codec in ("PCMU", "PCMA"):
        g711 = G711Decoder(codec_by_name(codec, 0 if codec == "PCMU" else 8))

        def decode_g711(payload: bytes) -> np.ndarray:
            return g711.decode(payload).reshape(-1, channels)

        return decode_g711
    dtype = np.dtype(">i2" if big_endian else "<i2")

    def decode_l16(payload: bytes) -> np.ndarray:
        return (np.frombuffer(payload, dtype).astype(np.float32) / np.float32(32768.0)).reshape(-1, channels)

    return decode_l16


# ------------------------------------------------------------------------------------------------- Twilio

_JSON_ENCODINGS = {"audio/x-mulaw": "PCMU", "pcmu": "PCMU", "audio/x-alaw": "PCMA", "pcma": "PCMA",
                   "audio/l16": "L16", "l16": "L16"}
_IGNORED_EVENTS = ("connected", "mark", "dtmf", "error")


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def _whole(value: Any, what: str) -> int:
    """A non-negative whole number given as a JSON number or a decimal string (as Twilio sends them)."""
    if isinstance(value, bool):
        raise ProtocolError(f"{what} must be a whole number, not {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= _SEQ_DIGITS:
        return int(value)
    raise ProtocolError(f"{what} must be a non-negative whole number, not {str(value)[:40]!r}")


@dataclass
class _TrackState:
    name: str
    rate: int
    anchor_ms: float = 0.0  # media.timestamp of the track's first sample (moved when a long gap is cut short)
    samples: int = 0  # samples delivered so far, silence included
    last_ts: int | None = None


class TwilioParser:
    """Twilio Media Streams messages, one at a time: :meth:`text` (and :meth:`binary`, always an error).

    ``name``: the streams' name prefix instead of the call SID (``?stream=``); ``fallback``: the prefix when
    neither the call SID nor the stream SID is a valid name; ``max_gap_s``: the most silence put in for one
    jump in ``media.timestamp``; ``peer``: the client's address, for the streams' detail.
    """

    def __init__(self, name: str | None = None, fallback: str = "media", max_gap_s: float = 5.0,
                 peer: str = "") -> None:
        self.name = name
        self.fallback = fallback
        self.max_gap_s = max_gap_s
        self.peer = peer
        self.started = False
        self.stopped = False
        self.call = ""  # ?call=: the call's key, instead of the call SID
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self.prefix = ""
        self.codec = ""
        self.rate = 0
        self._encoding = ""
        self._tracks: tuple[str, ...] = _TRACKS
        self._decode: Callable[[bytes], np.ndarray] | None = None
        self._seq: int | None = None
        self.tracks: dict[str, _TrackState] = {}

    def binary(self, data: bytes) -> list[MediaEvent]:
        raise ProtocolError("binary message on a Twilio Media Streams connection: messages are JSON text "
                            "(for raw PCM, connect with ?codec=L16&rate=...)")

    def text(self, data: str) -> list[MediaEvent]:
        try:
            return self._text(data)
        except RecursionError:  # '[[[[...': deeper than the parser (or a repr of a value) goes
            raise ProtocolError("message nests JSON too deeply: Twilio Media Streams messages are JSON objects "
                                "a few levels deep") from None

    def _text(self, data: str) -> list[MediaEvent]:
        try:
            msg = json.loads(data)
        except ValueError:
            raise _invalid("message is not JSON: Twilio Media Streams messages are JSON objects") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"message is not a JSON object (got a JSON {type(msg).__name__})")
        event = msg.get("event")
        if not isinstance(event, str):
            raise ProtocolError("message has no \"event\" (connected, start, media, mark, dtmf, stop)")
        self._sequence(msg)
        if self.stopped:
            raise ProtocolError(f"{event!r} message after stop")
        if event == "media":
            return self._media(msg)
        if event == "start":
            self._start(msg)
            return []
        if event == "stop":
            if not self.started:
                raise ProtocolError("stop before start")
            self.stopped = True
            return [CallStopped()]
        if event in _IGNORED_EVENTS:
            return []
        raise ProtocolError(f"unknown event {event[:40]!r}; expected connected, start, media, mark, dtmf or stop")

    def _sequence(self, msg: dict[str, Any]) -> None:
        value = _get(msg, "sequenceNumber", "sequence_number")
        if value is None:
            return
        n = _whole(value, "sequenceNumber")
        if self._seq is not None and n != self._seq + 1:
            raise ProtocolError(f"sequenceNumber {n} follows {self._seq} (expected {self._seq + 1}): "
                                "messages were lost or reordered")
        self._seq = n

    def _start(self, msg: dict[str, Any]) -> None:
        if self.started:
            raise ProtocolError("a second start on one connection")
        start = msg.get("start")
        if not isinstance(start, dict):
            raise ProtocolError("start message without a \"start\" object")
        fmt = _get(start, "mediaFormat", "media_format")
        if not isinstance(fmt, dict):
            raise ProtocolError("start.mediaFormat is missing (encoding, sampleRate, channels)")
        encoding = fmt.get("encoding")
        codec = _JSON_ENCODINGS.get(encoding.strip().lower()) if isinstance(encoding, str) else None
        if codec is None:
            raise ProtocolError(f"unsupported mediaFormat.encoding {str(encoding)[:40]!r}: supported are "
                                "audio/x-mulaw, audio/x-alaw (8000 Hz) and audio/l16 (8000 or 16000 Hz)")
        rate = _get(fmt, "sampleRate", "sample_rate")
        rates = (8000, 16000) if codec == "L16" else (8000,)
        if isinstance(rate, bool) or rate not in rates:
            raise ProtocolError(f"unsupported mediaFormat.sampleRate {str(rate)[:20]!r} for {encoding}: "
                                f"{' or '.join(map(str, rates))}")
        channels = fmt.get("channels", 1)
        if isinstance(channels, bool) or channels != 1:
            raise ProtocolError(f"unsupported mediaFormat.channels {str(channels)[:20]!r}: each track is mono (1)")
        tracks = start.get("tracks")
        if tracks is not None:
            if (not isinstance(tracks, list) or not tracks
                    or not all(isinstance(t, str) and _track(t) in _TRACKS for t in tracks)):
                raise ProtocolError(f"start.tracks must list \"inbound\" and/or \"outbound\" (got "
                                    f"{json.dumps(tracks)[:60]})")
            self._tracks = tuple(dict.fromkeys(_track(t) for t in tracks))
        stream_sid = _get(msg, "streamSid", "stream_id")
        if stream_sid is None:
            stream_sid = _get(start, "streamSid", "stream_id")
        call_sid = _get(start, "callSid", "call_control_id")
        self.call_sid = call_sid if isinstance(call_sid, str) else None
        self.stream_sid = stream_sid if isinstance(stream_sid, str) else None
        self.prefix = self.name or next(
            (sid for sid in (self.call_sid, self.stream_sid) if sid and STREAM_NAME.match(f"{sid}-outbound")),
            self.fallback)
        self.codec, self.rate, self._encoding = codec, int(rate), str(encoding)
        self._decode = _decoder(codec, 1, big_endian=True)
        self.started = True

    def _media(self, msg: dict[str, Any]) -> list[MediaEvent]:
        if not self.started:
            raise ProtocolError("media before start")
        media = msg.get("media")
        if not isinstance(media, dict):
            raise ProtocolError("media message without a \"media\" object")
        raw_track = media.get("track", "inbound")
        track = _track(raw_track) if isinstance(raw_track, str) else ""
        if track not in self._tracks:
            raise ProtocolError(f"media for track {str(raw_track)[:20]!r}, which start did not announce "
                                f"(tracks: {', '.join(self._tracks)})")
        payload = media.get("payload")
        if not isinstance(payload, str):
            raise ProtocolError("media.payload is missing (base64 audio)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid("media.payload is not valid base64") from None
        if self.codec == "L16" and len(data) % 2:
            raise _invalid(f"media.payload of {len(data)} bytes is not a whole number of 16-bit samples")
        assert self._decode is not None  # set by start
        samples = self._decode(data)[:, 0]
        ts_value = media.get("timestamp")
        ts = None if ts_value is None else _whole(ts_value, "media.timestamp")

        out: list[MediaEvent] = []
        state = self.tracks.get(track)
        if state is None:
            state = self.tracks[track] = _TrackState(f"{self.prefix}-{track}", self.rate)
            state.anchor_ms = float(ts) if ts is not None else 0.0
            sid = f" stream {self.stream_sid}" if self.stream_sid else ""
            peer = f" from {self.peer}" if self.peer else ""
            meta = {"callSid": self.call_sid, "streamSid": self.stream_sid, "track": track, "peer": self.peer}
            out.append(TrackStarted(track, state.name, self.rate,
                                    f"{self._encoding} {self.rate} Hz, {track} track{sid}{peer}",
                                    self.call or self.call_sid or self.stream_sid or "",
                                    tuple((k, v) for k, v in meta.items() if v)))
        filled = 0
        if ts is not None:
            if state.last_ts is not None and ts < state.last_ts:
                raise ProtocolError(f"media.timestamp went backwards on the {track} track ({ts} ms after "
                                    f"{state.last_ts} ms)")
            state.last_ts = ts
            expected_ms = state.anchor_ms + state.samples * 1000.0 / state.rate
            chunk_ms = max(samples.size * 1000.0 / state.rate, 1.0)
            gap_ms = ts - expected_ms
            if gap_ms > chunk_ms:  # more than a chunk's worth missing: the sender skipped audio
                filled = min(int(round(gap_ms * state.rate / 1000.0)), int(self.max_gap_s * state.rate))
                state.samples += filled
                if filled < int(round(gap_ms * state.rate / 1000.0)):  # cut short: call time starts again here
                    state.anchor_ms = ts - state.samples * 1000.0 / state.rate
        state.samples += samples.size
        if filled:
            samples = np.concatenate([np.zeros(filled, np.float32), samples])
        out.append(TrackAudio(track, samples, filled))
        return out


def _track(name: str) -> str:
    """Telnyx and Twilio's DTMF spell tracks ``inbound_track``; media uses ``inbound``."""
    return name[:-6] if name.endswith("_track") else name


# ------------------------------------------------------------------------------------------------- raw PCM


class RawParser:
    """Raw PCM messages of one format: :meth:`binary` is audio, :meth:`text` metadata (bounded, ignored)."""

    def __init__(self, fmt: RawFormat, name: str, peer: str = "", max_text: int = MAX_TEXT_MESSAGES,
                 max_text_bytes: int = MAX_TEXT_BYTES) -> None:
        self.format = fmt
        self.name = name
        self.peer = peer
        self.max_text = max_text
        self.max_text_bytes = max_text_bytes
        self.texts = 0
        self.started = False
        self.call = ""  # ?call=: the call's key
        self._decode = _decoder(fmt.codec, fmt.channels, big_endian=False)
        self.tracks = [str(c + 1) for c in range(fmt.channels)] if fmt.channels > 1 else [""]

    def text(self, data: str) -> list[MediaEvent]:
        self.texts += 1
        if self.texts > self.max_text:
            raise ProtocolError(f"more than {self.max_text} text messages: raw PCM audio comes in binary messages")
        if len(data) > self.max_text_bytes or len(data.encode("utf-8", "replace")) > self.max_text_bytes:
            raise ProtocolError(f"text message longer than {self.max_text_bytes} bytes: raw PCM connections take "
                                "short metadata text only")
        return []

    def binary(self, data: bytes) -> list[MediaEvent]:
        fmt = self.format
        if len(data) % fmt.frame_bytes:
            raise _invalid(f"binary message of {len(data)} bytes is not a whole number of samples "
                           f"({fmt.frame_bytes} bytes each: {fmt.codec}, {fmt.channels} channel(s))")
        if not data:
            return []
        out: list[MediaEvent] = []
        if not self.started:
            self.started = True
            peer = f" from {self.peer}" if self.peer else ""
            for i, track in enumerate(self.tracks):
                name = f"{self.name}-{track}" if track else self.name
                which = f", channel {i + 1} of {fmt.channels}" if track else ""
                meta = {"channel": track, "peer": self.peer}
                out.append(TrackStarted(track, name, fmt.rate, f"{fmt.codec} {fmt.rate} Hz{which}{peer}",
                                        self.call, tuple((k, v) for k, v in meta.items() if v)))
        frames = self._decode(data)
        for i, track in enumerate(self.tracks):
            out.append(TrackAudio(track, np.ascontiguousarray(frames[:, i])))
        return out


# ------------------------------------------------------------------------------------------------- sources


class MediaSource(PushSource):
    """One track of a media websocket: the audio its connection pushes, at the format's rate."""

    kind = "media"

    def __init__(self, name: str, rate: int, detail: str, backlog_s: float = BACKLOG_S) -> None:
        super().__init__(name, detail, rate, backlog_s)


# ------------------------------------------------------------------------------------------------- ingest


class _Connection:
    """One websocket: its parser and the streams its tracks opened."""

    def __init__(self, ws: web.WebSocketResponse, parser: TwilioParser | RawParser, peer: str) -> None:
        self.ws = ws
        self.parser = parser
        self.peer = peer
        self.sources: dict[str, MediaSource] = {}

    def end(self, reason: EndReason) -> None:
        for src in self.sources.values():
            src.end(reason)

    def fail(self, error: str) -> None:
        for src in self.sources.values():
            src.fail(error)


def _reason(text: str) -> bytes:
    """A close reason that fits a close frame (123 bytes of UTF-8)."""
    data = text.encode("utf-8")
    if len(data) <= _REASON_BYTES:
        return data
    return data[:_REASON_BYTES - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def _reply(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    h = {"Cache-Control": "no-store"}
    h.update(headers or {})
    return web.Response(status=status, text=text + "\n", content_type="text/plain", headers=h)


class MediaIngest(StreamSet):
    """The media-stream websocket endpoint (``GET /media``): a stream per call track while the monitor runs.

    :meth:`accept` serves one websocket (the HTTP server calls it once Host, token and Origin are checked);
    :meth:`streams` hands each new track to the engine.  ``timeout_s``: no media this long ends a connection
    (``inactive``), and bounds the silence put in for one timestamp jump; ``max_sessions``: connections at
    once (more get 503); ``max_message_bytes``: the largest websocket message (larger: closed with 1009).
    """

    kind = "media"
    endpoint = True

    def __init__(self, timeout_s: float = 5.0, max_sessions: int = 64, max_message_bytes: int = 256 * 1024) -> None:
        super().__init__("media", "media-stream websockets (GET /media)")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (got {timeout_s})")
        self.timeout_s = timeout_s
        self.max_sessions = max_sessions
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self._new: collections.deque[MediaSource] = collections.deque()
        self._wake = asyncio.Event()
        self._running = False
        self._stopped = False
        self._closing: set[asyncio.Task[Any]] = set()
        self._count = itertools.count(1)
        self.accepted = 0  # connections upgraded since start
        self.refused = 0  # requests refused (bad query, full, not running)

    @property
    def accepting(self) -> bool:
        """True while the monitor runs (:meth:`streams` is being iterated) and takes new connections."""
        return self._running and not self._stopped

    # -- StreamSet --------------------------------------------------------------------------------------

    async def streams(self) -> AsyncIterator[Source]:
        self._running = True
        try:
            while True:
                while self._new:
                    yield self._new.popleft()
                self._wake.clear()
                await self._wake.wait()
        finally:
            self._shutdown()

    def close(self) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        """The monitor stops: live streams end (``stopped``), websockets close (1001), new ones are refused."""
        if self._stopped:
            return
        self._running = False
        self._stopped = True
        while self._new:
            self._new.popleft().end("stopped")
        for conn in list(self.connections):
            conn.end("stopped")
            self._close_soon(conn.ws, WSCloseCode.GOING_AWAY, "the monitor is stopping")

    def _close_soon(self, ws: web.WebSocketResponse, code: int, reason: str) -> None:
        if ws.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing is being served either
            return
        task = loop.create_task(ws.close(code=code, message=_reason(reason)))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- the HTTP side ----------------------------------------------------------------------------------

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """Serve one media websocket: 400 for a bad query, 426 without an upgrade, 503 when full or stopped."""
        if not self.accepting:
            self.refused += 1
            return _reply(503, "the monitor is not taking new streams (it is not running or is stopping)",
                          {"Retry-After": str(RETRY_AFTER_S)})
        try:
            query = parse_media_query(request.query.items())
        except QueryError as e:
            self.refused += 1
            return _reply(400, str(e))
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, heartbeat=HEARTBEAT_S, compress=False,
                                   timeout=CLOSE_TIMEOUT_S)
        if not ws.can_prepare(request).ok:
            self.refused += 1
            return _reply(426, "GET /media is a websocket: send an Upgrade: websocket request",
                          {"Upgrade": "websocket", "Connection": "Upgrade"})
        if len(self.connections) >= self.max_sessions:
            self.refused += 1
            return _reply(503, f"too many media websockets (at most {self.max_sessions}); try again later",
                          {"Retry-After": str(RETRY_AFTER_S)})
        peer = request.remote or ""
        parser: TwilioParser | RawParser
        if query.raw is None:
            parser = TwilioParser(query.stream, f"media-{next(self._count)}", self.timeout_s, peer)
        else:
            parser = RawParser(query.raw, query.stream or f"media-{next(self._count)}", peer)
        # ?call= names the call; a stereo raw connection's two channels are one call of their own without it
        parser.call = query.call or (new_id() if query.raw is not None and query.raw.channels > 1 else "")
        conn = _Connection(ws, parser, peer)
        self.connections.add(conn)  # counted before the first await, so that max_sessions holds
        try:
            await ws.prepare(request)
            self.accepted += 1
            await self._serve(conn)
        except asyncio.CancelledError:
            conn.end("stopped")
            raise
        except ConnectionError:  # the client went away during the handshake or a close
            conn.end("disconnected")
        except Exception as e:  # one connection's trouble must not reach the others
            log.exception("media websocket from %s failed", peer)
            conn.fail(f"media websocket failed: {type(e).__name__}: {e}")
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
        finally:
            self.connections.discard(conn)
            conn.end("disconnected")  # a no-op when its streams have ended already
        return ws

    async def _serve(self, conn: _Connection) -> None:
        ws = conn.ws
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                msg = await ws.receive(timeout=left)
            except asyncio.TimeoutError:
                conn.end("inactive")
                await ws.close(code=WSCloseCode.OK, message=_reason(f"no media for {self.timeout_s:g} s"))
                return
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                try:
                    if msg.type == WSMsgType.TEXT:
                        events = conn.parser.text(msg.data)
                    else:
                        events = conn.parser.binary(msg.data)
                except ProtocolError as e:
                    log.info("media websocket from %s: %s", conn.peer, e)
                    conn.fail(f"media websocket: {e}")
                    await ws.close(code=e.code, message=_reason(str(e)))
                    return
                if any(isinstance(ev, TrackAudio) for ev in events):  # media keeps the connection alive
                    deadline = loop.time() + self.timeout_s
                if self._deliver(conn, events):
                    conn.end("closed")  # stop; Twilio closes the socket itself right after it
                    await ws.close(code=WSCloseCode.OK, message=b"stop received")
                    return
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING):
                conn.end("closed")  # the client closed it (or the monitor is stopping: its streams have ended)
                return
            elif msg.type == WSMsgType.CLOSED:
                conn.end("disconnected")  # the connection ended without a close frame
                return
            elif msg.type == WSMsgType.ERROR:
                err = msg.data
                if isinstance(err, WebSocketError):  # too large (1009), not a websocket frame, not UTF-8
                    log.info("media websocket from %s: %s", conn.peer, err)
                    conn.fail(f"media websocket closed ({err.code}): {err}")
                else:
                    conn.end("disconnected")
                return

    def _deliver(self, conn: _Connection, events: list[MediaEvent]) -> bool:
        """Hand a message's events on; True when the call was stopped."""
        if self._stopped:  # a message read just as the monitor stopped: its streams have ended
            return False
        for ev in events:
            if isinstance(ev, TrackAudio):
                conn.sources[ev.track].push(ev.samples)
            elif isinstance(ev, TrackStarted):
                src = MediaSource(ev.name, ev.rate, ev.detail)
                src.call, src.meta = ev.call, dict(ev.meta)
                conn.sources[ev.track] = src
                self._new.append(src)
                self._wake.set()
            else:
                return True
        return False
