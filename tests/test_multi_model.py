"""Several models on one stream: each on its own window and hop, from the same ring buffer and speech gate."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from scoreq_live.bus import EventBus
from scoreq_live.core.events import ModelScore, ScoreEvent, StreamRecord, StreamStarted, event_from_dict
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.runner import LocalRunner
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.sources import FileSource
from tests.helpers import SCOREQ_PAIR
from tests.tiny_models import build

FILES = {"ref": SCOREQ_PAIR / "ref.wav", "opus": SCOREQ_PAIR / "opus.wav"}
PRIMARY = StreamConfig(window_s=7.68, hop_s=1.0, model="distillmos")
SECOND = StreamConfig(window_s=3.0, hop_s=2.0, model="tiny")  # another window and another hop


@pytest.fixture(scope="module")
def tiny_fixed(tmp_path_factory):
    """A small MOS model with a fixed 3 s input: its native window differs from Distill-MOS's."""
    return build(tmp_path_factory.mktemp("models") / "tiny3s.onnx", kind="mos", fixed=48_000, seed=3)


async def run_engine(sources, primary, config, extra=(), fast=True):
    bus = EventBus()
    sub = bus.subscribe(maxsize=100_000)
    engine = Engine(primary, sources, EngineConfig(stream=config, max_batch=4, fast=fast), bus,
                    extra=[(c, LocalRunner(s)) for c, s in extra])
    await engine.run()
    return [ev async for ev in sub]


def sources(fast=True):
    return [FileSource(name, path, fast=fast) for name, path in FILES.items()]


async def test_a_second_model_scores_each_stream_on_its_own_windows_and_changes_nothing_else(bundled_nr, tiny_nr):
    distill = Scorer(bundled_nr, max_batch=4)
    tiny = Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=4)
    both = await run_engine(sources(), distill, PRIMARY, [(SECOND, tiny)])
    alone = await run_engine(sources(), distill, PRIMARY)
    tiny_alone = await run_engine(sources(), tiny, SECOND)

    for name in FILES:
        # The first model's events are what a monitor with that model alone sends.
        got = [(e.window, e.t_start, e.t_end, e.mos, e.reason) for e in both
               if isinstance(e, ScoreEvent) and e.stream == name]
        want = [(e.window, e.t_start, e.t_end, e.mos, e.reason) for e in alone
                if isinstance(e, ScoreEvent) and e.stream == name]
        assert got == want and any(g[3] is not None for g in got)
        # The second model's windows: its own window and hop, and the scores it gives alone.
        extra = [e for e in both if isinstance(e, ModelScore) and e.stream == name]
        ref = [e for e in tiny_alone if isinstance(e, ScoreEvent) and e.stream == name]
        assert [(e.window, e.t_start, e.t_end, e.reason) for e in extra] == \
            [(e.window, e.t_start, e.t_end, e.reason) for e in ref]
        full = [e for e in extra if e.t_end - e.t_start > 2.99]
        assert len(full) >= 2 and all(abs(e.t_end - e.t_start - 3.0) < 1e-9 for e in full)
        assert {round(b.t_start - a.t_start, 6) for a, b in zip(full, full[1:])} == {2.0}
        scored = [(e, r) for e, r in zip(extra, ref) if e.scores is not None]
        assert scored
        for e, r in scored:
            assert set(e.scores) == {"tiny.mos"} and abs(e.scores["tiny.mos"] - r.mos) < 1e-6
            assert e.model == "tiny" and e.smoothed is not None and "tiny.mos" in e.smoothed
        # Smoothing per named score: the same rule as the first model's smoothed value.
        assert abs(scored[-1][0].smoothed["tiny.mos"] - scored[-1][1].smoothed) < 1e-6
        started = next(e for e in both if isinstance(e, StreamStarted) and e.stream == name)
        assert started.models == [{"model": "tiny", "window_s": 3.0, "hop_s": 2.0, "scores": ["tiny.mos"]}]


async def test_live_streams_are_scored_by_both_models_in_real_time(bundled_nr, tiny_nr):
    """Files played at their own pace: both models' windows are scored, each within its budget."""
    distill = Scorer(bundled_nr, max_batch=4)
    tiny = Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=4)
    evs = await run_engine(sources(fast=False), distill, PRIMARY, [(SECOND, tiny)], fast=False)
    for name in FILES:
        first = [e for e in evs if isinstance(e, ScoreEvent) and e.stream == name]
        second = [e for e in evs if isinstance(e, ModelScore) and e.stream == name]
        assert any(e.mos is not None for e in first)
        assert any(e.scores is not None for e in second)
        # Every window of each model has its event, scored or skipped with a reason.
        assert [e.window for e in second] == list(range(len(second)))
        assert all((e.scores is None) == (e.reason is not None) for e in second)


def test_the_events_round_trip_and_records_summarise_the_second_model(bundled_nr, tiny_nr):
    from scoreq_live.calls.record import Recorder

    distill = Scorer(bundled_nr, max_batch=4)
    tiny = Scorer(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), max_batch=4)
    evs = asyncio.run(run_engine(sources()[:1], distill, PRIMARY, [(SECOND, tiny)]))
    recorder = Recorder()
    records = [r for ev in evs for r in recorder.feed(event_from_dict(ev.to_dict()))]  # as a relay gets them
    rec = next(r for r in records if isinstance(r, StreamRecord))
    published = [event_from_dict(e.to_dict()) for e in evs if isinstance(e, ModelScore) and e.scores]
    assert all(isinstance(e, ModelScore) for e in published)
    values = [e.scores["tiny.mos"] for e in published]
    assert rec.scores is not None and rec.scores["tiny.mos"]["windows"] == len(values)
    assert abs(rec.scores["tiny.mos"]["mean"] - np.mean(values)) < 1e-5
    assert rec.scores["tiny.mos"]["min"] == min(values)
    assert rec.models and rec.models[0]["model"] == "tiny"
    assert "models" in rec.to_dict() and "scores" in rec.to_dict()


def test_the_monitor_alerts_and_counts_on_the_second_models_scores(tmp_path, tiny_fixed):
    """The monitor, as the command line builds it: an alert rule on the second model's score fires."""
    from scoreq_live.calls.sink import StoreOptions
    from scoreq_live.monitor import MonitorOptions, build_monitor
    from scoreq_live.scoring.load import ScoringOptions
    from scoreq_live.sinks.metrics import MetricsSink

    jsonl, db = tmp_path / "events.jsonl", tmp_path / "calls.db"
    opts = MonitorOptions(inputs=[str(FILES["ref"])], fast=True, jsonl=str(jsonl), store=StoreOptions(str(db)),
                          scoring=ScoringOptions(model="distillmos", extra_models=(str(tiny_fixed),), max_batch=2),
                          alerts=["tiny3s.mos>1 for 2s"])
    monitor = build_monitor(opts)
    assert [x.names for x in monitor.scoring.extra] == [("tiny3s.mos",)]
    assert (monitor.scoring.extra[0].stream.window_s, monitor.scoring.extra[0].stream.hop_s) == (3.0, 1.0)
    asyncio.run(monitor.run())
    evs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    extra = [e for e in evs if e["type"] == "model_score" and e["scores"]]
    assert extra and all(set(e["scores"]) == {"tiny3s.mos"} for e in extra)
    alerts = [e for e in evs if e["type"] == "alert"]
    assert [a["metric"] for a in alerts] == ["tiny3s.mos"]
    first = next(e for e in extra if e["scores"]["tiny3s.mos"] > 1)
    assert alerts[0]["t"] >= first["t_end"] + 2.0 - 1e-6  # held for 2 s of that model's windows
    # Windows of the first model never count as evidence for the second model's rule.
    assert all(e["type"] != "alert" or e["metric"] == "tiny3s.mos" for e in evs)
    # /metrics while the stream is live (an ended stream's series are dropped): the second model's score.
    metrics = MetricsSink("distillmos", "nr")
    for e in evs[:next(i for i, e in enumerate(evs) if e["type"] == "model_score" and e["scores"]) + 1]:
        metrics.update(event_from_dict(e))
    value = extra[0]["scores"]["tiny3s.mos"]
    assert f'scoreq_live_score{{score="tiny3s.mos",stream="ref"}} {value}' in metrics.render()[0].decode()
    record = next(e for e in evs if e["type"] == "stream_record")
    assert record["scores"]["tiny3s.mos"]["windows"] == len(extra)
    # The stored record keeps the summary: 'calls show' prints it.
    show = subprocess.run([sys.executable, "-m", "scoreq_live", "calls", "show", record["call"], "--store", str(db)],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    mean = record["scores"]["tiny3s.mos"]["mean"]
    assert f"tiny3s.mos: mean {mean:.2f}" in show.stdout and f"({len(extra)} windows)" in show.stdout


def test_bad_model_combinations_are_refused_with_a_reason(tiny_ref, tiny_nr):
    from scoreq_live.monitor import MonitorOptions, build_monitor
    from scoreq_live.scoring.load import ScoringOptions, load_scorer

    with pytest.raises(ScoreqLiveError, match="needs a reference"):
        load_scorer(ScoringOptions(model=str(tiny_nr), extra_models=(str(tiny_ref),)))
    with pytest.raises(ScoreqLiveError, match="given twice"):
        load_scorer(ScoringOptions(model=str(tiny_nr), extra_models=(str(tiny_nr),)))
    with pytest.raises(ScoreqLiveError, match=r"no model gives a score 'tiny_nr.sig'.*tiny_nr\.mos"):
        build_monitor(MonitorOptions(inputs=[str(FILES["ref"])], alerts=["tiny_nr.sig<3"],
                                     scoring=ScoringOptions(model="distillmos", extra_models=(str(tiny_nr),))))


def test_score_writes_every_models_scores(tmp_path, tiny_fixed):
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "scoreq_live", "score", str(FILES["ref"]), str(FILES["opus"]),
         "--models", f"distillmos,{tiny_fixed}", "--json", str(out_json), "--csv", str(out_csv)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "tiny3s.mos" in proc.stdout  # a column of the table
    results = json.loads(out_json.read_text())
    for r in results:
        windows = r["models"]["tiny3s"]
        scored = [w["scores"]["tiny3s.mos"] for w in windows if w["scores"]]
        assert scored and abs(r["scores"]["tiny3s.mos"] - np.mean(scored)) < 1e-4
        assert all(w["t_end"] - w["t_start"] <= 3.0 + 1e-9 for w in windows)
        assert r["mos"] is not None
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0])[:3] == ["file", "mos", "tiny3s.mos"]
    assert [float(r["tiny3s.mos"]) for r in rows] == pytest.approx([r["scores"]["tiny3s.mos"] for r in results],
                                                                   abs=1e-4)


def test_the_terminal_panel_keeps_every_models_latest_scores():
    from scoreq_live.sinks.terminal import PanelState

    panel = PanelState()
    common = {"stream": "a", "ts": 1.0}
    panel.update(StreamStarted(**common, model="distillmos"))
    panel.update(ModelScore(**common, model="dnsmos", t_end=9.0, scores={"dnsmos.sig": 3.5, "dnsmos.bak": 2.1}))
    panel.update(ScoreEvent(**common, t_end=9.5, mos=3.2, scores={"mos": 3.2}))  # the first model's window
    panel.update(ModelScore(**common, model="dnsmos", t_end=10.0, reason="no_speech"))  # unscored: nothing lost
    assert panel.rows["a"].value == 3.2
    assert panel.rows["a"].extra == {"dnsmos.sig": 3.5, "dnsmos.bak": 2.1}


def test_a_bare_model_name_is_a_metric_only_for_a_model_asked_for():
    from scoreq_live.core.alerts import RuleError, parse_rule

    assert parse_rule("plcmos<3 for 5s", {"plcmos"}).metric == "plcmos"
    with pytest.raises(RuleError, match="unknown metric 'plcmos'"):
        parse_rule("plcmos<3 for 5s")
    rule = parse_rule("plcmos<3", {"plcmos"})
    assert rule.value(ModelScore(stream="a", ts=0.0, model="plcmos", scores={"plcmos": 2.5})) == 2.5
    assert rule.value(ScoreEvent(stream="a", ts=0.0, mos=2.5, scores={"mos": 2.5})) is None


@pytest.fixture(scope="module")
def diag_spec(tmp_path_factory):
    """A model of kind ``scores``: three named scores per window, the primary one named in its spec."""
    folder = tmp_path_factory.mktemp("diag")
    build(folder / "diag.onnx", kind="scores", n_scores=3, seed=5, output_name="scores")
    spec = folder / "diag.toml"
    spec.write_text('name = "diag"\nfile = "diag.onnx"\nkind = "scores"\nscores = ["sig", "bak", "ovrl"]\n'
                    'primary = "ovrl"\nnative_window_s = 3.0\npad_multiple = 320\nhop_s = 1.5\n')
    return spec


def test_a_model_with_several_named_scores_as_first_and_as_additional_model(diag_spec):
    from scoreq_live.scoring.load import ScoringOptions, load_scorer
    from scoreq_live.scoring.spec import load_spec_file

    spec = load_spec_file(diag_spec)
    raw = OnnxModel(spec, device="cpu")
    x = [np.random.default_rng(1).standard_normal(48_000).astype(np.float32) * 0.1]
    cols = raw.run(x[0][None, :])[0]

    first = load_scorer(ScoringOptions(model_spec=str(diag_spec)))
    assert first.scorer.names == ("diag.ovrl", "diag.sig", "diag.bak") and first.mode == "nr"
    named = first.scorer.score_named(x)[0]
    assert np.allclose(named, cols[[2, 0, 1]], atol=1e-6)  # the primary (ovrl) first, then the others

    both = load_scorer(ScoringOptions(model="distillmos", extra_models=(str(diag_spec),), max_batch=1))
    extra = both.extra[0]
    assert extra.names == ("diag.ovrl", "diag.sig", "diag.bak")
    assert (extra.stream.window_s, extra.stream.hop_s) == (3.0, 1.5)
    evs = window_events_of(both)
    got = [e for e in evs if isinstance(e, ModelScore) and e.scores]
    assert got and all(set(e.scores) == {"diag.ovrl", "diag.sig", "diag.bak"} for e in got)
    assert {round(b.t_start - a.t_start, 6) for a, b in zip(got, got[1:])} <= {1.5, 3.0, 4.5}


def window_events_of(loaded):
    from scoreq_live.offline import window_results
    from tests.helpers import speech_16k

    return window_results(speech_16k(FILES["ref"]), loaded.scorer, loaded.stream, "ref", loaded.extra)
