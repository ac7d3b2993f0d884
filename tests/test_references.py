"""Stored references: add / list / show / remove, use by name, and refusal for another model.

Real processes, real speech, the real bundled embedding model (and small
contract models where a second, different model is needed).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.core.stream import StreamConfig
from scoreq_live.scoring.references import ReferenceStore, StoredReferenceError
from tests.helpers import MUSHRA, SCOREQ_PAIR
from tests.tiny_models import build


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_reference_lifecycle_on_the_command_line(model_store, data):
    clean, opus = SCOREQ_PAIR / "ref.wav", SCOREQ_PAIR / "opus.wav"
    out = cli("reference", "add", "office", clean, MUSHRA / "stim_02" / "ref.wav", "--model", "distillmos-embedding")
    assert out.returncode == 0, out.stderr
    assert "2 windows of 2 files" in out.stderr and "--reference office" in out.stderr

    listed = [json.loads(line) for line in cli("reference", "list", "--json").stdout.splitlines()]
    assert [r["name"] for r in listed] == ["office"] and listed[0]["model"] == "distillmos-embedding"
    shown = json.loads(cli("reference", "show", "office", "--json").stdout)
    assert shown["dim"] == 200 and shown["window_s"] == pytest.approx(7.68) and len(shown["files"]) == 2
    f0 = shown["files"][0]
    assert f0["path"].endswith("scoreq/ref.wav") and f0["windows"] == 1 and len(f0["sha256"]) == 64
    assert f0["duration_s"] == pytest.approx(5.4) and shown["created"].endswith("Z")
    assert "distillmos-embedding" in cli("reference", "show", "office").stdout

    out = cli("reference", "add", "office", clean, "--model", "distillmos-embedding")
    assert out.returncode == 2 and "exists" in out.stderr and "--force" in out.stderr
    out = cli("reference", "add", "office", clean, "--model", "distillmos-embedding", "--force")
    assert out.returncode == 0, out.stderr

    # Used by name: its model comes with it. The clean file is its own (one-window) reference.
    out = cli("score", clean, opus, "--mode", "ref", "--reference", "office", "--json", "-")
    assert out.returncode == 0, out.stderr
    a, b = json.loads(out.stdout)
    assert a["distance"] == pytest.approx(0.0, abs=1e-4) and b["distance"] > 0.1
    # The same as giving the file itself.
    out = cli("score", opus, "--mode", "ref", "--reference", clean, "--json", "-")
    assert json.loads(out.stdout)[0]["distance"] == pytest.approx(b["distance"], abs=1e-5)

    assert cli("reference", "remove", "office").returncode == 0
    assert cli("reference", "list", "--json").stdout.strip() == ""
    out = cli("score", opus, "--mode", "ref", "--reference", "office")
    assert out.returncode == 2 and "no such file or stored reference" in out.stderr


def test_a_reference_is_refused_for_another_model(model_store, tmp_path, data):
    tiny = build(tmp_path / "tiny_ref.onnx", kind="embedding", output_name="embedding")
    assert cli("reference", "add", "office", SCOREQ_PAIR / "ref.wav", "--model", "distillmos-embedding").returncode == 0
    out = cli("score", SCOREQ_PAIR / "opus.wav", "--mode", "ref", "--model", tiny, "--reference", "office")
    assert out.returncode == 2
    assert "was made with model 'distillmos-embedding'; it cannot be used with 'tiny_ref'" in out.stderr
    assert "--model distillmos-embedding" in out.stderr

    # Same name, another file (other weights): refused too.
    assert cli("reference", "add", "tiny", SCOREQ_PAIR / "ref.wav", "--model", tiny).returncode == 0
    out = cli("score", SCOREQ_PAIR / "opus.wav", "--mode", "ref", "--model", tiny, "--reference", "tiny")
    assert out.returncode == 0, out.stderr
    build(tiny, kind="embedding", output_name="embedding", seed=1)
    out = cli("score", SCOREQ_PAIR / "opus.wav", "--mode", "ref", "--model", tiny, "--reference", "tiny")
    assert out.returncode == 2 and "another file of model 'tiny_ref'" in out.stderr and "--force" in out.stderr


def test_store_refuses_what_cannot_be_a_reference(tmp_path, tiny_ref, tiny_nr, data):
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.session import OnnxModel

    refs = ReferenceStore(tmp_path / "refs")
    model = OnnxModel(resolve_model(str(tiny_ref)), device="cpu")
    cfg = StreamConfig(window_s=4.0, hop_s=1.0)
    with pytest.raises(StoredReferenceError, match="bad reference name"):
        refs.add("../x", [SCOREQ_PAIR / "ref.wav"], model, cfg, "h")
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(48000, np.float32), 16000)
    with pytest.raises(StoredReferenceError, match="no window with enough speech"):
        refs.add("quiet", [SCOREQ_PAIR / "ref.wav", silence], model, cfg, "h")
    assert refs.names() == []  # nothing half-made is left behind
    with pytest.raises(StoredReferenceError, match="predicts a MOS"):
        refs.add("mos", [SCOREQ_PAIR / "ref.wav"], OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), cfg, "h")
    with pytest.raises(StoredReferenceError, match="no stored reference 'nope'"):
        refs.get("nope")

    r = refs.add("ok", [SCOREQ_PAIR / "ref.wav"], model, cfg, "h")
    assert r.windows == 3 and refs.get("ok").embeddings().shape == (3, 16)
    np.save(refs.root / "ok" / "embeddings.npy", np.zeros((2, 16), np.float32))  # damaged on disk
    with pytest.raises(StoredReferenceError, match=r"holds \[2, 16\], the metadata says \[3, 16\]"):
        refs.get("ok").to_reference()
    shutil.rmtree(refs.root / "ok")
    assert refs.names() == []
