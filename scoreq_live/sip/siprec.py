"""``--siprec HOST:PORT``: a SIPREC recording server (RFC 7865/7866) that scores what SBCs and PBXs fork to it.

A session recording client (an SBC, a PBX: OpenSIPS' ``siprec`` module,
FreeSWITCH, Cisco CUBE, ...) sends an INVITE with ``Require: siprec`` and a
``multipart/mixed`` body: an SDP offering one ``m=audio`` per forked stream
(each with an ``a=label``), and ``application/rs-metadata+xml`` naming the
participants and which labelled stream each one sends.  The server answers
200 OK with an SDP that gives each stream a port of ``--rtp-ports`` (receive
only), scores each as a stream named after its participant, and ends them
with the BYE.  OPTIONS (keep-alives) get 200; a re-INVITE gets the same
answer (the ports stay).  Refusals, each with its reason phrase: a source
address outside ``--siprec-allow`` (default loopback) gets 403; an INVITE
that is not SIPREC gets 488 (unless ``--siprec-accept-plain``: an ordinary
call to the monitor is scored as one stream, a "call this number to test
your line" service); unreadable metadata 400; no audio that can be decoded
488; no free ports or too many sessions 503.  Malformed messages are dropped
and counted.

:class:`Siprec` is the sans-I/O part (a request and its source address in,
the answer and what to do out); :class:`SiprecServer` is the input: its UDP
and TCP listeners, the RTP ports of each session (:class:`RtpPort`), and the
streams, named ``NAME-PARTICIPANT-XXXX`` with the recording session's
Call-ID as their call key, so both sides of the recorded call make one call
record.  Metadata is parsed with ``defusedxml`` (an XML body from the
network must not expand entities or reach out).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from scoreq_live.errors import ConfigError
from scoreq_live.rtp.codecs import CodecError, parse_sdp
from scoreq_live.sip.message import SipError, SipMessage, parse, split_stream
from scoreq_live.sources.base import Source, StreamSet
from scoreq_live.sources.rtp import RtpPort, RtpSpec

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
RS_NS = "urn:ietf:params:xml:ns:recording:1"
MAX_SESSIONS = 256
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")
_SAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


@dataclass(frozen=True)
class SiprecOptions:
    listen: str  # HOST:PORT (UDP and TCP)
    rtp_ports: tuple[int, int] = (20000, 20999)
    allow: Sequence[str] = DEFAULT_ALLOW
    accept_plain: bool = False
    max_sessions: int = MAX_SESSIONS
    name: str = "siprec"


def parse_port_range(text: str) -> tuple[int, int]:
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s if sep else lo_s)
    except ValueError:
        raise ConfigError(f"--rtp-ports {text!r}: expected LO-HI, e.g. 20000-20999") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ConfigError(f"--rtp-ports {text!r}: ports 1024-65535, LO <= HI")
    return lo, hi


@dataclass(frozen=True)
class Participant:
    id: str
    name: str
    aor: str

    @property
    def label(self) -> str:
        """A short readable name for streams: the display name, else the AoR's user part."""
        user = self.aor.split(":", 1)[-1].split("@", 1)[0] if self.aor else ""
        return _SAFE.sub("_", self.name or user or self.id)[:24].strip("_") or "participant"


def parse_metadata(xml: bytes) -> dict[str, Participant]:
    """Who sends each labelled stream (``a=label`` value -> participant), from rs-metadata; ValueError."""
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    try:
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, DefusedXmlException) as e:
        raise ValueError(f"the recording metadata is not usable XML: {e}") from None
    ns = {"rs": RS_NS}
    if root.tag != f"{{{RS_NS}}}recording":
        raise ValueError("the recording metadata's root is not <recording> of urn:ietf:params:xml:ns:recording:1")
    people: dict[str, Participant] = {}
    for p in root.findall("rs:participant", ns):
        pid = p.get("participant_id") or p.get("id") or ""
        name_id = p.find("rs:nameID", ns)
        aor = name_id.get("aor", "") if name_id is not None else ""
        name_el = name_id.find("rs:name", ns) if name_id is not None else None
        name = (name_el.text or "").strip() if name_el is not None else ""
        if pid:
            people[pid] = Participant(pid, name[:64], aor[:256])
    labels: dict[str, str] = {}  # stream_id -> label
    for s in root.findall("rs:stream", ns):
        label = s.find("rs:label", ns)
        sid = s.get("stream_id") or s.get("id") or ""
        if sid and label is not None and label.text:
            labels[sid] = label.text.strip()
    out: dict[str, Participant] = {}
    for assoc in root.findall("rs:participantstreamassoc", ns):
        person = people.get(assoc.get("participant_id") or "")
        if person is None:
            continue
        for send in assoc.findall("rs:send", ns):
            sent = labels.get((send.text or "").strip())
            if sent is not None:
                out[sent] = person
    if not people:
        raise ValueError("the recording metadata names no participant")
    return out


@dataclass(frozen=True)
class Offered:
    """One offered ``m=audio``: its label, payload types and codec lines (what the answer takes)."""

    label: str
    pts: list[int]
    rtpmaps: list[str]


def offered_media(sdp: str) -> list[Offered]:
    """The ``m=audio`` sections of an offer, in order, with their labels; CodecError without usable audio."""
    parse_sdp(sdp)  # raises CodecError when no audio stream can be used
    out: list[Offered] = []
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        lines = [line.strip() for line in section.splitlines()]
        m = lines[0].split()
        if len(m) < 4 or m[0] != "m=audio" or m[1] == "0":
            continue
        label = next((line[8:] for line in lines if line.startswith("a=label:")), str(len(out) + 1))
        pts = [int(p) for p in m[3:] if p.isdigit()]
        rtpmaps = [line for line in lines if line.startswith(("a=rtpmap:", "a=fmtp:"))]
        out.append(Offered(label[:64], pts, rtpmaps))
    return out


def response(req: SipMessage, status: int, reason: str, *, to_tag: str = "", contact: str = "",
             body: bytes = b"", ctype: str = "", extra: Sequence[str] = ()) -> bytes:
    """A response to ``req``: its Via, From, Call-ID and CSeq, its To with ``to_tag`` added."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in req.headers.get("via", [])]
    to = req.header("to")
    if to_tag and "tag=" not in to.lower():
        to += f";tag={to_tag}"
    lines += [f"From: {req.header('from')}", f"To: {to}", f"Call-ID: {req.call_id}", f"CSeq: {req.header('cseq')}"]
    if contact:
        lines.append(f"Contact: {contact}")
    lines += ["Server: scoreq-live", *extra]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _parts(msg: SipMessage) -> dict[str, bytes]:
    """A multipart/mixed body's parts by content type (the first of each)."""
    boundary = msg.param("content-type", "boundary")
    out: dict[str, bytes] = {}
    if not boundary:
        return out
    for part in msg.body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, sep, body = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            continue
        ctype = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-type":
                ctype = v.split(";", 1)[0].strip().lower()
        out.setdefault(ctype, body.rstrip(b"\r\n"))
    return out


@dataclass
class Session:
    """A recording session: the streams of one recorded call."""

    call_id: str
    to_tag: str
    media: list[tuple[Offered, Participant | None, int]]  # offered stream, who sends it, our port for it
    answer: bytes  # the 200 OK's SDP (sent again for a re-INVITE)
    ports: list[RtpPort] = field(default_factory=list)  # receiving it, a port per stream
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def short(self) -> str:
        return hashlib.sha1(self.call_id.encode()).hexdigest()[:4]


class SiprecServer(StreamSet):
    """The ``--siprec`` endpoint: SIP over UDP and TCP in, a stream per recorded participant out."""

    kind = "siprec"
    endpoint = True

    def __init__(self, opts: SiprecOptions, timeout_s: float) -> None:
        from scoreq_live.http.policy import parse_listen

        super().__init__(opts.name, f"siprec://{opts.listen}")
        self.opts = opts
        where = parse_listen(opts.listen, 5060)
        self.host, self.port = where.host, where.port
        try:
            self.allow = [ipaddress.ip_network(c, strict=False) for c in opts.allow]
        except ValueError as e:
            raise ConfigError(f"--siprec-allow: {e}") from None
        self.timeout_s = timeout_s
        self.sessions: dict[str, Session] = {}
        self.free_ports = list(range(opts.rtp_ports[0] + (opts.rtp_ports[0] % 2), opts.rtp_ports[1] + 1, 2))
        self.malformed = 0
        self.refused: dict[int, int] = {}  # answers other than 200, by status
        self._new: asyncio.Queue[Source] = asyncio.Queue()
        self._socks: list[object] = []  # the bound UDP and TCP sockets (check())

    # -- SIP ----------------------------------------------------------------------------------------

    def allowed(self, addr: Endpoint) -> bool:
        try:
            ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.allow)

    def handle(self, data: bytes, addr: Endpoint) -> bytes | None:
        """One message from ``addr``; the response to send back (None: nothing, a response or ACK)."""
        try:
            msg = parse(data)
        except SipError as e:
            self.malformed += 1
            log.debug("siprec: a message from %s:%d that cannot be read: %s", addr[0], addr[1], e)
            return None
        if not msg.is_request or msg.method == "ACK":
            return None
        if not self.allowed(addr):
            return self._refuse(msg, 403, "Forbidden")
        if msg.method == "OPTIONS":
            return response(msg, 200, "OK", extra=["Allow: INVITE, ACK, BYE, CANCEL, OPTIONS",
                                                   "Supported: siprec"])
        if msg.method == "BYE":
            s = self.sessions.pop(msg.call_id, None)
            if s is None:
                return self._refuse(msg, 481, "Call/Transaction Does Not Exist")
            self._end(s, "bye")
            return response(msg, 200, "OK", to_tag=s.to_tag)
        if msg.method == "CANCEL":
            return response(msg, 200, "OK")
        if msg.method != "INVITE":
            return self._refuse(msg, 501, "Not Implemented")
        return self._invite(msg)

    def _refuse(self, msg: SipMessage, status: int, reason: str, why: str = "") -> bytes:
        self.refused[status] = self.refused.get(status, 0) + 1
        if why:
            log.info("siprec: %s from %s refused: %d %s (%s)", msg.method, msg.from_.aor, status, reason, why)
        extra = [f'Warning: 399 scoreq-live "{why[:200]}"'] if why else []
        return response(msg, status, reason, to_tag=secrets.token_hex(4), extra=extra)

    def _invite(self, msg: SipMessage) -> bytes:
        existing = self.sessions.get(msg.call_id)
        if existing is not None:  # a re-INVITE: the same ports, the same answer
            return self._ok(msg, existing)
        siprec = "siprec" in msg.header("require").lower() or msg.content_type == "multipart/mixed"
        if not siprec and not self.opts.accept_plain:
            return self._refuse(msg, 488, "Not Acceptable Here",
                                "this is a SIPREC recording server: send Require: siprec")
        people: dict[str, Participant] = {}
        if msg.content_type == "multipart/mixed":
            parts = _parts(msg)
            sdp = parts.get("application/sdp")
            meta = parts.get("application/rs-metadata+xml")
            if sdp is None:
                return self._refuse(msg, 488, "Not Acceptable Here", "no application/sdp part")
            if meta is not None:
                try:
                    people = parse_metadata(meta)
                except ValueError as e:
                    return self._refuse(msg, 400, "Bad Request", str(e))
            elif siprec:
                return self._refuse(msg, 400, "Bad Request", "no application/rs-metadata+xml part")
        elif msg.content_type == "application/sdp":
            sdp = msg.body
        else:
            return self._refuse(msg, 488, "Not Acceptable Here", "no SDP offer")
        try:
            offered = offered_media(sdp.decode("utf-8", "replace"))
        except CodecError as e:
            return self._refuse(msg, 488, "Not Acceptable Here", str(e))
        if len(self.sessions) >= self.opts.max_sessions or len(self.free_ports) < len(offered):
            return self._refuse(msg, 503, "Service Unavailable", "no free session or RTP port")
        if not people and not siprec:  # a plain call: the caller is who is heard
            f = msg.from_
            people = {offered[0].label: Participant("caller", f.name, f.aor)}
        media = [(o, people.get(o.label), self.free_ports.pop(0)) for o in offered]
        session = Session(msg.call_id, secrets.token_hex(6), media, self._answer(media))
        self.sessions[msg.call_id] = session
        try:
            self._open(session, sdp.decode("utf-8", "replace"))
        except Exception as e:  # a port that cannot be bound
            self.sessions.pop(msg.call_id, None)
            self._release(session)
            return self._refuse(msg, 503, "Service Unavailable", f"cannot receive RTP: {e}")
        return self._ok(msg, session)

    def _ok(self, msg: SipMessage, s: Session) -> bytes:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return response(msg, 200, "OK", to_tag=s.to_tag, contact=f"<sip:recorder@{host}:{self.port}>",
                        body=s.answer, ctype="application/sdp", extra=["Require: siprec"])

    def _answer(self, media: list[tuple[Offered, Participant | None, int]]) -> bytes:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        ip = "IP6" if ":" in host else "IP4"
        lines = ["v=0", f"o=scoreq-live {secrets.randbelow(10**9)} 1 IN {ip} {host}", "s=scoreq-live",
                 f"c=IN {ip} {host}", "t=0 0"]
        for offered, _, port in media:
            lines.append(f"m=audio {port} RTP/AVP {' '.join(map(str, offered.pts))}")
            lines += offered.rtpmaps
            lines += ["a=recvonly", f"a=label:{offered.label}"]
        return ("\r\n".join(lines) + "\r\n").encode()

    # -- media --------------------------------------------------------------------------------------

    def _open(self, s: Session, sdp: str) -> None:
        codecs = {}
        for m in parse_sdp(sdp):
            codecs.update(m.codecs)
        for offered, person, port in s.media:
            who = person.label if person is not None else f"label{offered.label}"
            rtp = RtpPort(RtpSpec(self.host, port, codecs, f"{self.name}-{who}-{s.short}"), self.timeout_s)
            rtp.check()
            s.ports.append(rtp)
            s.tasks.append(asyncio.get_running_loop().create_task(self._forward(s, rtp, offered, person)))

    async def _forward(self, s: Session, rtp: RtpPort, offered: Offered, person: Participant | None) -> None:
        try:
            async for src in rtp.streams():
                # the participant's name; a second sender on the port while the first is live keeps its SSRC
                src.name = src.name.rsplit("-", 1)[0] if len(rtp.adapter.live) <= 1 else src.name
                src.call = s.call_id
                src.meta = {**src.meta, "label": offered.label, "session": s.call_id}
                if person is not None:
                    src.meta.update(participant=person.name or person.label, aor=person.aor)
                who = (person.name or person.aor) if person is not None else f"label {offered.label}"
                src.detail = f"SIPREC {who}: {src.detail}"
                await self._new.put(src)
        finally:
            rtp.close()
            port = rtp.spec.port
            if port not in self.free_ports:
                self.free_ports.append(port)

    def _end(self, s: Session, reason: str) -> None:
        """The session is over: its streams end with ``reason``; its ports close (and come free) as their
        tasks end."""
        for rtp in s.ports:
            for key in list(rtp.adapter.live):
                rtp.adapter.gone(key, reason)
        for t in s.tasks:
            t.cancel()

    def _release(self, s: Session) -> None:
        """A session that never started: its ports close and come free now."""
        for rtp in s.ports:
            rtp.close()
        for _, _, port in s.media:
            if port not in self.free_ports:
                self.free_ports.append(port)
        s.ports.clear()

    # -- the input ----------------------------------------------------------------------------------

    def check(self) -> None:
        """Bind the SIP listeners now (UDP and TCP on one port): a busy port stops the monitor up front."""
        if self._socks:
            return
        import socket

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((self.host, self.port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, udp.getsockname()[1]))
            tcp.listen(64)
        except OSError as e:
            udp.close()
            tcp.close()
            raise ConfigError(f"--siprec {self.opts.listen}: cannot listen: {e.strerror or e}") from None
        udp.setblocking(False)
        tcp.setblocking(False)
        self.port = udp.getsockname()[1]
        self._socks = [udp, tcp]

    async def streams(self) -> AsyncIterator[Source]:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                answer = server.handle(data, addr[:2])
                if answer is not None:
                    self.transport.sendto(answer, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")[:2]
            buf = bytearray()
            try:
                while chunk := await reader.read(65536):
                    buf += chunk
                    for m in split_stream(buf):
                        answer = server.handle(m, peer)
                        if answer is not None:
                            writer.write(answer)
                    await writer.drain()
            except (SipError, ConnectionError):
                server.malformed += 1
            finally:
                writer.close()

        self.check()
        import socket

        udp_sock, tcp_sock = self._socks
        assert isinstance(udp_sock, socket.socket) and isinstance(tcp_sock, socket.socket)
        transport, _ = await loop.create_datagram_endpoint(Udp, sock=udp_sock)
        listener = await asyncio.start_server(tcp, sock=tcp_sock)
        try:
            while True:
                yield await self._new.get()
        finally:
            for s in list(self.sessions.values()):
                self._end(s, "stopped")
            self.sessions.clear()
            transport.close()
            listener.close()
            with contextlib.suppress(Exception):
                await listener.wait_closed()
            self._socks = []

    def close(self) -> None:
        for s in list(self.sessions.values()):
            self._release(s)
