"""Putting a monitor together: model + reference -> scorer, inputs -> engine, sinks on the bus."""

from __future__ import annotations

import asyncio
import logging
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


def load_scorer(opts: ScoringOptions) -> tuple[Scorer, StreamConfig, OnnxModel]:
    """The model session, its reference (ref mode) and the stream settings that go with them."""
    # Imported here so that 'scoreq-live devices' does not pay for the reference machinery.
    from scoreq_live.offline import build_reference

    mode = opts.mode
    try:
        spec = resolve_model(opts.model, opts.model_spec, opts.model_kind, mode)
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
        for r in opts.references:
            if not Path(r).is_file():
                raise ConfigError(f"--reference {r}: no such file")
        try:
            reference = build_reference(model, opts.references, config)
        except Exception as e:
            raise ConfigError(f"cannot build the reference: {e}") from e
    return Scorer(model, reference, opts.max_batch), config, model


def open_sources(opts: MonitorOptions):
    if not opts.inputs:
        raise ConfigError("no --input given")
    try:
        return open_inputs(list(opts.inputs), fast=opts.fast)
    except SourceError as e:
        raise ConfigError(str(e)) from e


async def run_monitor(opts: MonitorOptions, sinks: Sequence = (), scorer_bundle=None, sources=None) -> Engine:
    """Run the monitor until its inputs end (or ``duration``); every sink reads the same bus."""
    sources = sources if sources is not None else open_sources(opts)
    scorer, config, _ = scorer_bundle or load_scorer(opts)
    bus = EventBus()
    sink_tasks = [asyncio.create_task(s.run(bus.subscribe(name=type(s).__name__))) for s in sinks]
    engine = Engine(scorer, sources, EngineConfig(stream=config, max_batch=opts.max_batch,
                                                  batch_wait_s=opts.batch_wait_s,
                                                  max_pending=opts.max_pending, fast=opts.fast), bus)
    for s in sinks:
        attach = getattr(s, "attach", None)  # sinks that also watch the engine (metrics: batch timings)
        if attach is not None:
            attach(engine)
    loop = asyncio.get_running_loop()
    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:  # a service is stopped with SIGTERM, a person presses Ctrl-C: both end streams cleanly
            loop.add_signal_handler(sig, engine.stop)
            signals.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here
    try:
        await engine.run(duration=opts.duration)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        bus.close()
        await asyncio.gather(*sink_tasks, return_exceptions=True)
    return engine
