"""Model families: the two that exist give the scores they gave before; a new one adds named scores and state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ScoreEvent, event_from_dict
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring import families
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.families import EmbeddingFamily, Family, MosFamily, family_for, pad_window
from scoreq_live.scoring.scorer import Reference, Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.scoring.spec import ModelError
from scoreq_live.sources import FileSource
from tests.helpers import SCOREQ_PAIR, speech_16k


def speech_windows(n: int, size: int) -> list[np.ndarray]:
    x = speech_16k(SCOREQ_PAIR / "ref.wav")
    return [x[k * 8000:k * 8000 + size] for k in range(n)]


def test_the_bundled_model_scores_as_the_plain_padding_and_first_output_did(bundled_nr):
    """The MOS family is the old path (pad, run, first column): same numbers to 1e-6."""
    scorer = Scorer(bundled_nr, max_batch=4)
    assert isinstance(scorer.family, MosFamily) and scorer.names == ("mos",)
    w = speech_windows(5, 122_880) + [speech_16k(SCOREQ_PAIR / "ref.wav")[:50_000]]
    before = np.array([bundled_nr.run(pad_window(x, bundled_nr.spec)[None, :])[0, 0] for x in w], np.float64)
    named = scorer.score_named(w)
    assert named.shape == (6, 1)
    assert np.abs(named[:, 0] - before).max() < 1e-6
    assert np.abs(scorer.score(w) - before).max() < 1e-6


def test_the_embedding_family_scores_the_distance_to_the_reference(tiny_ref):
    model = OnnxModel(resolve_model(str(tiny_ref)), device="cpu")
    w = speech_windows(4, 32_000)
    emb = np.concatenate([model.run(pad_window(x, model.spec)[None, :]) for x in w])
    ref = Reference(emb[:2], model.spec.name)
    scorer = Scorer(model, ref)
    assert isinstance(scorer.family, EmbeddingFamily) and scorer.names == ("distance",)
    want = np.linalg.norm(emb[:, None, :] - emb[None, :2, :], axis=-1).mean(axis=1)
    assert np.abs(scorer.score(w) - want).max() < 1e-6


def test_a_spec_names_its_family_and_an_unknown_one_is_refused(bundled_nr):
    assert isinstance(family_for(bundled_nr.spec), MosFamily)
    with pytest.raises(ModelError, match="unknown family 'dnsmos'"):
        family_for(dataclasses.replace(bundled_nr.spec, family="dnsmos"))


class Counting(Family):
    """A family with two named scores and per-stream state: the MOS, and how many windows its stream has had."""

    key = "counting"

    @property
    def names(self) -> tuple[str, ...]:
        return ("mos", "count.windows")

    def new_state(self) -> list[int]:
        return [0]

    def prepare(self, window, state=None):
        state[0] += 1  # each window of a stream is seen once, in order
        self.seen.append(state[0])
        return pad_window(window, self.spec)

    def named(self, raw):
        counts = np.array(self.seen[-raw.shape[0]:], np.float64)
        return np.column_stack([raw[:, 0].astype(np.float64), counts])


async def test_a_new_family_adds_named_scores_and_keeps_state_per_stream(tiny_nr, monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "counting", Counting)
    monkeypatch.setattr(Counting, "seen", [], raising=False)
    spec = dataclasses.replace(resolve_model(str(tiny_nr)), family="counting")
    scorer = Scorer(OnnxModel(spec, device="cpu"), max_batch=1)
    bus = EventBus()
    sub = bus.subscribe()
    cfg = EngineConfig(stream=StreamConfig(window_s=2.0, hop_s=1.0, model="tiny"), max_batch=1, fast=True)
    await Engine(scorer, [FileSource("a", SCOREQ_PAIR / "ref.wav", fast=True),
                          FileSource("b", SCOREQ_PAIR / "opus.wav", fast=True)], cfg, bus).run()
    scored = [ev async for ev in sub if isinstance(ev, ScoreEvent) and ev.mos is not None]
    assert {ev.stream for ev in scored} == {"a", "b"}
    for name in ("a", "b"):
        mine = [ev for ev in scored if ev.stream == name]
        assert [ev.scores["count.windows"] for ev in mine] == list(range(1, len(mine) + 1))  # its own state
        assert all(ev.scores["mos"] == ev.mos for ev in mine)
    ev = scored[-1]
    d = ev.to_dict()
    assert set(d["scores"]) == {"mos", "count.windows"}
    back = event_from_dict(d)
    assert isinstance(back, ScoreEvent) and back.score("count.windows") == ev.scores["count.windows"]


async def test_score_events_carry_the_named_scores_of_a_real_model(bundled_nr):
    bus = EventBus()
    sub = bus.subscribe()
    cfg = EngineConfig(stream=StreamConfig(window_s=7.68, hop_s=2.0, model="distillmos"), max_batch=2, fast=True)
    await Engine(Scorer(bundled_nr, max_batch=2), [FileSource("a", SCOREQ_PAIR / "ref.wav", fast=True)], cfg,
                 bus).run()
    evs = [ev async for ev in sub if isinstance(ev, ScoreEvent)]
    scored = [ev for ev in evs if ev.mos is not None]
    assert scored and all(ev.scores == {"mos": ev.mos} for ev in scored)
    assert all("scores" not in ev.to_dict() for ev in evs if ev.mos is None)


def test_offline_results_carry_every_named_score(tiny_nr, monkeypatch, tmp_path):
    import csv
    import json

    from scoreq_live.offline import score_file, write_csv, write_json

    monkeypatch.setitem(families.FAMILIES, "counting", Counting)
    monkeypatch.setattr(Counting, "seen", [], raising=False)
    spec = dataclasses.replace(resolve_model(str(tiny_nr)), family="counting")
    scorer = Scorer(OnnxModel(spec, device="cpu"), max_batch=1)
    res = score_file(SCOREQ_PAIR / "ref.wav", scorer, StreamConfig(window_s=2.0, hop_s=1.0, model="tiny"))
    scored = [w for w in res.windows if w["mos"] is not None]
    assert scored and all(set(w["scores"]) == {"mos", "count.windows"} for w in scored)
    assert res.scores["count.windows"] == np.mean([w["scores"]["count.windows"] for w in scored])
    assert abs(res.scores["mos"] - res.value) < 1e-9
    write_csv([res], str(tmp_path / "out.csv"))
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert float(rows[0]["count.windows"]) == res.scores["count.windows"]
    assert list(rows[0])[:3] == ["file", "mos", "count.windows"]
    write_json([res], str(tmp_path / "out.json"))
    assert set(json.loads((tmp_path / "out.json").read_text())[0]["scores"]) == {"mos", "count.windows"}
