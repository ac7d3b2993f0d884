"""Offline scoring of files, folders and list files, through the same stream core as the monitor.

A packet capture (pcap or pcapng) is scored per RTP stream: each stream is decoded through the same
receiver as a live RTP input (capture times as arrival times), and its audio is scored with the same
windows; its result carries the addresses, the codec and the network numbers of the whole stream
and of each window.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scoreq_live.audio import BLOCK_S, MAX_DURATION_S, AudioError, audio_blocks
from scoreq_live.core.events import Mode, ModelScore, ScoreEvent
from scoreq_live.core.stream import StreamConfig, StreamCore, Window
from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.scorer import Scorer

if TYPE_CHECKING:
    from scoreq_live.rtp.capture import Flow
    from scoreq_live.rtp.receiver import RtpStream
    from scoreq_live.scoring.load import ExtraModel

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
LIST_EXTENSIONS = {".txt", ".lst", ".list", ".scp"}
CAPTURE_EXTENSIONS = {".pcap", ".pcapng"}
NET_KEYS = ("expected", "received", "lost", "duplicated", "late", "loss_pct", "jitter_ms", "r_factor", "mos_cq")


class InputError(ScoreqLiveError):
    """A path given to 'score' does not exist."""


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for audio and captures, list files read (one path per line).

    Paths in a list file are relative to the list file; blank lines and ``#`` comments are skipped.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            wanted = AUDIO_EXTENSIONS | CAPTURE_EXTENSIONS
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in wanted))
        elif p.suffix.lower() in LIST_EXTENSIONS and p.is_file():
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    out.append(q if q.is_absolute() else p.parent / q)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"no such file or folder: {p}")
    return out


@dataclass
class FileResult:
    file: str
    mode: Mode
    value: float | None = None
    windows: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    error: str | None = None
    # RTP streams of a capture: "ip:port" of sender and receiver, the codec, the whole stream's network numbers
    src: str | None = None
    dst: str | None = None
    codec: str | None = None
    net: dict[str, Any] | None = None
    scores: dict[str, float | None] = field(default_factory=dict)  # each named score's mean over scored windows
    # RTP streams of a capture: the stream's name as the monitor names it (after its SIP call when the capture
    # holds one, as a live capture does) and that call's Call-ID ("" for none)
    stream: str | None = None
    call: str = ""
    # The additional models' windows (--model A --model B), by model: t_start, t_end, scores, speech, ...
    models: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        key = "mos" if self.mode == "nr" else "distance"
        d: dict[str, Any] = {"file": self.file, key: None if self.value is None else round(self.value, 5),
             "duration_s": round(self.duration_s, 3), "windows": self.windows}
        if self.scores:
            d["scores"] = {k: None if v is None else round(v, 5) for k, v in self.scores.items()}
        if self.src is not None:
            d.update(src=self.src, dst=self.dst, codec=self.codec, net=self.net)
        if self.stream is not None:
            d.update(stream=self.stream, call=self.call)
        if self.models:
            d["models"] = self.models
        if self.error:
            d["error"] = self.error
        return d


SCORE_RUNS = 2  # windows are scored this many full model runs at a time while a file is read


def window_results(audio: np.ndarray | Iterable[np.ndarray], scorer: Scorer, config: StreamConfig,
                   name: str = "file", extra: Sequence[ExtraModel] = ()) -> list[ScoreEvent | ModelScore]:
    """Score a signal as the monitor would see it (a whole array, or its blocks in order); return its events.

    ``score`` events for the first model, ``model_score`` events for each of ``extra``.
    """
    return _window_events(audio, scorer, config, name, extra)[0]


def _window_events(audio: np.ndarray | Iterable[np.ndarray], scorer: Scorer, config: StreamConfig,
                   name: str, extra: Sequence[ExtraModel] = ()) -> tuple[list[ScoreEvent | ModelScore], int]:
    """The events of a signal (every model's) and its length in samples.

    Blocks are windowed as they come and their windows scored :data:`SCORE_RUNS` full model runs at a time,
    so a long file costs a few blocks and windows of memory, not its length.  The events are those of the
    whole signal fed at once: the stream core sees the same hop-long pieces, and the model the same runs.
    """
    scorers = [scorer, *(x.scorer for x in extra)]
    core = StreamCore(name, config, [x.stream for x in extra])
    for lane, sc in zip(core.lanes, scorers):
        lane.state = sc.new_state()
    hop = max(1, min(lane.config.hop for lane in core.lanes))
    runs = max(1, scorer.max_batch) * SCORE_RUNS
    events: list[ScoreEvent | ModelScore] = []
    waiting: list[Window] = []
    held = np.zeros(0, np.float32)  # less than a hop, fed with the next block so pieces start on hops
    total = 0

    def score(windows: list[Window]) -> None:
        for i, sc in enumerate(scorers):
            mine = [w for w in windows if w.lane == i]
            if not mine:
                continue
            named = sc.score_named([w.audio for w in mine], [core.lanes[i].state] * len(mine), [w.start for w in mine])
            for w, row in zip(mine, named):
                core.resolve(w, float(row[0]), None, dict(zip(sc.names, (float(x) for x in row))))
        events.extend(core.drain(0.0, 0.0))

    if isinstance(audio, np.ndarray):  # a whole signal (a capture's stream) is windowed in blocks too
        whole, step = audio, int(BLOCK_S * 16000)
        audio = (whole[i:i + step] for i in range(0, whole.size, step))
    for block in audio:
        total += block.size
        x = np.concatenate([held, block]) if held.size else block
        cut = x.size - x.size % hop
        held = x[cut:].copy()
        if cut:
            waiting += core.feed(x[:cut], 0.0)
        while len(waiting) >= runs:
            score(waiting[:runs])
            del waiting[:runs]
    if held.size:
        waiting += core.feed(held, 0.0)
    score(waiting + core.finish(0.0))
    return events, total


def score_file(path: Path, scorer: Scorer, config: StreamConfig,
               max_duration_s: float | None = MAX_DURATION_S, extra: Sequence[ExtraModel] = ()) -> FileResult:
    """The per-window timeline of a file and its whole-file score (mean of the scored windows).

    The file is read and scored block by block; one longer than ``max_duration_s`` (None: no limit) is
    refused, as soon as its header or its reading says so.
    """
    res = FileResult(str(path), scorer.mode)
    blocks = audio_blocks(path, max_duration_s, hint="cut it, or raise --max-duration")
    try:
        _score_audio(res, blocks, scorer, config, path.stem, extra=extra)
    except AudioError as e:
        res.error = str(e)
    return res


def _score_audio(res: FileResult, audio: np.ndarray | Iterable[np.ndarray], scorer: Scorer, config: StreamConfig,
                 name: str, net: Callable[[float, float], dict[str, Any]] | None = None,
                 extra: Sequence[ExtraModel] = ()) -> None:
    """Fill ``res`` with the windows of ``audio`` (an array or its blocks) and their mean; ``net`` gives each
    window's network numbers.  Nothing is filled when reading the blocks fails.  The additional models'
    windows go to ``res.models``, their named scores' means to ``res.scores`` with the first model's."""
    events, samples = _window_events(audio, scorer, config, name, extra)
    res.duration_s = samples / 16000
    key = "mos" if scorer.mode == "nr" else "distance"
    scored: list[float] = []
    named: dict[str, list[float]] = {name: [] for name in scorer.names}
    for more in extra:
        res.models[more.name] = []
        named.update({n: [] for n in more.names})
    for ev in events:
        if isinstance(ev, ModelScore):
            res.models[ev.model].append({
                "t_start": round(ev.t_start, 4), "t_end": round(ev.t_end, 4),
                "scores": None if ev.scores is None else {k: round(x, 5) for k, x in ev.scores.items()},
                "speech": round(ev.speech, 3), "level_dbfs": round(ev.level_dbfs, 1), "reason": ev.reason})
            for k, x in (ev.scores or {}).items():
                named[k].append(x)
            continue
        v = ev.value
        row: dict[str, Any] = {"t_start": round(ev.t_start, 4), "t_end": round(ev.t_end, 4),
                               key: None if v is None else round(v, 5), "speech": round(ev.speech, 3),
                               "level_dbfs": round(ev.level_dbfs, 1), "reason": ev.reason}
        if ev.scores is not None:
            row["scores"] = {k: round(x, 5) for k, x in ev.scores.items()}
            for k, x in ev.scores.items():
                named.setdefault(k, []).append(x)
        if net is not None:
            row["net"] = net(ev.t_start, ev.t_end)
        res.windows.append(row)
        if v is not None:
            scored.append(v)
    res.value = float(np.mean(scored)) if scored else None
    res.scores = {k: (float(np.mean(xs)) if xs else None) for k, xs in named.items()}
    if not scored:
        res.error = "no window with enough speech to score"


def score_path(path: Path, scorer: Scorer, config: StreamConfig, rtp_port: int | None = None,
               max_duration_s: float | None = MAX_DURATION_S, extra: Sequence[ExtraModel] = ()) -> list[FileResult]:
    """A file's result (``max_duration_s``: see :func:`score_file`), or one result per RTP stream of a capture.

    ``extra``: more models scoring the same audio, each on its own windows.
    """
    from scoreq_live.rtp.capture import is_capture

    if is_capture(path):
        return score_capture(path, scorer, config, rtp_port, extra=extra)
    return [score_file(path, scorer, config, max_duration_s, extra)]


@dataclass
class _Leg:
    """One RTP stream of a capture, decoded."""

    flow: Flow | None
    stream: RtpStream | None
    audio: np.ndarray
    error: str | None = None
    name: str | None = None  # the stream's name (the monitor's)
    call: str = ""


def score_capture(path: Path, scorer: Scorer, config: StreamConfig, rtp_port: int | None = None,
                  timeout_s: float | None = None, extra: Sequence[ExtraModel] = ()) -> list[FileResult]:
    """One result per RTP stream of a capture (``file`` is ``PATH#<ssrc>``), scored as the monitor would.

    Each stream is decoded whole through the RTP receiver, with the capture times as arrival times
    (a stream silent for ``timeout_s`` ends there, as in the monitor; if it starts again it is
    another result), then its audio is scored window by window.  ``rtp_port``: only streams from or
    to that UDP port.  A capture that cannot be read, or holds no RTP, gives one result saying so.
    """
    from scoreq_live.rtp.capture import Capture, CaptureError, FlowDemux, find_rtp_flows, format_endpoint
    from scoreq_live.sources.pcap import CaptureStreams
    from scoreq_live.sources.rtp import DEFAULT_TIMEOUT_S

    timeout_s = timeout_s or DEFAULT_TIMEOUT_S

    try:
        with Capture(path) as cap:
            flows = find_rtp_flows(cap.datagrams(), rtp_port)
    except CaptureError as e:
        return [FileResult(str(path), scorer.mode, error=str(e))]
    if not flows:
        where = f" to or from port {rtp_port}" if rtp_port is not None else ""
        return [FileResult(str(path), scorer.mode, error=f"no RTP stream found in this capture{where}")]
    span = max(f.last_s for f in flows) - min(f.first_s for f in flows)
    # network history for the whole capture, so that every window's numbers are still there after decoding
    demux = FlowDemux(flows, timeout_s=timeout_s, history_s=span + 2 * timeout_s + 60.0)
    # The streams as the monitor's replay opens and ends them; nothing reads them while decoding, so each
    # holds its audio until it ends, and is then read whole.
    live = CaptureStreams(path.stem, path)
    with Capture(path) as cap:
        for d in cap.datagrams():
            live.feed(demux, d, demux.arrival(d.ts))
    live.end_all("eof")
    legs = [_Leg(s.flow, s.stream, s.take(), s.failure, s.name, s.call) for s in live.new()]
    played = {leg.flow.key for leg in legs if leg.flow is not None}
    empty = np.zeros(0, np.float32)
    legs += [_Leg(f, None, empty, "no packet of this stream could be played") for f in flows if f.key not in played]

    results: list[FileResult] = []
    seen: dict[str, int] = {}
    for leg in legs:
        flow, stream = leg.flow, leg.stream
        ssrc = flow.ssrc if flow is not None else (stream.ssrc if stream is not None else 0)
        label = f"{path}#{ssrc:08x}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label += f"-{seen[label]}"
        res = FileResult(label, scorer.mode, error=leg.error, stream=leg.name, call=leg.call)
        if flow is not None:
            res.src, res.dst, res.codec = format_endpoint(flow.src), format_endpoint(flow.dst), flow.codec_name
        results.append(res)
        if stream is None or leg.error is not None:
            continue
        res.codec = stream.codec_name or res.codec
        audio = leg.audio
        if res.src is None:
            res.src, res.dst = format_endpoint(stream.source_addr), ""
        res.net = _stream_net(stream, audio.size / 16000)
        _score_audio(res, audio, scorer, config, f"{path.stem}-{ssrc:08x}", _window_net(stream), extra)
    return results


def _window_net(stream: RtpStream) -> Callable[[float, float], dict[str, Any]]:
    def net(t0: float, t1: float) -> dict[str, Any]:
        return dict(stream.net_window(t0, t1).to_dict())

    return net


def _stream_net(stream: RtpStream, duration_s: float) -> dict[str, Any]:
    """The whole stream's network numbers: RFC 3550 counts and jitter, and the E-model over all of it."""
    whole = stream.net_window(0.0, duration_s + 1.0).to_dict()
    totals = stream.totals()
    out: dict[str, Any] = {k: totals[k] for k in NET_KEYS[:7]}
    out["loss_pct"] = round(float(out["loss_pct"]), 3)
    out["jitter_ms"] = round(float(out["jitter_ms"]), 3)
    out["concealed_s"] = round(float(totals["concealed_s"]), 3)
    out["r_factor"], out["mos_cq"] = whole["r_factor"], whole["mos_cq"]
    return out


def write_csv(results: Sequence[FileResult], path: str) -> None:
    """One row per result; RTP streams of captures add their addresses, codec and network numbers at the end."""
    key = "mos" if (results and results[0].mode == "nr") else "distance"
    rtp = any(r.src is not None for r in results)
    # A model's named scores beyond the primary one: a column each, after the primary's.
    extra = list(dict.fromkeys(k for r in results for k in r.scores if k != key))
    with (open(path, "w", newline="") if path != "-" else contextlib.nullcontext(sys.stdout)) as f:
        w = csv.writer(f)
        w.writerow(["file", key, *extra, "duration_s", "windows", "scored_windows", "error"]
                   + (["src", "dst", "codec", *NET_KEYS] if rtp else []))
        for r in results:
            n = sum(1 for x in r.windows if x.get(key) is not None)
            means = [r.scores.get(k) for k in extra]
            row: list[Any] = [r.file, "" if r.value is None else f"{r.value:.5f}",
                              *("" if m is None else f"{m:.5f}" for m in means), f"{r.duration_s:.3f}",
                              len(r.windows), n, r.error or ""]
            if rtp:
                net = r.net or {}
                row += [r.src or "", r.dst or "", r.codec or "", *(net.get(k, "") for k in NET_KEYS)]
            w.writerow(row)


def write_json(results: Sequence[FileResult], path: str) -> None:
    text = json.dumps([r.to_dict() for r in results], indent=1)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
