"""SIP messages and calls (scoreq_live.sip), the live-capture demux on a written capture, and ``sniff:lo`` as
a user runs it: a real sipp call on loopback, captured live by the monitor process."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import soxr

from scoreq_live.rtp.capture import read_datagrams
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sip.dialog import DialogTracker
from scoreq_live.sip.message import MAX_MESSAGE, SipError, looks_like_sip, parse, split_stream
from scoreq_live.sources.sniff import LiveCalls, parse_sniff
from tests import rtp_tools as rt
from tests.helpers import EXAMPLES, unavailable

ALICE, BOB = ("10.0.0.1", 40000), ("10.0.0.2", 50000)


def sip(first: str, call_id: str = "c1@10.0.0.1", *, cseq: str = "1 INVITE", from_tag: str = "a1",
        to_tag: str = "", media: tuple[str, int] | None = None, frm: str = "alice", to: str = "bob",
        extra: str = "") -> bytes:
    body = b""
    if media is not None:
        body = (f"v=0\r\no=- 1 1 IN IP4 {media[0]}\r\ns=-\r\nc=IN IP4 {media[0]}\r\nt=0 0\r\n"
                f"m=audio {media[1]} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
                "a=rtpmap:101 telephone-event/8000\r\n").encode()
    tag = f";tag={to_tag}" if to_tag else ""
    head = (f"{first}\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1\r\n"
            f"From: \"{frm.title()}\" <sip:{frm}@example.net>;tag={from_tag}\r\nTo: <sip:{to}@example.net>{tag}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq}\r\n{extra}"
            + ("Content-Type: application/sdp\r\n" if body else "") + f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


# --- messages ---------------------------------------------------------------------------------------------


def test_a_request_and_a_response_with_compact_and_folded_headers():
    m = parse(sip("INVITE sip:bob@example.net SIP/2.0", media=ALICE))
    assert m.method == "INVITE" and m.is_request and m.call_id == "c1@10.0.0.1" and m.cseq == (1, "INVITE")
    assert (m.from_.user, m.from_.host, m.from_.name, m.from_.tag) == ("alice", "example.net", "Alice", "a1")
    assert m.to.user == "bob" and m.to.tag == "" and m.content_type == "application/sdp"
    assert m.body.startswith(b"v=0") and looks_like_sip(sip("BYE sip:x SIP/2.0"))
    compact = (b"SIP/2.0 180 Ringing\r\nv: SIP/2.0/UDP h\r\ni: abc\r\nf: <sip:a@h>;tag=1\r\n"
               b"t: <sip:b@h>\r\n ;tag=2\r\nCSeq: 7 INVITE\r\nl: 0\r\n\r\n")
    r = parse(compact)
    assert (r.status, r.reason, r.call_id, r.cseq) == (180, "Ringing", "abc", (7, "INVITE"))
    assert r.to.tag == "2"  # the folded line belongs to To
    assert not looks_like_sip(b"\x80\x00" + bytes(170)) and not looks_like_sip(b"GET / HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize("data, words", [
    (b"HELLO there\r\n\r\n", "not a SIP start line"),
    (b"INVITE sip:x SIP/2.0\r\nCall-ID: 1\r\nFrom: <sip:a@h>\r\nTo: <sip:b@h>\r\n\r\n", "no Cseq"),
    (b"INVITE sip:x SIP/2.0\r\nno colon here\r\n\r\n", "not a header line"),
    (b"INVITE sip:x SIP/2.0\r\nCall-ID: 1\r\nCSeq: 1 INVITE\r\nFrom: a\r\nTo: b\r\nContent-Length: 99\r\n\r\nv=0",
     "Content-Length says 99"),
    (b"INVITE sip:x SIP/2.0\r\n" + b"X: y\r\n" * (MAX_MESSAGE // 6), "bytes (at most"),
    (b"SIP/2.0 200 OK\r\nCall-ID: \xff\xfe\r\n\r\n", "not UTF-8"),
])
def test_malformed_messages_say_what_is_wrong(data, words):
    with pytest.raises(SipError, match=words.replace("(", r"\(")):
        parse(data)


def test_messages_are_cut_from_a_tcp_stream_by_content_length():
    a, b = sip("INVITE sip:bob@x SIP/2.0", media=ALICE), sip("SIP/2.0 100 Trying")
    buf = bytearray(b"\r\n\r\n" + a + b[:30])
    assert split_stream(buf) == [a] and bytes(buf) == b[:30]
    buf += b[30:]
    assert split_stream(buf) == [b] and not buf
    with pytest.raises(SipError):
        split_stream(bytearray(b"INVITE sip:x SIP/2.0\r\nCall-ID: 1\r\n\r\n"))


# --- calls ------------------------------------------------------------------------------------------------


def test_a_call_maps_each_sides_media_and_ends_with_bye():
    tr = DialogTracker()
    call = tr.message(parse(sip("INVITE sip:bob@x SIP/2.0", media=ALICE)), 0.0)
    assert call is not None and call.caller.user == "alice" and call.callee.user == "bob"
    tr.message(parse(sip("SIP/2.0 180 Ringing", to_tag="b1")), 0.1)
    tr.message(parse(sip("SIP/2.0 200 OK", to_tag="b1", media=BOB)), 0.5)
    assert call.answered == 0.5 and call.ended is None
    # RTP to alice's address is bob speaking (it reaches the caller), and the other way round.
    assert tr.media(ALICE).to_caller and not tr.media(BOB).to_caller and tr.media(("10.0.0.3", 1)) is None
    assert call.stream_name("lo", to_caller=False).startswith("lo-alice-to-bob-")
    assert call.codecs[BOB][0].name == "PCMU"
    # A re-INVITE from bob (the callee: his From tag) moves bob's media; both addresses stay mapped.
    moved = ("10.0.0.2", 50010)
    tr.message(parse(sip("INVITE sip:alice@x SIP/2.0", cseq="1 INVITE", frm="bob", to="alice", from_tag="b1",
                         to_tag="a1", media=moved)), 5.0)
    assert not tr.media(moved).to_caller and call.callee_media == [BOB, moved]
    tr.message(parse(sip("BYE sip:bob@x SIP/2.0", cseq="2 BYE", to_tag="b1")), 9.0)
    assert (call.ended, call.end_reason) == (9.0, "bye")
    assert tr.expire(9.5) == [] and tr.expire(30.0) == [call] and tr.media(ALICE) is None


def test_cancel_and_a_rejected_call_end_it_and_unknown_messages_are_ignored():
    tr = DialogTracker()
    a = tr.message(parse(sip("INVITE sip:bob@x SIP/2.0", "a", media=ALICE)), 0.0)
    tr.message(parse(sip("CANCEL sip:bob@x SIP/2.0", "a", cseq="1 CANCEL")), 1.0)
    b = tr.message(parse(sip("INVITE sip:bob@x SIP/2.0", "b")), 0.0)
    tr.message(parse(sip("SIP/2.0 486 Busy Here", "b", to_tag="x")), 0.2)
    assert a.end_reason == "cancel" and b.end_reason == "rejected 486"
    assert tr.message(parse(sip("BYE sip:bob@x SIP/2.0", "nobody", cseq="2 BYE")), 0.3) is None and tr.ignored == 1


def test_ten_thousand_half_open_calls_are_bounded_and_a_real_call_is_kept():
    tr = DialogTracker(max_calls=1000)
    real = tr.message(parse(sip("INVITE sip:bob@x SIP/2.0", "real", media=ALICE)), 0.0)
    tr.message(parse(sip("SIP/2.0 200 OK", "real", to_tag="b", media=BOB)), 0.1)
    for i in range(10_000):
        tr.message(parse(sip("INVITE sip:bob@x SIP/2.0", f"junk{i}")), 1.0 + i * 1e-4)
    assert len(tr.calls) == 1000 and tr.evicted == 10_001 - 1000
    assert "real" in tr.calls and tr.media(BOB).call is real  # the answered call outlives the half-open flood
    assert tr.expire(100.0) and len(tr.calls) == 1  # never answered within the setup time: forgotten


# --- the live demux on a written capture -------------------------------------------------------------------


def test_live_calls_name_both_directions_of_a_captured_sip_call_as_score_does(tmp_path, tiny_nr):
    """The live demux, fed a capture's datagrams, finds the call's two directions (and, unless sip-only, the
    other RTP); `scoreq-live score` on the same capture names the same streams (one dialog tracker)."""
    rt.require_ffmpeg()
    pcap = tmp_path / "call.pcap"
    rt.write_pcap(pcap, [rt.RtpFlow(EXAMPLES / "clean.wav", "pcmu", src=ALICE, dst=BOB, ssrc=0xA, duration_s=4.0,
                                    start_s=0.5),
                         rt.RtpFlow(EXAMPLES / "lyra3.wav", "pcmu", src=BOB, dst=ALICE, ssrc=0xB, duration_s=4.0,
                                    start_s=0.6),
                         rt.RtpFlow(EXAMPLES / "clean.wav", "pcmu", src=("10.9.9.9", 7000), dst=("10.0.0.5", 7002),
                                    ssrc=0xC, duration_s=4.0, start_s=0.6)],
                  extra=[(0.0, ("10.0.0.1", 5060), ("10.0.0.2", 5060), sip("INVITE sip:bob@x SIP/2.0",
                                                                            media=ALICE)),
                         (0.2, ("10.0.0.2", 5060), ("10.0.0.1", 5060), sip("SIP/2.0 200 OK", to_tag="b1",
                                                                            media=BOB)),
                         (4.9, ("10.0.0.1", 5060), ("10.0.0.2", 5060), sip("BYE sip:bob@x SIP/2.0", cseq="2 BYE",
                                                                            to_tag="b1"))])
    for sip_only in (False, True):
        calls = LiveCalls("call", timeout_s=1.0, sip_only=sip_only)
        started, ended = [], {}
        for d in read_datagrams(pcap):
            calls.feed(d, d.ts)
            calls.adapter.deliver()
            started += calls.adapter.new()
            for src in started:
                if src.done and src.name not in ended:
                    ended[src.name] = src.end_reason
        calls.expire(d.ts + 10)
        names = sorted(s.name for s in started)
        sip_names = [n for n in names if "-to-" in n]
        assert len(sip_names) == 2 and {n.split("-to-")[0] for n in sip_names} == {"call-alice", "call-bob"}
        assert names == sorted(sip_names + ([] if sip_only else ["call-0000000c"]))
        by = {s.name: s for s in started}
        alice = by[next(n for n in sip_names if n.startswith("call-alice"))]
        assert alice.call == "c1@10.0.0.1" and alice.meta["from"] == "alice" and alice.meta["to"] == "bob"
        assert alice.meta["speaker"] == "alice" and alice.meta["local"] == "10.0.0.2:50000"
        assert all(ended[n] == "bye" for n in sip_names), ended
    out = tmp_path / "scores.json"
    r = subprocess.run([sys.executable, "-m", "scoreq_live", "score", pcap, "--model", tiny_nr, "--model-kind", "mos",
                        "--json", out, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    offline = {e["stream"]: e["call"] for e in json.loads(out.read_text())}
    assert offline == {**{n: "c1@10.0.0.1" for n in sip_names}, "call-0000000c": ""}


# --- sniff:lo, a real sipp call ------------------------------------------------------------------------------


def _can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3)).close()
    except (PermissionError, AttributeError, OSError):
        return False
    return True


def test_sniff_spec_options_and_errors():
    s = parse_sniff("eth0?sip-ports=5060,5080&sip-only=1", "office")
    assert (s.iface, s.sip_ports, s.sip_only, s.prefix) == ("eth0", (5060, 5080), True, "office")
    for bad in ("", "eth0?x=1", "eth0?sip-ports=abc", "a b"):
        with pytest.raises(Exception, match="sniff"):
            parse_sniff(bad)


@pytest.mark.parametrize("codec, pt, rtpmap", [("pcmu", 0, "PCMU/8000"), ("g722", 9, "G722/8000")])
def test_a_sipp_call_on_loopback_is_found_named_and_scored_live(tmp_path, codec, pt, rtpmap):
    """sipp calls sipp on 127.0.0.1 and replays real speech (PCMU, G.722) to the answer's address (where
    nothing listens); the monitor captures lo: one stream named after the call, its Call-ID as the call key,
    ended by the BYE, scoring like the same payloads decoded offline by another decoder (G.711 tables; ffmpeg's
    G.722)."""
    from tests.test_sources_rtp import offline_mean, start_monitor

    rt.require_sipp()
    if not _can_capture():
        unavailable("live capture needs CAP_NET_RAW (run the tests as root)")
    wav = tmp_path / "speech.wav"
    x, rate = sf.read(EXAMPLES / "clean.wav", dtype="float32")
    sf.write(wav, x[: rate * 12], rate, subtype="PCM_16")
    pcap = tmp_path / "caller.pcap"
    rt.write_pcap(pcap, [rt.RtpFlow(wav, codec, ssrc=0x5EEDF00D)])
    payloads = [h.payload for *_, p in rt.read_pcap_udp(pcap) if (h := rt.parse_rtp_header(p)) is not None]
    port = rt.free_udp_port()
    mon = start_monitor("-i", "call=sniff:lo", "--rtp-timeout", "2", "--duration", "90")
    # tcpdump records the same traffic: `score` on its file must find the same stream (the dialog tracker)
    (tmp_path / "dump").mkdir()
    dump = tmp_path / "dump" / "call.pcap"
    tcpdump = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-w", str(dump), "udp"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True) if shutil.which("tcpdump") else None
    try:
        time.sleep(3.0)  # the model loads and the capture opens (nothing to wait on: it binds no port)
        assert mon.poll() is None, mon.stderr.read() if mon.stderr else ""
        with rt.sipp_rtp(pcap, port, payload_type=pt, rtpmap=rtpmap) as call:
            # Meanwhile, to the SIP port: 2,000 datagrams of garbage and 10,000 INVITEs that are never answered.
            flood = threading.Thread(target=_sip_flood, args=(2_000, 10_000))
            flood.start()
            call.wait()
            flood.join(60)
            events = _until_the_call_record(mon)
    finally:
        rt.stop_process(mon)  # type: ignore[arg-type]
        if tcpdump is not None:
            tcpdump.send_signal(signal.SIGINT)
            tcpdump.wait(10)
    started = [e for e in events if e["type"] == "stream_started"]
    assert len(started) == 1, [e["stream"] for e in started]
    st = started[0]
    assert st["stream"].startswith("call-sipp-to-monitor-") and st["source"] == "rtp", st
    assert st["meta"]["from"] == "sipp" and st["meta"]["to"] == "monitor" and st["call"] == st["meta"]["call_id"]
    ended = next(e for e in events if e["type"] == "stream_ended")
    assert ended["reason"] == "bye", ended
    # Nothing is lost on loopback, unless the kernel dropped captured packets on a busy machine: then the
    # monitor says so (capture drops), and the loss is at most what it dropped.
    said = getattr(mon, "stderr_text", "") or ""
    dropped = sum(int(n) for n in re.findall(r"kernel dropped (\d+) packets", said))
    assert ended["net"]["lost"] <= dropped, (ended["net"], said[-2000:])
    live = [e["mos"] for e in events if e["type"] == "score" and e["mos"] is not None]
    assert len(live) >= 3
    if codec == "pcmu":
        decoded = soxr.resample(rt.g711_decode(b"".join(payloads)), 8000, 16000, quality="HQ").astype(np.float32)
    else:  # ffmpeg's G.722 decoder on the same payloads, end to end
        (tmp_path / "payloads.g722").write_bytes(b"".join(payloads))
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "g722", "-i", str(tmp_path / "payloads.g722"),
                        "-ac", "1", "-ar", "16000", str(tmp_path / "decoded.wav")], check=True, timeout=60)
        decoded = sf.read(tmp_path / "decoded.wav", dtype="float32")[0]
    ref = offline_mean(Scorer(OnnxModel(resolve_model("distillmos"), device="cpu"), max_batch=8), decoded)
    assert abs(float(np.mean(live)) - ref) < 0.3, (np.mean(live), ref)
    assert ended["net"]["codec"] == rtpmap.split("/")[0]
    if tcpdump is None:
        unavailable("tcpdump is not installed (.ci/install-system.sh installs it): the capture was not compared")
    out = tmp_path / "scores.json"
    r = subprocess.run([sys.executable, "-m", "scoreq_live", "score", dump, "--json", out, "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [(e["stream"], e["call"]) for e in json.loads(out.read_text())] == [(st["stream"], st["call"])]


def _sip_flood(garbage: int, invites: int) -> None:
    """Garbage and half-open INVITEs to 127.0.0.1:5060 (nothing listens: the capture sees them), paced."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(garbage):  # about 2,000 a second, as 10,000 after them: inside a 12 s call
            s.sendto(b"INVITE \x00\xff" + bytes([i % 256]) * 200, ("127.0.0.1", 5060))
            if i % 20 == 0:
                time.sleep(0.01)
        for i in range(invites):
            s.sendto(sip("INVITE sip:bob@x SIP/2.0", f"halfopen-{i}", media=("127.0.0.9", 30000 + i % 1000)),
                     ("127.0.0.1", 5060))
            if i % 20 == 0:
                time.sleep(0.01)


def _until_the_call_record(proc: subprocess.Popen[str], timeout: float = 60.0) -> list[dict]:
    """The monitor's events up to the first call record; then it is stopped as Ctrl-C stops it."""
    assert proc.stdout is not None
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        ev = json.loads(line)
        events.append(ev)
        if ev["type"] == "call_record":
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    proc.stderr_text = err  # type: ignore[attr-defined]  # what it said, for the checks after
    return events


def test_sip_over_tcp_is_followed_across_segments_retransmissions_and_a_gap():
    calls = LiveCalls("t", timeout_s=1.0)
    a, b = ("10.0.0.1", 41000), ("10.0.0.2", 5060)
    invite = sip("INVITE sip:bob@x SIP/2.0", "tcp1", media=ALICE)
    calls.segment(a, b, 1000, invite[:100], 0.0)
    calls.segment(a, b, 1000, invite[:100], 0.01)  # a retransmission: nothing twice
    calls.segment(a, b, 1100, invite[100:], 0.02)
    assert "tcp1" in calls.tracker.calls and calls.tracker.messages == 1
    ok = sip("SIP/2.0 200 OK", "tcp1", to_tag="b1", media=BOB)
    ringing = sip("SIP/2.0 180 Ringing", "tcp1", to_tag="b1")
    calls.segment(b, a, 5000, ringing + ok, 0.5)  # two messages in one segment
    assert calls.tracker.calls["tcp1"].answered == 0.5 and calls.tracker.media(BOB) is not None
    # A segment the capture missed: the stream is taken up at the next message that starts a segment.
    bye = sip("BYE sip:bob@x SIP/2.0", "tcp1", cseq="2 BYE", to_tag="b1")
    calls.segment(a, b, 1100 + len(invite) + 500, bye[10:], 5.0)  # the middle of something: dropped
    calls.segment(a, b, 1100 + len(invite) + 900, bye, 5.1)
    assert calls.tracker.calls["tcp1"].end_reason == "bye"
    calls.segment(("10.0.0.3", 1), ("10.0.0.4", 80), 1, b"GET / HTTP/1.1\r\n\r\n", 6.0)  # not a SIP port
    assert calls.tracker.messages == 4 and calls.sip_errors == 0


def test_a_baresip_call_is_found_and_named_from_its_sip(tmp_path):
    """baresip (a real SIP user agent, its aufile module playing real speech) calls a sipp UAS on loopback; the
    monitor capturing lo names the call's stream from its SIP and ends it with baresip's BYE."""
    from tests.test_sources_rtp import start_monitor

    rt.require_sipp()
    if shutil.which("baresip") is None:
        unavailable("baresip is not installed (.ci/install-system.sh installs it)")
    if not _can_capture():
        unavailable("live capture needs CAP_NET_RAW (run the tests as root)")
    x, rate = sf.read(EXAMPLES / "clean.wav", dtype="float32")
    sf.write(tmp_path / "speech.wav", soxr.resample(x[: rate * 14], rate, 8000), 8000, subtype="PCM_16")
    ua_port, uas_port, media = rt.free_udp_port(), rt.free_udp_port(), rt.free_udp_port()
    (tmp_path / "config").write_text(
        f"sip_listen 127.0.0.1:{ua_port}\nmodule_path /usr/lib/baresip/modules\nmodule g711.so\nmodule aufile.so\n"
        f"module menu.so\nmodule account.so\naudio_source aufile,{tmp_path / 'speech.wav'}\n"
        f"audio_player aufile,{tmp_path / 'heard.wav'}\naudio_alert aufile,{tmp_path / 'alert.wav'}\n")
    (tmp_path / "accounts").write_text("<sip:alice@127.0.0.1>;regint=0\n")
    (tmp_path / "uas.xml").write_text(rt._SIPP_UAS.format(addr="127.0.0.1", port=media, pt=0, rtpmap="PCMU/8000"))
    mon = start_monitor("-i", "call=sniff:lo", "--rtp-timeout", "2", "--duration", "90")
    uas = None
    try:
        time.sleep(3.0)  # the model loads and the capture opens
        assert mon.poll() is None, mon.stderr.read() if mon.stderr else ""
        uas = subprocess.Popen(["sipp", "-sf", "uas.xml", "-i", "127.0.0.1", "-p", str(uas_port), "-m", "1",
                                "-nostdin", "-timeout", "60s", "-trace_err"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        ua = subprocess.run(["baresip", "-f", str(tmp_path), "-e", f"/dial sip:monitor@127.0.0.1:{uas_port}",
                             "-t", "16"], capture_output=True, text=True, timeout=60)
        assert "Call established" in ua.stdout, ua.stdout[-3000:]
        events = _until_the_call_record(mon)
    finally:
        rt.stop_process(mon)  # type: ignore[arg-type]
        rt.stop_process(uas)
    (st,) = [e for e in events if e["type"] == "stream_started"]
    assert st["stream"].startswith("call-alice-to-monitor-") and st["meta"]["from"] == "alice", st
    assert "PCMU" in st["detail"] and st["call"] == st["meta"]["call_id"]
    assert [e["reason"] for e in events if e["type"] == "stream_ended"] == ["bye"]
    assert sum(e["type"] == "score" and e["mos"] is not None for e in events) >= 1


async def test_a_bpf_filter_lets_only_what_it_accepts_reach_the_monitor():
    """sniff:lo?filter=udp port A: RTP to port A makes a stream, the same RTP to port B (filtered out in the
    kernel) none; a filter that does not compile is one clear error."""
    import asyncio

    from scoreq_live.sources.base import SourceError
    from scoreq_live.sources.sniff import SniffInput

    if not _can_capture():
        unavailable("live capture needs CAP_NET_RAW (run the tests as root)")
    with pytest.raises(SourceError, match="filter="):
        parse_sniff("lo?filter=udp portt 1")
    a, b = rt.free_udp_port(), rt.free_udp_port()
    sniff = SniffInput(parse_sniff(f"lo?filter=udp port {a}", "f"), timeout_s=1.0)
    sniff.check()
    found = []

    async def collect() -> None:
        async for src in sniff.streams():
            found.append(src)

    task = asyncio.create_task(collect())
    try:
        await asyncio.sleep(0.3)
        packets = [rt.rtp_packet(seq=i, ts=160 * i, ssrc=0xF1) for i in range(60)]
        await asyncio.to_thread(rt.send_packets, b, packets, 200.0)
        await asyncio.to_thread(rt.send_packets, a, packets, 200.0)
        deadline = asyncio.get_running_loop().time() + 20
        while not found:
            assert asyncio.get_running_loop().time() < deadline, (sniff.packets, sniff.calls.demuxes)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sniff.close()
    assert [s.name for s in found] == ["f-000000f1"] and found[0].meta["local"] == f"127.0.0.1:{a}"
    assert set(sniff.calls.heard) == {("127.0.0.1", a)}  # nothing to port b got past the kernel's filter


def test_bad_sniff_and_siprec_options_are_one_clear_error_before_the_model_loads():
    for args, words in ((["-i", "sniff:lo", "--max-calls", "0"], "--max-calls must be at least 1"),
                        (["-i", "sniff:lo?bogus=1"], "unknown option 'bogus'"),
                        (["--siprec", "127.0.0.1:0", "--rtp-ports", "5-1"], "--rtp-ports '5-1'"),
                        (["--siprec", "127.0.0.1:0", "--siprec-allow", "not-a-net"], "--siprec-allow")):
        r = subprocess.run([sys.executable, "-m", "scoreq_live", *args, "--no-tui", "--no-ws"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
