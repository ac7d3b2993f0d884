"""One ONNX Runtime session per model, checked against the model contract.

Inputs and outputs go through IO binding on every device, so the CPU path that
CI exercises is the same code as the CUDA path.  Buffers are allocated once per
batch shape and reused: on CUDA the batch is copied into a resident device
buffer and the output stays on the device until it is read, so a run does not
round-trip through fresh host allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from scoreq_live.scoring.spec import DEVICES, Device, ModelError, ModelSpec, TensorInfo, check_contract

log = logging.getLogger(__name__)


GPU_EXTRA = "pip install 'scoreq-live[gpu]'"


def _cuda_driver() -> bool:
    """Whether an NVIDIA driver is installed (its library loads): without one CUDA cannot run on any build."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


_preloaded = False


def _preload_cuda() -> None:
    """Load NVIDIA's CUDA and cuDNN libraries from their wheels (the ``gpu`` extra), once, quietly.

    onnxruntime-gpu finds them there itself only through this call (1.21+); it prints a line for each
    library it cannot find, which is what a machine without the extra has, and is not an error yet.
    """
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            preload(directory="")
        except Exception as e:  # a broken install shows when the provider is asked for
            log.debug("onnxruntime.preload_dlls: %s", e)


def _providers(device: Device) -> tuple[list[str], str | None]:
    """The providers to ask for, and why CUDA is not among them (None when it is, or was not wanted)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], None
    if device not in ("cuda", "auto"):
        raise ModelError(f"unknown device {device!r}; use one of {DEVICES}")
    if "CUDAExecutionProvider" not in available:
        why = f"this onnxruntime build has no CUDA provider (available: {', '.join(available)})"
        if device == "cuda":
            raise ModelError(f"--device cuda: {why}; install scoreq-live on Linux x86_64 or Windows, "
                             "where it comes with onnxruntime-gpu")
        return ["CPUExecutionProvider"], why
    if not _cuda_driver():
        why = "no NVIDIA driver on this machine"
        if device == "cuda":
            raise ModelError(f"--device cuda: {why}")
        return ["CPUExecutionProvider"], why
    _preload_cuda()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], None


def session_options(threads: int | None) -> ort.SessionOptions:
    """Session options chosen for a long-running monitor, not a one-shot script."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One model call at a time: all parallelism is inside operators.
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = threads or max(1, (os.cpu_count() or 2))
    # Between hops the scorer is idle; spinning threads would burn a core each
    # and steal time from audio capture for a latency gain of microseconds.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OnnxModel:
    """Runs ``[batch, samples]`` float32 batches through an ONNX file that fits :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec, device: Device = "auto", threads: int | None = None) -> None:
        if spec.file is None or not Path(spec.file).is_file():
            raise ModelError(f"model {spec.name!r}: file not found: {spec.file}")
        providers, self.cpu_reason = _providers(device)
        self.threads = threads
        try:
            if "CUDAExecutionProvider" in providers:
                # A CUDA provider that cannot load (libraries missing) falls back to CPU with a screenful of
                # onnxruntime's log; the reason is said once, below, instead.
                ort.set_default_logger_severity(4)
            self.session = ort.InferenceSession(
                str(spec.file), sess_options=session_options(threads), providers=providers
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ModelError(f"{spec.file} is not a loadable ONNX model: {e}") from e
        finally:
            ort.set_default_logger_severity(3)
        self.provider = self.session.get_providers()[0]
        if "CUDAExecutionProvider" in providers and self.provider != "CUDAExecutionProvider":
            self.cpu_reason = f"the CUDA provider could not load its CUDA/cuDNN libraries ({GPU_EXTRA} adds them)"
            if device == "cuda":
                raise ModelError(f"--device cuda: {self.cpu_reason}")
        self.device: Literal["cpu", "cuda"] = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.spec, self.output_dim = self._check_contract(spec)
        self._binding = self.session.io_binding()
        self._buffers: dict[tuple[int, int], tuple[ort.OrtValue, ort.OrtValue | None]] = {}

    def _check_contract(self, spec: ModelSpec) -> tuple[ModelSpec, int | None]:
        def info(arg: ort.NodeArg) -> TensorInfo:
            return TensorInfo(arg.name, tuple(arg.shape), arg.type, arg.type == "tensor(float)")

        return check_contract(spec, [info(i) for i in self.session.get_inputs()],
                              [info(o) for o in self.session.get_outputs()], f"model {spec.name!r} ({spec.file})")

    def describe(self) -> str:
        return f"{self.spec.name} on {self.device.upper()} ({self.provider})"

    def _buffers_for(self, batch: int, length: int) -> tuple[ort.OrtValue, ort.OrtValue | None]:
        key = (batch, length)
        if key not in self._buffers:
            dev = "cuda" if self.device == "cuda" else "cpu"
            x = ort.OrtValue.ortvalue_from_shape_and_type([batch, length], np.float32, dev, 0)
            y = None
            if self.output_dim:
                y = ort.OrtValue.ortvalue_from_shape_and_type([batch, self.output_dim], np.float32, dev, 0)
            if len(self._buffers) > 32:  # tail windows of odd lengths must not grow this forever
                self._buffers.clear()
            self._buffers[key] = (x, y)
        return self._buffers[key]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a ``[B, L]`` float32 batch (already padded); return ``[B, D]`` outputs as a host copy."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 2:
            raise ValueError("batch must be [batch, samples]")
        x, y = self._buffers_for(*batch.shape)
        x.update_inplace(batch)
        b = self._binding
        b.bind_ortvalue_input(self.spec.input_name, x)
        if y is not None:
            b.bind_ortvalue_output(self.spec.output_name, y)
        else:
            b.bind_output(self.spec.output_name, "cuda" if self.device == "cuda" else "cpu")
        self.session.run_with_iobinding(b)
        if y is not None:
            out = y.numpy().copy()
        else:
            out = b.copy_outputs_to_cpu()[0]
            self.output_dim = out.shape[1]
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        if not np.all(np.isfinite(out)):
            log.warning("model %s produced non-finite output", self.spec.name)
        return out
