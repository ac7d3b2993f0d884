"""Publishing to the monitor as a user runs it: ``scoreq-live monitor`` with no --input, real publishers.

A WHIP publisher (aiortc) and a voice platform's media-stream fork (Twilio's
message format, both tracks) publish to one monitor process on 127.0.0.1; its
JSON lines show what it made of them.  Also: ``--whip`` serves the
publishers' endpoints and nothing else, tokens apply, and bad options get one
clear error.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.helpers import MUSHRA, ScoreqProcess, joined
from tests.media_tools import mulaw_encode, send_paced, to_8k, twilio_call
from tests.whip_tools import publish

ROOT = Path(__file__).resolve().parents[1]


class Monitor(ScoreqProcess):
    """``scoreq-live monitor`` in the background, writing its events to a JSON lines file."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.jsonl = tmp_path / "events.jsonl"
        super().__init__("monitor", "--no-tui", "--no-ws", "--jsonl", self.jsonl, *args)

    def events(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    async def until(self, predicate, timeout: float, what: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events()
            if predicate(evs):
                return evs
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{what}: not within {timeout} s; events "
                                     f"{[(e['type'], e.get('stream'), e.get('reason')) for e in evs][-20:]}")
            await asyncio.sleep(0.2)


def _of(evs: list[dict], stream: str, kind: str) -> list[dict]:
    return [e for e in evs if e.get("stream") == stream and e["type"] == kind]


@pytest.fixture(scope="module")
def speech(data) -> np.ndarray:
    return joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:4])


async def test_a_webrtc_publisher_and_a_twilio_call_publish_to_one_monitor_with_a_token(tmp_path, speech):
    import soxr

    mon = Monitor(tmp_path, "--http", "127.0.0.1:0", "--ice-host", "127.0.0.1", "--token", "T0k",
                  "--rtp-timeout", "3")
    try:
        port = int(mon.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
        assert any("waiting for published streams" in line for line in mon.lines)
        base = f"http://127.0.0.1:{port}"
        inbound = mulaw_encode(to_8k(speech))
        outbound = mulaw_encode(to_8k(np.roll(speech, len(speech) // 2)))
        async with aiohttp.ClientSession() as http:
            with pytest.raises(AssertionError, match="401"):
                await publish(http, f"{base}/whip?stream=nope", soxr.resample(speech, 16000, 48000))
            pub = await publish(http, f"{base}/whip?stream=room", soxr.resample(speech, 16000, 48000), token="T0k")
            try:
                async with http.ws_connect(f"{base}/media") as ws:  # no token: refused before the upgrade
                    pass
            except aiohttp.WSServerHandshakeError as e:
                assert e.status == 401
            else:
                raise AssertionError("a media websocket without the token was accepted")
            async with http.ws_connect(f"{base}/media", headers={"Authorization": "Bearer T0k"}) as ws:
                await send_paced(ws, twilio_call({"inbound": inbound, "outbound": outbound}, call_sid="CAcli"),
                                 speed=4.0)
                await ws.receive(timeout=10)  # the monitor closes after stop
            evs = await mon.until(lambda e: _of(e, "CAcli-inbound", "stream_ended")
                                  and _of(e, "CAcli-outbound", "stream_ended") and _of(e, "room", "score"),
                                  60, "the call's end and a WebRTC score")
            async with http.delete(base + pub.location, headers={"Authorization": "Bearer T0k"}) as r:
                assert r.status == 200
            await pub.pc.close()
            evs = await mon.until(lambda e: _of(e, "room", "stream_ended"), 10, "the WebRTC stream's end")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics", headers={"Authorization": "Bearer T0k"}) as r:
                metrics = await r.text()
    finally:
        assert mon.stop() == 0, "".join(mon.lines)
    assert _of(evs, "room", "stream_started")[0]["source"] == "webrtc"
    assert _of(evs, "room", "stream_ended")[0]["reason"] == "closed"
    assert any(e["net"] and e["net"]["codec"] == "opus" for e in _of(evs, "room", "score"))
    for track in ("inbound", "outbound"):
        assert _of(evs, f"CAcli-{track}", "stream_started")[0]["source"] == "media"
        assert [e for e in _of(evs, f"CAcli-{track}", "score") if e["mos"] is not None]
        assert _of(evs, f"CAcli-{track}", "stream_ended")[0]["reason"] == "closed"
    assert not [e for e in evs if e["type"] == "stream_error"]
    assert 'scoreq_live_streams_started_total' in metrics


async def test_whip_alone_serves_the_publishers_endpoints_and_nothing_else(tmp_path, speech):
    import soxr

    mon = Monitor(tmp_path, "--whip", "127.0.0.1:0", "--ice-host", "127.0.0.1", "--model", "distillmos")
    try:
        port = int(mon.wait_for(r"publish: http://127\.0\.0\.1:(\d+)/whip")[1])
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/metrics", "/static/panel.js"):
                async with http.get(base + path) as r:
                    assert r.status == 404, path
            async with http.options(f"{base}/whip") as r:
                assert r.status == 204 and r.headers["Accept-Post"] == "application/sdp"
            pub = await publish(http, f"{base}/whip?stream=solo", soxr.resample(speech, 16000, 48000))
            await mon.until(lambda e: _of(e, "solo", "score"), 40, "a score")
            await pub.pc.close()  # no DELETE: the stream ends by itself (RTCP BYE or no media)
            evs = await mon.until(lambda e: _of(e, "solo", "stream_ended"), 15, "the stream's end")
    finally:
        assert mon.stop() == 0, "".join(mon.lines)
    assert _of(evs, "solo", "stream_ended")[0]["reason"] in ("bye", "inactive", "disconnected")


@pytest.mark.parametrize("args, message", [
    ((), "no --input given"),
    (("--http", "127.0.0.1:0", "--ice-host", "localhost"), "--ice-host 'localhost'"),
    (("--http", "127.0.0.1:9311", "--whip", "127.0.0.1:9311"), "--whip and --http both on port 9311"),
    (("--whip", "127.0.0.1:0", "--stun", "stun.example.net"), "expected stun:HOST"),
    (("--whip", "127.0.0.1:0", "--max-sessions", "0"), "--max-sessions must be at least 1"),
    (("--whip", "0.0.0.0:0"), "needs a token"),
])
def test_bad_publisher_options_give_one_clear_error(args, message):
    r = subprocess.run([sys.executable, "-m", "scoreq_live", "monitor", "--no-tui", "--no-ws", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "SCOREQ_LIVE_TOKEN"})
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
