"""The resampler every input shares: accurate, aligned, chunking-free, and what it holds back is bounded."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from scoreq_live.core.resample import QUALITY, Resampler
from tests.helpers import MUSHRA, joined


@pytest.fixture(scope="module")
def speech(data) -> np.ndarray:
    """6 s of real speech, 16 kHz."""
    return joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:3])[:16000 * 6]


@pytest.mark.parametrize("rate", [8000, 48000, 44100, 24000])
def test_streaming_is_one_shot_soxr_chunked_any_way_with_little_held_back(speech: np.ndarray, rate: int) -> None:
    x = soxr.resample(speech, 16000, rate).astype(np.float32)
    r = Resampler(rate)
    step = rate // 50  # 20 ms blocks, as packets and device callbacks come
    chunks = []
    held = 0
    for i in range(0, len(x), step):
        chunks.append(r.process(x[i:i + step]))
        held = max(held, (i + len(x[i:i + step])) * 16000 // rate - sum(len(c) for c in chunks))
    assert held <= 0.12 * 16000  # see the table in core.resample: at most 115 ms, from 8 kHz
    y = np.concatenate(chunks + [r.flush()])
    for block in (1, 7919):  # chunking changes nothing
        other = Resampler(rate)
        z = np.concatenate([other.process(x[i:i + block]) for i in range(0, len(x), block)] + [other.flush()])
        np.testing.assert_allclose(y, z, atol=1e-6)
    # Offline scoring resamples whole files with soxr.resample at the same quality: the same samples, aligned.
    want = soxr.resample(x, rate, 16000, quality=QUALITY)
    assert len(y) == len(want)
    assert np.max(np.abs(y - want)) < 2e-3


def test_16k_passes_through_and_flush_starts_afresh() -> None:
    x = np.linspace(-1, 1, 320, dtype=np.float64)
    r = Resampler(16000)
    y = r.process(x)
    assert y.dtype == np.float32 and np.array_equal(y, x.astype(np.float32)) and r.flush().size == 0
    r = Resampler(8000)
    a = np.concatenate([r.process(x.astype(np.float32)), r.flush()])
    b = np.concatenate([r.process(x.astype(np.float32)), r.flush()])
    assert len(a) == 640
    np.testing.assert_array_equal(a, b)
