"""Faster variants of a model (int8, fp16), accepted only with their loss measured.

``scoreq-live models quantize NAME --int8|--fp16 --data FOLDER`` writes the
variant into the model folder next to the original, scores the same windows
of real speech with both, and keeps the variant only if it stays within the
fidelity bar (unless forced).  The variant is then a model of its own
(``NAME-int8``, ``NAME-fp16``) with the original's contract.

* ``int8``: dynamic quantisation of the weights of the chosen operators
  (onnxruntime's ``quantize_dynamic``, signed 8-bit, activations quantised
  per run).  The default is ``MatMul`` only (every Linear layer of a
  transformer), leaving convolutions, normalisation and attention softmax in
  float32: on Distill-MOS, int8 on MatMul moves scores by up to 0.02 MOS,
  int8 on MatMul and Conv by up to 1.7 (``models/fidelity/variants.json``).
* ``fp16``: weights and activations in float16 (onnxruntime's float16
  converter with its default list of operators kept in float32); input and
  output stay float32 so the model contract holds.

Fidelity is measured, never assumed.  Every file under the data paths is cut
into the monitor's windows (speech-gated); each window is scored by the
original and by the variant, one window per run, as a live stream is.

* kind ``mos``: ``max |Δ|`` and ``mean |Δ|`` are in MOS points, Pearson is
  over the windows' scores.
* kind ``embedding``: what a user sees is a distance to a reference, so the
  distances between every pair of windows stand in for window-to-reference
  distances; ``max |Δ|`` is over those distances (and the largest shift of
  one embedding is reported too).

The bar: Pearson ≥ 0.99 and ``max |Δ|`` ≤ 0.1 MOS (2.5 % of the 1–5 scale;
well under the 0.3–0.5 MOS that good predictors miss listeners by), or, for
distances, ≤ 2.5 % of the range the original's distances span on the same
data.  ``--max-delta`` / ``--min-pearson`` change it, ``--force`` keeps a
variant that misses it (its report says so).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnxruntime as ort

from scoreq_live import __version__
from scoreq_live.audio import AudioError, load_audio
from scoreq_live.core.stream import StreamConfig, speech_windows
from scoreq_live.scoring import store
from scoreq_live.scoring.download import file_digest
from scoreq_live.scoring.spec import Kind, ModelError, ModelSpec

Variant = Literal["int8", "fp16"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
DEFAULT_INT8_OPS = ("MatMul",)
MOS_MAX_DELTA = 0.1  # MOS points
DISTANCE_REL_DELTA = 0.025  # fraction of the range of the original's distances
MIN_PEARSON = 0.99
MIN_WINDOWS = 3


class FidelityError(ModelError):
    """The variant misses the fidelity bar; ``report`` holds the measurements."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Bar:
    """What a variant must keep: Pearson, and max |Δ| (absolute, or relative to the data's range of distances)."""

    min_pearson: float = MIN_PEARSON
    max_abs_delta: float | None = None
    max_rel_delta: float | None = None

    @classmethod
    def default(cls, kind: Kind, max_delta: float | None = None, min_pearson: float | None = None) -> Bar:
        p = MIN_PEARSON if min_pearson is None else min_pearson
        if max_delta is not None:
            return cls(p, max_abs_delta=max_delta)
        if kind == "mos":
            return cls(p, max_abs_delta=MOS_MAX_DELTA)
        return cls(p, max_rel_delta=DISTANCE_REL_DELTA)


def variant_tag(variant: str, ops: Sequence[str] | None = None) -> str:
    """``int8`` for the default operators, ``int8-matmul-conv`` for others; ``fp16``."""
    if variant == "int8" and ops and tuple(ops) != DEFAULT_INT8_OPS:
        return "int8-" + "-".join(re.sub(r"[^a-z0-9]", "", o.lower()) for o in ops)
    return variant


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ModelError("making a variant needs the 'onnx' package: pip install 'scoreq-live[quantize]'") from e


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """quantize_dynamic logs advice meant for static (calibrated) quantisation on the root logger; drop it."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Please consider to run pre-processing")

    root, f = logging.getLogger(), Drop()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def make_variant(src: Path, dst: Path, variant: Variant, ops: Sequence[str] | None = None) -> str:
    """Write the variant of ``src`` to ``dst``; return how it was made, in words."""
    _need_onnx()
    import onnx

    if variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ops = list(ops or DEFAULT_INT8_OPS)
        # reduce_range: 7-bit weights.  CPUs without VNNI compute u8 x s8 products with pairwise int16 sums
        # that can saturate at full 8-bit range: on an AVX2-only CPU the SCOREQ-shaped NR model drifted by
        # 0.104 MOS without it (bar: 0.1).  On an AVX-512 VNNI CPU it drifted 0.010 without, 0.003 with.
        with _without_preprocessing_advice():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops, weight_type=QuantType.QInt8,
                             reduce_range=True)
        return f"dynamic int8 (QInt8 weights, 7-bit range, per tensor) on {', '.join(ops)}"
    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
        return "float16 weights and activations, float32 input/output (onnxruntime float16 converter defaults)"
    raise ModelError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def fidelity_windows(files: Sequence[Path], config: StreamConfig, max_windows: int = 100
                     ) -> tuple[list[np.ndarray], int]:
    """The monitor's speech windows of the files, at most ``max_windows`` (spread over all files)."""
    per_file: list[list[np.ndarray]] = []
    for f in files:
        try:
            per_file.append(speech_windows(load_audio(f), config))
        except AudioError:
            continue  # a list of speech may hold a stray non-audio file; it just adds no windows
    # Round-robin over the files, so a cap keeps every file represented.
    out: list[np.ndarray] = []
    depth = 0
    while len(out) < max_windows and any(depth < len(w) for w in per_file):
        for w in per_file:
            if depth < len(w) and len(out) < max_windows:
                out.append(w[depth])
        depth += 1
    return out, sum(1 for w in per_file if w)


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    from scoreq_live.scoring.session import session_options

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def measure(spec: ModelSpec, original: Path, variant: Path, windows: Sequence[np.ndarray],
            threads: int | None = None, repeat: int = 5) -> dict[str, Any]:
    """Score the windows with both files; compare the numbers a user would see, and the time they take.

    Runs alternate between the two files window by window (and which goes
    first), so that whatever else the machine is doing slows both alike.
    Each window is one run, as a live stream is scored.
    """
    from scoreq_live.scoring.scorer import pad_window

    if len(windows) < MIN_WINDOWS:
        raise ModelError(f"only {len(windows)} speech windows in the data: give at least {MIN_WINDOWS} "
                         "(more, and more varied speech, measure better)")
    sessions = [_session(original, threads), _session(variant, threads)]
    name = spec.input_name or sessions[0].get_inputs()[0].name
    batches = [pad_window(w, spec)[None, :] for w in windows]
    native = spec.input_samples or spec.padded_length(int(round(spec.native_window_s * spec.sample_rate)))
    speech = np.concatenate(windows)
    full = pad_window(np.resize(speech, native) if speech.size < native else speech[:native], spec)[None, :]
    for sess in sessions:  # warm-up: first-run allocations are no window's cost
        sess.run(None, {name: batches[0]})
        sess.run(None, {name: full})
    outs: list[list[np.ndarray]] = [[], []]
    total = [0.0, 0.0]
    for i, b in enumerate(batches):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            outs[k].append(sessions[k].run(None, {name: b})[0][0])
            total[k] += time.perf_counter() - t0
    native_times: list[list[float]] = [[], []]
    for i in range(repeat):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[k].run(None, {name: full})
            native_times[k].append(time.perf_counter() - t0)
    a, b = (np.array(o, dtype=np.float64) for o in outs)
    report: dict[str, Any] = {
        "windows": len(windows),
        "ms_per_window": {"original": round(total[0] / len(batches) * 1000, 2),
                          "variant": round(total[1] / len(batches) * 1000, 2)},
        "native_window_s": spec.native_window_s,
        "ms_per_native_window": {
            "original": round(float(np.median(native_times[0])) * 1000, 2),
            "variant": round(float(np.median(native_times[1])) * 1000, 2)},
    }
    if spec.kind == "mos":
        x, y = a[:, 0], b[:, 0]
        delta = np.abs(x - y)
        report.update(unit="MOS", compared="window scores", range=[round(float(x.min()), 5), round(float(x.max()), 5)])
    else:
        iu = np.triu_indices(len(a), k=1)
        x = np.linalg.norm(a[:, None, :] - a[None, :, :], axis=-1)[iu]
        y = np.linalg.norm(b[:, None, :] - b[None, :, :], axis=-1)[iu]
        delta = np.abs(x - y)
        report.update(unit="distance", compared=f"distances between all {x.size} pairs of windows",
                      range=[round(float(x.min()), 5), round(float(x.max()), 5)],
                      max_embedding_shift=round(float(np.linalg.norm(a - b, axis=1).max()), 6))
    report.update(max_abs_delta=round(float(delta.max()), 6), mean_abs_delta=round(float(delta.mean()), 6),
                  pearson=round(_pearson(x, y), 6))
    return report


def judge(report: dict[str, Any], bar: Bar) -> list[str]:
    """Why the variant misses the bar (empty: it passes)."""
    why = []
    lo, hi = report["range"]
    limit = bar.max_abs_delta if bar.max_abs_delta is not None else (bar.max_rel_delta or 0.0) * (hi - lo)
    report["bar"] = {"min_pearson": bar.min_pearson, "max_abs_delta": round(limit, 6)}
    if bar.max_abs_delta is None:
        report["bar"]["rule"] = f"max |delta| <= {bar.max_rel_delta:.1%} of the original's range of distances"
    if report["max_abs_delta"] > limit:
        why.append(f"max |delta| {report['max_abs_delta']:.4g} {report['unit']} > {limit:.4g}")
    p = report["pearson"]
    if math.isnan(p):
        why.append("Pearson undefined (the original gives the same number for every window: use more varied speech)")
    elif p < bar.min_pearson:
        why.append(f"Pearson {p:.4f} < {bar.min_pearson}")
    return why


def quantize(spec: ModelSpec, variant: Variant, data: Sequence[Path], config: StreamConfig,
             ops: Sequence[str] | None = None, bar: Bar | None = None, force: bool = False,
             max_windows: int = 100, threads: int | None = None, name: str | None = None,
             status: Callable[[str], None] | None = None) -> tuple[ModelSpec, dict[str, Any]]:
    """Make, measure and (if it passes, or ``force``) install a variant of an installed model.

    Returns the variant's spec and its fidelity report; raises
    :class:`FidelityError` (with the report) when it misses the bar.
    """
    say: Callable[[str], None] = status or (lambda msg: None)
    if variant not in VARIANTS:
        raise ModelError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    if spec.file is None or not Path(spec.file).is_file():
        raise ModelError(f"model {spec.name!r} is not installed (scoreq-live models pull {spec.name})")
    original = Path(spec.file)
    _need_onnx()
    bar = bar or Bar.default(spec.kind)
    tag = variant_tag(variant, ops)
    name = name or f"{spec.name}-{tag}"
    dst = store.variant_path(original, tag)
    windows, n_files = fidelity_windows(data, config, max_windows)
    if len(windows) < MIN_WINDOWS:
        raise ModelError(f"only {len(windows)} speech windows in {', '.join(map(str, data))}: give at least "
                         f"{MIN_WINDOWS} (more, and more varied speech, measure better)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with store.file_lock(dst):
        staged = dst.with_name(dst.name + ".part")
        say(f"making the {tag} variant of {spec.name}")
        try:
            method = make_variant(original, staged, variant, ops)
            store.check_contract(spec, staged)  # the variant keeps the original's contract
            say(f"scoring {len(windows)} windows of {n_files} files with both")
            report = measure(spec, original, staged, windows, threads)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        why = judge(report, bar)
        report.update(model=spec.name, variant=tag, method=method, files=n_files,
                      data=[str(p) for p in data], window_s=config.window_s, hop_s=config.hop_s,
                      size_mb={"original": round(original.stat().st_size / 1e6, 1),
                               "variant": round(staged.stat().st_size / 1e6, 1)},
                      device="cpu", threads=threads, onnxruntime=ort.__version__,
                      passed=not why, forced=bool(why) and force, date=store.now_utc())
        if why:
            report["failed"] = why
            if not force:
                staged.unlink(missing_ok=True)
                raise FidelityError(f"the {tag} variant of {spec.name} misses the fidelity bar: {'; '.join(why)}; "
                                    "it was not kept (--force keeps it anyway)", report)
        store.install(staged, dst, {
            "model": name, "name": name, "file": dst.name, "how": "quantize", "variant_of": spec.name,
            "variant": tag, "method": method, "original_sha256": store.fingerprint(original),
            "sha256": file_digest(staged, "sha256"), "fidelity": report, "installed": store.now_utc(),
            "scoreq_live": __version__,
        })
    return replace(spec, name=name, file=dst, bundled=False, url=None), report
