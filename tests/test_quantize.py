"""Variants (int8, fp16): made, measured on real speech, kept only within the fidelity bar.

The SCOREQ-shaped models give the real graph and cost; a small contract
model gives a fast check of the refusal path.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scoreq_live.core.stream import StreamConfig
from scoreq_live.scoring import store
from scoreq_live.scoring.catalogue import import_model, known_models, scoreq_spec
from scoreq_live.scoring.quantize import Bar, judge, quantize
from tests.helpers import MUSHRA, SCOREQ_PAIR
from tests.tiny_models import build

OFFLINE = "http://127.0.0.1:9"  # nothing listens there: imports take the checksum from --md5


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def install(name, path):
    import_model(name, path, md5=hashlib.md5(path.read_bytes()).hexdigest(), mirror=OFFLINE)


def test_the_bar():
    mos = {"range": [1.0, 4.0], "max_abs_delta": 0.05, "pearson": 0.995, "unit": "MOS"}
    assert judge(dict(mos), Bar.default("mos")) == []
    assert judge(dict(mos, max_abs_delta=0.12), Bar.default("mos")) == ["max |delta| 0.12 MOS > 0.1"]
    assert judge(dict(mos, pearson=0.98), Bar.default("mos")) == ["Pearson 0.9800 < 0.99"]
    dist = {"range": [0.1, 0.5], "max_abs_delta": 0.009, "pearson": 0.999, "unit": "distance"}
    report = dict(dist)
    assert judge(report, Bar.default("embedding")) == [] and report["bar"]["max_abs_delta"] == pytest.approx(0.01)
    assert judge(dict(dist, max_abs_delta=0.011), Bar.default("embedding"))
    assert judge(dict(dist, max_abs_delta=0.011), Bar.default("embedding", max_delta=0.02)) == []


def test_a_variant_below_the_bar_is_refused_unless_forced(model_store, tmp_path, data):
    install("scoreq-natural-nr", build(tmp_path / "adapt_nr_telephone.onnx", kind="mos"))
    args = ["models", "quantize", "scoreq-natural-nr", "--int8", "--data", MUSHRA / "stim_01", "--max-delta", "1e-9",
            "--report", "-"]
    out = cli(*args)
    assert out.returncode == 1 and "misses the fidelity bar" in out.stderr and "not kept" in out.stderr
    report = json.loads(out.stdout)
    assert report["max_abs_delta"] > 1e-9 and not report["passed"] and report["failed"]
    n_files = len(list((MUSHRA / "stim_01").glob("*.wav")))
    assert report["files"] == n_files and report["windows"] >= n_files and report["unit"] == "MOS"
    variant = store.variant_path(known_models()["scoreq-natural-nr"].file, "int8")
    assert not variant.exists() and "scoreq-natural-nr-int8" not in known_models()

    out = cli(*args, "--force")
    assert out.returncode == 0, out.stderr
    assert "scoreq-natural-nr-int8" in known_models() and variant.is_file()
    fid = store.read_manifest(variant)["fidelity"]
    assert fid["forced"] and not fid["passed"]
    listed = {r["name"]: r for r in map(json.loads, cli("models", "list", "--json").stdout.splitlines())}
    int8 = listed["scoreq-natural-nr-int8"]
    assert int8["installed"] and "below the bar, forced" in int8["description"]
    out = cli("score", SCOREQ_PAIR / "ref.wav", "--model", "scoreq-natural-nr-int8", "--json", "-")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["mos"] is not None, out.stderr


@pytest.mark.slow
def test_int8_and_fp16_of_the_scoreq_shaped_nr_model(data, scoreq_shaped, model_store):
    install("scoreq-natural-nr", scoreq_shaped / "scoreq_shaped_nr.onnx")
    out = cli("models", "quantize", "scoreq-natural-nr", "--int8", "--data", MUSHRA / "stim_01", "--max-windows", "8",
              "--report", "-")
    r = json.loads(out.stdout)
    assert out.returncode == (0 if r["passed"] else 1), out.stderr
    assert r["windows"] == 8 and r["method"].startswith("dynamic int8") and "MatMul" in r["method"]
    assert r["size_mb"]["variant"] < 0.5 * r["size_mb"]["original"]
    assert r["ms_per_window"]["original"] > 0 and r["ms_per_window"]["variant"] > 0
    assert 0 < r["max_abs_delta"] < 0.1 and -1 <= r["pearson"] <= 1

    out = cli("models", "quantize", "scoreq-natural-nr", "--fp16", "--data", MUSHRA / "stim_01", "--max-windows", "8",
              "--report", "-")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["passed"] and r["max_abs_delta"] < 1e-3 and r["pearson"] > 0.999
    # The variant is a model of its own, with the original's contract.
    spec = known_models()["scoreq-natural-nr-fp16"]
    assert (spec.input_name, spec.pad_multiple, spec.default_window_s) == ("audio_input", 320, 4.0)
    f = MUSHRA / "stim_01" / "ref.wav"
    a = json.loads(cli("score", f, "--model", "scoreq-natural-nr", "--json", "-").stdout)
    b = json.loads(cli("score", f, "--model", "scoreq-natural-nr-fp16", "--json", "-").stdout)
    assert b[0]["mos"] == pytest.approx(a[0]["mos"], abs=1e-3)


@pytest.mark.slow
def test_fp16_of_the_scoreq_shaped_ref_model_compares_distances(data, scoreq_shaped, model_store):
    spec = scoreq_spec("scoreq-natural-ref").with_file(scoreq_shaped / "scoreq_shaped_ref.onnx")
    cfg = StreamConfig(window_s=4.0, hop_s=1.0)
    files = sorted((MUSHRA / "stim_02").glob("*.wav"))
    vspec, r = quantize(spec, "fp16", files, cfg, max_windows=6)
    assert r["unit"] == "distance" and r["windows"] == 6 and r["compared"].startswith("distances between all 15 pairs")
    assert r["passed"] and r["max_abs_delta"] <= r["bar"]["max_abs_delta"] and r["max_embedding_shift"] < 1e-2
    assert vspec.name == "scoreq-natural-ref-fp16" and vspec.file.is_file() and vspec.l2_normalised
    store.check_contract(vspec, vspec.file)
    assert np.isfinite(r["ms_per_window"]["variant"])
