"""The one resampler every input goes through to 16 kHz, so the same audio gives the same windows and scores.

Files, devices and pushed streams (:class:`scoreq_live.sources.base.Normaliser`) and RTP streams
(:class:`scoreq_live.rtp.receiver.RtpStream`, after decoding and concealment) each keep one
:class:`Resampler` per stream; offline scoring and references (:func:`scoreq_live.audio.audio_blocks`)
stream files through it too.

The quality (:data:`QUALITY`) is soxr's ``HQ``.  What each quality holds back, measured with python-soxr 1.1
on mono float32 fed in 20 ms blocks: the output due for the input so far that a call has not returned yet,
in milliseconds, mean / max:

=========  ==================  ===================  ===================  ===================
in rate    LQ                  MQ                   HQ                   VHQ
=========  ==================  ===================  ===================  ===================
8 kHz      32 / 61             64 / 118             64 / 115             64 / 111
24, 48 k   11 / 20             21 / 38              21 / 37              43 / 76
44.1 kHz   12 / 22             23 / 41              23 / 40              47 / 84
=========  ==================  ===================  ===================  ===================

(soxr's ``delay()``, the filter's own part of that: HQ 20 ms at 8 kHz, 15 ms at 48 kHz; the rest is soxr
working in blocks.)  MQ saves nothing over HQ and VHQ holds twice as much at 48 kHz.  LQ halves the wait but
is 8 dB down at 3.4 kHz already, in the telephone band the model hears (HQ is flat to 3.7 kHz from 8 kHz,
where the home-made resampler this replaces was 6 dB down at 3.6 kHz and scored 0.02-0.18 MOS lower), and
QQ is a cubic interpolator.  HQ is also ``soxr.resample``'s default, i.e. what offline scoring and the
bundled model's own preprocessing use, so live and offline scores agree.  Tens of milliseconds are small
against a window of seconds.

The output is aligned with the input (soxr compensates its delay) and does not depend on how the input is
chunked.  Lost packets need nothing here: the receiver conceals them and streams the concealment through
like any other audio.
"""

from __future__ import annotations

import numpy as np
import soxr

from scoreq_live.core import SAMPLE_RATE

QUALITY = "HQ"
_EMPTY = np.zeros(0, np.float32)


class Resampler:
    """One stream's audio at ``rate`` -> 16 kHz mono float32, streaming (a passthrough at 16 kHz).

    :meth:`process` returns what it can so far and keeps the filter's state for the next block;
    :meth:`flush` returns the rest at the end of the stream (the input taken to stop there) and leaves the
    resampler ready for a new stream.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._rs = (None if rate == SAMPLE_RATE
                    else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=QUALITY))

    def process(self, x: np.ndarray) -> np.ndarray:
        """Mono audio at :attr:`rate` in; 16 kHz float32 out, as far as it can be computed yet."""
        x = np.ascontiguousarray(x, np.float32)
        if self._rs is None:
            return x
        return self._rs.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """The output still held back; the stream ends here."""
        if self._rs is None:
            return _EMPTY
        y = self._rs.resample_chunk(_EMPTY, last=True)
        self._rs.clear()
        return y
