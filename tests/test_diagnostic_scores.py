"""Why a call sounds bad: DNSMOS's SIG/BAK/OVRL and PLCMOS beside Distill-MOS, on one monitor.

Real speech three ways: clean, in white noise at 5 dB SNR (a noisy room), and with 15 % of its 20 ms
frames lost and not concealed (a lossy network).  The monitor scores each with all three models at
once; the split must say which is which.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import MUSHRA, ScoreqProcess, joined

MODELS = "distillmos,dnsmos,plcmos"


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("diag")
    x = joined(sorted(MUSHRA.glob("stim_0*/ref.wav")))  # ~26 s of real speech
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(x.size).astype(np.float32) * np.sqrt(np.mean(x ** 2) / 10 ** (5 / 10))
    lossy = x.copy()
    for i in range(0, x.size, 320):
        if rng.random() < 0.15:
            lossy[i:i + 320] = 0.0
    for name, y in (("clean", x), ("noisy", x + noise), ("lossy", lossy)):
        sf.write(folder / f"{name}.wav", y.astype(np.float32), 16000)
    return folder


def means(events, stream, model):
    out: dict[str, list[float]] = {}
    for e in events:
        if e["type"] == "model_score" and e["stream"] == stream and e["model"] == model and e["scores"]:
            for k, v in e["scores"].items():
                out.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_the_split_tells_a_noisy_room_from_a_lossy_network(three_ways, tmp_path):
    jsonl = tmp_path / "events.jsonl"
    proc = ScoreqProcess(*(a for n in ("clean", "noisy", "lossy") for a in ("--input", f"{n}={three_ways / n}.wav")),
                         "--models", MODELS, "--fast", "--no-tui", "--device", "cpu", "--jsonl", str(jsonl),
                         "--alert", "dnsmos.bak<2.8 for 3s", "--alert", "plcmos<3 for 4s")
    assert proc.proc.wait(timeout=600) == 0, proc.output()
    evs = [json.loads(line) for line in jsonl.read_text().splitlines()]

    started = [e for e in evs if e["type"] == "stream_started"]
    assert [m["model"] for m in started[0]["models"]] == ["dnsmos", "plcmos"]
    assert started[0]["models"][0]["scores"] == ["dnsmos.ovrl", "dnsmos.sig", "dnsmos.bak", "dnsmos.p808"]
    # Each model on its own window and hop: DNSMOS 9.01 s every 3 s, PLCMOS 10 s every 2 s.
    for model, window, hop in (("dnsmos", 9.01, 3.0), ("plcmos", 10.0, 2.0)):
        ws = [e for e in evs if e["type"] == "model_score" and e["stream"] == "clean" and e["model"] == model]
        full = [e for e in ws if e["t_end"] - e["t_start"] > window - 0.01]
        assert len(full) >= 3 and {round(b["t_start"] - a["t_start"], 3) for a, b in zip(full, full[1:])} == {hop}

    clean, noisy, lossy = (means(evs, s, "dnsmos") for s in ("clean", "noisy", "lossy"))
    # Noise: the background score falls, the speech score much less.
    assert noisy["dnsmos.bak"] < clean["dnsmos.bak"] - 1.0
    assert noisy["dnsmos.sig"] > noisy["dnsmos.bak"] + 0.5
    # Loss: the speech score falls, the background stays clean.
    assert lossy["dnsmos.sig"] < clean["dnsmos.sig"] - 0.5
    assert lossy["dnsmos.bak"] > lossy["dnsmos.sig"] + 0.5
    # Overall and PLCMOS: clean is best.
    for m in (noisy, lossy):
        assert m["dnsmos.ovrl"] < clean["dnsmos.ovrl"] - 0.5
    plc = {s: means(evs, s, "plcmos")["plcmos"] for s in ("clean", "noisy", "lossy")}
    assert plc["lossy"] < plc["clean"] - 1.0 and plc["noisy"] < plc["clean"] - 1.0

    alerts = {(e["stream"], e["metric"]) for e in evs if e["type"] == "alert"}
    assert ("noisy", "dnsmos.bak") in alerts and not {("clean", "dnsmos.bak"), ("lossy", "dnsmos.bak")} & alerts
    assert {("noisy", "plcmos"), ("lossy", "plcmos")} <= alerts and ("clean", "plcmos") not in alerts

    # The records summarise every named score.
    records = {e["stream"]: e for e in evs if e["type"] == "stream_record"}
    for s, m in (("clean", clean), ("noisy", noisy), ("lossy", lossy)):
        assert abs(records[s]["scores"]["dnsmos.bak"]["mean"] - m["dnsmos.bak"]) < 1e-4
        assert records[s]["scores"]["plcmos"]["windows"] >= 3
