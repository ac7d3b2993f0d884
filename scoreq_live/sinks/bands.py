"""Colour bands for the panels: which scores are good, fair or poor (``--bands GOOD,FAIR``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from scoreq_live.core.events import Mode
from scoreq_live.errors import ScoreqLiveError

Band = Literal["good", "fair", "poor"]


class BandsError(ScoreqLiveError):
    """``--bands`` that cannot be read or point the wrong way for the mode."""


@dataclass(frozen=True)
class Bands:
    """``good`` and ``fair`` limits and which way is better.

    nr: MOS >= good is good, >= fair is fair, else poor (default 4.0 / 3.0).
    ref: distance <= good is good, <= fair is fair, else poor; distances have
    no default scale, so without limits both are None and nothing is coloured.
    """

    good: float | None
    fair: float | None
    lower_is_better: bool

    @classmethod
    def for_mode(cls, mode: Mode, limits: tuple[float, float] | None = None) -> Bands:
        if mode == "nr":
            good, fair = limits or (4.0, 3.0)
            return cls(good, fair, lower_is_better=False)
        if limits is None:
            return cls(None, None, lower_is_better=True)
        return cls(limits[0], limits[1], lower_is_better=True)

    @classmethod
    def parse(cls, text: str | None, mode: Mode) -> Bands:
        """``GOOD,FAIR`` as given to ``--bands`` (None: the mode's defaults)."""
        if text is None:
            return cls.for_mode(mode)
        try:
            good, fair = (float(x) for x in text.split(","))
        except ValueError:
            raise BandsError(f"--bands {text!r}: expected GOOD,FAIR, e.g. 4,3 (MOS) or 0.3,0.6 (distance)") from None
        if (good <= fair) if mode == "nr" else (good >= fair):
            raise BandsError(f"--bands {text}: in mode {mode} " + ("GOOD must be above FAIR (higher MOS is better)"
                             if mode == "nr" else "GOOD must be below FAIR (lower distance is better)"))
        return cls.for_mode(mode, (good, fair))

    def band(self, value: float | None) -> Band | None:
        """Where ``value`` falls, or None when there is no value or no scale."""
        if value is None or self.good is None or self.fair is None:
            return None
        if self.lower_is_better:
            return "good" if value <= self.good else "fair" if value <= self.fair else "poor"
        return "good" if value >= self.good else "fair" if value >= self.fair else "poor"

    def to_dict(self) -> dict[str, Any]:
        """As the feed's ``hello`` carries it."""
        return {"good": self.good, "fair": self.fair, "lower_is_better": self.lower_is_better}
