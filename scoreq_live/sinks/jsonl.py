"""Every event as one JSON object per line, to a file or stdout, whole lines or nothing.

Output never vanishes silently.  A line is written with one ``write`` call
and, when the file system takes only part of it (full disk, file size
limit), the part is cut off again, so the file always ends with a whole
line.  A write that fails is reported once (an ``output`` event with state
``failed``, a line on stderr, ``scoreq_live_output_failed``); the events
that could not be written are counted (``lost``) and every later event is
tried again, so an output that can write again says ``recovered`` with the
count; while writes fail they are tried at most every :data:`RETRY_S`
seconds, doubling to :data:`RETRY_MAX_S` with every failure (recoveries
included), so a disk that is nearly full does not flood stderr.  A closed
stdout pipe (``| head``) ends the output cleanly with a message
(``closed``).  Scoring goes on in every case.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from pathlib import Path

from scoreq_live.bus import Subscription
from scoreq_live.core.events import OutputState, OutputStatus
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.sinks.base import Sink

log = logging.getLogger(__name__)

_GONE = (errno.EPIPE, errno.ECONNRESET)  # the reader went away: nothing will read what follows
RETRY_S = 1.0  # a failing output is tried again after this long, ...
RETRY_MAX_S = 30.0  # ... doubling to this while it keeps failing


class JsonlSink(Sink):
    """Writes each event as it comes, unbuffered, so ``tail -f`` and pipes see it at once."""

    name = "jsonl"

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self.fd = -1
        self.regular = False  # a regular file: a partly written line can be taken back
        self.lost = 0  # events not written because writing failed
        self.failing = ""  # the error while writes fail, else ""
        self.retry_at = 0.0  # while failing: when (time.monotonic) to try writing again
        self.retry_s = RETRY_S
        self.closed = False  # the reader went away: the output has ended

    async def start(self) -> None:
        if self.target == "-":
            sys.stdout.flush()  # what Python has buffered goes first; lines go to the descriptor from now on
            self.fd = sys.stdout.fileno()
        else:
            try:
                self.fd = os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ScoreqLiveError(f"--jsonl {self.target}: cannot open it for writing: {e.strerror}") from None
        self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)

    def _status(self, state: OutputState, error: str, events: Subscription) -> None:
        events.bus.publish(OutputStatus(stream="", ts=time.time(), output=self.name, target=self.target, state=state,
                                        error=error, lost=self.lost))

    def write_line(self, line: bytes) -> None:
        """Write one whole line or nothing (raises OSError: nothing of it stays in a file)."""
        start = os.lseek(self.fd, 0, os.SEEK_CUR) if self.regular else -1
        done = 0
        try:
            while done < len(line):
                n = os.write(self.fd, line[done:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError:
            if done and start >= 0:
                os.ftruncate(self.fd, start)  # the part that fitted is taken back: no torn line
                os.lseek(self.fd, start, os.SEEK_SET)
            raise

    async def run(self, events: Subscription) -> None:
        try:
            async for ev in events:
                if self.closed:
                    continue  # the reader has gone: nobody misses what is not written
                if self.failing and time.monotonic() < self.retry_at:
                    self.lost += 1
                    continue
                try:
                    self.write_line((ev.to_json() + "\n").encode())
                except OSError as e:
                    if e.errno not in _GONE:
                        self.lost += 1
                    self._failed(e, events)
                    continue
                if self.failing:
                    log.warning("jsonl: writing to %s works again; %d events were not written", self.target,
                                self.lost)
                    self.failing = ""  # retry_s stays: an output that keeps flapping is reported ever less often
                    self._status("recovered", "", events)
        finally:
            self._release()

    def _failed(self, e: OSError, events: Subscription) -> None:
        msg = e.strerror or str(e)
        if e.errno in _GONE:
            self.closed = True
            log.warning("jsonl: %s was closed by its reader (%s): no more events are written there; "
                        "scoring goes on", "stdout" if self.target == "-" else self.target, msg)
            if self.target == "-":  # nothing may write to the closed pipe again (Python's own flush at exit)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.fd)
                os.close(devnull)
            self._status("closed", msg, events)
            return
        if self.retry_at:  # not the first failure: back off further
            self.retry_s = min(2 * self.retry_s, RETRY_MAX_S)
        self.retry_at = time.monotonic() + self.retry_s
        if not self.failing:
            self.failing = msg
            log.error("jsonl: cannot write to %s: %s; events are counted as lost until it can write again",
                      self.target, msg)
            self._status("failed", msg, events)

    def _release(self) -> None:
        if self.lost:
            log.warning("jsonl: %d events were not written to %s", self.lost, self.target)
        if self.fd >= 0 and self.target != "-":
            os.close(self.fd)
        self.fd = -1
