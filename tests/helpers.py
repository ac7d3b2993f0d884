"""Paths and loaders shared by the tests: the speech data beside the project and the demo recordings.

The speech data (``shared/data`` next to the repository) is not part of the
repository.  A test that reads it requests the ``data`` fixture (see
``conftest.py``), which calls :func:`require_data`: without the data the test
is skipped, except on CI (``CI`` set), where the data is provided and a skip
would hide a broken set-up, so there it fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MUSHRA = DATA / "mushra" / "audio"
SCOREQ_PAIR = DATA / "scoreq"
EXAMPLES = ROOT / "examples"


def data_available() -> tuple[bool, str]:
    """(True, "") when the speech data is there, else (False, why)."""
    if not DATA.is_dir():
        return False, f"speech data not found beside the project ({DATA})"
    return True, ""


def require_data() -> Path:
    """The speech data folder.  Skips the calling test without it; fails instead on CI, where it is provided."""
    ok, reason = data_available()
    if not ok:
        unavailable(reason)
    return DATA


def unavailable(reason: str) -> None:
    """Skip the calling test for a missing prerequisite; fail instead on CI, which installs them all."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


def speech_16k(path: Path) -> np.ndarray:
    """A file as the monitor sees it: mono float32 at 16 kHz."""
    from scoreq_live.audio import load_audio

    return load_audio(path)


def joined(paths: Iterable[Path], gap_s: float = 0.3) -> np.ndarray:
    """Several short files joined into one long stream with short pauses."""
    gap = np.zeros(int(gap_s * 16000), np.float32)
    parts = []
    for p in paths:
        parts += [speech_16k(p), gap]
    return np.concatenate(parts)


def stop_process(proc: subprocess.Popen | None, grace: float = 2.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL and reap.  For ``finally`` blocks."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


class ScoreqProcess:
    """``python -m scoreq_live ARGS`` in the background, as a user runs it.

    Its stderr is collected line by line by a thread (:attr:`lines`), so a chatty
    process never blocks on a full pipe; :meth:`stop` is Ctrl-C (SIGINT), then
    :func:`stop_process` if it does not end.
    """

    def __init__(self, *args: object, preexec_fn: Callable[[], object] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "scoreq_live", *map(str, args)], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def output(self, tail: int = 4000) -> str:
        return "".join(self.lines)[-tail:]

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first stderr line matching ``pattern`` (waiting for it); AssertionError with the output if none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in:\n{self.output()}")

    def wait_http(self, url: str, timeout: float = 60) -> None:
        """Until ``url`` answers 200 (a server up); AssertionError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"scoreq-live exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} did not answer within {timeout:.0f} s:\n{self.output()}")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def stop(self, timeout: float = 20) -> int | None:
        """Ctrl-C and the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # as Ctrl-C: the monitor ends its streams and closes its servers
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        killed = self.proc.poll() is None
        stop_process(self.proc)
        self._reader.join(5)
        return None if killed else self.proc.returncode
