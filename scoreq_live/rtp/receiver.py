"""One UDP port's worth of RTP, sans-I/O: datagrams in, per-SSRC streams of 16 kHz audio and events out.

:class:`RtpDemux` takes every datagram of a port with its source address and arrival time, tells
RTCP from RTP (RFC 5761 multiplexing), drops and counts malformed packets by reason, and keeps one
:class:`RtpStream` per SSRC.  A new SSRC becomes a stream once two of its packets have consecutive
sequence numbers (RFC 3550 A.1 probation, so that random garbage never starts a stream); the packets
seen before that are kept and played, so no audio is lost.  Its events (:data:`DemuxEvent`) are
:class:`NewStream`, :class:`StreamGone` (RTCP BYE, or silent for ``timeout_s``, seen by
:meth:`RtpDemux.expire`) and :class:`StreamFailed` (an SSRC that cannot be decoded, e.g. an
undeclared dynamic payload type; reported once, its later packets only counted).

A stream's packets go through its :class:`~scoreq_live.rtp.jitter.JitterBuffer`; released packets are
decoded with the payload type's decoder (a payload-type switch gets a new decoder, the output stays
16 kHz), losses are concealed (:meth:`Decoder.conceal`), and timestamp gaps (talk spurts with silence
suppression, DTMF events) are filled with silence, so the output's media time follows the RTP
timestamps.  Silence and concealment are bounded twice: each stretch by ``max_gap_s``, and all of them
by the arrival times, through a budget that grows with the arrival time that passes beyond the audio
already decoded (a pause, an outage) and is spent by filling, with ``GAP_SLACK_S`` of credit for
jitter.  Real pauses and outages take as long to arrive as they last, so they are filled in full; a
bogus timestamp jump or a sender skipping sequence numbers gets at most the slack once, and then no
more than arrival time allows, so no sender can make a stream produce audio much faster than real
time.  Decoded audio running ahead of arrival (clock drift, bursts) is not held against the budget.
Decoded audio, concealment and fill included, is resampled to 16 kHz by the resampler every input uses
(:mod:`scoreq_live.core.resample`), one per stream, so a stream scores as the same samples would from a file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np

from scoreq_live.core.resample import Resampler
from scoreq_live.rtp import jitter as jb
from scoreq_live.rtp.codecs import STATIC, Codec, CodecError, Decoder, codec_by_name, make_decoder
from scoreq_live.rtp.netstats import SAMPLE_RATE, NetHistory, NetWindow, burst_ratio, quality
from scoreq_live.rtp.packet import RtpPacket, is_rtcp, parse_rtcp_bye, parse_rtp

JITTER_BIN_S = 0.0005  # a stream's jitter estimates are counted in 0.5 ms steps, ...
JITTER_BINS = 1000  # ... up to 0.5 s (more counts as 0.5 s), for the stream's p95 (4 kB a stream)
GAP_SLACK_S = 0.25  # how far the output may run ahead of the arrival times (jitter, buffering)
PROBATION_PACKETS = 16  # packets of an unconfirmed SSRC kept for when it is confirmed
MAX_CANDIDATES = 128  # unconfirmed SSRCs tracked at once (a random one forgotten for a new one)
PROBATION_S = 2.0  # an unconfirmed SSRC silent this long is forgotten
BYE_GRACE_S = 2.0  # packets of an SSRC within this long after its BYE are stragglers, not a new stream
# A full port: the stream with the lowest packet rate gives way to a new sender when that rate is below this
# (audio is 16-50 packets/s; a squatter holding a place with a packet now and then is far below).
GIVE_WAY_PPS = 5.0
UNKNOWN_PT_RUN = 50  # this many packets in a row of an undeclared payload type: the stream switched to it
# One sender's fair share: media time (RTP timestamps) may run at most this much faster than the wall clock,
# plus a burst; packets beyond are dropped before they are decoded and counted (over_rate).  Real senders run
# at 1x (a jitter burst at more for a moment); a flood of real audio at 10x would take the port's CPU.
MAX_MEDIA_RATE = 1.5
MEDIA_BURST_S = 2.0
MEDIA_JUMP_S = 10.0  # a timestamp step beyond this is a discontinuity, not media ...
JUMP_COST_S = 0.02  # ... and costs what a packet does (a sender of random timestamps is held to a packet rate)


def default_codecs(codecs: Mapping[int, Codec] | None = None) -> dict[int, Codec]:
    """The static payload types (and CN on 13), overridden and extended by ``codecs``."""
    table: dict[int, Codec] = dict(STATIC)
    table[13] = codec_by_name("CN", 13)
    if codecs:
        table.update(codecs)
    return table


def unknown_pt_message(ssrc: int, pt: int, addr: tuple[str, int]) -> str:
    return (f"RTP stream {ssrc:08x} from {addr[0]}:{addr[1]} uses payload type {pt}, which is not declared: "
            f"name its codec with ?codec=NAME&pt={pt} on the rtp:// input (e.g. ?codec=opus&pt={pt} or "
            f"?codec=L16&rate=16000&pt={pt}) or give an SDP file whose a=rtpmap lines describe it")


# ------------------------------------------------------------------------------------------------ streams


class RtpStream:
    """One SSRC: jitter buffer, decoders, 16 kHz output and network statistics.

    The demux calls :meth:`push` (and :meth:`tick` from :meth:`RtpDemux.expire`); the consumer calls
    :meth:`pull` for the audio released so far and, once the stream has ended (:class:`StreamGone`)
    or input stops, :meth:`finish` for the rest.  Output media time follows the RTP timestamps:
    ``t = 0`` is the first output sample.
    """

    def __init__(self, ssrc: int, source_addr: tuple[str, int], codecs: Mapping[int, Codec], *,
                 min_delay_s: float = 0.02, max_delay_s: float = 0.1, max_gap_s: float = 10.0,
                 history_s: float = 60.0) -> None:
        self.ssrc = ssrc
        self.source_addr = source_addr
        self.codec_name = ""  # the audio codec being played (the first one announced until playout starts)
        self.last_arrival_s = 0.0
        self.interval_s = 0.0  # recent time between packets (moving average), for the packet rate
        self.unknown_run = 0  # packets in a row whose payload type is not declared
        self.over_rate = 0  # packets dropped because media time ran faster than the sender's fair share
        self._media_budget = MEDIA_BURST_S  # seconds of media this sender may still send ahead of the clock
        self._media_ts: int | None = None  # the highest RTP timestamp taken
        self._media_at = 0.0  # arrival that last refilled the budget
        self.ended = False
        self.end_reason: str | None = None
        self.max_gap_s = max_gap_s
        self._codecs = codecs
        self._jb = jb.JitterBuffer(min_delay_s=min_delay_s, max_delay_s=max_delay_s)
        self._net = NetHistory(history_s)
        self._decoders: dict[int, Decoder] = {}
        self._codec: Codec | None = None
        self._decoder: Decoder | None = None
        self._rs: Resampler | None = None
        self._rate = SAMPLE_RATE  # audio rate of the current resampler segment
        self._seg_pos = 0.0  # output position (16 kHz samples) where that segment began
        self._seg_in = 0  # samples fed to it since
        self._play_ts: int | None = None  # extended timestamp where the next audio is due
        self._dur_ts = 0  # timestamp units of the last decoded packet
        self._budget = 0.0  # seconds of silence/concealment the arrival times allow (GAP_SLACK_S more on top)
        self._budget_ref: float | None = None  # latest arrival credited to the budget
        self._owed = 0.0  # seconds of audio decoded since then
        self._out: list[np.ndarray] = []
        # counters
        self.telephone_events = 0
        self.comfort_noise = 0
        self.unknown_pt = 0
        self.empty = 0
        self.undecodable = 0  # packets of a known codec whose decoder could not be made
        self.pt_switches = 0
        self.concealed_samples = 0.0
        self.silence_samples = 0.0
        # over the whole stream, for its summary: runs of packets given up, and the jitter estimates
        self.missed = 0  # packets given up (concealed), in ...
        self.missed_runs = 0  # ... this many runs,
        self.max_burst = 0  # the longest of them
        self._jitter_hist = np.zeros(JITTER_BINS, np.int32)  # per packet: estimate in JITTER_BIN_S steps
        self._jitter_sum = 0.0

    # ------------------------------------------------------------------ feeding

    def push(self, pkt: RtpPacket, arrival_s: float) -> None:
        """One packet of this SSRC, arrived at ``arrival_s`` (seconds, any fixed origin)."""
        if self.ended:
            return
        codec = self._codecs.get(pkt.payload_type)
        if not self._fair(pkt, codec, arrival_s):
            self.over_rate += 1
            return
        if self.last_arrival_s:
            self.interval_s += 0.1 * (max(arrival_s - self.last_arrival_s, 0.0) - self.interval_s)
        self.last_arrival_s = arrival_s
        self.unknown_run = self.unknown_run + 1 if codec is None else 0
        clock = codec.clock_rate if codec is not None and codec.decodable else 0
        if clock and not self.codec_name and codec is not None:
            self.codec_name = codec.name
        status, ext_ts = self._jb.push(pkt, arrival_s, clock)
        if status is jb.BUFFERED or status is jb.LATE:
            if status is jb.LATE:
                self._net.add_late(self._pos_of(ext_ts, clock))
            if clock:
                j = self._jb.jitter_s
                self._net.add_jitter(self._pos_of(ext_ts, clock), j)
                self._jitter_hist[min(int(j / JITTER_BIN_S), JITTER_BINS - 1)] += 1
                self._jitter_sum += j
        elif status is jb.DUPLICATE:
            self._net.add_duplicate(self._pos_of(ext_ts, clock))
        self._play(self._jb.release(arrival_s))

    def _fair(self, pkt: RtpPacket, codec: Codec | None, arrival_s: float) -> bool:
        """Whether this packet's media time fits the sender's share (a token bucket in media seconds)."""
        if codec is None or not codec.decodable or codec.clock_rate <= 0:
            return True  # nothing to decode: costs nothing
        if self._media_ts is None:
            self._media_ts, self._media_at = pkt.timestamp, arrival_s
            return True
        self._media_budget = min(MEDIA_BURST_S, self._media_budget
                                 + MAX_MEDIA_RATE * max(arrival_s - self._media_at, 0.0))
        self._media_at = max(self._media_at, arrival_s)
        ahead = (pkt.timestamp - self._media_ts) % (1 << 32)
        if ahead >= 1 << 31:
            return True  # older than the newest taken (reordered, a duplicate): the jitter buffer judges it
        cost = ahead / codec.clock_rate
        if cost > MEDIA_JUMP_S:  # not media time but a new timeline (the jitter buffer confirms or drops it)
            cost = JUMP_COST_S
        if cost > self._media_budget:
            return False
        self._media_budget -= cost
        self._media_ts = pkt.timestamp
        return True

    def rate_pps(self, now_s: float) -> float:
        """Packets per second lately (the moving average of the intervals, or the silence since the last)."""
        gap = max(self.interval_s, now_s - self.last_arrival_s)
        return 1.0 / gap if gap > 0 else float("inf")

    def tick(self, now_s: float) -> None:
        """Let the jitter buffer give up holes whose wait is over at ``now_s`` (same time base as arrivals)."""
        if not self.ended:
            self._play(self._jb.release(now_s))

    def close(self, reason: str) -> None:
        """End the stream: everything held is released (for :meth:`pull`); later packets are ignored."""
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        self._play(self._jb.flush())
        if self._rs is not None:
            self._append(self._rs.flush())

    # ------------------------------------------------------------------ output

    def pull(self) -> np.ndarray:
        """float32 16 kHz mono audio released since the last call (concealment and gap silence included)."""
        out = self._out
        if not out:
            return np.zeros(0, np.float32)
        self._out = []
        return out[0] if len(out) == 1 else np.concatenate(out)

    def finish(self) -> np.ndarray:
        """Everything not pulled yet, the jitter buffer and resampler flushed; the stream is ended after."""
        self.close(self.end_reason or "finished")
        return self.pull()

    @property
    def position_s(self) -> float:
        """Media time released so far, seconds."""
        return self._pos() / SAMPLE_RATE

    def net_window(self, t0: float, t1: float) -> NetWindow:
        """Network numbers of media time ``[t0, t1)`` seconds (see :mod:`scoreq_live.rtp.netstats`)."""
        plc = bool(self._decoder.plc) if self._decoder is not None else False
        return self._net.window(t0, t1, self._pos(), self.codec_name, plc, self._jb.jitter_s)

    def totals(self) -> dict[str, Any]:
        """Cumulative counters since the stream began.

        ``jitter_ms`` is the current RFC 3550 A.8 estimate (what an RTCP receiver report would carry now),
        ``jitter_mean_ms`` that estimate averaged over all packets (steadier; the windows use such averages).
        """
        j = self._jb
        expected, lost = j.expected, j.lost
        return {
            "codec": self.codec_name, "expected": expected, "received": j.received, "lost": lost,
            "duplicated": j.duplicated, "late": j.late, "reordered": j.reordered,
            "loss_pct": 100.0 * lost / expected if expected else 0.0,
            "jitter_ms": 1000.0 * j.jitter_s, "jitter_mean_ms": 1000.0 * j.jitter_mean_s,
            "concealed_s": self.concealed_samples / SAMPLE_RATE,
            "silence_s": self.silence_samples / SAMPLE_RATE, "output_s": self._pos() / SAMPLE_RATE,
            "telephone_events": self.telephone_events, "comfort_noise": self.comfort_noise,
            "unknown_pt": self.unknown_pt, "empty": self.empty, "undecodable": self.undecodable,
            "over_rate": self.over_rate,
            "decode_errors": sum(d.errors for d in self._decoders.values()),
            "discarded": j.discarded, "resyncs": j.resyncs, "pt_switches": self.pt_switches,
            "delay_ms": 1000.0 * j.delay_s, "buffered": j.buffered,
        }

    def summary(self) -> dict[str, Any]:
        """The whole stream's network numbers: ``stream_ended.net`` (:class:`~scoreq_live.core.events.StreamEnded`)."""
        j = self._jb
        expected, lost = j.expected, j.lost
        n = int(self._jitter_hist.sum())
        if n:
            at = int(np.searchsorted(np.cumsum(self._jitter_hist), math.ceil(0.95 * n)))
            p95_ms, mean_ms = 1000.0 * at * JITTER_BIN_S, 1000.0 * self._jitter_sum / n  # to a bin (0.5 ms) below
        else:
            p95_ms = mean_ms = 1000.0 * j.jitter_s
        released = self._pos()
        plc = bool(self._decoder.plc) if self._decoder is not None else False
        missed_pct = 100.0 * self.missed / expected if expected else 0.0
        r, mos = quality(self.codec_name, missed_pct, burst_ratio(self.missed, self.missed_runs, expected), plc)
        return {
            "codec": self.codec_name, "expected": expected, "received": j.received, "lost": lost,
            "loss_pct": round(100.0 * lost / expected if expected else 0.0, 3), "max_burst": self.max_burst,
            "jitter_mean_ms": round(mean_ms, 3), "jitter_p95_ms": round(p95_ms, 3),
            "concealed": round(min(self.concealed_samples / released, 1.0) if released else 0.0, 4),
            "r_factor": round(r, 2), "mos_cq": round(mos, 3),
        }

    # ------------------------------------------------------------------ internals

    def _pos(self) -> float:
        return self._seg_pos + self._seg_in * SAMPLE_RATE / self._rate

    def _pos_of(self, ext_ts: int, clock: int) -> float:
        """Output position the audio of timestamp ``ext_ts`` occupies (clamped to [0, released + 1 s])."""
        pos = self._pos()
        codec = self._codec
        if self._play_ts is None or codec is None or clock != codec.clock_rate or clock <= 0:
            return pos
        p = pos + (ext_ts - self._play_ts) * SAMPLE_RATE / clock
        return min(max(p, 0.0), pos + SAMPLE_RATE)

    def _append(self, y: np.ndarray) -> None:
        if y.size:
            self._out.append(y)

    def _emit(self, x: np.ndarray) -> None:
        if x.size and self._rs is not None:
            self._append(self._rs.process(x))
            self._seg_in += x.size

    def _play(self, slots: list[jb.Slot]) -> None:
        lost: jb.Slot | None = None
        for s in slots:
            if s.packet is None:
                if lost is not None:  # not produced by the buffer, but cheap to handle
                    self._conceal(lost, None)
                lost = s
                continue
            self._play_slot(s, lost)
            lost = None
        if lost is not None:
            self._conceal(lost, None)

    def _play_slot(self, s: jb.Slot, lost: jb.Slot | None) -> None:
        pkt = s.packet
        assert pkt is not None
        self._credit(s.arrival_s)
        if lost is not None:
            if lost.resync:
                self._play_ts = None
            self._conceal(lost, s)
        if s.resync:  # the sender restarted: its timestamps start afresh
            self._play_ts = None
        codec = self._codecs.get(pkt.payload_type)
        audio = codec is not None and codec.decodable and len(pkt.payload) > 0
        if audio and codec is not None and (self._codec is None or codec.pt != self._codec.pt):
            audio = self._switch(codec)
        if not audio:
            if codec is None:
                self.unknown_pt += 1
            elif codec.name == "telephone-event":
                self.telephone_events += 1
            elif codec.name == "CN":
                self.comfort_noise += 1
            elif not pkt.payload:
                self.empty += 1
            elif codec.decodable:
                self.undecodable += 1
            self._net.add_packet(self._pos(), True)
            return
        codec = self._codec
        decoder = self._decoder
        assert codec is not None and decoder is not None
        self._fill_gap(s, codec)
        self._net.add_packet(self._pos(), True)
        x = decoder.decode(pkt.payload)
        self._emit(x)
        self._owed += x.size / codec.audio_rate
        dur = x.size * codec.clock_rate // codec.audio_rate
        if dur > 0:
            self._dur_ts = dur
        self._play_ts = s.ts + dur

    def _switch(self, codec: Codec) -> bool:
        """Play ``codec`` from now on (new decoder; new resampler segment when the audio rate changes)."""
        dec = self._decoders.get(codec.pt)
        if dec is None:
            try:
                dec = make_decoder(codec)
            except CodecError:
                return False
            self._decoders[codec.pt] = dec
        old = self._codec
        if old is None or old.audio_rate != codec.audio_rate:
            pos = self._pos()
            if self._rs is not None:
                self._append(self._rs.flush())
            self._seg_pos, self._seg_in, self._rate = pos, 0, codec.audio_rate
            self._rs = Resampler(codec.audio_rate)
        if old is not None:
            self.pt_switches += 1
            if old.clock_rate != codec.clock_rate:
                self._play_ts = None  # timestamps in other units: continue without a gap
        self._codec, self._decoder, self.codec_name = codec, dec, codec.name
        return True

    def _conceal(self, lost: jb.Slot, nxt: jb.Slot | None) -> None:
        """Stand in for ``lost.lost`` packets given up, before ``nxt`` (the next packet released, if any)."""
        k = lost.lost
        if k > 0:
            self.missed += k
            self.missed_runs += 1
            self.max_burst = max(self.max_burst, k)
        codec, decoder = self._codec, self._decoder
        if codec is None or decoder is None:  # nothing played yet: counted, no audio to conceal with
            self._net.add_missed(self._pos(), 0.0, k)
            return
        clock = codec.clock_rate
        dur = self._dur_ts or clock // 50
        total = k * dur
        if nxt is not None and nxt.packet is not None and self._play_ts is not None:
            ncodec = self._codecs.get(nxt.packet.payload_type)
            if ncodec is not None and ncodec.clock_rate == clock:
                gap = nxt.ts - self._play_ts
                if 0 < gap < total:
                    total = gap
        total = max(min(total, int(min(self.max_gap_s, self._allowed_s()) * clock)), 0)
        start = self._pos()
        self._net.add_missed(start, dur * SAMPLE_RATE / clock, k)
        self._emit(decoder.conceal(total * codec.audio_rate // clock))
        end = self._pos()
        self._budget -= (end - start) / SAMPLE_RATE
        self._net.add_concealed(start, end)
        self.concealed_samples += end - start
        if self._play_ts is not None:
            self._play_ts += total

    def _credit(self, arrival_s: float) -> None:
        """Arrival time passing beyond the audio decoded meanwhile adds to the fill budget."""
        ref = self._budget_ref
        if ref is None or arrival_s > ref:
            net = (arrival_s - ref if ref is not None else 0.0) - self._owed
            self._budget_ref, self._owed = arrival_s, 0.0
            b = self._budget
            if net >= 0:
                b = min(b + net + (0.01 * net if b < 0 else 0.0), self.max_gap_s)  # a debt heals slowly too
            else:
                b = max(b + net, min(b, 0.0))  # audio ahead of arrival is no debt
            self._budget = b

    def _allowed_s(self) -> float:
        return max(self._budget + GAP_SLACK_S, 0.0)

    def _fill_gap(self, s: jb.Slot, codec: Codec) -> None:
        """Silence for a timestamp gap before ``s`` (a pause in the talk spurt, a DTMF event), capped."""
        if self._play_ts is None:
            self._play_ts = s.ts
            return
        clock = codec.clock_rate
        gap = s.ts - self._play_ts
        if gap <= clock // 1000:  # contiguous (or overlapping: the sender's clock stepped back)
            return
        fill_s = min(gap / clock, self.max_gap_s, self._allowed_s())
        n = int(round(fill_s * codec.audio_rate))
        if n > 0:
            self._budget -= n / codec.audio_rate
            start = self._pos()
            self._emit(np.zeros(n, np.float32))
            self.silence_samples += self._pos() - start


# ------------------------------------------------------------------------------------------------- demux


@dataclass(frozen=True)
class NewStream:
    """A new SSRC confirmed on the port: ``stream`` is fed by the demux from now on."""

    ssrc: int
    stream: RtpStream


@dataclass(frozen=True)
class StreamGone:
    """A stream ended: RTCP BYE (``"bye"``), no packet for ``timeout_s`` (``"inactive"``), or it gave its
    place on a full port to a new sender (``"evicted"``).

    Its held audio has been released: :meth:`RtpStream.finish` returns the rest.
    """

    ssrc: int
    reason: Literal["inactive", "bye", "evicted"]


@dataclass(frozen=True)
class StreamFailed:
    """An SSRC that cannot be played (e.g. an undeclared payload type); reported once, ``error`` is for the user."""

    ssrc: int
    error: str


DemuxEvent = Union[NewStream, StreamGone, StreamFailed]  # noqa: UP007 - a runtime alias, also on Python 3.10


@dataclass
class _Candidate:
    addr: tuple[str, int]
    packets: list[tuple[RtpPacket, float]]
    last_arrival_s: float


def _rtcp_of(rtp_addr: tuple[str, int], addr: tuple[str, int]) -> bool:
    """Whether RTCP from ``addr`` can be the sender's at ``rtp_addr``: its RTP port (rtcp-mux) or the next one.

    RFC 3550's source validation: only the transport a stream comes from may end it with a BYE; another
    program on the same host (another port) may not.
    """
    return addr[0] == rtp_addr[0] and addr[1] in (rtp_addr[1], rtp_addr[1] + 1)


class RtpDemux:
    """All RTP/RTCP of one UDP port, sans-I/O; see the module docstring.

    ``codecs`` maps payload types to codecs (from ``?codec=`` or an SDP) on top of the static ones.
    ``dropped`` counts datagrams that were not played, by reason; ``rtcp_packets`` counts RTCP.
    """

    def __init__(self, codecs: Mapping[int, Codec] | None = None, *, timeout_s: float = 10.0,
                 max_streams: int = 64, min_delay_s: float = 0.02, max_delay_s: float = 0.1,
                 max_gap_s: float = 10.0, history_s: float = 60.0) -> None:
        self.codecs = default_codecs(codecs)
        self.timeout_s = timeout_s
        self.max_streams = max_streams
        self.streams: dict[int, RtpStream] = {}
        self.dropped: dict[str, int] = {}
        self.rtcp_packets = 0
        self._stream_args: dict[str, float] = {"min_delay_s": min_delay_s, "max_delay_s": max_delay_s,
                                               "max_gap_s": max_gap_s, "history_s": history_s}
        self._candidates: dict[int, _Candidate] = {}
        self._evict = random.Random(0)  # which candidate to forget when full (seeded: runs repeat)
        self._failed: dict[int, float] = {}  # ssrc -> last arrival
        self._refused: dict[int, float] = {}  # ssrc -> last arrival: confirmed senders the full port turned away
        self._byes: dict[int, float] = {}  # ssrc -> when its BYE came

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def datagram(self, data: bytes, addr: tuple[str, int], arrival_s: float) -> list[DemuxEvent]:
        """One UDP payload from ``addr``, received at ``arrival_s``; never raises on bad input."""
        if is_rtcp(data):
            self.rtcp_packets += 1
            byes = parse_rtcp_bye(data)
            return self._bye(byes, addr, arrival_s) if byes else []
        pkt = parse_rtp(data)
        if isinstance(pkt, str):
            self._drop(pkt)
            return []
        ssrc = pkt.ssrc
        stream = self.streams.get(ssrc)
        if stream is not None:
            if addr != stream.source_addr:
                self._drop("addr_mismatch")
            elif stream.ended:
                self._drop("after_end")
            else:
                stream.push(pkt, arrival_s)
                if stream.unknown_run >= UNKNOWN_PT_RUN:  # switched to a payload type nobody declared
                    del self.streams[ssrc]
                    stream.close("error")
                    self._failed[ssrc] = arrival_s
                    return [StreamFailed(ssrc, unknown_pt_message(ssrc, pkt.payload_type, addr)
                                         + f" (it switched to it after {stream.totals()['received']} packets)")]
            return []
        if ssrc in self._refused:
            if len(self.streams) >= self.max_streams:
                self._refused[ssrc] = arrival_s
                self._drop("refused_port_full")
                return []
            del self._refused[ssrc]  # a place came free: a sender like any other
        if ssrc in self._failed:
            self._failed[ssrc] = arrival_s
            self._drop("unknown_ssrc_after_failure")
            return []
        bye = self._byes.get(ssrc)
        if bye is not None:
            if arrival_s - bye < BYE_GRACE_S:
                self._drop("after_bye")
                return []
            del self._byes[ssrc]
        return self._probation(pkt, addr, arrival_s)

    def _probation(self, pkt: RtpPacket, addr: tuple[str, int], arrival_s: float) -> list[DemuxEvent]:
        ssrc = pkt.ssrc
        if not pkt.payload:  # headers alone prove nothing: a stream needs audio to be one
            self._drop("empty")
            return []
        cand = self._candidates.get(ssrc)
        if cand is None:
            if len(self._candidates) >= MAX_CANDIDATES:
                # A random one, not the oldest: with more new senders than places, arriving in the same order
                # every packet interval (a monitor restarted under traffic), forgetting the oldest would
                # forget each before its second packet and confirm none, ever; at random most survive a round.
                old = self._evict.choice(list(self._candidates))
                self._drop("unconfirmed", len(self._candidates.pop(old).packets))
            self._candidates[ssrc] = _Candidate(addr, [(pkt, arrival_s)], arrival_s)
            return []
        if addr != cand.addr:
            self._drop("addr_mismatch")
            return []
        seq = pkt.sequence
        confirmed = any((seq - p.sequence) % 65536 in (1, 65535) for p, _ in cand.packets)
        cand.packets.append((pkt, arrival_s))
        cand.last_arrival_s = arrival_s
        if not confirmed:
            if len(cand.packets) > PROBATION_PACKETS:
                cand.packets.pop(0)
                self._drop("unconfirmed")
            return []
        del self._candidates[ssrc]
        if pkt.payload_type not in self.codecs:
            self._failed[ssrc] = arrival_s
            self._drop("unknown_pt", len(cand.packets))
            return [StreamFailed(ssrc, unknown_pt_message(ssrc, pkt.payload_type, addr))]
        events: list[DemuxEvent] = []
        if len(self.streams) >= self.max_streams:
            victim = self._give_way(arrival_s)
            if victim is None:
                self._drop("refused_port_full", len(cand.packets))
                self._refused[ssrc] = arrival_s
                return [StreamFailed(ssrc, f"RTP stream {ssrc:08x} from {addr[0]}:{addr[1]} refused: the port "
                                           f"already takes {self.max_streams} senders, each sending audio; it "
                                           "gets in when one ends")]
            events.append(victim)
        stream = RtpStream(ssrc, addr, self.codecs, **self._stream_args)
        for p, t in cand.packets:
            stream.push(p, t)
        self.streams[ssrc] = stream
        events.append(NewStream(ssrc, stream))
        return events

    def _give_way(self, now_s: float) -> StreamGone | None:
        """The full port's slowest sender ends (``evicted``) when it sends less than audio would; else None."""
        ssrc, stream = min(self.streams.items(), key=lambda kv: kv[1].rate_pps(now_s))
        if stream.rate_pps(now_s) >= GIVE_WAY_PPS:
            return None
        del self.streams[ssrc]
        stream.close("evicted")
        return StreamGone(ssrc, "evicted")

    def _bye(self, ssrcs: list[int], addr: tuple[str, int], arrival_s: float) -> list[DemuxEvent]:
        events: list[DemuxEvent] = []
        for ssrc in ssrcs:
            stream = self.streams.get(ssrc)
            if stream is not None:
                if not _rtcp_of(stream.source_addr, addr):  # only the sender's own transport may end it
                    self._drop("bye_addr_mismatch")
                    continue
                del self.streams[ssrc]
                stream.close("bye")
                self._byes[ssrc] = arrival_s
                events.append(StreamGone(ssrc, "bye"))
            elif ssrc in self._candidates:
                if not _rtcp_of(self._candidates[ssrc].addr, addr):
                    self._drop("bye_addr_mismatch")
                    continue
                self._drop("unconfirmed", len(self._candidates.pop(ssrc).packets))
                self._byes[ssrc] = arrival_s
            elif ssrc in self._failed:
                del self._failed[ssrc]
        return events

    def expire(self, now_s: float) -> list[DemuxEvent]:
        """Streams silent for ``timeout_s`` at ``now_s`` end as ``"inactive"``; the others release due audio."""
        events: list[DemuxEvent] = []
        for ssrc, stream in list(self.streams.items()):
            if now_s - stream.last_arrival_s >= self.timeout_s:
                del self.streams[ssrc]
                stream.close("inactive")
                events.append(StreamGone(ssrc, "inactive"))
            else:
                stream.tick(now_s)
        for ssrc, cand in list(self._candidates.items()):
            if now_s - cand.last_arrival_s >= min(PROBATION_S, self.timeout_s):
                del self._candidates[ssrc]
                self._drop("unconfirmed", len(cand.packets))
        for table in (self._failed, self._refused):
            for ssrc, last in list(table.items()):
                if now_s - last >= self.timeout_s:
                    del table[ssrc]
        for ssrc, when in list(self._byes.items()):
            if now_s - when >= BYE_GRACE_S:
                del self._byes[ssrc]
        return events
