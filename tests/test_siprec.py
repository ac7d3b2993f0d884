"""The SIPREC recording server (``--siprec``) as an SBC meets it: a monitor process on loopback gets a recording
session over real UDP SIP (an INVITE with ``Require: siprec``, a multipart SDP + rs-metadata body naming two
participants), answers with an SDP of its own ports, receives both participants' real speech as PCMU, and ends
the streams with the BYE.  Refusals (not SIPREC, a client outside --siprec-allow, bad metadata) get their
documented answers; garbage gets none."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
import soundfile as sf

from scoreq_live.sip.message import parse, split_stream
from scoreq_live.sip.siprec import offered_media, parse_metadata
from tests import rtp_tools as rt
from tests.helpers import EXAMPLES, ScoreqProcess, speech_16k
from tests.media_tools import mulaw_encode, to_8k

BOUNDARY = "scoreq-boundary"
METADATA = """<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>complete</datamode>
  <session session_id="c2Vzc2lvbjE="><sipSessionID>abc;remote=def</sipSessionID></session>
  <participant participant_id="UDbEsjMLQ2eGfYSm3V2ajA==">
    <nameID aor="sip:alice@example.com"><name xml:lang="en">Alice</name></nameID>
  </participant>
  <participant participant_id="pcqaVzBwQZWTm5WcJnNfVQ==">
    <nameID aor="sip:bob@example.com"/>
  </participant>
  <stream stream_id="s1" session_id="c2Vzc2lvbjE="><label>1</label></stream>
  <stream stream_id="s2" session_id="c2Vzc2lvbjE="><label>2</label></stream>
  <participantstreamassoc participant_id="UDbEsjMLQ2eGfYSm3V2ajA==">
    <send>s1</send><recv>s2</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="pcqaVzBwQZWTm5WcJnNfVQ==">
    <send>s2</send><recv>s1</recv>
  </participantstreamassoc>
</recording>
"""


def offer(ports: tuple[int, int] = (40000, 40002)) -> str:
    return ("v=0\r\no=src 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {ports[0]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=label:1\r\na=sendonly\r\n"
            f"m=audio {ports[1]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=label:2\r\na=sendonly\r\n")


def invite(call_id: str, *, siprec: bool = True, metadata: str = METADATA, cseq: int = 1) -> bytes:
    if siprec:
        body = (f"--{BOUNDARY}\r\nContent-Type: application/sdp\r\n\r\n{offer()}\r\n"
                f"--{BOUNDARY}\r\nContent-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session"
                f"\r\n\r\n{metadata}\r\n--{BOUNDARY}--\r\n").encode()
        ctype = f"multipart/mixed;boundary={BOUNDARY}"
        extra = "Require: siprec\r\nContact: <sip:src@127.0.0.1>;+sip.src\r\n"
    else:
        body, ctype, extra = offer().encode(), "application/sdp", ""
    head = (f"INVITE sip:recorder@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK{cseq}{call_id}"
            f"\r\nFrom: <sip:src@example.com>;tag=src1\r\nTo: <sip:recorder@example.com>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} INVITE\r\nMax-Forwards: 70\r\n{extra}Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def request(method: str, call_id: str, cseq: int, to_tag: str = "") -> bytes:
    tag = f";tag={to_tag}" if to_tag else ""
    return (f"{method} sip:recorder@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKx{cseq}\r\n"
            f"From: <sip:src@example.com>;tag=src1\r\nTo: <sip:recorder@example.com>{tag}\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n").encode()


def exchange(sock: socket.socket, addr: tuple[str, int], data: bytes, timeout: float = 10.0):
    sock.settimeout(timeout)
    sock.sendto(data, addr)
    answer, _ = sock.recvfrom(65536)
    return parse(answer)


def test_metadata_and_offer_are_read_and_hostile_xml_is_refused():
    who = parse_metadata(METADATA.encode())
    assert (who["1"].name, who["1"].label) == ("Alice", "Alice")
    assert (who["2"].aor, who["2"].label) == ("sip:bob@example.com", "bob")
    assert [(m.label, m.pts) for m in offered_media(offer())] == [("1", [0]), ("2", [0])]
    bomb = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><recording>&b;</recording>'
    for bad in (b"<recording", bomb, b"<x/>"):
        with pytest.raises(ValueError):
            parse_metadata(bad)


def monitor(tmp_path: Path, tiny: Path, *extra: str) -> tuple[ScoreqProcess, int]:
    port = rt.free_udp_port()
    lo = rt.free_udp_port() // 2 * 2
    lo = min(lo, 65000)
    mon = ScoreqProcess("monitor", "--model", tiny, "--model-kind", "mos", "--no-tui", "--no-ws", "--threads", "1",
                        "--siprec", f"127.0.0.1:{port}", "--rtp-ports", f"{lo}-{lo + 40}", "--rtp-timeout", "3",
                        "--jsonl", tmp_path / "events.jsonl", *extra)
    return mon, port


def wait_listening(mon: ScoreqProcess, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            assert mon.proc.poll() is None, mon.output()
            s.sendto(request("OPTIONS", "ping", 1), ("127.0.0.1", port))
            try:
                if parse(s.recvfrom(65536)[0]).status == 200:
                    return
            except (TimeoutError, OSError):
                pass
    raise AssertionError(f"--siprec did not answer OPTIONS:\n{mon.output()}")


def until_call_record(mon: ScoreqProcess, jsonl: Path, timeout: float = 60.0) -> list[dict]:
    """The monitor's events (its JSON lines) once a call record is among them."""
    deadline = time.monotonic() + timeout
    while True:
        events = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []
        if any(e["type"] == "call_record" for e in events):
            return events
        assert time.monotonic() < deadline, mon.output()
        time.sleep(0.2)


def test_a_recording_session_scores_each_participant_and_ends_with_the_bye(tmp_path, tiny_nr):
    mon, port = monitor(tmp_path, tiny_nr)
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind(("127.0.0.1", 0))
    addr = ("127.0.0.1", port)
    try:
        wait_listening(mon, port)
        ok = exchange(sip, addr, invite("rec-1@src"))
        assert ok.status == 200 and "siprec" in ok.header("require").lower(), ok
        to_tag = ok.to.tag
        answer = ok.body.decode()
        ports = [int(p) for p in re.findall(r"^m=audio (\d+) RTP/AVP 0", answer, re.M)]
        assert len(ports) == 2 and "a=recvonly" in answer and "a=label:1" in answer and "a=label:2" in answer
        assert exchange(sip, addr, invite("rec-1@src", cseq=2)).body.decode() == answer  # a re-INVITE: same
        sip.sendto(request("ACK", "rec-1@src", 1, to_tag), addr)
        # Both participants' real speech, 8 s each, paced in real time from the SRC's media ports.
        speech = speech_16k(EXAMPLES / "clean.wav")
        senders = []
        for k, (p, audio) in enumerate(zip(ports, (speech[:16000 * 8], speech[16000 * 8:16000 * 16]))):
            ulaw = mulaw_encode(to_8k(audio))
            packets = [rt.rtp_packet(seq=i, ts=160 * i, ssrc=0xA1 + k, payload=ulaw[160 * i:160 * (i + 1)])
                       for i in range(len(ulaw) // 160)]
            senders.append(threading.Thread(target=rt.send_packets, args=(p, packets)))
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        bye = exchange(sip, addr, request("BYE", "rec-1@src", 3, to_tag))
        assert bye.status == 200
        events = until_call_record(mon, tmp_path / "events.jsonl")
    finally:
        sip.close()
        mon.stop()
    started = {e["stream"]: e for e in events if e["type"] == "stream_started"}
    assert len(started) == 2, list(started)
    alice = next(e for n, e in started.items() if n.startswith("siprec-Alice-"))
    bob = next(e for n, e in started.items() if n.startswith("siprec-bob-"))
    assert alice["meta"]["participant"] == "Alice" and bob["meta"]["aor"] == "sip:bob@example.com"
    assert alice["call"] == bob["call"] == "rec-1@src" and alice["source"] == "rtp"
    ends = {e["stream"]: e["reason"] for e in events if e["type"] == "stream_ended"}
    assert ends == {alice["stream"]: "bye", bob["stream"]: "bye"}, ends
    for name in started:
        assert sum(e["type"] == "score" and e["stream"] == name and e["mos"] is not None for e in events) >= 2
    (call,) = [e for e in events if e["type"] == "call_record"]
    assert call["key"] == "rec-1@src" and len(call["streams"]) == 2


def test_refusals_have_their_answers_and_garbage_none(tmp_path, tiny_nr):
    (tmp_path / "acl").mkdir()
    mon, port = monitor(tmp_path, tiny_nr)
    closed, closed_port = monitor(tmp_path / "acl", tiny_nr, "--siprec-allow", "10.0.0.0/8")
    addr = ("127.0.0.1", port)
    try:
        wait_listening(mon, port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            plain = exchange(s, addr, invite("plain@src", siprec=False))
            assert plain.status == 488 and "Require: siprec" in plain.header("warning"), plain
            bad = exchange(s, addr, invite("bad@src", metadata="<recording xmlns='urn:ietf:params:xml:ns:"
                                                                   "recording:1'><oops"))
            assert bad.status == 400 and "metadata" in bad.header("warning")
            assert exchange(s, addr, request("BYE", "nobody", 2)).status == 481
            s.sendto(b"\x00garbage" * 50, addr)
            s.sendto(b"INVITE sip:x SIP/2.0\r\nno headers at all\r\n\r\n", addr)
            assert exchange(s, addr, request("OPTIONS", "still", 1)).status == 200  # garbage answered by nothing
        with socket.create_connection(addr, timeout=10) as t:  # SIP over TCP, on the same port
            t.sendall(b"\r\n\r\n" + request("OPTIONS", "tcp", 1) + invite("tcp@src", siprec=False))
            got = b""
            while got.count(b"SIP/2.0 ") < 2:
                chunk = t.recv(65536)
                assert chunk, got
                got += chunk
            assert [m.status for m in map(parse, split_stream(bytearray(got)))] == [200, 488]
        deadline = time.monotonic() + 60
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            while True:  # the second monitor: loopback is not among its allowed clients
                assert time.monotonic() < deadline, closed.output()
                s.sendto(invite("acl@src"), ("127.0.0.1", closed_port))
                try:
                    answer = parse(s.recvfrom(65536)[0])
                    break
                except (TimeoutError, OSError):
                    continue
            assert answer.status == 403
    finally:
        mon.stop()
        closed.stop()


_SIPP_SRC = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- A session recording client: a SIPREC INVITE (SDP + rs-metadata), RTP of a pcap to the answer, BYE. -->
<scenario name="scoreq siprec src">
  <send retrans="500"><![CDATA[
INVITE sip:recorder@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SRC[call_number]
To: <sip:recorder@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:src@[local_ip]:[local_port]>;+sip.src
Require: siprec
Max-Forwards: 70
Content-Type: multipart/mixed;boundary=sippboundary
Content-Length: [len]

--sippboundary
Content-Type: application/sdp

v=0
o=src 1 1 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
a=label:1
a=sendonly

--sippboundary
Content-Type: application/rs-metadata+xml
Content-Disposition: recording-session

<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
<datamode>complete</datamode>
<participant participant_id="p1"><nameID aor="sip:carol@example.com"><name>Carol</name></nameID></participant>
<stream stream_id="s1"><label>1</label></stream>
<participantstreamassoc participant_id="p1"><send>s1</send></participantstreamassoc>
</recording>
--sippboundary--
]]></send>
  <recv response="100" optional="true"/>
  <recv response="200" rtd="true"/>
  <send><![CDATA[
ACK sip:recorder@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SRC[call_number]
To: <sip:recorder@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

]]></send>
  <nop><action><exec play_pcap_audio={pcap}/></action></nop>
  <pause milliseconds="{pause_ms}"/>
  <send retrans="500"><![CDATA[
BYE sip:recorder@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SRC[call_number]
To: <sip:recorder@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 2 BYE
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""


def test_sipp_as_a_recording_client_gets_its_participant_scored(tmp_path, tiny_nr):
    """sipp sends a SIPREC INVITE (multipart, one labelled stream and its participant), replays real speech as
    PCMU to the port the monitor's answer names, and hangs up: one stream named after the participant."""
    rt.require_sipp()
    wav = tmp_path / "speech.wav"
    x, rate = sf.read(EXAMPLES / "clean.wav", dtype="float32")
    sf.write(wav, x[: rate * 8], rate, subtype="PCM_16")
    pcap = tmp_path / "src.pcap"
    rt.write_pcap(pcap, [rt.RtpFlow(wav, "pcmu", ssrc=0xCA201)])
    scenario = tmp_path / "src.xml"
    scenario.write_text(_SIPP_SRC.replace("{pcap}", quoteattr(str(pcap))).replace("{pause_ms}", "8300"))
    mon, port = monitor(tmp_path, tiny_nr)
    try:
        wait_listening(mon, port)
        src = subprocess.run(["sipp", f"127.0.0.1:{port}", "-sf", str(scenario), "-i", "127.0.0.1", "-mi",
                              "127.0.0.1", "-p", str(rt.free_udp_port()), "-mp", str(rt.free_udp_port()), "-m", "1",
                              "-nostdin", "-timeout", "40s", "-timeout_error", "-trace_err"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert src.returncode == 0, src.stdout[-2000:] + src.stderr[-2000:]
        events = until_call_record(mon, tmp_path / "events.jsonl")
    finally:
        mon.stop()
    (st,) = [e for e in events if e["type"] == "stream_started"]
    assert st["stream"].startswith("siprec-Carol-") and st["meta"]["aor"] == "sip:carol@example.com", st
    assert [e["reason"] for e in events if e["type"] == "stream_ended"] == ["bye"]
    assert sum(e["type"] == "score" and e["mos"] is not None for e in events) >= 2
