"""Live capture (``sniff:lo``): what a packet costs the monitor, the rate it keeps up with, and INVITE to score.

    sudo python bench/bench_sniff.py            # about 2 minutes (needs CAP_NET_RAW)
    sudo python bench/bench_sniff.py --quick

1. **Packets per second per core.**  A monitor process captures loopback while this process sends RTP (20 SSRCs,
   160-byte PCMU payloads, paced) to a port on 127.0.0.1 at rising rates.  Each round reads the monitor's CPU
   time (user + system, from /proc) before and after: packets / CPU seconds is what one core handles.  Rounds
   with no traffic are interleaved (Q R1 Q R2 ...) and their CPU time subtracted, so the model and the loop's
   own work are not charged to packets.  A round whose packets the kernel dropped (the monitor says so on
   stderr) marks the rate it no longer keeps up with.
2. **INVITE to first score.**  A sipp call on loopback (real speech, PCMU): the time from the sipp caller's
   start to the first score of the call's stream, against the model's window (a first score needs one window
   of audio).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import rtp_tools as rt  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def send(port: int, pps: int, seconds: float, streams: int = 20) -> int:
    """RTP packets at ``pps`` for ``seconds``, paced in 10 ms slices; returns how many were sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = bytes(160)
    seqs = [0] * streams
    sent = 0
    start = time.monotonic()
    per_slice = max(pps // 100, 1)
    slice_i = 0
    while time.monotonic() - start < seconds:
        for _ in range(per_slice):
            k = sent % streams
            seqs[k] += 1
            hdr = bytes([0x80, 0]) + (seqs[k] & 0xFFFF).to_bytes(2, "big") + (seqs[k] * 160).to_bytes(4, "big") \
                + (0x10000 + k).to_bytes(4, "big")
            sock.sendto(hdr + payload, ("127.0.0.1", port))
            sent += 1
        slice_i += 1
        wait = start + slice_i * 0.01 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    sock.close()
    return sent


class Monitor:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "scoreq_live", "monitor", "--no-tui", "--no-ws",
                                      "--jsonl", "-", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.events: list[tuple[float, dict]] = []
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append((time.time(), json.loads(line)))

    def drops(self) -> int:
        return sum(int(m[1]) for line in self.err if (m := re.search(r"kernel dropped (\d+) packets", line)))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def capacity(rates: list[int], seconds: float) -> list[dict]:
    port = rt.free_udp_port()
    mon = Monitor("-i", "lo=sniff:lo?sip-only=1", "--rtp-timeout", "2")
    try:
        time.sleep(8.0)  # the model loads, the capture opens
        out = []
        for pps in rates:
            c0 = cpu_s(mon.proc.pid)
            time.sleep(seconds)
            quiet = cpu_s(mon.proc.pid) - c0
            d0 = mon.drops()
            c0 = cpu_s(mon.proc.pid)
            n = send(port, pps, seconds)
            busy = cpu_s(mon.proc.pid) - c0
            time.sleep(0.5)
            cost = max(busy - quiet, 1e-6)
            out.append({"pps": pps, "sent": n, "monitor_cpu_s": round(busy, 3), "quiet_cpu_s": round(quiet, 3),
                        "packets_per_core_second": round(n / cost), "kernel_drops": mon.drops() - d0})
            print(out[-1], flush=True)
        return out
    finally:
        mon.stop()


def invite_to_score(tmp: Path) -> dict:
    wav = ROOT / "examples" / "clean.wav"
    pcap = tmp / "caller.pcap"
    rt.write_pcap(pcap, [rt.RtpFlow(wav, "pcmu", ssrc=0x5EED, duration_s=12.0)])
    mon = Monitor("-i", "call=sniff:lo?sip-only=1", "--rtp-timeout", "2")
    try:
        time.sleep(8.0)
        t0 = time.time()
        with rt.sipp_rtp(pcap, rt.free_udp_port()) as call:
            call.wait()
        time.sleep(1.0)
        firsts = [t for t, e in mon.events if e["type"] == "score" and e.get("mos") is not None]
        start = next((e for _, e in mon.events if e["type"] == "stream_started"), {})
        return {"invite_to_first_score_s": round(firsts[0] - t0, 2) if firsts else None,
                "window_s": start.get("window_s"), "stream": start.get("stream")}
    finally:
        mon.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args()
    rates = [2000, 8000, 20000] if a.quick else [2000, 5000, 10000, 20000, 40000]
    report = {"capacity": capacity(rates, 3.0 if a.quick else 5.0)}
    with tempfile.TemporaryDirectory() as d:
        report["invite"] = invite_to_score(Path(d))
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
