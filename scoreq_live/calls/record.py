"""Streams and calls as records: the events of a stream folded into one summary when it ends.

:class:`Recorder` is a bus deriver (as the alert rules are): it reads every
event and, when a stream ends, returns a :class:`~scoreq_live.core.events.StreamRecord`
and, when the last live stream of its call has ended, a
:class:`~scoreq_live.core.events.CallRecord`.  No I/O: times are the events'
own ``ts`` (a call's id alone is made from the clock and random bytes); the
store (:mod:`scoreq_live.calls.store`) writes what it returns, the feed and
``--jsonl`` carry it like any event.

Summaries are computed from the values the ``score`` events carry (rounded
as they are published), so a record derived here and one derived from a
monitor's JSON lines agree exactly.

Calls: streams whose ``stream_started.call`` is the same key and that are
live together, or start within :data:`JOIN_S` of the call's last stream
ending, are one call.  A stream without a key is a call of its own.  A
stream that joins a call already recorded makes the call record be sent
again with the same ``id`` (a store keeps the latest).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoreq_live.core.events import (
    AlertEvent,
    CallRecord,
    ClearedEvent,
    Event,
    Mode,
    ModelScore,
    ScoreEvent,
    StreamEnded,
    StreamRecord,
    StreamStarted,
    new_id,
)
from scoreq_live.sinks.bands import Bands

WORST_SPAN_S = 10.0  # the worst stretch of a stream a record names, seconds of stream time
JOIN_S = 30.0  # a stream with a call's key that starts this soon after the call's last stream ended joins it
MAX_CLOSED = 10_000  # recently ended calls remembered for late streams (the oldest are forgotten first)


def _published(ev: ScoreEvent) -> float | None:
    """The primary score as the event serialises it (the JSON's ``mos``/``distance``)."""
    v = ev.value
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), 4 if ev.mode == "nr" else 5)


def worst_span(t_start: np.ndarray, t_end: np.ndarray, values: np.ndarray, lower_is_worse: bool,
               span_s: float = WORST_SPAN_S) -> dict[str, float] | None:
    """The ``span_s`` stretch whose windows' mean is worst: windows that start at or after one window's start
    and end within ``span_s`` of it (at least that window itself).  Its ``t_start``, ``t_end`` and ``mean``."""
    n = values.size
    if n == 0:
        return None
    order = np.argsort(t_start, kind="stable")
    ts, te, v = t_start[order], t_end[order], values[order]
    csum = np.concatenate([[0.0], np.cumsum(v)])
    best: tuple[float, int, int] | None = None
    k = 0
    for i in range(n):  # windows i..k-1 start at or after window i and end within span_s of its start
        k = max(k, i + 1)
        while k < n and te[k] <= ts[i] + span_s:
            k += 1
        mean = (csum[k] - csum[i]) / (k - i)
        key = mean if lower_is_worse else -mean
        if best is None or key < best[0] - 1e-12:
            best = (key, i, k)
    assert best is not None
    _, i, k = best
    return {"t_start": round(float(ts[i]), 3), "t_end": round(float(te[i:k].max()), 3),
            "mean": round(float((csum[k] - csum[i]) / (k - i)), 5)}


def summarise(values: list[float], t_start: list[float], t_end: list[float], mode: Mode) -> dict[str, Any] | None:
    """A stream's ``score`` summary (see :class:`~scoreq_live.core.events.StreamRecord`); None without scores."""
    if not values:
        return None
    v = np.asarray(values, np.float64)
    digits = 4 if mode == "nr" else 5
    lower_is_worse = mode == "nr"
    return {
        "name": "mos" if mode == "nr" else "distance",
        "mean": float(v.mean()),
        "p10": round(float(np.percentile(v, 10)), digits),
        "p90": round(float(np.percentile(v, 90)), digits),
        "min": float(v.min()),
        "max": float(v.max()),
        "worst": worst_span(np.asarray(t_start), np.asarray(t_end), v, lower_is_worse),
    }


def summarise_named(named: dict[str, list[float]]) -> dict[str, dict[str, Any]] | None:
    """Each named score's summary over the windows that gave it (``stream_record.scores``); None: none."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in named.items():
        if not values:
            continue
        v = np.asarray(values, np.float64)
        out[name] = {"mean": round(float(v.mean()), 5), "p10": round(float(np.percentile(v, 10)), 5),
                     "p90": round(float(np.percentile(v, 90)), 5), "min": float(v.min()), "max": float(v.max()),
                     "windows": int(v.size)}
    return out or None


def _named(scores: Mapping[str, float | None] | None, skip: tuple[str, ...] = ()) -> Iterable[tuple[str, float]]:
    """A window's named scores as its event serialises them (rounded to 5 digits), finite ones only."""
    for k, x in (scores or {}).items():
        if k not in skip and x is not None and math.isfinite(x):
            yield k, round(float(x), 5)


@dataclass
class _Live:
    """One live stream's tally."""

    started: StreamStarted
    call: _Call
    values: list[float] = field(default_factory=list)
    t_start: list[float] = field(default_factory=list)
    t_end: list[float] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    bands: Counter[str] = field(default_factory=Counter)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # by alert id, in the order raised
    named: dict[str, list[float]] = field(default_factory=dict)  # every named score beyond the primary one


@dataclass
class _Call:
    id: str
    key: str
    live: set[str] = field(default_factory=set)  # names of its live streams
    records: list[StreamRecord] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # every scored window of its ended streams
    ended_at: float = 0.0  # ts of its last stream's end, while no stream is live


class Recorder:
    """Events in, stream and call records out (see the module's docstring).

    ``bands``: the monitor's colour bands, by mode (a record counts the share of its windows in each);
    without them (or without limits, as distances by default) ``bands`` is left out.
    """

    def __init__(self, bands: dict[str, Bands] | None = None, *, join_s: float = JOIN_S) -> None:
        self.bands = bands or {}
        self.join_s = join_s
        self.live: dict[str, _Live] = {}  # by stream name
        self.calls: dict[str, _Call] = {}  # open calls (a live stream, or ended within join_s) by key
        self._closing: dict[str, float] = {}  # keys of calls with no live stream, by when (ts) they ended

    def feed(self, ev: Event) -> Iterable[Event]:
        if isinstance(ev, ScoreEvent):
            self._score(ev)
        elif isinstance(ev, ModelScore):
            live = self.live.get(ev.stream)
            if live is not None:
                for k, x in _named(ev.scores):
                    live.named.setdefault(k, []).append(x)
        elif isinstance(ev, StreamStarted):
            self._started(ev)
        elif isinstance(ev, AlertEvent):
            s = self.live.get(ev.stream)
            if s is not None:
                s.alerts[ev.id or f"{ev.rule}@{ev.t}"] = {"rule": ev.rule, "metric": ev.metric,
                                                          "t_raised": round(ev.t, 3), "t_cleared": None}
        elif isinstance(ev, ClearedEvent):
            s = self.live.get(ev.stream)
            a = s.alerts.get(ev.id) if s is not None else None
            if a is not None and a["t_cleared"] is None:
                a["t_cleared"] = round(ev.t, 3)
        elif isinstance(ev, StreamEnded):
            return self._ended(ev)
        return ()

    # -- streams ------------------------------------------------------------------------------------

    def _started(self, ev: StreamStarted) -> None:
        if ev.stream in self.live:  # started twice without an end (a relay that missed the end): a new run
            self.live.pop(ev.stream).call.live.discard(ev.stream)
        self._forget(ev.ts)
        key = ev.call
        call = self.calls.get(key) if key else None
        if call is None:
            call = _Call(new_id(), key)
            if key:
                self.calls[key] = call
        call.live.add(ev.stream)
        self._closing.pop(key, None)
        if not ev.id:
            ev.id = new_id()  # a stream_started of an older monitor (relayed): the record still needs one
        self.live[ev.stream] = _Live(ev, call)

    def _score(self, ev: ScoreEvent) -> None:
        s = self.live.get(ev.stream)
        if s is None:
            return
        v = _published(ev)
        if v is None:
            s.skipped[ev.reason or "error"] += 1
            return
        for k, x in _named(ev.scores, ("mos", "distance")):
            s.named.setdefault(k, []).append(x)
        s.values.append(v)
        s.t_start.append(ev.t_start)
        s.t_end.append(ev.t_end)
        bands = self.bands.get(ev.mode)
        band = bands.band(v) if bands is not None else None
        if band is not None:
            s.bands[band] += 1

    def _ended(self, ev: StreamEnded) -> list[Event]:
        s = self.live.pop(ev.stream, None)
        if s is None:
            return []
        st = s.started
        alerts = []
        for a in s.alerts.values():
            cleared = a["t_cleared"] if a["t_cleared"] is not None else round(ev.t, 3)
            alerts.append({**a, "duration_s": round(max(cleared - a["t_raised"], 0.0), 3)})
        net = ev.net
        record = StreamRecord(
            stream=ev.stream, ts=ev.ts, id=st.id, call=s.call.id, call_key=s.call.key or st.id, source=st.source,
            detail=st.detail, meta=st.meta, started=st.ts, ended=ev.ts, duration_s=round(ev.t, 3), reason=ev.reason,
            model=st.model, mode=st.mode, window_s=st.window_s, hop_s=st.hop_s, windows=ev.windows,
            scored=len(s.values), skipped=dict(s.skipped), score=summarise(s.values, s.t_start, s.t_end, st.mode),
            bands=({b: round(s.bands[b] / len(s.values), 4) for b in ("good", "fair", "poor")}
                   if s.values and st.mode in self.bands and self.bands[st.mode].good is not None else None),
            net=net, alerts=alerts, alert_s=round(sum(a["duration_s"] for a in alerts), 3),
            scores=summarise_named(s.named), models=st.models)
        call = s.call
        call.live.discard(ev.stream)
        call.records.append(record)
        call.values.extend(s.values)
        out: list[Event] = [record]
        if not call.live:
            call.ended_at = ev.ts
            if call.key:
                self._closing.pop(call.key, None)
                self._closing[call.key] = ev.ts
            out.append(self._call_record(call, ev.ts))
        return out

    # -- calls --------------------------------------------------------------------------------------

    def _call_record(self, call: _Call, ts: float) -> CallRecord:
        recs = call.records
        first = recs[0]
        lower_is_worse = first.mode == "nr"
        means = [r.score["mean"] for r in recs if r.score is not None]
        losses = [float(r.net["loss_pct"]) for r in recs if r.net is not None and "loss_pct" in r.net]
        v = call.values
        started = min(r.started for r in recs)
        ended = max(r.ended for r in recs)
        return CallRecord(
            stream="", ts=ts, id=call.id, key=call.key or first.id, who=_who(recs), started=started, ended=ended,
            duration_s=round(max(r.started + r.duration_s for r in recs) - started, 3), mode=first.mode,
            model=first.model,
            streams=[{"id": r.id, "stream": r.stream, "source": r.source, "detail": r.detail,
                      "mean": r.score["mean"] if r.score else None, "min": r.score["min"] if r.score else None,
                      "loss_pct": r.net.get("loss_pct") if r.net else None} for r in recs],
            mean=float(np.mean(v)) if v else None,
            min=(min(v) if lower_is_worse else max(v)) if v else None,
            worst_mean=(min(means) if lower_is_worse else max(means)) if means else None,
            loss_pct=max(losses) if losses else None,
            alerts=sum(len(r.alerts or ()) for r in recs), alert_s=round(sum(r.alert_s for r in recs), 3))

    def _forget(self, now: float) -> None:
        """Calls whose last stream ended more than ``join_s`` ago are closed for good (and the oldest beyond
        :data:`MAX_CLOSED`)."""
        while self._closing:
            key, ended_at = next(iter(self._closing.items()))
            if now - ended_at <= self.join_s and len(self._closing) <= MAX_CLOSED:
                break
            del self._closing[key]
            call = self.calls.get(key)
            if call is not None and not call.live:
                del self.calls[key]


def _who(records: list[StreamRecord]) -> str:
    """The parties, when the inputs name them (``from``/``to``, or ``name``s); else ""."""
    for r in records:
        meta = r.meta or {}
        if meta.get("from") or meta.get("to"):
            return f"{meta.get('from', '?')} → {meta.get('to', '?')}"
    names = [m["name"] for r in records if (m := r.meta or {}).get("name")]
    return " · ".join(dict.fromkeys(names))
