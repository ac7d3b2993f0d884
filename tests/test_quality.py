"""What the scores mean, on real speech and the real bundled model."""

import numpy as np
import pytest
import soundfile as sf

from scoreq_live.core.stream import StreamConfig
from scoreq_live.offline import score_file, window_results
from scoreq_live.scoring.references import build_reference
from scoreq_live.scoring.scorer import Scorer
from tests.helpers import MUSHRA, SCOREQ_PAIR, speech_16k

NATIVE = StreamConfig(window_s=7.68, hop_s=1.0, model="distillmos")


def test_clean_speech_scores_above_its_1_38_kbps_coded_versions(bundled_nr, data):
    scorer = Scorer(bundled_nr)
    diffs = []
    for stim in sorted(MUSHRA.glob("stim_0*")):
        ref = score_file(stim / "ref.wav", scorer, NATIVE).value
        coded = [score_file(stim / f, scorer, NATIVE).value for f in ("prop_13.wav", "prop_13_16k.wav")]
        diffs += [ref - c for c in coded]
    assert np.mean(diffs) > 0.2
    assert sum(d > 0 for d in diffs) >= 12  # of 16 pairs; one speaker's clean take is rated low by the model
    opus = score_file(SCOREQ_PAIR / "opus.wav", scorer, NATIVE).value
    clean = score_file(SCOREQ_PAIR / "ref.wav", scorer, NATIVE).value
    assert clean - opus > 1.0


def test_a_file_one_native_window_long_gets_exactly_the_models_score(bundled_nr, tmp_path, data):
    x = np.concatenate([speech_16k(MUSHRA / f"stim_0{i}" / "ref.wav") for i in (2, 5, 8)])
    x = x[:122880]
    assert x.size == 122880
    path = tmp_path / "one_window.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    res = score_file(path, Scorer(bundled_nr), NATIVE)
    assert len(res.windows) == 1
    assert res.value == pytest.approx(float(bundled_nr.run(x[None])[0, 0]), abs=1e-6)


def test_silence_gives_no_mos(bundled_nr, tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000 * 10, np.float32), 16000)
    res = score_file(path, Scorer(bundled_nr), NATIVE)
    assert res.value is None and res.windows
    assert all(w["mos"] is None and w["reason"] == "silent" for w in res.windows)


def test_full_reference_distance_is_zero_for_the_clean_file_and_grows_with_coding(bundled_embedding, data):
    stim = MUSHRA / "stim_02"
    reference = build_reference(bundled_embedding, [stim / "ref.wav"], NATIVE)
    scorer = Scorer(bundled_embedding, reference)
    cfg = StreamConfig(window_s=7.68, hop_s=1.0, model="distillmos-embedding", mode="ref")
    d = {f: score_file(stim / f"{f}.wav", scorer, cfg).value for f in ("ref", "prop_55", "prop_13", "lyra_32")}
    assert d["ref"] == pytest.approx(0.0, abs=1e-4)
    assert all(d[f] > 0.05 for f in ("prop_55", "prop_13", "lyra_32")), d
    # the 5.5 kbps version is closer to the clean speech than the 1.38 and 3.2 kbps ones
    assert d["prop_55"] < min(d["prop_13"], d["lyra_32"]), d


def test_a_reference_made_with_another_model_is_refused(bundled_embedding, tiny_ref, data):
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.session import OnnxModel

    reference = build_reference(bundled_embedding, [SCOREQ_PAIR / "ref.wav"], NATIVE)
    with pytest.raises(ValueError, match="embedded with 'distillmos-embedding'"):
        Scorer(OnnxModel(resolve_model(str(tiny_ref)), device="cpu"), reference)


def test_gated_windows_inside_a_stream_keep_their_place(bundled_nr, data):
    speech = speech_16k(SCOREQ_PAIR / "ref.wav")
    x = np.concatenate([speech, np.zeros(16000 * 12, np.float32), speech])
    events = window_results(x, Scorer(bundled_nr), StreamConfig(window_s=4, hop_s=1, model="distillmos"))
    reasons = [e.reason for e in events]
    assert reasons[0] is None and reasons[-1] is None and "silent" in reasons
    assert [e.window for e in events] == list(range(len(events)))
