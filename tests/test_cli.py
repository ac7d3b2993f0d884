"""The command line as a user runs it: real processes, real files, the real bundled model."""

import csv
import json
import subprocess
import sys

import pytest

from tests.helpers import MUSHRA, SCOREQ_PAIR


def run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and "scoreq-live" in out.stdout
    out = run("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "score" in out.stdout


def test_demo_runs_on_the_bundled_recordings_and_model(tmp_path):
    out = run("demo", "--fast", "--no-tui", "--jsonl", tmp_path / "ev.jsonl")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert {e["stream"] for e in events if e["type"] != "call_record"} == {"clean", "lyra3"}
    ends = {e["stream"]: e for e in events if e["type"] == "stream_ended"}
    calls = [e for e in events if e["type"] == "call_record"]  # each file is a call of its own
    assert sorted(c["streams"][0]["stream"] for c in calls) == ["clean", "lyra3"]
    assert set(ends) == {"clean", "lyra3"} and all(e["reason"] == "eof" for e in ends.values())

    def mean(stream):
        v = [e["mos"] for e in events if e["type"] == "score" and e["stream"] == stream and e["mos"] is not None]
        assert len(v) >= 15
        return sum(v) / len(v)

    assert mean("clean") - mean("lyra3") > 0.5


def test_score_folder_and_list_file_to_json_and_csv(tmp_path, data):
    listing = tmp_path / "files.txt"
    listing.write_text(f"# two files\n{SCOREQ_PAIR / 'ref.wav'}\n\n{SCOREQ_PAIR / 'opus.wav'}\n")
    out = run("score", MUSHRA / "stim_04", listing, "--json", "-", "--csv", tmp_path / "s.csv")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert len(results) == 12  # 10 files in the folder + 2 listed
    by_name = {r["file"].split("/")[-2] + "/" + r["file"].split("/")[-1]: r for r in results}
    assert by_name["scoreq/ref.wav"]["mos"] > by_name["scoreq/opus.wav"]["mos"] + 1
    r = by_name["stim_04/ref.wav"]
    assert set(r) >= {"file", "mos", "windows"} and len(r["windows"]) == 1  # 2.08 s: one short window
    assert r["windows"][0]["t_end"] == pytest.approx(2.08, abs=0.01)
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 12 and float(rows[0]["mos"]) == pytest.approx(results[0]["mos"], abs=1e-4)


def test_score_in_ref_mode_gives_distances(data):
    out = run("score", SCOREQ_PAIR / "ref.wav", SCOREQ_PAIR / "opus.wav", "--mode", "ref",
              "--reference", SCOREQ_PAIR / "ref.wav", "--json", "-")
    assert out.returncode == 0, out.stderr
    ref, opus = json.loads(out.stdout)
    assert "mos" not in ref and ref["distance"] == pytest.approx(0.0, abs=1e-4)
    assert opus["distance"] > 0.1


def test_monitor_in_ref_mode_streams_distances(tmp_path, data):
    out = run("--input", f"opus={SCOREQ_PAIR / 'opus.wav'}", "--mode", "ref", "--reference",
              SCOREQ_PAIR / "ref.wav", "--window", "4", "--fast", "--no-tui", "--jsonl", "-", "-q")
    assert out.returncode == 0, out.stderr
    scores = [e for e in map(json.loads, out.stdout.splitlines()) if e["type"] == "score"]
    assert scores and all("distance" in e and e["mode"] == "ref" for e in scores)
    assert all(e["distance"] > 0.05 for e in scores if e["distance"] is not None)


@pytest.mark.parametrize("args, message", [
    (["--input", "nope.wav"], "no such file"),
    (["--input", "x.wav", "--model", "no-such-model"], "unknown model"),
    (["--input", "x.wav", "--mode", "ref"], "needs --reference"),
    (["--input", "x.wav", "--window", "10"], "longer than distillmos's fixed input"),
    (["--input", "x.wav", "--model", "x.wav"], "not a loadable ONNX model"),
])
def test_bad_options_give_one_clear_error(tmp_path, args, message):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "x.wav", np.zeros(1600, np.float32), 16000)
    out = run(*args, "--no-tui", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and out.stderr.count("scoreq-live: error") == 1, out.stderr
