"""Offline scoring of files, folders and list files, through the same stream core as the monitor."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scoreq_live.audio import AudioError, load_audio
from scoreq_live.core.events import Mode, ScoreEvent
from scoreq_live.core.stream import StreamConfig, StreamCore
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.scorer import Scorer

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
LIST_EXTENSIONS = {".txt", ".lst", ".list", ".scp"}


class InputError(ScoreqLiveError):
    """A path given to 'score' does not exist."""


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for audio, list files read (one path per line).

    Paths in a list file are relative to the list file; blank lines and ``#`` comments are skipped.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS))
        elif p.suffix.lower() in LIST_EXTENSIONS and p.is_file():
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    out.append(q if q.is_absolute() else p.parent / q)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"no such file or folder: {p}")
    return out


@dataclass
class FileResult:
    file: str
    mode: Mode
    value: float | None = None
    windows: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        key = "mos" if self.mode == "nr" else "distance"
        d: dict[str, Any] = {"file": self.file, key: None if self.value is None else round(self.value, 5),
             "duration_s": round(self.duration_s, 3), "windows": self.windows}
        if self.error:
            d["error"] = self.error
        return d


def window_results(audio: np.ndarray, scorer: Scorer, config: StreamConfig, name: str = "file") -> list[ScoreEvent]:
    """Score a whole signal as the monitor would see it; return its score events."""
    core = StreamCore(name, config)
    windows = core.feed(audio, 0.0) + core.finish(0.0)
    values = scorer.score([w.audio for w in windows])
    for w, v in zip(windows, values):
        core.resolve(w, float(v))
    return core.drain(0.0, 0.0)


def score_file(path: Path, scorer: Scorer, config: StreamConfig) -> FileResult:
    """The per-window timeline of a file and its whole-file score (mean of the scored windows)."""
    res = FileResult(str(path), scorer.mode)
    try:
        audio = load_audio(path)
    except AudioError as e:
        res.error = str(e)
        return res
    res.duration_s = audio.size / 16000
    events = window_results(audio, scorer, config, path.stem)
    key = "mos" if scorer.mode == "nr" else "distance"
    scored: list[float] = []
    for ev in events:
        v = ev.value
        res.windows.append({"t_start": round(ev.t_start, 4), "t_end": round(ev.t_end, 4),
                            key: None if v is None else round(v, 5), "speech": round(ev.speech, 3),
                            "level_dbfs": round(ev.level_dbfs, 1), "reason": ev.reason})
        if v is not None:
            scored.append(v)
    res.value = float(np.mean(scored)) if scored else None
    if not scored:
        res.error = "no window with enough speech to score"
    return res


def write_csv(results: Sequence[FileResult], path: str) -> None:
    key = "mos" if (results and results[0].mode == "nr") else "distance"
    with (open(path, "w", newline="") if path != "-" else contextlib.nullcontext(sys.stdout)) as f:
        w = csv.writer(f)
        w.writerow(["file", key, "duration_s", "windows", "scored_windows", "error"])
        for r in results:
            n = sum(1 for x in r.windows if x.get(key) is not None)
            w.writerow([r.file, "" if r.value is None else f"{r.value:.5f}", f"{r.duration_s:.3f}",
                        len(r.windows), n, r.error or ""])


def write_json(results: Sequence[FileResult], path: str) -> None:
    text = json.dumps([r.to_dict() for r in results], indent=1)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
