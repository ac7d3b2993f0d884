"""Stopping cleanly: a service is stopped with SIGTERM, a person presses Ctrl-C; both end streams cleanly."""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Call ``stop`` on SIGINT or SIGTERM while inside (in the running event loop); the handlers go on leaving.

    Where signals cannot be handled (not the main thread, no signals on this platform) nothing is installed.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def wait_stopped(stopped: asyncio.Event, timeout_s: float | None) -> None:
    """Return once ``stopped`` is set or ``timeout_s`` seconds have passed (None or infinite: no limit)."""
    try:
        await asyncio.wait_for(stopped.wait(), None if timeout_s is None or math.isinf(timeout_s) else timeout_s)
    except asyncio.TimeoutError:
        pass
