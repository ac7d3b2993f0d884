"""The live scheduling rule on a virtual clock: fairness, the latency budget, thinning under overload."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from scoreq_live.core.schedule import LiveScheduler
from scoreq_live.core.stream import Window


def window(stream: str, index: int, arrival: float) -> Window:
    return Window(stream=stream, index=index, start=index * 16000, end=index * 16000 + 64000, speech=1.0,
                  level_dbfs=-20.0, arrival=arrival)


@dataclass
class Run:
    """What a simulated live run did: per stream, windows scored and skipped, and each scored window's latency."""

    scored: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)


def simulate(streams: int, run_cost, seconds: float = 120.0, hop_s: float = 1.0, max_batch: int = 4,
             max_latency_s: float | None = None, step: float = 0.005) -> Run:
    """Streams cut a window every hop (phases spread over the hop); one scorer takes a batch whenever it is free.

    ``run_cost(n)`` is the virtual seconds a run of ``n`` windows takes.
    Everything happens on a virtual clock, so the result is the same on any machine.
    """
    sched: LiveScheduler[str] = LiveScheduler(hop_s, max_batch, max_latency_s=max_latency_s)
    out = Run()
    next_cut = {f"s{i}": hop_s * i / streams for i in range(streams)}
    index: Counter[str] = Counter()
    busy_until = 0.0
    running: list[Window] = []
    now = 0.0
    while now < seconds:
        for name, due in next_cut.items():
            if due <= now:
                replaced = sched.offer(name, window(name, index[name], due))
                index[name] += 1
                next_cut[name] = due + hop_s
                if replaced is not None:
                    replaced.resolved = True
                    out.skipped[replaced.stream] += 1
        if now >= busy_until:
            for w in running:  # the run in flight is answered
                out.latencies.append(busy_until - w.arrival)
                out.scored[w.stream] += 1
            running = []
            if sched.waiting:
                take = sched.take(now)
                for _, w, reason in take.skipped:
                    assert reason == "overloaded"
                    out.skipped[w.stream] += 1
                if take.batch:
                    running = [w for _, w in take.batch]
                    cost = run_cost(len(running))
                    out.batches.append(len(running))
                    out.budgets.append(sched.budget)
                    busy_until = now + cost
                    sched.ran(cost)
        now += step
    return out


def test_a_newer_window_replaces_the_waiting_one():
    sched: LiveScheduler[str] = LiveScheduler(1.0, 4)
    first, second = window("a", 0, 0.0), window("a", 1, 1.0)
    assert sched.offer("a", first) is None
    assert sched.offer("a", second) is first
    assert sched.waiting == 1
    take = sched.take(1.0)
    assert [w for _, w in take.batch] == [second] and take.skipped == []
    assert sched.waiting == 0


def test_a_scorer_that_keeps_up_scores_every_window_within_the_hop():
    run = simulate(streams=6, run_cost=lambda n: 0.05 * n, max_batch=4)
    assert sum(run.skipped.values()) == 0
    assert min(run.scored.values()) >= 115
    assert max(run.latencies) < 1.0 + 2 * 0.2  # a hop of waiting at most, plus a run in flight and its own


@pytest.mark.parametrize("streams", [10, 25])
def test_an_overloaded_scorer_thins_every_stream_alike_and_keeps_latency_bounded(streams):
    # Capacity: 4 windows per 0.8 s = 5 per second, for 10 or 25 windows per second.
    run = simulate(streams=streams, run_cost=lambda n: 0.2 * n, max_batch=4)
    scored = [run.scored[f"s{i}"] for i in range(streams)]
    assert max(scored) - min(scored) <= 2, f"unfair: {scored}"
    total = sum(scored)
    assert 0.8 * 5 * 120 <= total <= 5 * 120 + 4  # the scorer kept busy
    # Every scored window within the budget that held when it was taken.
    assert max(run.latencies) <= max(run.budgets) + 1e-9
    assert sum(run.skipped.values()) > 0


def test_a_fixed_budget_skips_windows_that_could_no_longer_make_it():
    # A run of one window takes 0.4 s, so a window that waited over 0.1 s cannot be answered within 0.5 s.
    run = simulate(streams=8, run_cost=lambda n: 0.4, max_batch=1, max_latency_s=0.5)
    assert max(run.latencies) <= 0.5 + 0.005 + 1e-9  # one simulation step of slack
    assert sum(run.skipped.values()) > 0
    scored = [run.scored[f"s{i}"] for i in range(8)]
    assert max(scored) - min(scored) <= 2


def test_a_budget_shorter_than_a_run_still_scores_each_streams_newest_window_in_turn():
    # No window can be answered within 0.1 s of a 0.3 s run: age skips nothing, replacement thins.
    run = simulate(streams=4, run_cost=lambda n: 0.3, max_batch=1, max_latency_s=0.1)
    scored = [run.scored[f"s{i}"] for i in range(4)]
    assert min(scored) > 0 and max(scored) - min(scored) <= 2


def test_the_budget_follows_recent_runs():
    sched: LiveScheduler[str] = LiveScheduler(1.0, 4)
    assert sched.budget == 1.0
    sched.ran(0.2)
    assert sched.budget == pytest.approx(1.4)
    for _ in range(40):
        sched.ran(0.5)
    assert sched.budget == pytest.approx(2.0, abs=1e-3)
    fixed: LiveScheduler[str] = LiveScheduler(1.0, 4, max_latency_s=0.3)
    fixed.ran(5.0)
    assert fixed.budget == 0.3


def test_streams_served_least_recently_go_first():
    sched: LiveScheduler[str] = LiveScheduler(1.0, 2)
    for i, name in enumerate("abc"):
        sched.offer(name, window(name, 0, 0.01 * i))
    first = sched.take(0.05)
    assert [k for k, _ in first.batch] == ["a", "b"]
    for i, name in enumerate("abc"):
        sched.offer(name, window(name, 1, 1.0 + 0.01 * i))
    second = sched.take(1.05)
    assert [k for k, _ in second.batch] == ["c", "a"]  # c waited since the first take; then a before b


def test_a_forgotten_or_resolved_stream_is_not_taken():
    sched: LiveScheduler[str] = LiveScheduler(1.0, 4)
    a, b = window("a", 0, 0.0), window("b", 0, 0.0)
    sched.offer("a", a)
    sched.offer("b", b)
    b.resolved = True  # its stream was stopped
    sched.forget("a")
    take = sched.take(0.01)
    assert take.batch == [] and take.skipped == [] and sched.waiting == 0
