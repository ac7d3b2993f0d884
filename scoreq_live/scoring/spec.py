"""The model contract: what scoreq-live needs to know to run an ONNX file.

A model takes ``[batch, samples]`` float32 audio at 16 kHz and returns one
output: ``[batch, 1]`` (kind ``mos``), ``[batch, D]`` (kind ``embedding``) or
``[batch, N]`` named scores (kind ``scores``: the spec names the N columns).
The input length is either fixed (the window is zero-padded to it) or
variable (the window is zero-padded at the end to a multiple of
``pad_multiple``).  Any file that fits runs; one that does not is refused with
a message that says what is wrong.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from scoreq_live.core.events import Mode
from scoreq_live.errors import ScoreqLiveError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]  # installed only before 3.11

__all__ = ["DEVICES", "KINDS", "Device", "Kind", "Mode", "ModelError", "ModelSpec", "load_spec_file"]

Kind = Literal["mos", "embedding", "scores"]
"""What a model outputs: a MOS per window, an embedding per window, or several named scores per window."""
Device = Literal["auto", "cpu", "cuda"]
"""Where a model runs (``auto``: CUDA when onnxruntime has a usable CUDA provider, else the CPU)."""
# Mode ("nr" | "ref": the scoring mode a model serves) is defined with the events and re-exported here.

KINDS: tuple[Kind, ...] = get_args(Kind)
DEVICES: tuple[Device, ...] = get_args(Device)


class ModelError(ScoreqLiveError):
    """A model file is missing, unreadable, or does not fit the contract."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: Path | None
    kind: Kind = "mos"
    input_name: str | None = None  # None: the model's only input
    output_name: str | None = None  # None: the model's first output
    sample_rate: int = 16_000
    native_window_s: float = 4.0  # the length the model was trained on / expects
    input_samples: int | None = None  # fixed input length, or None for variable length
    pad_multiple: int = 1  # variable-length inputs are zero-padded to a multiple of this
    window_s: float | None = None  # default monitor window (None: the native window)
    hop_s: float = 1.0
    licence: str = ""
    domain: str = ""  # natural | synthetic | ...
    description: str = ""
    url: str | None = None  # where the file can be downloaded from
    bundled: bool = False
    output_dim: int | None = None  # D of a [batch, D] output, when the contract fixes it
    l2_normalised: bool = False  # embeddings have unit Euclidean norm (SCOREQ's ref models)
    family: str | None = None  # how inputs and named scores are made (scoring/families.py); None: by kind
    # Kind "scores": the names of the output's columns, in order (MODEL.SCORE, or MODEL for a model's one score),
    # and which of them is the primary score (the events' mos; None: the first).
    scores: tuple[str, ...] = ()
    primary: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"model {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.sample_rate != 16_000:
            raise ModelError(f"model {self.name!r}: only 16 kHz models are supported")
        if self.pad_multiple < 1:
            raise ModelError(f"model {self.name!r}: pad_multiple must be >= 1")
        if self.kind == "scores":
            if not self.scores or len(set(self.scores)) != len(self.scores):
                raise ModelError(f"model {self.name!r}: kind 'scores' needs 'scores', the output columns' names")
            if self.primary is not None and self.primary not in self.scores:
                raise ModelError(f"model {self.name!r}: primary {self.primary!r} is not one of {list(self.scores)}")
            if self.output_dim is not None and self.output_dim != len(self.scores):
                raise ModelError(f"model {self.name!r}: output_dim {self.output_dim} but {len(self.scores)} scores")
        elif self.output_dim is not None and (self.output_dim < 1 or (self.kind == "mos") != (self.output_dim == 1)):
            raise ModelError(f"model {self.name!r}: output_dim {self.output_dim} does not fit kind {self.kind!r}")

    @property
    def mode(self) -> Mode:
        """The scoring mode this model serves: nr (MOS) or ref (embedding distance)."""
        return "ref" if self.kind == "embedding" else "nr"

    @property
    def default_window_s(self) -> float:
        return self.window_s if self.window_s is not None else self.native_window_s

    def windowing(self, window_s: float | None = None, hop_s: float | None = None) -> tuple[float, float]:
        """The window and hop (seconds) to cut audio with: the ones asked for, else this model's defaults.

        The one place the defaults are worked out (monitor, ``score``, references, quantize):
        the model's default window, and its hop but never longer than the window.  Raises
        :class:`ModelError` for a window the model cannot take or a hop outside ``(0, window]``.
        """
        window = window_s if window_s is not None else self.default_window_s
        hop = hop_s if hop_s is not None else min(self.hop_s, window)
        if self.input_samples and window * self.sample_rate > self.input_samples + 0.5:
            raise ModelError(f"--window {window:g}s is longer than {self.name}'s fixed input "
                             f"({self.input_samples / self.sample_rate:g}s)")
        if hop <= 0 or window <= 0 or hop > window:
            raise ModelError(f"need 0 < hop <= window (got window {window:g}s, hop {hop:g}s)")
        return window, hop

    def padded_length(self, n: int) -> int:
        """Length of the model input for a window of ``n`` samples."""
        if self.input_samples:
            return self.input_samples
        m = self.pad_multiple
        return max(m, -(-n // m) * m)

    def with_file(self, file: str | Path) -> ModelSpec:
        return replace(self, file=Path(file))


def load_spec_file(path: str | Path, model_file: str | Path | None = None) -> ModelSpec:
    """Read a model spec from a TOML file.

    Keys are the :class:`ModelSpec` field names; ``file`` is relative to the
    spec file.  ``model_file`` (from ``--model PATH``) overrides ``file``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ModelError(f"cannot read model spec {path}: {e}") from e
    known = set(ModelSpec.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ModelError(f"model spec {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if model_file is not None:
        data["file"] = Path(model_file)
    elif "file" in data:
        data["file"] = (path.parent / data["file"]).resolve()
    else:
        raise ModelError(f"model spec {path}: no 'file' and no --model PATH given")
    data.setdefault("name", Path(data["file"]).stem)
    if isinstance(data.get("scores"), list):
        data["scores"] = tuple(data["scores"])
    data.pop("bundled", None)
    try:
        return ModelSpec(**data)
    except TypeError as e:
        raise ModelError(f"model spec {path}: {e}") from e


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as a runtime describes it (an ONNX Runtime session, Triton's model metadata)."""

    name: str
    shape: tuple[object, ...]  # ints; a symbolic name, None or -1 for a free dimension
    dtype: str  # the runtime's own name for the type, for messages
    float32: bool


def _dim(d: object) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def check_contract(spec: ModelSpec, inputs: list[TensorInfo], outputs: list[TensorInfo], where: str,
                   holder: str = "the file") -> tuple[ModelSpec, int | None]:
    """Check a runtime's inputs and outputs against the contract; return the completed spec and output size.

    The one set of checks for every runtime, so a local file and a model on an
    inference server are refused with the same message.  ``where`` names the
    model in messages.  The output size is 1 for ``mos``, D (or None when the
    runtime leaves it free) for ``embedding``.  ``holder`` is what holds the model, in messages.
    """
    if spec.input_name is None:
        if len(inputs) != 1:
            raise ModelError(f"{where}: expected one input, found {[i.name for i in inputs]}")
        inp = inputs[0]
    else:
        match = [i for i in inputs if i.name == spec.input_name]
        if not match:
            raise ModelError(f"{where}: no input named {spec.input_name!r} (has {[i.name for i in inputs]})")
        inp = match[0]
    if len(inp.shape) != 2:
        raise ModelError(
            f"{where}: input {inp.name!r} must be [batch, samples], has rank {len(inp.shape)} {list(inp.shape)}")
    if not inp.float32:
        raise ModelError(f"{where}: input {inp.name!r} must be float32, is {inp.dtype}")
    if not outputs:
        raise ModelError(f"{where}: the model has no output")
    if spec.output_name is None:
        out = outputs[0]
    else:
        match = [o for o in outputs if o.name == spec.output_name]
        if not match:
            raise ModelError(f"{where}: no output named {spec.output_name!r} (has {[o.name for o in outputs]})")
        out = match[0]
    if len(out.shape) != 2:
        raise ModelError(
            f"{where}: output {out.name!r} must be [batch, n], has rank {len(out.shape)} {list(out.shape)}")
    if not out.float32:
        raise ModelError(f"{where}: output {out.name!r} must be float32, is {out.dtype}")
    dim = _dim(out.shape[1])
    if spec.kind == "mos" and dim not in (None, 1):
        raise ModelError(f"{where}: a 'mos' model must output [batch, 1], {out.name!r} is [batch, {dim}]")
    if spec.kind == "embedding" and dim == 1:
        raise ModelError(f"{where}: an 'embedding' model must output [batch, D>1], {out.name!r} is [batch, 1]")
    if spec.kind == "scores" and dim not in (None, len(spec.scores)):
        raise ModelError(f"{where}: the spec names {len(spec.scores)} scores, {out.name!r} is [batch, {dim}]")
    fixed = _dim(inp.shape[1])
    if spec.input_samples and fixed and fixed != spec.input_samples:
        raise ModelError(f"{where}: spec says {spec.input_samples} input samples, {holder} takes {fixed}")
    spec = replace(spec, input_name=inp.name, output_name=out.name, input_samples=spec.input_samples or fixed)
    if fixed and spec.native_window_s * spec.sample_rate > fixed:
        spec = replace(spec, native_window_s=fixed / spec.sample_rate)
    return spec, (1 if spec.kind == "mos" else len(spec.scores) if spec.kind == "scores" else dim)
