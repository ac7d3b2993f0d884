"""The playout buffer and RFC 3550 counting on their own, and the per-window history of media time."""

from __future__ import annotations

import numpy as np
import pytest

from scoreq_live.rtp import jitter as jb
from scoreq_live.rtp.jitter import JitterBuffer, Slot
from scoreq_live.rtp.netstats import NetHistory, NetWindow, burst_ratio
from scoreq_live.rtp.packet import RtpPacket

PT = 0
CLOCK = 8000
STEP = 160  # 20 ms at 8 kHz


def pkt(seq: int, ts: int | None = None) -> RtpPacket:
    return RtpPacket(PT, False, seq & 0xFFFF, (seq * STEP if ts is None else ts) & 0xFFFFFFFF, 1, b"x")


def seqs(slots: list[Slot]) -> list[int | tuple[str, int]]:
    """Released slots as their 16-bit sequence numbers, losses as ("lost", count)."""
    return [s.packet.sequence if s.packet is not None else ("lost", s.lost) for s in slots]


def feed(buf: JitterBuffer, order: list[int], t0: float = 0.0, dt: float = 0.02) -> list[Slot]:
    out: list[Slot] = []
    for i, s in enumerate(order):
        t = t0 + i * dt
        buf.push(pkt(s), t, CLOCK)
        out += buf.release(t)
    return out


def test_in_order_packets_leave_at_once_after_the_start() -> None:
    buf = JitterBuffer(min_delay_s=0.02, max_delay_s=0.1)
    buf.push(pkt(10), 0.0, CLOCK)
    assert buf.release(0.0) == []  # the first release waits min_delay for reordered first packets
    buf.push(pkt(11), 0.02, CLOCK)
    assert seqs(buf.release(0.02)) == [10, 11]
    for i in range(12, 40):
        buf.push(pkt(i), (i - 10) * 0.02, CLOCK)
        assert seqs(buf.release((i - 10) * 0.02)) == [i]  # no buffering latency in order
    assert (buf.expected, buf.received, buf.lost, buf.duplicated, buf.late) == (30, 30, 0, 0, 0)


def test_reordered_first_packets_start_with_the_lowest() -> None:
    buf = JitterBuffer()
    out = feed(buf, [101, 100, 102, 103], dt=0.005)
    out += buf.release(1.0)
    assert seqs(out) == [100, 101, 102, 103]
    assert buf.expected == 4 and buf.lost == 0


def test_hole_waits_then_is_given_up_and_the_straggler_is_late() -> None:
    buf = JitterBuffer(min_delay_s=0.03, max_delay_s=0.03)
    out = feed(buf, [1, 2, 4])  # 4 arrives at t = 0.04
    assert seqs(out) == [1, 2]
    assert buf.release(0.069) == []  # still waiting for 3
    assert seqs(buf.release(0.07)) == [("lost", 1), 4]
    status, _ = buf.push(pkt(3), 0.08, CLOCK)
    assert status == jb.LATE
    assert (buf.expected, buf.received, buf.lost, buf.late, buf.given_up) == (4, 4, 0, 1, 1)


def test_reordering_within_the_wait_loses_nothing() -> None:
    buf = JitterBuffer(min_delay_s=0.03)
    order = list(range(200))
    for i in range(5, 195, 7):
        order[i], order[i + 1] = order[i + 1], order[i]
    out = feed(buf, order) + buf.flush()
    assert seqs(out) == list(range(200))
    assert (buf.expected, buf.received, buf.lost, buf.late) == (200, 200, 0, 0)


def test_sequence_and_timestamp_wrap() -> None:
    buf = JitterBuffer()
    start = 65530
    ts0 = 2**32 - 3 * STEP
    order = [start + i for i in range(20)]
    for i, s in enumerate(order):
        buf.push(pkt(s, ts0 + (s - start) * STEP), i * 0.02, CLOCK)
    out = buf.flush()
    assert [s.seq for s in out] == list(range(out[0].seq, out[0].seq + 20))  # extended: no wrap
    assert [s.ts - out[0].ts for s in out] == [i * STEP for i in range(20)]  # timestamps unwrapped too
    assert [s.packet.sequence for s in out if s.packet] == [(start + i) & 0xFFFF for i in range(20)]
    assert buf.expected == 20 and buf.lost == 0


def test_loss_across_the_wrap_counts_exactly() -> None:
    buf = JitterBuffer()
    sent = [65500 + i for i in range(100)]
    dropped = {65530, 65535, 65536, 65540, 65541, 65542}
    out = feed(buf, [s for s in sent if s not in dropped]) + buf.flush()
    assert buf.expected == 100 and buf.lost == len(dropped) and buf.received == 100 - len(dropped)
    assert sum(s.lost for s in out) == len(dropped)
    assert [s.lost for s in out if s.packet is None] == [1, 2, 3]


def test_duplicates_are_counted_once_and_not_played() -> None:
    buf = JitterBuffer()
    order = [0, 1, 1, 2, 3, 2, 4, 0, 5]
    statuses = []
    out: list[Slot] = []
    for i, s in enumerate(order):
        statuses.append(buf.push(pkt(s), i * 0.02, CLOCK)[0])
        out += buf.release(i * 0.02)
    out += buf.flush()
    assert seqs(out) == [0, 1, 2, 3, 4, 5]
    assert statuses.count(jb.DUPLICATE) == 3
    assert (buf.expected, buf.received, buf.duplicated, buf.lost) == (6, 6, 3, 0)


def test_stray_jump_is_discarded_and_a_confirmed_one_is_a_restart() -> None:
    buf = JitterBuffer()
    out = feed(buf, [100, 101, 102])
    assert buf.push(pkt(40000), 0.06, CLOCK)[0] == jb.JUMP  # one stray packet: held, then dropped
    buf.push(pkt(103), 0.08, CLOCK)
    out += buf.release(0.08)
    assert buf.discarded == 1 and buf.expected == 4 and buf.lost == 0
    # the sender restarts at 9000: two sequential packets confirm it
    assert buf.push(pkt(9000, ts=5), 0.10, CLOCK)[0] == jb.JUMP
    buf.push(pkt(9001, ts=5 + STEP), 0.12, CLOCK)
    out += buf.release(0.12) + buf.flush()
    assert seqs(out) == [100, 101, 102, 103, 9000, 9001]
    assert [s.resync for s in out] == [False] * 4 + [True, False]
    assert (buf.resyncs, buf.expected, buf.received, buf.lost) == (1, 6, 6, 0)


def test_a_full_buffer_gives_up_without_waiting() -> None:
    buf = JitterBuffer(min_delay_s=0.05, max_delay_s=0.1, max_packets=8)
    buf.push(pkt(0), 0.0, CLOCK)
    buf.push(pkt(1), 1.0, CLOCK)
    assert seqs(buf.release(1.0)) == [0, 1]
    out: list[Slot] = []
    for s in range(3, 11):  # 2 is missing; arrival times do not advance (a burst)
        buf.push(pkt(s), 1.0, CLOCK)
        out += buf.release(1.0)
    assert seqs(out) == [("lost", 1)] + list(range(3, 11))


def test_wait_adapts_to_jitter_and_stays_bounded() -> None:
    rng = np.random.default_rng(3)
    buf = JitterBuffer(min_delay_s=0.02, max_delay_s=0.1)
    assert buf.delay_s == pytest.approx(0.02)
    n = 2000
    arrivals = np.arange(n) * 0.02 + rng.uniform(0.0, 0.06, n)
    order = np.argsort(arrivals, kind="stable")
    out: list[Slot] = []
    for i in order:
        buf.push(pkt(int(i)), float(arrivals[i]), CLOCK)
        out += buf.release(float(arrivals[i]))
    out += buf.flush()
    assert 0.04 <= buf.delay_s <= 0.1
    assert buf.lost == 0 and buf.received == n
    assert buf.late < 0.01 * n  # nearly every reordered packet was waited for
    # RFC 3550 A.8 on the same arrivals, in arrival order (the first 16 differences averaged)
    j, prev, k, total = 0.0, None, 0, 0.0
    for i in order:
        transit = arrivals[i] - i * STEP / CLOCK
        if prev is not None:
            k += 1
            j += (abs(transit - prev) - j) / min(k, 16)
            total += j
        prev = transit
    assert buf.jitter_s == pytest.approx(j, rel=1e-9)
    assert buf.jitter_mean_s == pytest.approx(total / k, rel=1e-9)
    # uniform 0..60 ms delay: mean |D| = 60/3 ms (a few per cent more in arrival order, as RFC 3550 takes it)
    assert 0.95 * 0.02 < buf.jitter_mean_s < 1.15 * 0.02


# ------------------------------------------------------------------------------------------- history


def test_history_windows_sum_and_stay_bounded() -> None:
    h = NetHistory(history_s=2.0)
    for k in range(1000):  # 20 s of packets, one per 20 ms (320 samples at 16 kHz)
        pos = k * 320.0
        if k % 10 == 3:
            h.add_missed(pos, 320.0, 1)
            h.add_concealed(pos, pos + 320)
        else:
            h.add_packet(pos, True)
        h.add_jitter(pos, k * 1e-5)
    released = 1000 * 320.0
    w = h.window(19.0, 20.0, released, "PCMU", False, 0.0)
    assert isinstance(w, NetWindow)
    assert (w.expected, w.received, w.lost) == (50, 45, 5)
    assert w.loss_pct == pytest.approx(10.0)
    assert w.concealed == pytest.approx(0.1)
    assert w.jitter_ms == pytest.approx(974.5 * 1e-2)  # the estimate averaged over the window's packets
    old = h.window(0.0, 1.0, released, "PCMU", False, 0.0)  # beyond the 2 s history: nothing kept
    assert old.expected == 0
    assert h._counts.shape[0] == 200  # fixed memory however long the call
    half = h.window(19.5, 20.5, released, "PCMU", False, 0.0)  # a window running past the released audio
    assert half.expected == 25 and half.concealed == pytest.approx(0.1, abs=0.05)
    d = w.to_dict()
    assert list(d) == ["codec", "expected", "received", "lost", "duplicated", "late", "loss_pct", "jitter_ms",
                       "concealed", "r_factor", "mos_cq"]
    assert d["r_factor"] < 93.2 and 1.0 <= d["mos_cq"] < 4.41


def test_burst_ratio() -> None:
    assert burst_ratio(0, 0, 100) == 1.0
    assert burst_ratio(10, 10, 100) == 1.0  # isolated losses
    assert burst_ratio(10, 1, 100) == pytest.approx(9.0)  # one run of 10 at 10 % loss


def test_a_timestamp_jump_is_not_jitter() -> None:
    """Sequence numbers go on, the timestamps jump by 2^31 (a sender's new timeline): jitter stays real."""
    buf = JitterBuffer(min_delay_s=0.02, max_delay_s=0.1)
    rng = np.random.default_rng(5)
    for i in range(200):
        ts = i * STEP + (2**31 if i >= 100 else 0)
        buf.push(pkt(i, ts), i * 0.02 + float(rng.uniform(0.0, 0.004)), CLOCK)
        buf.release(i * 0.02)
    assert buf.ts_jumps == 1
    assert buf.jitter_s < 0.005 and buf.jitter_mean_s < 0.005  # the 4 ms of real jitter, not 74 hours
