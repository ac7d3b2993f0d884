"""The one event model that every output renders.

Every event serialises to a flat JSON object with ``v`` (schema version) and
``type``.  The README documents the schema; bump :data:`SCHEMA_VERSION` on any
incompatible change.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

SCHEMA_VERSION = 1

Mode = Literal["nr", "ref"]
"""nr: a MOS 1-5 per window; ref: the distance to a clean reference's embeddings (lower is better)."""
SkipReason = Literal["silent", "no_speech", "overloaded", "error", "stopped", "backend_unavailable"]
"""Why a window has no score: too quiet, too little speech, the scorer was behind, it failed, the monitor stopped,
the inference server (``--backend``) did not answer in time or could not be reached."""
BackendState = Literal["up", "down", "fallback"]
"""A remote scoring backend's state: answering; not answering (windows skipped); not answering, windows scored
by the local model meanwhile (``--backend-fallback local``)."""
EndReason = Literal["eof", "stopped", "error", "inactive", "bye", "closed", "disconnected", "evicted"]
"""Why a stream ended: its input ended, the monitor was stopped, the input failed, no packets came for the
timeout (RTP, WebRTC, media websockets), the sender said goodbye (RTCP BYE), the publisher ended it (WHIP
``DELETE``, a media websocket's ``stop`` or close), its connection was lost (ICE failed, websocket dropped),
or it gave its place on a full RTP port to a new sender while it sent less than audio does (``evicted``)."""
StreamState = Literal["live", "ended", "stopped", "error"]
"""A stream's state as the outputs show it (``eof`` shows as ``ended``)."""


def new_id() -> str:
    """An id for a stream's run or a call: 12 hex digits of Unix milliseconds, then 8 random ones.

    Sorts by time and never repeats (across restarts and monitors), where a stream's name is reused.
    """
    return f"{int(time.time() * 1000):012x}{os.urandom(4).hex()}"


def _round(x: float | None, digits: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


@dataclass
class Event:
    """Base of all events: which stream, and the wall-clock time it was emitted."""

    type: ClassVar[str] = "event"
    stream: str
    ts: float  # Unix time (seconds) when the event was emitted.

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ts"] = round(self.ts, 3)
        return {"v": SCHEMA_VERSION, "type": self.type, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class NetQuality:
    """What the network did to one window of a packet stream (RTP, capture): ``score`` events' ``net``.

    Packet counts are over the window's media time; ``loss_pct`` is RFC 3550
    A.3 (expected - received, never below 0); ``jitter_ms`` the RFC 3550 A.8
    interarrival jitter estimate, averaged over the window's packets; ``concealed`` the
    fraction of the window's audio that is concealment for lost packets;
    ``r_factor`` and ``mos_cq`` the ITU-T G.107 E-model's estimate from codec
    and loss alone (what the network says, beside what the audio model says).
    """

    codec: str
    expected: int
    received: int
    lost: int
    duplicated: int
    late: int
    loss_pct: float
    jitter_ms: float
    concealed: float
    r_factor: float
    mos_cq: float

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "expected": self.expected, "received": self.received, "lost": self.lost,
                "duplicated": self.duplicated, "late": self.late, "loss_pct": round(self.loss_pct, 3),
                "jitter_ms": round(self.jitter_ms, 3), "concealed": round(self.concealed, 4),
                "r_factor": round(self.r_factor, 2), "mos_cq": round(self.mos_cq, 3)}


@dataclass
class ScoreEvent(Event):
    """The result for one window of one stream.

    ``mos`` (mode ``nr``) or ``distance`` (mode ``ref``) is None when the
    window was not scored; ``reason`` then says why (``no_speech``,
    ``silent``, ``overloaded``, ``error``).  ``scores`` holds every named
    score of the model (its family's names, the primary ``mos`` or
    ``distance`` included) for a scored window, else it is left out.  Packet
    streams add ``net`` (:class:`NetQuality`); other inputs leave it out.
    """

    type: ClassVar[str] = "score"
    window: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    mode: Mode = "nr"
    mos: float | None = None
    distance: float | None = None
    smoothed: float | None = None
    speech: float = 0.0
    level_dbfs: float = -120.0
    model: str = ""
    latency_ms: float = 0.0
    reason: SkipReason | None = None
    net: NetQuality | None = None
    scores: dict[str, float] | None = None

    @property
    def value(self) -> float | None:
        return self.mos if self.mode == "nr" else self.distance

    def score(self, name: str) -> float | None:
        """A named score of this window (``None``: not scored, or the model gives no such score)."""
        if self.scores is not None and name in self.scores:
            return self.scores[name]
        if name == "mos":
            return self.mos
        if name == "distance":
            return self.distance
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "v": SCHEMA_VERSION,
            "type": self.type,
            "stream": self.stream,
            "ts": round(self.ts, 3),
            "window": self.window,
            "t_start": round(self.t_start, 4),
            "t_end": round(self.t_end, 4),
            "mode": self.mode,
        }
        # Exactly one of mos / distance, by mode, so a consumer never has to guess the unit.
        if self.mode == "nr":
            d["mos"] = _round(self.mos, 4)
        else:
            d["distance"] = _round(self.distance, 5)
        d.update(
            smoothed=_round(self.smoothed, 4),
            speech=round(self.speech, 3),
            level_dbfs=round(self.level_dbfs, 1),
            model=self.model,
            latency_ms=round(self.latency_ms, 1),
            reason=self.reason,
        )
        if self.scores is not None:
            d["scores"] = {k: _round(v, 5) for k, v in self.scores.items()}
        if self.net is not None:
            d["net"] = self.net.to_dict()
        return d


@dataclass
class ModelScore(Event):
    """The named scores of one window of a stream's additional model (``--model A --model B``: B's and later's).

    A stream scored by several models sends its first model's results as
    ``score`` events (``mos``/``distance`` are always that model's) and every
    other model's as ``model_score`` events, each model on its own windows
    (``window``, ``t_start``, ``t_end``: that model's window and hop).
    ``scores`` are named ``MODEL.SCORE`` (``dnsmos.bak``), or ``MODEL`` for a
    model that gives one score named after itself (``plcmos``); None when the
    window was not scored, and ``reason`` says why.  ``smoothed`` holds each
    score smoothed over that model's windows as ``score`` events smooth theirs.
    """

    type: ClassVar[str] = "model_score"
    model: str = ""
    window: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    scores: dict[str, float] | None = None
    smoothed: dict[str, float] | None = None
    speech: float = 0.0
    level_dbfs: float = -120.0
    latency_ms: float = 0.0
    reason: SkipReason | None = None

    def score(self, name: str) -> float | None:
        """A named score of this window (``None``: not scored, or the model gives no such score)."""
        return None if self.scores is None else self.scores.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION, "type": self.type, "stream": self.stream, "ts": round(self.ts, 3),
            "model": self.model, "window": self.window, "t_start": round(self.t_start, 4),
            "t_end": round(self.t_end, 4),
            "scores": None if self.scores is None else {k: _round(v, 5) for k, v in self.scores.items()},
            "smoothed": None if self.smoothed is None else {k: _round(v, 5) for k, v in self.smoothed.items()},
            "speech": round(self.speech, 3), "level_dbfs": round(self.level_dbfs, 1),
            "latency_ms": round(self.latency_ms, 1), "reason": self.reason,
        }


def qualified(model: str, name: str) -> str:
    """The name an additional model's score goes by: ``MODEL.SCORE``, or ``MODEL`` for a score named after it.

    A name that is qualified already (a multi-score model names its own: ``dnsmos.sig``) is kept.
    """
    return name if name == model or "." in name else f"{model}.{name}"


@dataclass
class StreamStarted(Event):
    type: ClassVar[str] = "stream_started"
    source: str = ""  # kind of input: file, mic, ...
    detail: str = ""  # what the input is: a path, a device name
    rate: int = 0  # the input's own sample rate, before resampling to 16 kHz
    channels: int = 0
    model: str = ""
    mode: Mode = "nr"
    window_s: float = 0.0
    hop_s: float = 0.0
    # This run of the stream, unique across monitors and restarts (a name is reused; this never is).
    id: str = ""
    # The call the stream belongs to, as its input knows it (a Twilio callSid, a SIP Call-ID, a WHIP ?call=,
    # the streams of one SDP live together); "" when the input knows none: the stream is a call of its own.
    call: str = ""
    # What the input knows of who is on the stream: ssrc, remote/local addresses, callSid, track, name, ...
    meta: dict[str, str] | None = None
    # The stream's additional models (``--model A --model B``), each {"model", "window_s", "hop_s", "scores"
    # (its qualified score names)}; None when one model scores the stream.
    models: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.models is None:
            del d["models"]
        return d


@dataclass
class StreamEnded(Event):
    """A stream ended; ``net`` (packet streams only) is what the network did over the whole stream.

    ``net``'s keys: ``codec``, ``expected``, ``received``, ``lost``, ``loss_pct``, ``max_burst`` (the
    longest run of packets lost in a row), ``jitter_mean_ms`` and ``jitter_p95_ms`` (of the RFC 3550 A.8
    estimate after each packet), ``concealed`` (share of the audio that is concealment), ``r_factor`` and
    ``mos_cq`` (ITU-T G.107 over the whole stream, as a window's ``net`` has them).
    """

    type: ClassVar[str] = "stream_ended"
    reason: EndReason = "eof"
    t: float = 0.0  # stream time at the end, seconds
    windows: int = 0
    scored: int = 0
    net: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.net is None:
            del d["net"]
        return d


@dataclass
class StreamError(Event):
    """A stream failed; the others go on."""

    type: ClassVar[str] = "stream_error"
    error: str = ""


@dataclass
class InputDropped(Event):
    """Input audio was lost before the monitor got it (a sound card's blocks dropped while the loop stalled).

    The samples after the gap follow those before it directly, so the windows
    around ``t`` (stream time, seconds) hold spliced audio.  ``dropped_s`` is
    this loss; ``total_s`` all of the stream's so far.
    """

    type: ClassVar[str] = "input_dropped"
    t: float = 0.0
    dropped_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(t=round(self.t, 4), dropped_s=round(self.dropped_s, 4), total_s=round(self.total_s, 4))
        return d


@dataclass
class AlertChange(Event):
    """What :class:`AlertEvent` and :class:`ClearedEvent` share: the rule, and the value that changed it.

    ``value`` is the metric in the window that raised or cleared the alert;
    ``t`` is stream time (seconds); ``id`` (``"<stream>:<rule>"``) pairs an
    alert with its ``cleared``.  The two are siblings, so ``isinstance(ev,
    AlertEvent)`` is true of raised alerts only.
    """

    type: ClassVar[str] = "alert_change"
    rule: str = ""  # the rule in canonical form, e.g. "mos<3.0 for 10s"
    metric: str = ""  # mos | distance | smoothed | speech | level_dbfs | latency_ms | loss_pct | jitter_ms
    op: str = "<"
    threshold: float = 0.0
    for_s: float = 0.0
    value: float | None = None
    t: float = 0.0
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["value"] = _round(self.value, 5)
        d["t"] = round(self.t, 4)
        return d


@dataclass
class AlertEvent(AlertChange):
    """An alert rule's condition has held on a stream for the rule's duration."""

    type: ClassVar[str] = "alert"


@dataclass
class ClearedEvent(AlertChange):
    """An alert stopped: its metric recovered (with hysteresis), or its stream ended.

    ``value`` is the current value and ``reason`` is ``recovered`` or ``stream_ended``.
    """

    type: ClassVar[str] = "cleared"
    reason: Literal["recovered", "stream_ended"] = "recovered"


@dataclass
class BackendStatus(Event):
    """The remote scoring backend (``--backend``) changed state; monitor-wide, so ``stream`` is ``""``.

    Sent when the monitor starts with a backend and on every change only.
    ``since`` is the Unix time the state began; ``error`` says why the backend
    is down (empty when up).
    """

    type: ClassVar[str] = "backend"
    state: BackendState = "up"
    backend: str = ""  # the backend's URL
    error: str = ""
    since: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["since"] = round(self.since, 3)
        return d


OutputState = Literal["failed", "recovered", "closed"]
"""An output's state: it cannot write (events are counted as lost), it can again, it stopped for good."""


@dataclass
class OutputStatus(Event):
    """An output (``--jsonl``, ...) failed to write, recovered, or stopped for good; monitor-wide (``stream`` "").

    Sent on every change only.  ``output`` names the output, ``target`` where
    it writes (a path, ``-`` for stdout), ``error`` what went wrong, ``lost``
    how many events it has not written so far (never silently: each is
    counted).  ``closed``: the reader went away (a closed pipe), the output
    ends and scoring goes on.
    """

    type: ClassVar[str] = "output"
    output: str = ""
    target: str = ""
    state: OutputState = "failed"
    error: str = ""
    lost: int = 0


def state_after(ev: Event) -> StreamState | None:
    """The state a stream is in after ``ev``, or None when the event does not change it.

    The one place that folds lifecycle events into a state, for every output.
    """
    if isinstance(ev, StreamStarted):
        return "live"
    if isinstance(ev, StreamEnded):
        if ev.reason in ("stopped", "error"):
            return "stopped" if ev.reason == "stopped" else "error"
        return "ended"  # eof, inactive, bye, closed, disconnected
    if isinstance(ev, StreamError):
        return "error"
    return None


@dataclass
class MonitorGap(Event):
    """A feed relay (``scoreq-live feed --subscribe``) did not get some of a monitor's events.

    Counted exactly from the monitors' sequence numbers: ``missing`` events of
    ``monitor`` in this gap, ``missing_total`` for it so far.  ``dropped_total``
    is how many of its events the monitor itself reports having dropped while
    its broker was unreachable (the rest were lost in the broker or while the
    relay was reconnecting).  Monitor-wide: ``stream`` is ``""``.
    """

    type: ClassVar[str] = "gap"
    monitor: str = ""
    missing: int = 0
    missing_total: int = 0
    dropped_total: int = 0


@dataclass
class StreamRecord(Event):
    """What one stream was, from start to end: sent once when it ends (:mod:`scoreq_live.calls.record`).

    ``id`` is the stream's run (its ``stream_started.id``), ``call`` the id of the call record it
    belongs to, ``call_key`` the key the input gave (see ``stream_started.call``).  ``score`` (None when
    no window was scored) summarises the primary score of its scored windows as the ``score`` events
    carry them: ``name`` (mos or distance), ``mean``, ``p10``, ``p90``, ``min``, ``max`` and ``worst``,
    the worst span of :data:`~scoreq_live.calls.record.WORST_SPAN_S` (``t_start``, ``t_end``, ``mean``;
    worst is lowest for mos, highest for distance).  ``bands``: the share of scored windows in each band.
    ``skipped``: unscored windows by reason.  ``net``: the input's whole-stream network numbers
    (``stream_ended.net``), None for audio inputs.  ``alerts``: each alert raised on it, with
    ``t_raised``/``t_cleared`` (stream time) and ``duration_s``; ``alert_s`` their total.
    ``monitor``: set by a feed relay to the monitor it came from.  ``scores``: every named score beyond
    the primary one (the first model's others, and every additional model's: ``dnsmos.bak``), each
    summarised over the windows that gave it (``mean``, ``p10``, ``p90``, ``min``, ``max``, ``windows``);
    ``models``: the additional models as ``stream_started.models`` lists them.  Both None when there are none.
    """

    type: ClassVar[str] = "stream_record"
    id: str = ""
    call: str = ""
    call_key: str = ""
    monitor: str = ""
    source: str = ""
    detail: str = ""
    meta: dict[str, str] | None = None
    started: float = 0.0  # Unix time
    ended: float = 0.0
    duration_s: float = 0.0  # stream time (audio seconds)
    reason: str = "eof"
    model: str = ""
    mode: Mode = "nr"
    window_s: float = 0.0
    hop_s: float = 0.0
    windows: int = 0
    scored: int = 0
    skipped: dict[str, int] | None = None
    score: dict[str, Any] | None = None
    bands: dict[str, float] | None = None
    net: dict[str, Any] | None = None
    alerts: list[dict[str, Any]] | None = None
    alert_s: float = 0.0
    scores: dict[str, dict[str, Any]] | None = None
    models: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for key in ("scores", "models"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class CallRecord(Event):
    """A call: the streams that share a call key, joined; sent when its last live stream has ended.

    Sent again, with the same ``id``, if another stream of the call starts soon after (a late direction):
    a store keeps the latest.  ``stream`` is ``""`` (a call is not one stream); ``streams`` lists its
    streams (``id``, ``stream``, ``source``, ``detail``, ``mean``, ``min``, ``loss_pct``).  ``mean``/``min``
    over every scored window of the call, ``worst_mean`` the worst stream's mean (lowest MOS, highest
    distance): the number to sort bad calls by.  ``loss_pct``: the worst stream's.  ``who``: the
    parties when the inputs know them (From/To, participants), else "".
    """

    type: ClassVar[str] = "call_record"
    id: str = ""
    key: str = ""
    monitor: str = ""
    who: str = ""
    started: float = 0.0
    ended: float = 0.0
    duration_s: float = 0.0
    mode: Mode = "nr"
    model: str = ""
    streams: list[dict[str, Any]] | None = None
    mean: float | None = None
    min: float | None = None
    worst_mean: float | None = None
    loss_pct: float | None = None
    alerts: int = 0
    alert_s: float = 0.0


def _event_types() -> dict[str, type[Event]]:
    """Every concrete event class by its ``type``, found by walking the subclasses (new types join by themselves)."""
    found: dict[str, type[Event]] = {}
    todo: list[type[Event]] = [Event]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.type not in ("event", "alert_change"):
            found[cls.type] = cls
    return found


def event_from_dict(d: dict[str, Any]) -> Event:
    """The event that :meth:`Event.to_dict` turned into ``d``: the inverse, for every event type.

    What a feed relay uses to turn another monitor's JSON back into events.  Keys
    the event does not have are ignored (a newer minor schema may add some);
    an unknown ``type`` or a missing ``stream``/``ts`` raises ValueError.
    """
    kind = d.get("type")
    cls = _event_types().get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}")
    if not isinstance(d.get("stream"), str) or not isinstance(d.get("ts"), (int, float)):
        raise ValueError(f"a {kind} event needs 'stream' (text) and 'ts' (a number)")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    named_keys: tuple[str, ...] = {ScoreEvent: ("scores",), ModelScore: ("scores", "smoothed")}.get(cls, ())
    for key in named_keys:
        if key in kwargs and kwargs[key] is not None and not (
                isinstance(kwargs[key], dict)
                and all(isinstance(k, str) and (v is None or isinstance(v, (int, float)))
                        for k, v in kwargs[key].items())):
            del kwargs[key]  # not named numbers: dropped, as an unknown key would be
    if cls is ScoreEvent and isinstance(kwargs.get("net"), dict):
        kwargs["net"] = NetQuality(**{k: v for k, v in kwargs["net"].items()
                                      if k in {f.name for f in fields(NetQuality)}})
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"a {kind} event without its fields: {e}") from None
