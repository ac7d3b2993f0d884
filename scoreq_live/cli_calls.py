"""``scoreq-live calls``: the call records a monitor or relay kept (``--store``), listed or shown one by one.

    scoreq-live calls [--store PATH|URL] [--since 1d] [--below 3.0] [--stream NAME] [--limit N] [--json|--csv]
    scoreq-live calls show ID [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Any

from scoreq_live.calls.record import WORST_SPAN_S
from scoreq_live.calls.store import CallQuery, Store, StoreError, parse_age
from scoreq_live.errors import ScoreqLiveError

SPARKS = "▁▂▃▄▅▆▇█"
CSV_COLUMNS = ("id", "key", "started", "ended", "duration_s", "who", "streams", "mean", "min", "worst_mean",
               "loss_pct", "alerts", "alert_s", "mode", "model", "monitor")


def add_calls_parser(sub: Any) -> None:
    p = sub.add_parser("calls", help="list the calls a monitor recorded (--store), or show one with its timeline",
                       description="List the call records in a store, newest first, or show one: "
                                   "'scoreq-live calls show ID'.")
    p.add_argument("args", nargs="*", metavar="show ID", help="show one call: its streams and their timelines")
    p.add_argument("--store", metavar="PATH.db|postgresql://...",
                   help="the store a monitor wrote with --store (default: $SCOREQ_LIVE_STORE)")
    p.add_argument("--since", metavar="AGE", help="calls that started within AGE, e.g. 1d, 12h, 30m")
    p.add_argument("--below", type=float, metavar="X", help="calls whose worst stream's mean score is below X "
                                                           "(a bad MOS)")
    p.add_argument("--above", type=float, metavar="X", help="calls whose worst stream's mean is above X "
                                                           "(a bad distance, mode ref)")
    p.add_argument("--stream", metavar="NAME", help="calls with a stream of this name ('*' matches any text)")
    p.add_argument("--key", metavar="KEY", help="calls with this key (a Twilio callSid, a SIP Call-ID, ...)")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N calls (default 50)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON: the records as stored")
    out.add_argument("--csv", action="store_true", help="CSV: one row per call")


def _err(msg: str) -> int:
    print(f"scoreq-live: error: {msg}", file=sys.stderr)
    return 2


def cmd_calls(a: argparse.Namespace) -> int:
    from scoreq_live.cli import STORE_ENV

    target = a.store or os.environ.get(STORE_ENV)
    if not target:
        return _err(f"calls needs --store PATH.db (or postgresql://...), or ${STORE_ENV}")
    try:
        store = Store(target)
        if a.args:
            if a.args[0] != "show" or len(a.args) != 2:
                return _err("expected 'calls show ID', or no arguments to list calls")
            return _show(store, a.args[1], a.json)
        if a.limit < 1:
            return _err(f"--limit must be at least 1 (got {a.limit})")
        q = CallQuery(since=time.time() - parse_age(a.since) if a.since else None, below=a.below, above=a.above,
                      stream=a.stream, key=a.key, limit=a.limit)
        conn = store.connect()
        try:
            rows, total = conn.calls(q)
        finally:
            conn.close()
    except (StoreError, ScoreqLiveError) as e:
        return _err(str(e))
    if a.json:
        json.dump({"calls": rows, "total": total}, sys.stdout, indent=1)
        print()
    elif a.csv:
        w = csv.writer(sys.stdout)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([_iso(r[c]) if c in ("started", "ended") else
                        " ".join(s.get("stream", "") for s in r.get("streams") or ()) if c == "streams" else
                        _num(r.get(c)) for c in CSV_COLUMNS])
    else:
        _table(rows, total)
    return 0


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _num(x: Any) -> Any:
    if isinstance(x, float):
        return f"{x:.4f}".rstrip("0").rstrip(".") if math.isfinite(x) else ""
    return "" if x is None else x


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _who(r: dict[str, Any]) -> str:
    if r.get("who"):
        return str(r["who"])
    return ", ".join(s.get("stream", "") for s in r.get("streams") or ())


def _table(rows: list[dict[str, Any]], total: int) -> None:
    if not rows:
        print("no calls match" if total == 0 else f"no calls here ({total} match)")
        return
    head = ("ID", "STARTED", "DURATION", "MEAN", "WORST", "MIN", "LOSS%", "ALERTS", "WHO / STREAMS")
    lines = [head]
    for r in rows:
        lines.append((r["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])),
                      f"{r['duration_s']:.1f}s", _fmt(r.get("mean")), _fmt(r.get("worst_mean")), _fmt(r.get("min")),
                      _fmt(r.get("loss_pct"), 1), str(r.get("alerts", 0)), _who(r)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
    if total > len(rows):
        print(f"({len(rows)} of {total}; --limit for more)")


def sparkline(values: list[float | None], width: int = 60, lower_is_better: bool = False) -> str:
    """Values as block characters, ``width`` at most (means of equal runs), a space for unscored windows."""
    if not values:
        return ""
    n = len(values)
    step = max(1, math.ceil(n / width))
    cells: list[float | None] = []
    for i in range(0, n, step):
        part = [v for v in values[i:i + step] if v is not None]
        cells.append(sum(part) / len(part) if part else None)
    present = [c for c in cells if c is not None]
    if not present:
        return " " * len(cells)
    lo, hi = (1.0, 5.0) if not lower_is_better else (min(present), max(present))
    span = (hi - lo) or 1.0
    out = []
    for c in cells:
        if c is None:
            out.append(" ")
            continue
        x = (c - lo) / span
        if lower_is_better:
            x = 1.0 - x  # a taller bar is better either way
        out.append(SPARKS[min(max(int(x * len(SPARKS)), 0), len(SPARKS) - 1)])
    return "".join(out)


def _show(store: Store, call_id: str, as_json: bool) -> int:
    conn = store.connect()
    try:
        found = conn.call(call_id)
    finally:
        conn.close()
    if found is None:
        return _err(f"no call {call_id!r} in {store}")
    if as_json:
        json.dump(found, sys.stdout, indent=1)
        print()
        return 0
    c = found["call"]
    print(f"call {c['id']}  key {c['key']}" + (f"  monitor {c['monitor']}" if c.get("monitor") else ""))
    print(f"  {_iso(c['started'])} – {_iso(c['ended'])}  ({c['duration_s']:.1f}s)  {_who(c)}")
    print(f"  mean {_fmt(c.get('mean'))}  worst stream {_fmt(c.get('worst_mean'))}  min {_fmt(c.get('min'))}  "
          f"loss {_fmt(c.get('loss_pct'), 1)}%  alerts {c.get('alerts', 0)} ({c.get('alert_s', 0):.0f}s)  "
          f"model {c.get('model', '')}")
    for s in found["streams"]:
        sc = s.get("score") or {}
        print(f"\n  stream {s['stream']} ({s['source']}: {s['detail']})  ended: {s['reason']} after "
              f"{s['duration_s']:.1f}s  windows {s['scored']}/{s['windows']} scored"
              + (f"  skipped {', '.join(f'{k} {v}' for k, v in (s.get('skipped') or {}).items())}"
                 if s.get("skipped") else ""))
        if sc:
            w = sc.get("worst") or {}
            print(f"    {sc['name']}: mean {_fmt(sc['mean'])}  p10 {_fmt(sc['p10'])}  min {_fmt(sc['min'])}  "
                  f"max {_fmt(sc['max'])}  worst {WORST_SPAN_S:g}s {_fmt(w.get('mean'))} at {w.get('t_start', 0):.0f}–"
                  f"{w.get('t_end', 0):.0f}s")
        for name, x in (s.get("scores") or {}).items():  # every named score beyond the primary one
            print(f"    {name}: mean {_fmt(x.get('mean'))}  p10 {_fmt(x.get('p10'))}  min {_fmt(x.get('min'))}  "
                  f"max {_fmt(x.get('max'))}  ({x.get('windows', 0)} windows)")
        if s.get("bands"):
            print("    bands: " + "  ".join(f"{k} {100 * v:.0f}%" for k, v in s["bands"].items()))
        net = s.get("net")
        if net:
            print(f"    network: {net.get('codec', '')} loss {net['loss_pct']:.2f}% (max burst {net['max_burst']})  "
                  f"jitter {net['jitter_mean_ms']:.1f} ms (p95 {net['jitter_p95_ms']:.1f})  R {net['r_factor']:.0f}"
                  f"  MOS-CQ {net['mos_cq']:.2f}  concealed {100 * net['concealed']:.1f}%")
        for al in s.get("alerts") or ():
            end = "still raised at the end" if al.get("t_cleared") is None else f"cleared at {al['t_cleared']:.0f}s"
            print(f"    alert {al['rule']}: raised at {al['t_raised']:.0f}s, {end} ({al['duration_s']:.0f}s)")
        values = s.get("timeline", {}).get("value", [])
        if values:
            print("    " + sparkline(values, lower_is_better=s.get("mode") == "ref"))
    return 0

