"""The G.107 E-model: published reference points, monotonicity in loss, burstiness and delay, clamping."""

from __future__ import annotations

import math

import pytest

from scoreq_live.rtp import emodel
from scoreq_live.rtp.codecs import STATIC, codec_by_name
from scoreq_live.rtp.emodel import ie_eff, mos_cq, r_factor

CODECS = ["PCMU", "PCMA", "G722", "opus", "L16"]


def test_default_connection_is_93_2() -> None:
    # G.107: with all default values R = 93.2 (Ro 94.77, Is 1.41, Id 0.15), MOS 4.41.
    assert emodel._RO == pytest.approx(94.77, abs=0.005)
    assert emodel._simultaneous(0.0) == pytest.approx(1.41, abs=0.01)
    assert emodel._delay(0.0, 0.0, 0.0) == pytest.approx(0.15, abs=0.005)
    for codec in CODECS:
        for plc in (False, True):
            assert r_factor(codec, 0.0, plc=plc) == pytest.approx(93.2, abs=0.05)
    assert mos_cq(93.2) == pytest.approx(4.41, abs=0.005)


def test_mos_annex_b_points() -> None:
    assert mos_cq(0.0) == 1.0
    assert mos_cq(50.0) == pytest.approx(1 + 1.75 - 50 * 10 * 50 * 7e-6)  # 2.575
    assert mos_cq(80.0) == pytest.approx(1 + 2.8 + 80 * 20 * 20 * 7e-6)  # 4.024
    assert mos_cq(100.0) == pytest.approx(4.5)
    assert mos_cq(-10.0) == 1.0 and mos_cq(120.0) == 4.5 and mos_cq(float("nan")) == 1.0
    values = [mos_cq(r / 2) for r in range(-100, 301)]
    assert min(values) >= 1.0 and max(values) <= 4.5  # the polynomial dips just below 1 near R = 5: clamped
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_ie_eff_formula() -> None:
    # G.711 with PLC, 1 % random loss: Ie,eff = 95 * 1 / (1 + 25.1); without PLC Bpl is 4.3.
    assert ie_eff("PCMU", 1.0, plc=True) == pytest.approx(95 / 26.1)
    assert ie_eff("PCMA", 2.0, plc=False) == pytest.approx(95 * 2 / 6.3)
    assert ie_eff("pcmu", 2.0, burst_r=2.0, plc=True) == pytest.approx(95 * 2 / (1 + 25.1))
    assert r_factor("PCMU", 1.0, plc=True) == pytest.approx(r_factor("PCMU", 0.0) - 95 / 26.1)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("plc", [False, True])
def test_r_falls_with_loss(codec: str, plc: bool) -> None:
    rs = [r_factor(codec, loss / 2, plc=plc) for loss in range(0, 101)]
    assert all(b < a for a, b in zip(rs, rs[1:]))
    assert rs[-1] < 60.0  # 50 % loss is bad whatever the concealment


def test_concealment_and_burstiness() -> None:
    for loss in (0.5, 2.0, 10.0):
        assert r_factor("PCMU", loss, plc=True) > r_factor("PCMU", loss, plc=False) + 1.0
        # bursty loss (BurstR > 1) is worse than the same amount of random loss, more so the burstier
        r1, r2, r4 = (r_factor("PCMU", loss, burst_r=b, plc=True) for b in (1.0, 2.0, 4.0))
        assert r4 < r2 < r1
    # BurstR below 1 or unusable is taken as random loss
    for bad in (0.0, 0.5, -3.0, float("nan")):
        assert r_factor("opus", 3.0, burst_r=bad, plc=True) == r_factor("opus", 3.0, plc=True)


def test_delay() -> None:
    rs = [r_factor("PCMU", 0.0, delay_ms=d) for d in range(0, 801, 10)]
    assert all(b <= a + 1e-9 for a, b in zip(rs, rs[1:]))
    assert r_factor("PCMU", 0.0, delay_ms=100) > 90.0  # with good echo control, 100 ms costs little
    assert r_factor("PCMU", 0.0, delay_ms=400) < 70.0  # G.114's upper bound is clearly felt
    # Idd alone (T and Tr held at 0): 0 up to 100 ms, then G.107's formula; X = 1 at 200 ms
    assert emodel._delay(0.0, 100.0, 0.0) == emodel._delay(0.0, 0.0, 0.0)
    idd_200 = 25 * (2 ** (1 / 6) - 3 * (1 + 1 / 3**6) ** (1 / 6) + 2)
    assert emodel._delay(0.0, 200.0, 0.0) - emodel._delay(0.0, 0.0, 0.0) == pytest.approx(idd_200)
    assert r_factor("PCMU", 0.0, delay_ms=-5) == r_factor("PCMU", 0.0)


def test_clamping() -> None:
    worst = r_factor("PCMU", 100.0, burst_r=50.0, delay_ms=800.0)
    assert worst == 0.0 and mos_cq(worst) == 1.0
    assert r_factor("PCMU", 250.0) == r_factor("PCMU", 100.0)
    assert r_factor("PCMU", -4.0) == r_factor("PCMU", 0.0)
    for codec in CODECS:
        for loss in (0.0, 1.0, 30.0, 100.0):
            for delay in (0.0, 150.0, 600.0):
                r = r_factor(codec, loss, burst_r=3.0, delay_ms=delay)
                assert 0.0 <= r <= 100.0 and 1.0 <= mos_cq(r) <= 4.5


def test_errors() -> None:
    with pytest.raises(ValueError, match="G729"):
        r_factor("G729", 1.0)
    with pytest.raises(ValueError, match="loss_pct"):
        r_factor("PCMU", float("nan"))
    with pytest.raises(ValueError, match="delay_ms"):
        r_factor("PCMU", 0.0, delay_ms=math.inf)


def test_every_decodable_codec_has_values() -> None:
    names = {c.name for c in STATIC.values()} | {codec_by_name("opus", 111).name}
    assert names <= set(emodel.codecs())
