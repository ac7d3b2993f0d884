"""Command line: argument parsing and wiring only.

    scoreq-live [monitor] --input SPEC [--input SPEC ...] [options]
    scoreq-live demo      [options]
    scoreq-live score     PATH... [--csv F] [--json F|-] [--rtp-port N] [--max-duration S]
    scoreq-live devices
    scoreq-live models    list|pull|import|quantize|remove ...
    scoreq-live reference add|list|show|remove ...
    scoreq-live feed      --subscribe redis://HOST:6379/CHANNEL [--ws HOST:PORT] [--http HOST:PORT]
    scoreq-live calls     [--since 1d] [--below 3.0] [--stream NAME] [--json|--csv] | calls show ID
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scoreq_live import __version__
from scoreq_live.errors import ScoreqLiveError

if TYPE_CHECKING:
    from scoreq_live.calls.sink import StoreOptions
    from scoreq_live.monitor import FeedOptions, MonitorOptions
    from scoreq_live.scoring.load import ScoringOptions
    from scoreq_live.sinks.base import Sink
    from scoreq_live.sip.siprec import SiprecOptions

COMMANDS = ("monitor", "demo", "score", "devices", "models", "reference", "bench", "feed", "calls")


STORE_ENV = "SCOREQ_LIVE_STORE"


def _err(msg: str) -> int:
    print(f"scoreq-live: error: {msg}", file=sys.stderr)
    return 2


def _scoring_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--model", action="append", metavar="MODEL",
                   help="catalogue name (see 'models list') or an ONNX file (default: distillmos; "
                        "distillmos-embedding in --mode ref); repeat it to score every stream with more models, "
                        "each on its own window and hop: the first gives the stream's mos/distance, the others "
                        "their named scores (e.g. --model distillmos --model dnsmos)")
    g.add_argument("--models", metavar="A,B,...", help="the same as --model A --model B ...")
    g.add_argument("--model-spec", metavar="TOML",
                   help="model contract for an ONNX file (names, kind, window, padding)")
    g.add_argument("--model-kind", choices=("mos", "embedding"), help="kind of an ONNX file given without a spec")
    g.add_argument("--mode", choices=("nr", "ref"), help="nr: MOS 1-5; ref: distance to --reference (lower is better)")
    g.add_argument("--reference", action="append", default=[], metavar="CLEAN.wav",
                   help="clean speech for --mode ref: a file (embedded once at start) or a stored reference "
                        "NAME ('reference add'); repeatable")
    g.add_argument("--window", type=float, metavar="S",
                   help="window length in seconds (default: 4 s for SCOREQ-style models, the model's native "
                        "window otherwise)")
    g.add_argument("--hop", type=float, metavar="S", help="hop between windows in seconds (default 1)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider; auto uses CUDA when it loads, else CPU (default auto)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for inference (default: all cores)")
    g.add_argument("--max-batch", type=int, metavar="N", help="most windows in one model run (default: measured at "
                   "start, the batch size beyond which a window costs no less; at most 16)")
    g.add_argument("--min-speech", type=float, default=0.2, metavar="F",
                   help="speech fraction a window needs to be scored (default 0.2)")
    g.add_argument("--vad", type=int, default=2, choices=(0, 1, 2, 3), help="VAD aggressiveness (default 2)")
    g.add_argument("--smoothing", choices=("ema", "median"), default="ema", help="smoothing of the score (default ema)")
    g.add_argument("--smoothing-s", type=float, default=5.0, metavar="S",
                   help="EMA time constant / median span in seconds (default 5)")
    g.add_argument("--no-incremental", dest="incremental", action="store_false",
                   help="score every Distill-MOS window in full (default: each stream's CNN features of the "
                        "overlap between consecutive windows are computed once; the scores are the same)")
    g.add_argument("--backend", metavar="URL",
                   help="score on an NVIDIA Triton Inference Server: triton://HOST:8001/MODEL (gRPC) or "
                        "triton+http://HOST:8000/MODEL; --model still names the contract (default: local)")
    g.add_argument("--backend-fallback", choices=("local",),
                   help="while the backend does not answer, score with the local --model (loaded too)")
    g.add_argument("--backend-timeout", type=float, metavar="S",
                   help="a backend request's deadline (default: twice the hop, at least 1 s; 30 s with --fast)")


def _serve_args(g: argparse._ArgumentGroup, ws_help: str, http_help: str) -> None:
    """The feed server's flags: a monitor's own feed and 'feed --subscribe' serve alike (see :func:`feed_options`)."""
    g.add_argument("--ws", metavar="HOST:PORT", help=ws_help)
    g.add_argument("--http", metavar="HOST:PORT", help=http_help)
    g.add_argument("--token", help="clients must present it ('Authorization: Bearer TOKEN' or ?token=TOKEN); "
                                   "required to listen beyond loopback (default: $SCOREQ_LIVE_TOKEN)")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed to connect besides the panel's own (repeatable; '*': any)")
    g.add_argument("--max-clients", type=int, default=256, metavar="N", help="websocket clients at once (default 256)")
    g.add_argument("--history-s", type=float, default=300.0, metavar="S",
                   help="seconds of each stream's history sent to a new client (default 300)")


def _feed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live feed, panel, metrics and alerts")
    _serve_args(g, "serve every event to websocket clients (default 127.0.0.1:8765; skipped with a notice when "
                   "that port is busy)",
                "serve the browser panel, /metrics and the feed at /ws (off unless given), e.g. 127.0.0.1:8080")
    g.add_argument("--no-ws", action="store_true", help="no websocket feed")
    w = p.add_argument_group("publishers: WebRTC (WHIP) and media-stream websockets, on --http and --whip")
    w.add_argument("--whip", metavar="HOST:PORT", help="serve only the publishers' endpoints (POST /whip, "
                                                      "/media websockets) here, e.g. 127.0.0.1:8088 (they are also "
                                                      "on --http when given)")
    w.add_argument("--ice-host", action="append", default=[], metavar="ADDR",
                   help="IP address of this machine WebRTC sessions offer (repeatable; default: every interface "
                        "but loopback; 127.0.0.1 for publishers on this machine)")
    w.add_argument("--stun", action="append", default=[], metavar="stun:HOST:PORT",
                   help="STUN server for a public candidate when the monitor is behind NAT (repeatable)")
    w.add_argument("--max-sessions", type=int, default=64, metavar="N",
                   help="WebRTC sessions at once, and media websockets at once (default 64; more get 503)")
    g.add_argument("--bands", metavar="GOOD,FAIR", help="colour bands for the panel: MOS >= GOOD good, >= FAIR fair "
                                                        "(default 4,3); in --mode ref distance <= GOOD, <= FAIR")
    g.add_argument("--alert", action="append", default=[], metavar="RULE",
                   help="raise an alert event, e.g. 'mos<3.0 for 10s' or 'distance>0.6 for 5s' (repeatable)")
    g.add_argument("--alert-webhook", metavar="URL", help="POST every alert and cleared event as JSON to URL")
    r = p.add_argument_group("one feed for many monitors: publish to Redis ('scoreq-live feed --subscribe')")
    r.add_argument("--publish", metavar="redis://HOST:6379/CHANNEL",
                   help="publish every event to Redis pub/sub (rediss:// for TLS, redis://:PASSWORD@HOST/...; "
                        "default channel scoreq-live); a broker outage never stops scoring")
    r.add_argument("--monitor-name", metavar="NAME",
                   help="this monitor's name on the feed: its streams show as NAME/STREAM (default: host name)")
    r.add_argument("--publish-buffer", type=int, default=10_000, metavar="N",
                   help="events kept while the broker is unreachable; beyond, the oldest are dropped and "
                        "reported (default 10000)")
    g.add_argument("--linger", type=float, metavar="S",
                   help="keep serving the feed S seconds after the inputs end (default: until Ctrl-C when --ws or "
                        "--http is given, else 0)")


def _store_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("call records: a record per stream and per call, with its timeline")
    g.add_argument("--store", metavar="PATH.db|postgresql://...",
                   help=f"keep {what} in a SQLite file (created) or PostgreSQL; 'scoreq-live calls', the "
                        "/api/calls API and the panel's /history read them (default: $SCOREQ_LIVE_STORE)")
    g.add_argument("--retain", default="30d", metavar="AGE",
                   help="remove calls older than AGE, e.g. 30d, 12h; 'never' keeps them (default 30d)")
    g.add_argument("--store-buffer", type=int, default=100_000, metavar="N",
                   help="timeline rows kept while the database cannot be written; beyond, rows are counted as "
                        "lost and reported (default 100000)")


def store_options(a: argparse.Namespace, monitor: str = "") -> StoreOptions | None:
    import os

    from scoreq_live.calls.sink import StoreOptions
    from scoreq_live.calls.store import parse_age
    from scoreq_live.errors import ConfigError

    target = a.store or os.environ.get(STORE_ENV)
    if not target:
        return None
    if a.store_buffer < 1:
        raise ConfigError(f"--store-buffer must be at least 1 (got {a.store_buffer})")
    return StoreOptions(target, retain_s=parse_age(a.retain, "--retain"), buffer=a.store_buffer, monitor=monitor)


def _siprec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SIPREC: score the calls an SBC or PBX records to the monitor (RFC 7866)")
    g.add_argument("--siprec", metavar="HOST:PORT", help="be a SIPREC recording server here (UDP and TCP), e.g. "
                                                        "127.0.0.1:5080")
    g.add_argument("--rtp-ports", default="20000-20999", metavar="LO-HI",
                   help="the ports recorded streams are received on (default 20000-20999)")
    g.add_argument("--siprec-allow", action="append", default=[], metavar="CIDR",
                   help="recording clients allowed (repeatable; default loopback only); others get 403")
    g.add_argument("--siprec-accept-plain", action="store_true",
                   help="also score ordinary calls made to the monitor (not SIPREC), as one stream each")
    g.add_argument("--max-calls", type=int, default=10_000, metavar="N",
                   help="SIP calls a live capture (sniff:) follows at once, the oldest ended or unanswered "
                        "forgotten first; and SIPREC sessions at once, more get 503 (default 10000)")


def siprec_options(a: argparse.Namespace) -> SiprecOptions | None:
    from scoreq_live.sip.siprec import DEFAULT_ALLOW, SiprecOptions, parse_port_range

    if not a.siprec:
        return None
    return SiprecOptions(a.siprec, parse_port_range(a.rtp_ports), tuple(a.siprec_allow) or DEFAULT_ALLOW,
                         a.siprec_accept_plain, max_sessions=a.max_calls)


def _monitor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", action="append", default=[], metavar="[NAME=]SPEC",
                   help="'mic', 'mic:NAME_OR_INDEX', an audio file, rtp://HOST:PORT[?codec=opus&pt=111] (a stream "
                        "per sender), an .sdp file or pcap:FILE (replay a capture); repeat for several; none: "
                        "only streams published to --http / --whip")
    p.add_argument("--fast", action="store_true", help="play files and captures as fast as scoring allows (same "
                                                         "windows and scores)")
    p.add_argument("--max-latency", type=float, metavar="S",
                   help="live inputs: a window's score (or its skip) is out within S seconds of its last sample; "
                        "when scoring cannot keep up, streams are thinned alike, skipped windows say 'overloaded' "
                        "(default: the hop plus twice the recent model run time; not used with --fast)")
    p.add_argument("--rtp-timeout", type=float, metavar="S",
                   help="an RTP sender, WebRTC publisher or media websocket silent for S seconds has ended "
                        "(default 5)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--jsonl", metavar="PATH|-", help="write every event as a JSON line")
    p.add_argument("--no-tui", action="store_true", help="no terminal panel (for services and pipes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no start-up messages")
    _feed_args(p)
    _store_args(p, "a record of every stream and call")
    _siprec_args(p)
    _scoring_args(p)


def _bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench")
    g.add_argument("--rounds", type=int, default=5, metavar="N", help="interleaved rounds (default 5)")
    g.add_argument("--windows", type=int, default=16, metavar="N", help="windows per round (default 16)")
    g.add_argument("--streams", type=int, default=4, metavar="N", help="streams in the engine runs (default 4)")
    g.add_argument("--host-streams", type=int, default=200, metavar="N",
                   help="streams in the host-side run (default 200)")
    g.add_argument("--capacity-s", type=float, default=12.0, metavar="S",
                   help="seconds scored per live capacity trial, after the first window (default 12)")
    g.add_argument("--soak-s", type=float, default=3600.0, metavar="S",
                   help="simulated seconds of the memory soak (default 3600)")
    g.add_argument("--soak-streams", type=int, default=50, metavar="N", help="streams in the soak (default 50)")
    g.add_argument("--quick", action="store_true", help="a short run: 2 rounds, smaller host run, 60 s soak")
    g.add_argument("--json", metavar="PATH|-", help="write the report as JSON")
    _scoring_args(p)


def _relay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subscribe", action="append", default=[], required=True, metavar="redis://HOST:6379/CHANNEL",
                   help="the broker and channel monitors --publish to (repeatable)")
    _serve_args(p.add_argument_group("live feed, panel and metrics"), "serve the feed to websocket clients here",
                "serve the browser panel, /metrics and the feed at /ws here")
    p.add_argument("--mode", choices=("nr", "ref"), default="nr",
                   help="what the panel shows: MOS (nr) or distance (ref) (default nr)")
    p.add_argument("--bands", metavar="GOOD,FAIR", help="colour bands for the panel (default: the mode's)")
    p.add_argument("--jsonl", metavar="PATH|-", help="also write every relayed event as a JSON line")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="no start-up messages")
    _store_args(p, "the records every monitor sends, once,")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scoreq-live", description="Realtime speech-quality monitor.")
    p.add_argument("--version", action="version", version=f"scoreq-live {__version__}")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("monitor", help="score live inputs (the default command)")
    _monitor_args(m)
    d = sub.add_parser("demo", help="monitor the bundled example recordings (no sound card, no network)")
    _monitor_args(d)
    s = sub.add_parser("score", help="score files, folders and list files offline")
    s.add_argument("paths", nargs="+", metavar="PATH",
                   help="audio file, packet capture (.pcap/.pcapng: one result per RTP stream), folder (searched "
                        "recursively) or list file")
    s.add_argument("--rtp-port", type=int, metavar="N", help="in captures, only RTP streams from or to UDP port N")
    s.add_argument("--max-duration", type=float, metavar="S",
                   help="longest audio file scored, in seconds (default 14400, i.e. 4 h); a longer one gets an "
                        "error row (files are read block by block, so memory does not grow with their length)")
    s.add_argument("--csv", metavar="PATH|-", help="write one row per file")
    s.add_argument("--json", metavar="PATH|-", help="write a JSON array, one object per file, with its windows")
    s.add_argument("--no-progress", action="store_true")
    _scoring_args(s)
    sub.add_parser("devices", help="list sound input devices")
    _relay_args(sub.add_parser("feed", help="serve one feed, panel and /metrics for many monitors that --publish "
                                            "to Redis (streams named MONITOR/STREAM)"))
    _bench_args(sub.add_parser("bench", help="measure what this machine scores: model alone, naive loop, engine, "
                                             "host side, live capacity, memory (to size a deployment)"))
    mo = sub.add_parser("models", help="known models")
    mo_sub = mo.add_subparsers(dest="models_command")
    from scoreq_live.cli_models import add_models_commands, add_reference_parser

    add_models_commands(mo_sub)
    add_reference_parser(sub)
    from scoreq_live.cli_calls import add_calls_parser

    add_calls_parser(sub)
    return p


def scoring_options(a: argparse.Namespace) -> ScoringOptions:
    """The scoring flags as options."""
    from scoreq_live.scoring.load import ScoringOptions

    models = [*(a.model or ()), *(m.strip() for m in (getattr(a, "models", None) or "").split(",") if m.strip())]
    return ScoringOptions(model=models[0] if models else None, extra_models=tuple(models[1:]),
                          model_spec=a.model_spec, model_kind=a.model_kind, mode=a.mode,
                          references=tuple(a.reference), window_s=a.window, hop_s=a.hop, device=a.device,
                          threads=a.threads, max_batch=a.max_batch, min_speech=a.min_speech, vad=a.vad,
                          backend=getattr(a, "backend", None), backend_fallback=getattr(a, "backend_fallback", None),
                          backend_timeout_s=getattr(a, "backend_timeout", None),
                          smoothing=a.smoothing, smoothing_s=a.smoothing_s, incremental=a.incremental)


def feed_options(a: argparse.Namespace, ws: str | None, ws_required: bool = True) -> FeedOptions:
    """The feed server's flags as options; ``ws``: the websocket address the command settled on."""
    import os

    from scoreq_live.http.policy import TOKEN_ENV
    from scoreq_live.monitor import FeedOptions

    return FeedOptions(ws=ws, ws_required=ws_required, http=a.http, token=a.token or os.environ.get(TOKEN_ENV),
                       allowed_origins=tuple(a.allowed_origin), max_clients=a.max_clients, history_s=a.history_s)


def monitor_options(a: argparse.Namespace) -> MonitorOptions:
    """The monitor flags as options: the only thing the command line decides."""
    from scoreq_live.monitor import IngestOptions, MonitorOptions
    from scoreq_live.sinks.server import DEFAULT_WS_PORT

    feed = None
    if not a.no_ws or a.http or a.whip:  # the token and origins are every site's, --whip's too
        ws = None if a.no_ws else (a.ws or f"127.0.0.1:{DEFAULT_WS_PORT}")
        feed = feed_options(a, ws, ws_required=a.ws is not None)
    return MonitorOptions(inputs=tuple(a.input), scoring=scoring_options(a), fast=a.fast, duration=a.duration,
                          alerts=tuple(a.alert), alert_webhook=a.alert_webhook, feed=feed, bands=a.bands,
                          jsonl=a.jsonl, linger=a.linger, rtp_timeout_s=a.rtp_timeout, max_latency_s=a.max_latency,
                          publish=a.publish, monitor_name=a.monitor_name, publish_buffer=a.publish_buffer,
                          store=store_options(a, a.monitor_name or ""), siprec=siprec_options(a),
                          max_calls=a.max_calls,
                          ingest=IngestOptions(listen=a.whip, ice_hosts=tuple(a.ice_host), stun=tuple(a.stun),
                                               max_sessions=a.max_sessions))


def demo_inputs() -> list[str]:
    from scoreq_live.audio import examples_dir

    files = sorted(examples_dir().glob("*.wav"))
    return [f"{f.stem}={f}" for f in files]


def cmd_monitor(a: argparse.Namespace) -> int:
    from rich.console import Console

    from scoreq_live.monitor import build_monitor
    from scoreq_live.progress import ConsoleProgress
    from scoreq_live.scoring.load import INCREMENTAL_MODELS
    from scoreq_live.sinks.status import StatusSink
    from scoreq_live.sinks.terminal import TerminalSink

    try:
        opts = monitor_options(a)
    except ScoreqLiveError as e:
        return _err(str(e))
    console = Console(stderr=True)
    notify = (lambda line: None) if a.quiet else (lambda line: console.print(line, highlight=False))
    try:
        with ConsoleProgress("downloading the model", console=console) as progress:
            monitor = build_monitor(opts, notify=notify, progress=progress)
    except ScoreqLiveError as e:
        return _err(str(e))
    model, stream = monitor.scoring.model, monitor.scoring.stream
    if not a.quiet:
        why = f" ({model.cpu_reason})" if model.cpu_reason else ""
        plan = getattr(monitor.scoring.scorer, "plan", None)
        batch = f", batch sizes {'/'.join(map(str, plan.sizes))} ({plan.source})" if plan is not None else ""
        how = ""
        if stream.model in INCREMENTAL_MODELS:
            where = " on the server, features kept here" if opts.scoring.backend else ""
            how = (f"; incremental{where} (each stream's features of the overlap computed once)"
                   if monitor.scoring.scorer.incremental is not None else "; every window in full")
        console.print(f"scoring with [bold]{model.describe()}[/]{why}; mode {stream.mode}, "
                      f"window {stream.window_s:g}s, hop {stream.hop_s:g}s{batch}{how}", highlight=False)
        for x in monitor.scoring.extra:
            console.print(f"  and [bold]{x.scorer.model.describe()}[/]: {', '.join(x.names)}; window "
                          f"{x.stream.window_s:g}s, hop {x.stream.hop_s:g}s", highlight=False)
    if a.no_tui:
        if not a.quiet:
            monitor.sinks.append(StatusSink())
    else:
        monitor.sinks.append(TerminalSink(console, title=f"scoreq-live · {model.describe()}", bands=monitor.bands))
    linger = opts.linger_s
    if not opts.inputs and not a.quiet:
        console.print("no --input: waiting for published streams (Ctrl-C to stop)", highlight=False)
    elif linger > 0 and opts.feed is not None and opts.feed.explicit and not a.quiet:
        console.print("the feed stays up after the inputs end" + ("" if linger == float("inf") else
                      f" for {linger:g}s") + " (Ctrl-C to stop)", highlight=False)
    try:
        asyncio.run(monitor.run())
    except ScoreqLiveError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        pass
    return _outputs_status(monitor.sinks)


def _outputs_status(sinks: Sequence[Sink]) -> int:
    """1 when an output could not write every event (each said so when it happened), else 0."""
    lost = sum(s.lost for s in sinks)
    if lost:
        print(f"scoreq-live: {lost} events were not written by the outputs (see above)", file=sys.stderr)
        return 1
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from scoreq_live.audio import examples_dir

    if not a.input:
        a.input = demo_inputs()
        if not a.input:
            return _err(f"no example recordings found in {examples_dir()}")
    return cmd_monitor(a)


def cmd_score(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from scoreq_live.audio import MAX_DURATION_S
    from scoreq_live.offline import expand_paths, score_path, write_csv, write_json
    from scoreq_live.progress import ConsoleProgress
    from scoreq_live.scoring.load import load_scorer

    err = Console(stderr=True)
    max_duration = MAX_DURATION_S if a.max_duration is None else a.max_duration
    if not max_duration > 0:
        return _err("--max-duration must be a positive number of seconds")
    try:
        files = expand_paths(a.paths)
        if not files:
            return _err("no audio files found")
        with ConsoleProgress("downloading the model", console=err) as download:
            loaded = load_scorer(scoring_options(a), progress=download)
    except ScoreqLiveError as e:
        return _err(str(e))
    scorer, config, model = loaded.scorer, loaded.stream, loaded.model
    results = []
    show = not a.no_progress and len(files) > 1 and err.is_terminal
    with Progress(console=err, disable=not show, transient=True) as progress:
        task = progress.add_task("scoring", total=len(files))
        for f in files:
            results.extend(score_path(f, scorer, config, rtp_port=a.rtp_port, max_duration_s=max_duration,
                                      extra=loaded.extra))
            progress.advance(task)
    key = "MOS" if config.mode == "nr" else "distance"
    title = f"{model.describe()} · window {config.window_s:g}s hop {config.hop_s:g}s"
    for x in loaded.extra:
        title += f" + {x.name} · window {x.stream.window_s:g}s hop {x.stream.hop_s:g}s"
    table = Table(title=title)
    table.add_column("file")
    table.add_column(key, justify="right")
    more = [n for x in loaded.extra for n in x.names]  # the additional models' scores: a column each
    for n in more:
        table.add_column(n, justify="right")
    table.add_column("windows", justify="right")
    table.add_column("note")
    for r in results:
        v = "–" if r.value is None else (f"{r.value:.3f}" if config.mode == "nr" else f"{r.value:.4f}")
        cells = ["–" if r.scores.get(n) is None else f"{r.scores[n]:.3f}" for n in more]
        table.add_row(r.file, v, *cells, str(len(r.windows)), r.error or "")
    out = Console(stderr=a.json == "-" or a.csv == "-")
    out.print(table)
    if a.csv:
        write_csv(results, a.csv)
    if a.json:
        write_json(results, a.json)
    return 1 if all(r.error and r.value is None and not r.windows for r in results) else 0


def cmd_devices(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from scoreq_live.sources.device import input_devices

    try:
        devices = input_devices()
    except ScoreqLiveError as e:
        return _err(str(e))
    if not devices:
        return _err("no sound input device found; use --input FILE to score a recording instead")
    t = Table(title="input devices (use --input mic:INDEX or mic:NAME)")
    for c in ("index", "name", "channels", "rate", "host API", "default"):
        t.add_column(c)
    for d in devices:
        t.add_row(str(d["index"]), d["name"], str(d["channels"]), str(d["rate"]), d["hostapi"],
                  "*" if d["default"] else "")
    Console().print(t)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from scoreq_live.bench import BenchOptions, bench, load_bench_scorer, render, write_json

    opts = BenchOptions(rounds=a.rounds, windows=a.windows, streams=a.streams, host_streams=a.host_streams,
                        capacity_s=a.capacity_s, soak_s=a.soak_s, soak_streams=a.soak_streams)
    if a.quick:
        opts = BenchOptions(rounds=2, windows=min(a.windows, 8), streams=a.streams, host_streams=50, host_s=10.0,
                            capacity_s=min(a.capacity_s, 6.0), capacity_trials=2, soak_streams=a.soak_streams,
                            soak_s=min(a.soak_s, 60.0), memory_streams=100)
    if min(opts.rounds, opts.windows, opts.streams, opts.host_streams, opts.soak_streams) < 1 or opts.soak_s <= 0:
        return _err("bench: rounds, windows and stream counts must be at least 1, --soak-s positive")
    try:
        scoring = load_bench_scorer(scoring_options(a))
        report = bench(scoring, opts, say=lambda m: print(m, file=sys.stderr, flush=True))
    except ScoreqLiveError as e:
        return _err(str(e))
    print(render(report))
    if a.json:
        write_json(report, a.json)
    return 0


def cmd_feed(a: argparse.Namespace) -> int:
    from scoreq_live.relay import RelayOptions, RelayServer

    notify = (lambda line: None) if a.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        opts = RelayOptions(subscribe=tuple(a.subscribe), feed=feed_options(a, a.ws), mode=a.mode, bands=a.bands,
                            jsonl=a.jsonl, duration=a.duration, store=store_options(a))
        relay = RelayServer(opts, notify=notify)
        asyncio.run(relay.run())
    except ScoreqLiveError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        pass
    return _outputs_status(relay.sinks)


def cmd_calls(a: argparse.Namespace) -> int:
    from scoreq_live.cli_calls import cmd_calls as run

    return run(a)


def cmd_models(a: argparse.Namespace) -> int:
    from scoreq_live.cli_models import cmd_models as run

    return run(a)


def cmd_reference(a: argparse.Namespace) -> int:
    from scoreq_live.cli_models import cmd_reference as run

    return run(a)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The monitor is the default command: `scoreq-live --input mic` needs no verb.
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "monitor")
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    if a.command == "models" and a.models_command is None:
        a.models_command = "list"
    return {"monitor": cmd_monitor, "demo": cmd_demo, "score": cmd_score,
            "devices": cmd_devices, "models": cmd_models, "reference": cmd_reference, "bench": cmd_bench,
            "feed": cmd_feed, "calls": cmd_calls}[a.command](a)
