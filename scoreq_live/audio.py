"""Reading whole audio files for offline scoring and references; where the example recordings are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from scoreq_live.core import SAMPLE_RATE
from scoreq_live.errors import ScoreqLiveError


def examples_dir() -> Path:
    """Where the example recordings are: installed as package data from the top-level examples/."""
    from importlib.resources import files

    try:
        return Path(str(files("scoreq_live.examples")))
    except ModuleNotFoundError:  # running from a source tree without installing
        return Path(__file__).resolve().parent.parent / "examples"


class AudioError(ScoreqLiveError):
    """An audio file cannot be read."""


def to_mono_float(x: np.ndarray) -> np.ndarray:
    """Any ``[n]`` or ``[n, channels]`` int/float array -> float32 mono in [-1, 1], finite."""
    a = np.asarray(x)
    if a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        scale = float(-info.min) if info.min < 0 else float(info.max + 1) / 2
        a = (a.astype(np.float32) - (0 if info.min < 0 else scale)) / scale
    else:
        a = a.astype(np.float32, copy=False)
    if a.ndim == 2:
        a = a.mean(axis=1, dtype=np.float32) if a.shape[1] > 1 else a[:, 0]
    elif a.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        a = np.where(np.isfinite(a), a, 0.0).astype(np.float32)
    return np.clip(a, -1.0, 1.0).astype(np.float32, copy=False)


def load_audio(path: str | Path) -> np.ndarray:
    """Read a file as 16 kHz mono float32 (downmixed, resampled with soxr HQ)."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE)
    return to_mono_float(x)
