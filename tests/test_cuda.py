"""The CUDA path, on a machine with an NVIDIA GPU: the same scores as the CPU, IO binding buffers kept per shape,
and the bench on the GPU.

Skipped where onnxruntime has no CUDA provider or there is no NVIDIA driver (CI has no GPU): these are the
tests to run when a GPU machine is at hand, with ``pip install -e '.[gpu,test]'``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from scoreq_live.scoring.catalogue import resolve_model
from scoreq_live.scoring.scorer import Scorer
from scoreq_live.scoring.session import OnnxModel, _cuda_driver
from tests.helpers import EXAMPLES, speech_16k

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers() or not _cuda_driver(),
    reason="no CUDA provider or no NVIDIA driver on this machine")


@pytest.fixture(scope="module")
def windows() -> list[np.ndarray]:
    x = speech_16k(EXAMPLES / "clean.wav")
    n = int(7.68 * 16000)
    return [x[s:s + n].copy() for s in range(0, x.size - n, 16000)][:12]


@pytest.fixture(scope="module")
def cuda_model() -> OnnxModel:
    m = OnnxModel(resolve_model("distillmos"), device="cuda")
    assert m.device == "cuda" and m.provider == "CUDAExecutionProvider", m.cpu_reason
    return m


def test_cuda_scores_equal_cpu_scores(cuda_model, bundled_nr, windows):
    gpu = Scorer(cuda_model, max_batch=8).score(windows)
    cpu = Scorer(bundled_nr, max_batch=8).score(windows)
    assert np.max(np.abs(gpu - cpu)) < 2e-3, np.abs(gpu - cpu)


def test_cuda_io_binding_keeps_one_device_buffer_per_shape(cuda_model, windows):
    batch = np.stack(windows[:4])
    first = cuda_model.run(batch)
    buffers = dict(cuda_model._buffers)
    second = cuda_model.run(batch)
    assert (4, batch.shape[1]) in buffers and cuda_model._buffers[(4, batch.shape[1])] is buffers[(4, batch.shape[1])]
    x, _ = buffers[(4, batch.shape[1])]
    assert x.device_name() == "cuda"  # the batch lives on the device, not in a fresh host array per run
    np.testing.assert_array_equal(first, second)


def test_batch_sizes_measured_on_the_gpu_go_beyond_one(cuda_model):
    from scoreq_live.scoring.batching import measure

    plan = measure(cuda_model.run, int(7.68 * 16000), 16)
    assert plan.cap >= 4, plan.describe()  # a GPU spreads its launch costs over the batch


def test_bench_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "scoreq_live", "bench", "--device", "cuda", "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["device"] == "cuda" and rep["provider"] == "CUDAExecutionProvider"
    assert rep["capacity_streams"] >= 1
    print(r.stdout)


def test_incremental_distillmos_on_the_gpu_equals_the_full_model(windows):
    """The streaming split's sessions take the full model's providers: on CUDA, the same scores as in full."""
    from scoreq_live.scoring.load import ScoringOptions, load_scorer

    inc = load_scorer(ScoringOptions(device="cuda", max_batch=4))
    full = load_scorer(ScoringOptions(device="cuda", max_batch=4, incremental=False))
    assert inc.scorer.incremental is not None and full.scorer.incremental is None
    sessions = (inc.scorer.incremental.cnn, inc.scorer.incremental.head)  # type: ignore[attr-defined]
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions)
    cache = inc.scorer.new_state()
    got = np.concatenate([inc.scorer.score_named([w], [cache], [k * 16000])[:, 0] for k, w in enumerate(windows)])
    want = full.scorer.score(windows)
    assert inc.scorer.incremental_counts["incremental"] > 0
    assert np.max(np.abs(got - want)) < 5e-3, np.abs(got - want)
