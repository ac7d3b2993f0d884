import numpy as np
import pytest

from scoreq_live.core.gate import FRAME, SpeechDetector, level_dbfs
from tests.helpers import SCOREQ_PAIR, speech_16k


def test_level_of_a_full_scale_sine_is_minus_3_dbfs():
    t = np.arange(16000) / 16000
    assert level_dbfs(np.sin(2 * np.pi * 440 * t).astype(np.float32)) == pytest.approx(-3.01, abs=0.01)
    assert level_dbfs(np.zeros(100, np.float32)) == -120.0


def test_real_speech_is_mostly_speech_and_silence_is_none(data):
    x = speech_16k(SCOREQ_PAIR / "ref.wav")
    det = SpeechDetector(2)
    det.feed(x)
    assert det.fraction(0, x.size) > 0.6
    quiet = SpeechDetector(2)
    quiet.feed(np.zeros(48000, np.float32))
    assert quiet.fraction(0, 48000) == 0.0


def test_fraction_does_not_depend_on_chunking(data):
    x = speech_16k(SCOREQ_PAIR / "ref.wav")
    a, b = SpeechDetector(), SpeechDetector()
    a.feed(x)
    for chunk in np.array_split(x, 97):
        b.feed(chunk)
    for s, e in [(0, x.size), (16000, 48000), (100, 30000)]:
        assert a.fraction(s, e) == b.fraction(s, e)


def test_speech_followed_by_silence_is_located_in_time(data):
    x = speech_16k(SCOREQ_PAIR / "ref.wav")[:32000]
    det = SpeechDetector()
    det.feed(np.concatenate([x, np.zeros(32000, np.float32)]))
    assert det.fraction(0, 32000) > 0.5
    # webrtcvad holds speech a few frames past its end (hangover); after that, nothing.
    assert det.fraction(32000 + 10 * FRAME, 64000) == 0.0
