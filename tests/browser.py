"""A real headless Chromium (Debian's ``chromium`` package) driven by Playwright.

Playwright's own browser downloads are never used: the browser is the system
one, installed by ``.ci/install-system.sh``.  It is started with the flags a
sandbox-less CI container needs, and with everything that would phone home
switched off (without network those calls can stall start-up).

    with chromium() as context:
        page = context.new_page()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import unavailable

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
]


# WebRTC between the page and a server on 127.0.0.1: Chromium leaves loopback candidates out unless told.
WEBRTC_LOOPBACK = "--allow-loopback-in-peer-connection"


def fake_microphone(wav: str | os.PathLike[str]) -> list[str]:
    """Flags for a microphone that plays ``wav`` (16-bit PCM WAV, looped) with getUserMedia allowed unasked."""
    return ["--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={os.fspath(wav)}",
            "--use-fake-ui-for-media-stream", WEBRTC_LOOPBACK]


def chromium_path() -> str | None:
    for p in CHROMIUM_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("chromium")


def browser_available() -> tuple[bool, str]:
    """(True, "") when Playwright and a system Chromium are there, else (False, why)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False, "Playwright for Python not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return False, "chromium not found (Debian package chromium; see .ci/install-system.sh)"
    return True, ""


def require_browser() -> None:
    """Skip the calling test without a browser; fail instead on CI, where one is installed."""
    ok, reason = browser_available()
    if not ok:
        unavailable(reason)


@contextlib.contextmanager
def chromium(extra_flags: list[str] | None = None, **context_options) -> Iterator:
    """A Playwright ``BrowserContext`` in a fresh throw-away profile; closed on exit.

    ``context_options`` go to Playwright (``viewport=``, ``device_scale_factor=``...).
    """
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="scoreq-chromium-"))
    try:
        with sync_playwright() as pw:
            # A persistent context is how Playwright takes a profile directory (--user-data-dir).
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=chromium_path(),
                headless=True,
                args=[*FLAGS, *(extra_flags or [])],
                timeout=60_000,
                **context_options,
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
