"""Alert rules: ``mos<3.0 for 10s`` raises an ``alert`` event, recovery a ``cleared`` one.

Pure logic: :class:`AlertEvaluator` reads the ordinary events and returns the
alert events they cause; stream time comes from the events themselves.

Semantics, per stream and rule, on score events (time = the window's ``t_end``):

* The rule *holds* on a window when ``value OP threshold``.  It raises when it
  has held from a first window to the current one over at least ``for_s``
  seconds of stream time, and holds on the current window.
* Hysteresis: a margin beyond the threshold (``hysteresis`` in the rule, else
  a per-metric default) forms a dead band.  While waiting to raise, only a
  window *clearly* past the threshold (beyond the margin) resets the wait; a
  window in the dead band neither starts nor resets it.  Once raised, the
  alert clears only after the value has been clearly past the threshold for
  ``for_s`` seconds again, and a window that holds the condition restarts that
  wait.  A score hovering at the threshold therefore never flaps.
* Unscored windows (silence: the metric is ``null``) are no evidence either
  way: they neither start, reset, raise nor clear.
* When a stream ends (or fails), its active alerts are cleared with
  ``reason: "stream_ended"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from scoreq_live.core.events import (
    AlertChange,
    AlertEvent,
    ClearedEvent,
    Event,
    Mode,
    ModelScore,
    ScoreEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from scoreq_live.errors import ScoreqLiveError

# Metric names a rule may use, and the ScoreEvent attribute each reads.
METRICS = {
    "mos": "mos",
    "distance": "distance",
    "smoothed": "smoothed",
    "speech": "speech",
    "level_dbfs": "level_dbfs",
    "level": "level_dbfs",
    "latency_ms": "latency_ms",
    "latency": "latency_ms",
    # Packet streams only (score events' ``net``): loss in percent, jitter in milliseconds.
    "loss": "loss_pct",
    "loss_pct": "loss_pct",
    "jitter": "jitter_ms",
    "jitter_ms": "jitter_ms",
}
NET_METRICS = frozenset({"loss_pct", "jitter_ms"})
# A model's other named scores (``scores`` of score and model_score events) are named MODEL.SCORE, e.g.
# ``dnsmos.bak``, or MODEL for a model's one score named after it (``plcmos``: see parse_rule's ``models``).
NAMED_SCORE = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+$")
# Default dead band, in the metric's unit: a tenth of a MOS point, 3 dB, 5 % speech, half a point of loss.
_ABS_MARGIN = {"mos": 0.1, "speech": 0.05, "level_dbfs": 3.0, "loss_pct": 0.5}
# Metrics without a natural absolute scale get a margin relative to the threshold.
_REL_MARGIN = 0.05

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RULE = re.compile(
    rf"^\s*(?P<metric>[a-z_][a-z0-9_.]*)\s*(?P<op>[<>])\s*(?P<threshold>{_NUM})"
    rf"(?:\s+for\s+(?P<for>{_NUM})\s*(?P<unit>ms|s|sec|m|min)?)?"
    rf"(?:\s+hysteresis\s+(?P<hyst>{_NUM}))?\s*$",
    re.IGNORECASE,
)
_UNIT_S = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0}
_EPS = 1e-6  # stream times are sums of hops: tolerate float rounding at the boundary


class RuleError(ScoreqLiveError):
    """A rule that cannot be parsed; the message says what is wrong."""


@dataclass(frozen=True)
class AlertRule:
    """One parsed rule.  ``text`` is its canonical form, used in events and ids."""

    metric: str
    op: str
    threshold: float
    for_s: float = 0.0
    hysteresis: float | None = None

    @property
    def text(self) -> str:
        s = f"{self.metric}{self.op}{self.threshold!r}"
        if self.for_s:
            s += f" for {self.for_s:g}s"
        if self.hysteresis is not None:
            s += f" hysteresis {self.hysteresis:g}"
        return s

    def margin(self, mode: Mode) -> float:
        """The dead band beyond the threshold (see the module docstring)."""
        if self.hysteresis is not None:
            return self.hysteresis
        metric = self.metric
        if metric == "smoothed":
            metric = "mos" if mode == "nr" else "distance"
        if metric in _ABS_MARGIN:
            return _ABS_MARGIN[metric]
        return abs(self.threshold) * _REL_MARGIN

    def value(self, ev: ScoreEvent | ModelScore) -> float | None:
        if isinstance(ev, ModelScore):  # an additional model's window: evidence for its named scores only
            v = ev.score(self.metric)
        elif self.metric in NET_METRICS:  # no net (not a packet stream): no evidence either way
            v = None if ev.net is None else getattr(ev.net, self.metric)
        elif self.metric not in METRICS:  # a named score (parse_rule let only those through)
            v = ev.score(self.metric)
        else:
            v = getattr(ev, METRICS[self.metric])
        return None if v is None or not math.isfinite(v) else float(v)

    def holds(self, v: float) -> bool:
        return v < self.threshold if self.op == "<" else v > self.threshold

    def clearly_not(self, v: float, margin: float) -> bool:
        """Past the threshold by at least the margin, on the good side."""
        return v >= self.threshold + margin if self.op == "<" else v <= self.threshold - margin


def parse_rule(text: str, models: Collection[str] = ()) -> AlertRule:
    """Parse ``METRIC OP THRESHOLD [for DURATION] [hysteresis MARGIN]``.

    ``METRIC``: mos, distance, smoothed, speech (0-1), level_dbfs (or level),
    latency_ms (or latency), loss_pct (or loss), jitter_ms (or jitter), or a
    model's named score ``MODEL.SCORE`` (score events' ``scores``; checked
    against the model by :func:`check_rule_mode`), or ``MODEL`` alone for one
    of ``models`` (the additional models asked for: a model's one score named
    after it).  ``OP``: ``<`` or ``>``.
    ``DURATION``: seconds, with an optional unit ``ms``, ``s``, ``m``/``min``.
    """
    m = _RULE.match(text)
    if not m:
        raise RuleError(f"cannot read alert rule {text!r}: expected e.g. 'mos<3.0 for 10s' or "
                        "'distance>0.6 for 5s' (METRIC OP NUMBER [for DURATION] [hysteresis MARGIN])")
    name = m["metric"].lower()
    if name not in METRICS and not NAMED_SCORE.match(name) and name not in models:
        raise RuleError(f"alert rule {text!r}: unknown metric {name!r}; one of "
                        + ", ".join(sorted(set(METRICS))) + ", or a model's named score (MODEL.SCORE)")
    metric = METRICS.get(name, name)
    for_s = float(m["for"]) * _UNIT_S[(m["unit"] or "s").lower()] if m["for"] else 0.0
    hyst = float(m["hyst"]) if m["hyst"] else None
    threshold = float(m["threshold"])
    if not math.isfinite(threshold) or for_s < 0 or not math.isfinite(for_s) or (hyst is not None and hyst < 0):
        raise RuleError(f"alert rule {text!r}: threshold must be finite, duration and hysteresis >= 0")
    return AlertRule(metric=metric, op=m["op"], threshold=threshold, for_s=for_s, hysteresis=hyst)


def check_rule_mode(rule: AlertRule, mode: Mode, names: tuple[str, ...] | None = None) -> None:
    """Refuse rules on a score the model does not produce.

    ``mos`` in ref mode, ``distance`` in nr; with ``names`` (the model's named
    scores), a named score the model does not give.
    """
    if names is not None and rule.metric not in METRICS.values() and rule.metric not in names:
        raise RuleError(f"alert rule {rule.text!r}: no model gives a score {rule.metric!r} (their scores: "
                        + ", ".join(names) + ")")
    if rule.metric == "mos" and mode != "nr":
        raise RuleError(f"alert rule {rule.text!r}: mode {mode} gives distances, not a MOS; use 'distance' "
                        "or 'smoothed'")
    if rule.metric == "distance" and mode != "ref":
        raise RuleError(f"alert rule {rule.text!r}: mode {mode} gives a MOS, not a distance; use 'mos' "
                        "or 'smoothed'")


@dataclass
class _State:
    active: bool = False
    run_start: float | None = None  # stream time the current wait (to raise or to clear) began
    last_value: float | None = None
    last_t: float = 0.0


class AlertEvaluator:
    """Turns the event stream into ``alert`` / ``cleared`` events.

    Call :meth:`feed` with every event in order; it returns the alert events
    that event causes, to be published right after it.
    """

    def __init__(self, rules: list[AlertRule]) -> None:
        self.rules = list(rules)
        self._state: dict[tuple[str, int], _State] = {}

    def active(self) -> list[tuple[str, AlertRule]]:
        """(stream, rule) of every alert now raised."""
        return [(s, self.rules[i]) for (s, i), st in self._state.items() if st.active]

    def feed(self, ev: Event) -> list[AlertChange]:
        if isinstance(ev, (ScoreEvent, ModelScore)):
            return self._score(ev)
        if isinstance(ev, (StreamEnded, StreamError)):
            return self._end(ev)
        if isinstance(ev, StreamStarted):
            for key in [k for k in self._state if k[0] == ev.stream]:
                del self._state[key]  # a stream that starts again starts clean
        return []

    @staticmethod
    def _fields(ev: Event, rule: AlertRule, value: float | None, t: float) -> dict[str, Any]:
        return {"stream": ev.stream, "ts": ev.ts, "rule": rule.text, "metric": rule.metric, "op": rule.op,
                "threshold": rule.threshold, "for_s": rule.for_s, "value": value, "t": t,
                "id": f"{ev.stream}:{rule.text}"}

    def _score(self, ev: ScoreEvent | ModelScore) -> list[AlertChange]:
        out: list[AlertChange] = []
        t = ev.t_end
        for i, rule in enumerate(self.rules):
            v = rule.value(ev)
            if v is None:
                continue  # unscored window: no evidence either way
            st = self._state.setdefault((ev.stream, i), _State())
            st.last_value, st.last_t = v, t
            margin = rule.margin(ev.mode if isinstance(ev, ScoreEvent) else "nr")
            holds, clear = rule.holds(v), rule.clearly_not(v, margin)
            if not st.active:
                if holds:
                    if st.run_start is None:
                        st.run_start = t
                    if t - st.run_start >= rule.for_s - _EPS:
                        st.active, st.run_start = True, None
                        out.append(AlertEvent(**self._fields(ev, rule, v, t)))
                elif clear:
                    st.run_start = None
                # else: in the dead band, the wait neither starts nor resets
            else:
                if clear:
                    if st.run_start is None:
                        st.run_start = t
                    if t - st.run_start >= rule.for_s - _EPS:
                        st.active, st.run_start = False, None
                        out.append(ClearedEvent(**self._fields(ev, rule, v, t), reason="recovered"))
                elif holds:
                    st.run_start = None
        return out

    def _end(self, ev: StreamEnded | StreamError) -> list[AlertChange]:
        out: list[AlertChange] = []
        for key in [k for k in self._state if k[0] == ev.stream]:
            st = self._state.pop(key)
            if st.active:
                t = ev.t if isinstance(ev, StreamEnded) else st.last_t
                out.append(ClearedEvent(**self._fields(ev, self.rules[key[1]], st.last_value, t),
                                        reason="stream_ended"))
        return out
