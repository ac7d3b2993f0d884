"""WebRTC publishers (WHIP, RFC 9725): each session is one stream, scored like an RTP call leg.

A WHIP client POSTs an SDP offer; :meth:`WhipIngest.offer` answers it with an
aiortc peer connection (ICE, DTLS-SRTP, SDP: what a browser, OBS or
GStreamer's ``whipsink`` expect), and the session's stream is attached to the
engine at once.  The audio does not go through aiortc's own jitter buffer and
decoder thread: the receiver's RTP packets, decrypted, are handed to the
monitor's RTP receiver (:class:`scoreq_live.rtp.receiver.RtpStream`: jitter
buffer, Opus with packet-loss concealment, G.711, G.722, network statistics),
so a WebRTC stream's ``net`` object is computed exactly as an RTP stream's,
and no thread runs per session.  aiortc keeps its RTCP (receiver reports to
the sender) and its ``getStats()``.

Two of aiortc's internals are used, both checked by the test suite: the
receiver's ``_handle_rtp_packet`` / ``_handle_rtcp_packet`` (wrapped per
receiver to see each packet) and its name-mangled decoder stop (so that no
decoder thread keeps running).  Without the latter, aiortc would decode every
packet a second time in a thread; the scores would not change.

A session ends when the publisher DELETEs it (``closed``), when no media came
for ``timeout_s`` (``inactive``: a tab closed, a network gone), when ICE or
DTLS fails (``disconnected``), on an RTCP BYE (``bye``), or when the monitor
stops (``stopped``); its peer connection, sockets and tasks are released then.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtcpByePacket
from aiortc.sdp import SessionDescription

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.ingest.ice import gathering_on, without_mdns_candidates
from scoreq_live.rtp.codecs import Codec, CodecError, codec_by_name
from scoreq_live.rtp.packet import RtpPacket
from scoreq_live.rtp.receiver import RtpStream
from scoreq_live.sources.base import CALL_KEY, STREAM_NAME, Source, StreamSet
from scoreq_live.sources.push import DemuxAdapter, RtpSource, Ticker

__all__ = ["WhipError", "WhipIngest", "WhipSession", "WhipSettings"]

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often sessions release due audio and are checked for the timeout
CLOSE_WAIT_S = 3.0  # how long closing a peer connection may take before it is left to finish on its own
MAX_MEDIA_SECTIONS = 8  # an offer with more m= sections is refused before it is parsed (each costs ICE and DTLS)


class WhipError(ScoreqLiveError):
    """A WHIP request that cannot be served: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class WhipSettings:
    """``ice_hosts``: addresses to gather host candidates on (empty: every interface but loopback, aioice's
    default); ``stun``: STUN servers (``stun:HOST:PORT``) for a server-reflexive candidate behind NAT;
    ``max_sessions``: sessions at once (more: 503); ``timeout_s``: no media this long ends a session;
    ``max_offer_bytes``: the largest SDP offer accepted."""

    ice_hosts: tuple[str, ...] = ()
    stun: tuple[str, ...] = ()
    max_sessions: int = 64
    timeout_s: float = 5.0
    max_offer_bytes: int = 64 * 1024


class WebRtcSource(RtpSource):
    """A WHIP session's audio: the RTP receiver's output, at 16 kHz; its ``net`` as for RTP streams."""

    kind = "webrtc"

    def switch(self, stream: RtpStream) -> None:
        """Go on with a new SSRC's receiver (a sender that restarted its track): the old one's rest first."""
        if self.stream is not None:
            self.deliver()
            self.push(self.stream.finish())
        self.stream = stream


@dataclass(eq=False)
class WhipSession:
    """One publisher: its peer connection, its stream and where its packets go."""

    id: str
    name: str
    pc: RTCPeerConnection
    source: WebRtcSource
    codecs: dict[int, Codec]
    created: float
    peer: str = ""  # the client's address as HTTP saw it
    last_media: float = 0.0  # loop time of the latest RTP packet (the creation time until one comes)
    packets: int = 0
    ended: str | None = None  # why, once it has ended
    ended_at: float = 0.0  # loop time it ended
    streams: dict[int, RtpStream] = field(default_factory=dict)  # by SSRC (one, unless the sender restarts)

    @property
    def stream(self) -> RtpStream | None:
        return self.source.stream


def _offer_codecs(offer: SessionDescription) -> dict[int, Codec]:
    """The audio payload types of an offer that the RTP receiver decodes (or recognises), by payload type."""
    out: dict[int, Codec] = {}
    for media in offer.media:
        if media.kind != "audio":
            continue
        for c in media.rtp.codecs:
            if c.payloadType is None:
                continue
            name = c.mimeType.split("/", 1)[-1]
            try:
                out[c.payloadType] = codec_by_name(name, c.payloadType, c.clockRate, c.channels)
            except CodecError:
                continue  # red, ilbc, ...: aiortc does not negotiate them either
    return out


class WhipIngest(StreamSet):
    """The WHIP endpoint's sessions: a stream set whose streams are the publishers of the moment."""

    kind = "webrtc"
    endpoint = True

    def __init__(self, settings: WhipSettings = WhipSettings(), *, name: str = "webrtc",
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, "WHIP (WebRTC publishers)")
        self.settings = settings
        self.sessions: dict[str, WhipSession] = {}
        self._opening = 0  # offers being answered: they hold a place under max_sessions
        self.adapter: DemuxAdapter[str, WebRtcSource] = DemuxAdapter()  # each session's stream, by session id
        self._ticker = Ticker(TICK_S)
        self._running = False
        self._closing: set[asyncio.Task[None]] = set()
        self._count = itertools.count(1)
        self.clock = clock
        self.started = 0  # sessions accepted since start
        self.refused = 0  # offers refused (bad SDP, no audio, full)

    # -- the HTTP side ----------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._running

    def check_name(self, name: str | None) -> str:
        """The stream name a session will have: ``?stream=NAME`` validated, or one made up."""
        if name is None or name == "":
            return f"{self.name}-{next(self._count)}"
        if not STREAM_NAME.match(name):
            raise WhipError(400, f"stream name {name!r} is not valid: 1-64 of A-Z a-z 0-9 _ . : -")
        return name

    async def offer(self, sdp: str, name: str | None = None, peer: str = "",
                    call: str | None = None) -> tuple[WhipSession, str]:
        """Answer a WHIP offer: (the new session, the SDP answer); raises :class:`WhipError` for the client."""
        if not self._running:
            raise WhipError(503, "the monitor is not taking new streams (it is stopping)", {"Retry-After": "5"})
        # A place is taken before the first await and given back if the offer fails: offers answered
        # concurrently cannot pass the cap together (it was checked against finished sessions only).
        if len(self.sessions) + self._opening >= self.settings.max_sessions:
            self.refused += 1
            raise WhipError(503, f"too many WebRTC sessions (at most {self.settings.max_sessions}); try again later",
                            {"Retry-After": "5"})
        self._opening += 1
        try:
            return await self._answer(sdp, name, peer, call)
        finally:
            self._opening -= 1

    async def _answer(self, sdp: str, name: str | None, peer: str, call: str | None) -> tuple[WhipSession, str]:
        stream_name = self.check_name(name)
        if call is not None and not CALL_KEY.match(call):
            self.refused += 1
            raise WhipError(400, f"call key {call[:80]!r} is not valid: 1-128 printable characters without spaces")
        if sdp.count("\nm=") + sdp.startswith("m=") > MAX_MEDIA_SECTIONS:
            self.refused += 1  # refused before parsing: each section costs transports, candidates, DTLS
            raise WhipError(400, f"the offer has more than {MAX_MEDIA_SECTIONS} media sections: publish one "
                            "audio track (and bundle any others)")
        try:
            parsed = SessionDescription.parse(sdp)
        except Exception as e:  # aiortc's parser raises ValueError, KeyError, IndexError on malformed SDP
            self.refused += 1
            raise WhipError(400, f"the body is not a valid SDP offer: {type(e).__name__}: {e}") from None
        kinds = [m.kind for m in parsed.media]
        if "audio" not in kinds:
            self.refused += 1
            raise WhipError(400, "the offer has no audio (no m=audio section): publish an audio track"
                            + (f"; it offers {', '.join(kinds)}" if kinds else ""))
        if not any(m.kind == "audio" and m.port != 0 for m in parsed.media):
            self.refused += 1
            raise WhipError(400, "the offer's audio is rejected or disabled (m=audio with port 0): publish an "
                            "audio track")
        if not any(line.startswith("a=fingerprint:") for line in sdp.splitlines()):
            self.refused += 1
            raise WhipError(400, "the offer has no DTLS fingerprint (a=fingerprint): WebRTC media must be "
                            "encrypted (DTLS-SRTP)")
        codecs = _offer_codecs(parsed)
        if not any(c.decodable for c in codecs.values()):
            self.refused += 1
            raise WhipError(400, "no audio codec in the offer is supported: offer opus, PCMU, PCMA or G722")
        servers = [RTCIceServer(urls=u) for u in self.settings.stun]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers or None))
        sid = secrets.token_urlsafe(12)
        source = WebRtcSource(stream_name, None, f"WebRTC from {peer or 'a publisher'} (WHIP session {sid})")
        source.call = call or ""
        source.meta = {k: v for k, v in (("name", name or ""), ("peer", peer), ("session", sid)) if v}
        loop = asyncio.get_running_loop()
        session = WhipSession(sid, stream_name, pc, source, codecs, loop.time(), peer, last_media=loop.time())
        offered, mdns = without_mdns_candidates(sdp)  # never looked up: the publisher's checks reveal its address
        if mdns:
            log.debug("WHIP offer from %s: %d mDNS (.local) candidate(s) left out", peer or "?", mdns)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offered, type="offer"))
            for t in pc.getTransceivers():
                if t.kind == "audio":
                    self._tap(session, t.receiver)
                else:
                    t.direction = "inactive"  # video: not received (aiortc would decode it in a thread)
            answer = await pc.createAnswer()
            with gathering_on(self.settings.ice_hosts):
                await pc.setLocalDescription(answer)
        except WhipError:
            await pc.close()
            raise
        except Exception as e:
            await pc.close()
            self.refused += 1
            raise WhipError(400, f"cannot answer the offer: {type(e).__name__}: {e}") from None
        local = pc.localDescription
        if local is None or "a=candidate" not in local.sdp:
            await pc.close()
            raise WhipError(500, "no ICE candidate could be gathered (check --ice-host)")
        chosen = [m for m in SessionDescription.parse(local.sdp).media if m.kind == "audio" and m.port != 0]
        if not chosen or not chosen[0].rtp.codecs:
            await pc.close()
            self.refused += 1
            raise WhipError(400, "no common audio codec: offer opus, PCMU, PCMA or G722")
        source.detail += f", {chosen[0].rtp.codecs[0].mimeType.split('/')[-1]}"

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "failed":
                self.end(session, "disconnected")

        self.sessions[sid] = session
        self.started += 1
        self.adapter.opened(sid, source)
        self._ticker.wake()
        return session, local.sdp

    async def delete(self, sid: str) -> bool:
        """End a session (``DELETE`` on its URL); False when there is no such session."""
        session = self.sessions.get(sid)
        if session is None:
            return False
        self.end(session, "closed")
        return True

    # -- the packets ------------------------------------------------------------------------------------

    def _tap(self, session: WhipSession, receiver: RTCRtpReceiver) -> None:
        """Route the receiver's packets to the session's RTP receiver; stop aiortc's own decoding."""
        handle_rtp: Callable[..., Awaitable[None]] = receiver._handle_rtp_packet
        handle_rtcp: Callable[..., Awaitable[None]] = receiver._handle_rtcp_packet
        receive: Callable[..., Awaitable[None]] = receiver.receive
        loop = asyncio.get_running_loop()

        async def rtp(packet: Any, arrival_time_ms: int = 0) -> None:
            self._packet(session, packet, loop.time())
            await handle_rtp(packet, arrival_time_ms=arrival_time_ms)  # aiortc's statistics and RTCP reports

        async def rtcp(packet: Any) -> None:
            await handle_rtcp(packet)
            if isinstance(packet, RtcpByePacket) and session.stream is not None \
                    and session.stream.ssrc in packet.sources:
                self.end(session, "bye")

        async def start(parameters: Any) -> None:
            await receive(parameters)
            # No decoder thread: the audio is decoded by the session's RtpStream on the event loop.
            stop = getattr(receiver, "_RTCRtpReceiver__stop_decoder", None)
            if stop is not None:
                stop()
            else:
                log.debug("aiortc has no decoder stop here; its decoder thread keeps running")

        receiver._handle_rtp_packet = rtp  # type: ignore[method-assign]
        receiver._handle_rtcp_packet = rtcp  # type: ignore[method-assign]
        receiver.receive = start  # type: ignore[method-assign]

    def _packet(self, session: WhipSession, p: Any, now: float) -> None:
        if session.ended is not None:
            return
        session.packets += 1
        session.last_media = now
        pkt = RtpPacket(p.payload_type, bool(p.marker), p.sequence_number, p.timestamp, p.ssrc, bytes(p.payload))
        src = session.source
        stream = session.streams.get(pkt.ssrc)
        if stream is None:
            if pkt.payload_type not in session.codecs:
                return  # RTX or another type aiortc negotiated and the receiver does not decode
            stream = RtpStream(pkt.ssrc, ("webrtc", 0), session.codecs)
            session.streams = {pkt.ssrc: stream}
            src.switch(stream)
        stream.push(pkt, now)
        src.deliver()

    # -- endings ----------------------------------------------------------------------------------------

    def end(self, session: WhipSession, reason: str) -> None:
        """End a session now: its stream ends with ``reason``; its peer connection closes in the background."""
        if session.ended is not None:
            return
        session.ended = reason
        session.ended_at = asyncio.get_running_loop().time()
        self.sessions.pop(session.id, None)
        self.adapter.gone(session.id, reason)
        task = asyncio.get_running_loop().create_task(self._close_pc(session), name=f"whip-close:{session.id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_pc(session: WhipSession) -> None:
        try:
            await asyncio.wait_for(session.pc.close(), CLOSE_WAIT_S)
        except Exception as e:  # a close that fails leaves nothing to do but say so
            log.debug("closing WHIP session %s: %s", session.id, e)

    def _tick(self, now: float) -> None:
        for session in list(self.sessions.values()):
            if session.stream is not None:
                session.stream.tick(now)
            if now - session.last_media >= self.settings.timeout_s:
                self.end(session, "inactive")  # its audio so far goes on first
        self.adapter.deliver()

    # -- StreamSet --------------------------------------------------------------------------------------

    async def streams(self) -> AsyncIterator[Source]:
        self._running = True
        try:
            while True:
                self._tick(await self._ticker.wait())
                for src in self.adapter.new():
                    yield src
        finally:
            self._running = False
            for session in list(self.sessions.values()):
                self.end(session, "stopped")
            if self._closing:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait(list(self._closing), timeout=CLOSE_WAIT_S)

    @property
    def live(self) -> Sequence[WhipSession]:
        return list(self.sessions.values())
