"""SIP calls followed from their messages: who calls whom, where each side receives its media, when it ends.

:class:`DialogTracker` is sans-I/O, like :mod:`scoreq_live.rtp`: SIP messages
and their capture times in (:meth:`DialogTracker.message`), the calls' state
out; :meth:`DialogTracker.media` answers which call (and which direction)
an RTP packet to an address belongs to.  A capture file, a live capture and
a recording server feed it alike.

A call (keyed by Call-ID) starts with an INVITE; each side's SDP (the offer
in the INVITE, or in the ACK for a late offer; the answer in a 18x or 2xx;
either in a re-INVITE or UPDATE) names where that side receives audio, so
RTP sent *to* the caller's address is the callee speaking, and the other
way round.  Which side sent a message is told by its From tag (the caller's
is the INVITE's).  Every address a call ever named stays mapped to it until
the call is forgotten (a re-INVITE moving the media does not orphan packets
in flight).  A call ends with a BYE, a CANCEL, or a final error answer to its
first INVITE; calls never answered are forgotten after :data:`SETUP_S`,
ended ones after ``linger_s``; at most ``max_calls`` are kept (beyond, the
oldest ended or unanswered one goes first, counted in ``evicted``).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from scoreq_live.rtp.codecs import Codec, CodecError, parse_sdp
from scoreq_live.sip.message import Party, SipMessage

Endpoint = tuple[str, int]

SETUP_S = 64.0  # an INVITE transaction's timeout (64 x T1): a call not answered by then is forgotten
LINGER_S = 10.0  # an ended call is kept this long for its late packets
MAX_CALLS = 10_000
_SAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


def _safe(text: str, limit: int = 20) -> str:
    return _SAFE.sub("_", text)[:limit].strip("_") or "unknown"


@dataclass
class Call:
    """One SIP call (a dialog, by Call-ID)."""

    call_id: str
    caller: Party
    callee: Party
    started: float  # capture time of the INVITE
    answered: float | None = None
    ended: float | None = None
    end_reason: str = ""  # bye, cancel, rejected 486, ...
    caller_media: list[Endpoint] = field(default_factory=list)  # where the caller receives (newest last)
    callee_media: list[Endpoint] = field(default_factory=list)
    codecs: dict[Endpoint, dict[int, Codec]] = field(default_factory=dict)  # payload types each address takes
    last_seen: float = 0.0

    @property
    def short(self) -> str:
        """4 hex digits of the Call-ID: tells apart two calls between the same parties."""
        return hashlib.sha1(self.call_id.encode()).hexdigest()[:4]

    def stream_name(self, prefix: str, to_caller: bool) -> str:
        """The stream of one direction: ``PREFIX-alice-to-bob-1a2b`` (alice speaking, bob hearing)."""
        a, b = (self.callee, self.caller) if to_caller else (self.caller, self.callee)
        name = f"{_safe(a.user or a.host)}-to-{_safe(b.user or b.host)}-{self.short}"
        return f"{prefix}-{name}"[:64] if prefix else name

    @property
    def who(self) -> tuple[str, str]:
        return self.caller.user or self.caller.aor, self.callee.user or self.callee.aor


@dataclass(frozen=True)
class MediaOf:
    """What an RTP destination address belongs to: a call, and whether packets to it reach the caller."""

    call: Call
    to_caller: bool

    def identity(self, prefix: str, ssrc: int, src: Endpoint, dst: Endpoint,
                 codec: str) -> tuple[str, str, dict[str, str]]:
        """A stream's name, detail and meta when its packets (``ssrc`` from ``src`` to ``dst``) are this
        direction of the call; the same for a live capture and a capture file."""
        call = self.call
        speaker, hearer = (call.callee, call.caller) if self.to_caller else (call.caller, call.callee)
        caller, callee = call.who
        where = f"{codec or 'RTP'} from {src[0]}:{src[1]} to {dst[0]}:{dst[1]} ssrc {ssrc:08x}"
        detail = f"{speaker.user or speaker.aor} to {hearer.user or hearer.aor} ({where}), Call-ID {call.call_id[:80]}"
        meta = {k: v for k, v in (("call_id", call.call_id), ("from", caller), ("to", callee),
                                  ("speaker", speaker.user or speaker.aor), ("ssrc", f"{ssrc:08x}"),
                                  ("remote", f"{src[0]}:{src[1]}"), ("local", f"{dst[0]}:{dst[1]}")) if v}
        return call.stream_name(prefix, self.to_caller), detail, meta


class DialogTracker:
    """SIP messages in, calls and their media addresses out (see the module's docstring)."""

    def __init__(self, max_calls: int = MAX_CALLS, linger_s: float = LINGER_S) -> None:
        self.max_calls = max_calls
        self.linger_s = linger_s
        self.calls: OrderedDict[str, Call] = OrderedDict()  # by Call-ID, least recently heard first
        self._media: dict[Endpoint, MediaOf] = {}
        self.messages = 0
        self.ignored = 0  # messages of no call this tracker knows (a BYE of a call before the capture, ...)
        self.evicted = 0  # calls dropped to keep at most max_calls

    # -- in -----------------------------------------------------------------------------------------

    def message(self, msg: SipMessage, t: float) -> Call | None:
        """One message at capture time ``t``; the call it concerns (None: ignored)."""
        self.messages += 1
        cid = msg.call_id
        if not cid:
            self.ignored += 1
            return None
        _, cmethod = msg.cseq
        call = self.calls.get(cid)
        if call is None:
            if msg.method != "INVITE":
                self.ignored += 1
                return None
            call = self._new(msg, t)
        self.calls.move_to_end(cid)
        call.last_seen = t
        if msg.body and msg.content_type in ("application/sdp", "multipart/mixed"):
            self._sdp(call, msg)
        if msg.is_request:
            if msg.method == "BYE" and call.ended is None:
                call.ended, call.end_reason = t, "bye"
            elif msg.method == "CANCEL" and call.answered is None and call.ended is None:
                call.ended, call.end_reason = t, "cancel"
        elif cmethod == "INVITE":
            if 200 <= msg.status < 300 and call.answered is None:
                call.answered = t
            elif msg.status >= 300 and call.answered is None and call.ended is None:
                call.ended, call.end_reason = t, f"rejected {msg.status}"
        return call

    def _new(self, msg: SipMessage, t: float) -> Call:
        while len(self.calls) >= self.max_calls:
            self._evict_one()
        call = Call(msg.call_id[:256], msg.from_, msg.to, t, last_seen=t)
        self.calls[call.call_id] = call
        return call

    def _evict_one(self) -> None:
        victim = next((c for c in self.calls.values() if c.ended is not None or c.answered is None), None)
        if victim is None:
            victim = next(iter(self.calls.values()))
        self._forget(victim)
        self.evicted += 1

    def _sdp(self, call: Call, msg: SipMessage) -> None:
        """The SDP's audio addresses are where the message's sender receives (a request's sender; a response's
        sender is the other side)."""
        body = _sdp_part(msg)
        if body is None:
            return
        try:
            media = parse_sdp(body)
        except CodecError:
            return
        from_caller = _from_caller(call, msg)
        sender_is_caller = from_caller if msg.is_request else not from_caller
        for m in media:
            if not m.addr or m.port == 0:
                continue
            addr = (m.addr, m.port)
            side = call.caller_media if sender_is_caller else call.callee_media
            if addr not in side:
                side.append(addr)
            call.codecs.setdefault(addr, {}).update(m.codecs)
            self._media[addr] = MediaOf(call, to_caller=sender_is_caller)

    # -- out ----------------------------------------------------------------------------------------

    def media(self, dst: Endpoint) -> MediaOf | None:
        """The call (and direction) RTP sent to ``dst`` belongs to, if a call's SDP named it."""
        return self._media.get(dst)

    def expire(self, t: float) -> list[Call]:
        """Forget calls ended more than ``linger_s`` ago and calls never answered within :data:`SETUP_S`;
        returns them."""
        gone = [c for c in self.calls.values()
                if (c.ended is not None and t - c.ended > self.linger_s)
                or (c.ended is None and c.answered is None and t - c.started > SETUP_S)]
        for c in gone:
            self._forget(c)
        return gone

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.call_id, None)
        for addr in (*call.caller_media, *call.callee_media):
            of = self._media.get(addr)
            if of is not None and of.call is call:
                del self._media[addr]


def _from_caller(call: Call, msg: SipMessage) -> bool:
    """Whether a message's From is the caller (by tag when both have one, else by user)."""
    f = msg.from_
    if f.tag and call.caller.tag:
        return f.tag == call.caller.tag
    return f.user == call.caller.user and f.host == call.caller.host


def _sdp_part(msg: SipMessage) -> str | None:
    """The SDP of a message: its body, or the ``application/sdp`` part of a ``multipart/mixed`` body."""
    if msg.content_type == "application/sdp":
        return msg.body.decode("utf-8", "replace")
    boundary = msg.param("content-type", "boundary")
    if not boundary:
        return None
    for part in msg.body.split(b"--" + boundary.encode()):
        head, sep, body = part.partition(b"\r\n\r\n")
        if sep and b"application/sdp" in head.lower():
            return body.decode("utf-8", "replace")
    return None
