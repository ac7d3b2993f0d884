"""Stored references: clean speech embedded once with one model, reused by name.

``scoreq-live reference add office clean1.wav clean2.wav --model scoreq-natural-ref``
cuts each file into windows exactly as the monitor cuts live audio (same
window, hop and speech gate), embeds every speech window once and stores the
embeddings with what made them.  ``--mode ref --reference office`` then scores
each live window by its distance to them.

How several references combine: the distance of a window is the **mean** of
its Euclidean distances to every stored reference window, of every file.  In
SCOREQ's non-matching-reference mode any clean speech is a valid reference,
so each reference window gives an equally valid estimate of "how far is this
window from clean speech"; the mean keeps that scale and averages out what a
single reference window brings of its own (speaker, phonemes, a breath).
The minimum would reward a test window for happening to resemble one
reference window, and is biased low and noisier the more references there
are; the distance to the mean embedding would leave the unit sphere the
model was trained on (the mean of unit vectors is shorter than one).  Longer
references hold more speech windows and count for more.

Layout (:func:`references_dir`: the user data folder, e.g.
``~/.local/share/scoreq-live/references`` on Linux;
``SCOREQ_LIVE_REFERENCES_DIR`` overrides it)::

    office/reference.json   model, model sha256, embedding size, windowing, files
                            (path, sha256, duration, windows), date
    office/embeddings.npy   [windows, D] float32, the files' speech windows in order

A reference is only used with the model that made it: same name, same file
(sha256).  Anything else is refused, because embeddings of different models
(or of different weights under one name) are not comparable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from scoreq_live import __version__
from scoreq_live.audio import AudioError, load_audio
from scoreq_live.core import SAMPLE_RATE
from scoreq_live.core.stream import StreamConfig, speech_windows
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.download import file_digest
from scoreq_live.scoring.scorer import Model, Reference, run_windows
from scoreq_live.scoring.store import APP, now_utc, write_json_atomic

ENV_REFERENCES_DIR = "SCOREQ_LIVE_REFERENCES_DIR"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FORMAT = 1


class StoredReferenceError(ScoreqLiveError):
    """A reference cannot be made (unreadable audio, no speech) or used (missing, malformed, made with
    another model); the message says why."""


@dataclass(frozen=True)
class EmbeddedFile:
    """One clean speech file, cut into the windows the monitor would score and embedded."""

    path: Path  # as given
    duration_s: float
    embeddings: np.ndarray  # [windows, D] float32; no rows when no window has enough speech

    @property
    def windows(self) -> int:
        return int(self.embeddings.shape[0])


def embed_files(model: Model, paths: Sequence[str | Path], config: StreamConfig) -> Iterator[EmbeddedFile]:
    """Embed clean speech files one by one, windowed and speech-gated exactly as live audio is.

    The one embedding path of references: stored ones (:meth:`ReferenceStore.add`) and ones made
    from files at start-up (:func:`build_reference`).  Raises :class:`StoredReferenceError` for a
    file that cannot be read.
    """
    for p in map(Path, paths):
        try:
            audio = load_audio(p)
        except AudioError as e:
            raise StoredReferenceError(str(e)) from e
        windows = speech_windows(audio, config)
        emb = run_windows(model, windows) if windows else np.zeros((0, 0), np.float32)
        yield EmbeddedFile(p, audio.size / SAMPLE_RATE, emb.astype(np.float32, copy=False))


def build_reference(model: Model, paths: Sequence[str | Path], config: StreamConfig) -> Reference:
    """Embed clean reference speech once, windowed exactly as live audio is.

    Files without a window with enough speech add nothing; raises :class:`StoredReferenceError`
    when none of them has one, or when one cannot be read.
    """
    embs = [f.embeddings for f in embed_files(model, paths, config) if f.windows]
    if not embs:
        raise StoredReferenceError("the reference has no window with enough speech; give clean speech")
    return Reference(np.concatenate(embs), model.spec.name, [str(p) for p in paths])


def references_dir() -> Path:
    """The folder stored references live in."""
    env = os.environ.get(ENV_REFERENCES_DIR)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP)) / "references"


@dataclass
class StoredReference:
    """One stored reference: its metadata, and its embeddings on demand."""

    name: str
    model: str
    model_sha256: str
    dim: int
    window_s: float
    hop_s: float
    min_speech: float
    vad: int
    files: list[dict[str, Any]] = field(default_factory=list)  # path, sha256, duration_s, windows
    created: str = ""
    scoreq_live: str = __version__
    format: int = FORMAT
    folder: Path | None = None

    @property
    def windows(self) -> int:
        return sum(int(f["windows"]) for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("folder")
        return d

    def embeddings(self) -> np.ndarray:
        """The ``[windows, D]`` embeddings, checked against the metadata."""
        if self.folder is None:
            raise StoredReferenceError(f"reference {self.name!r} is not stored yet")
        path = self.folder / "embeddings.npy"
        try:
            emb = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoredReferenceError(f"reference {self.name!r}: cannot read {path}: {e}") from e
        if emb.ndim != 2 or emb.shape != (self.windows, self.dim) or not np.all(np.isfinite(emb)):
            raise StoredReferenceError(f"reference {self.name!r}: {path} holds {list(emb.shape)}, "
                                       f"the metadata says [{self.windows}, {self.dim}]; make it again")
        return emb.astype(np.float32, copy=False)

    def check_model(self, model: str, sha256: str, dim: int | None) -> None:
        """Refuse to compare these embeddings with another model's (or another file's)."""
        files = " ".join(f["path"] for f in self.files)
        if model != self.model:
            raise StoredReferenceError(
                f"reference {self.name!r} was made with model {self.model!r}; it cannot be used with {model!r} "
                f"(embeddings of different models are not comparable). Use --model {self.model}, or make one for "
                f"{model}: scoreq-live reference add NAME {files} --model {model}")
        if sha256 != self.model_sha256:
            raise StoredReferenceError(
                f"reference {self.name!r} was made with another file of model {model!r} (sha256 "
                f"{self.model_sha256[:12]}..., installed now: {sha256[:12]}...); make it again: "
                f"scoreq-live reference add {self.name} {files} --model {model} --force")
        if dim is not None and dim != self.dim:
            raise StoredReferenceError(
                f"reference {self.name!r} holds {self.dim}-d embeddings, {model!r} makes {dim}-d ones")

    def to_reference(self) -> Reference:
        return Reference(self.embeddings(), self.model, [f["path"] for f in self.files])


class ReferenceStore:
    """The stored references in one folder."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else references_dir()

    def folder(self, name: str) -> Path:
        if not NAME_RE.match(name or ""):
            raise StoredReferenceError(f"bad reference name {name!r}: use letters, digits, '.', '_', '-' (up to 64)")
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name) and (p / "reference.json").is_file())

    def exists(self, name: str) -> bool:
        return NAME_RE.match(name or "") is not None and (self.root / name / "reference.json").is_file()

    def get(self, name: str) -> StoredReference:
        folder = self.folder(name)
        meta = folder / "reference.json"
        if not meta.is_file():
            have = ", ".join(self.names()) or "none"
            raise StoredReferenceError(
                f"no stored reference {name!r} (stored: {have}; see 'scoreq-live reference list')")
        try:
            data = json.loads(meta.read_text())
            known = set(StoredReference.__dataclass_fields__) - {"folder"}
            return StoredReference(**{k: v for k, v in data.items() if k in known}, folder=folder)
        except (OSError, ValueError, TypeError) as e:
            raise StoredReferenceError(f"reference {name!r}: unreadable metadata {meta}: {e}") from e

    def list(self) -> list[StoredReference]:
        return [self.get(n) for n in self.names()]

    def remove(self, name: str) -> None:
        folder = self.folder(name)
        if not (folder / "reference.json").is_file():
            raise StoredReferenceError(f"no stored reference {name!r}")
        shutil.rmtree(folder)

    def add(self, name: str, files: Sequence[str | Path], model: Model, config: StreamConfig, model_sha256: str,
            replace: bool = False) -> StoredReference:
        """Embed clean files once (windowed as live audio is) and store them under ``name``."""
        folder = self.folder(name)
        if (folder / "reference.json").is_file() and not replace:
            old = self.get(name)
            raise StoredReferenceError(f"reference {name!r} exists (made with {old.model} on {old.created}); "
                                       "give --force to replace it")
        spec = model.spec
        if spec.kind != "embedding":
            raise StoredReferenceError(f"model {spec.name!r} predicts a MOS; a reference needs an embedding model "
                                       "(e.g. scoreq-natural-ref)")
        if not files:
            raise StoredReferenceError("give at least one clean speech file")
        embs: list[np.ndarray] = []
        info: list[dict[str, Any]] = []
        for f in embed_files(model, files, config):
            if not f.windows:
                raise StoredReferenceError(f"{f.path}: no window with enough speech ({config.min_speech:.0%} of "
                                           f"{config.window_s:g} s); a reference must be clean speech")
            embs.append(f.embeddings)
            info.append({"path": str(f.path.resolve()), "sha256": file_digest(f.path, "sha256"),
                         "duration_s": round(f.duration_s, 3), "windows": f.windows})
        emb = np.concatenate(embs).astype(np.float32)
        ref = StoredReference(name=name, model=spec.name, model_sha256=model_sha256, dim=int(emb.shape[1]),
                              window_s=config.window_s, hop_s=config.hop_s, min_speech=config.min_speech,
                              vad=config.vad_aggressiveness, files=info, created=now_utc())
        # Written beside the final folder and renamed into place: a reader never sees half a reference.
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", emb, allow_pickle=False)
        write_json_atomic(tmp / "reference.json", ref.to_dict())
        replaced: Path | None = None
        if folder.exists():
            replaced = self.root / f".{name}.old{os.getpid()}"
            os.replace(folder, replaced)
        os.replace(tmp, folder)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        ref.folder = folder
        return ref


def combine(references: Sequence[Reference], model: str) -> Reference:
    """One reference from several (stored ones and files): every window of each counts once."""
    if len(references) == 1:
        return references[0]
    emb = np.concatenate([r.embeddings for r in references])
    return Reference(emb, model, [s for r in references for s in r.sources])
