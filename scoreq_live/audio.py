"""Reading audio files for offline scoring and references; where the example recordings are.

Files are read in blocks (:func:`audio_blocks`), so a long file never sits in memory at its own rate and
channels; what its header claims is checked first: a regular file only (a FIFO would block, a device never
ends), no more frames than its bytes can hold, and no longer than a limit (:data:`MAX_DURATION_S`, which
``score --max-duration`` changes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from scoreq_live.core.resample import Resampler
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.files import special_kind

MAX_DURATION_S = 4 * 3600.0
"""The longest audio file read (4 hours): longer ones are refused before anything is read."""
BLOCK_S = 10.0  # seconds read at a time
_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
                 "ULAW": 1, "ALAW": 1}  # what a sample takes at least in an uncompressed container
_COMPRESSED = {"FLAC", "OGG", "MPEG"}  # containers whose subtype says the decoded width, not the stored one
_UNKNOWN_FRAMES = 2**62  # libsndfile's "unknown length" is SF_COUNT_MAX


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


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def open_audio(path: str | Path, max_duration_s: float | None = MAX_DURATION_S,
               hint: str = "cut it into shorter files") -> sf.SoundFile:
    """An audio file opened for reading in blocks, once its header is found plausible; :class:`AudioError`
    says why not: not a regular file, not audio, more frames than its bytes hold, or longer than
    ``max_duration_s`` (None: no limit; ``hint`` is what to do about it)."""
    kind = special_kind(path)
    if kind is not None:
        raise AudioError(f"cannot read audio file {path}: it is {kind}, not a regular file; give an audio file")
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    frames, rate = int(f.frames), int(f.samplerate)
    width = None if f.format in _COMPRESSED else _SAMPLE_BYTES.get(f.subtype)
    problem = None
    if rate <= 0:
        problem = f"cannot read audio file {path}: its header gives a sample rate of {rate}"
    elif frames >= _UNKNOWN_FRAMES:
        pass  # the length is found by reading (and limited there)
    elif width is not None and frames * f.channels * width > (size := os.stat(path).st_size):
        problem = (f"cannot read audio file {path}: its header claims {frames} frames ({_duration(frames / rate)}), "
                   f"more than its {size} bytes hold; the file is truncated or corrupt")
    elif max_duration_s is not None and frames > max_duration_s * rate:
        problem = (f"{path} is {_duration(frames / rate)} long (so its header says), more than the "
                   f"{_duration(max_duration_s)} limit; {hint}")
    if problem is not None:
        f.close()
        raise AudioError(problem)
    return f


def audio_blocks(path: str | Path, max_duration_s: float | None = MAX_DURATION_S, block_s: float = BLOCK_S,
                 hint: str = "cut it into shorter files") -> Iterator[np.ndarray]:
    """A file as 16 kHz mono float32 blocks (downmixed, resampled with the monitor's streaming soxr HQ),
    read ``block_s`` at a time; joined they are :func:`load_audio`'s array.  The file is checked by
    :func:`open_audio` when the first block is asked for; :class:`AudioError` also when reading fails or
    goes past ``max_duration_s``."""
    with open_audio(path, max_duration_s, hint) as f:
        rate = int(f.samplerate)
        resampler = Resampler(rate)
        block = max(1, int(rate * block_s))
        limit = None if max_duration_s is None else int(max_duration_s * rate)
        read = 0
        while True:
            try:
                x = f.read(block, dtype="float32", always_2d=True)
            except Exception as e:
                raise AudioError(f"cannot read audio file {path} past {_duration(read / rate)}: "
                                 f"{str(e).rstrip('.')}; it may be corrupt or truncated") from e
            if x.shape[0] == 0:
                break
            read += x.shape[0]
            if limit is not None and read > limit:
                raise AudioError(f"{path} is longer than the {_duration(limit / rate)} limit; {hint}")
            yield to_mono_float(resampler.process(x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]))
        yield to_mono_float(resampler.flush())


def load_audio(path: str | Path, max_duration_s: float | None = MAX_DURATION_S) -> np.ndarray:
    """Read a whole file as 16 kHz mono float32 (downmixed, resampled with soxr HQ), read in blocks
    (:func:`audio_blocks`): only the 16 kHz result is held whole.  Raises :class:`AudioError`."""
    return np.concatenate([np.zeros(0, np.float32), *audio_blocks(path, max_duration_s)])
