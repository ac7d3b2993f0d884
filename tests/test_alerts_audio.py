"""Alerts on real speech with the real bundled model, delivered to a real local webhook."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.monitor import MonitorOptions, run_monitor
from scoreq_live.scoring.load import ScoringOptions, load_scorer
from scoreq_live.sinks.feed import FeedHub, FeedInfo, default_bands
from scoreq_live.sinks.jsonl import JsonlSink
from scoreq_live.sinks.server import FeedServer, Listen
from scoreq_live.sinks.webhook import WebhookSink
from tests.helpers import MUSHRA, joined

CLEAN = [MUSHRA / f"stim_0{i}" / "ref.wav" for i in (1, 2, 5, 6, 7, 8)]  # Distill-MOS 3.9-4.4
CODED = [MUSHRA / f"stim_0{i}" / "lyra_32.wav" for i in (2, 3, 4, 6, 8, 2, 3)]  # Lyra 3.2 kbps: 2.3-3.0


@pytest.fixture
def clean_coded_clean(tmp_path, data):
    """~20 s of clean speech, ~24 s of the same kind of speech through Lyra at 3.2 kbps, ~20 s clean again."""
    parts = [joined(CLEAN), joined(CODED), joined(CLEAN)]
    path = tmp_path / "call.wav"
    sf.write(path, np.concatenate(parts), 16000)
    coded_from = len(parts[0]) / 16000
    coded_to = coded_from + len(parts[1]) / 16000
    return path, coded_from, coded_to


class Webhook:
    """A local HTTP endpoint that fails its first request (503), then records every JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.requests = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                if hook.requests == 1:
                    self.send_response(503)
                else:
                    hook.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    w = Webhook()
    yield w
    w.close()


@pytest.mark.slow
async def test_alert_raised_and_cleared_when_speech_turns_heavily_coded_and_back(clean_coded_clean, webhook,
                                                                                  tmp_path):
    path, coded_from, coded_to = clean_coded_clean
    opts = MonitorOptions(inputs=[f"call={path}"], fast=True, scoring=ScoringOptions(device="cpu"),
                          alerts=["mos<3.0 for 5s"])
    loaded = load_scorer(opts.scoring)
    config = loaded.stream
    hub = FeedHub(FeedInfo(config.model, config.mode, config.window_s, config.hop_s, default_bands("nr")))
    hook = WebhookSink(webhook.url, backoff_s=0.05)
    sinks = [JsonlSink(tmp_path / "ev.jsonl"), FeedServer(hub, ws=Listen("127.0.0.1", 0)), hook]
    await run_monitor(opts, sinks, scoring=loaded)

    events = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    alerts = [e for e in events if e["type"] in ("alert", "cleared")]
    assert [(a["type"], a.get("reason")) for a in alerts] == [("alert", None), ("cleared", "recovered")]
    raised, cleared = alerts
    assert raised["rule"] == "mos<3.0 for 5s" and raised["id"] == "call:mos<3.0 for 5s" and raised["value"] < 3.0
    # Windows are 7.68 s long: raised once coded speech fills them for 5 s, cleared 5 s after clean speech does.
    assert coded_from + 5 <= raised["t"] <= coded_from + 7.68 + 8
    assert coded_to + 5 <= cleared["t"] <= coded_to + 7.68 + 8 and cleared["value"] >= 3.1
    # Each alert event comes right after the score event that caused it.
    i = events.index(raised)
    assert events[i - 1]["type"] == "score" and events[i - 1]["t_end"] == raised["t"]
    scores = [e for e in events if e["type"] == "score" and e["mos"] is not None]
    assert max(e["mos"] for e in scores if e["t_end"] < coded_from) > 4.0
    assert min(e["mos"] for e in scores if coded_from + 7.68 < e["t_end"] < coded_to) < 2.8

    # The webhook got both, in order, after a retry of the first; the feed kept them in its history.
    assert [b["type"] for b in webhook.bodies] == ["alert", "cleared"] and webhook.requests == 3
    assert webhook.bodies[0] == raised and hook.delivered == 2 and hook.failed == 0
    kinds = [json.loads(f)["type"] for _, f in hub.streams["call"].history()]
    assert kinds.count("alert") == 1 and kinds.count("cleared") == 1 and hub.alerts == {}
