"""Audio codecs carried over RTP: the payload-type table, SDP and ``?codec=`` parsing, and per-stream decoders.

Known codecs (RFC 3551 static payload types, everything else by name):

====================  ====  ==========  ==========  ========
name                  PT    RTP clock   audio rate  channels
====================  ====  ==========  ==========  ========
PCMU (G.711 mu-law)   0     8000        8000        1
PCMA (G.711 A-law)    8     8000        8000        1
G722                  9     8000        16000       1
L16                   10    44100       44100       2
L16                   11    44100       44100       1
L16                   dyn.  any         = clock     any
opus                  dyn.  48000       48000       2 (signalled; decoded to mono)
telephone-event       dyn.  8000/any    (none)      recognised, never decoded
CN (comfort noise)    13    8000        (none)      recognised, never decoded
====================  ====  ==========  ==========  ========

G.722's RTP clock is 8000 although its audio is sampled at 16 kHz (RFC 3551 4.5.2), and Opus always
uses a 48000 clock whatever the audio bandwidth (RFC 7587).

Decoders turn one packet's payload into float32 mono samples at the codec's audio rate.  G.711 uses
lookup tables built from the G.711 formulas (exactly what FFmpeg's decoders produce, at a fraction
of the per-packet cost); L16 is plain big-endian int16; G.722 uses PyAV (FFmpeg).  Opus uses libopus
directly through ctypes when the library can be found (the system's, or the copy PyAV ships), which
gives the codec's own packet-loss concealment; FFmpeg cannot conceal (an empty packet means "end of
stream" to it), so the PyAV fallback conceals with silence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import urllib.parse
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scoreq_live.errors import ScoreqLiveError


class CodecError(ScoreqLiveError):
    """A codec, payload type, ``?codec=`` query or SDP that cannot be used; the message says what is accepted."""


@dataclass(frozen=True)
class Codec:
    """One payload type of a stream: what the RTP timestamps count and what the decoder produces."""

    name: str  # "PCMU", "PCMA", "G722", "L16", "opus", "telephone-event", "CN"
    pt: int  # RTP payload type, 0..127
    clock_rate: int  # RTP timestamp units per second
    audio_rate: int  # decoded samples per second (G722: 16000 on an 8000 clock)
    channels: int  # as signalled (opus: 2); decoders always return mono
    decodable: bool  # False for telephone-event and CN: recognised, counted, never decoded


STATIC: dict[int, Codec] = {
    0: Codec("PCMU", 0, 8000, 8000, 1, True),
    8: Codec("PCMA", 8, 8000, 8000, 1, True),
    9: Codec("G722", 9, 8000, 16000, 1, True),
    10: Codec("L16", 10, 44100, 44100, 2, True),
    11: Codec("L16", 11, 44100, 44100, 1, True),
}

# Other RFC 3551 static payload types: named in messages, and CN is recognised (not decoded) in SDP.
_STATIC_OTHER: dict[int, str] = {
    3: "GSM", 4: "G723", 5: "DVI4/8000", 6: "DVI4/16000", 7: "LPC", 12: "QCELP", 13: "CN", 14: "MPA",
    15: "G728", 16: "DVI4/11025", 17: "DVI4/22050", 18: "G729",
}

_CANONICAL = {"pcmu": "PCMU", "pcma": "PCMA", "g722": "G722", "l16": "L16", "opus": "opus",
              "telephone-event": "telephone-event", "cn": "CN"}
_SUPPORTED = "PCMU, PCMA, G722, L16, opus (telephone-event and CN are recognised and not decoded)"
_STATIC_PT = {"PCMU": 0, "PCMA": 8, "G722": 9, "CN": 13}


def _check_pt(pt: int) -> None:
    if not 0 <= pt <= 127:
        raise CodecError(f"RTP payload type {pt} is out of range: payload types are 0..127")


def codec_by_name(name: str, pt: int, rate: int | None = None, channels: int | None = None) -> Codec:
    """The codec ``name`` (case-insensitive, as in an SDP ``a=rtpmap``) on payload type ``pt``.

    ``rate`` is the RTP clock rate and ``channels`` the channel count as signalled; None takes the
    codec's default.  Raises :class:`CodecError` for an unknown name or a rate/channel count the
    codec cannot have, naming what is accepted.
    """
    _check_pt(pt)
    canon = _CANONICAL.get(name.strip().lower())
    if canon is None:
        raise CodecError(f"unsupported codec {name!r}; supported: {_SUPPORTED}")
    if channels is not None and channels < 1:
        raise CodecError(f"{canon}: channels must be at least 1 (got {channels})")
    if rate is not None and rate <= 0:
        raise CodecError(f"{canon}: rate must be a positive RTP clock rate (got {rate})")

    if canon in ("PCMU", "PCMA"):
        if rate not in (None, 8000):
            raise CodecError(f"{canon} uses an RTP clock of 8000; rate={rate} is not possible (leave rate out)")
        if channels not in (None, 1):
            raise CodecError(f"{canon} is mono here; channels={channels} is not supported (leave channels out)")
        return Codec(canon, pt, 8000, 8000, 1, True)
    if canon == "G722":
        if rate not in (None, 8000):
            raise CodecError(f"G722 is signalled with an RTP clock of 8000 although its audio is 16 kHz "
                             f"(RFC 3551); rate={rate} is not possible (leave rate out)")
        if channels not in (None, 1):
            raise CodecError(f"G722 is mono here; channels={channels} is not supported (leave channels out)")
        return Codec("G722", pt, 8000, 16000, 1, True)
    if canon == "opus":
        if rate not in (None, 48000):
            raise CodecError(f"opus always uses an RTP clock of 48000, whatever the audio bandwidth (RFC 7587); "
                             f"rate={rate} is not possible (leave rate out)")
        if channels not in (None, 1, 2):
            raise CodecError(f"opus is signalled with 1 or 2 channels; channels={channels} is not possible")
        return Codec("opus", pt, 48000, 48000, channels or 2, True)
    if canon == "L16":
        if rate is None:
            if pt in (10, 11) and channels in (None, STATIC[pt].channels):
                return STATIC[pt]
            raise CodecError("L16 needs its sample rate: rate=<Hz> (e.g. rate=16000); "
                             "only static payload types 10 and 11 imply 44100")
        if not 1000 <= rate <= 384000:
            raise CodecError(f"L16 rate must be 1000..384000 Hz (got {rate})")
        ch = channels or 1
        if ch > 16:
            raise CodecError(f"L16 channels must be 1..16 (got {ch})")
        return Codec("L16", pt, rate, rate, ch, True)
    # telephone-event (RFC 4733) and CN (RFC 3389): recognised so that they are counted, never decoded.
    r = rate or 8000
    return Codec(canon, pt, r, r, channels or 1, False)


def parse_codec_query(query: str) -> dict[int, Codec]:
    """The payload type a ``?codec=...`` query names: ``"codec=opus&pt=111"``, ``"codec=L16&rate=16000&pt=96"``.

    Keys: ``codec`` (name), ``pt`` (payload type), ``rate`` (RTP clock rate), ``channels``.  Static
    codecs (PCMU, PCMA, G722, L16 at 44100 with 1 or 2 channels) default to their static payload type;
    a dynamic one (opus, other L16) needs ``pt``.  ``pt`` alone names a static payload type.  An
    empty query gives an empty dict.
    """
    q = query.strip()
    if q.startswith("?"):
        q = q[1:]
    if not q:
        return {}
    accepted = "codec, pt, rate, channels"
    values: dict[str, str] = {}
    for part in q.split("&"):
        if not part:
            continue
        if "=" not in part:
            raise CodecError(f"codec query part {part!r} has no value; write key=value with keys {accepted}")
        key, value = (urllib.parse.unquote_plus(s).strip() for s in part.split("=", 1))
        key = key.lower()
        if key not in ("codec", "pt", "rate", "channels"):
            raise CodecError(f"unknown key {key!r} in codec query {query!r}; accepted keys: {accepted}")
        if key in values:
            raise CodecError(f"key {key!r} is given twice in codec query {query!r}")
        if not value:
            raise CodecError(f"key {key!r} has an empty value in codec query {query!r}")
        values[key] = value

    ints: dict[str, int] = {}
    for key in ("pt", "rate", "channels"):
        if key in values:
            try:
                ints[key] = int(values[key])
            except ValueError:
                raise CodecError(f"{key}={values[key]!r} in codec query is not a whole number") from None
    pt = ints.get("pt")
    rate = ints.get("rate")
    channels = ints.get("channels")
    if pt is not None:
        _check_pt(pt)

    if "codec" not in values:
        if pt is not None and pt in STATIC and rate is None and channels is None:
            return {pt: STATIC[pt]}
        if pt is not None and pt in STATIC:
            raise CodecError(f"pt={pt} is the static payload type {STATIC[pt].name}: leave rate/channels out, "
                             f"or name the codec with codec=<name> ({_SUPPORTED})")
        raise CodecError(f"codec query {query!r} needs codec=<name> ({_SUPPORTED}); "
                         f"pt alone is enough only for the static payload types {sorted(STATIC)}")

    name = values["codec"]
    canon = _CANONICAL.get(name.lower())
    if canon is None:
        raise CodecError(f"codec={name!r} is not supported; supported: {_SUPPORTED}")
    if pt is None:
        if canon == "L16":
            if (rate == 44100 and channels in (None, 1, 2)) or (rate is None and channels in (1, 2)):
                pt = 10 if channels == 2 else 11
            else:
                raise CodecError("codec=L16 needs pt=<96..127> (the sender's dynamic payload type) and rate=<Hz>, "
                                 "e.g. ?codec=L16&rate=16000&pt=96; only 44100 Hz with 1 or 2 channels has a "
                                 "static payload type (11, 10)")
        elif canon in _STATIC_PT:
            pt = _STATIC_PT[canon]
        else:
            raise CodecError(f"codec={name} uses a dynamic payload type: add pt=<96..127>, the number the sender "
                             f"uses (its SDP a=rtpmap line), e.g. ?codec={name}&pt=111")
    codec = codec_by_name(canon, pt, rate, channels)
    return {pt: codec}


@dataclass(frozen=True)
class SdpMedia:
    """One ``m=audio`` section of an SDP: where the RTP arrives and which payload types it may carry."""

    addr: str | None  # connection address (media-level c= over session-level c=), None when absent
    port: int
    codecs: dict[int, Codec]
    unsupported: dict[int, str] = field(default_factory=dict)  # offered payload types not usable here, why


def _conn_addr(value: str) -> str | None:
    # c=<nettype> <addrtype> <address>[/ttl[/count]]
    parts = value.split()
    if len(parts) < 3:
        return None
    return parts[2].split("/")[0]


def parse_sdp(text: str) -> list[SdpMedia]:
    """The audio streams an SDP describes (video and other media are ignored).

    Handles session- and media-level ``c=``, ``m=audio PORT RTP/AVP pt...``, ``a=rtpmap:PT NAME/RATE[/CH]``,
    static payload types without rtpmap and several ``m=audio`` lines.  Disabled (port 0) and encrypted
    (SAVP) audio is skipped.  Raises :class:`CodecError` when no usable audio stream is left.
    """
    session_addr: str | None = None
    sections: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    in_media = False
    for raw in text.splitlines():
        line = raw.strip().lstrip("\ufeff")
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:].strip()
        if kind == "m":
            in_media = True
            parts = value.split()
            if len(parts) >= 3 and parts[0].lower() == "audio":
                current = {"m": parts, "addr": None, "rtpmap": {}}
                sections.append(current)
            else:
                current = None  # video, application, ...: its attributes are not ours
        elif kind == "c":
            addr = _conn_addr(value)
            if not in_media:
                session_addr = addr
            elif current is not None:
                current["addr"] = addr
        elif kind == "a" and current is not None and value.lower().startswith("rtpmap:"):
            pt_s, _, mapped = value[7:].partition(" ")
            try:
                current["rtpmap"][int(pt_s)] = mapped.strip()
            except ValueError:
                continue

    if not sections:
        raise CodecError("the SDP has no audio stream (no m=audio line)")

    media: list[SdpMedia] = []
    skipped: list[str] = []
    for sec in sections:
        mline: list[str] = sec["m"]
        port_s, proto, fmts = mline[1], mline[2], mline[3:]
        try:
            port = int(port_s.split("/")[0])
        except ValueError:
            skipped.append(f"m=audio with port {port_s!r} (not a number)")
            continue
        if port == 0:
            skipped.append("m=audio with port 0 (disabled)")
            continue
        if not 1 <= port <= 65535:
            skipped.append(f"m=audio with port {port} (out of range)")
            continue
        if "SAVP" in proto.upper() or "TLS" in proto.upper():
            skipped.append(f"m=audio {port} {proto} (encrypted SRTP is not supported)")
            continue
        if not proto.upper().startswith("RTP/AVP"):
            skipped.append(f"m=audio {port} {proto} (not RTP/AVP)")
            continue
        codecs: dict[int, Codec] = {}
        unsupported: dict[int, str] = {}
        rtpmap: dict[int, str] = sec["rtpmap"]
        for f in fmts:
            try:
                pt = int(f)
                _check_pt(pt)
            except (ValueError, CodecError):
                continue
            enc = rtpmap.get(pt)
            if enc is None:
                if pt in STATIC:
                    codecs[pt] = STATIC[pt]
                elif pt == 13:
                    codecs[pt] = codec_by_name("CN", 13)
                elif pt in _STATIC_OTHER:
                    unsupported[pt] = f"{_STATIC_OTHER[pt]} (not supported)"
                else:
                    unsupported[pt] = "dynamic payload type without a=rtpmap"
                continue
            bits = enc.split("/")
            try:
                rate = int(bits[1]) if len(bits) > 1 and bits[1] else None
                ch = int(bits[2]) if len(bits) > 2 and bits[2] else None
            except ValueError:
                unsupported[pt] = f"{enc} (rate/channels not numbers)"
                continue
            try:
                codecs[pt] = codec_by_name(bits[0], pt, rate, ch)
            except CodecError as e:
                unsupported[pt] = f"{enc}: {e}"
        if any(c.decodable for c in codecs.values()):
            media.append(SdpMedia(sec["addr"] or session_addr, port, codecs, unsupported))
        else:
            offered = ", ".join(f"{pt} {why}" for pt, why in unsupported.items()) or "no payload types"
            skipped.append(f"m=audio {port} offers no decodable codec ({offered}; supported: {_SUPPORTED})")
    if not media:
        raise CodecError("the SDP has no usable audio stream: " + "; ".join(skipped))
    return media


# --------------------------------------------------------------------------------------------- decoders


def _mulaw_table() -> np.ndarray:
    # G.711 mu-law expansion: complement, then sign / 3-bit segment / 4-bit step (same as FFmpeg's pcm_mulaw).
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    val = np.where(u & 0x80, -mag, mag)
    return (val / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    # G.711 A-law expansion: even bits inverted, then sign / segment / step (same as FFmpeg's pcm_alaw).
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    val = np.where(a & 0x80, t, -t)
    return (val / 32768.0).astype(np.float32)


_EMPTY = np.zeros(0, np.float32)


class Decoder:
    """One stream's decoder: :meth:`decode` one packet's payload, :meth:`conceal` a lost stretch.

    Output is float32 mono at ``codec.audio_rate``.  ``decode`` never raises on a bad payload: it
    counts it in ``errors`` and returns concealment as long as the last good packet.  ``plc`` is True
    when :meth:`conceal` is more than silence.
    """

    plc: bool = False

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.errors = 0
        self._last_n = codec.audio_rate // 50  # 20 ms until a packet says otherwise

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            out = self._decode(payload)
        except Exception:  # a garbled payload must never stop the stream
            out = None
        if out is None:
            self.errors += 1
            return self.conceal(self._last_n)
        if out.size:
            self._last_n = int(out.size)
        return out

    def _decode(self, payload: bytes) -> np.ndarray | None:
        raise NotImplementedError

    def conceal(self, n: int) -> np.ndarray:
        """``n`` samples standing in for lost audio: the codec's concealment if it has one, else silence."""
        return np.zeros(max(int(n), 0), np.float32)


class G711Decoder(Decoder):
    """PCMU / PCMA by table lookup; conceals with silence (no G.711 Appendix I PLC)."""

    _TABLES = {"PCMU": _mulaw_table(), "PCMA": _alaw_table()}

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec)
        self._table = self._TABLES[codec.name]

    def _decode(self, payload: bytes) -> np.ndarray | None:
        return self._table[np.frombuffer(payload, np.uint8)]


class L16Decoder(Decoder):
    """Linear 16-bit PCM, network byte order, channels interleaved: averaged to mono."""

    def _decode(self, payload: bytes) -> np.ndarray | None:
        ch = self.codec.channels
        usable = len(payload) // (2 * ch) * 2 * ch  # a torn last frame is dropped
        x = np.frombuffer(payload, ">i2", count=usable // 2)
        if ch > 1:
            return (x.reshape(-1, ch).astype(np.float32).mean(axis=1) / 32768.0).astype(np.float32)
        return x.astype(np.float32) / np.float32(32768.0)


def _frames_to_mono(frames: list[Any]) -> np.ndarray:
    """PyAV audio frames (packed or planar, int16 or float) as one float32 mono array."""
    parts = []
    for fr in frames:
        a = fr.to_ndarray()
        planar = fr.format.is_planar
        nch = len(fr.layout.channels)
        if not planar:
            a = a.reshape(-1, nch).T  # (1, n*ch) interleaved -> (ch, n)
        x = a.astype(np.float32)
        if a.dtype == np.int16:
            x /= 32768.0
        elif a.dtype == np.int32:
            x /= 2147483648.0
        parts.append(x.mean(axis=0) if x.shape[0] > 1 else x[0])
    if not parts:
        return _EMPTY
    return np.concatenate(parts).astype(np.float32, copy=False)


class G722Decoder(Decoder):
    """G.722 through PyAV (FFmpeg), 16 kHz out; conceals with silence."""

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec)
        import av

        self._ctx = av.CodecContext.create("g722", "r")
        self._ctx.format = "s16"
        self._ctx.layout = "mono"
        self._ctx.sample_rate = 16000
        self._packet = av.Packet

    def _decode(self, payload: bytes) -> np.ndarray | None:
        if not payload:
            return _EMPTY
        return _frames_to_mono(self._ctx.decode(self._packet(payload)))


class AvOpusDecoder(Decoder):
    """Opus through PyAV: FFmpeg's libopus wrapper, else FFmpeg's own decoder.  Neither conceals: silence."""

    def __init__(self, codec: Codec, ffmpeg_decoder: str | None = None) -> None:
        super().__init__(codec)
        import av
        from av.audio.codeccontext import AudioCodecContext

        if ffmpeg_decoder is None:
            ffmpeg_decoder = "libopus" if "libopus" in av.codecs_available else "opus"
        ctx = av.CodecContext.create(ffmpeg_decoder, "r")
        if not isinstance(ctx, AudioCodecContext):
            raise CodecError(f"FFmpeg decoder {ffmpeg_decoder!r} is not an audio decoder")
        self._ctx = ctx
        self._ctx.format = "s16"
        self._ctx.layout = "mono"  # libopus downmixes a stereo stream itself
        self._ctx.sample_rate = 48000
        self._packet = av.Packet

    def _decode(self, payload: bytes) -> np.ndarray | None:
        if not payload:
            return None  # FFmpeg would take an empty packet as end of stream
        return _frames_to_mono(self._ctx.decode(self._packet(payload)))


_OPUS_MAX = 5760  # 120 ms at 48 kHz: the longest Opus packet
_OPUS_STEP = 120  # concealment is asked for in whole 2.5 ms steps


@functools.lru_cache(maxsize=1)
def _libopus() -> Any | None:
    """libopus through ctypes: the system library, else the copy bundled with PyAV; None when neither loads."""
    candidates: list[str] = []
    found = ctypes.util.find_library("opus")
    if found:
        candidates.append(found)
    try:
        import av

        av_dir = os.path.dirname(os.path.abspath(av.__file__))
        for folder in (os.path.join(os.path.dirname(av_dir), "av.libs"), os.path.join(av_dir, ".dylibs"), av_dir):
            for pattern in ("libopus*.so*", "libopus*.dylib", "*opus*.dll"):
                candidates += sorted(glob.glob(os.path.join(folder, pattern)))
    except ImportError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.opus_decoder_create.restype = ctypes.c_void_p
            lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
            lib.opus_decode_float.restype = ctypes.c_int
            lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                              ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_int]
            lib.opus_decoder_destroy.restype = None
            lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        except (OSError, AttributeError):
            continue
        return lib
    return None


def libopus_available() -> bool:
    """True when Opus streams get libopus's own packet-loss concealment (see :class:`OpusDecoder`)."""
    return _libopus() is not None


class OpusDecoder(Decoder):
    """Opus through libopus (ctypes), decoded straight to 48 kHz mono, with libopus's packet-loss concealment."""

    plc = True

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec)
        lib = _libopus()
        if lib is None:
            raise CodecError("libopus was not found (neither installed nor bundled with PyAV)")
        err = ctypes.c_int(0)
        state = lib.opus_decoder_create(48000, 1, ctypes.byref(err))
        if not state or err.value != 0:
            raise CodecError(f"libopus could not create a decoder (error {err.value})")
        self._lib = lib
        self._state: int = state
        destroy: Callable[[int], None] = lib.opus_decoder_destroy
        self._finalizer = weakref.finalize(self, destroy, state)
        self._buf = np.zeros(_OPUS_MAX, np.float32)
        self._ptr = self._buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def _decode(self, payload: bytes) -> np.ndarray | None:
        if not payload:
            return None  # libopus would read an empty payload as "lost": conceal, counted as an error
        n = self._lib.opus_decode_float(self._state, payload, len(payload), self._ptr, _OPUS_MAX, 0)
        if n < 0:
            return None
        return self._buf[:n].copy()

    def conceal(self, n: int) -> np.ndarray:
        n = max(int(n), 0)
        out = np.empty(n, np.float32)
        done = 0
        while done < n:
            step = min(-(-(n - done) // _OPUS_STEP) * _OPUS_STEP, _OPUS_MAX)
            got = self._lib.opus_decode_float(self._state, None, 0, self._ptr, step, 0)
            if got <= 0:  # cannot happen for a valid step; fall back to silence rather than loop
                out[done:] = 0.0
                break
            take = min(got, n - done)
            out[done:done + take] = self._buf[:take]
            done += take
        return out


def make_decoder(codec: Codec) -> Decoder:
    """A fresh decoder for one stream of ``codec``; :class:`CodecError` for telephone-event / CN."""
    if not codec.decodable:
        raise CodecError(f"{codec.name} (payload type {codec.pt}) carries no audio to decode")
    if codec.name in ("PCMU", "PCMA"):
        return G711Decoder(codec)
    if codec.name == "L16":
        return L16Decoder(codec)
    if codec.name == "G722":
        return G722Decoder(codec)
    if codec.name == "opus":
        return OpusDecoder(codec) if libopus_available() else AvOpusDecoder(codec)
    raise CodecError(f"no decoder for {codec.name}; supported: {_SUPPORTED}")
