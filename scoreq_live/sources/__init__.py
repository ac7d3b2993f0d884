"""Inputs: each turns the outside world into a named stream of 16 kHz mono samples.

``--input`` specs: ``mic``, ``mic:NAME_OR_INDEX``, a file path,
``rtp://HOST:PORT[?codec=...&pt=...]``, an SDP file (``.sdp``) or a packet
capture (``pcap:FILE``), each optionally prefixed with ``NAME=`` to name the
stream (for RTP and captures: the prefix of their streams' names).

Every way in is one row of :data:`SCHEMES`: how a spec is recognised (a
``PREFIX:`` such as ``rtp:``, a file suffix such as ``.sdp``, or any other
file) and what it opens.  Endpoints, which wait for publishers instead of
being named by an ``--input`` (WHIP, media websockets), are rows too, marked
``endpoint``; :func:`open_endpoints` opens them.  A new way in (a live
capture, SIP) is a new row and its opener.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scoreq_live.files import special_kind
from scoreq_live.sources.base import STREAM_NAME, Normaliser, Source, SourceError, StreamSet
from scoreq_live.sources.device import DeviceSource
from scoreq_live.sources.file import FILES_ONLY, FileSource

__all__ = ["Normaliser", "Source", "SourceError", "StreamSet", "DeviceSource", "FileSource", "parse_input",
           "open_inputs", "open_endpoints", "Input", "InputOptions", "InputScheme", "Opening", "SCHEMES"]

Input = Source | StreamSet
"""What one ``--input`` opens: one stream, or an input whose streams come and go."""


@dataclass(frozen=True)
class InputOptions:
    """What opening an input may take besides its spec: the settings every input shares.

    ``timeout_s``: a sender (RTP, WebRTC, media websocket) silent this long has ended (None: the default);
    ``fast``: files and captures play as fast as scoring allows.  The endpoints' own: ``ice_hosts`` and
    ``stun`` for WebRTC candidates, ``max_sessions`` publishers at once (each checked by the caller).
    """

    fast: bool = False
    timeout_s: float | None = None
    ice_hosts: Sequence[str] = ()
    stun: Sequence[str] = ()
    max_sessions: int = 64
    max_calls: int = 10_000  # SIP calls a live capture follows at once (sniff:)

    @property
    def sender_timeout_s(self) -> float:
        """``timeout_s``, or the default when it is not given."""
        from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S

        return self.timeout_s or DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Opening:
    """One spec being opened: ``spec`` as given (for messages), ``name`` from ``NAME=``, ``what`` the rest,
    ``arg`` what follows a scheme's ``PREFIX:`` (None for the bare prefix and for files)."""

    spec: str
    name: str | None
    what: str
    arg: str | None
    options: InputOptions

    @property
    def path(self) -> Path:
        return Path(self.what if self.arg is None else self.arg)


@dataclass(frozen=True)
class InputScheme:
    """One way in: how its specs are recognised and what opens them.

    Recognised by ``prefix`` (``PREFIX:...``, and the bare ``PREFIX`` too when ``bare``), else, for an
    existing file, by one of ``suffixes``; a row with neither takes every other file.  ``endpoint``: not
    an ``--input`` but an endpoint that waits for publishers, opened by :func:`open_endpoints`.  ``usage``
    is how it is written in the list of inputs that errors give (empty: not listed).
    """

    name: str
    opens: Callable[[Opening], list[Input]]
    usage: str = ""
    prefix: str | None = None
    bare: bool = False
    suffixes: tuple[str, ...] = ()
    endpoint: bool = False

    def matches(self, what: str) -> bool:
        """Whether ``what`` (a spec without ``NAME=``) is this prefix row's."""
        if self.prefix is None:
            return False
        return what.startswith(self.prefix + ":") or self.bare and what == self.prefix

    def arg(self, what: str) -> str | None:
        """What follows ``PREFIX:`` in a spec this row :meth:`matches` (None for the bare prefix)."""
        return what[len(self.prefix) + 1:] if self.prefix is not None and what != self.prefix else None


# -- openers (imported when used: RTP, captures and WebRTC are optional weight) -------------------------


def _mic(o: Opening) -> list[Input]:
    return [DeviceSource(o.name or "mic", o.arg)]


def _file(o: Opening) -> list[Input]:
    return [FileSource(o.name or o.path.stem, o.path, fast=o.options.fast)]


def _rtp(o: Opening) -> list[Input]:
    from scoreq_live.sources.rtp import RtpPort, parse_rtp_url

    return [RtpPort(parse_rtp_url(o.what, o.name), o.options.sender_timeout_s)]


def _sdp(o: Opening) -> list[Input]:
    from scoreq_live.sources.rtp import RtpPort, specs_from_sdp

    return [RtpPort(s, o.options.sender_timeout_s) for s in specs_from_sdp(o.path, o.name)]


def _sniff(o: Opening) -> list[Input]:
    from scoreq_live.sources.sniff import open_sniff

    return [open_sniff(o.arg or "", o.name, o.options.sender_timeout_s, o.options.max_calls)]


def _pcap(o: Opening) -> list[Input]:
    from scoreq_live.sources.pcap import PcapReplay

    return [PcapReplay(o.path, o.name, fast=o.options.fast, timeout_s=o.options.sender_timeout_s)]


def _capture_file(o: Opening) -> list[Input]:
    raise SourceError(f"--input {o.spec!r}: replay a capture with pcap:{o.what} (or score it with "
                      f"'scoreq-live score {o.what}')")


def _whip(o: Opening) -> list[Input]:
    from scoreq_live.ingest.whip import WhipIngest, WhipSettings

    opts = o.options
    return [WhipIngest(WhipSettings(ice_hosts=tuple(opts.ice_hosts), stun=tuple(opts.stun),
                                    max_sessions=opts.max_sessions, timeout_s=opts.sender_timeout_s))]


def _media(o: Opening) -> list[Input]:
    from scoreq_live.ingest.media import MediaIngest

    return [MediaIngest(timeout_s=o.options.sender_timeout_s, max_sessions=o.options.max_sessions)]


SCHEMES: tuple[InputScheme, ...] = (
    InputScheme("mic", _mic, "'mic', 'mic:NAME_OR_INDEX'", prefix="mic", bare=True),
    InputScheme("file", _file, "a file"),
    InputScheme("rtp", _rtp, "rtp://HOST:PORT", prefix="rtp"),
    InputScheme("sdp", _sdp, "an .sdp file", suffixes=(".sdp",)),
    InputScheme("capture file", _capture_file, suffixes=(".pcap", ".pcapng")),  # says to use pcap:
    InputScheme("pcap", _pcap, "pcap:FILE", prefix="pcap"),
    InputScheme("sniff", _sniff, "sniff:IFACE (live capture of SIP and RTP)", prefix="sniff"),
    InputScheme("whip", _whip, "POST /whip (WebRTC publishers)", endpoint=True),
    InputScheme("media", _media, "GET /media (media-stream websockets)", endpoint=True),
)
"""Every way in.  Prefix rows are tried in order, then an existing file's suffix, then the plain file row."""


def _usage(schemes: Sequence[InputScheme]) -> str:
    """``'a', b, c or d``: how the inputs are written, in table order."""
    forms = [s.usage for s in schemes if s.usage and not s.endpoint]
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"


def parse_input(spec: str) -> tuple[str | None, str]:
    """Split ``NAME=SPEC`` into (name, spec); a bare spec gives (None, spec)."""
    if "=" in spec and not Path(spec).exists():
        name, rest = spec.split("=", 1)
        if STREAM_NAME.match(name) and rest:
            return name, rest
    return None, spec


def make_inputs(spec: str, fast: bool = False, rtp_timeout_s: float | None = None,
                options: InputOptions | None = None) -> list[Input]:
    """What one ``--input`` spec opens (an SDP file may describe several ports); ``options`` replaces
    ``fast`` and ``rtp_timeout_s``."""
    opts = options or InputOptions(fast=fast, timeout_s=rtp_timeout_s)
    name, what = parse_input(spec)
    inputs = [s for s in SCHEMES if not s.endpoint]
    for scheme in inputs:
        if scheme.matches(what):
            return scheme.opens(Opening(spec, name, what, scheme.arg(what), opts))
    path = Path(what)
    if not path.exists():
        raise SourceError(f"--input {spec!r}: no such file (inputs are {_usage(inputs)})")
    if path.is_dir():
        raise SourceError(f"--input {spec!r} is a folder; use 'scoreq-live score' for folders")
    suffix = path.suffix.lower()
    by_suffix = [s for s in inputs if suffix in s.suffixes]
    plain = [s for s in inputs if s.prefix is None and not s.suffixes]
    kind = None if by_suffix else special_kind(path)  # an SDP's own reader says what an SDP must be
    if kind is not None:  # a FIFO would block the start, a device never ends
        raise SourceError(f"--input {spec!r} is {kind}, not a regular file; {FILES_ONLY}")
    return (by_suffix or plain)[0].opens(Opening(spec, name, what, None, opts))


def make_source(spec: str, fast: bool = False) -> Source:
    """The single stream of a ``--input`` spec that opens one (a file or a sound device)."""
    inputs = make_inputs(spec, fast)
    if len(inputs) != 1 or not isinstance(inputs[0], Source):
        raise SourceError(f"--input {spec!r} opens streams as senders appear, not one stream")
    return inputs[0]


def open_inputs(specs: list[str], fast: bool = False, check: bool = True,
                rtp_timeout_s: float | None = None, options: InputOptions | None = None) -> list[Input]:
    """Sources for all ``--input`` flags, with unique stream names.

    With ``check``, each input is opened once up front, so a typo or a missing
    sound card is reported before anything starts; failures after that only
    end their own stream.
    """
    opts = options or InputOptions(fast=fast, timeout_s=rtp_timeout_s)
    sources: list[Input] = []
    seen: dict[str, int] = {}
    try:
        for spec in specs:
            for src in make_inputs(spec, options=opts):
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


def open_endpoints(options: InputOptions | None = None) -> list[StreamSet]:
    """The endpoint rows of :data:`SCHEMES`, opened: each a stream set whose streams are its publishers."""
    opts = options or InputOptions()
    out: list[StreamSet] = []
    for scheme in SCHEMES:
        if scheme.endpoint:
            out += [i for i in scheme.opens(Opening(scheme.name, None, scheme.name, None, opts))
                    if isinstance(i, StreamSet)]
    return out
