"""Colour bands (--bands): parsed once, shared by the feed's hello and the terminal panel."""

import pytest
from rich.console import Console

from scoreq_live.core.events import ScoreEvent, StreamStarted
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.sinks.bands import Bands, BandsError
from scoreq_live.sinks.feed import default_bands
from scoreq_live.sinks.terminal import PanelState, render


def test_defaults_and_limits_by_mode():
    assert Bands.parse(None, "nr") == Bands(4.0, 3.0, lower_is_better=False)
    assert Bands.parse(None, "ref") == Bands(None, None, lower_is_better=True)
    assert Bands.parse("0.3,0.6", "ref").band(0.45) == "fair"
    nr = Bands.parse("4.2,3.5", "nr")
    assert [nr.band(v) for v in (4.3, 3.6, 3.0, None)] == ["good", "fair", "poor", None]
    assert Bands.parse(None, "ref").band(0.1) is None  # distances have no default scale
    assert default_bands("ref", (0.3, 0.6)) == {"good": 0.3, "fair": 0.6, "lower_is_better": True}


@pytest.mark.parametrize("text, mode, why", [
    ("4", "nr", "expected GOOD,FAIR"), ("a,b", "nr", "expected GOOD,FAIR"),
    ("3,4", "nr", "GOOD must be above FAIR"), ("0.6,0.3", "ref", "GOOD must be below FAIR"),
])
def test_bands_that_point_the_wrong_way_are_refused_with_the_reason(text, mode, why):
    with pytest.raises(BandsError, match=why) as e:
        Bands.parse(text, mode)
    assert isinstance(e.value, ScoreqLiveError)


def _colour_of(value: float, bands: Bands | None, mode: str = "ref") -> str:
    state = PanelState()
    state.update(StreamStarted(stream="leg", ts=0, mode=mode))
    kw = {"distance": value} if mode == "ref" else {"mos": value}
    state.update(ScoreEvent(stream="leg", ts=0, mode=mode, smoothed=value, speech=0.9, **kw))
    console = Console(record=True, width=80, color_system="truecolor", force_terminal=True)
    console.print(render(state, 80, bands))
    html = console.export_html(inline_styles=True)
    text = f"{value:.3f}" if mode == "ref" else f"{value:.2f}"
    before = html[:html.index(text)]
    return before[before.rindex("<span style=\"") + 13:].split('"')[0]


def test_the_terminal_panel_colours_scores_by_the_given_bands():
    red, green = "color: #800000", "color: #008000"
    assert "#008080" in _colour_of(0.5, None)  # ref without bands: uncoloured scale (cyan)
    assert red in _colour_of(0.7, Bands.parse("0.3,0.6", "ref"))
    assert green in _colour_of(0.2, Bands.parse("0.3,0.6", "ref"))
    assert green in _colour_of(4.1, None, "nr")  # the nr default: 4.1 >= 4 is good
    assert red in _colour_of(4.1, Bands.parse("4.5,4.2", "nr"), "nr")
