"""What a serving process needs to hold many connections: open files, and a quiet log when they run out.

Every connection is an open file.  A process starts with the soft limit its
shell gave it (often 1,024) while the system allows it more (the hard limit):
:func:`raise_open_files` raises the soft limit to the hard one, where the
system lets it, and says how many connections the process can then hold.

When the files run out all the same, the listening socket's ``accept()``
fails with EMFILE; asyncio then stops accepting on that socket for a second
and reports each failure to the loop's exception handler, with a traceback:
on Python 3.11, up to one per connection waiting in the backlog, every time
it tries again, which is megabytes of identical lines a minute.  Inside
:func:`quiet_accept_errors` those reports become one warning line per
:data:`ACCEPT_LOG_INTERVAL_S`, counting the ones left out; the connections
that could not be taken wait in the backlog until others close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["ACCEPT_ERROR", "ACCEPT_LOG_INTERVAL_S", "AcceptErrors", "OpenFiles", "quiet_accept_errors",
           "raise_open_files"]

log = logging.getLogger(__name__)

#: The message asyncio's event loop reports a failed ``accept()`` with (EMFILE, ENFILE, ENOBUFS, ENOMEM).
ACCEPT_ERROR = "socket.accept() out of system resource"
ACCEPT_LOG_INTERVAL_S = 10.0  # at most one line about failed accepts this often
_RESERVE = 64  # open files kept for everything but connections (the model, WebRTC sockets, logs...)
_MAX_SOFT = 1 << 20  # the most asked for when the hard limit is unlimited (macOS, some containers)

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def _open_now() -> int:
    """The files this process has open now (0 when the system does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder))
    return 0


@dataclass(frozen=True)
class OpenFiles:
    """The open-file limit (``RLIMIT_NOFILE``): ``before`` and ``limit`` (the soft limit before and after
    :func:`raise_open_files`), the ``hard`` limit (-1: unlimited), ``in_use``: files open at the time."""

    before: int
    limit: int
    hard: int
    in_use: int

    @property
    def connections(self) -> int:
        """About how many connections the process can hold at once (every server of it together)."""
        return max(0, self.limit - self.in_use - min(_RESERVE, self.limit // 8))

    def describe(self) -> str:
        """One line for the user: how many connections, and why not more."""
        if self.limit > self.before:
            why = f"open-file limit raised from {self.before:,} to {self.limit:,}"
        elif self.limit == self.hard:
            why = f"open-file limit {self.limit:,}, the hard limit"
        else:
            why = f"open-file limit {self.limit:,}, no more allowed"
        return f"connections: about {self.connections:,} at once ({why})"


def raise_open_files() -> OpenFiles | None:
    """Raise this process's soft open-file limit to its hard limit where allowed; None where there is none."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    before = soft
    if soft != resource.RLIM_INFINITY and (unlimited or soft < hard):
        # An unlimited hard limit may still refuse a huge soft one (macOS: OPEN_MAX): ask for less then.
        for want in (_MAX_SOFT if unlimited else hard, 65536, 10240):
            if want <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError):
                continue
            soft = want
            break
    infinite = resource.RLIM_INFINITY
    return OpenFiles(before=_MAX_SOFT if before == infinite else before, limit=_MAX_SOFT if soft == infinite else soft,
                     hard=-1 if unlimited else hard, in_use=_open_now())


class AcceptErrors:
    """An event loop's exception handler: failed accepts said once per ``interval_s``, the rest passed on.

    ``previous``: the handler it replaces (None: the loop's default).  ``failed``:
    accepts that failed so far; ``left_out``: those not said since the last line.
    """

    def __init__(self, previous: ExceptionHandler | None = None, interval_s: float = ACCEPT_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.previous = previous
        self.interval_s = interval_s
        self.clock = clock
        self.failed = 0
        self.left_out = 0
        self._next = -math.inf

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.failed += 1
        now = self.clock()
        if now < self._next:
            self.left_out += 1
            return
        exc = context.get("exception")
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc or "out of resources")
        more = f"; {self.left_out} more since the last such line" if self.left_out else ""
        log.warning("cannot accept new connections: %s%s. They wait until others close (the idle ones time out); "
                    "this is said at most once every %g s", why, more, self.interval_s)
        self.left_out = 0
        self._next = now + self.interval_s


@contextlib.contextmanager
def quiet_accept_errors(loop: asyncio.AbstractEventLoop | None = None,
                        interval_s: float = ACCEPT_LOG_INTERVAL_S) -> Iterator[AcceptErrors]:
    """Within the block, ``loop`` (default: the running one) says failed accepts once per ``interval_s``."""
    loop = loop or asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    handler = AcceptErrors(previous, interval_s)
    loop.set_exception_handler(handler)
    try:
        yield handler
    finally:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)
