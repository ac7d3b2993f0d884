"""Paths and loaders shared by the tests: the speech data beside the project and the demo recordings.

The speech data (``shared/data`` next to the repository) is not part of the
repository.  A test that reads it requests the ``data`` fixture (see
``conftest.py``), which calls :func:`require_data`: without the data the test
is skipped, except on CI (``CI`` set), where the data is provided and a skip
would hide a broken set-up, so there it fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
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
