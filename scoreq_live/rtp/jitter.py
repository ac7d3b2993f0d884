"""One RTP source's playout buffer and RFC 3550 receive statistics; sans-I/O (arrival times are passed in).

Sequence numbers are extended as in RFC 3550 A.1 (wrap-around counted in cycles; a jump of
more than ``MAX_DROPOUT`` ahead or ``MAX_MISORDER`` behind is taken as a restarted sender only when
the next packet confirms it, else the stray packet is discarded).  Timestamps are extended the same
way (signed 32-bit steps), so both wrap at 65535 / 2^32 without a glitch.

Playout policy (the buffer releases :class:`Slot` objects in sequence order; the caller decodes):

* A packet whose sequence number is the next one due is released at once: an in-order stream adds
  no buffering latency at all.
* When the next one due is missing but later packets are waiting, the buffer waits for it at most
  :attr:`JitterBuffer.delay_s` of arrival time, counted from the arrival of the earliest packet now
  waiting behind the hole (the moment the hole became visible), then gives it up as lost and moves on;
  it also gives up at once when ``max_packets`` packets are waiting (a burst, or arrival times that do
  not advance).  The time-out adapts: ``max(3 x interarrival jitter, 1.25 x the longest wait a
  reordered packet has needed recently)``, kept within ``[min_delay_s, max_delay_s]`` (default 20..100 ms).
* The very first release waits ``min_delay_s`` after the first packet, so that a stream whose first
  packets arrive out of order still starts with the lowest sequence number.
* A packet arriving after its slot was released or given up is *late*: counted, never played.
* Duplicates (same extended sequence number seen recently) are counted and dropped.

Counting (RFC 3550 A.3): ``expected = highest - base + 1`` (summed over sender restarts), ``received``
counts distinct packets including late ones (unlike RFC 3550, duplicates are not counted as received,
so ``lost = expected - received`` stays the network loss when packets are duplicated), ``lost`` is
clamped at 0.  Interarrival jitter
is RFC 3550 A.8 (``J += (|D| - J) / 16``), kept in seconds so that it survives a clock-rate change; the
first 16 differences are averaged (gain 1, 1/2, ... 1/16) so the estimate does not start 16 packets low.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoreq_live.rtp.packet import RtpPacket

MAX_DROPOUT = 3000  # RFC 3550 A.1: largest forward jump still taken as loss
# A change of transit time (arrival minus media time) beyond this between two packets is the sender's
# timestamps jumping, not the network: it is not folded into the jitter estimate (RFC 3550 A.8 assumes one
# timeline).  Queues that vary by seconds have lost the call anyway; the jitter buffer gives up long before.
MAX_TRANSIT_STEP_S = 3.0
MAX_MISORDER = 100  # RFC 3550 A.1: how far behind a packet may be and still be a reordered one
_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32
_TS_HALF = 1 << 31
_SEEN = 1024  # ring of recently seen extended sequence numbers, for duplicate detection (> MAX_MISORDER)

BUFFERED = "buffered"
DUPLICATE = "duplicate"
LATE = "late"
JUMP = "jump"  # a large sequence jump, held until the next packet confirms it (else discarded)
STALE = "stale"  # older than the first packet played: not counted as expected, received or late


@dataclass(slots=True)
class Slot:
    """One released stretch of the sequence: a packet, or ``lost`` consecutive packets given up.

    ``seq`` is the extended sequence number (of the first lost one for a loss), ``ts`` the packet's
    extended timestamp (0 for a loss), ``arrival_s`` when the packet arrived (for a loss: when it was
    given up).  ``resync`` marks the first slot after a sender restart (sequence and timestamps jumped).
    """

    seq: int
    packet: RtpPacket | None
    ts: int
    arrival_s: float
    lost: int = 0
    resync: bool = False


class JitterBuffer:
    """Reorders one SSRC's packets and releases them in sequence order; see the module docstring."""

    def __init__(self, *, min_delay_s: float = 0.02, max_delay_s: float = 0.1, max_packets: int = 64) -> None:
        if not 0.0 <= min_delay_s <= max_delay_s:
            raise ValueError(f"need 0 <= min_delay_s <= max_delay_s, got {min_delay_s}, {max_delay_s}")
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.max_packets = max(2, max_packets)
        # RFC 3550 A.1 state
        self._max: int | None = None  # highest extended sequence number
        self._base = 0
        self._bad_seq = -1
        self._pending: tuple[RtpPacket, float, int] | None = None  # an unconfirmed jump
        self._seen = [-1] * _SEEN
        self._ts_hi: int | None = None  # highest extended timestamp
        # counters
        self.received = 0
        self.duplicated = 0
        self.late = 0
        self.reordered = 0  # distinct packets that arrived after a higher sequence number
        self.discarded = 0  # stray packets of an unconfirmed sequence jump
        self.resyncs = 0  # sender restarts (confirmed sequence jumps)
        self.given_up = 0  # slots released as lost (network loss + packets that came too late)
        self._prior_expected = 0  # expected packets of the sequence before the last restart
        # RFC 3550 A.8 interarrival jitter, seconds
        self.jitter_s = 0.0
        self._jitter_n = 0
        self._jitter_sum = 0.0
        self._transit: float | None = None
        self.ts_jumps = 0  # timestamp discontinuities left out of the jitter estimate
        self._clock = 0
        # playout
        self._buf: dict[int, tuple[RtpPacket, int, float]] = {}  # ext seq -> (packet, ext ts, arrival)
        self._next: int | None = None  # next extended sequence number due; None until playout starts
        self._first_arrival = 0.0
        self._ready: list[Slot] = []  # released by a restart, handed out by the next release()
        self._resync_next = False
        self._wait_s = 0.0  # decaying maximum of the waits reordered packets needed
        self._last_giveup: tuple[float, float] | None = None  # (when, delay in force then)

    # ------------------------------------------------------------------ statistics

    @property
    def expected(self) -> int:
        """RFC 3550 A.3 expected packet count (highest extended sequence - base + 1, over restarts)."""
        if self._max is None:
            return self._prior_expected
        return self._prior_expected + self._max - self._base + 1

    @property
    def lost(self) -> int:
        """Expected minus received (distinct packets, late ones included), clamped at 0."""
        return max(self.expected - self.received, 0)

    @property
    def jitter_mean_s(self) -> float:
        """The jitter estimate averaged over every packet so far (steadier than :attr:`jitter_s`)."""
        return self._jitter_sum / self._jitter_n if self._jitter_n else 0.0

    @property
    def delay_s(self) -> float:
        """How long a hole in the sequence is waited for before it is given up (adaptive)."""
        want = max(3.0 * self.jitter_s, 1.25 * self._wait_s)
        return min(max(want, self.min_delay_s), self.max_delay_s)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # ------------------------------------------------------------------ input

    def push(self, pkt: RtpPacket, arrival_s: float, clock_rate: int) -> tuple[str, int]:
        """Take one packet; returns (status, extended timestamp).

        ``status`` is :data:`BUFFERED`, :data:`DUPLICATE`, :data:`LATE`, :data:`STALE` or :data:`JUMP`.  ``clock_rate``
        is the payload type's RTP clock for the jitter estimate; 0 leaves the estimate alone (packets
        whose timestamps are not sampling instants, such as telephone events).
        """
        ts = pkt.timestamp
        if self._ts_hi is None:
            ext_ts = ts
            self._ts_hi = ts
        else:
            d = (ts - self._ts_hi) % _TS_MOD
            if d >= _TS_HALF:
                d -= _TS_MOD
            ext_ts = self._ts_hi + d
            if d > 0:
                self._ts_hi = ext_ts

        seq = pkt.sequence
        mx = self._max
        if mx is None:
            ext = seq + _SEQ_MOD  # one cycle of head-room for packets reordered before the first one
            self._max = self._base = ext
            self._first_arrival = arrival_s
        else:
            udelta = (seq - mx) % _SEQ_MOD
            if udelta < MAX_DROPOUT:
                ext = mx + udelta
                if udelta:
                    self._max = ext
            elif udelta <= _SEQ_MOD - MAX_MISORDER:
                return self._jump(pkt, arrival_s, clock_rate, ext_ts)
            else:
                ext = mx - (_SEQ_MOD - udelta)
        self._bad_seq = -1
        if self._pending is not None:  # the jump was not confirmed: the stray packet goes
            self._pending = None
            self.discarded += 1

        i = ext % _SEEN
        if self._seen[i] == ext:
            self.duplicated += 1
            return DUPLICATE, ext_ts
        self._seen[i] = ext
        if mx is not None and ext < mx:
            self.reordered += 1
        self._update_jitter(arrival_s, ext_ts, clock_rate)

        nxt = self._next
        if nxt is None:
            if ext < self._base:  # reordered ahead of the first packet, before playout started
                self._base = ext
        elif ext < nxt:
            if ext < self._base:  # older than the whole stream: not one of ours to count
                return STALE, ext_ts
            self.received += 1
            self.late += 1
            if self._last_giveup is not None:  # how long it would have needed: wait longer next time
                when, delay = self._last_giveup
                self._observe_wait(delay + max(arrival_s - when, 0.0))
            return LATE, ext_ts
        elif ext == nxt and self._buf:  # fills the hole everything waits behind
            self._observe_wait(arrival_s - min(e[2] for e in self._buf.values()))
        self.received += 1
        self._buf[ext] = (pkt, ext_ts, arrival_s)
        self._wait_s *= 0.998
        return BUFFERED, ext_ts

    def _update_jitter(self, arrival_s: float, ext_ts: int, clock_rate: int) -> None:
        if clock_rate <= 0:
            return
        transit = arrival_s - ext_ts / clock_rate
        if self._transit is not None and clock_rate == self._clock:
            d = abs(transit - self._transit)
            if d > MAX_TRANSIT_STEP_S:
                # Not network jitter but the sender's timestamps jumping (a new timeline on the same
                # sequence): the estimate keeps its value and follows the new timeline from here.
                self.ts_jumps += 1
                self._transit = transit
                return
            self._jitter_n += 1
            self.jitter_s += (d - self.jitter_s) / min(self._jitter_n, 16)
            self._jitter_sum += self.jitter_s
        self._transit = transit
        self._clock = clock_rate

    def _observe_wait(self, wait_s: float) -> None:
        if wait_s > self._wait_s:
            self._wait_s = min(wait_s, self.max_delay_s)

    def _jump(self, pkt: RtpPacket, arrival_s: float, clock_rate: int, ext_ts: int) -> tuple[str, int]:
        seq = pkt.sequence
        pending = self._pending
        if pending is None or seq != self._bad_seq:
            if pending is not None:
                self.discarded += 1
            self._pending = (pkt, arrival_s, clock_rate)
            self._bad_seq = (seq + 1) % _SEQ_MOD
            return JUMP, ext_ts
        # Two sequential packets after a jump: the sender restarted.  Release the old sequence whole,
        # then start a new one with the held packet, keeping the counts of the old one.
        assert self._max is not None
        released = self.flush()
        self._ready = released
        self._prior_expected += self._max - self._base + 1
        first, first_arrival, first_clock = pending
        self._pending = None
        self._bad_seq = -1
        start = self._max + 1 + (first.sequence - self._max - 1) % _SEQ_MOD  # above all old numbers
        self._max = self._base = start
        self._next = start
        self._seen = [-1] * _SEEN
        self._transit = None
        self._ts_hi = None
        self.resyncs += 1
        self._resync_next = True
        self.push(first, first_arrival, first_clock)
        return self.push(pkt, arrival_s, clock_rate)

    # ------------------------------------------------------------------ output

    def release(self, now_s: float) -> list[Slot]:
        """Slots due at ``now_s`` (an arrival time, or a clock reading in the same time base), in order."""
        out = self._ready
        self._ready = []
        buf = self._buf
        if not buf:
            return out
        if self._next is None:
            if now_s - self._first_arrival < self.min_delay_s and len(buf) < self.max_packets:
                return out
            self._next = min(buf)
        self._drain(out, now_s, force=False)
        return out

    def flush(self) -> list[Slot]:
        """Everything still held, in order, holes given up (end of stream)."""
        out = self._ready
        self._ready = []
        if self._buf:
            if self._next is None:
                self._next = min(self._buf)
            self._drain(out, 0.0, force=True)
        return out

    def _drain(self, out: list[Slot], now_s: float, force: bool) -> None:
        buf = self._buf
        nxt = self._next
        assert nxt is not None
        delay = self.delay_s
        while buf:
            e = buf.pop(nxt, None)
            if e is not None:
                out.append(Slot(nxt, e[0], e[1], e[2], 0, self._resync_next))
                self._resync_next = False
                nxt += 1
                continue
            if not force:
                oldest = min(v[2] for v in buf.values())
                if now_s - oldest < delay and len(buf) < self.max_packets:
                    break
            first = min(buf)
            out.append(Slot(nxt, None, 0, now_s, first - nxt, self._resync_next))
            self._resync_next = False
            self.given_up += first - nxt
            if not force:
                self._last_giveup = (now_s, delay)
            nxt = first
        self._next = nxt
