"""Putting a monitor together: model + reference -> scorer, inputs -> engine, sinks on the bus."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from scoreq_live.bus import EventBus
from scoreq_live.core.stream import StreamConfig
from scoreq_live.engine import Engine, EngineConfig
from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel
from scoreq_live.scoring.spec import ModelError
from scoreq_live.sources import SourceError, open_inputs

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The options do not make a working monitor; the message says why."""


@dataclass
class ScoringOptions:
    model: str | None = None
    model_spec: str | None = None
    model_kind: str | None = None
    mode: str | None = None  # nr | ref; None: what the model does
    references: Sequence[str] = ()
    window_s: float | None = None
    hop_s: float | None = None
    device: str = "auto"
    threads: int | None = None
    max_batch: int = 16
    min_speech: float = 0.2
    vad: int = 2
    smoothing: str = "ema"
    smoothing_s: float = 5.0


@dataclass
class MonitorOptions(ScoringOptions):
    inputs: Sequence[str] = ()
    fast: bool = False
    duration: float | None = None
    batch_wait_s: float = 0.01
    max_pending: int = 256
    alerts: Sequence[str] = ()  # rules such as "mos<3.0 for 10s" (scoreq_live.core.alerts)
    linger: float = 0.0  # seconds to keep serving sinks (the feed) after the inputs end; inf: until stopped


def load_scorer(opts: ScoringOptions) -> tuple[Scorer, StreamConfig, OnnxModel]:
    """The model session, its reference (ref mode) and the stream settings that go with them."""
    # Imported here so that 'scoreq-live devices' does not pay for the reference machinery.
    from scoreq_live.offline import build_reference
    from scoreq_live.scoring.references import ReferenceError, combine
    from scoreq_live.scoring.store import fingerprint

    mode = opts.mode
    files, stored = _split_references(opts.references)
    model_name = opts.model
    if stored and not model_name and not opts.model_spec and mode in (None, "ref"):
        # A stored reference knows its model: `--mode ref --reference office` needs nothing else.
        made_with = sorted({r.model for r in stored})
        if len(made_with) > 1:
            raise ConfigError(f"the stored references were made with different models ({', '.join(made_with)}); "
                              "give --model")
        model_name = made_with[0]
    try:
        spec = resolve_model(model_name, opts.model_spec, opts.model_kind, mode)
    except ModelError as e:
        raise ConfigError(str(e)) from e
    if mode is None:
        mode = spec.mode
    if mode != spec.mode:
        what = "predicts a MOS (mode nr)" if spec.kind == "mos" else "outputs embeddings (mode ref)"
        raise ConfigError(f"model {spec.name!r} {what}; it cannot run in mode {mode!r}")
    if mode == "ref" and not opts.references:
        raise ConfigError("--mode ref needs --reference CLEAN.wav (clean speech to compare against)")
    if mode == "nr" and opts.references:
        raise ConfigError("--reference is only used with --mode ref")
    try:
        model = OnnxModel(spec, device=opts.device, threads=opts.threads)
    except ModelError as e:
        raise ConfigError(str(e)) from e
    spec = model.spec
    window_s = opts.window_s if opts.window_s is not None else spec.default_window_s
    hop_s = opts.hop_s if opts.hop_s is not None else min(spec.hop_s, window_s)
    if spec.input_samples and window_s * spec.sample_rate > spec.input_samples + 0.5:
        raise ConfigError(f"--window {window_s:g}s is longer than {spec.name}'s fixed input "
                          f"({spec.input_samples / spec.sample_rate:g}s)")
    if hop_s <= 0 or window_s <= 0 or hop_s > window_s:
        raise ConfigError(f"need 0 < hop <= window (got window {window_s:g}s, hop {hop_s:g}s)")
    config = StreamConfig(window_s=window_s, hop_s=hop_s, min_speech=opts.min_speech,
                          vad_aggressiveness=opts.vad, smoothing=opts.smoothing,
                          smoothing_s=opts.smoothing_s, model=spec.name, mode=mode)
    reference = None
    if mode == "ref":
        parts = []
        for r in stored:
            try:
                r.check_model(spec.name, fingerprint(spec.file), model.output_dim)
                parts.append(r.to_reference())
            except ReferenceError as e:
                raise ConfigError(str(e)) from e
            if (r.window_s, r.hop_s) != (config.window_s, config.hop_s):
                log.warning("reference %r was windowed at %gs/%gs, the monitor uses %gs/%gs",
                            r.name, r.window_s, r.hop_s, config.window_s, config.hop_s)
        if files:
            try:
                parts.append(build_reference(model, files, config))
            except Exception as e:
                raise ConfigError(f"cannot build the reference: {e}") from e
        reference = combine(parts, spec.name)
    return Scorer(model, reference, opts.max_batch), config, model


def _split_references(refs: Sequence[str]):
    """``--reference`` values: audio files (an existing path wins) and stored references by name."""
    from scoreq_live.scoring.references import ReferenceError, ReferenceStore

    files, stored = [], []
    store = None
    for r in refs:
        if Path(r).is_file():
            files.append(r)
            continue
        store = store or ReferenceStore()
        if not store.exists(r):
            raise ConfigError(f"--reference {r}: no such file or stored reference (see 'scoreq-live reference list')")
        try:
            stored.append(store.get(r))
        except ReferenceError as e:
            raise ConfigError(str(e)) from e
    return files, stored


def open_sources(opts: MonitorOptions):
    if not opts.inputs:
        raise ConfigError("no --input given")
    try:
        return open_inputs(list(opts.inputs), fast=opts.fast)
    except SourceError as e:
        raise ConfigError(str(e)) from e


async def run_monitor(opts: MonitorOptions, sinks: Sequence = (), scorer_bundle=None, sources=None) -> Engine:
    """Run the monitor until its inputs end (or ``duration``); every sink reads the same bus.

    Sinks may have ``start()`` (awaited before any stream starts: a server binds its port, and
    its failure stops the monitor up front) and ``close()`` (awaited at the end, after ``linger``).
    """
    sources = sources if sources is not None else open_sources(opts)
    scorer, config, _ = scorer_bundle or load_scorer(opts)
    bus = EventBus()
    if opts.alerts:
        from scoreq_live.core.alerts import AlertEvaluator, RuleError, check_rule_mode, parse_rule

        try:
            rules = [parse_rule(r) for r in opts.alerts]
            for rule in rules:
                check_rule_mode(rule, config.mode)
        except RuleError as e:
            raise ConfigError(str(e)) from e
        bus.derive.append(AlertEvaluator(rules).feed)  # alert events follow the score that caused them
    started = []
    try:
        for s in sinks:
            if hasattr(s, "start"):
                await s.start()
            started.append(s)
    except BaseException:
        await _close_sinks(started)
        raise
    sink_tasks = [asyncio.create_task(s.run(bus.subscribe(name=type(s).__name__))) for s in sinks]
    engine = Engine(scorer, sources, EngineConfig(stream=config, max_batch=opts.max_batch,
                                                  batch_wait_s=opts.batch_wait_s,
                                                  max_pending=opts.max_pending, fast=opts.fast), bus)
    for s in sinks:
        attach = getattr(s, "attach", None)  # sinks that also watch the engine (metrics: batch timings)
        if attach is not None:
            attach(engine)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def stop() -> None:
        stopped.set()  # also ends a linger
        engine.stop()

    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:  # a service is stopped with SIGTERM, a person presses Ctrl-C: both end streams cleanly
            loop.add_signal_handler(sig, stop)
            signals.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here
    try:
        await engine.run(duration=opts.duration)
        if opts.linger > 0 and not stopped.is_set():
            # Inputs ended, but dashboards may still be looking: keep serving history and stream states.
            try:
                await asyncio.wait_for(stopped.wait(), None if math.isinf(opts.linger) else opts.linger)
            except asyncio.TimeoutError:
                pass
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        bus.close()
        await _close_sinks(sinks)
        await asyncio.gather(*sink_tasks, return_exceptions=True)
    return engine


async def _close_sinks(sinks: Sequence) -> None:
    for s in sinks:
        close = getattr(s, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:  # one sink failing to close must not keep the others open
                log.exception("closing %s failed", type(s).__name__)
