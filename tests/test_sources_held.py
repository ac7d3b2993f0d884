"""Blocks gathered between windows (Source.held): same windows and scores, no window later than block by block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sources.base import DUE_MARGIN, HOLD_S, Source
from scoreq_live.sources.file import FileSource
from tests.helpers import require_data


class Blocks(Source):
    """``n`` blocks of ``block`` samples at 48 kHz, numbered so the order can be checked."""

    def __init__(self, n: int, block: int = 960) -> None:
        super().__init__("blocks")
        self.rate, self.channels = 48_000, 1
        self.n, self.block = n, block

    async def frames(self) -> AsyncIterator[np.ndarray]:
        for i in range(self.n):
            yield np.full(self.block, i, dtype=np.float32)


async def _gather(src: Source, need: list[int]) -> list[np.ndarray]:
    out = []
    async for chunk in src.held(src.frames()):
        out.append(chunk)
        need[0] -= chunk.size // 3  # 48 kHz in, 16 kHz to the consumer
        while need[0] <= 0:  # a window was made: the next one is due a hop (0.5 s) later
            need[0] += 8000
    return out


def test_held_yields_when_the_next_window_is_due_or_the_hold_is_full():
    src = Blocks(200)  # 4 s of 20 ms blocks
    need = [int(1.5 * 16000)]  # the consumer's next window is due 1.5 s in
    src.due_in = lambda: need[0]
    out = asyncio.run(_gather(src, need))
    flat = np.concatenate(out)
    np.testing.assert_array_equal(flat, np.repeat(np.arange(200, dtype=np.float32), 960))  # nothing lost, in order
    sizes = [c.size for c in out]
    assert max(sizes) <= 48_000 * HOLD_S + 960  # never more than the hold (plus the block that fills it)
    # Gathered up to the due point (less the resampler margin) before the window's audio goes on: the yield that
    # reaches it comes with the block that crosses 1.5 s - 30 ms, not later.
    reached = np.cumsum(sizes) // 3
    first = int(np.argmax(reached >= 1.5 * 16000 - DUE_MARGIN))
    assert reached[first] - (1.5 * 16000 - DUE_MARGIN) < 960 // 3
    assert len(out) < 200 / 4  # far fewer calls than blocks (about 3 per hop of 25 blocks)


def test_held_passes_blocks_through_without_a_consumer():
    src = Blocks(10)
    out = asyncio.run(_gather(src, [0]))
    assert [c.size for c in out] == [960] * 10


class BlockByBlock(FileSource):
    def held(self, frames: AsyncIterator[np.ndarray]) -> AsyncIterator[np.ndarray]:
        return frames


def _scores(tiny_nr, source_cls, path) -> list[tuple[int, float | None, str | None]]:
    scorer = Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=4)
    bus = EventBus()
    sub = bus.subscribe()
    cfg = EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=0.5, model="tiny"), max_batch=4, fast=True)
    asyncio.run(Engine(scorer, [source_cls("s", path, fast=True)], cfg, bus).run())
    out = []
    while (ev := sub.get_nowait()) is not None:
        if isinstance(ev, ScoreEvent):
            out.append((ev.window, ev.mos, ev.reason))
    return out


def test_gathered_blocks_give_the_same_windows_and_scores(tiny_nr):
    path = next(require_data().rglob("*.wav"))  # 24 kHz stereo: resampled and downmixed on the way
    held = _scores(tiny_nr, FileSource, path)
    plain = _scores(tiny_nr, BlockByBlock, path)
    assert len(held) == len(plain) > 5
    for (w1, m1, r1), (w2, m2, r2) in zip(held, plain):
        assert (w1, r1) == (w2, r2)
        assert (m1 is None) == (m2 is None)
        if m1 is not None:
            assert abs(m1 - m2) < 1e-5


class Lossy(Source):
    """5 s of 20 ms blocks at 16 kHz; 0.2 s of input is lost just before block ``gap_at`` (as a sound card does)."""

    def __init__(self, gap_at: int) -> None:
        super().__init__("lossy")
        self.rate, self.channels = 16_000, 1
        self.gap_at = gap_at
        self._lost = 0.0

    @property
    def dropped_s(self) -> float:
        return self._lost

    async def frames(self) -> AsyncIterator[np.ndarray]:
        noise = (0.1 * np.random.default_rng(1).standard_normal(320)).astype(np.float32)
        for i in range(250):
            if i == self.gap_at:
                self._lost = 0.2
            yield noise


class Instant:
    def score(self, windows):
        return np.full(len(windows), 3.0)


def test_a_loss_is_reported_where_the_gap_is_though_blocks_are_gathered():
    bus = EventBus()
    sub = bus.subscribe()
    cfg = EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=1.0, model="x"), max_batch=4, fast=True)
    asyncio.run(Engine(Instant(), [Lossy(gap_at=60)], cfg, bus).run())
    drops = []
    while (ev := sub.get_nowait()) is not None:
        if type(ev).__name__ == "InputDropped":
            drops.append(ev)
    assert len(drops) == 1 and drops[0].dropped_s == drops[0].total_s == 0.2
    assert abs(drops[0].t - 60 * 0.02) < 1e-9  # the stream time of the gap: 60 blocks in, not where a hold ended
