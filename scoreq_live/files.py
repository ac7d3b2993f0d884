"""Paths the user names: only regular files are read, so a FIFO or a device never blocks or floods a reader.

Opening a FIFO waits for a writer, and ``/dev/zero`` never ends: an input, an SDP or an audio file to score
is a regular file, and anything else is refused with a message that says what it is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from scoreq_live.errors import ScoreqLiveError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileKindError(ScoreqLiveError):
    """A path is not a regular file, or a small file is too large; callers add what the file was for."""


def kind_of(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file (``"a FIFO (named pipe)"``, ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def special_kind(path: str | Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file; None for a regular file or a missing path."""
    try:
        return kind_of(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def read_small(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit`` of them; never blocks on a FIFO.

    Raises :class:`FileKindError` for anything but a regular file and for a file larger than ``limit``,
    :class:`OSError` when it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        kind = kind_of(os.fstat(fd).st_mode)
        if kind is not None:
            raise FileKindError(f"is {kind}, not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileKindError(f"is larger than {limit // 1024} KiB")
    return data
