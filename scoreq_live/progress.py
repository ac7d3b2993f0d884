"""A progress bar on stderr for long transfers (model downloads, hashing), as a ``(done, total)`` callback."""

from __future__ import annotations

from types import TracebackType
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ConsoleProgress:
    """``with ConsoleProgress("downloading x") as p: download(..., progress=p)``.

    On a terminal it draws a live bar; elsewhere (logs, pipes) it prints one
    line when the transfer starts and the final state when it ends.  Nothing
    shows until the first call: wrapping work that may or may not transfer
    anything (loading a model that may need a first download) costs no output
    when nothing is transferred.
    """

    def __init__(self, description: str, console: Console | None = None) -> None:
        self.description = description
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if self._task is not None:
            self._progress.stop()
        return False

    def __call__(self, done: int, total: int) -> None:
        # The bar starts with the first bytes: a transfer that never starts leaves no empty bar behind.
        if self._task is None:
            if not self.console.is_terminal:
                self.console.print(f"{self.description} ...", highlight=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total, completed=done)
        else:
            self._progress.update(self._task, completed=done, total=total)
