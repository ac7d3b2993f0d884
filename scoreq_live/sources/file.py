"""Audio files played through the live pipeline, in real time or as fast as scoring allows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import soundfile as sf

from scoreq_live.sources.base import Source, SourceError


class FileSource(Source):
    """Reads a file block by block.

    In real time, each block is released when the wall clock reaches its
    position in the file (paced against the start, so sleeps do not drift);
    with ``fast`` it is released at once and back-pressure from the scorer sets
    the pace.  The windows, and so the scores, are the same either way.
    """

    kind = "file"

    def __init__(self, name: str, path: str | Path, fast: bool = False, block_s: float = 0.02,
                 loop_count: int = 1) -> None:
        super().__init__(name, str(path))
        self.path = Path(path)
        self.fast = fast
        self.block_s = block_s
        self.loop_count = loop_count

    def check(self) -> None:
        self.open_info()

    def open_info(self):
        if not self.path.is_file():
            raise SourceError(f"no such file: {self.path}")
        try:
            info = sf.info(str(self.path))
        except Exception as e:
            raise SourceError(f"cannot read audio file {self.path}: {e}") from e
        return info

    async def frames(self) -> AsyncIterator[np.ndarray]:
        info = self.open_info()
        self.rate, self.channels = int(info.samplerate), int(info.channels)
        block = max(1, int(self.rate * self.block_s))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        for _ in range(self.loop_count):
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
