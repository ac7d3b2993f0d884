"""A remote backend's health as a plain state machine: events once per change, probing with backoff."""

from __future__ import annotations

from scoreq_live.core.health import BackendHealth


def test_up_at_start_then_lost_once_then_back():
    h = BackendHealth("triton://h:8001/m", fallback=False)
    ev = h.start(True, 100.0)
    assert ev is not None and ev.state == "up" and ev.since == 100.0 and h.up
    lost = h.lost("deadline exceeded", 101.0)
    assert lost is not None and lost.state == "down" and lost.error == "deadline exceeded" and not h.up
    assert h.lost("deadline exceeded", 101.5) is None  # said once: requests in flight fail too
    back = h.recovered(105.0)
    assert back is not None and back.state == "up" and back.error == "" and h.up
    assert h.recovered(106.0) is None


def test_a_fallback_makes_the_lost_state_fallback():
    h = BackendHealth("b", fallback=True)
    h.start(True, 0.0)
    ev = h.lost("refused", 1.0)
    assert ev is not None and ev.state == "fallback"


def test_unreachable_at_start_is_one_event_and_no_up():
    h = BackendHealth("triton://h:8001/m", fallback=True)
    ev = h.start(False, 5.0)
    assert ev is not None and ev.state == "fallback" and "unreachable at start" in ev.error


def test_probes_back_off_doubling_to_a_ceiling_and_reset_on_recovery():
    h = BackendHealth("b", fallback=False, first_s=0.5, max_s=10.0)
    h.start(True, 0.0)
    h.lost("x", 1.0)
    waits = [h.retry_s] + [h.probe_failed() for _ in range(7)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    h.recovered(50.0)
    h.lost("y", 60.0)
    assert h.retry_s == 0.5
