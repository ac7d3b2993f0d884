"""Batch sizes chosen by measurement: the choice on modelled costs, and the real path on a real ONNX model."""

from __future__ import annotations

import numpy as np
import pytest

from scoreq_live.scoring import batching
from scoreq_live.scoring.batching import BatchPlan, measure, plan_for, powers_up_to
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.load import ScoringOptions, load_scorer
from scoreq_live.scoring.scorer import Scorer, batches
from scoreq_live.scoring.session import OnnxModel


class CostModel:
    """A model whose runs take modelled time on a virtual clock: fixed cost per run plus cost per window."""

    def __init__(self, per_run: float, per_window: dict[int, float] | float) -> None:
        self.t = 0.0
        self.per_run = per_run
        self.per_window = per_window
        self.shapes: list[tuple[int, ...]] = []

    def clock(self) -> float:
        return self.t

    def run(self, batch: np.ndarray) -> None:
        self.shapes.append(batch.shape)
        b = batch.shape[0]
        w = self.per_window if isinstance(self.per_window, float) else self.per_window[b]
        self.t += self.per_run + w * b


def test_powers_and_split_use_only_planned_sizes():
    assert powers_up_to(1) == (1,)
    assert powers_up_to(8) == (1, 2, 4, 8)
    assert powers_up_to(12) == (1, 2, 4, 8, 12)
    plan = BatchPlan.up_to(4)
    for n in range(0, 40):
        parts = plan.split(n)
        assert sum(parts) == n
        assert set(parts) <= set(plan.sizes)
        assert parts == sorted(parts, reverse=True)
    assert plan.split(7) == [4, 2, 1]
    assert BatchPlan.up_to(12).split(13) == [12, 1]
    with pytest.raises(ValueError):
        BatchPlan((2, 4))


def test_flat_cpu_cost_keeps_runs_small():
    # Cost per window the same at every size (a CPU already using all cores inside one window): batch 1.
    m = CostModel(per_run=0.0, per_window=0.080)
    plan = measure(m.run, 1000, 16, clock=m.clock)
    assert plan.sizes == (1,)
    assert plan.source == "measured"
    assert plan.cost_ms[1] == pytest.approx(80.0)
    assert {s[0] for s in m.shapes} == {1, 2}  # tried 2, found no gain, stopped


def test_falling_then_flat_cost_stops_where_gain_ends():
    # Distill-MOS on two cores, measured: 85, 79, 78, 83, 85 ms per window at 1, 2, 4, 8, 16.
    m = CostModel(per_run=0.0, per_window={1: 0.085, 2: 0.079, 4: 0.078, 8: 0.083, 16: 0.085})
    plan = measure(m.run, 1000, 16, clock=m.clock)
    assert plan.sizes == (1, 2)  # 4 is only 1 % cheaper than 2: not worth twice the wait and the memory
    assert max(s[0] for s in m.shapes) == 4


def test_gpu_like_cost_goes_to_the_limit():
    # A fixed launch cost per run that batching spreads (a GPU): every doubling pays, up to the limit.
    m = CostModel(per_run=0.010, per_window=0.0005)
    plan = measure(m.run, 1000, 16, clock=m.clock)
    assert plan.sizes == (1, 2, 4, 8, 16)
    assert plan.cost_ms[16] < plan.cost_ms[1] / 5
    m = CostModel(per_run=0.010, per_window=0.0005)
    assert measure(m.run, 1000, 6, clock=m.clock).sizes == (1, 2, 4)  # a limit that is not a power of two


def test_limit_one_still_reports_a_cost():
    m = CostModel(per_run=0.0, per_window=0.05)
    plan = measure(m.run, 1000, 1, clock=m.clock)
    assert plan.sizes == (1,) and plan.cost_ms[1] == pytest.approx(50.0)


def test_scorer_runs_only_planned_shapes_and_scores_alike(tiny_nr):
    model = OnnxModel(resolve_model(str(tiny_nr)), device="cpu")
    shapes: list[tuple[int, ...]] = []
    run = model.run

    def recording(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return run(batch)

    model.run = recording  # type: ignore[method-assign]
    rng = np.random.default_rng(3)
    windows = [(0.1 * rng.standard_normal(16000)).astype(np.float32) for _ in range(11)]
    windows.append((0.1 * rng.standard_normal(9000)).astype(np.float32))  # a tail window: its own length
    planned = Scorer(model, plan=BatchPlan.up_to(4)).score(windows)
    assert sorted(s[0] for s in shapes) == [1, 1, 2, 4, 4]  # 11 -> 4 + 4 + 2 + 1, the tail alone
    one_by_one = np.array([Scorer(model, max_batch=1).score([w])[0] for w in windows])
    np.testing.assert_allclose(planned, one_by_one, atol=1e-5)
    assert [p for p, _ in batches(windows, model.spec, 16)][0] == list(range(8))  # an int plan: powers of two


def test_plan_for_measures_once_then_uses_the_cache(tiny_nr, model_store):
    model = OnnxModel(resolve_model(str(tiny_nr)), device="cpu")
    first = plan_for(model, 16000, 8)
    assert first.source == "measured" and first.cost_ms
    assert batching._cache_file().is_file()
    again = plan_for(OnnxModel(resolve_model(str(tiny_nr)), device="cpu"), 16000, 8)
    assert again.source == "cached" and again.sizes == first.sizes
    assert again.cost_ms == pytest.approx(first.cost_ms, abs=1e-3)
    other_length = plan_for(model, 32000, 8)
    assert other_length.source == "measured"  # another window length is another shape: measured anew
    given = plan_for(model, 16000, 8, given=3)
    assert given.source == "given" and given.sizes == (1, 2, 3) and not given.cost_ms


def test_a_broken_cache_costs_only_a_measurement(tiny_nr, model_store):
    batching._cache_file().parent.mkdir(parents=True, exist_ok=True)
    batching._cache_file().write_text("{not json")
    model = OnnxModel(resolve_model(str(tiny_nr)), device="cpu")
    assert plan_for(model, 16000, 4).source == "measured"
    assert plan_for(model, 16000, 4).source == "cached"


def test_monitor_scorer_gets_the_plan(tiny_nr, model_store):
    loaded = load_scorer(ScoringOptions(model=str(tiny_nr), model_kind="mos", window_s=1.0, hop_s=0.5))
    assert loaded.scorer.plan.source in ("measured", "cached")
    assert loaded.scorer.max_batch == loaded.scorer.plan.cap <= 16
    given = load_scorer(ScoringOptions(model=str(tiny_nr), model_kind="mos", window_s=1.0, hop_s=0.5, max_batch=5))
    assert given.scorer.plan.sizes == (1, 2, 4, 5)
