"""WebRTC publishers through WHIP: real aiortc peers on loopback, the real engine, real models.

The endpoint runs in-process here (an HTTP site with the ingest routes,
the engine, a real model) so that the tests can look at the sessions,
file descriptors and memory; tests/test_cli_publish.py runs the same through
the ``scoreq-live monitor`` process a user starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiortc import RTCPeerConnection

from scoreq_live.bus import EventBus
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.http.policy import Listen, SitePolicy
from scoreq_live.http.site import HttpSite
from scoreq_live.ingest.http import IngestRoutes
from scoreq_live.ingest.ice import gathering_on
from scoreq_live.ingest.whip import WhipIngest, WhipSettings
from scoreq_live.offline import window_results
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from tests import rtp_tools as rt
from tests.helpers import MUSHRA, joined
from tests.whip_tools import publish

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Endpoint:
    url: str
    whip: WhipIngest
    engine: Engine
    events: list[dict] = field(default_factory=list)

    def of(self, stream: str, kind: str) -> list[dict]:
        return [e for e in self.events if e["stream"] == stream and e["type"] == kind]

    async def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen in {timeout} s; events: "
                                     f"{[(e['type'], e['stream'], e.get('reason')) for e in self.events][-30:]}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def endpoint(scorer: Scorer, stream: StreamConfig, *, token: str | None = None,
                   origins: tuple[str, ...] = (), **settings) -> AsyncIterator[Endpoint]:
    """The WHIP routes on 127.0.0.1 (a free port) in front of a running engine."""
    settings.setdefault("ice_hosts", ("127.0.0.1",))
    whip = WhipIngest(WhipSettings(**settings))
    site = HttpSite(Listen("127.0.0.1", 0), SitePolicy(token=token, allowed_origins=frozenset(origins)))
    site.add(IngestRoutes(whip))
    await site.start()
    assert site.address is not None
    port = site.address.port
    bus = EventBus()
    sub = bus.subscribe(maxsize=100_000)
    engine = Engine(scorer, [whip], EngineConfig(stream=stream, max_batch=8), bus)
    run = asyncio.create_task(engine.run())
    ep = Endpoint(f"http://127.0.0.1:{port}/whip", whip, engine)

    async def collect() -> None:
        async for ev in sub:
            ep.events.append(ev.to_dict())

    collector = asyncio.create_task(collect())
    try:
        await ep.wait(lambda: whip.accepting, 10, "the endpoint starting")
        yield ep
    finally:
        engine.stop()
        await asyncio.wait_for(run, 30)
        await asyncio.wait_for(collector, 10)
        await site.close()


@pytest.fixture(scope="module")
def speech(data) -> np.ndarray:
    """About 14 s of real speech (MUSHRA references joined), 16 kHz mono."""
    return joined(sorted(MUSHRA.glob("stim_*/ref.wav"))[:5])


@pytest.fixture(scope="module")
def bundled() -> tuple[Scorer, StreamConfig]:
    spec = resolve_model("distillmos")
    window_s, hop_s = spec.windowing()
    return (Scorer(OnnxModel(spec, device="cpu"), max_batch=8),
            StreamConfig(window_s=window_s, hop_s=hop_s, model="distillmos"))


@pytest.fixture(scope="module")
def tiny(tiny_nr) -> tuple[Scorer, StreamConfig]:
    return (Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=16),
            StreamConfig(window_s=2.0, hop_s=1.0, model="tiny", min_speech=0.0))


def _to_48k(x16: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(x16, 16000, 48000).astype(np.float32)


async def test_an_aiortc_publisher_is_scored_like_the_same_audio_after_opus_and_delete_ends_it(
        speech, bundled, tmp_path):
    scorer, cfg = bundled
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="PCM_16")
    async with endpoint(scorer, cfg) as ep, aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        pub = await publish(http, f"{ep.url}?stream=alice", _to_48k(speech), loop=False)
        try:
            assert "a=candidate" in pub.answer and "127.0.0.1" in pub.answer  # --ice-host honoured
            assert "opus/48000" in pub.answer.lower()
            await ep.wait(lambda: ep.of("alice", "score"), 30, "a first score")
            first_score_s = time.monotonic() - t0
            # aiortc's own decoder thread is stopped: no thread per session.
            assert not [t for t in threading.enumerate() if t.name.endswith("-decoder")]
            await ep.wait(lambda: len(ep.of("alice", "score")) >= 6, 30, "six scores")
            async with http.delete(ep.url.rsplit("/", 1)[0] + pub.location) as r:
                assert r.status == 200, await r.text()
            await ep.wait(lambda: ep.of("alice", "stream_ended"), 10, "the end of the stream")
        finally:
            await pub.pc.close()
    started = ep.of("alice", "stream_started")[0]
    assert started["source"] == "webrtc" and "opus" in started["detail"]
    assert ep.of("alice", "stream_ended")[0]["reason"] == "closed"
    live = [e["mos"] for e in ep.of("alice", "score") if e["mos"] is not None]
    nets = [e["net"] for e in ep.of("alice", "score")]
    assert all(n is not None and n["codec"] == "opus" and n["loss_pct"] == 0.0 for n in nets)
    offline = [e.mos for e in window_results(rt.encode_like_ffmpeg(wav, "opus", opus_bitrate=96000), scorer, cfg)
               if e.mos is not None]
    print(f"offer to first score {first_score_s:.2f} s (window {cfg.window_s} s); live mean {np.mean(live):.3f} "
          f"over {len(live)} windows, offline after Opus {np.mean(offline):.3f} over {len(offline)}")
    assert abs(np.mean(live) - np.mean(offline)) < 0.3
    assert not ep.whip.sessions


async def made_offer(kind: str) -> str:
    """A real peer's offer to send one ``kind`` track (its candidates on the loopback)."""
    pc = RTCPeerConnection()
    pc.addTransceiver(kind, direction="sendonly")
    with gathering_on(["127.0.0.1"]):
        await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_bad_requests_get_a_clear_http_error_and_nothing_else(tiny, speech):
    scorer, cfg = tiny
    async with endpoint(scorer, cfg, token="s3cret", origins=("https://ok.example",), max_sessions=1,
                        max_offer_bytes=16 * 1024) as ep, aiohttp.ClientSession() as http:
        auth = {"Authorization": "Bearer s3cret"}
        sdp = {"Content-Type": "application/sdp", **auth}

        async def post(body: str | bytes, headers: dict[str, str], query: str = "") -> tuple[int, str]:
            async with http.post(ep.url + query, data=body, headers=headers) as r:
                return r.status, await r.text()

        # An offer with video only, made by a real peer.
        video_only = await made_offer("video")

        assert (await post("v=0\r\n", {"Content-Type": "application/sdp"}))[0] == 401
        assert (await post("v=0\r\n", {"Content-Type": "application/sdp", "Authorization": "Bearer nope"}))[0] == 401
        status, text = await post("hello", {"Content-Type": "text/plain", **auth})
        assert status == 415 and "application/sdp" in text
        status, text = await post("hello", sdp)
        assert status == 400 and "SDP" in text
        status, text = await post(video_only, sdp)
        assert status == 400 and "no audio" in text
        status, text = await post("v=0\r\n" + "a=x\r\n" * 8000, sdp)
        assert status == 413
        status, text = await post(video_only, sdp, "?stream=bad%20name")
        assert status == 400 and "stream name" in text
        status, text = await post(video_only, {**sdp, "Origin": "https://evil.example"})
        assert status == 403 and "origin" in text
        async with http.options(ep.url, headers={"Origin": "https://ok.example",
                                                 "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://ok.example"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            assert "Location" in r.headers["Access-Control-Expose-Headers"]
        async with http.options(ep.url, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
        async with http.get(ep.url, headers=auth) as r:
            assert r.status == 405 and "POST" in r.headers["Allow"]
        async with http.delete(ep.url + "/nosuchsession", headers=auth) as r:
            assert r.status == 404
        audio = await made_offer("audio")
        status, text = await post(re.sub(r"m=audio \d+", "m=audio 0", audio), sdp)
        assert status == 400 and "port 0" in text
        status, text = await post("\r\n".join(line for line in audio.split("\r\n")
                                               if not line.startswith("a=fingerprint:")), sdp)
        assert status == 400 and "fingerprint" in text
        media = audio[audio.index("m=audio"):]
        status, text = await post(audio + media * 11, sdp)  # 12 audio sections, no BUNDLE
        assert status == 400 and "media sections" in text
        assert ep.events == [] and not ep.whip.sessions  # none of that made a stream

        # A good publisher still gets in; a second one finds the endpoint full (503, Retry-After).
        pub = await publish(http, f"{ep.url}?stream=ok", _to_48k(speech), token="s3cret")
        try:
            async with http.patch(ep.url.rsplit("/", 1)[0] + pub.location, data="a=end-of-candidates\r\n",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag", **auth}) as r:
                assert r.status == 501
            async with http.post(ep.url, data=video_only.replace("video", "audio"), headers=sdp) as r:
                assert r.status == 503 and r.headers["Retry-After"]
            await ep.wait(lambda: ep.of("ok", "score"), 20, "the good publisher's first score")
        finally:
            await pub.pc.close()
        await ep.wait(lambda: ep.of("ok", "stream_ended"), 15, "the end of the stream")
        assert [e["type"] for e in ep.events if e["type"] == "stream_error"] == []


async def test_concurrent_offers_cannot_pass_the_session_cap_together(tiny):
    """Ten real offers posted at once to an endpoint that takes three: a place is taken before any await."""
    scorer, cfg = tiny
    offers = [await made_offer("audio") for _ in range(10)]
    async with endpoint(scorer, cfg, max_sessions=3) as ep, aiohttp.ClientSession() as http:
        async def post(body: str) -> tuple[int, str]:
            async with http.post(ep.url, data=body, headers={"Content-Type": "application/sdp"}) as r:
                return r.status, r.headers.get("Location", "")

        answers = await asyncio.gather(*(post(o) for o in offers))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [201] * 3 + [503] * 7, statuses
        assert len(ep.whip.sessions) == 3
        for status, location in answers:
            if status == 201:
                async with http.delete(ep.url.rsplit("/", 1)[0] + location) as r:
                    assert r.status == 200
        # The places are free again.
        assert (await post(offers[0]))[0] == 201


def _candidates_as_mdns(sdp: str, keep_host: bool) -> str:
    """Each candidate's address as a browser hides it (``UUID.local``); ``keep_host``: the real one as well."""
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            fields = line.split(" ")
            fields[4] = f"{uuid.uuid4()}.local"
            out.append(" ".join(fields))
            if not keep_host:
                continue
        out.append(line)
    return "\r\n".join(out)


async def test_mdns_candidates_are_not_looked_up_and_the_publisher_still_connects(tiny, speech, monkeypatch):
    """Browsers hide their address behind ``UUID.local`` names: such candidates are dropped from the offer
    before aiortc sees it (no mDNS query on the network, no second waited for it), and the publisher still
    connects, alone with them (its address learnt from its own ICE checks) or with a host candidate too."""
    import aioice.ice

    lookups: list[object] = []

    class Unanswered:  # what an mDNS query on a network where nobody answers amounts to: a wait, then nothing
        async def resolve(self, name: str) -> None:
            await asyncio.sleep(1.0)

    async def mdns(subscriber: object) -> Unanswered:
        lookups.append(subscriber)
        return Unanswered()

    monkeypatch.setattr(aioice.ice, "get_or_create_mdns_protocol", mdns)
    scorer, cfg = tiny
    audio = _to_48k(speech)
    async with endpoint(scorer, cfg) as ep, aiohttp.ClientSession() as http:
        pubs = []
        try:
            t0 = time.monotonic()
            pubs.append(await publish(http, f"{ep.url}?stream=plain", audio))
            plain_s = time.monotonic() - t0
            for name, keep_host in (("hidden", False), ("both", True)):
                t0 = time.monotonic()
                pubs.append(await publish(http, f"{ep.url}?stream={name}", audio,
                                          rewrite=lambda sdp, k=keep_host: _candidates_as_mdns(sdp, k)))
                took = time.monotonic() - t0
                assert took < plain_s + 0.5, f"{name}: answered in {took:.2f} s, a plain offer in {plain_s:.2f} s"
            assert lookups == []
            await ep.wait(lambda: len(ep.whip.sessions) == 3
                          and all(s.packets > 0 for s in ep.whip.sessions.values()), 15,
                          "media from every publisher")
        finally:
            for pub in pubs:
                await pub.pc.close()
    assert lookups == []


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _vanishing_round(ep: Endpoint, url: str, wav: Path, n: int, prefix: str, timeout: float) -> dict:
    """``n`` publishers in a process of their own, which is then killed: every stream must end by itself."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.whip_tools", url, str(n), str(wav), "--prefix", prefix],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    names = [f"{prefix}{i}" for i in range(n)]
    try:
        await ep.wait(lambda: all(ep.of(s, "score") for s in names), 60, f"a score on all {n} streams")
        sessions = [s for s in ep.whip.sessions.values() if s.name in names]
        gc.collect()
        live = {"mem": tracemalloc.get_traced_memory()[0], "fds": _fds()}
        proc.send_signal(signal.SIGKILL)  # gone without a DELETE or an RTCP BYE
        killed = time.time()
        proc.wait(10)
        await ep.wait(lambda: all(ep.of(s, "stream_ended") for s in names), timeout + 30, f"the end of all {n}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    live["ended_after"] = max(ep.of(s, "stream_ended")[0]["ts"] for s in names) - killed
    live["reasons"] = {ep.of(s, "stream_ended")[0]["reason"] for s in names}
    # When each session was judged gone, after its last packet (the loop's clock for both): the timeout itself,
    # whatever scoring the last windows took before stream_ended could go out on a busy machine.
    live["verdict_after"] = [s.ended_at - s.last_media for s in sessions if s.ended == "inactive"]
    del sessions
    await ep.wait(lambda: not ep.whip.sessions and not ep.whip._closing, 10, "the peer connections closing")
    await asyncio.sleep(0.5)
    gc.collect()
    return live


async def test_twenty_publishers_that_vanish_end_within_the_timeout_and_leave_nothing_behind(tiny, tmp_path, speech):
    scorer, cfg = tiny
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="PCM_16")
    timeout, n = 2.0, 20
    async with endpoint(scorer, cfg, timeout_s=timeout, max_sessions=32) as ep:
        # A first round warms up what is made once (codecs, aiortc's certificates, buffers of the sizes used);
        # the second must leave the process where it was before it: memory and file descriptors.
        tracemalloc.start()
        try:
            await _vanishing_round(ep, ep.url, wav, n, "warm", timeout)
            ep.events.clear()  # the test's own record of events is not the monitor's memory
            gc.collect()
            mem0, fds0 = tracemalloc.get_traced_memory()[0], _fds()
            live = await _vanishing_round(ep, ep.url, wav, n, "pub", timeout)
            ep.events.clear()
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - mem0
        finally:
            tracemalloc.stop()
        print(f"{n} sessions: {(live['mem'] - mem0) / n / 1e6:.2f} MB traced per live session, "
              f"{(live['fds'] - fds0) / n:.1f} fds each; all ended {live['ended_after']:.2f} s after the kill "
              f"(timeout {timeout} s); after: {growth / 1e6:.3f} MB, {_fds() - fds0} fds")
        assert live["reasons"] <= {"inactive", "disconnected"}, live["reasons"]
        # Judged within the timeout (plus a tick and a late loop's slack) of the last packet ...
        assert all(timeout <= v <= timeout + 1.0 for v in live["verdict_after"]), live["verdict_after"]
        # ... and ended by themselves, their last windows scored, well before anyone would notice.
        assert live["ended_after"] <= timeout + 10.0, live["ended_after"]
        assert _fds() <= fds0, "file descriptors left open"
        assert growth < 0.5e6, f"{growth / 1e6:.2f} MB still held after the sessions ended"
        assert not ep.engine.cores
