import math

import pytest

from scoreq_live.core.smoothing import EmaSmoother, MedianSmoother, make_smoother


def test_ema_weight_depends_on_elapsed_time_not_on_the_hop():
    fine, coarse = EmaSmoother(5.0), EmaSmoother(5.0)
    fine.update(0.0, 1.0)
    coarse.update(0.0, 1.0)
    for k in range(1, 11):
        fine.update(k * 0.5, 3.0)
    for k in range(1, 6):
        coarse.update(k * 1.0, 3.0)
    expected = 3.0 - 2.0 * math.exp(-5.0 / 5.0)
    assert fine.value == pytest.approx(expected)
    assert coarse.value == pytest.approx(expected)


def test_ema_first_value_is_taken_as_is():
    e = EmaSmoother(4.0)
    assert e.value is None
    assert e.update(4.0, 3.3) == 3.3


def test_median_ignores_one_outlier_and_forgets_old_values():
    m = MedianSmoother(5.0)
    for t, v in [(1, 4.0), (2, 4.1), (3, 1.0), (4, 4.2), (5, 4.0)]:
        m.update(t, v)
    assert m.value == 4.0
    m.update(9, 2.0)  # t=1..4 are older than 5 s now
    assert m.value == pytest.approx(3.0)


def test_unknown_smoothing_is_refused():
    with pytest.raises(ValueError):
        make_smoother("mean", 3)
