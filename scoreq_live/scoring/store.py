"""The model store: where downloaded, imported and derived models live, and what vouches for them.

Layout of the model folder (:func:`models_dir`: the user cache, e.g.
``~/.cache/scoreq-live/models`` on Linux; ``SCOREQ_LIVE_MODELS_DIR``
overrides it)::

    adapt_nr_telephone.onnx            a model, under its published file name
    adapt_nr_telephone.onnx.json       its manifest: model name, size, md5 and sha256, where it
                                       came from, what its checksum was checked against, licence, date
    adapt_nr_telephone.int8.onnx       a variant, next to its original ...
    adapt_nr_telephone.int8.onnx.json  ... whose manifest names the original and holds the fidelity report
    adapt_nr_telephone.onnx.part       a download in progress (and .part.json: what it is a part of)
    adapt_nr_telephone.onnx.lock       taken while a process installs that file

A model counts as installed only when its file and its manifest both exist
and agree on the size.  Files reach their final name by an atomic rename,
after the checksum and the model contract were checked, and the manifest is
written after that: a crash at any point leaves either nothing or a ``.part``
file that the next pull resumes, never a file that looks installed but is not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from scoreq_live import __version__
from scoreq_live.scoring.download import (
    DownloadError,
    Progress,
    download,
    fetch_record,
    file_digest,
    part_path,
    record_page_url,
)
from scoreq_live.scoring.spec import ModelError, ModelSpec

ENV_MODELS_DIR = "SCOREQ_LIVE_MODELS_DIR"
APP = "scoreq-live"


@dataclass(frozen=True)
class PublishedFile:
    """A model file published in a Zenodo record."""

    record: str
    key: str  # the file name in the record
    approx_size: int  # bytes, for listing before it is installed

    @property
    def page_url(self) -> str:
        return record_page_url(self.record, self.key)


def models_dir() -> Path:
    """The folder downloaded, imported and derived models live in."""
    env = os.environ.get(ENV_MODELS_DIR)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir(APP)) / "models"


def manifest_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + ".json")


def read_manifest(model_file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(manifest_path(model_file).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_installed(model_file: Path | None) -> bool:
    """The file is in place and its manifest vouches for it (same size)."""
    if model_file is None or not model_file.is_file():
        return False
    m = read_manifest(model_file)
    return m is not None and m.get("size") == model_file.stat().st_size


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Serialise installs of one file across processes (a no-op where flock does not exist)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(target.with_name(target.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def install(staged: Path, dest: Path, manifest: dict[str, Any]) -> Path:
    """Move a verified file into place (atomic rename), then write its manifest."""
    manifest_path(dest).unlink(missing_ok=True)  # never a manifest that vouches for a file being replaced
    os.replace(staged, dest)
    write_json_atomic(manifest_path(dest), {**manifest, "size": dest.stat().st_size})
    _fingerprints.pop(dest, None)
    return dest


def remove(model_file: Path) -> None:
    """Delete a model file and its manifest."""
    manifest_path(model_file).unlink(missing_ok=True)
    model_file.unlink(missing_ok=True)
    _fingerprints.pop(model_file, None)


_fingerprints: dict[Path, tuple[int, int, str]] = {}


def fingerprint(model_file: Path) -> str:
    """The sha256 of a model file: from its manifest when it vouches for the file, else computed once."""
    model_file = Path(model_file).resolve()
    st = model_file.stat()
    m = read_manifest(model_file)
    if m and m.get("size") == st.st_size and isinstance(m.get("sha256"), str):
        return str(m["sha256"])
    cached = _fingerprints.get(model_file)
    if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached[2]
    digest = file_digest(model_file, "sha256")
    _fingerprints[model_file] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def store_path(spec: ModelSpec) -> Path:
    """Where a catalogue model's file lives in the store."""
    if spec.file is None:
        raise ModelError(f"model {spec.name!r} has no file")
    return Path(spec.file)


def check_contract(spec: ModelSpec, path: Path) -> None:
    """Refuse a file that does not fit ``spec``: names, shapes, output size, and one real run."""
    from scoreq_live.scoring.session import OnnxModel

    where = f"{path.name} is not a valid {spec.name} model"
    try:
        model = OnnxModel(spec.with_file(path), device="cpu")
    except ModelError as e:
        raise ModelError(f"{where}: {e}") from e
    if spec.output_dim and model.output_dim and model.output_dim != spec.output_dim:
        raise ModelError(
            f"{where}: it outputs [batch, {model.output_dim}], the contract says [batch, {spec.output_dim}]")
    # One second of faint noise, padded as the contract says: the file must run and answer sensibly.
    x = (0.01 * np.random.default_rng(0).standard_normal(spec.sample_rate)).astype(np.float32)
    batch = np.zeros((1, spec.padded_length(x.size)), np.float32)
    batch[0, : min(x.size, batch.shape[1])] = x[: batch.shape[1]]
    try:
        y = model.run(batch)
    except Exception as e:  # onnxruntime's own error types
        raise ModelError(f"{where}: running it failed: {e}") from e
    want = spec.output_dim or model.output_dim
    if y.ndim != 2 or y.shape[0] != 1 or (want and y.shape[1] != want):
        raise ModelError(f"{where}: it answered shape {list(y.shape)} for one window")
    if not np.all(np.isfinite(y)):
        raise ModelError(f"{where}: it answered NaN/Inf for one window of speech-like noise")
    if spec.l2_normalised and abs(float(np.linalg.norm(y[0])) - 1.0) > 1e-3:
        raise ModelError(f"{where}: its embedding is not L2-normalised (norm {np.linalg.norm(y[0]):.4f})")


class PullError(ModelError):
    """A download failed (unreachable, HTTP error, interrupted, checksum); ``reason`` says why."""

    def __init__(self, spec: ModelSpec, published: PublishedFile, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"cannot download {spec.name}: {reason}. Or fetch {published.page_url} on a machine that can "
            f"reach it and register it here with: scoreq-live models import {spec.name} {published.key}")


def pull(spec: ModelSpec, published: PublishedFile, mirror: str | None = None, progress: Progress | None = None,
         force: bool = False, retries: int = 3, timeout: float = 30.0) -> Path:
    """Download a catalogue model into the store: checksum from the record API, contract check, atomic install.

    Returns the installed path (at once if it is installed already and not
    ``force``).  Raises :class:`ModelError` whose message says what failed
    and, when the source cannot be reached, how to import the file instead.
    """
    dest = store_path(spec)
    with file_lock(dest):
        if is_installed(dest) and not force:
            return dest
        try:
            record = fetch_record(published.record, mirror, timeout=min(timeout, 20.0))
            remote = record.files.get(published.key)
            if remote is None:
                raise DownloadError(f"{record.api_url} lists no file {published.key!r} "
                                    f"(it has: {', '.join(sorted(record.files)) or 'none'})")
            staged = download(remote, dest, progress, retries=retries, timeout=timeout)
        except DownloadError as e:
            raise PullError(spec, published, str(e)) from e
        try:
            check_contract(spec, staged)
        except ModelError:
            staged.unlink(missing_ok=True)
            raise
        return install(staged, dest, {
            "model": spec.name, "file": dest.name, "how": "pull", "source": remote.url,
            "md5": remote.digest if remote.algorithm == "md5" else file_digest(staged, "md5"),
            "sha256": file_digest(staged, "sha256"),
            "checksum_checked_against": f"{remote.checksum} published by {record.api_url}",
            "licence": record.licence, "installed": now_utc(), "scoreq_live": __version__,
        })


def import_file(spec: ModelSpec, published: PublishedFile, src: Path, md5: str | None = None,
                mirror: str | None = None, progress: Progress | None = None, timeout: float = 10.0) -> Path:
    """Register a file fetched elsewhere, verified like a download: published checksum, contract, atomic install.

    The checksum comes from the record API when it can be reached; offline,
    ``md5`` (as zenodo.org shows it beside the file) stands in for it.  When
    both exist they must agree.
    """
    src = Path(src)
    if not src.is_file():
        raise ModelError(f"no such file: {src}")
    expected_size = None
    try:
        record = fetch_record(published.record, mirror, timeout=timeout)
        remote = record.files.get(published.key)
        if remote is None:
            raise DownloadError(f"{record.api_url} lists no file {published.key!r}")
        if remote.algorithm != "md5":
            raise DownloadError(f"{record.api_url} publishes a {remote.algorithm} checksum, not md5")
        if md5 and md5.lower() != remote.digest:
            raise ModelError(f"--md5 {md5} differs from the md5 {remote.digest} that {record.api_url} publishes")
        expected, expected_size, licence = remote.digest, remote.size, record.licence
        against = f"md5:{remote.digest} published by {record.api_url}"
    except DownloadError as e:
        if not md5:
            raise ModelError(
                f"cannot verify {src.name}: the published checksum could not be read ({e}). Give it with "
                f"--md5 HEX (zenodo.org shows it beside {published.key} on {record_page_url(published.record)})"
            ) from e
        expected, licence, against = md5.lower(), None, f"md5:{md5.lower()} given with --md5"
    size = src.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ModelError(f"{src} is {size} bytes, the record lists {expected_size} for {published.key}")
    got = file_digest(src, "md5", progress)
    if got != expected:
        raise ModelError(f"{src}: md5 {got} does not match {against}")
    check_contract(spec, src)
    dest = store_path(spec)
    with file_lock(dest):
        staged = part_path(dest)
        shutil.copyfile(src, staged)
        return install(staged, dest, {
            "model": spec.name, "file": dest.name, "how": "import", "source": f"imported from {src.resolve()}",
            "md5": got, "sha256": file_digest(staged, "sha256"), "checksum_checked_against": against,
            "licence": licence, "installed": now_utc(), "scoreq_live": __version__,
        })


def variant_path(original: Path, variant: str) -> Path:
    """Where a variant of ``original`` lives: the model folder, named after the original."""
    return models_dir() / f"{Path(original).stem}.{variant}.onnx"


def installed_variants() -> list[tuple[Path, dict[str, Any]]]:
    """Every variant in the model folder, with its manifest."""
    root = models_dir()
    out: list[tuple[Path, dict[str, Any]]] = []
    if root.is_dir():
        for m in sorted(root.glob("*.onnx.json")):
            model_file = m.with_name(m.name[: -len(".json")])
            data = read_manifest(model_file)
            if data and data.get("variant_of") and is_installed(model_file):
                out.append((model_file, data))
    return out
