"""Inputs: each turns the outside world into a named stream of 16 kHz mono samples.

``--input`` specs: ``mic``, ``mic:NAME_OR_INDEX``, a file path, each optionally
prefixed with ``NAME=`` to name the stream.
"""

from __future__ import annotations

import re
from pathlib import Path

from scoreq_live.sources.base import Normaliser, Source, SourceError
from scoreq_live.sources.device import DeviceSource
from scoreq_live.sources.file import FileSource

__all__ = ["Normaliser", "Source", "SourceError", "DeviceSource", "FileSource", "parse_input", "open_inputs"]

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def parse_input(spec: str) -> tuple[str | None, str]:
    """Split ``NAME=SPEC`` into (name, spec); a bare spec gives (None, spec)."""
    if "=" in spec and not Path(spec).exists():
        name, rest = spec.split("=", 1)
        if _NAME.match(name) and rest:
            return name, rest
    return None, spec


def make_source(spec: str, fast: bool = False) -> Source:
    """Build the source for one ``--input`` spec."""
    name, what = parse_input(spec)
    if what == "mic" or what.startswith("mic:"):
        device = what[4:] if what.startswith("mic:") else None
        return DeviceSource(name or "mic", device)
    path = Path(what)
    if not path.exists():
        raise SourceError(f"--input {spec!r}: no such file (inputs are 'mic', 'mic:NAME_OR_INDEX' or a file)")
    if path.is_dir():
        raise SourceError(f"--input {spec!r} is a folder; use 'scoreq-live score' for folders")
    return FileSource(name or path.stem, path, fast=fast)


def open_inputs(specs: list[str], fast: bool = False, check: bool = True) -> list[Source]:
    """Sources for all ``--input`` flags, with unique stream names.

    With ``check``, each input is opened once up front, so a typo or a missing
    sound card is reported before anything starts; failures after that only
    end their own stream.
    """
    sources: list[Source] = []
    seen: dict[str, int] = {}
    for spec in specs:
        src = make_source(spec, fast=fast)
        base = src.name
        if base in seen:
            seen[base] += 1
            src.name = f"{base}-{seen[base]}"
        else:
            seen[base] = 1
        if check:
            src.check()
        sources.append(src)
    return sources
