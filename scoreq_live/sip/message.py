"""SIP messages (RFC 3261) from bytes: the start line, the headers a monitor needs, the body.  Sans-I/O.

:func:`parse` takes one message (a UDP datagram, or one message cut from a TCP
stream by :func:`split_stream`) and returns a :class:`SipMessage` or raises
:class:`SipError` saying what is wrong.  Compact header forms (``i``, ``f``,
``t``, ``m``, ``c``, ``l``, ``v``) are read as their long names; folded lines
are unfolded; a message longer than :data:`MAX_MESSAGE` is refused.  Only
what call monitoring needs is interpreted (method or status, Call-ID, CSeq,
From/To with their tags and user parts, Content-Type, the body); every
header is kept, by lower-case name, for the rest.

Hand-written rather than a library: the SIP parsers on PyPI are unmaintained
or part of a full stack; SIP's message syntax is HTTP's, and the few rules
that matter here are below, each with its test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_MESSAGE = 64 * 1024  # a SIP message with an SDP is a few kB; SIPREC metadata adds a few more
MAX_HEADERS = 200

COMPACT = {"i": "call-id", "f": "from", "t": "to", "m": "contact", "c": "content-type", "l": "content-length",
           "v": "via", "k": "supported", "s": "subject", "e": "content-encoding", "o": "event", "r": "refer-to"}

METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
                     "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH"})

_REQUEST = re.compile(r"^([A-Z]{2,16}) (\S{1,2048}) SIP/2\.0$")
_STATUS = re.compile(r"^SIP/2\.0 ([1-6]\d\d)(?: (.*))?$")
_USER = re.compile(r"<?\s*(?:sips?|tel):([^@;>\s]+)(?:@([^;>\s]+))?", re.IGNORECASE)
_TAG = re.compile(r";\s*tag=([^;\s>]+)", re.IGNORECASE)
_NAME = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"|^\s*([^<"]+?)\s*<')


class SipError(ValueError):
    """Not a SIP message, or one that cannot be used; the message says why."""


@dataclass(frozen=True)
class Party:
    """A From or To header: the display name, the user part of its URI, its host, its tag."""

    user: str = ""
    host: str = ""
    name: str = ""
    tag: str = ""

    @property
    def aor(self) -> str:
        """``user@host`` (or what of it there is)."""
        return f"{self.user}@{self.host}" if self.user and self.host else self.user or self.host


def party(value: str) -> Party:
    m = _USER.search(value)
    n = _NAME.search(value)
    t = _TAG.search(value.split(">", 1)[-1] if ">" in value else value)
    name = (n.group(1) or n.group(2) or "").strip() if n else ""
    return Party(user=(m.group(1) if m else "")[:128], host=(m.group(2) or "" if m else "")[:255],
                 name=name[:128], tag=(t.group(1) if t else "")[:128])


@dataclass(frozen=True)
class SipMessage:
    """One parsed message; ``method`` is "" for a response, ``status`` 0 for a request."""

    method: str
    uri: str
    status: int
    reason: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return self.status == 0

    def header(self, name: str) -> str:
        """The first value of a header (by its long name, any case), or ""."""
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    @property
    def call_id(self) -> str:
        return self.header("call-id")

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method) of the CSeq header; (0, "") when it cannot be read."""
        parts = self.header("cseq").split()
        if len(parts) == 2 and parts[0].isdigit() and len(parts[0]) <= 10:
            return int(parts[0]), parts[1].upper()
        return 0, ""

    @property
    def from_(self) -> Party:
        return party(self.header("from"))

    @property
    def to(self) -> Party:
        return party(self.header("to"))

    @property
    def content_type(self) -> str:
        return self.header("content-type").split(";", 1)[0].strip().lower()

    def param(self, header: str, name: str) -> str:
        """A parameter of a header's value (``boundary`` of Content-Type), unquoted; ""."""
        for part in self.header(header).split(";")[1:]:
            k, sep, v = part.partition("=")
            if sep and k.strip().lower() == name:
                return v.strip().strip('"')
        return ""


def looks_like_sip(data: bytes) -> bool:
    """Whether a datagram starts like a SIP request or response (cheap: for every packet of a capture)."""
    if data[:8] == b"SIP/2.0 ":
        return True
    sp = data.find(b" ", 0, 17)
    return sp > 1 and data[:sp].decode("ascii", "replace") in METHODS and b" SIP/2.0\r\n" in data[:2100]


def parse(data: bytes) -> SipMessage:
    """One SIP message; raises :class:`SipError`."""
    if len(data) > MAX_MESSAGE:
        raise SipError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
    end = data.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end = data.find(b"\n\n")
        sep = 2
    if end < 0:
        head, body = data, b""
    else:
        head, body = data[:end], data[end + sep:]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipError("the headers are not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    first = lines[0].strip()
    method = uri = reason = ""
    status = 0
    if m := _REQUEST.match(first):
        method, uri = m.group(1), m.group(2)
    elif m := _STATUS.match(first):
        status, reason = int(m.group(1)), (m.group(2) or "")[:200]
    else:
        raise SipError(f"not a SIP start line: {first[:60]!r}")
    headers: dict[str, list[str]] = {}
    count = 0
    last = ""
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":  # folded onto the previous header
            if last:
                headers[last][-1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name:
            raise SipError(f"not a header line: {line[:60]!r}")
        count += 1
        if count > MAX_HEADERS:
            raise SipError(f"more than {MAX_HEADERS} headers")
        name = COMPACT.get(name, name)
        # Via, Contact, Route... may list several values in one line; the monitor reads the first of each
        headers.setdefault(name, []).append(value.strip())
        last = name
    for required in ("call-id", "cseq", "from", "to"):
        if required not in headers:
            raise SipError(f"no {required.title()} header")
    length = headers.get("content-length")
    if length:
        text_len = length[0].strip()
        if not text_len.isdigit() or len(text_len) > 6:
            raise SipError(f"Content-Length {text_len[:20]!r} is not a number")
        n = int(text_len)
        if n > len(body):
            raise SipError(f"a body of {len(body)} bytes where Content-Length says {n}")
        body = body[:n]
    return SipMessage(method, uri, status, reason, headers, body)


def split_stream(buffer: bytearray) -> list[bytes]:
    """Whole messages at the start of a TCP stream's bytes, taken out of ``buffer`` (keep-alive CRLFs dropped).

    Raises :class:`SipError` when the buffer cannot hold a message (no end of headers within
    :data:`MAX_MESSAGE`, or a Content-Length that is not a number): the stream cannot be followed.
    """
    out: list[bytes] = []
    while True:
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_MESSAGE:
                raise SipError(f"no end of headers in {len(buffer)} bytes")
            return out
        head = bytes(buffer[:end])
        m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d{1,6})[ \t]*$", head)
        if m is None:
            raise SipError("a message on a stream without Content-Length")
        total = end + 4 + int(m.group(1))
        if total > MAX_MESSAGE:
            raise SipError(f"a message of {total} bytes (at most {MAX_MESSAGE})")
        if len(buffer) < total:
            return out
        out.append(bytes(buffer[:total]))
        del buffer[:total]
