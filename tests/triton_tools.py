"""A real NVIDIA Triton Inference Server for the tests, from the ``nvidia-pytriton`` wheel.

PyTriton ships the ``tritonserver`` binary (Triton 2.51 in 0.7.0) with the
Python backend only, and pins ``numpy<2``, so it gets a virtual environment of
its own (made once under the repository's ignored ``build/`` folder, keyed by
its version, and reused), never the product's.  The server script below binds
ONNX files as Triton models: an onnxruntime session inside each PyTriton
callable, behind Triton's dynamic batcher, so requests from several clients
are merged into one execution just as a production model repository would.

Known requirements, all handled here: ``LD_LIBRARY_PATH`` must hold the
running Python's libpython directory, ``PYTRITON_HOME`` a writable folder, the
security config must not restrict endpoints (the statistics endpoint is read by
the tests), and the server stops cleanly on SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import ROOT, unavailable

PYTRITON = "nvidia-pytriton==0.7.0"
VENV = ROOT / "build" / "pytriton-0.7.0"
READY = VENV / ".ready"

SERVER_SCRIPT = r'''
import argparse, signal, sys
import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

p = argparse.ArgumentParser()
p.add_argument("--grpc-port", type=int, required=True)
p.add_argument("--http-port", type=int, required=True)
p.add_argument("--metrics-port", type=int, required=True)
p.add_argument("--model", action="append", default=[], help="NAME=FILE:INPUT:OUTPUT")
p.add_argument("--max-batch", type=int, default=32)
p.add_argument("--delay-us", type=int, default=20000)
a = p.parse_args()
# SIGINT stops PyTriton cleanly; a process started in the background inherits SIGINT ignored, so it is set here.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.default_int_handler)


def callable_for(file, inp, out):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # the test machine is small; many clients share it
    so.log_severity_level = 3
    sess = ort.InferenceSession(file, sess_options=so, providers=["CPUExecutionProvider"])
    # INPUT may be several names joined by "+" (a graph of a streaming split: audio+peak).
    names = inp.split("+")
    shapes = {i.name: tuple(d if isinstance(d, int) else -1 for d in i.shape[1:]) for i in sess.get_inputs()}
    o = [x for x in sess.get_outputs() if x.name == out][0]

    @batch
    def infer(**inputs):
        return {out: sess.run([out], {n: inputs[n].astype(np.float32) for n in names})[0].astype(np.float32)}

    return infer, [Tensor(name=n, dtype=np.float32, shape=shapes[n]) for n in names], \
        [Tensor(name=out, dtype=np.float32, shape=tuple(d if isinstance(d, int) else -1 for d in o.shape[1:]))]


config = TritonConfig(grpc_port=a.grpc_port, http_port=a.http_port, metrics_port=a.metrics_port,
                      grpc_address="127.0.0.1", http_address="127.0.0.1", exit_timeout_secs=2)
with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as t:
    for m in a.model:
        name, rest = m.split("=", 1)
        file, inp, out = rest.rsplit(":", 2)
        fn, inputs, outputs = callable_for(file, inp, out)
        t.bind(model_name=name, infer_func=fn, inputs=inputs, outputs=outputs,
               config=ModelConfig(max_batch_size=a.max_batch,
                                  batcher=DynamicBatcher(max_queue_delay_microseconds=a.delay_us)),
               strict=True)
    print("serving", flush=True)
    t.serve()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytriton_python() -> Path:
    """The Python of PyTriton's own virtual environment, made on first use (skips without network or cache)."""
    py = VENV / "bin" / "python"
    if READY.is_file() and py.is_file():
        return py
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", PYTRITON, "onnxruntime"], check=True,
                       capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        out = getattr(e, "stderr", b"") or b""
        unavailable(f"cannot install {PYTRITON} into its own environment: {e} {out.decode(errors='replace')[-500:]}")
    READY.write_text(PYTRITON + "\n")
    return py


@dataclass
class TritonServer:
    """A PyTriton server process on loopback ports; :meth:`start` and :meth:`stop` may be repeated."""

    # Triton name -> (ONNX file, input name (several joined by '+'), output name)
    models: dict[str, tuple[Path, str, str]]
    # PyTriton's workspace, with unix sockets in it: keep the path short (a socket path has at most 107 bytes,
    # so pytest's per-test tmp_path is too long; tmp_path_factory.mktemp("tr") is fine).
    home: Path
    max_batch: int = 32
    delay_us: int = 20_000
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def url(self, model: str, scheme: str = "triton") -> str:
        port = self.http_port if scheme == "triton+http" else self.grpc_port
        return f"{scheme}://127.0.0.1:{port}/{model}"

    def start(self, timeout: float = 120.0) -> None:
        py = pytriton_python()
        self.home.mkdir(parents=True, exist_ok=True)
        script = self.home / "serve.py"
        script.write_text(SERVER_SCRIPT)
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PYTRITON_HOME"] = str(self.home / "pytriton")
        args = [str(py), str(script), "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--metrics-port", str(self.metrics_port), "--max-batch", str(self.max_batch),
                "--delay-us", str(self.delay_us)]
        for name, (file, inp, out) in self.models.items():
            args += ["--model", f"{name}={file}:{inp}:{out}"]
        n = len(list(self.home.glob("server-*.log")))
        self.log = self.home / f"server-{n}.log"
        with self.log.open("wb") as log:
            # A session of its own: SIGINT reaches PyTriton (which stops tritonserver), not pytest.
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the Triton server exited ({self.proc.returncode}):\n{self.tail()}")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in self.models):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.3)
            raise RuntimeError(f"the Triton server was not ready within {timeout:g}s:\n{self.tail()}")
        finally:
            client.close()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (PyTriton's way to stop the server it runs), then SIGKILL for the whole group."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        try:  # anything of the group still there (a Python backend stub) goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait_ports_free()

    def _wait_ports_free(self, timeout: float = 15.0) -> None:
        """tritonserver is a child of the script: wait until it let go of the ports, so a restart can bind them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = False
            for port in (self.grpc_port, self.http_port):
                with socket.socket() as s:
                    busy = busy or s.connect_ex(("127.0.0.1", port)) == 0
            if not busy:
                return
            time.sleep(0.2)

    def batch_sizes(self, model: str) -> dict[int, int]:
        """Executions by batch size, as Triton's statistics report them (``batch_stats``)."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        try:
            stats = client.get_inference_statistics(model)
        finally:
            client.close()
        out: dict[int, int] = {}
        for m in stats.get("model_stats", []):
            for b in m.get("batch_stats", []):
                out[int(b["batch_size"])] = out.get(int(b["batch_size"]), 0) + int(b["compute_infer"]["count"])
        return out
