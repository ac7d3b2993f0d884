"""Audio files played through the live pipeline, in real time or as fast as scoring allows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import soundfile as sf

from scoreq_live.files import special_kind
from scoreq_live.sources.base import Source, SourceError

FILES_ONLY = "give an audio file, or live audio as mic or rtp://HOST:PORT"
"""What to give instead of a FIFO or a device: an input file is a regular file; live audio comes from a sound
device or RTP (a FIFO would block the start, a device never ends)."""


class FileSource(Source):
    """Reads a file block by block.

    In real time, each block is released when the wall clock reaches its
    position in the file (paced against the start, so sleeps do not drift);
    with ``fast`` it is released at once and back-pressure from the scorer sets
    the pace.  The windows, and so the scores, are the same either way.
    """

    kind = "file"

    def __init__(self, name: str, path: str | Path, fast: bool = False, block_s: float = 0.02) -> None:
        super().__init__(name, str(path))
        self.path = Path(path)
        self.fast = fast
        self.block_s = block_s

    def check(self) -> None:
        self.open_info()

    def open_info(self) -> tuple[int, int]:
        """The file's sample rate and channel count; :class:`SourceError` when it cannot be read."""
        if not self.path.is_file():
            kind = special_kind(self.path)
            if kind is None:
                raise SourceError(f"no such file: {self.path}")
            raise SourceError(f"{self.path} is {kind}, not a regular file; {FILES_ONLY}")
        try:
            info = sf.info(str(self.path))
        except Exception as e:
            raise SourceError(f"cannot read audio file {self.path}: {e}") from e
        return int(info.samplerate), int(info.channels)

    async def frames(self) -> AsyncIterator[np.ndarray]:
        self.rate, self.channels = self.open_info()
        block = max(1, int(self.rate * self.block_s))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        try:
            with sf.SoundFile(str(self.path)) as f:
                while True:
                    data = f.read(block, dtype="float32", always_2d=True)
                    if data.shape[0] == 0:
                        break
                    if self.fast:
                        await asyncio.sleep(0)
                    else:
                        delay = t0 + (sent + data.shape[0]) / self.rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    sent += data.shape[0]
                    yield data
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"error reading {self.path}: {e}") from e
