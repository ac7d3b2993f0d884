"""Fetching model files from a Zenodo record, or from a mirror that serves the same paths.

Two steps, both plain HTTP through the standard library:

1. :func:`fetch_record` reads the record API (``BASE/api/records/ID``), which
   lists every file of the record with its size, its checksum (``md5:...``)
   and its download link.
2. :func:`download` fetches one file into ``NAME.part`` beside its final
   place, resuming an interrupted transfer with an HTTP ``Range`` request (in
   the same call after a short back-off, or in a later call), and checks the
   size and the checksum the record publishes.  It never produces the final
   file: the caller checks the model contract and then renames the ``.part``
   file into place, so a half-downloaded or corrupt file is never used.

A mirror (``--mirror URL`` or ``SCOREQ_LIVE_MIRROR``) stands in for
``https://zenodo.org``: it serves ``BASE/api/records/ID`` (a verbatim copy of
Zenodo's JSON will do) and the files; download links that point at
zenodo.org are re-rooted on the mirror, relative links are resolved against
it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoreq_live import __version__
from scoreq_live.errors import ScoreqLiveError

ZENODO = "https://zenodo.org"
ENV_MIRROR = "SCOREQ_LIVE_MIRROR"
CHUNK = 1 << 20
USER_AGENT = f"scoreq-live/{__version__} (+model download)"

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class DownloadError(ScoreqLiveError):
    """A file could not be fetched or verified; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a record, as the record API publishes it."""

    key: str
    size: int
    checksum: str  # "md5:<hex>" (Zenodo publishes md5)
    url: str

    @property
    def algorithm(self) -> str:
        return self.checksum.split(":", 1)[0]

    @property
    def digest(self) -> str:
        return self.checksum.split(":", 1)[1].lower()


@dataclass(frozen=True)
class Record:
    """What a record API answered: its files by name, and the licence it states."""

    id: str
    api_url: str
    files: dict[str, RemoteFile]
    licence: str | None = None


def base_url(mirror: str | None = None) -> str:
    """Where models come from: ``mirror``, else ``$SCOREQ_LIVE_MIRROR``, else zenodo.org."""
    base = mirror or os.environ.get(ENV_MIRROR) or ZENODO
    return base.rstrip("/")


def record_api_url(base: str, record: str) -> str:
    return f"{base.rstrip('/')}/api/records/{record}"


def record_page_url(record: str, key: str | None = None) -> str:
    """The human-facing URL on zenodo.org (for messages: what to fetch by hand)."""
    page = f"{ZENODO}/records/{record}"
    return f"{page}/files/{key}" if key else page


def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        r = e.reason
        return str(r.strerror if isinstance(r, OSError) and r.strerror else r)
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(e) or type(e).__name__


def _file_url(link: str, api_url: str, base: str) -> str:
    url = urllib.parse.urljoin(api_url, link)
    if base != ZENODO:
        # A verbatim copy of Zenodo's JSON names zenodo.org: fetch the same path from the mirror.
        u, z = urllib.parse.urlsplit(url), urllib.parse.urlsplit(ZENODO)
        if (u.scheme, u.netloc) == (z.scheme, z.netloc):
            url = base + u.path + (f"?{u.query}" if u.query else "")
    return url


def _entries(data: dict[str, Any]) -> list[dict[str, Any]]:
    files = data.get("files")
    if isinstance(files, dict):  # InvenioRDM's own layout: {"entries": {key: {...}}} or a list
        files = files.get("entries", [])
        if isinstance(files, dict):
            files = [dict(v, key=v.get("key", k)) for k, v in files.items()]
    if not isinstance(files, list):
        raise ValueError("no 'files' list")
    return files


def fetch_record(record: str, mirror: str | None = None, timeout: float = 20.0) -> Record:
    """Read a record's file list (names, sizes, checksums, links) from its record API."""
    base = base_url(mirror)
    api = record_api_url(base, record)
    try:
        with urllib.request.urlopen(_request(api, {"Accept": "application/json"}), timeout=timeout) as r:
            data = json.loads(r.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot read {api}: {_reason(e)}") from e
    except ValueError as e:
        raise DownloadError(f"{api} did not answer with JSON: {e}") from e
    try:
        files = {}
        for f in _entries(data):
            key = f.get("key") or f.get("filename")
            size = int(f["size"] if "size" in f else f["filesize"])
            checksum = str(f["checksum"])
            if ":" not in checksum:
                checksum = f"md5:{checksum}"  # the legacy API gave a bare md5
            links = f.get("links") or {}
            link = links.get("self") or links.get("content") or links.get("download")
            if not key or not link:
                raise KeyError("key/links")
            files[key] = RemoteFile(key, size, checksum, _file_url(link, api, base))
    except (KeyError, TypeError, ValueError) as e:
        raise DownloadError(f"{api}: unexpected record format ({e})") from e
    lic = (data.get("metadata") or {}).get("license")
    licence = lic.get("id") if isinstance(lic, dict) else lic
    return Record(str(record), api, files, licence if isinstance(licence, str) else None)


def file_digest(path: Path, algorithm: str = "md5", progress: Progress | None = None) -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return h.hexdigest()


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _resume_state(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _resume_state(part).unlink(missing_ok=True)


class _Interrupted(Exception):
    """The transfer stopped early; a retry resumes it."""


def _transfer(remote: RemoteFile, part: Path, progress: Progress | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(_request(remote.url, headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Nothing left to send from here: the server's file is not longer than what we have.
            raise DownloadError(
                f"{remote.url}: the server has no bytes after {have} of the {remote.size} the record lists "
                "(the file there is truncated or changed)") from e
        if e.code >= 500 or e.code in (408, 429):
            raise _Interrupted(_reason(e)) from e
        raise DownloadError(f"{remote.url}: {_reason(e)}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Interrupted(_reason(e)) from e
    with resp:
        if have and resp.status == 206:
            first = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if first != str(have):  # a range we did not ask for: start over rather than splice
                part.unlink(missing_ok=True)
                raise _Interrupted(f"the server answered a range from {first or '?'}, not from {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # 200: the server ignored the range and sends it all
        if progress:
            progress(have, remote.size)
        with open(part, mode) as f:
            try:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    have += len(block)
                    if progress:
                        progress(have, remote.size)
                    if have > remote.size:
                        break
            except (OSError, http.client.HTTPException) as e:
                raise _Interrupted(_reason(e)) from e
    if have < remote.size:
        raise _Interrupted(f"the connection closed after {have} of {remote.size} bytes")


def download(remote: RemoteFile, dest: Path, progress: Progress | None = None, retries: int = 3,
             timeout: float = 30.0, backoff_s: float = 1.0) -> Path:
    """Fetch ``remote`` into ``dest``'s ``.part`` file, resuming, and verify size and checksum.

    Returns the verified ``.part`` path; renaming it into place is the
    caller's (after its own checks).  A transfer that stops early is resumed
    up to ``retries`` times with a growing pause; after that the ``.part``
    file is kept so that running the command again resumes it.  A file of the
    wrong size or checksum is deleted.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    state = _resume_state(part)
    wanted = {"url": remote.url, "size": remote.size, "checksum": remote.checksum}
    try:
        same = json.loads(state.read_text()) == wanted
    except (OSError, ValueError):
        same = False
    if not same:  # a leftover of another file or version must not be resumed
        _discard(part)
        state.write_text(json.dumps(wanted))
    if part.exists() and part.stat().st_size > remote.size:
        _discard(part)
        state.write_text(json.dumps(wanted))
    attempt = 0
    while not (part.exists() and part.stat().st_size == remote.size):
        try:
            _transfer(remote, part, progress, timeout)
        except _Interrupted as e:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DownloadError(
                    f"download of {remote.key} interrupted at {have} of {remote.size} bytes ({e}); "
                    "run the same command again to resume") from None
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 10.0))
            continue
        if part.stat().st_size > remote.size:
            sent = part.stat().st_size
            _discard(part)
            raise DownloadError(f"{remote.url}: the server sent {sent} bytes, the record lists {remote.size}; "
                                "the file was deleted")
    if remote.algorithm not in hashlib.algorithms_available:
        raise DownloadError(f"{remote.key}: unknown checksum algorithm {remote.algorithm!r}")
    got = file_digest(part, remote.algorithm)
    if got != remote.digest:
        _discard(part)
        raise DownloadError(
            f"{remote.key}: checksum mismatch ({remote.algorithm} {got}, the record publishes {remote.digest}); "
            "the downloaded file was deleted")
    _resume_state(part).unlink(missing_ok=True)
    return part
