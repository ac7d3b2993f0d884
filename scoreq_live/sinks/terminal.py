"""A live terminal panel (rich): one row per stream.

:class:`PanelState` folds events into a view model and :func:`render` turns
it into a rich table, so the panel can be rendered to text in tests with
``Console(record=True)``; :class:`TerminalSink` only refreshes it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from scoreq_live.bus import Subscription
from scoreq_live.core.events import (
    AlertEvent,
    BackendStatus,
    ClearedEvent,
    Event,
    InputDropped,
    Mode,
    ModelScore,
    OutputStatus,
    ScoreEvent,
    StreamError,
    StreamStarted,
    state_after,
)
from scoreq_live.sinks.bands import Bands
from scoreq_live.sinks.base import Sink

SPARK = "▁▂▃▄▅▆▇█"
HISTORY_S = 60.0
THINNED_S = 5.0  # a stream shows as thinned this long after its last window skipped as overloaded


@dataclass
class StreamRow:
    name: str
    state: str = "starting"
    source: str = ""
    mode: Mode = "nr"
    model: str = ""
    value: float | None = None
    smoothed: float | None = None
    speech: float = 0.0
    level_dbfs: float = -120.0
    reason: str | None = None
    t: float = 0.0
    error: str = ""
    dropped_s: float = 0.0  # input lost before the monitor got it
    ended_ts: float | None = None  # wall time it ended, for forgetting it later
    loss_pct: float | None = None  # packet streams: the last window's loss and jitter
    jitter_ms: float | None = None
    thinned_ts: float | None = None  # wall time of the latest window skipped because scoring was behind
    extra: dict[str, float] = field(default_factory=dict)  # the model's other named scores, latest window
    history: deque[tuple[float, float | None]] = field(default_factory=deque)  # (t_end, value or None)


class PanelState:
    """The panel's view model, updated by events.

    An ended stream's row stays ``forget_s`` seconds (wall time), and at most
    ``max_ended`` ended rows stay, so streams that come and go (calls on an
    RTP port) neither grow memory nor push the live ones off the screen.
    """

    def __init__(self, forget_s: float = 60.0, max_ended: int = 8) -> None:
        self.forget_s = forget_s
        self.max_ended = max_ended
        self.rows: dict[str, StreamRow] = {}
        self.alerts: dict[str, AlertEvent] = {}  # id -> the alert, while raised
        self.backend: BackendStatus | None = None  # the scoring backend's latest state (--backend)
        self.outputs: dict[str, OutputStatus] = {}  # outputs that failed or closed, by name (until they recover)

    def row(self, name: str) -> StreamRow:
        if name not in self.rows:
            self.rows[name] = StreamRow(name)
        return self.rows[name]

    def update(self, ev: Event) -> None:
        if isinstance(ev, AlertEvent):
            self.alerts[ev.id] = ev
            return
        if isinstance(ev, ClearedEvent):
            self.alerts.pop(ev.id, None)
            return
        if isinstance(ev, BackendStatus):  # monitor-wide: a line of its own, not a stream's row
            self.backend = ev
            return
        if isinstance(ev, OutputStatus):
            if ev.state == "recovered":
                self.outputs.pop(ev.output, None)
            else:
                self.outputs[ev.output] = ev
            return
        if not ev.stream:
            return  # another monitor-wide event: no stream's row
        if isinstance(ev, StreamStarted):
            self.rows.pop(ev.stream, None)  # a stream that starts again starts clean
        r = self.row(ev.stream)
        state = state_after(ev)
        if state is not None:
            r.state = state
            r.ended_ts = None if state == "live" else ev.ts
            if r.ended_ts is not None:
                self._forget(ev.ts)  # the bound holds at every end, not only at the next start
        if isinstance(ev, StreamStarted):
            r.source, r.mode, r.model = ev.source, ev.mode, ev.model
            self._forget(ev.ts)
        elif isinstance(ev, ScoreEvent):
            r.mode, r.model = ev.mode, ev.model
            if ev.reason == "overloaded":
                r.thinned_ts = ev.ts  # thinned, not quiet: the latest score still stands
            else:
                r.value, r.reason = ev.value, ev.reason
            if ev.scores is not None:
                r.extra.update({k: v for k, v in ev.scores.items() if k not in ("mos", "distance") and v is not None})
            r.smoothed = ev.smoothed
            r.speech, r.level_dbfs, r.t = ev.speech, ev.level_dbfs, ev.t_end
            if ev.net is not None:
                r.loss_pct, r.jitter_ms = ev.net.loss_pct, ev.net.jitter_ms
            r.history.append((ev.t_end, ev.value))
            while r.history and r.history[0][0] < ev.t_end - HISTORY_S:
                r.history.popleft()
        elif isinstance(ev, ModelScore):
            if ev.scores is not None:  # an additional model's latest scored window
                r.extra.update({k: v for k, v in ev.scores.items() if v is not None})
        elif isinstance(ev, StreamError):
            r.error = ev.error
        elif isinstance(ev, InputDropped):
            r.dropped_s = ev.total_s

    def _forget(self, now: float) -> None:
        ended = sorted((r.ended_ts, name) for name, r in self.rows.items() if r.ended_ts is not None)
        excess = len(ended) - self.max_ended
        for i, (at, name) in enumerate(ended):
            if i < excess or now - at > self.forget_s:
                del self.rows[name]


def sparkline(history: Iterable[tuple[float, float | None]], lo: float, hi: float, width: int,
              span: float = HISTORY_S) -> str:
    """Unicode sparkline of ``(t, value)`` points over the last ``span`` seconds.

    Time is split into ``width`` buckets ending at the newest point; a bucket
    shows the mean of its values, or a space where no window was scored (a gap
    in speech stays visible as a gap).
    """
    pts = list(history)
    if not pts:
        return " " * width
    t_end = pts[-1][0]
    step = span / width
    sums = [0.0] * width
    counts = [0] * width
    for t, v in pts:
        if v is None or not math.isfinite(v):
            continue
        k = width - 1 - int((t_end - t) / step)
        if 0 <= k < width:
            sums[k] += v
            counts[k] += 1
    out = []
    for s_, n in zip(sums, counts):
        if n == 0:
            out.append(" ")
            continue
        v = s_ / n
        f = (min(max(v, lo), hi) - lo) / (hi - lo) if hi > lo else 0.5
        out.append(SPARK[min(len(SPARK) - 1, int(f * len(SPARK)))])
    return "".join(out)


_STYLES = {"good": "green", "fair": "yellow", "poor": "red"}


def _band_style(bands: Bands, v: float | None) -> str:
    if v is None:
        return "dim"
    band = bands.band(v)
    return "cyan" if band is None else _STYLES[band]  # cyan: a distance with no --bands scale


def _fmt(v: float | None, mode: Mode) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if mode == "nr" else f"{v:.3f}"


def render(state: PanelState, width: int = 80, bands: Bands | None = None, now: float | None = None) -> Table:
    """The table of streams; ``bands`` colours the scores (default: the mode's, as ``--bands`` gives them).

    ``now`` (Unix time; default: the clock) says which streams are being thinned (scored at a longer
    hop because scoring cannot keep up): those with a window skipped as overloaded in the last
    :data:`THINNED_S` seconds.
    """
    if now is None:
        now = time.time()
    table = Table(expand=False, pad_edge=False, box=None, header_style="bold")
    # Packet streams: loss and jitter take the model's column (one model for all streams; the title names it),
    # and the stream column widens for NAME-<ssrc>.
    net = any(r.loss_pct is not None for r in state.rows.values())
    # A model with named scores beyond the primary one (score events' ``scores``): one compact column.
    extra = any(r.extra for r in state.rows.values())
    extra_w = max(12, min(28, width - 69 - 8)) if extra else 0
    spark_w = max(8, min(30, width - 69 - (2 if net else 0) - (extra_w + 1 if extra else 0)))
    table.add_column("stream", max_width=14 if net else 12, no_wrap=True, overflow="ellipsis")
    table.add_column("now", justify="right", width=5)
    table.add_column("avg", justify="right", width=5)
    table.add_column(f"last {int(HISTORY_S)}s", width=spark_w, no_wrap=True)
    table.add_column("speech", justify="right", width=6)
    table.add_column("level", justify="right", width=7)
    table.add_column("state", width=9, no_wrap=True, overflow="ellipsis")
    if net:
        table.add_column("loss  jitter", width=12, no_wrap=True)
    else:
        table.add_column("model", max_width=10, no_wrap=True, overflow="ellipsis")
    if extra:
        table.add_column("scores", max_width=extra_w, no_wrap=True, overflow="ellipsis")
    for r in state.rows.values():
        rb = bands if bands is not None and bands.lower_is_better == (r.mode != "nr") else Bands.for_mode(r.mode)
        if r.mode == "nr":
            lo, hi = 1.0, 5.0
        else:
            vals = [v for _, v in r.history if v is not None]
            lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        spark = sparkline(r.history, lo, hi, spark_w)
        score = Text(_fmt(r.value, r.mode), style=_band_style(rb, r.value))
        if r.state == "live" and r.thinned_ts is not None and now - r.thinned_ts <= THINNED_S:
            state_txt = Text("thinned", style="yellow")  # scored, but not every window: scoring is behind
        elif r.state == "live" and r.value is None and r.reason:
            # Say why there is no score now: a quiet call leg is not a bad one.
            state_txt = Text(r.reason.replace("_", " "), style="yellow")
        else:
            state_txt = Text(r.state, style={"live": "green", "error": "bold red"}.get(r.state, "dim"))
        last: str = r.model
        if net:
            last = "" if r.loss_pct is None or r.jitter_ms is None else f"{r.loss_pct:4.1f}% {r.jitter_ms:4.0f}ms"
        cells: list[RenderableType] = [
            r.name, score,
            Text(_fmt(r.smoothed, r.mode), style=_band_style(rb, r.smoothed) + " bold"),
            Text(spark, style=_band_style(rb, r.smoothed)),
            f"{r.speech * 100:.0f}%", f"{r.level_dbfs:.0f}dB", state_txt, last,
        ]
        if extra:
            cells.append(" ".join(f"{k.rsplit('.', 1)[-1]} {v:.2f}" for k, v in r.extra.items()))
        table.add_row(*cells)
    return table


def render_backend(state: PanelState, now: float | None = None) -> Text | None:
    """One line for the scoring backend (``--backend``): where it is and its state, or None without one."""
    b = state.backend
    if b is None:
        return None
    if b.state == "up":
        return Text(f"backend {b.backend}: up", style="green")
    for_s = max(0.0, (time.time() if now is None else now) - b.since)
    what = "scoring locally meanwhile" if b.state == "fallback" else "windows skipped (backend_unavailable)"
    line = Text(f"backend {b.backend}: DOWN for {for_s:.0f}s, {what}, retrying", style="bold red")
    if b.error:
        line.append(f" — {b.error}", style="red")
    return line


def render_outputs(state: PanelState) -> list[Text]:
    """A line for each output that cannot write (or whose reader went away)."""
    lines = []
    for o in state.outputs.values():
        what = "closed by its reader, no more events written" if o.state == "closed" else "CANNOT WRITE"
        lines.append(Text(f"{o.output} {o.target}: {what} — {o.error}", style="bold red"))
    return lines


def render_alerts(state: PanelState) -> Text | None:
    """One line under the table with every raised alert, or None when there is none."""
    if not state.alerts:
        return None
    line = Text("⚠ alerts: ", style="bold red")
    for i, a in enumerate(state.alerts.values()):
        if i:
            line.append(" · ", style="dim")
        value = "–" if a.value is None else f"{a.value:.3g}"
        line.append(f"{a.stream} {a.rule} (at {value})", style="red")
    return line


class TerminalSink(Sink):
    """Redraws the panel a few times a second from the event stream.

    ``bands``: the colour bands (``--bands``); None: the mode's defaults.
    """

    def __init__(self, console: Console | None = None, title: str = "", refresh_per_second: float = 4.0,
                 bands: Bands | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.state = PanelState()
        self.title = title
        self.refresh = refresh_per_second
        self.bands = bands

    def renderable(self) -> RenderableType:
        head = Text(self.title, style="bold") if self.title else Text("")
        errors = [Text(f"{r.name}: {r.error}", style="red") for r in self.state.rows.values() if r.error]
        errors += [Text(f"{r.name}: {r.dropped_s:.2f}s of input dropped (the monitor fell behind the sound card)",
                        style="yellow") for r in self.state.rows.values() if r.dropped_s]
        alerts = render_alerts(self.state)
        backend = render_backend(self.state)
        return Group(head, *([backend] if backend else []), *render_outputs(self.state),
                     render(self.state, self.console.width, self.bands), *([alerts] if alerts else []), *errors)

    async def run(self, events: Subscription) -> None:
        with Live(self.renderable(), console=self.console, refresh_per_second=self.refresh,
                  transient=False, redirect_stderr=False) as live:
            async for ev in events:
                self.state.update(ev)
                # Coalesce bursts: apply everything already queued before redrawing.
                while (more := events.get_nowait()) is not None:
                    self.state.update(more)
                live.update(self.renderable())
