"""The scorer: a list of windows in, one number per window out.

The engine needs only a blocking ``score(windows)`` of a local scorer
(:class:`Scorer` over an ONNX Runtime session, or anything with that method);
a model on an inference server is a :class:`RemoteScorer`, whose batches are
awaited (``score_async``).  :mod:`scoreq_live.scoring.runner` runs either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from scoreq_live.errors import ScoreqLiveError
from scoreq_live.scoring.batching import BatchPlan
from scoreq_live.scoring.families import Family, family_for, pad_window
from scoreq_live.scoring.spec import Mode, ModelSpec
from scoreq_live.scoring.streaming import StreamCache, merge_counters

log = logging.getLogger(__name__)

__all__ = ["AsyncModel", "BackendUnavailable", "Model", "Reference", "RemoteScorer", "Scorer", "batches",
           "pad_window", "run_windows"]


class Model(Protocol):
    """Something that runs padded ``[B, L]`` batches: an ONNX session, a remote server."""

    spec: ModelSpec

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...


def batches(windows: Sequence[np.ndarray], spec: ModelSpec, plan: BatchPlan | int
            ) -> Iterator[tuple[list[int], np.ndarray]]:
    """The model inputs of ``spec``'s family for windows of any lengths, in runs of the plan's sizes."""
    return family_for(spec).batches(windows, plan)


def run_windows(model: Model, windows: Sequence[np.ndarray], plan: BatchPlan | int = 16,
                family: Family | None = None, states: Sequence[Any] | None = None) -> np.ndarray:
    """Raw model outputs ``[N, D]`` for windows of any lengths, in input order."""
    out: np.ndarray | None = None
    for idx, batch in (family or family_for(model.spec)).batches(windows, plan, states):
        y = model.run(batch)
        if out is None:
            out = np.empty((len(windows), y.shape[1]), dtype=np.float32)
        out[idx] = y
    if out is None:
        return np.zeros((0, 1), dtype=np.float32)
    return out


class Reference:
    """Embeddings of clean reference speech, and the distance of a window to them.

    A reference longer than one window is stored as one embedding per window;
    the distance of a test window is the mean of its Euclidean distances to
    them, so no single reference window (a breath, an odd phoneme) dominates.
    """

    def __init__(self, embeddings: np.ndarray, model: str, sources: Sequence[str] = ()) -> None:
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if emb.shape[0] == 0:
            raise ValueError("a reference needs at least one embedding (no speech in the reference?)")
        self.embeddings = emb
        self.model = model
        self.sources = list(sources)

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """``[B, D]`` embeddings -> ``[B]`` mean distances."""
        d = np.linalg.norm(emb[:, None, :] - self.embeddings[None, :, :], axis=-1)
        return d.mean(axis=1)


class Incremental(Protocol):
    """Exact streaming scoring (Distill-MOS): windows with their starts and their streams' feature caches."""

    def score(self, windows: Sequence[np.ndarray], starts: Sequence[int],
              caches: Sequence[StreamCache | None]) -> tuple[np.ndarray, dict]: ...


class AsyncIncremental(Incremental, Protocol):
    """The same with the model runs on an inference server."""

    async def score_async(self, windows: Sequence[np.ndarray], starts: Sequence[int],
                          caches: Sequence[StreamCache | None]) -> tuple[np.ndarray, dict]: ...

    async def probe_async(self) -> str | None:
        """``None`` when the server serves it again; why not when the server does not have it at all."""
        ...

    async def aclose(self) -> None: ...


class Scorer:
    """MOS (mode ``nr``) or distance to a reference (mode ``ref``) for each window."""

    def __init__(self, model: Model, reference: Reference | None = None, max_batch: int = 16,
                 plan: BatchPlan | None = None, incremental: Incremental | None = None) -> None:
        self.model = model
        # Exact streaming inference (Distill-MOS): each stream's CNN features are kept between its windows.
        self.incremental = incremental
        self.incremental_counts: dict[str, Any] = {"windows": 0, "incremental": 0, "recomputed": 0, "fallback": 0,
                                                   "reasons": {}}
        self.spec = model.spec
        if self.spec.kind == "embedding" and reference is None:
            raise ValueError(f"model {self.spec.name!r} outputs embeddings: ref mode needs a reference")
        if self.spec.kind != "embedding" and reference is not None:
            raise ValueError(f"model {self.spec.name!r} predicts scores: it cannot score against a reference")
        if reference is not None and reference.model != self.spec.name:
            raise ValueError(
                f"reference was embedded with {reference.model!r}, not {self.spec.name!r}"
            )
        self.reference = reference
        self.family = family_for(self.spec, reference)
        # The run sizes (see scoring/batching.py): measured at start by the monitor, else powers of two.
        self.plan = plan or BatchPlan.up_to(max_batch)

    @property
    def max_batch(self) -> int:
        """The most windows in one model run."""
        return self.plan.cap

    @property
    def mode(self) -> Mode:
        return self.spec.mode

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def names(self) -> tuple[str, ...]:
        """The named scores of a window (the family's), the primary one (``mos`` or ``distance``) first."""
        return self.family.names

    def new_state(self) -> Any:
        """What the model keeps per stream between windows (``None``: nothing): its family's, or the feature cache."""
        if self.incremental is not None:
            return StreamCache()
        return self.family.new_state()

    def embed(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None = None) -> np.ndarray:
        """Raw model outputs ``[N, D]``."""
        return run_windows(self.model, windows, self.plan, self.family, states)

    def score_named(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None = None,
                    starts: Sequence[int] | None = None) -> np.ndarray:
        """Every named score of each window, ``[N, len(names)]`` (see :attr:`names`).

        ``starts``: each window's first sample in its stream; with them (and ``states`` from
        :meth:`new_state`) an incremental scorer reuses each stream's features of the overlap.
        """
        if len(windows) == 0:
            return np.zeros((0, len(self.names)), dtype=np.float64)
        if self.incremental is not None and starts is not None and states is not None:
            mos, counts = self.incremental.score(windows, starts, states)
            merge_counters(self.incremental_counts, counts)
            return np.asarray(mos, np.float64).reshape(-1, 1)
        return self.family.named(self.embed(windows, states))

    def score(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """The primary score of each window: MOS, or distance to the reference."""
        return self.score_named(windows)[:, 0]


class AsyncModel(Model, Protocol):
    """A model on an inference server: batches are sent without blocking, many in flight at once."""

    @property
    def url(self) -> object:
        """Where the model is served (its ``str`` names it in status events)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the server answered when the model was set up (or since)."""
        ...

    async def run_async(self, batch: np.ndarray) -> np.ndarray: ...

    async def probe_async(self) -> None: ...

    async def aclose(self) -> None: ...


class RemoteScorer(Scorer):
    """A :class:`Scorer` whose model is on an inference server: batches are awaited, many in flight at once.

    The engine runs it through a :class:`~scoreq_live.scoring.runner.RemoteRunner`
    (no executor thread, requests in flight up to a limit, the server's health
    followed); its blocking :meth:`score` still serves references and ``score``.
    """

    def __init__(self, model: AsyncModel, reference: Reference | None = None, max_batch: int = 16,
                 plan: BatchPlan | None = None, incremental: AsyncIncremental | None = None) -> None:
        super().__init__(model, reference, max_batch, plan, incremental)
        self.remote: AsyncModel = model
        # The server runs the streaming split's graphs; each stream's feature cache stays here.
        self.remote_incremental = incremental

    @property
    def backend(self) -> str:
        """Where the model runs (the server's URL), for status events."""
        return str(self.remote.url)

    @property
    def connected(self) -> bool:
        """Whether the server answered at start (else the engine starts with it lost)."""
        return self.remote.connected

    async def score_named_async(self, windows: Sequence[np.ndarray], states: Sequence[Any] | None = None,
                                starts: Sequence[int] | None = None) -> np.ndarray:
        """:meth:`score_named` over the network: the runs of one call are sent together, not one after another.

        Raises :class:`BackendUnavailable` when the server cannot be reached in time.
        """
        if len(windows) == 0:
            return np.zeros((0, len(self.names)), dtype=np.float64)
        if self.remote_incremental is not None and starts is not None and states is not None:
            mos, counts = await self.remote_incremental.score_async(windows, starts, states)
            merge_counters(self.incremental_counts, counts)
            return np.asarray(mos, np.float64).reshape(-1, 1)
        parts = list(self.family.batches(windows, self.plan, states))
        outs = await asyncio.gather(*(self.remote.run_async(b) for _, b in parts))
        y = np.empty((len(windows), outs[0].shape[1]), dtype=np.float32)
        for (idx, _), o in zip(parts, outs):
            y[idx] = o
        return self.family.named(y)

    async def score_async(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """:meth:`score` over the network (the primary score of each window)."""
        return (await self.score_named_async(windows))[:, 0]

    async def probe(self) -> None:
        """Check that the server can serve again (raises :class:`BackendUnavailable` when not)."""
        await self.remote.probe_async()
        if self.remote_incremental is not None:
            absent = await self.remote_incremental.probe_async()
            if absent is not None:
                # The server came back without the streaming split: the model itself scores every window there.
                log.warning("%s: every window is scored in full there", absent)
                self.remote_incremental = self.incremental = None

    async def aclose(self) -> None:
        """Close the connection to the server."""
        await self.remote.aclose()
        if self.remote_incremental is not None:
            await self.remote_incremental.aclose()


class BackendUnavailable(ScoreqLiveError):
    """The inference server did not answer in time or the connection is lost (the windows are skipped)."""
