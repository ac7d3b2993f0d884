"""The model contract: files that fit run, files that do not are refused with a clear message."""


import numpy as np
import pytest

from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer, pad_window
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.scoring.spec import ModelError, ModelSpec, load_spec_file
from tests.tiny_models import build


def test_an_onnx_file_with_scoreq_signature_runs_without_a_spec(tiny_nr):
    spec = resolve_model(str(tiny_nr))
    assert spec.kind == "mos" and spec.pad_multiple == 320
    model = OnnxModel(spec, device="cpu")
    assert model.spec.input_name == "audio_input" and model.spec.output_name == "mos_output"
    out = model.run(np.zeros((3, 640), np.float32))
    assert out.shape == (3, 1)


def test_embedding_kind_is_inferred_from_the_output(tiny_ref):
    assert resolve_model(str(tiny_ref)).kind == "embedding"


def test_not_onnx_is_refused(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxModel(ModelSpec(name="bad", file=bad), device="cpu")


def test_wrong_input_rank_is_refused(tmp_path):
    f = build(tmp_path / "r3.onnx", rank3=True)
    with pytest.raises(ModelError, match=r"must be \[batch, samples\], has rank 3"):
        OnnxModel(ModelSpec(name="r3", file=f), device="cpu")


def test_wrong_output_size_is_refused(tiny_ref):
    with pytest.raises(ModelError, match=r"'mos' model must output \[batch, 1\]"):
        OnnxModel(ModelSpec(name="x", file=tiny_ref, kind="mos"), device="cpu")
    with pytest.raises(ModelError, match="no output named 'score'"):
        OnnxModel(ModelSpec(name="x", file=tiny_ref, kind="embedding", output_name="score"), device="cpu")


def test_fixed_length_mismatch_is_refused(tmp_path):
    f = build(tmp_path / "fixed.onnx", fixed=32000)
    with pytest.raises(ModelError, match="spec says 64000 input samples, the file takes 32000"):
        OnnxModel(ModelSpec(name="f", file=f, input_samples=64000), device="cpu")
    m = OnnxModel(ModelSpec(name="f", file=f), device="cpu")
    assert m.spec.input_samples == 32000 and m.spec.native_window_s == 2.0


def test_spec_file_names_the_contract(tmp_path, tiny_nr):
    spec_file = tmp_path / "m.toml"
    spec_file.write_text(f'name = "tiny"\nfile = "{tiny_nr}"\nkind = "mos"\ninput_name = "audio_input"\n'
                         'native_window_s = 2.0\npad_multiple = 320\nlicence = "MIT"\n')
    spec = load_spec_file(spec_file)
    assert spec.name == "tiny" and spec.native_window_s == 2.0 and spec.file == tiny_nr
    spec_file.write_text('kind = "mos"\nwindow = 3\n')
    with pytest.raises(ModelError, match="unknown keys"):
        load_spec_file(spec_file, tiny_nr)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="distillmos"):
        resolve_model("no-such-model")


def test_padding_to_a_multiple_of_320_leaves_an_aligned_window_alone():
    spec = ModelSpec(name="v", file=None, pad_multiple=320)
    x = np.ones(640, np.float32)
    assert pad_window(x, spec) is x
    y = pad_window(np.ones(641, np.float32), spec)
    assert y.size == 960 and y[:641].sum() == 641 and not y[641:].any()
    fixed = ModelSpec(name="f", file=None, input_samples=1000)
    assert pad_window(np.ones(10, np.float32), fixed).size == 1000


def test_batched_scores_equal_one_by_one_scores_and_keep_order(tiny_nr, data):
    from tests.helpers import MUSHRA, speech_16k

    model = OnnxModel(resolve_model(str(tiny_nr)), device="cpu")
    scorer = Scorer(model, max_batch=4)
    windows = [speech_16k(MUSHRA / f"stim_0{i}" / "ref.wav")[: 16000 * 2 - 7 * i] for i in range(1, 8)]
    together = scorer.score(windows)
    alone = [scorer.score([w])[0] for w in windows]
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    assert len(set(np.round(together, 5))) == len(windows)  # really different windows, really different scores


def test_a_short_variable_length_window_is_scored_at_its_own_length(tiny_nr, data):
    from tests.helpers import SCOREQ_PAIR, speech_16k

    model = OnnxModel(resolve_model(str(tiny_nr)), device="cpu")
    x = speech_16k(SCOREQ_PAIR / "ref.wav")[:20000]  # not a multiple of 320
    direct = model.run(np.pad(x, (0, 20160 - x.size))[None])[0, 0]
    assert Scorer(model).score([x])[0] == pytest.approx(direct, abs=1e-6)
    padded_to_4s = model.run(np.pad(x, (0, 64000 - x.size))[None])[0, 0]
    assert abs(direct - padded_to_4s) > 1e-3  # padding to the full window would change the score
