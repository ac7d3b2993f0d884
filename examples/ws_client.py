"""A minimal client of the scoreq-live feed: one line per event, reconnecting when the monitor restarts.

    python examples/ws_client.py                                  # ws://127.0.0.1:8765
    python examples/ws_client.py ws://127.0.0.1:8080/ws --streams alice,bob --token "$SCOREQ_LIVE_TOKEN"

Needs only the `websockets` package (installed with scoreq-live).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def show(msg: dict, live: bool) -> None:
    kind = msg["type"]
    tag = "" if live else "(history) "
    if kind == "hello":
        names = ", ".join(f"{s['stream']} [{s['state']}]" for s in msg["streams"]) or "none yet"
        print(f"connected to {msg['server']}: model {msg['model']}, mode {msg['mode']}; streams: {names}")
        for a in msg["alerts"]:
            print(f"  active alert: {a['stream']} {a['rule']} (since t={a['t']:.1f}s)")
    elif kind == "score":
        unit = "mos" if msg["mode"] == "nr" else "distance"
        value = msg[unit]
        shown = f"{value:.3f}" if value is not None else f"– ({msg['reason']})"
        smoothed = "–" if msg["smoothed"] is None else f"{msg['smoothed']:.3f}"
        print(f"{tag}{msg['stream']:>10}  t={msg['t_end']:7.2f}s  {unit} {shown}  smoothed {smoothed}  "
              f"speech {msg['speech']:.0%}")
    elif kind in ("alert", "cleared"):
        print(f"{tag}{msg['stream']:>10}  {kind.upper()} {msg['rule']}  value {msg['value']}  at t={msg['t']:.1f}s")
    elif kind == "dropped":
        print(f"... {msg['count']} events dropped: this client fell behind")
    elif kind == "history_end":
        print("--- live ---")
    else:  # stream_started, stream_ended, stream_error, error
        rest = {k: v for k, v in msg.items() if k not in ("v", "type", "stream", "ts")}
        print(f"{tag}{msg.get('stream', ''):>10}  {kind} {rest}")


async def follow(url: str, streams: str | None, token: str | None) -> None:
    query = {k: v for k, v in (("streams", streams), ("token", token)) if v}
    if query:
        url += ("&" if "?" in url else "?") + urlencode(query)
    async for ws in connect(url):  # reconnects with backoff when the connection drops
        try:
            live = False
            async for text in ws:
                msg = json.loads(text)
                show(msg, live)
                live = live or msg["type"] == "history_end"
        except ConnectionClosed as e:
            print(f"connection closed ({e.rcvd.code if e.rcvd else 'no close frame'}); reconnecting")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", default="ws://127.0.0.1:8765", help="the feed (--ws) or http server's /ws")
    ap.add_argument("--streams", help="comma-separated stream names (default: all)")
    ap.add_argument("--token", help="the monitor's --token, if it has one")
    a = ap.parse_args()
    try:
        asyncio.run(follow(a.url, a.streams, a.token))
    except InvalidStatus as e:
        body = e.response.body.decode(errors="replace").strip()
        raise SystemExit(f"refused: HTTP {e.response.status_code} {body}") from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
