"""SCOREQ's contract, exercised with the SCOREQ-shaped models (wav2vec 2.0 BASE, random weights).

The shaped models have SCOREQ's graph, names, dynamic axes and cost; their
numbers mean nothing, so every check compares the monitor with what
``scoreq`` itself computes from the same 16 kHz samples: ``dynamic_pad``
(zero-pad at the end to a multiple of 320) and one run per input, and
``np.linalg.norm(deg_emb - ref_emb)`` in ref mode.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scoreq_live.core.stream import StreamConfig
from scoreq_live.offline import score_file
from scoreq_live.scoring import store
from scoreq_live.scoring.catalogue import import_model, scoreq_spec
from scoreq_live.scoring.references import ReferenceStore
from scoreq_live.scoring.scorer import Scorer, pad_window
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.scoring.spec import ModelError
from tests.helpers import MUSHRA, SCOREQ_PAIR, speech_16k

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("data")]  # data first: no model is built without it
CONFIG = StreamConfig(window_s=4.0, hop_s=1.0, model="", mode="nr")


@pytest.fixture(scope="module")
def nr(scoreq_shaped):
    return OnnxModel(scoreq_spec("scoreq-natural-nr").with_file(scoreq_shaped / "scoreq_shaped_nr.onnx"), device="cpu")


@pytest.fixture(scope="module")
def ref(scoreq_shaped):
    return OnnxModel(scoreq_spec("scoreq-natural-ref").with_file(scoreq_shaped / "scoreq_shaped_ref.onnx"),
                     device="cpu")


def scoreq_run(model: OnnxModel, x: np.ndarray) -> np.ndarray:
    """What scoreq does with a whole input: dynamic_pad to a multiple of 320, one plain session run."""
    n = x.size
    padded = np.pad(x[None, :].astype(np.float32), ((0, 0), (0, (n + 319) // 320 * 320 - n)))
    return model.session.run(None, {"audio_input": padded})[0][0]


def test_the_published_contract_holds(scoreq_shaped, nr, ref):
    assert (nr.spec.input_name, nr.spec.output_name, nr.output_dim) == ("audio_input", "mos_output", 1)
    assert (ref.output_dim, ref.spec.pad_multiple, ref.spec.default_window_s, ref.spec.hop_s) == (768, 320, 4.0, 1.0)
    store.check_contract(nr.spec, nr.spec.file)
    store.check_contract(ref.spec, ref.spec.file)  # includes: embeddings are L2-normalised
    with pytest.raises(ModelError, match=r"'mos' model must output \[batch, 1\]"):
        store.check_contract(scoreq_spec("scoreq-natural-nr"), scoreq_shaped / "scoreq_shaped_ref.onnx")
    e = ref.run(np.stack([pad_window(speech_16k(SCOREQ_PAIR / "ref.wav")[:32_000], ref.spec)] * 2))
    assert e.shape == (2, 768) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_padding_to_320_and_never_to_the_window(nr):
    x = speech_16k(SCOREQ_PAIR / "ref.wav")
    aligned = x[:64_000]
    assert pad_window(aligned, nr.spec) is aligned  # a window already aligned is not touched
    scorer = Scorer(nr)
    assert scorer.score([aligned])[0] == pytest.approx(scoreq_run(nr, aligned)[0], abs=1e-5)
    odd = x[:21_000]
    padded = pad_window(odd, nr.spec)
    assert padded.size == 21_120 and np.array_equal(padded[:21_000], odd) and not padded[21_000:].any()
    s = scorer.score([odd])[0]
    assert s == pytest.approx(scoreq_run(nr, odd)[0], abs=1e-5)
    to_4s = np.zeros(64_000, np.float32)
    to_4s[:21_000] = odd
    assert abs(s - scoreq_run(nr, to_4s)[0]) > 1e-3  # padding to 4 s would change the score


def test_a_short_file_gets_exactly_scoreqs_score(nr):
    f = MUSHRA / "stim_04" / "ref.wav"  # 2.08 s: shorter than one window
    r = score_file(f, Scorer(nr), CONFIG)
    assert len(r.windows) == 1 and r.windows[0]["t_end"] == pytest.approx(2.081, abs=1e-3)
    assert r.value == pytest.approx(float(scoreq_run(nr, speech_16k(f))[0]), abs=1e-5)


def test_windows_of_a_longer_file(nr):
    x = speech_16k(SCOREQ_PAIR / "opus.wav")  # 5.4 s: [0,4) [1,5) and the tail [2,5.4) at its own length
    r = score_file(SCOREQ_PAIR / "opus.wav", Scorer(nr), CONFIG)
    assert [(w["t_start"], w["t_end"]) for w in r.windows] == [(0.0, 4.0), (1.0, 5.0), (2.0, 5.4)]
    want = [scoreq_run(nr, x[int(w["t_start"] * 16000):int(w["t_end"] * 16000)])[0] for w in r.windows]
    assert [w["mos"] for w in r.windows] == pytest.approx(want, abs=1e-5)
    assert r.value == pytest.approx(np.mean(want), abs=1e-5)


def test_ref_distance_to_its_own_reference_is_zero_and_references_combine_by_mean(ref, tmp_path):
    cfg = StreamConfig(window_s=4.0, hop_s=1.0, model=ref.spec.name, mode="ref")
    refs = ReferenceStore(tmp_path)
    own = MUSHRA / "stim_04" / "ref.wav"
    coded = MUSHRA / "stim_04" / "lyra_32.wav"
    r = refs.add("own", [own], ref, cfg, model_sha256="x")
    assert r.windows == 1 and r.dim == 768
    scorer = Scorer(ref, refs.get("own").to_reference())
    assert score_file(own, scorer, cfg).value == pytest.approx(0.0, abs=1e-5)
    e_coded = scoreq_run(ref, speech_16k(coded))
    d = score_file(coded, scorer, cfg).value
    assert d > 0.01 and d == pytest.approx(float(np.linalg.norm(e_coded - scoreq_run(ref, speech_16k(own)))), abs=1e-5)

    two = [MUSHRA / "stim_01" / "ref.wav", MUSHRA / "stim_02" / "ref.wav"]  # other sentences: non-matching
    refs.add("two", two, ref, cfg, model_sha256="x")
    scorer = Scorer(ref, refs.get("two").to_reference())
    want = np.mean([np.linalg.norm(e_coded - scoreq_run(ref, speech_16k(f))) for f in two])
    assert score_file(coded, scorer, cfg).value == pytest.approx(float(want), abs=1e-5)


def test_stored_reference_end_to_end_with_the_installed_model(scoreq_shaped, model_store):
    f = scoreq_shaped / "scoreq_shaped_ref.onnx"
    md5 = hashlib.md5(f.read_bytes()).hexdigest()
    import_model("scoreq-natural-ref", f, md5=md5, mirror="http://127.0.0.1:9")  # nothing listens on port 9
    env = dict(os.environ)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "scoreq_live", *map(str, args)], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        return out

    clean, coded = MUSHRA / "stim_01" / "ref.wav", MUSHRA / "stim_01" / "lyra_6.wav"
    cli("reference", "add", "office", clean, "--model", "scoreq-natural-ref")
    # The stored reference names its model: no --model needed.
    out = cli("score", clean, coded, "--mode", "ref", "--reference", "office", "--json", "-")
    a, b = json.loads(out.stdout)
    assert a["distance"] == pytest.approx(0.0, abs=1e-5) and b["distance"] > 0.01
