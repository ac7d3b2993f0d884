"""A real WHIP publisher for the tests: an aiortc peer sending a recording, paced in real time.

Used in-process (:func:`publish`) or as a process of its own
(``python -m tests.whip_tools URL N WAV``) that publishes N sessions and then
waits to be killed: a publisher that vanishes without a DELETE, as a closed
laptop or a crashed browser does.  ICE is gathered on 127.0.0.1 only, so all
traffic stays on the loopback interface.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from scoreq_live.audio import load_audio
from scoreq_live.ingest.ice import gathering_on

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz, what aiortc's encoders take


class RecordingTrack(MediaStreamTrack):
    """An audio track that plays a mono float recording (48 kHz) in real time, looping, 20 ms per frame."""

    kind = "audio"

    def __init__(self, audio_48k: np.ndarray, loop: bool = True) -> None:
        super().__init__()
        pcm = np.clip(audio_48k * 32767.0, -32768, 32767).astype(np.int16)
        pad = (-len(pcm)) % FRAME
        self.pcm = np.concatenate([pcm, np.zeros(pad, np.int16)])
        self.loop = loop
        self.pos = 0
        self.start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.start is None:
            self.start = time.monotonic()
        due = self.start + self.pos / RATE
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.pos >= len(self.pcm) and not self.loop:
            self.stop()
            raise MediaStreamError("end of the recording")
        i = self.pos % len(self.pcm)
        chunk = self.pcm[i:i + FRAME]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.pos
        frame.time_base = fractions.Fraction(1, RATE)
        self.pos += FRAME
        return frame


def recording_48k(path: Path) -> np.ndarray:
    """A recording as mono float32 at 48 kHz (the rate aiortc's Opus encoder takes)."""
    import soxr

    x16 = load_audio(path)
    return soxr.resample(x16, 16000, RATE).astype(np.float32)


@dataclass
class Published:
    pc: RTCPeerConnection
    location: str
    answer: str
    status: int


async def publish(session: aiohttp.ClientSession, url: str, audio_48k: np.ndarray, *, codec: str = "opus",
                  token: str | None = None, loop: bool = True,
                  rewrite: Callable[[str], str] | None = None) -> Published:
    """Publish one track to a WHIP endpoint; raises AssertionError with the server's answer if refused.

    ``rewrite``: changes the offer's SDP before it is sent (candidates as a browser writes them...).
    """
    pc = RTCPeerConnection()
    sender = pc.addTrack(RecordingTrack(audio_48k, loop=loop))
    caps = RTCRtpSender.getCapabilities("audio")
    prefs = [c for c in caps.codecs if c.mimeType.lower() == f"audio/{codec.lower()}"]
    assert prefs, f"aiortc cannot send {codec}"
    for t in pc.getTransceivers():
        if t.sender is sender:
            t.setCodecPreferences(prefs)
    with gathering_on(["127.0.0.1"]):
        await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    offer = pc.localDescription.sdp if rewrite is None else rewrite(pc.localDescription.sdp)
    async with session.post(url, data=offer, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=30)) as r:
        body = await r.text()
        if r.status != 201:
            await pc.close()
            raise AssertionError(f"WHIP POST answered {r.status}: {body}")
        location = r.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return Published(pc, location, body, 201)


async def _main(url: str, n: int, wav: Path, prefix: str) -> None:
    audio = recording_48k(wav)
    async with aiohttp.ClientSession() as s:
        pcs = []
        for i in range(n):
            pub = await publish(s, f"{url}?stream={prefix}{i}", np.roll(audio, i * RATE // 3))
            pcs.append(pub)
        print(f"published {n}", flush=True)
        while True:  # until killed: no DELETE, no BYE
            await asyncio.sleep(3600)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("n", type=int)
    ap.add_argument("wav", type=Path)
    ap.add_argument("--prefix", default="pub")
    a = ap.parse_args()
    try:
        asyncio.run(_main(a.url, a.n, a.wav, a.prefix))
    except KeyboardInterrupt:
        sys.exit(0)
