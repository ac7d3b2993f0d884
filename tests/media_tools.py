"""A media-stream publisher for the tests: G.711 encoders, Twilio Media Streams messages, paced websocket sends.

The encoders follow the G.711 reference algorithm (the ITU's and Sun's g711.c), written here independently of
the monitor's decoders so that a round trip checks one against the other.  :func:`twilio_call` writes the
messages a Twilio call sends (``connected``, ``start``, interleaved ``media`` of each track with the
connection's sequence numbers and each track's chunk numbers and millisecond timestamps, a ``mark``, ``dtmf``
and ``stop``); :func:`send_paced` sends them over a real websocket at a bounded multiple of real time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import soxr

CHUNK_MS = 20  # what Twilio sends per media message: 160 mu-law bytes at 8 kHz

_MULAW_BIAS = 0x84
_MULAW_CLIP = 32635
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def to_8k(x16k: np.ndarray) -> np.ndarray:
    """16 kHz float32 -> 8 kHz float32 (soxr, as a telephone gateway would band-limit it)."""
    return soxr.resample(np.asarray(x16k, np.float32), 16000, 8000, quality="HQ").astype(np.float32)


def mulaw_encode(x: np.ndarray) -> bytes:
    """G.711 mu-law of float samples in [-1, 1] (reference algorithm: bias 0x84, clip 32635, 8 segments)."""
    s = pcm16(x).astype(np.int32)
    sign = np.where(s < 0, 0x80, 0)
    mag = np.minimum(np.abs(s), _MULAW_CLIP) + _MULAW_BIAS
    exponent = sum((mag >= (0x100 << k)).astype(np.int32) for k in range(7))
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def alaw_encode(x: np.ndarray) -> bytes:
    """G.711 A-law of float samples in [-1, 1] (reference algorithm: 13-bit magnitude, 8 segments, even bits)."""
    v = pcm16(x).astype(np.int32) >> 3
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_ALAW_SEG_END, v)  # first segment whose end is >= v
    step = np.where(seg < 2, (v >> 1) & 0x0F, (v >> np.maximum(seg, 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | step)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


def twilio_call(tracks: Mapping[str, bytes], call_sid: str = "CA0123456789abcdef0123456789abcdef",
                stream_sid: str = "MZ0123456789abcdef0123456789abcdef", chunk_bytes: int = 160,
                encoding: str = "audio/x-mulaw", rate: int = 8000, skip: Sequence[tuple[str, int]] = (),
                stop: bool = True) -> list[tuple[float, str]]:
    """A Twilio call's messages as (time in seconds of call audio when it is sent, JSON text).

    ``tracks``: "inbound"/"outbound" -> encoded audio (8-bit G.711, or 16-bit L16 with chunk_bytes doubled);
    the tracks' media messages are interleaved chunk by chunk as Twilio sends them.  ``skip``: (track, chunk
    index) pairs not sent (lost at the sender: the timestamps jump).
    """
    out: list[tuple[float, str]] = []
    seq = 0

    def add(at: float, msg: dict[str, Any], numbered: bool = True) -> None:
        nonlocal seq
        if numbered:
            seq += 1
            msg = {"event": msg["event"], "sequenceNumber": str(seq), **{k: v for k, v in msg.items()
                                                                          if k != "event"}}
        out.append((at, json.dumps(msg)))

    add(0.0, {"event": "connected", "protocol": "Call", "version": "1.0.0"}, numbered=False)
    add(0.0, {"event": "start", "start": {
        "accountSid": "AC0123456789abcdef0123456789abcdef", "streamSid": stream_sid, "callSid": call_sid,
        "tracks": list(tracks), "customParameters": {"agent": "test"},
        "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1}}, "streamSid": stream_sid})
    n_chunks = max(-(-len(b) // chunk_bytes) for b in tracks.values())
    skipped = set(skip)
    ms_per_chunk = chunk_bytes * 1000 // (rate * (2 if encoding == "audio/l16" else 1))
    for i in range(n_chunks):
        for track, data in tracks.items():
            part = data[i * chunk_bytes:(i + 1) * chunk_bytes]
            if not part or (track, i) in skipped:
                continue
            add(i * ms_per_chunk / 1000.0, {"event": "media", "streamSid": stream_sid, "media": {
                "track": track, "chunk": str(i + 1), "timestamp": str(i * ms_per_chunk),
                "payload": base64.b64encode(part).decode("ascii")}})
        if i == n_chunks // 2:
            add(i * ms_per_chunk / 1000.0, {"event": "dtmf", "streamSid": stream_sid,
                                            "dtmf": {"track": "inbound_track", "digit": "5"}})
    end = n_chunks * ms_per_chunk / 1000.0
    add(end, {"event": "mark", "streamSid": stream_sid, "mark": {"name": "end-of-audio"}})
    if stop:
        add(end, {"event": "stop", "streamSid": stream_sid,
                  "stop": {"accountSid": "AC0123456789abcdef0123456789abcdef", "callSid": call_sid}})
    return out


def raw_chunks(pcm: bytes, chunk_bytes: int) -> list[bytes]:
    return [pcm[i:i + chunk_bytes] for i in range(0, len(pcm), chunk_bytes)]


async def send_paced(ws: Any, messages: Sequence[tuple[float, str | bytes]], speed: float) -> None:
    """Send (time, message) pairs over an aiohttp client websocket, each at ``time / speed`` after the first."""
    t0 = time.monotonic()
    for at, msg in messages:
        wait = t0 + at / speed - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if isinstance(msg, bytes):
            await ws.send_bytes(msg)
        else:
            await ws.send_str(msg)
