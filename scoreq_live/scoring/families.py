"""Model families: how windows become a model's inputs, and its raw outputs named scores.

A family is what the rest of the monitor knows of a kind of model:

- :meth:`Family.prepare` turns one window (16 kHz mono float32) into the
  model's input row: zero-padding today, a spectrogram or an STFT for the
  models to come.  Rows of one shape share a batch (:meth:`Family.batches`).
- :meth:`Family.named` turns the raw ``[N, D]`` output into named scores
  ``[N, len(names)]``; :attr:`Family.names` says their names, the first is the
  **primary** score, the one every event carries as ``mos`` (mode ``nr``) or
  ``distance`` (mode ``ref``).  Every name arrives in a score event's
  ``scores``.
- :meth:`Family.new_state` makes what a family keeps per stream between
  windows (features of the overlap, say), created when a stream starts and
  dropped when it ends; it is handed back with each of that stream's windows.
  The families here keep none.

Families are registered in :data:`FAMILIES`, keyed by the name a model spec
gives in ``family`` (else :func:`family_key` derives it from the contract):
a new kind of model is one class and one line there.
"""

from __future__ import annotations

import abc
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from scoreq_live.scoring.batching import BatchPlan
from scoreq_live.scoring.spec import ModelError, ModelSpec

if TYPE_CHECKING:
    from scoreq_live.scoring.scorer import Reference


def pad_window(window: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Zero-pad (at the end) a window to the model's input length.

    A fixed-input model gets its fixed length (longer windows keep their most
    recent samples); a variable-length model gets the next multiple of
    ``pad_multiple``, never more, so mean pooling is not diluted by silence.
    """
    n = spec.padded_length(window.size)
    if window.size == n:
        return window
    if window.size > n:
        return window[-n:]
    out = np.zeros(n, dtype=np.float32)
    out[: window.size] = window
    return out


class Family(abc.ABC):
    """One kind of model: its inputs, its named scores, its per-stream state."""

    key: ClassVar[str]
    """The name a model spec's ``family`` gives."""

    def __init__(self, spec: ModelSpec, reference: Reference | None = None) -> None:
        self.spec = spec
        self.reference = reference

    @property
    @abc.abstractmethod
    def names(self) -> tuple[str, ...]:
        """The named scores of a window, the primary one first."""

    @property
    def primary(self) -> str:
        return self.names[0]

    def new_state(self) -> Any:
        """What this family keeps for one stream between its windows (``None``: nothing)."""
        return None

    def input_length(self, window: np.ndarray) -> int:
        """The length of the model input row for this window (rows of one length share a batch)."""
        return self.spec.padded_length(window.size)

    def prepare(self, window: np.ndarray, state: Any = None) -> np.ndarray:
        """One window -> the model's input row (``state``: the stream's, from :meth:`new_state`)."""
        return pad_window(window, self.spec)

    def batches(self, windows: Sequence[np.ndarray], plan: BatchPlan | int,
                states: Sequence[Any] | None = None) -> Iterator[tuple[list[int], np.ndarray]]:
        """Model inputs for windows of any lengths: ``(indices, batch)`` runs of the plan's sizes.

        Windows whose inputs differ in length go to different runs: padding
        them to a common length would change their scores.  An ``int`` plan
        allows every power of two up to it.
        """
        if isinstance(plan, int):
            plan = BatchPlan.up_to(plan)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            groups[self.input_length(w)].append(i)
        for idx in groups.values():
            k = 0
            for size in plan.split(len(idx)):
                part = idx[k:k + size]
                k += size
                yield part, np.stack([self.prepare(windows[i], None if states is None else states[i])
                                      for i in part])

    @abc.abstractmethod
    def named(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs ``[N, D]`` -> named scores ``[N, len(names)]`` (float64, in :attr:`names` order)."""


class MosFamily(Family):
    """A model that predicts the MOS of a window: output ``[B, 1]`` (Distill-MOS, SCOREQ's nr models).

    Its input is the window zero-padded to the fixed input length, or to a
    multiple of ``pad_multiple`` for a variable-length model.
    """

    key = "mos"

    @property
    def names(self) -> tuple[str, ...]:
        return ("mos",)

    def named(self, raw: np.ndarray) -> np.ndarray:
        return raw[:, :1].astype(np.float64)


class EmbeddingFamily(Family):
    """A model that maps a window to an embedding (SCOREQ's ref models): the score is the distance to a reference.

    Scores need a :class:`~scoreq_live.scoring.scorer.Reference` of the same model; its inputs do not
    (references are embedded through the same family).
    """

    key = "embedding"

    @property
    def names(self) -> tuple[str, ...]:
        return ("distance",)

    def named(self, raw: np.ndarray) -> np.ndarray:
        if self.reference is None:  # embeddings alone (making a reference) have no score
            raise ValueError(f"model {self.spec.name!r} outputs embeddings: ref mode needs a reference")
        return self.reference.distance(raw).astype(np.float64)[:, None]


class ScoresFamily(Family):
    """A model that gives several named scores per window, ``[B, N]`` (DNSMOS: SIG, BAK, OVRL, P.808).

    The spec names the columns (``scores``) and the primary one (``primary``,
    the events' ``mos``), which comes first in :attr:`names`.  A name without
    a dot, other than the model's own, is qualified as ``MODEL.NAME``.
    """

    key = "scores"

    @property
    def _order(self) -> list[int]:
        cols = list(self.spec.scores)
        first = cols.index(self.spec.primary) if self.spec.primary is not None else 0
        return [first, *(i for i in range(len(cols)) if i != first)]

    @property
    def names(self) -> tuple[str, ...]:
        name = self.spec.name
        return tuple(n if "." in n or n == name else f"{name}.{n}" for n in (self.spec.scores[i] for i in self._order))

    def named(self, raw: np.ndarray) -> np.ndarray:
        return raw[:, self._order].astype(np.float64)


FAMILIES: dict[str, type[Family]] = {MosFamily.key: MosFamily, EmbeddingFamily.key: EmbeddingFamily,
                                     ScoresFamily.key: ScoresFamily}
"""Every model family, by the name a model spec's ``family`` gives."""


def family_key(spec: ModelSpec) -> str:
    """The family a spec names, else the one its contract implies (its output kind)."""
    return spec.family or spec.kind


def family_for(spec: ModelSpec, reference: Reference | None = None) -> Family:
    """The family that runs ``spec`` (with ``reference`` for a model scored against one)."""
    key = family_key(spec)
    cls = FAMILIES.get(key)
    if cls is None:
        raise ModelError(f"model {spec.name!r}: unknown family {key!r} (known: {sorted(FAMILIES)})")
    return cls(spec, reference)
