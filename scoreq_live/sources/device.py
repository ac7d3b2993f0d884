"""Sound-device capture through PortAudio (``sounddevice``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import ModuleType
from typing import TypedDict

import numpy as np

from scoreq_live.sources.base import Source, SourceError

log = logging.getLogger(__name__)

NO_DEVICE_HINT = "use --input FILE to score a recording instead"


class InputDevice(TypedDict):
    """An input device as PortAudio sees it."""

    index: int
    name: str
    channels: int
    rate: int  # its default sample rate
    default: bool
    hostapi: str


def _sounddevice() -> ModuleType:
    try:
        import sounddevice as sd
    except OSError as e:  # the PortAudio shared library is missing
        raise SourceError(f"no sound device support (PortAudio not found: {e}); {NO_DEVICE_HINT}") from e
    return sd


def input_devices() -> list[InputDevice]:
    """The input devices PortAudio sees, each with its index and whether it is the default."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        default = sd.default.device[0]
    except Exception as e:
        raise SourceError(f"cannot list sound devices: {e}; {NO_DEVICE_HINT}") from e
    out: list[InputDevice] = []
    for i, d in enumerate(devices):
        if d["max_input_channels"] > 0:
            out.append(InputDevice(index=i, name=str(d["name"]), channels=int(d["max_input_channels"]),
                                   rate=int(d["default_samplerate"]), default=(i == default),
                                   hostapi=str(sd.query_hostapis(d["hostapi"])["name"])))
    return out


def find_device(selector: str | None) -> InputDevice:
    """Pick an input device by index, exact name or name substring (None: the default)."""
    devices = input_devices()
    if not devices:
        raise SourceError(f"no sound input device found; {NO_DEVICE_HINT}")
    if selector is None or selector == "":
        for d in devices:
            if d["default"]:
                return d
        return devices[0]
    if selector.isdigit():
        for d in devices:
            if d["index"] == int(selector):
                return d
        raise SourceError(f"no input device with index {selector}; see 'scoreq-live devices'")
    exact = [d for d in devices if d["name"] == selector]
    if exact:
        return exact[0]
    sub = [d for d in devices if selector.lower() in d["name"].lower()]
    if len(sub) == 1:
        return sub[0]
    if len(sub) > 1:
        names = ", ".join(repr(d["name"]) for d in sub)
        raise SourceError(f"input device {selector!r} is ambiguous: {names}")
    raise SourceError(f"no input device matches {selector!r}; see 'scoreq-live devices'")


class DeviceSource(Source):
    """Captures mono audio from an input device at the device's own rate.

    PortAudio's callback thread only copies the block and hands it to the
    event loop; a full queue (the loop stalled) drops the block and counts it
    rather than blocking the audio thread.
    """

    kind = "mic"

    def __init__(self, name: str, device: str | None = None, rate: int | None = None,
                 block_s: float = 0.02, queue_s: float = 5.0) -> None:
        super().__init__(name, device or "default")
        self.selector = device
        self.requested_rate = rate
        self.block_s = block_s
        self.queue_s = queue_s
        self.dropped_blocks = 0
        self.dropped_frames = 0
        self.status_flags = 0

    @property
    def dropped_s(self) -> float:
        """Audio lost because the event loop stalled until the block queue (``queue_s``) was full."""
        return self.dropped_frames / self.rate if self.rate else 0.0

    def check(self) -> None:
        self.detail = find_device(self.selector)["name"]

    async def frames(self) -> AsyncIterator[np.ndarray]:
        sd = _sounddevice()
        dev = find_device(self.selector)
        self.detail = dev["name"]
        self.rate = self.requested_rate or dev["rate"]
        self.channels = 1
        loop = asyncio.get_running_loop()
        blocksize = max(1, int(self.rate * self.block_s))
        queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=max(4, int(self.queue_s / self.block_s)))

        def put(block: np.ndarray) -> None:
            try:
                queue.put_nowait(block)
            except asyncio.QueueFull:
                self.dropped_blocks += 1
                self.dropped_frames += len(block)

        def callback(indata: np.ndarray, frames: int, time: object, status: object) -> None:  # PortAudio thread
            if status:
                self.status_flags += 1
            loop.call_soon_threadsafe(put, indata.copy())

        try:
            stream = sd.InputStream(device=dev["index"], samplerate=self.rate, channels=1, dtype="float32",
                                    blocksize=blocksize, latency="low", callback=callback)
        except Exception as e:
            raise SourceError(f"cannot open input device {dev['name']!r}: {e}") from e
        getter: asyncio.Future[np.ndarray] | None = None
        try:
            with stream:
                while True:
                    # asyncio.wait, not wait_for: before Python 3.12 wait_for can swallow a cancellation that
                    # comes as a block arrives, and the monitor would never stop.
                    if getter is None:
                        getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter}, timeout=2.0)
                    if not done:
                        if not stream.active:
                            raise SourceError(f"input device {dev['name']!r} stopped delivering audio")
                        continue
                    block, getter = getter.result(), None
                    yield block
        finally:
            if getter is not None:
                getter.cancel()
