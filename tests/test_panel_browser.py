"""The browser panel in a real headless Chromium, against the real monitor.

The monitor scores the two demo recordings in real time with an alert rule
and serves the panel (``--http``); the page is opened the way a person opens
it (with ``?token=``) and checked for what that person sees: a card per
stream with its score in the right colour, charts that fill with points, the
alert, a live connection.  Then the monitor is stopped and started again on
the same port, and the page must notice and reconnect by itself; ``?streams=``
narrows it, and without the token it says so.  A screenshot goes to
``test-artifacts/``.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.browser import chromium, require_browser
from tests.helpers import EXAMPLES, ROOT, ScoreqProcess

TOKEN = "panel-test-token"
RULE = "mos<3.3 for 3s"
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Monitor:
    """``python -m scoreq_live`` on the demo recordings, serving the panel on ``http_port``; restartable."""

    def __init__(self, http_port: int, ws_port: int, inputs: list[str] | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.http_port, self.ws_port = http_port, ws_port
        self.inputs = inputs or [f"clean={EXAMPLES / 'clean.wav'}", f"lyra3={EXAMPLES / 'lyra3.wav'}"]
        self.extra = extra
        self.proc: ScoreqProcess | None = None

    def start(self) -> Monitor:
        self.proc = ScoreqProcess(
            *(a for i in self.inputs for a in ("--input", i)),
            "--http", f"127.0.0.1:{self.http_port}", "--ws", f"127.0.0.1:{self.ws_port}",
            "--token", TOKEN, "--alert", RULE, "--no-tui", "--device", "cpu", *self.extra)
        self.proc.wait_http(f"http://127.0.0.1:{self.http_port}/")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)  # as Ctrl-C: the monitor closes its server cleanly
        self.proc = None


@pytest.fixture
def monitor(tmp_path):
    require_browser()  # before the model loads: a skip should cost nothing
    m = Monitor(free_port(), free_port())
    try:
        yield m.start()
    finally:
        m.stop()


def card(page, name: str):
    return page.locator(f'.card[data-stream="{name}"]')


def chart_pixels(page, name: str, rgb: tuple[int, int, int]) -> int:
    """How many pixels of a card's chart canvas are (nearly) the colour ``rgb``: lines actually drawn."""
    return page.evaluate(
        """([name, rgb]) => {
            const c = document.querySelector(`.card[data-stream="${name}"] .chart canvas`);
            if (!c || !c.width) return 0;
            const top = 12;  // below the alert bar drawn along the top of the plot
            const px = c.getContext("2d").getImageData(0, top, c.width, c.height - top).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4) {
                if (Math.abs(px[i] - rgb[0]) + Math.abs(px[i + 1] - rgb[1]) + Math.abs(px[i + 2] - rgb[2]) < 40
                    && px[i + 3] > 200) n++;
            }
            return n;
        }""",
        [name, list(rgb)],
    )


def test_panel_shows_streams_scores_charts_and_alert_and_reconnects(monitor):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "panel.png"
    origin = f"127.0.0.1:{monitor.http_port}"
    errors: list[str] = []
    foreign: list[str] = []
    with chromium(viewport={"width": 1280, "height": 760}) as ctx:
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        # Failed connections while the server is down are logged by the browser itself; anything else counts.
        page.on("console", lambda m: m.type == "error" and not re.search(r"WebSocket|Failed to load resource", m.text)
                and errors.append(m.text))
        # Works offline: everything the page loads comes from the monitor itself.
        page.on("request", lambda r: origin not in r.url and not r.url.startswith("data:") and foreign.append(r.url))
        page.goto(f"http://{origin}/?token={TOKEN}")

        # The header: connected, model and mode.
        expect(page.locator("#conn-label")).to_have_text(re.compile(r"^live$"), timeout=30_000)
        expect(page.locator("#meta-model")).to_have_text("distillmos")
        expect(page.locator("#meta-mode")).to_contain_text("MOS")

        # One card per stream, in the order given on the command line.
        expect(page.locator(".card")).to_have_count(2)
        expect(page.locator(".card .card-name")).to_have_text(["clean", "lyra3"])

        # Scores arrive (first window after 7.68 s of audio) and the charts fill with points.
        for name in ("clean", "lyra3"):
            expect(card(page, name).locator(".smoothed-value")).to_have_text(re.compile(r"^\d\.\d\d$"),
                                                                          timeout=40_000)
        page.wait_for_function(
            "[...document.querySelectorAll('.card .chart')].every((c) => +c.dataset.points >= 3)", timeout=30_000)
        points = int(card(page, "lyra3").locator(".chart").get_attribute("data-points"))
        page.wait_for_function(
            f"+document.querySelector('.card[data-stream=\"lyra3\"] .chart').dataset.points > {points}",
            timeout=15_000)

        # The alert on the Lyra 3.2 kbps stream, in the list and on its card.
        alert = page.locator("#alert-active .alert-item")
        expect(alert).to_have_count(1, timeout=30_000)
        expect(alert).to_contain_text("lyra3")
        expect(alert).to_contain_text(RULE)
        expect(card(page, "lyra3")).to_have_attribute("data-alert", "yes")
        expect(card(page, "lyra3").locator(".card-alert")).to_have_text(RULE)
        expect(card(page, "clean")).to_have_attribute("data-alert", "no")

        # Colours a person reads at a glance: the codec stream is poor, the clean one is not.
        expect(card(page, "lyra3")).to_have_attribute("data-band", "poor")
        expect(card(page, "clean")).to_have_attribute("data-band", re.compile("good|fair"))
        clean = float(card(page, "clean").locator(".smoothed-value").inner_text())
        lyra3 = float(card(page, "lyra3").locator(".smoothed-value").inner_text())
        assert clean > lyra3 + 0.5
        expect(card(page, "lyra3").locator(".speech-meter .meter-value")).to_have_text(re.compile(r"^\d+ %$"))
        expect(card(page, "lyra3").locator(".level-meter .meter-value")).to_have_text(re.compile(r"^-\d+ dBFS$"))
        # A few more seconds of chart for the screenshot (the recordings are 27 s long).
        page.wait_for_function(
            "[...document.querySelectorAll('.card .chart')].every((c) => +c.dataset.points >= 12)", timeout=30_000)
        page.wait_for_timeout(300)  # let the last frame paint
        assert chart_pixels(page, "lyra3", (0xF8, 0x51, 0x49)) > 50  # the smoothed line, red: poor
        assert chart_pixels(page, "clean", (0xF8, 0x51, 0x49)) < chart_pixels(page, "lyra3", (0xF8, 0x51, 0x49))

        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot.relative_to(ROOT)}")

        # The server goes away: the page says so, then reconnects by itself when it is back.
        monitor.stop()
        expect(page.locator("body")).to_have_attribute("data-conn", "offline", timeout=15_000)
        expect(page.locator("#conn-label")).to_contain_text("retry in")
        monitor.start()
        page.wait_for_function("window.scoreqPanel.stats.hellos >= 2", timeout=60_000)
        expect(page.locator("#conn-label")).to_have_text("live", timeout=10_000)
        expect(page.locator(".card")).to_have_count(2)

        # ?streams= in the page address narrows the panel to those streams.
        one = ctx.new_page()
        one.goto(f"http://{origin}/?token={TOKEN}&streams=lyra3")
        expect(one.locator("#conn-label")).to_have_text("live", timeout=15_000)
        expect(one.locator(".card .card-name")).to_have_text(["lyra3"])
        one.close()

        # Without the token the page says what is wrong instead of just spinning.
        denied = ctx.new_page()
        denied.goto(f"http://{origin}/")
        expect(denied.locator("#conn-label")).to_contain_text("token", timeout=15_000)
        denied.close()

    assert not errors, errors
    assert not foreign, f"requests beyond the monitor: {foreign}"


def test_panel_shows_a_call_legs_network_numbers(tmp_path):
    """A captured call with 5 % of its packets lost, replayed in real time: its card shows loss and jitter."""
    from playwright.sync_api import expect

    from tests.rtp_tools import RtpFlow, write_pcap

    require_browser()
    pcap = tmp_path / "call.pcap"
    write_pcap(pcap, [RtpFlow(EXAMPLES / "clean.wav", "pcmu", ssrc=0x0A0B0C0D, duration_s=12.0,
                              drop_at=frozenset(range(7, 600, 20)))])
    m = Monitor(free_port(), free_port(), inputs=[f"call=pcap:{pcap}"])
    try:
        m.start()
        with chromium(viewport={"width": 1280, "height": 760}) as ctx:
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{m.http_port}/?token={TOKEN}")
            net = card(page, "call-0a0b0c0d").locator(".net")
            expect(net).to_be_visible(timeout=60_000)
            expect(net).to_have_text(re.compile(r"^loss [4-6]\.\d % · jitter \d+ ms · net MOS [1-4]\.\d\d$"))
    finally:
        m.stop()


def test_panel_shows_streams_thinned_when_scoring_cannot_keep_up(tmp_path):
    """Windows every 10 ms on two streams: far more than the model can score, so both are thinned alike."""
    from playwright.sync_api import expect

    require_browser()
    m = Monitor(free_port(), free_port(), extra=("--hop", "0.01"))
    try:
        m.start()
        with chromium(viewport={"width": 1280, "height": 760}) as ctx:
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{m.http_port}/?token={TOKEN}")
            for name in ("clean", "lyra3"):
                pill = card(page, name).locator(".state-pill")
                expect(pill).to_have_text("thinned", timeout=60_000)
                expect(pill).to_have_attribute("title", re.compile("overloaded"))
                expect(card(page, name).locator(".now-value")).to_have_text(re.compile(r"^\d\.\d\d$"))  # latest score
    finally:
        m.stop()


def _sip(first_line: str, call_id: str, media: tuple[str, int]) -> bytes:
    """A SIP message of a dialog (INVITE or its 200 OK) with an SDP offering PCMU at ``media``."""
    sdp = (f"v=0\r\no=- 1 1 IN IP4 {media[0]}\r\ns=-\r\nc=IN IP4 {media[0]}\r\nt=0 0\r\n"
           f"m=audio {media[1]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()
    head = (f"{first_line}\r\nVia: SIP/2.0/UDP 10.0.0.1:5060\r\nFrom: \"Alice\" <sip:alice@example.net>;tag=1\r\n"
            f"To: <sip:bob@example.net>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n")
    return head.encode() + sdp


def test_history_page_lists_recorded_calls_and_opens_a_calls_chart(tmp_path):
    """A captured SIP call (both directions, one with 5 % loss) and a file are scored with --store; the history
    page lists both calls, and the SIP call opens to its chart with both directions and its network numbers."""
    import json
    import urllib.request

    from tests.history_page import check_history_page
    from tests.rtp_tools import RtpFlow, write_pcap

    require_browser()
    pcap = tmp_path / "call.pcap"
    alice, bob = ("10.0.0.1", 40000), ("10.0.0.2", 50000)
    call_id = "hist-1@10.0.0.1"
    write_pcap(pcap, [RtpFlow(EXAMPLES / "clean.wav", "pcmu", src=alice, dst=bob, ssrc=0xA11CE, duration_s=12.0,
                              start_s=0.5),
                      RtpFlow(EXAMPLES / "lyra3.wav", "pcmu", src=bob, dst=alice, ssrc=0xB0B, duration_s=12.0,
                              start_s=0.6, drop_at=frozenset(range(7, 600, 20)))],
               extra=[(0.0, ("10.0.0.1", 5060), ("10.0.0.2", 5060), _sip("INVITE sip:bob@10.0.0.2 SIP/2.0", call_id,
                                                                          alice)),
                      (0.2, ("10.0.0.2", 5060), ("10.0.0.1", 5060), _sip("SIP/2.0 200 OK", call_id, bob))])
    m = Monitor(free_port(), free_port(), inputs=[f"call=pcap:{pcap}", f"clean={EXAMPLES / 'clean.wav'}"],
                extra=("--fast", "--store", str(tmp_path / "calls.db")))
    try:
        m.start()
        api = f"http://127.0.0.1:{m.http_port}/api/calls?token={TOKEN}"
        deadline = time.monotonic() + 120
        while True:
            listed = json.load(urllib.request.urlopen(api, timeout=20))
            if listed["total"] >= 2:
                break
            assert time.monotonic() < deadline, m.proc.output() if m.proc else ""
            time.sleep(0.5)
        sip = next(c for c in listed["calls"] if c["key"] == call_id)
        assert sip["who"] == "alice → bob" and len(sip["streams"]) == 2, sip
        assert 4.0 <= sip["loss_pct"] <= 6.0, sip
        with chromium(viewport={"width": 1280, "height": 900}) as ctx:
            check_history_page(ctx.new_page(), f"http://127.0.0.1:{m.http_port}/?token={TOKEN}",
                               [sip["id"], *(c["id"] for c in listed["calls"] if c["id"] != sip["id"])], ARTIFACTS)
    finally:
        m.stop()


def test_a_second_models_scores_show_on_the_stream_card(tmp_path):
    """``--model distillmos --model OTHER``: the card shows the other model's latest score beside the MOS."""
    from playwright.sync_api import expect

    from tests.tiny_models import build

    require_browser()
    other = build(tmp_path / "tiny3s.onnx", kind="mos", fixed=48_000, seed=3)
    m = Monitor(free_port(), free_port(), inputs=[f"clean={EXAMPLES / 'clean.wav'}"],
                extra=("--model", "distillmos", "--model", str(other))).start()
    try:
        with chromium() as ctx:
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{m.http_port}/?token={TOKEN}")
            named = card(page, "clean").locator(".named-scores")
            expect(named).to_have_text(re.compile(r"^tiny3s\.mos \d\.\d\d$"), timeout=40_000)
            expect(card(page, "clean").locator(".smoothed-value")).to_have_text(re.compile(r"^\d\.\d\d$"),
                                                                                timeout=40_000)
            # Scores on a 1-5 scale also get a bar, as long as the score is above 1.
            bar = card(page, "clean").locator('.diag-meter[data-score="tiny3s.mos"]')
            expect(bar.locator(".meter-label")).to_have_text("mos")
            value = float(bar.locator(".meter-value").inner_text())
            width = bar.locator(".meter-fill").evaluate("e => parseFloat(e.style.width)")
            assert abs(width - (value - 1) / 4 * 100) < 1.0
    finally:
        m.stop()
