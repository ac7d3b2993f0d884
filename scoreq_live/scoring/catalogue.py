"""Known models, and turning ``--model NAME|PATH`` into a :class:`ModelSpec`.

Three sources make the catalogue: the models bundled with the package,
SCOREQ's four published models (downloaded on demand into the model store,
see :mod:`scoreq_live.scoring.store`), and the variants (int8, fp16) made
from any of them with ``scoreq-live models quantize``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import onnxruntime as ort

from scoreq_live.scoring import store
from scoreq_live.scoring.download import Progress
from scoreq_live.scoring.spec import Kind, Mode, ModelError, ModelSpec, load_spec_file
from scoreq_live.scoring.store import PublishedFile

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

SPEECHMOS_LICENCE = "MIT (Microsoft Corporation), from the speechmos 0.0.1.1 wheel"
_DNSMOS_USE = ("ITU-T P.835 split of quality: speech distortion (SIG), background noise (BAK), overall (OVRL), "
               "and a P.808 MOS")


def _diagnostic(name: str, file: str, scores: tuple[str, ...], primary: str, samples: int, hop_s: float,
                description: str) -> ModelSpec:
    """A bundled diagnostic model: several named scores (or one named after it) per window, from raw audio."""
    return ModelSpec(name=name, file=BUNDLED_DIR / file, kind="scores", input_name="audio",
                     output_name="scores" if len(scores) > 1 else scores[0], native_window_s=samples / 16000,
                     input_samples=samples, hop_s=hop_s, licence=SPEECHMOS_LICENCE, domain="natural",
                     description=description, bundled=True, output_dim=len(scores), scores=scores, primary=primary)


BUNDLED.update({
    "dnsmos": _diagnostic(
        "dnsmos", "dnsmos.onnx", ("dnsmos.sig", "dnsmos.bak", "dnsmos.ovrl", "dnsmos.p808"), "dnsmos.ovrl",
        144_160, 3.0, f"DNSMOS (Microsoft): {_DNSMOS_USE}; 9.01 s windows"),
    "dnsmos-personalized": _diagnostic(
        "dnsmos-personalized", "dnsmos-personalized.onnx",
        ("pdnsmos.sig", "pdnsmos.bak", "pdnsmos.ovrl", "pdnsmos.p808"), "pdnsmos.ovrl", 144_160, 3.0,
        f"personalized DNSMOS (Microsoft): {_DNSMOS_USE}, for the primary talker (interfering talkers count "
        "as distortion); 9.01 s windows"),
    "plcmos": _diagnostic(
        "plcmos", "plcmos.onnx", ("plcmos",), "plcmos", 160_000, 2.0,
        "PLCMOS v2 (Microsoft): how well packet-loss concealment hides lost audio, 1-5; 10 s windows"),
})

DEFAULT_MODEL = "distillmos"
DEFAULT_REF_MODEL = "distillmos-embedding"

# SCOREQ (Ragano, Skoglund, Hines, NeurIPS 2024): the ONNX exports its `scoreq` package
# downloads, Zenodo record 15739280. `scoreq --data_domain natural` is the "telephone" file.
SCOREQ_RECORD = "15739280"
SCOREQ_LICENCE = "CC BY 4.0 weights (Zenodo 15739280), MIT code"
SCOREQ_SIZE = 378_000_000
ENV_OFFLINE = "SCOREQ_LIVE_OFFLINE"

_SCOREQ: dict[str, tuple[str, Mode, str]] = {  # name: (domain, mode, file in the record)
    "scoreq-natural-nr": ("natural", "nr", "adapt_nr_telephone.onnx"),
    "scoreq-natural-ref": ("natural", "ref", "fixed_nmr_telephone.onnx"),
    "scoreq-synthetic-nr": ("synthetic", "nr", "adapt_nr_synthetic.onnx"),
    "scoreq-synthetic-ref": ("synthetic", "ref", "fixed_nmr_synthetic.onnx"),
}
_SCOREQ_USE = {
    "natural": "recorded human speech: codecs, VoIP, telephony, speech enhancement, restoration",
    "synthetic": "machine-made speech: TTS, voice conversion, generative speech models",
}

PUBLISHED: dict[str, PublishedFile] = {
    name: PublishedFile(SCOREQ_RECORD, key, SCOREQ_SIZE) for name, (_, _, key) in _SCOREQ.items()
}


def scoreq_spec(name: str) -> ModelSpec:
    """The contract of one of SCOREQ's published ONNX files, at its place in the model store.

    ``audio_input`` [batch, samples] float32 at 16 kHz, zero-padded at the
    end to a multiple of 320 (as scoreq's ``dynamic_pad``); ``mos_output``
    [batch, 1] MOS (nr) or [batch, 768] L2-normalised embedding (ref).
    Trained on segments up to 4 s: 4 s windows, 1 s hop, shorter windows
    scored at their own length.
    """
    domain, mode, key = _SCOREQ[name]
    what = "MOS 1-5, no reference" if mode == "nr" else "768-d embedding; distance to clean speech (lower is better)"
    return ModelSpec(
        name=name, file=store.models_dir() / key, kind="mos" if mode == "nr" else "embedding",
        input_name="audio_input", output_name="mos_output", native_window_s=4.0, pad_multiple=320,
        hop_s=1.0, licence=SCOREQ_LICENCE, domain=domain,
        description=f"SCOREQ {domain} {mode} ({key}): {what}; for {_SCOREQ_USE[domain]}",
        url=PUBLISHED[name].page_url, output_dim=1 if mode == "nr" else 768, l2_normalised=mode == "ref",
    )


def _variants(base: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    out: dict[str, ModelSpec] = {}
    for path, m in store.installed_variants():
        original = base.get(m["variant_of"])
        if original is None or not m.get("name"):
            continue
        fid = m.get("fidelity") or {}
        note = ""
        if fid:
            note = (f"; fidelity on {fid.get('windows')} windows: max |delta| {fid.get('max_abs_delta'):.4g} "
                    f"{fid.get('unit', '')}, Pearson {fid.get('pearson'):.4f}"
                    + (" (below the bar, forced)" if not fid.get("passed") else ""))
        what = f"{m.get('variant')} variant of {original.name} ({m.get('method', '')}){note}"
        out[m["name"]] = replace(original, name=m["name"], file=path, bundled=False, url=None, description=what)
    return out


def known_models() -> dict[str, ModelSpec]:
    """Every model by name: bundled, SCOREQ's published four, and installed variants of any of them."""
    models = dict(BUNDLED)
    models.update({name: scoreq_spec(name) for name in _SCOREQ})
    models.update(_variants(models))
    return models


def published_file(name: str) -> PublishedFile | None:
    """Where a catalogue model can be downloaded from, if it can."""
    return PUBLISHED.get(name)


def is_available(spec: ModelSpec) -> bool:
    """The model's file is usable now: bundled, or installed in the store with its manifest."""
    if spec.file is None:
        return False
    return spec.file.is_file() if spec.bundled else store.is_installed(spec.file)


def pull_model(name: str, mirror: str | None = None, progress: Progress | None = None, force: bool = False,
               retries: int = 3) -> ModelSpec:
    """Download a catalogue model into the store (see :func:`scoreq_live.scoring.store.pull`)."""
    spec = known_models().get(name)
    published = published_file(name)
    if spec is None or published is None:
        names = ", ".join(sorted(PUBLISHED))
        raise ModelError(f"{name!r} is not a downloadable model (those are: {names})")
    store.pull(spec, published, mirror=mirror, progress=progress, force=force, retries=retries)
    return spec


def import_model(name: str, file: str | Path, md5: str | None = None, mirror: str | None = None,
                 progress: Progress | None = None) -> ModelSpec:
    """Register a file fetched elsewhere as a catalogue model, verified as a download would be."""
    spec = known_models().get(name)
    published = published_file(name)
    if spec is None or published is None:
        names = ", ".join(sorted(PUBLISHED))
        raise ModelError(f"{name!r} cannot be imported: not one of the published models ({names})")
    store.import_file(spec, published, Path(file), md5=md5, mirror=mirror, progress=progress)
    return spec


def _offline_message(spec: ModelSpec, published: PublishedFile, why: str) -> str:
    return (f"model {spec.name!r} is not installed and {why}; fetch {published.page_url} elsewhere and "
            f"register it with: scoreq-live models import {spec.name} {published.key}")


def _infer_kind(path: Path) -> Kind:
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{path} is not a loadable ONNX model: {e}") from e
    shape = sess.get_outputs()[0].shape
    return "mos" if len(shape) == 2 and shape[1] == 1 else "embedding"


def resolve_model(model: str | None, spec_file: str | None = None, kind: Kind | None = None,
                  mode: Mode | None = None, download: bool = True, progress: Progress | None = None) -> ModelSpec:
    """Find the spec for ``--model`` (a catalogue name or an ONNX path).

    With no model, the bundled default for the mode is used.  A published
    model that is not installed yet is downloaded first (unless ``download``
    is false or ``SCOREQ_LIVE_OFFLINE`` is set); when that fails the error
    says where to fetch the file and how to import it.  An ONNX path
    without a spec file gets its spec from the file itself: input and output
    names, fixed or variable length, and (unless ``kind`` says) ``mos`` when
    the output is ``[batch, 1]``.  ``progress`` is called with (bytes done, bytes total) during such a
    download; without one, nothing is shown (the command line passes a progress bar).
    """
    if spec_file and not model:
        return load_spec_file(spec_file)
    if not model:
        model = DEFAULT_REF_MODEL if mode == "ref" else DEFAULT_MODEL
    catalogue = known_models()
    if model in catalogue and not spec_file:
        spec = catalogue[model]
        if is_available(spec):
            return spec
        published = published_file(model)
        if published is None:
            raise ModelError(f"model {model!r} is not installed (expected at {spec.file})")
        if not download or os.environ.get(ENV_OFFLINE):
            raise ModelError(_offline_message(spec, published, "downloads are switched off"))
        try:
            store.pull(spec, published, progress=progress)
        except ModelError as e:
            reason = e.reason if isinstance(e, store.PullError) else str(e)
            raise ModelError(_offline_message(spec, published, f"could not be downloaded: {reason}")) from e
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
