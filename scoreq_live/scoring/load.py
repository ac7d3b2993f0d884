"""From scoring options to a scorer ready to run: the model, its reference and the stream settings.

:func:`load_scorer` resolves the model (catalogue, ONNX file, or a stored
reference's model), opens it here or on a ``--backend`` server, builds the
reference in mode ref, and sizes the batches.  Its result is a
:class:`LoadedScorer`: what the monitor, ``score`` and ``bench`` start from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from scoreq_live.core.events import Mode, qualified
from scoreq_live.core.stream import StreamConfig
from scoreq_live.errors import ConfigError, ScoreqLiveError
from scoreq_live.files import special_kind
from scoreq_live.scoring.scorer import Reference, RemoteScorer, Scorer

if TYPE_CHECKING:
    from scoreq_live.scoring.download import Progress
    from scoreq_live.scoring.references import StoredReference
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.spec import ModelSpec
    from scoreq_live.scoring.streaming import IncrementalDistillMos
    from scoreq_live.scoring.triton import TritonIncremental, TritonModel

log = logging.getLogger(__name__)

MAX_BATCH = 16  # the largest batch the start-up measurement tries


@dataclass(frozen=True)
class ScoringOptions:
    """The model, its mode and reference, and how audio is windowed, gated and smoothed."""

    model: str | None = None  # catalogue name or ONNX path; None: the bundled default for the mode
    # More models scoring every stream (--model A --model B: B, ...), each on its own native window and hop, on
    # this machine; their named scores arrive in model_score events.  Each predicts its scores alone (mode nr).
    extra_models: Sequence[str] = ()
    model_spec: str | None = None  # TOML contract for an ONNX file
    model_kind: Literal["mos", "embedding"] | None = None
    mode: Mode | None = None  # None: what the model does
    references: Sequence[str] = ()  # clean speech files or stored reference names (mode ref)
    window_s: float | None = None  # None: the model's default window
    hop_s: float | None = None  # None: the model's hop, at most the window
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    max_batch: int | None = None  # most windows in one model run; None: measured at start (scoring/batching.py)
    min_speech: float = 0.2
    vad: int = 2
    smoothing: Literal["ema", "median"] = "ema"
    smoothing_s: float = 5.0
    # Score on an inference server: triton://HOST:8001/MODEL (gRPC) or triton+http://HOST:8000/MODEL; the
    # --model still names the contract (and, with backend_fallback "local", the model scored locally meanwhile).
    backend: str | None = None
    backend_fallback: Literal["local"] | None = None
    backend_timeout_s: float | None = None  # a request's deadline; None: see backend_timeout()
    # Distill-MOS on its native window, on this machine: compute each stream's CNN features of the overlap
    # between consecutive windows once (exact; scoring/streaming.py).  False: every window in full.
    incremental: bool = True


def backend_timeout(opts: ScoringOptions, hop_s: float, fast: bool = False) -> float:
    """A request's deadline: ``--backend-timeout``, else twice the hop (at least 1 s; 30 s with ``--fast``).

    A live window's answer is useful until the next window of its stream is
    due (the latency budget is the hop plus twice the run time), so a request
    that has taken two hops has missed it: failing it then lets the engine
    mark the backend down and probe it, instead of letting windows pile up
    behind a server that does not answer.  Files played ``--fast`` send
    larger batches and wait for every window, so they get a long deadline.
    """
    if opts.backend_timeout_s is not None:
        return opts.backend_timeout_s
    return 30.0 if fast else max(1.0, 2.0 * hop_s)


@dataclass(frozen=True)
class ExtraModel:
    """An additional model that scores every stream: its scorer and its own windowing."""

    scorer: Scorer
    stream: StreamConfig

    @property
    def name(self) -> str:
        return self.stream.model

    @property
    def names(self) -> tuple[str, ...]:
        """Its scores as events name them (``MODEL.SCORE``, or ``MODEL`` for a score named after the model)."""
        return tuple(qualified(self.name, n) for n in self.scorer.names)


@dataclass
class LoadedScorer:
    """A model session ready to score, with the stream settings that go with it.

    ``model`` is the session ``scorer`` runs: an :class:`OnnxModel` on this
    machine, or a :class:`TritonModel` on a ``--backend`` server (then
    ``fallback``, with ``--backend-fallback local``, scores on this machine
    while the server is down).
    """

    scorer: Scorer
    stream: StreamConfig
    model: OnnxModel | TritonModel
    fallback: Scorer | None = None
    extra: Sequence[ExtraModel] = ()  # the additional models, in the order given

    @property
    def mode(self) -> Mode:
        return self.stream.mode


def load_scorer(opts: ScoringOptions, progress: Progress | None = None, fast: bool = False) -> LoadedScorer:
    """The model session, its reference (mode ref) and the stream settings that go with them.

    ``progress``: called with (bytes done, total) while a published model is downloaded on first use.
    """
    # Imported here so that 'scoreq-live devices' does not pay for onnxruntime and the reference machinery.
    from scoreq_live.scoring.batching import plan_for
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.references import build_reference, combine
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.store import fingerprint
    from scoreq_live.scoring.triton import TritonModel

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
    spec = resolve_model(model_name, opts.model_spec, opts.model_kind, mode, progress=progress)
    if mode is None:
        mode = spec.mode
    if mode != spec.mode:
        what = "predicts a MOS (mode nr)" if spec.kind == "mos" else "outputs embeddings (mode ref)"
        raise ConfigError(f"model {spec.name!r} {what}; it cannot run in mode {mode!r}")
    if mode == "ref" and not opts.references:
        raise ConfigError("--mode ref needs --reference CLEAN.wav (clean speech to compare against)")
    if mode == "nr" and opts.references:
        raise ConfigError("--reference is only used with --mode ref")
    local: OnnxModel | None = None
    model: OnnxModel | TritonModel
    if opts.backend:
        model, local = _remote_model(spec, opts, fast)
    else:
        model = local = OnnxModel(spec, device=opts.device, threads=opts.threads)
    spec = model.spec
    window_s, hop_s = spec.windowing(opts.window_s, opts.hop_s)
    if isinstance(model, TritonModel) and opts.backend_timeout_s is None:
        model.timeout_s = backend_timeout(opts, hop_s, fast)
    config = StreamConfig(window_s=window_s, hop_s=hop_s, min_speech=opts.min_speech,
                          vad_aggressiveness=opts.vad, smoothing=opts.smoothing,
                          smoothing_s=opts.smoothing_s, model=spec.name, mode=mode)
    reference = None
    if mode == "ref":
        parts: list[Reference] = []
        for r in stored:
            assert spec.file is not None  # a loaded model has a file
            r.check_model(spec.name, fingerprint(spec.file), model.output_dim)
            parts.append(r.to_reference())
            if (r.window_s, r.hop_s) != (config.window_s, config.hop_s):
                log.warning("reference %r was windowed at %gs/%gs, the monitor uses %gs/%gs",
                            r.name, r.window_s, r.hop_s, config.window_s, config.hop_s)
        if files:
            try:
                # Embedded before the loop starts: locally when the model is here too, else through the backend.
                parts.append(build_reference(local or model, files, config))
            except ScoreqLiveError as e:
                raise ConfigError(f"cannot build the reference: {e}") from e
        reference = combine(parts, spec.name)
    extra = load_extra(opts, config, progress)
    if isinstance(model, TritonModel):
        loaded = _remote_scorer(model, local, reference, config, opts)
        loaded.extra = extra
        return loaded
    # Batch sizes measured on this machine (or --max-batch), every shape warmed before the first live window.
    plan = plan_for(model, spec.padded_length(round(config.window_s * spec.sample_rate)),
                    opts.max_batch or MAX_BATCH, given=opts.max_batch)
    log.info("%s", plan.describe())
    incremental = _incremental(spec, model, config, opts, plan.cap)
    return LoadedScorer(Scorer(model, reference, plan=plan, incremental=incremental), config, model, extra=extra)


INCREMENTAL_MODELS = {"distillmos"}  # models with a streaming split (their CNN and head graphs are bundled)


def _incremental(spec: ModelSpec, model: OnnxModel, config: StreamConfig, opts: ScoringOptions,
                 max_batch: int) -> IncrementalDistillMos | None:
    """Exact streaming inference for Distill-MOS on its native window, unless ``--no-incremental``."""
    from scoreq_live.scoring.session import session_options
    from scoreq_live.scoring.streaming import IncrementalDistillMos

    if not opts.incremental or spec.name not in INCREMENTAL_MODELS or spec.file is None:
        return None
    if spec.input_samples is None or round(config.window_s * spec.sample_rate) != spec.input_samples:
        log.info("incremental scoring needs %s's native window (%gs): every window is scored in full", spec.name,
                 spec.native_window_s)
        return None
    import onnxruntime as ort

    folder = spec.file.parent
    files = [folder / f"{spec.name}-cnn.onnx", folder / f"{spec.name}-head.onnx"]
    if not all(f.is_file() for f in files):
        return None
    providers = model.session.get_providers()
    cnn, head = (ort.InferenceSession(str(f), sess_options=session_options(opts.threads), providers=providers)
                 for f in files)
    return IncrementalDistillMos(model.session, cnn, head, max_batch=max_batch)


def load_extra(opts: ScoringOptions, first: StreamConfig, progress: Progress | None = None) -> list[ExtraModel]:
    """The additional models (``opts.extra_models``), each opened on this machine with its own window and hop.

    Each takes the first model's gate and smoothing settings and its model's
    default window and hop (``--window``/``--hop`` are the first model's).  A
    model that needs a reference, or one named twice, is refused.
    """
    from scoreq_live.scoring.batching import plan_for
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.session import OnnxModel

    out: list[ExtraModel] = []
    seen = {first.model}
    for name in opts.extra_models:
        if name.endswith(".toml"):  # a model contract (its file named inside)
            spec = resolve_model(None, name, None, None, progress=progress)
        else:
            spec = resolve_model(name, None, None, None, progress=progress)
        if spec.mode != "nr":
            raise ConfigError(f"--model {name}: an additional model must score windows by itself (mode nr); "
                              f"{spec.name!r} outputs embeddings and needs a reference")
        if spec.name in seen:
            raise ConfigError(f"--model {name}: model {spec.name!r} is given twice")
        seen.add(spec.name)
        model = OnnxModel(spec, device=opts.device, threads=opts.threads)
        spec = model.spec
        window_s, hop_s = spec.windowing()
        config = StreamConfig(window_s=window_s, hop_s=hop_s, min_speech=opts.min_speech,
                              vad_aggressiveness=opts.vad, smoothing=opts.smoothing,
                              smoothing_s=opts.smoothing_s, model=spec.name, mode="nr")
        plan = plan_for(model, spec.padded_length(round(window_s * spec.sample_rate)),
                        opts.max_batch or MAX_BATCH, given=opts.max_batch)
        log.info("%s: %s", spec.name, plan.describe())
        out.append(ExtraModel(Scorer(model, plan=plan), config))
    return out


def _remote_model(spec: ModelSpec, opts: ScoringOptions, fast: bool) -> tuple[TritonModel, OnnxModel | None]:
    """The model on the ``--backend`` server, checked against the contract, and the local one for a fallback."""
    from scoreq_live.scoring.scorer import BackendUnavailable
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.triton import TritonModel, parse_backend

    if opts.backend_fallback not in (None, "local"):
        raise ConfigError(f"--backend-fallback {opts.backend_fallback!r}: the only fallback is 'local'")
    if opts.backend_timeout_s is not None and not (opts.backend_timeout_s > 0 and math.isfinite(
            opts.backend_timeout_s)):
        raise ConfigError(f"--backend-timeout must be a positive number of seconds (got {opts.backend_timeout_s:g})")
    url = parse_backend(opts.backend or "")
    local = OnnxModel(spec, device=opts.device, threads=opts.threads) if opts.backend_fallback else None
    # A provisional deadline for the checks at start; load_scorer sets the one that follows the hop.
    remote = TritonModel(local.spec if local else spec, url, backend_timeout(opts, spec.hop_s, fast), connect=False)
    try:
        remote.connect()
    except BackendUnavailable as e:
        if local is None:
            raise ConfigError(f"{e} (give --backend-fallback local to score locally until it answers)") from None
        # The fallback scores meanwhile; the engine probes the server and checks the contract when it answers.
        log.warning("%s: scoring locally until it answers", e)
    return remote, local


def _remote_scorer(model: TritonModel, local: OnnxModel | None, reference: Reference | None, config: StreamConfig,
                   opts: ScoringOptions) -> LoadedScorer:
    """Scorers for a backend: no batch sizes to measure here (the server's batcher merges requests)."""
    from scoreq_live.scoring.batching import BatchPlan

    cap = opts.max_batch or MAX_BATCH
    incremental = _remote_incremental(model, config, opts)
    fallback = None
    if local is not None:
        # The fallback keeps the same feature caches going while the server is lost.
        local_incremental = _incremental(local.spec, local, config, opts, cap) if incremental else None
        fallback = Scorer(local, reference, plan=BatchPlan.up_to(cap), incremental=local_incremental)
    scorer = RemoteScorer(model, reference, plan=BatchPlan.up_to(cap), incremental=incremental)
    return LoadedScorer(scorer, config, model, fallback)


def _remote_incremental(model: TritonModel, config: StreamConfig, opts: ScoringOptions) -> TritonIncremental | None:
    """Exact streaming inference on the server (``NAME-cnn`` and ``NAME-head`` beside ``NAME``), when it has them."""
    from scoreq_live.scoring.spec import ModelError
    from scoreq_live.scoring.triton import TritonIncremental

    spec = model.spec
    if not opts.incremental or spec.name not in INCREMENTAL_MODELS:
        return None
    if spec.input_samples is None or round(config.window_s * spec.sample_rate) != spec.input_samples:
        log.info("incremental scoring needs %s's native window (%gs): every window is scored in full", spec.name,
                 spec.native_window_s)
        return None
    try:
        # A server not reachable at start (scoring locally meanwhile) is checked for them when it answers.
        return TritonIncremental.beside(model, connect=model.connected)
    except ModelError as e:
        log.warning("%s: every window is scored in full there ('scoreq-live models triton-repo' writes the "
                    "streaming graphs beside %s)", e, spec.name)
        return None


def _split_references(refs: Sequence[str]) -> tuple[list[str], list[StoredReference]]:
    """``--reference`` values: audio files (an existing path wins) and stored references by name."""
    from scoreq_live.scoring.references import ReferenceStore

    files: list[str] = []
    stored: list[StoredReference] = []
    store = None
    for r in refs:
        if Path(r).is_file():
            files.append(r)
            continue
        kind = special_kind(r)
        if kind is not None:
            raise ConfigError(f"--reference {r} is {kind}, not a regular file; give an audio file of clean "
                              "speech or a stored reference's name")
        store = store or ReferenceStore()
        if not store.exists(r):
            raise ConfigError(f"--reference {r}: no such file or stored reference (see 'scoreq-live reference list')")
        stored.append(store.get(r))
    return files, stored
