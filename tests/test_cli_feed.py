"""The feed options as a user runs them: a real process, the bundled model, real clients."""

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.helpers import EXAMPLES, ScoreqProcess


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


async def feed_snapshot(url):
    async with connect(url) as ws:
        msgs = []
        while not msgs or msgs[-1]["type"] != "history_end":
            msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return msgs


def test_demo_with_ws_and_http_keeps_serving_after_the_inputs_end_until_ctrl_c():
    mon = ScoreqProcess("demo", "--fast", "--no-tui", "--ws", "127.0.0.1:0", "--http", "127.0.0.1:0",
                  "--alert", "mos<3.5 for 3s", "--history-s", "600")
    try:
        ws_port = int(mon.wait_for(r"feed: ws://127\.0\.0\.1:(\d+)/")[1])
        http_port = int(mon.wait_for(r"panel: http://127\.0\.0\.1:(\d+)/")[1])
        mon.wait_for(r"stream clean: ended")
        mon.wait_for(r"stream lyra3: ended")
        time.sleep(0.5)
        assert mon.proc.poll() is None, "inputs ended but the feed stays up"
        for url in (f"ws://127.0.0.1:{http_port}/ws", f"ws://127.0.0.1:{ws_port}"):
            msgs = asyncio.run(feed_snapshot(url))
            hello = msgs[0]
            assert hello["mode"] == "nr" and hello["model"] == "distillmos"
            assert {s["stream"]: s["state"] for s in hello["streams"]} == {"clean": "ended", "lyra3": "ended"}
            types = [m["type"] for m in msgs]
            assert types.count("score") >= 40 and types.count("stream_ended") == 2
            assert [m["stream"] for m in msgs if m["type"] == "alert"] == ["lyra3"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        names = {s.name for fam in text_string_to_metric_families(body) for s in fam.samples}
        assert "scoreq_live_inference_seconds_count" in names and "scoreq_live_alerts_total" in names
        assert "scoreq_live_mos" not in names, "both streams ended: no per-stream series"
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10)
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert any("ALERT mos<3.5 for 3s" in line for line in mon.lines)
        # The example client prints the hello, the history and where live events begin.
        client = subprocess.Popen([sys.executable, str(EXAMPLES / "ws_client.py"), f"ws://127.0.0.1:{http_port}/ws",
                                   "--streams", "lyra3"], stdout=subprocess.PIPE, text=True)
        try:
            out = []
            while not out or out[-1] != "--- live ---\n":
                out.append(client.stdout.readline())
                assert out[-1], "".join(out)
        finally:
            client.kill()
            client.wait(10)
            client.stdout.close()
        text = "".join(out)
        assert text.startswith("connected to scoreq-live") and "lyra3 [ended]" in text
        assert "(history)      lyra3  ALERT mos<3.5 for 3s" in text and "clean " not in text.split("\n", 1)[1]
    finally:
        rc = mon.stop()
    assert rc == 0


def test_demo_without_feed_options_ends_with_its_inputs():
    out = run("demo", "--fast", "--no-tui", "--no-ws", "--duration", "3")
    assert out.returncode == 0, out.stderr
    assert "feed:" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--ws", "0.0.0.0:0"], "needs a token"),
    (["--http", "[::]:0", "--no-ws"], "needs a token"),
    (["--alert", "mos<<3"], "cannot read alert rule"),
    (["--alert", "distance>0.5 for 2s"], "not a distance"),
    (["--bands", "3,4"], "GOOD must be above FAIR"),
    (["--alert-webhook", "ftp://x"], "http:// or https://"),
    (["--ws", "127.0.0.1:nope"], "cannot read listen address"),
    (["--ws", "127.0.0.1:18765", "--http", "127.0.0.1:18765"], "both on port"),
])
def test_bad_feed_options_give_one_clear_error(args, message):
    out = run("demo", "--no-tui", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.count("error:") == 1


def test_a_busy_port_is_an_error_when_asked_for_and_a_notice_for_the_default():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("demo", "--no-tui", "--fast", "--ws", f"127.0.0.1:{port}")
        assert out.returncode == 2 and "cannot listen" in out.stderr, out.stderr
    # The default 127.0.0.1:8765 taken (by this test, or by another monitor): the monitor still runs.
    with socket.socket() as default:
        try:
            default.bind(("127.0.0.1", 8765))
            default.listen()
        except OSError:
            pass  # already busy elsewhere: the same case
        out = run("demo", "--no-tui", "--fast", "--duration", "2")
        assert out.returncode == 0 and "not serving websockets on 127.0.0.1:8765" in out.stderr, out.stderr
