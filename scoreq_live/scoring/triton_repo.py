"""A Triton model repository for the catalogue models: ``scoreq-live models triton-repo DIR [NAME...]``.

Each model becomes ``DIR/NAME/config.pbtxt`` and ``DIR/NAME/1/model.onnx``,
served by Triton's ONNX Runtime backend with its dynamic batcher, so that any
number of monitors (``--backend triton://HOST:8001/NAME``) share the GPUs.
The batcher's settings come from ``scoreq-live bench --json`` run on the
serving machine when one is given (the batch sizes worth running there and
the time of a one-window run), else from :data:`DEFAULTS`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.spec import ModelSpec

# Without a bench report: sizes at which a GPU runs Distill-MOS-sized models efficiently; a 2 ms wait for
# company is small beside a 1 s hop and lets windows of many monitors meet in one execution.
DEFAULT_PREFERRED = (4, 8, 16)
DEFAULT_DELAY_US = 2000
MAX_DELAY_US = 10_000  # never hold a window longer than this for company, whatever the bench says
CLIENT_MAX_BATCH = 16  # the most windows a monitor puts in one request (its --max-batch)


def _max_batch(preferred: Sequence[int]) -> int:
    """Room for a monitor's largest request, and for twice the largest preferred batch (requests of several
    monitors merge into one execution only up to ``max_batch_size``)."""
    return max(CLIENT_MAX_BATCH, 2 * max(preferred))


class RepoError(ScoreqLiveError):
    """The repository cannot be written (an unknown or missing model, a bench report that cannot be read)."""


@dataclass(frozen=True)
class Batching:
    """Triton's batcher settings for one model."""

    max_batch_size: int
    preferred: tuple[int, ...]
    delay_us: int
    source: str  # where the numbers come from, for the config's comment

    @classmethod
    def default(cls) -> Batching:
        return cls(_max_batch(DEFAULT_PREFERRED), DEFAULT_PREFERRED, DEFAULT_DELAY_US, "defaults")

    @classmethod
    def from_bench(cls, path: Path) -> Batching:
        """From a ``scoreq-live bench --json`` report: its useful batch sizes and its one-window run time.

        The preferred sizes are the sizes the bench found worth running (each
        cheaper per window than half its size); the queue delay is half a
        one-window run (waiting longer for company costs a window more than
        running alone would), at most :data:`MAX_DELAY_US`.
        """
        try:
            report = json.loads(path.read_text())
            sizes = sorted({int(b) for b in report["batch_sizes"]})
            cost = {int(k): float(v) for k, v in (report.get("batch_ms_per_window") or {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RepoError(f"--bench {path}: not a 'scoreq-live bench --json' report ({e})") from None
        preferred = tuple(b for b in sizes if b > 1) or (1,)
        delay = round(min(cost[1] * 1000 / 2, MAX_DELAY_US)) if 1 in cost else DEFAULT_DELAY_US
        where = f"bench {path.name} ({report.get('device', '?')}, {report.get('provider', '?')})"
        return cls(_max_batch(preferred), preferred, delay, where)


def _io(spec: ModelSpec, file: Path) -> tuple[tuple[str, list[int]], tuple[str, list[int]]]:
    """(input name, dims) and (output name, dims) without the batch dimension, from the file itself."""
    from scoreq_live.scoring.session import OnnxModel

    model = OnnxModel(spec.with_file(file), device="cpu", threads=1)  # checks the contract too
    out = [o for o in model.session.get_outputs() if o.name == model.spec.output_name][0]
    dim = out.shape[1] if isinstance(out.shape[1], int) and out.shape[1] > 0 else -1
    inp_len = model.spec.input_samples or -1
    assert model.spec.input_name is not None and model.spec.output_name is not None
    return (model.spec.input_name, [inp_len]), (model.spec.output_name, [dim])


def _graph_io(file: Path) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """Every input's and output's (name, dims without the batch dimension) of a graph, read from the file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])

    def dims(shape: Sequence[object]) -> list[int]:
        return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]

    return ([(i.name, dims(i.shape)) for i in sess.get_inputs()],
            [(o.name, dims(o.shape)) for o in sess.get_outputs()])


def config_text(name: str, inputs: Sequence[tuple[str, list[int]]], outputs: Sequence[tuple[str, list[int]]],
                batching: Batching, gpus: int = 1, instances: int = 1) -> str:
    """``config.pbtxt`` for an ONNX model with the dynamic batcher (Triton's text protobuf format)."""
    def tensors(items: Sequence[tuple[str, list[int]]]) -> str:
        return ",\n".join(f"""  {{
    name: "{n}"
    data_type: TYPE_FP32
    dims: [ {", ".join(str(x) for x in d)} ]
  }}""" for n, d in items)

    if gpus > 0:
        ids = ", ".join(map(str, range(gpus)))  # `count` instances on each of these GPUs
        group = f"  {{\n    count: {instances}\n    kind: KIND_GPU\n    gpus: [ {ids} ]\n  }}"
    else:
        group = f"  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}"
    return f"""# Written by scoreq-live (models triton-repo); batcher settings from {batching.source}.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {batching.max_batch_size}
input [
{tensors(inputs)}
]
output [
{tensors(outputs)}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(map(str, batching.preferred))} ]
  max_queue_delay_microseconds: {batching.delay_us}
}}
instance_group [
{group}
]
"""


STREAMING_GRAPHS = ("cnn", "head")  # a model's streaming split, served as NAME-cnn and NAME-head beside it


def write_model(root: Path, name: str, spec: ModelSpec, source: Path, batching: Batching, gpus: int = 1,
                instances: int = 1, fp16: bool = False) -> list[Path]:
    """Write one model (and with ``fp16`` its float16 variant as ``NAME-fp16``); returns the folders written.

    A model with a streaming split (Distill-MOS: ``distillmos-cnn.onnx`` and
    ``distillmos-head.onnx`` beside its file) gets them as ``NAME-cnn`` and
    ``NAME-head``, which monitors use for exact incremental scoring.
    """
    inp, out = _io(spec, source)
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config_text(name, [inp], [out], batching, gpus, instances))
    written = [folder]
    if fp16:
        from scoreq_live.scoring.quantize import make_variant

        half = root / f"{name}-fp16"
        (half / "1").mkdir(parents=True, exist_ok=True)
        make_variant(source, half / "1" / "model.onnx", "fp16")  # float32 input and output kept
        (half / "config.pbtxt").write_text(config_text(f"{name}-fp16", [inp], [out], batching, gpus, instances))
        written.append(half)
    graphs = [source.parent / f"{spec.name}-{g}.onnx" for g in STREAMING_GRAPHS]
    if all(f.is_file() for f in graphs):
        for g, file in zip(STREAMING_GRAPHS, graphs):
            part = root / f"{name}-{g}"
            (part / "1").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, part / "1" / "model.onnx")
            ins, outs = _graph_io(file)
            (part / "config.pbtxt").write_text(config_text(f"{name}-{g}", ins, outs, batching, gpus, instances))
            written.append(part)
    return written


def default_names() -> list[str]:
    """The bundled models and every downloaded or derived one that is installed."""
    from scoreq_live.scoring.catalogue import is_available, known_models

    return [n for n, s in known_models().items() if is_available(s)]


def write_repository(root: Path, names: Sequence[str] = (), *, bench: Path | None = None, gpus: int = 1,
                     instances: int = 1, fp16: bool = False) -> list[Path]:
    """Write the models ``names`` (default: every installed catalogue model) into the repository ``root``."""
    from scoreq_live.scoring.catalogue import is_available, known_models

    if gpus < 0 or instances < 1:
        raise RepoError("--gpus must be 0 or more and --instances 1 or more")
    batching = Batching.from_bench(bench) if bench is not None else Batching.default()
    catalogue = known_models()
    out: list[Path] = []
    for name in names or default_names():
        spec = catalogue.get(name)
        if spec is None:
            raise RepoError(f"unknown model {name!r} (see 'scoreq-live models list')")
        if not is_available(spec) or spec.file is None:
            raise RepoError(f"{name} is not installed: scoreq-live models pull {name}")
        out.extend(write_model(root, name, spec, Path(spec.file), batching, gpus, instances, fp16))
    return out
