"""RTP over a real network path, end to end: UDP on 127.0.0.1, real speech in real packets, the RTP port
inside the running engine.

Senders are :mod:`tests.rtp_tools` (hand-made packets paced in real time, ffmpeg); an
:class:`~tests.rtp_tools.ImpairmentProxy` between sender and port drops, duplicates, reorders and delays
packets and records what it did, so every network number the port reports is checked against recorded
truth.  Packets are 5 ms of PCMU (40-byte payloads), so 1,200 of them take six seconds.  The decoded audio
of undisturbed streams is compared sample for sample with the same packets fed to the sans-I/O demux with
ideal arrival times: in-order packets are played as they come, so timing cannot change a sample.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.bus import EventBus
from scoreq_live.core.events import Event, ScoreEvent, StreamEnded, StreamError, StreamStarted
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.offline import window_results
from scoreq_live.rtp.codecs import STATIC
from scoreq_live.rtp.receiver import NewStream, RtpDemux
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sources.rtp import RtpPort, RtpSource, RtpSpec
from tests import rtp_tools as rt
from tests.helpers import MUSHRA, joined
from tests.test_sources_rtp import events_until, start_monitor, wait_bound

LOOPBACK = "127.0.0.1"
PACKET_MS = 5
PACKET_S = PACKET_MS / 1000
RATE_PPS = 1000 / PACKET_MS
STEP = 8000 * PACKET_MS // 1000  # PCMU timestamp units per packet
TIMEOUT_S = 0.5  # the ports' inactivity timeout
# The good stream's port beside a flood: a sender thread that the busy machine does not run for half a second
# must not split the stream in two; the stream still ends by this timeout once its last packet is in.
FLOODED_TIMEOUT_S = 2.0
SETTLE_S = 30.0  # the longest wait for what is sent to be taken and worked off (LIMIT_S bounds the run)
LIMIT_S = 40.0  # no engine run lasts longer, whatever happens
# Windows that do not overlap, so that the score events' net numbers add up to the stream's.
CFG = EngineConfig(stream=StreamConfig(window_s=1.0, hop_s=1.0, model="tiny"), max_batch=8)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory, data) -> Path:
    """About 12 s of real speech (MUSHRA references joined), 16 kHz mono."""
    path = tmp_path_factory.mktemp("rtpnet") / "speech.wav"
    sf.write(path, joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:4]), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def payloads(speech_wav) -> list[bytes]:
    """The speech as PCMU payloads of 5 ms (40 bytes) each."""
    out = rt.encode_packets(speech_wav, "pcmu", PACKET_MS)
    assert len(out) >= 2000 and {len(p) for p in out} == {8 * PACKET_MS}
    return out


@pytest.fixture
def tiny_scorer(tiny_nr):
    return Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=8)


def packets(payloads: list[bytes], ssrc: int, n: int, *, offset: int = 0, pt: int = 0, seq0: int = 1000,
            ts0: int = 160_000) -> list[bytes]:
    """``n`` RTP packets of real speech (payloads from ``offset`` on), seq and timestamps counting up."""
    return [rt.rtp_packet(seq0 + i, ts0 + i * STEP, ssrc, pt, payloads[(offset + i) % len(payloads)],
                          marker=i == 0) for i in range(n)]


def clean_audio(pkts: list[bytes]) -> np.ndarray:
    """What the receiver makes of ``pkts`` on a perfect network: the sans-I/O demux, ideal arrival times."""
    demux = RtpDemux(STATIC, timeout_s=TIMEOUT_S)
    out, stream = [], None
    for i, p in enumerate(pkts):
        for ev in demux.datagram(p, (LOOPBACK, 40000), i * PACKET_S):
            if isinstance(ev, NewStream):
                stream = ev.stream
        if stream is not None:
            out.append(stream.pull())
    assert stream is not None
    demux.expire(len(pkts) * PACKET_S + TIMEOUT_S)
    out.append(stream.finish())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ harness


class Port(RtpPort):
    """An RTP port on 127.0.0.1, bound at once, that keeps every stream it opened (the port itself forgets
    ended ones) and a copy of the audio each stream gave the engine."""

    def __init__(self, name: str, timeout_s: float = TIMEOUT_S) -> None:
        super().__init__(RtpSpec(LOOPBACK, rt.free_udp_port(), name=name), timeout_s)
        self.check()  # bound before any sender starts
        self.number = self.address[1]
        self.opened: dict[str, RtpSource] = {}
        self.audio: dict[str, list[np.ndarray]] = {}
        self.demuxed = 0  # datagrams the demux has worked off (port.received counts those taken from the socket)
        datagram = self.demux.datagram

        def counted(data: bytes, addr: tuple[str, int], arrival_s: float) -> list:
            self.demuxed += 1
            return datagram(data, addr, arrival_s)

        self.demux.datagram = counted  # type: ignore[method-assign]

    async def streams(self) -> AsyncIterator[RtpSource]:
        async for src in super().streams():
            assert isinstance(src, RtpSource)
            self.opened[src.name] = src
            kept: list[np.ndarray] = []
            self.audio[src.name] = kept
            inner = src.chunks

            async def chunks(inner=inner, kept=kept) -> AsyncIterator[np.ndarray]:
                async for c in inner():
                    kept.append(np.array(c, np.float32, copy=True))
                    yield c

            src.chunks = chunks  # type: ignore[method-assign]
            yield src

    def decoded(self, name: str) -> np.ndarray:
        return np.concatenate(self.audio[name]) if self.audio.get(name) else np.zeros(0, np.float32)

    def totals(self, ssrc: int) -> dict:
        src = self.opened[f"{self.name}-{ssrc:08x}"]
        assert src.stream is not None
        return src.stream.totals()

    def settled(self, sent: int) -> bool:
        """Each of the ``sent`` datagrams was taken from the socket (or, where the kernel tells, dropped by it),
        and each one taken is accounted for: a stream's packet, or counted (dropped by reason, overflow, RTCP).

        Datagrams of would-be streams are counted only once they are forgotten, so this also waits for that.
        """
        kernel = kernel_drops(self.number)
        if kernel is not None and self.received + kernel < sent:
            return False
        streams = sum(t["received"] + t["duplicated"] for t in (s.stream.totals() for s in self.opened.values()
                                                                   if s.stream is not None))
        return self.received == streams + sum(self.demux.dropped.values()) + self.overflow + self.demux.rtcp_packets


class Running:
    """An engine running ``inputs`` with the tiny model, its events collected as they come."""

    def __init__(self, scorer: Scorer, inputs: list) -> None:
        self.bus = EventBus()
        self.sub = self.bus.subscribe(maxsize=100_000)
        self.engine = Engine(scorer, inputs, CFG, self.bus)
        self.events: list[Event] = []

    async def _read(self) -> None:
        async for ev in self.sub:
            self.events.append(ev)

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.engine.run(duration=LIMIT_S))
        self.reader = asyncio.create_task(self._read())
        await asyncio.sleep(0.05)  # the ports' protocols are in place
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.engine.stop()
        await self.task
        await self.reader

    async def wait_for(self, cond: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            await asyncio.sleep(0.02)
        return cond()

    def ended(self, *names: str) -> bool:
        done = {e.stream for e in self.events if isinstance(e, StreamEnded)}
        return all(n in done for n in names)

    def of(self, name: str, kind: type[Event] = Event) -> list:
        return [e for e in self.events if e.stream == name and isinstance(e, kind)]


async def send(port: int, pkts: list[bytes], rate: float | None = RATE_PPS, sock: socket.socket | None = None) -> float:
    return await asyncio.to_thread(rt.send_packets, port, pkts, rate, sock=sock)


def rfc3550_mean_ms(times: list[float], tss: list[int], clock: int = 8000) -> float:
    """The RFC 3550 A.8 estimate after each packet (the receiver's: the first 16 averaged), averaged, in ms."""
    j = total = 0.0
    for k in range(1, len(times)):
        d = abs((times[k] - times[k - 1]) - (tss[k] - tss[k - 1]) / clock)
        j += (d - j) / min(k, 16)
        total += j
    return 1000.0 * total / max(len(times) - 1, 1)


# ------------------------------------------------------------------------------------------------ tests


async def test_impaired_network_loss_duplicates_reordering_and_jitter_are_reported_as_injected(
        payloads, tiny_scorer):
    """Two senders through two impairment proxies into one port: independent random loss with 0-30 ms of
    uniform delay (which reorders 5 ms packets), and Gilbert-Elliott bursts with duplicates and held-back
    packets.  Over 1,200 packets each, the port's loss and duplicate rates match the proxies' records within
    1 percentage point, the reordering count matches, and the jitter matches the injected delay variation
    within 20 %; the score events' ``net`` numbers add up to the same loss."""
    n = 1200
    port = Port("net")
    ssrc_r, ssrc_g = 0x5A0D0001, 0x6E0B0002
    random_loss = rt.ImpairmentProxy(port.number, seed=7, loss=0.05, duplicate=0.03, jitter="uniform",
                                     jitter_ms=(0.0, 30.0), keep_order=False)
    bursty = rt.ImpairmentProxy(port.number, seed=11, gilbert=(0.02, 0.25), duplicate=0.02, reorder=0.03,
                                reorder_k=2)
    pkts_r = packets(payloads, ssrc_r, n)
    pkts_g = packets(payloads, ssrc_g, n, offset=500, seq0=65000)  # its sequence numbers wrap
    names = [f"net-{ssrc_r:08x}", f"net-{ssrc_g:08x}"]
    async with Running(tiny_scorer, [port]) as run:
        with random_loss, bursty:
            await asyncio.gather(send(random_loss.port, pkts_r), send(bursty.port, pkts_g))
            assert all(await asyncio.gather(asyncio.to_thread(random_loss.wait_idle),
                                            asyncio.to_thread(bursty.wait_idle)))
        assert await run.wait_for(lambda: run.ended(*names), 10.0), [type(e).__name__ for e in run.events]

    report = []
    for name, ssrc, proxy in ((names[0], ssrc_r, random_loss), (names[1], ssrc_g, bursty)):
        truth = proxy.counts()
        got = port.totals(ssrc)
        assert truth["received"] == n and truth["overflow"] == 0
        loss_in = 100.0 * truth["dropped"] / n
        dup_in = 100.0 * truth["duplicated"] / n
        loss_out = got["loss_pct"]
        dup_out = 100.0 * got["duplicated"] / got["expected"]
        report.append(f"{name}: loss {loss_in:.2f}/{loss_out:.2f} % dup {dup_in:.2f}/{dup_out:.2f} %")
        assert loss_in > 3.0 and dup_in > 1.0  # the proxy really impaired the stream
        assert abs(loss_out - loss_in) <= 1.0, report
        assert abs(dup_out - dup_in) <= 1.0, report
        assert n - 2 <= got["expected"] <= n

        # The score events: every window carries net numbers; together they are the stream's.
        scores = run.of(name, ScoreEvent)
        assert len(scores) >= 5 and all(e.net is not None and e.net.codec == "PCMU" for e in scores)
        assert sum(e.mos is not None for e in scores) >= 4
        expected = sum(e.net.expected for e in scores)
        lost = sum(e.net.lost for e in scores)
        assert expected >= 0.95 * got["expected"], (expected, got)
        assert abs(100.0 * lost / expected - loss_in) <= 1.0, (lost, expected, report)
        assert abs(np.mean([e.net.loss_pct for e in scores]) - loss_in) <= 2.0, [e.net.loss_pct for e in scores]
        ended = run.of(name, StreamEnded)
        assert [e.reason for e in ended] == ["inactive"]

    # Bursts: the Gilbert-Elliott stream lost packets in runs (mean burst 1/r = 4 packets), the other did not.
    def mean_run(proxy: rt.ImpairmentProxy) -> float:
        flags = [r.dropped for r in proxy.records]
        runs = sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))
        return sum(flags) / max(runs, 1)

    assert mean_run(bursty) > 2.5 > 1.5 > mean_run(random_loss)

    # Reordering: each packet the proxy held back arrives two places late and is counted once.
    held = bursty.counts()["reordered"]
    assert held >= 15 and port.totals(ssrc_g)["reordered"] == held
    # Mostly played in time; one held back across a loss burst may come too late (counted, not lost).
    assert port.totals(ssrc_g)["late"] <= held // 4

    # Jitter: the delays drawn (0-30 ms, uniform) as an ideal network would deliver them, and what really
    # left the proxy (its send times, scheduling included).
    kept = sorted((r.index * PACKET_S + r.delay_s, r.ts) for r in random_loss.records if not r.dropped)
    injected_ms = rfc3550_mean_ms([t for t, _ in kept], [ts for _, ts in kept])
    got = port.totals(ssrc_r)
    out_ms = random_loss.rfc3550_jitter_ms(8000, "out")
    report.append(f"jitter injected {injected_ms:.2f} ms (ideal mean), reported mean {got['jitter_mean_ms']:.2f} ms; "
                  f"proxy out {out_ms:.2f} ms, reported now {got['jitter_ms']:.2f} ms")
    assert 8.0 < injected_ms < 13.0  # E|d1 - d2| = 10 ms for independent U(0, 30 ms) delays, a little more
    assert abs(got["jitter_mean_ms"] - injected_ms) <= 0.2 * injected_ms, report
    assert abs(got["jitter_ms"] - out_ms) <= 0.2 * out_ms, report
    windows_ms = [e.net.jitter_ms for e in run.of(names[0], ScoreEvent) if e.net.received]
    assert abs(np.mean(windows_ms) - injected_ms) <= 0.2 * injected_ms, (windows_ms, report)
    print("\n".join(report))


async def test_senders_on_one_port_are_streams_of_their_own_ended_by_timeout_or_bye(payloads, speech_wav,
                                                                                    tiny_scorer):
    """Three senders on one port: one stops (ended ``inactive`` after the 0.5 s timeout), one is ended by a
    hand-made RTCP BYE from another socket, and ffmpeg ends its stream with its own SR+BYE, which leaves
    from the next port up (RTCP multiplexed on the RTP port)."""
    rt.require_ffmpeg()
    port = Port("calls")
    quiet, byed, ffm = 0x0000A001, 0xB0B0B0B0, 0xFFEE0003
    names = {s: f"calls-{s:08x}" for s in (quiet, byed, ffm)}
    n = 240  # 1.2 s each
    sent: dict[int, float] = {}

    async def stop_after(ssrc: int, offset: int, bye: bool) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            await send(port.number, packets(payloads, ssrc, n, offset=offset), sock=s)
            sent[ssrc] = time.time()
            if bye:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:  # another port: not the sender
                    other.sendto(rt.rtcp_bye([ssrc], reason="forged"), (LOOPBACK, port.number))
                s.sendto(rt.rtcp_bye([ssrc], reason="hung up"), (LOOPBACK, port.number))  # rtcp-mux

    proc = None
    async with Running(tiny_scorer, [port]) as run:
        try:
            proc = rt.ffmpeg_rtp(speech_wav, port.number, "pcmu", ssrc=ffm, rtcp="mux", send_bye=True,
                                 start_s=3.0, duration_s=1.5)
            await asyncio.gather(stop_after(quiet, 0, False), stop_after(byed, 700, True))
            assert await asyncio.to_thread(proc.wait, 30) == 0, proc.stderr.read() if proc.stderr else ""
            sent[ffm] = time.time()
        finally:
            rt.stop_process(proc)
        assert await run.wait_for(lambda: run.ended(*names.values()), 10.0), [type(e).__name__ for e in run.events]

    started = {e.stream: e for e in run.events if isinstance(e, StreamStarted)}
    assert set(started) == set(names.values())
    assert all(e.source == "rtp" and e.rate == 16000 for e in started.values())
    assert "PCMU from 127.0.0.1:" in started[names[quiet]].detail
    ended = {e.stream: e for e in run.events if isinstance(e, StreamEnded)}
    assert {s: ended[name].reason for s, name in names.items()} == {quiet: "inactive", byed: "bye", ffm: "bye"}
    # The timeout counts from the last packet; the BYE ends a stream at once, well before it would have.
    assert TIMEOUT_S - 0.05 <= ended[names[quiet]].ts - sent[quiet] <= TIMEOUT_S + 1.5
    assert ended[names[byed]].ts - sent[byed] < TIMEOUT_S
    # ffmpeg's SR+BYE (from its RTP port + 1) and ours (rtcp-mux) end their streams; only the forged BYE
    # from another port is refused
    assert port.demux.rtcp_packets >= 3 and port.demux.dropped == {"bye_addr_mismatch": 1}
    for ssrc, seconds in ((quiet, n * PACKET_S), (byed, n * PACKET_S), (ffm, 1.5)):
        t = port.totals(ssrc)
        assert t["lost"] == 0 and t["duplicated"] == 0 and t["codec"] == "PCMU"
        assert abs(ended[names[ssrc]].t - seconds) < 0.1, (ssrc, ended[names[ssrc]].t)
        scores = run.of(names[ssrc], ScoreEvent)
        assert scores and all(e.net is not None and e.net.lost == 0 for e in scores)
    for ssrc in (quiet, byed):  # hand-made senders: the audio is exactly what their packets hold
        ref = clean_audio(packets(payloads, ssrc, n, offset=0 if ssrc == quiet else 700))
        assert np.array_equal(port.decoded(names[ssrc]), ref)


def malformed(ssrc: int, seq: int, ts: int, payload: bytes, kind: int) -> tuple[str, bytes]:
    """A broken packet that claims to be the good stream's next one: (the reason it must be dropped for, data)."""
    if kind == 0:
        return "truncated", rt.rtp_packet(seq, ts, ssrc, 0, payload, truncate=9)
    if kind == 1:
        return "bad_version", rt.rtp_packet(seq, ts, ssrc, 0, payload, version=1)
    if kind == 2:
        return "bad_csrc", rt.rtp_packet(seq, ts, ssrc, 0, payload, csrc_count=15)
    if kind == 3:
        return "bad_extension", rt.rtp_packet(seq, ts, ssrc, 0, payload, extension=(0xBEDE, b"\x10\xaa"),
                                              extension_words=4000)
    return "bad_padding", rt.rtp_packet(seq, ts, ssrc, 0, payload, padding=4, padding_count=250)


def flood_garbage(n: int) -> list[bytes]:
    """``n`` datagrams of random bytes, 1 to 300 long (a quarter of them look like RTP version 2)."""
    return [rt.garbage(1 + (i * 7919) % 300, seed=i) for i in range(n)]


async def blast(port: Port, datagrams: list[bytes], burst: int = 1000) -> float:
    """Send ``datagrams`` in bursts of ``burst`` at full speed, each once the port has worked off the one before;
    returns the seconds it took.

    A burst fits the socket's receive buffer (about 10,000 small datagrams) and the port's queue (4,096) even if
    the monitor's event loop is not scheduled at all meanwhile, and no burst goes before the last is worked
    off: the flood comes as fast as the monitor takes it, so the kernel and the queue drop nothing, however
    slow or busy the machine.
    """
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(0, len(datagrams), burst):
            # port.demuxed counts the good stream's datagrams too: at most its few hundred may still wait
            end = time.monotonic() + SETTLE_S
            while port.demuxed < i and time.monotonic() < end:
                await asyncio.sleep(0.005)
            assert port.demuxed >= i, f"the port worked off {port.demuxed} datagrams of {i} in {SETTLE_S} s"
            await send(port.number, datagrams[i:i + burst], rate=None, sock=s)
    return time.monotonic() - start


def kernel_drops(port: int) -> int | None:
    """Datagrams the kernel dropped for the UDP socket bound to 127.0.0.1:``port`` (Linux), for messages."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return None
    local = f"0100007F:{port:04X}"
    return sum(int(f[-1]) for f in (line.split() for line in lines) if f[1] == local) or 0


async def test_malformed_packets_and_a_garbage_flood_on_the_port_leave_the_good_stream_untouched(
        payloads, tiny_scorer):
    """While a good stream plays (1.6 s), every other datagram on the port is a broken packet carrying the
    good stream's SSRC and next sequence number (truncated, version 1, CSRC count past the end, header
    extension 16 kB long, padding longer than the packet), sent from the good sender's own socket; and
    20,000 datagrams of random bytes arrive from elsewhere, in bursts of 1,000 at full speed.  All are
    counted, by reason, and the good stream's decoded audio is sample for sample that of the clean packets."""
    port = Port("good", timeout_s=FLOODED_TIMEOUT_S)
    ssrc, n, n_flood = 0x600DC0DE, 320, 20_000
    good = packets(payloads, ssrc, n, offset=100)
    mixed: list[bytes] = []
    bad: dict[str, int] = {}
    for i, p in enumerate(good):
        reason, data = malformed(ssrc, 1000 + i + 1, 160_000 + (i + 1) * STEP, payloads[i], i % 5)
        bad[reason] = bad.get(reason, 0) + 1
        mixed += [p, data]
    garbage = flood_garbage(n_flood)
    name = f"good-{ssrc:08x}"

    async def flood_later() -> float:
        while port.demuxed < 40:  # the good stream is playing (its first 20 packets are in)
            await asyncio.sleep(0.005)
        return await blast(port, garbage)

    async with Running(tiny_scorer, [port]) as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            _, flood_s = await asyncio.gather(send(port.number, mixed, rate=2 * RATE_PPS, sock=s),
                                              asyncio.wait_for(flood_later(), SETTLE_S))
        assert await run.wait_for(lambda: run.ended(name), SETTLE_S)
        # Every datagram taken and accounted for: the flood's would-be streams (one packet each) are forgotten.
        assert await run.wait_for(lambda: port.settled(2 * n + n_flood), SETTLE_S), (port.received, port.demuxed)
        drops = f"the kernel dropped {kernel_drops(port.number)} datagrams for the port"

    t = port.totals(ssrc)
    dropped = port.demux.dropped
    # Every datagram the port took from the socket is accounted for: the good stream's, or counted.
    assert port.received == t["received"] + t["duplicated"] + sum(dropped.values()) + port.overflow \
        + port.demux.rtcp_packets, (port.received, t, dropped, port.overflow)
    flood_in = port.received - 2 * n  # the flood's datagrams that reached the port (the kernel may drop some)
    assert flood_in >= n_flood // 2, (flood_in, flood_s, drops)
    for reason, count in bad.items():
        assert dropped.get(reason, 0) >= count, (reason, dropped)
    assert dropped.get("unconfirmed", 0) > 0  # random RTP-looking ones never became streams
    started = [e.stream for e in run.events if isinstance(e, StreamStarted)]
    assert started == [name] and not [e for e in run.events if isinstance(e, StreamError)]
    # The good stream: no packet lost or late, its audio exactly that of the clean packets.
    assert (t["expected"], t["received"], t["lost"], t["late"]) == (n, n, 0, 0), (t, drops)
    assert np.array_equal(port.decoded(name), clean_audio(good))
    assert run.of(name, StreamEnded)[0].reason == "inactive"
    print(f"flood of {n_flood} in {flood_s:.2f} s: {flood_in} reached the port, overflow {port.overflow}, "
          f"dropped {dropped}")


async def test_a_flood_on_another_port_does_not_stall_the_good_stream(payloads, tiny_scorer):
    """A second port in the same monitor takes 30,000 datagrams at full speed while the good stream plays:
    the good stream loses no packet, none comes late, and its audio is exactly that of its packets."""
    port, other = Port("good", timeout_s=FLOODED_TIMEOUT_S), Port("busy")
    ssrc, n, n_flood = 0x0D15EA5E, 320, 30_000
    good = packets(payloads, ssrc, n, offset=900)
    garbage = flood_garbage(n_flood)
    name = f"good-{ssrc:08x}"

    async def flood_later() -> float:
        while port.demuxed < 20:  # the good stream is playing
            await asyncio.sleep(0.005)
        return await send(other.number, garbage, rate=None)  # all at once: the kernel drops what does not fit

    async with Running(tiny_scorer, [port, other]) as run:
        _, flood_s = await asyncio.gather(send(port.number, good), asyncio.wait_for(flood_later(), SETTLE_S))
        assert await run.wait_for(lambda: run.ended(name), SETTLE_S)
        # Every datagram taken and accounted for: the flood's would-be streams (one packet each) are forgotten.
        assert await run.wait_for(lambda: other.settled(n_flood), SETTLE_S), (other.received, other.demuxed)
        drops = f"the kernel dropped {kernel_drops(port.number)} datagrams for the good port"
    t = port.totals(ssrc)
    assert (t["expected"], t["received"], t["lost"], t["late"], t["duplicated"]) == (n, n, 0, 0, 0), (t, drops)
    assert np.array_equal(port.decoded(name), clean_audio(good))
    assert other.received >= 5000 and not other.opened  # what the kernel held, at the least
    assert other.received == sum(other.demux.dropped.values()) + other.overflow + other.demux.rtcp_packets
    assert not port.demux.dropped and port.overflow == 0
    print(f"flood of {n_flood} in {flood_s:.2f} s on another port: {other.received} arrived, "
          f"overflow {other.overflow}; good stream jitter {t['jitter_mean_ms']:.2f} ms")


async def test_an_undeclared_payload_type_is_one_stream_error_and_the_other_stream_plays_on(payloads, tiny_scorer):
    """A sender using dynamic payload type 96 on a port without ``?codec=``: one ``stream_error`` that names
    the payload type (not one per packet), nothing started for it; the PCMU sender beside it is untouched."""
    port = Port("pt")
    odd, fine, n = 0x00000096, 0x0000F1E0, 240
    odd_pkts = packets(payloads, odd, n, pt=96)
    fine_pkts = packets(payloads, fine, n, offset=1200)
    async with Running(tiny_scorer, [port]) as run:
        await asyncio.gather(send(port.number, odd_pkts), send(port.number, fine_pkts))
        assert await run.wait_for(lambda: run.ended(f"pt-{fine:08x}"), 10.0)
        await asyncio.sleep(0.2)
    errors = [e for e in run.events if isinstance(e, StreamError)]
    assert len(errors) == 1 and errors[0].stream == f"pt-{odd:08x}", errors
    assert "payload type 96" in errors[0].error and "codec=" in errors[0].error, errors[0].error
    assert not run.of(f"pt-{odd:08x}", StreamStarted) and not run.of(f"pt-{odd:08x}", ScoreEvent)
    # Every packet of the odd sender was counted (the two that confirmed it, then the rest), none played.
    d = port.demux.dropped
    assert d.get("unknown_pt", 0) + d.get("unknown_ssrc_after_failure", 0) == n, d
    name = f"pt-{fine:08x}"
    t = port.totals(fine)
    assert (t["received"], t["lost"]) == (n, 0) and run.of(name, StreamEnded)[0].reason == "inactive"
    assert np.array_equal(port.decoded(name), clean_audio(fine_pkts))
    assert sum(e.mos is not None for e in run.of(name, ScoreEvent)) >= 1


def test_an_sdp_file_names_the_port_and_the_dynamic_opus_payload_type_for_the_cli(tmp_path, speech_wav, tiny_nr,
                                                                                   tiny_scorer):
    """``scoreq-live monitor -i call.sdp``: the SDP ffmpeg writes for Opus on dynamic payload type 111 is all
    the monitor is told; ffmpeg's stream is decoded as Opus and scored, its windows at the levels (and nearly
    the scores) of the same audio through the same encoder decoded offline."""
    rt.require_ffmpeg()
    port, ssrc, start_s, seconds = rt.free_udp_port(), 0x0B05D9F1, 2.0, 5.0
    sdp = tmp_path / "call.sdp"
    sdp.write_text(rt.ffmpeg_sdp(port, "opus", payload_type=111))
    assert f"m=audio {port} RTP/AVP 111" in sdp.read_text() and "a=rtpmap:111 opus/48000/2" in sdp.read_text()
    mon = start_monitor("-i", str(sdp), "--rtp-timeout", "1", "--duration", "60", "--no-ws", "--model", str(tiny_nr),
                        "--model-kind", "mos", "--window", "1", "--hop", "1")
    sender = None
    name = f"{port}-{ssrc:08x}"
    try:
        wait_bound(port, mon)
        sender = rt.ffmpeg_rtp(speech_wav, port, "opus", ssrc=ssrc, payload_type=111, start_s=start_s,
                               duration_s=seconds)
        assert sender.wait(60) == 0, sender.stderr.read() if sender.stderr else ""
        events = events_until(mon, {name}, timeout=60)
    finally:
        rt.stop_process(sender)
        rt.stop_process(mon)  # type: ignore[arg-type]
    mine = [e for e in events if e["stream"] == name and e["type"] != "stream_record"]
    assert mine and mine[0]["type"] == "stream_started" and mine[-1]["type"] == "stream_ended", events[-5:]
    assert "opus from 127.0.0.1:" in mine[0]["detail"] and mine[-1]["reason"] == "inactive"
    assert not [e for e in events if e["type"] == "stream_error"]
    scores = [e for e in mine if e["type"] == "score"]
    assert all(e["net"]["codec"] == "opus" and e["net"]["lost"] == 0 for e in scores)
    live = [e["mos"] for e in scores]
    assert abs(mine[-1]["t"] - seconds) < 0.2 and len(live) >= 4 and None not in live[:4], live

    # The offline reference: the same excerpt through the same encoder, decoded by ffmpeg.  Opus over RTP
    # plays the encoder's pre-skip (6.5 ms) that the ogg round trip drops: the windows differ by that much.
    cfg = StreamConfig(window_s=1.0, hop_s=1.0, model="tiny")
    ref = window_results(rt.encode_like_ffmpeg(speech_wav, "opus", start_s=start_s, duration_s=seconds),
                         tiny_scorer, cfg)
    assert min(len(scores), len(ref)) >= 4
    levels = [(e["level_dbfs"], r.level_dbfs) for e, r in zip(scores[:4], ref[:4])]  # the loud, full windows
    print("opus via SDP, level live/offline:", [(round(a, 2), round(b, 2)) for a, b in levels],
          "mos:", [(round(e["mos"] or 0, 3), round(r.mos or 0, 3)) for e, r in zip(scores, ref)])
    assert max(abs(a - b) for a, b in levels) < 0.3, levels
    assert max(a for a, _ in levels) - min(a for a, _ in levels) > 2.0  # the levels follow the speech
    assert max(abs(e["mos"] - r.mos) for e, r in zip(scores[:4], ref[:4])) < 0.1


async def test_a_stalled_event_loop_neither_ends_nor_splits_live_calls(payloads, tiny_scorer):
    """The event loop blocked for four times the inactivity timeout while four senders go on: each call is one
    stream from start to end, nothing of it is lost, and its jitter is the network's (the packets that waited
    in the kernel carry their receive times), not the stall's."""
    port = Port("stall")
    ssrcs = [0x57A11ED0 + k for k in range(4)]
    names = [f"stall-{ssrc:08x}" for ssrc in ssrcs]
    n = 1000  # 5 s of 5 ms packets each
    calls = [packets(payloads, ssrc, n, offset=200 * k) for k, ssrc in enumerate(ssrcs)]
    stalling = threading.Event()
    stall_s = 4 * TIMEOUT_S

    def send_all(socks: list[socket.socket], first: int, last: int) -> None:
        t0 = time.monotonic()
        for i in range(first, last):
            for s, pkts in zip(socks, calls):
                s.sendto(pkts[i], (LOOPBACK, port.number))
            wait = t0 + (i - first + 1) * PACKET_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)

    def sender() -> float:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in calls]
        try:
            send_all(socks, 0, 100)
            assert stalling.wait(30), "the loop was never stalled"
            send_all(socks, 100, n)  # 4.5 s: overlaps the stall by construction
            return time.time()
        finally:
            for s in socks:
                s.close()

    async with Running(tiny_scorer, [port]) as run:
        sending = asyncio.create_task(asyncio.to_thread(sender))
        assert await run.wait_for(lambda: all(run.of(m, StreamStarted) for m in names), 20), run.events
        stalling.set()
        time.sleep(stall_s)  # blocks the event loop; the senders go on, their packets wait in the kernel
        sent = await sending
        assert await run.wait_for(lambda: run.ended(*names), 20), [type(e).__name__ for e in run.events]
    assert port.kernel_times == port.received  # every datagram with its kernel receive time (Linux)
    started = [e.stream for e in run.events if isinstance(e, StreamStarted)]
    assert sorted(started) == sorted(names), f"calls split: {started}"
    for ssrc, name in zip(ssrcs, names):
        ended = run.of(name, StreamEnded)
        assert len(ended) == 1 and ended[0].reason == "inactive" and ended[0].ts - sent >= TIMEOUT_S - 0.05
        t = port.totals(ssrc)
        assert t["expected"] == n and t["lost"] == 0 and t["late"] == 0, t
        jitter = [e.net.jitter_ms for e in run.of(name, ScoreEvent) if e.net is not None and e.net.received]
        assert jitter and max(jitter) < 50, jitter  # a 2 s stall read as jitter would be hundreds of ms
