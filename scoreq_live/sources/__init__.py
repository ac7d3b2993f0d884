"""Inputs: each turns the outside world into a named stream of 16 kHz mono samples.

``--input`` specs: ``mic``, ``mic:NAME_OR_INDEX``, a file path,
``rtp://HOST:PORT[?codec=...&pt=...]``, an SDP file (``.sdp``) or a packet
capture (``pcap:FILE``), each optionally prefixed with ``NAME=`` to name the
stream (for RTP and captures: the prefix of their streams' names).
"""

from __future__ import annotations

from pathlib import Path

from scoreq_live.sources.base import STREAM_NAME, Normaliser, Source, SourceError, StreamSet
from scoreq_live.sources.device import DeviceSource
from scoreq_live.sources.file import FileSource

__all__ = ["Normaliser", "Source", "SourceError", "StreamSet", "DeviceSource", "FileSource", "parse_input",
           "open_inputs", "Input"]

Input = Source | StreamSet
"""What one ``--input`` opens: one stream, or an input whose streams come and go."""
_INPUTS = "'mic', 'mic:NAME_OR_INDEX', a file, rtp://HOST:PORT, an .sdp file or pcap:FILE"

def parse_input(spec: str) -> tuple[str | None, str]:
    """Split ``NAME=SPEC`` into (name, spec); a bare spec gives (None, spec)."""
    if "=" in spec and not Path(spec).exists():
        name, rest = spec.split("=", 1)
        if STREAM_NAME.match(name) and rest:
            return name, rest
    return None, spec


def make_inputs(spec: str, fast: bool = False, rtp_timeout_s: float | None = None) -> list[Input]:
    """What one ``--input`` spec opens (an SDP file may describe several ports)."""
    name, what = parse_input(spec)
    if what == "mic" or what.startswith("mic:"):
        device = what[4:] if what.startswith("mic:") else None
        return [DeviceSource(name or "mic", device)]
    if what.startswith("rtp:"):
        from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S, RtpPort, parse_rtp_url

        return [RtpPort(parse_rtp_url(what, name), rtp_timeout_s or DEFAULT_TIMEOUT_S)]
    if what.startswith("pcap:"):
        from scoreq_live.sources.pcap import PcapReplay

        return [PcapReplay(Path(what[5:]), name, fast=fast, timeout_s=rtp_timeout_s)]
    path = Path(what)
    if not path.exists():
        raise SourceError(f"--input {spec!r}: no such file (inputs are {_INPUTS})")
    if path.is_dir():
        raise SourceError(f"--input {spec!r} is a folder; use 'scoreq-live score' for folders")
    if path.suffix.lower() == ".sdp":
        from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S, RtpPort, specs_from_sdp

        return [RtpPort(s, rtp_timeout_s or DEFAULT_TIMEOUT_S) for s in specs_from_sdp(path, name)]
    if path.suffix.lower() in (".pcap", ".pcapng"):
        raise SourceError(f"--input {spec!r}: replay a capture with pcap:{what} (or score it with "
                          f"'scoreq-live score {what}')")
    return [FileSource(name or path.stem, path, fast=fast)]


def make_source(spec: str, fast: bool = False) -> Source:
    """The single stream of a ``--input`` spec that opens one (a file or a sound device)."""
    inputs = make_inputs(spec, fast)
    if len(inputs) != 1 or not isinstance(inputs[0], Source):
        raise SourceError(f"--input {spec!r} opens streams as senders appear, not one stream")
    return inputs[0]


def open_inputs(specs: list[str], fast: bool = False, check: bool = True,
                rtp_timeout_s: float | None = None) -> list[Input]:
    """Sources for all ``--input`` flags, with unique stream names.

    With ``check``, each input is opened once up front, so a typo or a missing
    sound card is reported before anything starts; failures after that only
    end their own stream.
    """
    sources: list[Input] = []
    seen: dict[str, int] = {}
    try:
        for spec in specs:
            for src in make_inputs(spec, fast=fast, rtp_timeout_s=rtp_timeout_s):
                base = src.name
                if base in seen:
                    seen[base] += 1
                    src.name = f"{base}-{seen[base]}"
                else:
                    seen[base] = 1
                sources.append(src)
                if check:
                    src.check()
    except BaseException:
        for s in sources:  # ports bound by check() before a later input failed
            if isinstance(s, StreamSet):
                s.close()
        raise
    return sources
