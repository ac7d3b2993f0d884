"""Publishing from the browser panel, in a real headless Chromium, to a real monitor.

The monitor has no input of its own (``--http`` only): it scores what
publishers send it.  The page is opened as a person opens it (``?token=``),
"Publish my microphone" sends Chromium's fake microphone, which plays a real
speech recording in a loop, over WebRTC (WHIP) from 127.0.0.1; the stream
must come back on the same page through the ordinary feed, as a card marked
as this browser's, with a MOS; Stop must end it, and the monitor's JSONL
output must say that the publisher closed it.  "Publish a file" does the same
with a recording the page plays itself; a file that ends stops publishing by
itself.  A server that takes no publishers gets no publish controls.
Screenshots go to each test's ``tmp_path``.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import WEBRTC_LOOPBACK, chromium, fake_microphone, require_browser
from tests.helpers import EXAMPLES, MUSHRA, ScoreqProcess, speech_16k

TOKEN = "publish-test-token"
MOS = re.compile(r"^\d\.\d\d$")
# The browser's own messages about failed loads are not the page's errors; everything else is.
BROWSER_NOISE = re.compile(r"Failed to load resource")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PublishMonitor:
    """``python -m scoreq_live monitor`` with no input: the panel on ``--http``, WebRTC on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.jsonl = workdir / "events.jsonl"
        self.proc: ScoreqProcess | None = None

    def start(self) -> PublishMonitor:
        self.proc = ScoreqProcess(
            "monitor", "--http", f"127.0.0.1:{self.port}", "--no-ws", "--no-tui", "--ice-host", "127.0.0.1",
            "--rtp-timeout", "3", "--token", TOKEN, "--jsonl", self.jsonl, "--device", "cpu")
        self.proc.wait_http(f"{self.url}/")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=15)
        self.proc = None

    def output(self) -> str:
        return self.proc.output() if self.proc is not None else ""

    def events(self, stream: str) -> list[dict]:
        """The JSONL events of one stream so far (the file is written line by line)."""
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if ev.get("stream") == stream:
                out.append(ev)
        return out

    def ended(self, stream: str, timeout: float = 10.0) -> dict:
        """The stream's stream_ended event, waited for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(stream):
                if ev["type"] == "stream_ended":
                    return ev
            time.sleep(0.1)
        pytest.fail(f"no stream_ended for {stream!r} in the JSONL output within {timeout:.0f} s:\n{self.output()}")


@pytest.fixture(scope="module")
def monitor(tmp_path_factory) -> Iterator[PublishMonitor]:
    require_browser()  # before the model loads: a skip should cost nothing
    m = PublishMonitor(tmp_path_factory.mktemp("publish"))
    try:
        yield m.start()
    finally:
        m.stop()


def speech_wav(src: Path, dest: Path) -> Path:
    """A recording as a WAV Chromium's fake microphone plays: mono 16-bit PCM (Chromium loops it)."""
    import soundfile as sf

    sf.write(dest, speech_16k(src), 16000, subtype="PCM_16")
    return dest


def watch_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and not BROWSER_NOISE.search(m.text) and errors.append(m.text))
    return errors


def open_panel(ctx, monitor: PublishMonitor):
    from playwright.sync_api import expect

    page = ctx.new_page()
    errors = watch_errors(page)
    page.goto(f"{monitor.url}/?token={TOKEN}")
    expect(page.locator("#conn-label")).to_have_text("live", timeout=15_000)
    expect(page.locator("#publish")).to_have_attribute("data-available", "yes", timeout=10_000)
    expect(page.locator("#publish")).to_be_visible()
    return page, errors


def card(page, name: str):
    return page.locator(f'.card[data-stream="{name}"]')


def screenshot(page, path: Path) -> None:
    page.wait_for_timeout(300)  # let the last frame paint
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, path
    print(f"\nscreenshot: {path}")


def scored(page, name: str) -> float:
    """Wait for the stream's card to show a MOS (Distill-MOS: the first after 7.68 s of audio)."""
    from playwright.sync_api import expect

    c = card(page, name)
    expect(c).to_have_attribute("data-mine", "yes", timeout=10_000)  # marked as this page's stream
    expect(c.locator(".card-detail")).to_contain_text("WebRTC")
    expect(c.locator(".smoothed-value")).to_have_text(MOS, timeout=30_000)
    return float(c.locator(".smoothed-value").inner_text())


def test_publish_my_microphone_is_scored_and_stop_ends_it(monitor, tmp_path):
    from playwright.sync_api import expect

    mic = speech_wav(EXAMPLES / "clean.wav", tmp_path / "mic.wav")
    name = "browser-mic"
    with chromium(fake_microphone(mic), viewport={"width": 1280, "height": 760}) as ctx:
        page, errors = open_panel(ctx, monitor)
        expect(page.locator("#publish-mic")).to_be_enabled()
        assert "echo cancellation" in page.locator("#publish-mic").get_attribute("title").lower()
        page.fill("#publish-name", name)
        t0 = time.monotonic()
        page.click("#publish-mic")
        state = page.locator("#publish-state")
        expect(state).to_have_text(f"publishing the microphone as {name}", timeout=15_000)
        expect(page.locator("#publish-stop")).to_be_visible()
        expect(page.locator("#publish-mic")).to_be_disabled()

        mos = scored(page, name)
        print(f"\nmicrophone: MOS {mos} after {time.monotonic() - t0:.1f} s")
        assert 3.0 <= mos <= 5.0  # clean speech, through Opus: fair or good
        expect(card(page, name)).to_have_attribute("data-state", "live")
        expect(card(page, name).locator(".level-meter .meter-value")).to_have_text(re.compile(r"^-\d+ dBFS$"))
        screenshot(page, tmp_path / "publish-microphone.png")

        page.click("#publish-stop")
        expect(card(page, name)).to_have_attribute("data-state", "ended", timeout=10_000)
        expect(state).to_have_text(f"stopped: {name}")
        expect(page.locator("#publish-stop")).to_be_hidden()
        expect(page.locator("#publish-mic")).to_be_enabled()
        assert page.evaluate("window.scoreqPublish.current") is None
        screenshot(page, tmp_path / "publish-microphone-stopped.png")
        assert not errors, errors

    started = [e for e in monitor.events(name) if e["type"] == "stream_started"]
    assert len(started) == 1 and started[0]["source"] == "webrtc", started
    assert "opus" in started[0]["detail"]
    assert monitor.ended(name)["reason"] == "closed"
    assert any(e["type"] == "score" and e.get("mos") is not None for e in monitor.events(name))


def test_publish_a_file_is_scored(monitor, tmp_path):
    from playwright.sync_api import expect

    name = "browser-file"
    with chromium([WEBRTC_LOOPBACK], viewport={"width": 1280, "height": 760}) as ctx:
        page, errors = open_panel(ctx, monitor)
        page.fill("#publish-name", name)
        t0 = time.monotonic()
        page.set_input_files("#publish-file", str(EXAMPLES / "lyra3.wav"))
        state = page.locator("#publish-state")
        expect(state).to_have_text(f"publishing the file as {name}", timeout=15_000)
        expect(page.locator("#publish-audio")).to_be_visible()  # it plays here, with its controls

        mos = scored(page, name)
        print(f"\nfile: MOS {mos} after {time.monotonic() - t0:.1f} s")
        assert 1.0 <= mos <= 3.0  # speech through a 3.2 kbps neural codec (Lyra 3), then Opus: poor
        screenshot(page, tmp_path / "publish-file.png")

        page.click("#publish-stop")
        expect(card(page, name)).to_have_attribute("data-state", "ended", timeout=10_000)
        expect(state).to_have_text(f"stopped: {name}")
        expect(page.locator("#publish-audio")).to_be_hidden()
        assert not errors, errors
    assert monitor.ended(name)["reason"] == "closed"


def test_a_published_file_that_ends_stops_publishing(monitor, data, tmp_path):
    """A short recording (24 kHz stereo, 3.9 s): when it has played, the session is closed by the page."""
    from playwright.sync_api import expect

    name = "browser-short"
    with chromium([WEBRTC_LOOPBACK], viewport={"width": 1280, "height": 760}) as ctx:
        page, errors = open_panel(ctx, monitor)
        page.fill("#publish-name", name)
        page.set_input_files("#publish-file", str(MUSHRA / "stim_08" / "ref.wav"))
        state = page.locator("#publish-state")
        expect(state).to_have_text(f"publishing the file as {name}", timeout=15_000)
        expect(state).to_have_text(f"stopped (the file has ended): {name}", timeout=15_000)
        expect(card(page, name)).to_have_attribute("data-state", "ended", timeout=10_000)
        assert not errors, errors
    assert monitor.ended(name)["reason"] == "closed"


class _NoPublishers(http.server.SimpleHTTPRequestHandler):
    """The panel's files and nothing else: as a monitor that takes no publishers answers ``/whip``."""

    def translate_path(self, path: str) -> str:
        from scoreq_live.sinks.policy import PANEL_DIR

        rel = path.split("?", 1)[0]
        if rel == "/":
            return str(PANEL_DIR / "index.html")
        if rel.startswith("/static/") and ".." not in rel:
            return str(PANEL_DIR / rel[len("/static/"):])
        return str(PANEL_DIR / "missing")

    def do_OPTIONS(self) -> None:  # noqa: N802 (the standard library's naming)
        self.send_error(404)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def test_no_publish_controls_where_the_server_takes_no_publishers(tmp_path):
    from playwright.sync_api import expect

    require_browser()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoPublishers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with chromium(viewport={"width": 1280, "height": 760}) as ctx:
            page = ctx.new_page()
            errors = watch_errors(page)
            asked: list[str] = []
            page.on("request", lambda r: r.method == "OPTIONS" and asked.append(r.url))
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            expect(page.locator("#publish")).to_have_attribute("data-available", "no", timeout=15_000)
            expect(page.locator("#publish")).to_be_hidden()
            expect(page.locator("body")).to_have_attribute("data-conn", "offline", timeout=15_000)  # no feed here
            assert asked == [f"http://127.0.0.1:{server.server_port}/whip"]
            errors = [e for e in errors if "WebSocket" not in e]  # the missing feed, reported by the browser
            assert not errors, errors
    finally:
        server.shutdown()
        server.server_close()
