"""Known models, and turning ``--model NAME|PATH`` into a :class:`ModelSpec`."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from scoreq_live.scoring.spec import ModelError, ModelSpec, load_spec_file

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"

DISTILLMOS_LICENCE = "MIT (Microsoft Corporation)"

BUNDLED: dict[str, ModelSpec] = {
    "distillmos": ModelSpec(
        name="distillmos",
        file=BUNDLED_DIR / "distillmos.onnx",
        kind="mos",
        input_name="audio",
        output_name="mos",
        native_window_s=7.68,
        input_samples=122_880,
        hop_s=1.0,
        licence=DISTILLMOS_LICENCE,
        domain="natural",
        description="Distill-MOS: compact no-reference MOS (1-5) predictor, distilled from XLS-R SQA",
        bundled=True,
    ),
    "distillmos-embedding": ModelSpec(
        name="distillmos-embedding",
        file=BUNDLED_DIR / "distillmos-embedding.onnx",
        kind="embedding",
        input_name="audio",
        output_name="embedding",
        native_window_s=7.68,
        input_samples=122_880,
        hop_s=1.0,
        licence=DISTILLMOS_LICENCE,
        domain="natural",
        description=(
            "Distill-MOS's pooled feature as an embedding. NOT SCOREQ-trained: suits "
            "full-reference use (the reference is the clean version of the same speech); "
            "SCOREQ's ref models are the ones meant for non-matching references"
        ),
        bundled=True,
    ),
}

DEFAULT_MODEL = "distillmos"
DEFAULT_REF_MODEL = "distillmos-embedding"


def known_models() -> dict[str, ModelSpec]:
    return dict(BUNDLED)


def _infer_kind(path: Path) -> str:
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{path} is not a loadable ONNX model: {e}") from e
    shape = sess.get_outputs()[0].shape
    return "mos" if len(shape) == 2 and shape[1] == 1 else "embedding"


def resolve_model(model: str | None, spec_file: str | None = None, kind: str | None = None,
                  mode: str | None = None) -> ModelSpec:
    """Find the spec for ``--model`` (a catalogue name or an ONNX path).

    With no model, the bundled default for the mode is used.  An ONNX path
    without a spec file gets its spec from the file itself: input and output
    names, fixed or variable length, and (unless ``kind`` says) ``mos`` when
    the output is ``[batch, 1]``.
    """
    if spec_file and not model:
        return load_spec_file(spec_file)
    if not model:
        model = DEFAULT_REF_MODEL if mode == "ref" else DEFAULT_MODEL
    catalogue = known_models()
    if model in catalogue and not spec_file:
        spec = catalogue[model]
        if spec.file is None or not spec.file.is_file():
            raise ModelError(f"model {model!r} is not installed (expected at {spec.file})")
        return spec
    path = Path(model)
    if spec_file:
        return load_spec_file(spec_file, model_file=path)
    if not path.exists():
        names = ", ".join(sorted(catalogue))
        raise ModelError(f"unknown model {model!r}: not a file and not one of: {names}")
    if path.suffix.lower() != ".onnx" and path.is_dir():
        raise ModelError(f"{path} is a folder, not an ONNX file")
    return ModelSpec(name=path.stem, file=path.resolve(), kind=kind or _infer_kind(path), pad_multiple=320)
