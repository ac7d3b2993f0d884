"""The monitor builder: options in, typed parts out, checked in the order a user wants errors."""

import json

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from scoreq_live.calls.api import CallsRoutes
from scoreq_live.core.alerts import RuleError
from scoreq_live.errors import ConfigError, ScoreqLiveError
from scoreq_live.http.routes import MetricsRoutes, PanelRoutes
from scoreq_live.ingest.http import IngestRoutes
from scoreq_live.monitor import FeedOptions, IngestOptions, MonitorOptions, build_monitor
from scoreq_live.scoring.load import ScoringOptions, load_scorer
from scoreq_live.sinks.base import Sink
from scoreq_live.sinks.jsonl import JsonlSink
from scoreq_live.sinks.metrics import MetricsSink
from scoreq_live.sinks.server import FeedServer
from scoreq_live.sinks.webhook import WebhookError
from tests.helpers import EXAMPLES

DEMO = str(EXAMPLES / "clean.wav")  # shipped with the package
MISSING_MODEL = ScoringOptions(model="no-such-model.onnx", device="cpu")


@pytest.mark.parametrize("opts, error, why", [
    (MonitorOptions(inputs=[DEMO], scoring=MISSING_MODEL, alerts=["mos << 3"]), RuleError, "cannot read alert rule"),
    (MonitorOptions(inputs=[DEMO], scoring=MISSING_MODEL, alert_webhook="ftp://x"), WebhookError, "http"),
    (MonitorOptions(inputs=[DEMO], scoring=MISSING_MODEL, feed=FeedOptions(ws="127.0.0.1:9000", http=":9000")),
     ConfigError, "both on port 9000"),
    (MonitorOptions(inputs=["no-such-file.wav"], scoring=MISSING_MODEL), ScoreqLiveError, "no such file"),
    (MonitorOptions(inputs=[DEMO], scoring=MISSING_MODEL, max_latency_s=0.0), ConfigError, "--max-latency"),
    (MonitorOptions(inputs=[DEMO], scoring=MISSING_MODEL), ScoreqLiveError, "unknown model"),
])
def test_what_needs_no_model_is_checked_before_the_model_loads(opts, error, why):
    # The model does not exist: each error proves the check ran before anything tried to load it.
    with pytest.raises(error, match=why) as e:
        build_monitor(opts)
    assert isinstance(e.value, ScoreqLiveError)


@pytest.fixture(scope="module")
def loaded():
    return load_scorer(ScoringOptions(device="cpu"))


def test_rules_on_a_score_the_mode_does_not_make_are_refused_once_the_mode_is_known(loaded):
    opts = MonitorOptions(inputs=[DEMO], alerts=["distance>0.5 for 5s"])
    with pytest.raises(RuleError, match="mode nr gives a MOS"):
        build_monitor(opts, scoring=loaded)


def test_the_builder_returns_every_part_the_options_ask_for(loaded, tmp_path):
    opts = MonitorOptions(inputs=[f"a={DEMO}"], alerts=["mos<3 for 5s"], bands="4.2,3.2", jsonl=str(tmp_path / "e"),
                          feed=FeedOptions(ws="127.0.0.1:0", http="127.0.0.1:0", allowed_origins=("http://x",)))
    m = build_monitor(opts, scoring=loaded)
    assert [s.name for s in m.sources] == ["a", "webrtc", "media"]  # --http also takes published streams
    assert m.scoring is loaded and m.scoring.stream.window_s == pytest.approx(7.68)
    assert [r.text for r in m.rules] == ["mos<3.0 for 5s"]
    assert (m.bands.good, m.bands.fair) == (4.2, 3.2)
    assert isinstance(m.feed, FeedServer) and isinstance(m.metrics, MetricsSink)
    assert [type(s) for s in m.sinks] == [JsonlSink, MetricsSink, FeedServer]
    assert m.feed.hub.info.bands == {"good": 4.2, "fair": 3.2, "lower_is_better": False}
    (site,) = m.sites  # --http: one site, where every part adds its routes
    assert [type(p) for p in site.parts] == [PanelRoutes, MetricsRoutes, CallsRoutes, FeedServer, IngestRoutes]
    assert m.feed.sites == [site] and site.policy.allowed_origins == {"http://x"}
    no_feed = build_monitor(MonitorOptions(inputs=[DEMO]), scoring=loaded)
    assert no_feed.feed is None and no_feed.metrics is None and no_feed.sinks == [] and no_feed.sites == []


def test_publishers_alone_get_a_site_of_their_own_and_no_feed(loaded):
    m = build_monitor(MonitorOptions(ingest=IngestOptions(listen="127.0.0.1:0")), scoring=loaded)
    assert m.feed is None and m.metrics is None and m.sinks == []
    (site,) = m.sites
    assert [type(p) for p in site.parts] == [IngestRoutes] and site.flag == "--whip"
    assert [s.name for s in m.sources] == ["webrtc", "media"]


def test_linger_defaults_to_until_stopped_only_for_a_feed_the_user_asked_for():
    default_ws = FeedOptions(ws="127.0.0.1:8765", ws_required=False)
    assert MonitorOptions(feed=default_ws).linger_s == 0
    assert MonitorOptions(feed=FeedOptions(ws="127.0.0.1:9")).linger_s == float("inf")
    assert MonitorOptions(feed=FeedOptions(http="127.0.0.1:9")).linger_s == float("inf")
    assert MonitorOptions(feed=FeedOptions(http="127.0.0.1:9"), duration=5).linger_s == 0
    assert MonitorOptions(feed=FeedOptions(http="127.0.0.1:9"), linger=2.5).linger_s == 2.5


class Recorder(Sink):
    """A sink of the caller's own: what the monitor calls, in which order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.types: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    def attach(self, engine) -> None:
        self.calls.append(f"attach:{len(engine.sources)}")

    async def run(self, events) -> None:
        self.calls.append("run")
        async for ev in events:
            self.types.append(ev.type)

    async def close(self) -> None:
        self.calls.append("close")


async def test_a_run_starts_attaches_feeds_and_closes_every_sink(loaded, tmp_path):
    rec = Recorder()
    opts = MonitorOptions(inputs=[f"a={DEMO}"], fast=True, jsonl=str(tmp_path / "events.jsonl"))
    engine = await build_monitor(opts, [rec], scoring=loaded).run()
    assert rec.calls == ["start", "attach:1", "run", "close"]
    assert rec.types[0] == "stream_started" and "score" in rec.types
    assert rec.types[-3:] == ["stream_ended", "stream_record", "call_record"]  # its records follow its end
    written = [json.loads(line)["type"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert written == rec.types and engine.runs >= 1


def test_metrics_leave_prometheus_process_wide_settings_alone():
    m = MetricsSink("m", "nr")
    m.windows.labels("a", "scored").inc()
    assert b"_created" not in m.render()[0]
    other = CollectorRegistry()  # a host program's own metrics keep their _created series
    Counter("host_requests", "requests", registry=other).inc()
    assert b"host_requests_created" in generate_latest(other)


def test_the_command_line_sets_the_latency_budget():
    from scoreq_live.cli import build_parser, monitor_options

    def opts(*argv):
        return monitor_options(build_parser().parse_args(["monitor", "-i", DEMO, *argv]))

    assert opts().max_latency_s is None  # the default: the hop plus twice the recent model run time
    assert opts("--max-latency", "1.5").max_latency_s == 1.5


def test_the_token_reaches_the_publishers_site_without_a_feed(loaded):
    from scoreq_live.cli import build_parser, monitor_options

    opts = monitor_options(build_parser().parse_args(["monitor", "--no-ws", "--whip", "0.0.0.0:0", "--token", "T"]))
    m = build_monitor(opts, scoring=loaded)
    (site,) = m.sites
    assert m.feed is None and site.policy.token == "T" and opts.linger_s == 0
