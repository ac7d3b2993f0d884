"""Audio normalisation in the source layer: any rate, any channel count, int or float, never NaN."""

import numpy as np
import soundfile as sf
import soxr

from scoreq_live.audio import to_mono_float
from scoreq_live.sources.base import Normaliser
from tests.helpers import MUSHRA


def stereo_24k(data_dir=MUSHRA):
    x, sr = sf.read(data_dir / "stim_01" / "ref.wav", dtype="int16", always_2d=True)
    assert sr == 24000 and x.shape[1] == 2
    return x


def run(norm, x, chunk):
    out = [norm.process(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    out.append(norm.flush())
    return np.concatenate(out)


def test_streaming_resampler_output_does_not_depend_on_chunking(data):
    x = stereo_24k()
    a = run(Normaliser(24000), x, 480)
    b = run(Normaliser(24000), x, 7919)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert abs(a.size - x.shape[0] * 2 / 3) <= 2


def test_streaming_matches_one_shot_resampling(data):
    x = stereo_24k()
    streamed = run(Normaliser(24000), x, 480)
    whole = soxr.resample(to_mono_float(x), 24000, 16000)
    n = min(streamed.size, whole.size)
    assert np.max(np.abs(streamed[:n] - whole[:n])) < 2e-3


def test_int16_and_float_input_agree_and_channels_are_averaged():
    i16 = np.array([[32767, -32768], [16384, 16384], [0, 0]], dtype=np.int16)
    f = to_mono_float(i16)
    np.testing.assert_allclose(f, [-0.5 / 32768, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(to_mono_float(i16.astype(np.float32) / 32768), f, atol=1e-6)


def test_nan_inf_and_overs_are_cleaned():
    x = np.array([np.nan, np.inf, -np.inf, 3.0, -0.25], np.float32)
    y = Normaliser(16000).process(x)
    assert y.tolist() == [0.0, 0.0, 0.0, 1.0, -0.25]
