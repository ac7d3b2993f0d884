"""Scoring on an NVIDIA Triton Inference Server: ``--backend triton://HOST:8001/MODEL``.

:class:`TritonModel` fits the :class:`~scoreq_live.scoring.scorer.Model`
protocol (so references, ``score`` and the monitor use it like a local
session) and adds ``run_async``: the engine keeps several requests in flight on
one channel, and Triton's dynamic batcher merges the windows of every monitor
that shares the server.  At start the model's metadata is checked against the
same contract as a local ONNX file (:func:`scoreq_live.scoring.spec.check_contract`).

A request that misses its deadline, or a server that cannot be reached, raises
:class:`~scoreq_live.scoring.scorer.BackendUnavailable`; the engine skips those
windows as ``backend_unavailable``, probes the server with backoff and resumes
when it answers.  ``triton://`` (and ``triton+grpc://``) speak gRPC,
``triton+http://`` HTTP/REST; the client library is the optional ``triton``
extra, imported only when a backend is asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.scorer import BackendUnavailable
from scoreq_live.scoring.spec import ModelError, ModelSpec, TensorInfo, check_contract
from scoreq_live.scoring.streaming import Call, StreamCache, drive, drive_async, plan_scoring

log = logging.getLogger(__name__)

TRITON_EXTRA = "pip install 'scoreq-live[triton]'"
SCHEMES: dict[str, Literal["grpc", "http"]] = {"triton": "grpc", "triton+grpc": "grpc", "triton+http": "http"}
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
# gRPC status codes of a request that the server rejected for what it held (a bad shape, a failing model): the
# windows are an error, and retrying the same request cannot help.  Every other failure (unreachable, deadline
# exceeded, model not loaded while a server restarts) is the backend being unavailable.
_REJECTED = {"StatusCode.INVALID_ARGUMENT", "StatusCode.UNIMPLEMENTED", "StatusCode.FAILED_PRECONDITION",
             "StatusCode.INTERNAL", "StatusCode.OUT_OF_RANGE", "StatusCode.PERMISSION_DENIED",
             "StatusCode.UNAUTHENTICATED", "400", "401", "403", "413", "500"}


class BackendError(ScoreqLiveError):
    """A ``--backend`` URL that cannot work (scheme, address, model name), or a missing client library."""


@dataclass(frozen=True)
class BackendURL:
    """A parsed ``triton[+grpc|+http]://HOST[:PORT]/MODEL[/VERSION]``."""

    protocol: Literal["grpc", "http"]
    host: str
    port: int
    model: str
    version: str = ""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        scheme = "triton" if self.protocol == "grpc" else "triton+http"
        return f"{scheme}://{self.address}/{self.model}" + (f"/{self.version}" if self.version else "")


def parse_backend(url: str) -> BackendURL:
    """Parse ``--backend``; a :class:`BackendError` says what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise BackendError(f"--backend {url!r}: expected triton://HOST:8001/MODEL (gRPC) or "
                           "triton+http://HOST:8000/MODEL")
    protocol = SCHEMES[scheme]
    try:
        port = parts.port or DEFAULT_PORTS[protocol]
    except ValueError:
        raise BackendError(f"--backend {url!r}: the port is not a number") from None
    if not parts.hostname:
        raise BackendError(f"--backend {url!r}: no host")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise BackendError(f"--backend {url!r}: give the model's name on the server, e.g. "
                           f"{scheme}://{parts.netloc or 'HOST'}/distillmos")
    version = path[1] if len(path) == 2 else ""
    if version and not version.isdigit():
        raise BackendError(f"--backend {url!r}: a model version is a number, not {version!r}")
    return BackendURL(protocol, parts.hostname, port, path[0], version)


def _clients(protocol: str) -> tuple[Any, Any]:
    """The blocking and the asyncio client modules for the protocol (the ``triton`` extra)."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as sync
            import tritonclient.grpc.aio as aio
        else:
            import tritonclient.http as sync
            import tritonclient.http.aio as aio
    except ImportError as e:
        raise BackendError(f"--backend needs NVIDIA's Triton client ({e.name} is missing): {TRITON_EXTRA}") from None
    return sync, aio


def _unavailable(e: BaseException) -> bool:
    """Whether a failed request means the server is unreachable or late (as opposed to rejecting the request)."""
    status = getattr(e, "status", None)
    code = str(status()) if callable(status) else ""
    return code not in _REJECTED


def _tensors(items: list[dict[str, Any]]) -> list[TensorInfo]:
    return [TensorInfo(t["name"], tuple(int(d) for d in t.get("shape", [])), str(t.get("datatype")),
                       t.get("datatype") == "FP32") for t in items]


class TritonModel:
    """A model served by Triton, checked against ``spec`` by :meth:`connect` (done on construction).

    ``timeout_s`` is every request's deadline.  The blocking client serves
    :meth:`run` (references are embedded before the event loop starts); the
    asyncio client, made on first use inside the running loop, serves
    :meth:`run_async` on one channel with any number of requests in flight.
    """

    def __init__(self, spec: ModelSpec, url: BackendURL | str, timeout_s: float = 2.0,
                 connect: bool = True) -> None:
        self.url = url if isinstance(url, BackendURL) else parse_backend(url)
        self.timeout_s = timeout_s
        self.spec = spec
        self.output_dim: int | None = spec.output_dim
        self.max_batch: int | None = None  # the server's max_batch_size (None: not known yet, or unbounded)
        self.cpu_reason: str | None = None  # what the command line prints beside a local session's device
        self.device = "triton"
        self.output_ndim = 2  # [batch, D]
        self._sync_mod, self._aio_mod = _clients(self.url.protocol)
        self._sync: Any = None
        self._aio: Any = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self.connected = False
        if connect:
            self.connect()

    def describe(self) -> str:
        return f"{self.spec.name} on Triton {self.url}"

    # -- the contract ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"model {self.url.model!r} on Triton at {self.url.address}"

    def _check(self, metadata: dict[str, Any], config: dict[str, Any]) -> None:
        spec, dim = check_contract(self.spec, _tensors(metadata.get("inputs", [])),
                                   _tensors(metadata.get("outputs", [])), self._where(), holder="the server's model")
        self.spec, self.output_dim = spec, dim or self.output_dim
        mbs = int(config.get("max_batch_size", 0) or 0)
        self.max_batch = mbs or None

    def connect(self) -> None:
        """Read the model's metadata and configuration and check them against the contract.

        Raises :class:`BackendUnavailable` when the server cannot be reached, and
        :class:`ModelError` when it has no such model or the model does not fit.
        """
        if self._sync is None:
            self._sync = self._sync_mod.InferenceServerClient(self.url.address)
        c, name, version = self._sync, self.url.model, self.url.version
        try:
            live = c.is_server_live()
        except Exception as e:
            raise BackendUnavailable(f"cannot reach Triton at {self.url.address} ({self.url.protocol}): "
                                     f"{_short(e)}") from None
        if not live:
            raise BackendUnavailable(f"Triton at {self.url.address} is not live yet")
        try:
            ready = c.is_model_ready(name, version)
        except Exception as e:
            raise BackendUnavailable(f"Triton at {self.url.address}: {_short(e)}") from None
        if not ready:
            raise ModelError(f"Triton at {self.url.address} has no ready model {name!r}"
                             + (f" version {version}" if version else "") + f"{self._known()}")
        try:
            if self.url.protocol == "grpc":
                metadata = c.get_model_metadata(name, version, as_json=True)
                config = c.get_model_config(name, version, as_json=True).get("config", {})
            else:
                metadata = c.get_model_metadata(name, version)
                config = c.get_model_config(name, version)
        except Exception as e:
            raise BackendUnavailable(f"Triton at {self.url.address}: {_short(e)}") from None
        self._check(metadata, config)
        self.connected = True

    def _known(self) -> str:
        try:
            index = self._sync.get_model_repository_index(as_json=True) if self.url.protocol == "grpc" \
                else {"models": self._sync.get_model_repository_index()}
            names = sorted({m["name"] for m in index.get("models", []) if m.get("state", "READY") == "READY"})
        except Exception:
            return ""
        return f" (ready: {', '.join(names)})" if names else ""

    # -- requests -------------------------------------------------------------------------------

    def _inputs(self, feeds: dict[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
        m = self._aio_mod if self._aio_mod is not None else self._sync_mod
        inputs = []
        for name, value in feeds.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            inp = m.InferInput(name, list(value.shape), "FP32")
            inp.set_data_from_numpy(value)
            inputs.append(inp)
        return inputs, [m.InferRequestedOutput(self._output_name)]

    @property
    def _output_name(self) -> str:
        assert self.spec.output_name is not None  # the contract check names it
        return self.spec.output_name

    def _feeds(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.ndim != 2:
            raise ValueError("batch must be [batch, samples]")
        assert self.spec.input_name is not None  # the contract check names it
        return {self.spec.input_name: batch}

    def _parts(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The inputs in runs the server accepts (its ``max_batch_size``)."""
        rows = len(next(iter(feeds.values())))
        n = self.max_batch or rows or 1
        return [{k: v[i:i + n] for k, v in feeds.items()} for i in range(0, rows, n)]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Score a ``[B, L]`` batch with the blocking client (for references built before the loop runs)."""
        return self.infer(self._feeds(batch))

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The output for these inputs (each ``[B, ...]``), with the blocking client."""
        if self._sync is None:
            self.connect()
        outs = []
        for part in self._parts(feeds):
            inputs, outputs = self._inputs(part)
            try:
                kw = {"client_timeout": self.timeout_s} if self.url.protocol == "grpc" else {}
                res = self._sync.infer(self.url.model, inputs, model_version=self.url.version, outputs=outputs,
                                       **kw)
            except Exception as e:
                raise self._failure(e) from None
            outs.append(self._output(res, len(next(iter(part.values())))))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _output(self, res: Any, n: int) -> np.ndarray:
        y = res.as_numpy(self._output_name)
        if y is None or y.ndim != self.output_ndim or y.shape[0] != n:
            raise ModelError(f"{self._where()} returned {None if y is None else y.shape} for a batch of {n}")
        return np.asarray(y, dtype=np.float32)

    def _failure(self, e: BaseException) -> Exception:
        if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
            return BackendUnavailable(f"Triton at {self.url.address}: no answer within {self.timeout_s:g}s")
        if _unavailable(e):
            return BackendUnavailable(f"Triton at {self.url.address}: {_short(e)}")
        return ModelError(f"{self._where()} rejected the request: {_short(e)}")

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio_loop is not loop:
            # One channel per monitor (per event loop), made inside the loop that uses it.
            self._aio = self._aio_mod.InferenceServerClient(self.url.address)
            self._aio_loop = loop
        return self._aio

    async def run_async(self, batch: np.ndarray) -> np.ndarray:
        """Score a ``[B, L]`` batch; many calls may be in flight at once.  Raises :class:`BackendUnavailable`."""
        return await self.infer_async(self._feeds(batch))

    async def infer_async(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The output for these inputs (each ``[B, ...]``); many calls may be in flight at once."""
        parts = self._parts(feeds)
        outs = await asyncio.gather(*(self._infer(p) for p in parts))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def _infer(self, part: dict[str, np.ndarray]) -> np.ndarray:
        client = self._client()
        inputs, outputs = self._inputs(part)
        kw = {"client_timeout": self.timeout_s} if self.url.protocol == "grpc" else {}
        try:
            # The gRPC deadline also tells the server to drop the request; wait_for bounds HTTP the same way.
            res = await asyncio.wait_for(
                client.infer(self.url.model, inputs, model_version=self.url.version, outputs=outputs, **kw),
                self.timeout_s + 0.5)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self._failure(e) from None
        return self._output(res, len(next(iter(part.values()))))

    async def probe_async(self) -> None:
        """Whether the server is back: live, the model ready, and its metadata still fits the contract."""
        client = self._client()
        name, version = self.url.model, self.url.version
        try:
            ready = await asyncio.wait_for(client.is_model_ready(name, version), self.timeout_s)
            if not ready:
                raise BackendUnavailable(f"Triton at {self.url.address}: model {name!r} is not ready")
            if self.url.protocol == "grpc":
                metadata = await asyncio.wait_for(client.get_model_metadata(name, version, as_json=True),
                                                  self.timeout_s)
                config = (await asyncio.wait_for(client.get_model_config(name, version, as_json=True),
                                                 self.timeout_s)).get("config", {})
            else:
                metadata = await asyncio.wait_for(client.get_model_metadata(name, version), self.timeout_s)
                config = await asyncio.wait_for(client.get_model_config(name, version), self.timeout_s)
        except Exception as e:
            # A fresh channel for the next probe: gRPC's own reconnect backoff grows to minutes, so a channel that
            # saw the server go could be slow to notice it is back.
            await self.aclose()
            raise e if isinstance(e, BackendUnavailable) else BackendUnavailable(str(self._failure(e))) from None
        try:
            # A server that came back with another model must not be scored against: its contract is checked again.
            self._check(metadata, config)
        except ModelError as e:
            raise BackendUnavailable(str(e)) from None
        self.connected = True

    async def aclose(self) -> None:
        """Close the asyncio channel (at the end of the run)."""
        client, self._aio, self._aio_loop = self._aio, None, None
        if client is not None:
            try:
                await client.close()
            except Exception as e:  # closing a channel to a dead server must not fail the shutdown
                log.debug("closing the Triton client: %s", e)

    def close(self) -> None:
        """Close the blocking client."""
        if self._sync is not None:
            try:
                self._sync.close()
            except Exception as e:
                log.debug("closing the Triton client: %s", e)
            self._sync = None


class TritonGraph(TritonModel):
    """A graph served beside a model, for its streaming split: named inputs and one output, checked by name.

    ``distillmos-cnn`` (``audio``, ``peak`` -> ``features`` [batch, frames, 1024]) and ``distillmos-head``
    (``features`` -> ``mos``) are not models of the monitor's contract (one audio input); what is checked is
    that the server has the graph with these inputs and that output, in float32.
    """

    def __init__(self, spec: ModelSpec, url: BackendURL, inputs: tuple[str, ...], output: str, output_ndim: int,
                 timeout_s: float = 2.0, connect: bool = True) -> None:
        self.inputs, self.output = inputs, output
        super().__init__(replace(spec, name=url.model, output_name=output), url, timeout_s, connect=False)
        self.output_ndim = output_ndim
        if connect:
            self.connect()

    def _check(self, metadata: dict[str, Any], config: dict[str, Any]) -> None:
        ins = {t.name: t for t in _tensors(metadata.get("inputs", []))}
        outs = {t.name: t for t in _tensors(metadata.get("outputs", []))}
        missing = [n for n in self.inputs if n not in ins or not ins[n].float32]
        if missing or self.output not in outs or not outs[self.output].float32:
            raise ModelError(f"{self._where()} is not the graph the monitor streams with: it needs float32 inputs "
                             f"{list(self.inputs)} and output {self.output!r} (has {sorted(ins)} -> {sorted(outs)})")
        self.max_batch = int(config.get("max_batch_size", 0) or 0) or None


class TritonIncremental:
    """Exact streaming Distill-MOS on a Triton server: the feature caches here, the model runs there.

    Each stream's :class:`~scoreq_live.scoring.streaming.StreamCache` stays on
    the monitor; the server runs ``MODEL-cnn`` on the new blocks and front
    edges, ``MODEL-head`` on the assembled windows and ``MODEL`` itself on
    short windows, the same plan as the local path
    (:func:`~scoreq_live.scoring.streaming.plan_scoring`), so the scores are
    the same.  The server keeps nothing between requests: monitors and server
    instances may come and go, and a lost server loses no cache.
    """

    def __init__(self, full: TritonModel, cnn: TritonGraph, head: TritonGraph) -> None:
        self.full, self.cnn, self.head = full, cnn, head
        # The last call in flight that uses each cache: a stream's next call waits for it (see score_async).
        self._last: dict[int, asyncio.Future[None]] = {}

    @classmethod
    def beside(cls, full: TritonModel, connect: bool = True) -> TritonIncremental:
        """The split served next to ``full``: ``NAME-cnn`` and ``NAME-head`` for ``triton://HOST/NAME``.

        Raises :class:`ModelError` when the server does not have them (``models triton-repo`` writes them).
        """
        url = full.url
        cnn = TritonGraph(full.spec, replace(url, model=f"{url.model}-cnn"), ("audio", "peak"), "features", 3,
                          full.timeout_s, connect)
        head = TritonGraph(full.spec, replace(url, model=f"{url.model}-head"), ("features",), "mos", 2,
                           full.timeout_s, connect)
        return cls(full, cnn, head)

    def _graph(self, call: Call) -> tuple[TritonModel, dict[str, np.ndarray]]:
        if call.graph == "full":
            return self.full, self.full._feeds(call.feeds["audio"])
        return (self.cnn if call.graph == "cnn" else self.head), call.feeds

    def score(self, windows: Sequence[np.ndarray], starts: Sequence[int],
              caches: Sequence[StreamCache | None]) -> tuple[np.ndarray, dict]:
        """:meth:`IncrementalDistillMos.score` with the blocking client (``score``, references)."""
        def run(call: Call) -> np.ndarray:
            model, feeds = self._graph(call)
            return model.infer(feeds)

        return drive(plan_scoring(windows, starts, caches), run)

    async def score_async(self, windows: Sequence[np.ndarray], starts: Sequence[int],
                          caches: Sequence[StreamCache | None]) -> tuple[np.ndarray, dict]:
        """The same over the asyncio channels: the independent runs of a step are in flight together."""
        async def run(call: Call) -> np.ndarray:
            model, feeds = self._graph(call)
            return await model.infer_async(feeds)

        # Calls that share a stream run in the order they came: a window planned before the previous one's
        # features are stored would still be exact (the plan keeps what the cache held) but would need a longer
        # block, or all of its CNN once it is more than 7.5 s ahead.  Calls of other streams stay in flight.
        keys = {id(c) for c in caches if c is not None}
        before = [f for f in (self._last.get(k) for k in keys) if f is not None]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for k in keys:
            self._last[k] = done
        try:
            await asyncio.gather(*before)
            return await drive_async(plan_scoring(windows, starts, caches), run)
        finally:
            done.set_result(None)
            for k in keys:
                if self._last.get(k) is done:
                    del self._last[k]

    async def probe_async(self) -> str | None:
        """Whether the server serves the split again (each graph ready, and what it should be).

        ``None`` when it does; why not when the server does not have the split at all (it is not in its
        repository: a server that came back without it), so that scoring goes on in full there.  Raises
        :class:`BackendUnavailable` while a graph is there but not ready (a server still loading it).
        """
        try:
            await self.cnn.probe_async()
            await self.head.probe_async()
        except BackendUnavailable:
            absent = await self._absent()
            if absent:
                return f"Triton at {self.full.url.address} has no {' or '.join(absent)}"
            raise
        return None

    async def _absent(self) -> list[str]:
        """The split's graphs that the server's repository does not list (none when it cannot be read)."""
        client = self.full._client()
        try:
            if self.full.url.protocol == "grpc":
                index = (await asyncio.wait_for(client.get_model_repository_index(as_json=True),
                                                self.full.timeout_s)).get("models", [])
            else:
                index = await asyncio.wait_for(client.get_model_repository_index(), self.full.timeout_s)
        except Exception as e:  # not known: treated as a graph still loading
            log.debug("reading Triton's repository index: %s", e)
            return []
        listed = {m.get("name") for m in index}
        return [g.url.model for g in (self.cnn, self.head) if g.url.model not in listed]

    async def aclose(self) -> None:
        await self.cnn.aclose()
        await self.head.aclose()

    def close(self) -> None:
        self.cnn.close()
        self.head.close()


def _short(e: BaseException) -> str:
    """An exception's message on one line, without the gRPC debug dump."""
    msg = getattr(e, "message", None)
    text = msg() if callable(msg) else str(e)
    text = " ".join(str(text).split())
    return text[:300] or type(e).__name__
