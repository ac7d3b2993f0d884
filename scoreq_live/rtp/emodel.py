"""The ITU-T G.107 E-model (narrowband), reduced to what an RTP receiver knows: codec, loss, burstiness, delay.

R = Ro - Is - Id - Ie,eff + A  (G.107 (06/2015) clause 7), with every transmission parameter at its
G.107 default (Table 3: SLR 8, RLR 2, STMR 15, LSTR 18, Ds = Dr = 3, TELR 65, WEPL 110, qdu 1,
Nc -70, Nfor -64, Ps = Pr = 35, A 0) except the delays, which all follow the one-way delay given:
T = Ta = delay, Tr = 2 * delay.  Ro, Is and Id are computed from those defaults with the G.107
formulas (no rounded constants), so R is 93.2 at zero delay and no loss (Ro 94.77, Is 1.41,
Id 0.15).  Id = Idte + Idle + Idd: talker echo (TELR 65, i.e. good echo control), listener echo and
the absolute-delay term Idd, which is 0 up to Ta = 100 ms and then
25 * ((1 + X^6)^(1/6) - 3 (1 + (X/3)^6)^(1/6) + 2) with X = log2(Ta / 100) (mT = 100, sT = 1).

Packet loss enters as Ie,eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl) (G.107 7-29), with the
codec's Ie and Bpl from ITU-T G.113 Appendix I (see ``_CODECS``).  MOS is G.107 Annex B's mapping.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class _Planning(NamedTuple):
    ie: float  # equipment impairment factor (no loss)
    bpl_plc: float  # packet-loss robustness factor with packet-loss concealment
    bpl_silence: float  # ... when lost packets are replaced by silence


# Ie and Bpl per codec, narrowband E-model scale.
#  * G.711 (PCMU/PCMA): ITU-T G.113 Appendix I (provisional planning values): Ie = 0; Bpl = 25.1 with
#    the G.711 Appendix I packet-loss concealment, 4.3 without concealment (silence insertion).
#  * G.722, Opus, L16: G.113 gives no narrowband Ie for them (its wideband values, Ie,wb, live on the
#    G.107.1 wideband scale, not this one).  The narrowband scale ends at G.711 (Ie 0), and a wideband
#    codec at its usual rates is no worse than G.711 in the band this model sees, so the narrowband
#    equivalent is Ie = 0; linear PCM is Ie = 0 by definition.  Their Bpl follows how losses are filled
#    here, with the G.711 values as the reference for each kind of concealment: 25.1 with codec PLC
#    (libopus), 4.3 with silence (the G.722 and L16 decoders, and Opus without libopus).  That is a
#    stated assumption, not a G.113 value: for these codecs R is a network-impairment score on the
#    G.711 reference scale and does not credit the wider audio band.
_CODECS: dict[str, _Planning] = {
    "PCMU": _Planning(0.0, 25.1, 4.3),
    "PCMA": _Planning(0.0, 25.1, 4.3),
    "G722": _Planning(0.0, 25.1, 4.3),
    "opus": _Planning(0.0, 25.1, 4.3),
    "L16": _Planning(0.0, 25.1, 4.3),
}
_BY_LOWER = {k.lower(): k for k in _CODECS}

# G.107 default transmission parameters (Table 3).
_SLR, _RLR, _STMR, _LSTR = 8.0, 2.0, 15.0, 18.0
_DS = 3.0
_TELR, _WEPL = 65.0, 110.0
_QDU = 1.0
_NC, _NFOR, _PS, _PR = -70.0, -64.0, 35.0, 35.0
_A = 0.0
_MT, _ST = 100.0, 1.0  # Idd knee and steepness (G.107 defaults)


def _basic() -> tuple[float, float]:
    """(No, Ro): total noise power and basic signal-to-noise ratio (G.107 7-1 .. 7-7)."""
    olr = _SLR + _RLR
    nos = _PS - _SLR - _DS - 100.0 + 0.004 * (_PS - olr - _DS - 14.0) ** 2
    pre = _PR + 10.0 * math.log10(1.0 + 10.0 ** ((10.0 - _LSTR) / 10.0))
    nor = _RLR - 121.0 + pre + 0.008 * (pre - 35.0) ** 2
    nfo = _NFOR + _RLR
    no = 10.0 * math.log10(10 ** (_NC / 10) + 10 ** (nos / 10) + 10 ** (nor / 10) + 10 ** (nfo / 10))
    ro = 15.0 - 1.5 * (_SLR + no)
    return no, ro


_NO, _RO = _basic()


def _simultaneous(t: float) -> float:
    """Is = Iolr + Ist + Iq (G.107 7-8 .. 7-15); Ist depends on T through the talker-echo path."""
    olr = _SLR + _RLR
    xolr = olr + 0.2 * (64.0 + _NO - _RLR)
    iolr = 20.0 * ((1.0 + (xolr / 8.0) ** 8) ** (1.0 / 8.0) - xolr / 8.0)
    stmro = -10.0 * math.log10(10 ** (-_STMR / 10) + math.exp(-t / 4.0) * 10 ** (-_TELR / 10))
    ist = (12.0 * (1.0 + ((stmro - 13.0) / 6.0) ** 8) ** (1.0 / 8.0)
           - 28.0 * (1.0 + ((stmro + 1.0) / 19.4) ** 35) ** (1.0 / 35.0)
           - 13.0 * (1.0 + ((stmro - 3.0) / 33.0) ** 13) ** (1.0 / 13.0) + 29.0)
    q = 37.0 - 15.0 * math.log10(_QDU)
    g = 1.07 + 0.258 * q + 0.0602 * q * q
    y = (_RO - 100.0) / 15.0 + 46.0 / 8.4 - g / 9.0
    z = 46.0 / 30.0 - g / 40.0
    iq = 15.0 * math.log10(1.0 + 10 ** y + 10 ** z)
    return iolr + ist + iq


def _delay(t: float, ta: float, tr: float) -> float:
    """Id = Idte + Idle + Idd (G.107 7-16 .. 7-28) for echo-path delay T, absolute delay Ta, round trip Tr."""
    roe = -1.5 * (_NO - _RLR)
    terv = _TELR - 40.0 * math.log10((1.0 + t / 10.0) / (1.0 + t / 150.0)) + 6.0 * math.exp(-0.3 * t * t)
    re = 80.0 + 2.5 * (terv - 14.0)
    idte = ((roe - re) / 2.0 + math.sqrt((roe - re) ** 2 / 4.0 + 100.0) - 1.0) * (1.0 - math.exp(-t))
    rle = 10.5 * (_WEPL + 7.0) * (tr + 1.0) ** -0.25
    idle = (_RO - rle) / 2.0 + math.sqrt((_RO - rle) ** 2 / 4.0 + 169.0)
    if ta <= _MT:
        idd = 0.0
    else:
        x = math.log10(ta / _MT) / math.log10(2.0)
        k = 6.0 * _ST
        idd = 25.0 * ((1.0 + x ** k) ** (1.0 / k) - 3.0 * (1.0 + (x / 3.0) ** k) ** (1.0 / k) + 2.0)
    return idte + idle + idd


def codecs() -> list[str]:
    """The codec names :func:`r_factor` knows."""
    return list(_CODECS)


def ie_eff(codec: str, loss_pct: float, burst_r: float = 1.0, plc: bool = False) -> float:
    """Effective equipment impairment Ie,eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl) (G.107 7-29).

    ``loss_pct`` is clamped to 0..100; ``burst_r`` (1 = random loss, > 1 bursty) below 1 or unusable is
    taken as 1.  ``plc`` chooses the Bpl for concealed rather than silenced losses.
    """
    name = _BY_LOWER.get(codec.lower())
    if name is None:
        raise ValueError(f"no E-model values for codec {codec!r}; known: {', '.join(_CODECS)}")
    if not math.isfinite(loss_pct):
        raise ValueError(f"loss_pct must be a number, got {loss_pct!r}")
    p = _CODECS[name]
    ppl = min(max(loss_pct, 0.0), 100.0)
    br = burst_r if math.isfinite(burst_r) and burst_r >= 1.0 else 1.0
    bpl = p.bpl_plc if plc else p.bpl_silence
    return p.ie + (95.0 - p.ie) * ppl / (ppl / br + bpl)


def r_factor(codec: str, loss_pct: float, burst_r: float = 1.0, delay_ms: float = 0.0, plc: bool = False) -> float:
    """The G.107 transmission rating R (0..100; 93.2 for G.711 without loss or delay).

    ``codec``: a :mod:`scoreq_live.rtp.codecs` name (PCMU, PCMA, G722, opus, L16; case-insensitive).
    ``loss_pct``: packets lost (or concealed) in percent; ``burst_r``: G.107 BurstR (1 random, > 1 bursty);
    ``delay_ms``: one-way mouth-to-ear delay (T = Ta = delay, Tr = 2 * delay); ``plc``: whether the
    receiver conceals losses with the codec's PLC (Bpl with PLC) or with silence.
    """
    if not math.isfinite(delay_ms):
        raise ValueError(f"delay_ms must be a number, got {delay_ms!r}")
    d = max(delay_ms, 0.0)
    r = _RO - _simultaneous(d) - _delay(d, d, 2.0 * d) - ie_eff(codec, loss_pct, burst_r, plc) + _A
    return min(max(r, 0.0), 100.0)


def mos_cq(r: float) -> float:
    """Conversational-quality MOS from R (G.107 Annex B): 1 for R < 0, 4.5 for R > 100, kept within 1..4.5."""
    if math.isnan(r) or r < 0.0:
        return 1.0
    if r > 100.0:
        return 4.5
    mos = 1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6
    return min(max(mos, 1.0), 4.5)
