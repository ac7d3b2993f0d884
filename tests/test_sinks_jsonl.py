"""--jsonl never loses output silently: whole lines or nothing, failures reported, a closed pipe ends it cleanly.

The real monitor process on a real recording: a file that hits its size limit
(RLIMIT_FSIZE: the kernel takes part of a line, then refuses), a device that is
always full, and a reader that closes the pipe after a few lines.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from tests.helpers import EXAMPLES, ROOT

ARGS = ["monitor", "-i", f"clean={EXAMPLES / 'clean.wav'}", "--fast", "--no-tui", "--no-ws", "--device", "cpu",
        "--max-batch", "1"]


def monitor(*extra: str, limit: int | None = None, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen([sys.executable, "-m", "scoreq_live", *ARGS, *extra], cwd=ROOT, stdout=stdout,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, preexec_fn=cap)


def test_a_file_that_cannot_grow_keeps_whole_lines_and_says_what_it_lost(tmp_path):
    out = tmp_path / "events.jsonl"
    limit = 3000  # a few events fit, the next one only in part
    proc = monitor("--jsonl", str(out), limit=limit)
    _, err = proc.communicate(timeout=300)
    data = out.read_bytes()
    assert 0 < len(data) <= limit and data.endswith(b"\n"), "a torn last line"
    lines = [json.loads(line) for line in data.splitlines()]  # every line whole
    assert lines[0]["type"] == "stream_started"
    failed = [line for line in err.splitlines() if "cannot write to" in line]
    recovered = [line for line in err.splitlines() if "works again" in line]
    # A smaller event may fit where a larger one did not: failed and recovered alternate, ever less often.
    assert failed and "File too large" in failed[0] and len(recovered) in (len(failed) - 1, len(failed)), err
    assert len(failed) <= 4, err  # retried after 1, 2, 4, ... s: a run of a few seconds reports a few
    assert "ended (eof)" in err and "21/21 windows scored" in err, "scoring stopped with the output"
    assert "Traceback" not in err
    lost = int(re.search(r"scoreq-live: (\d+) events were not written by the outputs", err)[1])
    assert lost > 0 and len(lines) + lost >= 2 + 21  # started, ended and every score: written or counted
    assert proc.returncode == 1, "an output that lost events must not exit 0"


def test_a_full_device_is_reported_once_and_scoring_goes_on():
    proc = monitor("--jsonl", "/dev/full")
    _, err = proc.communicate(timeout=300)
    assert sum("No space left on device" in line for line in err.splitlines()) == 1, err
    assert "21/21 windows scored" in err and "Traceback" not in err
    assert proc.returncode == 1


def windows_scored(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("scoreq_live_windows_total{") and 'result="scored"' in line)


def test_a_reader_that_closes_the_pipe_ends_the_output_cleanly(tiny_nr):
    """As `| head -n 3`: a live monitor (real time), its reader gone after three lines; scoring goes on."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scoreq_live", "monitor", "-i", f"clean={EXAMPLES / 'clean.wav'}", "--model",
         str(tiny_nr), "--model-kind", "mos", "--window", "1", "--hop", "0.25", "--no-tui", "--no-ws", "--threads",
         "1", "--http", "127.0.0.1:0", "--jsonl", "-"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.stdout.close()
        assert first[0]["type"] == "stream_started"
        deadline = time.monotonic() + 60
        while not any("closed by its reader" in line for line in err) and time.monotonic() < deadline:
            time.sleep(0.1)  # the next event finds the pipe closed
        assert any("closed by its reader" in line for line in err), "".join(err)
        port = int(next(re.search(r"http://127\.0\.0\.1:(\d+)/", line)[1] for line in err
                        if re.search(r"http://127\.0\.0\.1:(\d+)/", line)))
        before = windows_scored(port)
        deadline = time.monotonic() + 60
        while windows_scored(port) <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert windows_scored(port) > before, "scoring stopped with the output"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        reader.join(10)
    text = "".join(err)
    assert sum("closed by its reader" in line for line in err) == 1, text
    assert "Traceback" not in text and "BrokenPipe" not in text and "Exception ignored" not in text, text
    assert rc == 0, text
