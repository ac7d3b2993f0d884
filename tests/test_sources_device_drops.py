"""A real capture device whose blocks are dropped while the event loop stalls: the loss is reported.

PortAudio captures a private PulseAudio null sink (tests/pulse.py) in a child process, so
PortAudio initialises with that server's environment. The child stalls its own event loop
for 0.8 s while the sound card goes on delivering 20 ms blocks into a 0.1 s queue.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import asyncio, time
import numpy as np
from scoreq_live.bus import EventBus
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.sources.device import DeviceSource

class Constant:
    def score(self, windows):
        return np.full(len(windows), 3.0)

async def main():
    bus = EventBus()
    sub = bus.subscribe()
    source = DeviceSource("mic", "pulse", queue_s=0.1)
    engine = Engine(Constant(), [source], EngineConfig(stream=StreamConfig(window_s=1.0, hop_s=1.0)), bus)
    asyncio.get_running_loop().call_later(0.6, time.sleep, 0.8)  # the loop stalls; the sound card does not
    await engine.run(duration=2.5)
    while (ev := sub.get_nowait()) is not None:
        print(ev.to_json())
    print(f'{{"type": "source", "dropped_blocks": {source.dropped_blocks}, "dropped_s": {source.dropped_s}}}')

asyncio.run(main())
"""


def test_blocks_dropped_while_the_loop_stalls_become_one_input_dropped_event(pulse_server):
    out = subprocess.run([sys.executable, "-c", CHILD], env=pulse_server.client_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [json.loads(line) for line in out.stdout.splitlines()]
    source = events.pop()
    drops = [e for e in events if e["type"] == "input_dropped"]
    assert source["dropped_blocks"] > 0, "the stall should overflow the 0.1 s block queue"
    # 0.8 s stalled, 0.1 s of it queued: most of the rest is lost (PortAudio's own buffer may keep a little).
    assert 0.3 <= source["dropped_s"] <= 0.8, source
    assert len(drops) == 1 and drops[0]["stream"] == "mic"
    assert drops[0]["dropped_s"] == drops[0]["total_s"] == round(source["dropped_s"], 4)
    assert 0.3 < drops[0]["t"] < 2.5  # stream time of the gap: after the first blocks, before the end
    assert [e["type"] for e in events][-1] == "stream_ended"
