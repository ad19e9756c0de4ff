""":class:`ShardedIndex`: a memory bank split over Ray actors, each holding a
:class:`~knnad.index.FlatL2Index` of some of its rows, searched in parallel with an exact top-k
merge; :func:`shard_detector` makes it a fitted detector's index."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import check_int, check_number
from .._types import ArrayLike
from ..index import DEFAULT_MEMORY_BUDGET, ExactIndex, FlatL2Index, check_matrix, float32_rows
from .connection import connect, import_ray

if TYPE_CHECKING:
    from ..detector import Detector


class _Shard:
    """One shard of a :class:`ShardedIndex`, in a Ray actor: a FlatL2Index of some bank rows."""

    def __init__(self, dim: int, options: Dict[str, Any]):
        self.index = FlatL2Index(dim, **options)

    def placement(self) -> Tuple[str, str]:
        return self.index.backend, self.index.device

    def pid(self) -> int:
        return os.getpid()

    # Arrays from Ray's object store are read-only; torch wants writable ones.
    def add(self, vectors: np.ndarray) -> int:
        self.index.add(np.require(vectors, requirements="W"))
        return len(self.index)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.require(queries, requirements="W"), k)

    def search_among(self, queries: np.ndarray, k: int, ranges: List[Tuple[int, int]]
                     ) -> Tuple[np.ndarray, np.ndarray]:
        return self.index.search_among(np.require(queries, requirements="W"), k, ranges)

    def rows(self, ranges: List[Tuple[int, int]]) -> np.ndarray:
        return np.concatenate([self.index.rows(start, stop).cpu().numpy()
                               for start, stop in ranges])


class ShardedIndex(ExactIndex):
    """Exact Euclidean k-nearest-neighbour search over a bank split across Ray actors.

    Each of ``num_shards`` actors holds a :class:`~knnad.index.FlatL2Index` (faiss on CPU or
    GPU, or torch) of part of the rows; a search runs on all shards at once, each returning its
    own top k, and the lists are merged exactly: the same distances, the same neighbours and
    the same order (equal distances by ascending row) as one FlatL2Index over the whole bank,
    with the same ``backend``, ``device``, ``memory_budget`` and ``rerank``, exact ties
    included (with ``backend="torch"``, rows tied at the k-th distance may be any of them, as
    in a FlatL2Index with torch). One difference, in the search's favour: FlatL2Index keeps the
    ``k + rerank`` candidates ranked by float32 matrix products, which can leave out a
    neighbour nearer than the last one kept by less than that rounding (its ``rerank`` note);
    the merge keeps the exactly nearest ``k`` of every shard's candidates, so it may find such
    a neighbour where FlatL2Index does not.

    For banks that do not fit one worker's (or GPU's) memory. The surface
    :class:`~knnad.Detector` uses (``add``, ``search``, ``search_among``, ``rows``, ``vectors``,
    ``len``, ``dim``, ``backend``, ``device``) is FlatL2Index's, so ``detector.index_`` can be
    one (:func:`shard_detector`).

    Each :meth:`add` spreads its rows evenly over the shards (contiguous pieces; the driver
    keeps only their row numbers). A shard's actor takes ``num_cpus_per_shard`` CPUs and
    ``num_gpus_per_shard`` GPUs (``device="auto"`` then means its GPU, and the CPU with no
    GPU). The constructor waits at most ``placement_timeout`` seconds for every shard's actor
    to start (an autoscaling cluster may add nodes meanwhile); shards the cluster cannot place
    by then raise a RuntimeError naming their count, the CPUs and GPUs they ask for and those
    free, and their actors are ended. A shard's vectors live only in its actor: an actor that
    dies is not restarted and a search then raises ``ray.exceptions.RayActorError``; build the
    index again. The actors end with :meth:`close` or when the index is garbage-collected.
    """

    def __init__(self, dim: int, num_shards: int = 2, *, backend: str = "auto",
                 device: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET, rerank: int = 0,
                 num_cpus_per_shard: float = 1, num_gpus_per_shard: float = 0,
                 address: Optional[str] = None, placement_timeout: float = 60):
        self._dim = check_int(dim, "dim")
        self.num_shards = check_int(num_shards, "num_shards")
        num_cpus = check_number(num_cpus_per_shard, "num_cpus_per_shard", 0.0)
        num_gpus = check_number(num_gpus_per_shard, "num_gpus_per_shard", 0.0)
        placement_timeout = check_number(placement_timeout, "placement_timeout", 0.0, " (seconds)")
        if device == "auto" and num_gpus == 0:
            device = "cpu"  # not a GPU the actor was not given
        # Here, not at the top: the shards' actors import this module, and knnad.options brings
        # the detector's torchvision and scikit-learn (seconds of each actor's start).
        from ..options import check
        options = {"backend": check("backend", backend), "device": check("device", device),
                   "memory_budget": check_int(memory_budget, "memory_budget", 2**20),
                   "rerank": check_int(rerank, "rerank", 0)}
        ray = connect(address)
        free, total = ray.available_resources(), ray.cluster_resources()
        shard = ray.remote(_Shard).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
        self._actors = [shard.remote(self._dim, options) for _ in range(self.num_shards)]
        placed = [actor.placement.remote() for actor in self._actors]
        started = len(ray.wait(placed, num_returns=len(placed), timeout=placement_timeout)[0])
        if started < len(placed):
            self.close()
            raise RuntimeError(
                f"ShardedIndex: only {started} of num_shards={self.num_shards} shards started "
                f"within placement_timeout={placement_timeout:g} s; each asks for "
                f"num_cpus_per_shard={num_cpus:g} CPUs and num_gpus_per_shard={num_gpus:g} GPUs, "
                f"and the cluster had {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs and "
                f"{free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs free: use fewer shards "
                f"or fewer CPUs per shard (e.g. num_cpus_per_shard=0.25), free or add resources, "
                f"or wait longer (placement_timeout)")
        self._backend, self._device = ray.get(placed)[0]
        self._count = 0
        # Per shard, its pieces of the bank: first global row, first local row, rows.
        self._pieces: List[List[Tuple[int, int, int]]] = [[] for _ in self._actors]
        self._sizes = [0] * self.num_shards

    @classmethod
    def of(cls, vectors: ArrayLike, num_shards: int = 2, **options: Any) -> "ShardedIndex":
        """A new sharded index of ``vectors`` ``[n, d]``; ``options`` as for the constructor."""
        if not isinstance(vectors, (np.ndarray, torch.Tensor)) or vectors.ndim != 2:
            check_matrix(vectors, "vectors")
        index = cls(vectors.shape[1], num_shards, **options)
        index.add(vectors)
        return index

    def __repr__(self) -> str:
        return (f"ShardedIndex(dim={self._dim}, shards={self.num_shards}, "
                f"backend={self._backend!r}, device={self._device!r}, size={self._count}, "
                f"rows per shard={self._sizes})")

    def shard_sizes(self) -> List[int]:
        """Rows held by each shard."""
        return list(self._sizes)

    def shard_pids(self) -> List[int]:
        """The process id of each shard's actor."""
        self._check_open("shard_pids")
        ray = import_ray()
        return ray.get([actor.pid.remote() for actor in self._actors])

    def _check_open(self, action: str) -> None:
        if not self._actors:
            raise RuntimeError(f"{action} on a closed ShardedIndex: its shards' actors have ended; "
                               f"build a new index")

    def close(self) -> None:
        """End the shards' actors (their memory is freed); the index is then empty and unusable."""
        ray = import_ray()
        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._pieces, self._sizes, self._count = [], [], [], 0

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def add(self, vectors: ArrayLike) -> None:
        """Append ``vectors`` ``[n, dim]`` (numpy or torch, any device; converted to float32),
        split into ``num_shards`` contiguous, nearly equal pieces, one per shard."""
        self._check_open("add")
        checked = check_matrix(vectors, "vectors", self._dim)
        n = checked.shape[0]
        bounds = [n * s // self.num_shards for s in range(self.num_shards + 1)]
        ray = import_ray()
        pending = []
        for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            if stop > start:
                piece = float32_rows(checked, start, stop).cpu().numpy()
                pending.append(self._actors[shard].add.remote(piece))
                self._pieces[shard].append((self._count + start, self._sizes[shard], stop - start))
                self._sizes[shard] += stop - start
        ray.get(pending)
        self._count += n

    def _local(self, shard: int, start: int, stop: int) -> List[Tuple[int, int, int]]:
        """``(global start, local start, rows)`` of shard ``shard``'s rows within global rows
        ``start:stop``, ascending."""
        found = []
        for first, local, rows in self._pieces[shard]:
            low, high = max(start, first), min(stop, first + rows)
            if low < high:
                found.append((low, local + low - first, high - low))
        return found

    def _global(self, shard: int, local: np.ndarray) -> np.ndarray:
        """Global row numbers of shard ``shard``'s local rows ``local``."""
        pieces = np.array(self._pieces[shard], np.int64).reshape(-1, 3)
        which = np.searchsorted(pieces[:, 1], local, side="right") - 1
        return pieces[which, 0] + local - pieces[which, 1]

    def _merge(self, results: List[Tuple[int, Tuple[np.ndarray, np.ndarray]]], k: int
               ) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of the shards' top lists: by distance, equal distances by row."""
        distances = np.concatenate([d for _, (d, _) in results], axis=1)
        indices = np.concatenate([self._global(shard, i) for shard, (_, i) in results], axis=1)
        order = np.lexsort((indices, distances))[:, :k]  # by distance, then by row
        return (np.ascontiguousarray(np.take_along_axis(distances, order, 1)),
                np.ascontiguousarray(np.take_along_axis(indices, order, 1)))

    def _queries(self, queries: ArrayLike):
        checked = check_matrix(queries, "queries", self._dim)
        return import_ray().put(float32_rows(checked, 0, checked.shape[0]).cpu().numpy())

    def search(self, queries: ArrayLike, k: int, progress: bool = False
               ) -> Tuple[np.ndarray, np.ndarray]:
        """As :meth:`FlatL2Index.search`: float32 ``[m, k]`` Euclidean distances, each row
        ascending, equal distances by ascending row; int64 ``[m, k]`` row numbers. The queries
        go to every shard at once (``progress`` is accepted and ignored)."""
        self._check_open("search")
        if self._count == 0:
            raise ValueError("search on an empty index: add() normal vectors first")
        k = check_int(k, "k", 1, self._count, " (the index size)")
        ray = import_ray()
        block = self._queries(queries)
        shards = [shard for shard, size in enumerate(self._sizes) if size]
        found = ray.get([self._actors[shard].search.remote(block, min(k, self._sizes[shard]))
                         for shard in shards])
        return self._merge(list(zip(shards, found)), k)

    def search_among(self, queries: ArrayLike, k: int, ranges: Sequence[Tuple[int, int]]
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """As :meth:`FlatL2Index.search_among`: the search restricted to the global row
        ``ranges`` (ascending, disjoint ``(start, stop)`` pairs), each shard searching its part."""
        self._check_open("search_among")
        previous = 0
        for pair in ranges:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                            for v in pair)
                    and previous <= pair[0] <= pair[1] <= self._count):
                raise ValueError(f"ranges must be ascending, disjoint (start, stop) int pairs "
                                 f"within [0, {self._count}]; got {pair!r} after stop {previous}")
            previous = pair[1]
        total = sum(stop - start for start, stop in ranges)
        if total == 0:
            raise ValueError("search_among: the ranges hold no stored vectors")
        k = check_int(k, "k", 1, total, " (the rows in the ranges)")
        ray = import_ray()
        block = self._queries(queries)
        calls = []
        for shard in range(self.num_shards):
            local = [(low, low + rows) for start, stop in ranges
                     for _, low, rows in self._local(shard, int(start), int(stop))]
            rows = sum(stop - start for start, stop in local)
            if rows:
                calls.append((shard, self._actors[shard].search_among.remote(
                    block, min(k, rows), local)))
        found = ray.get([call for _, call in calls])
        return self._merge([(shard, result) for (shard, _), result in zip(calls, found)], k)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Stored vectors ``start:stop`` (``0 <= start <= stop <= len(self)``), float32
        ``[stop - start, dim]`` on the CPU (a copy)."""
        self._check_open("rows")
        start = check_int(start, "start", 0, self._count, f" (rows stored: {self._count})")
        stop = check_int(stop, "stop", start, self._count,
                         f" (from start={start} to the {self._count} rows stored)")
        ray = import_ray()
        out = np.empty((stop - start, self._dim), np.float32)
        calls = []
        for shard in range(self.num_shards):
            pieces = self._local(shard, start, stop)
            if pieces:
                calls.append((pieces, self._actors[shard].rows.remote(
                    [(local, local + rows) for _, local, rows in pieces])))
        for pieces, rows in zip([p for p, _ in calls], ray.get([c for _, c in calls])):
            offset = 0
            for first, _, count in pieces:
                out[first - start:first - start + count] = rows[offset:offset + count]
                offset += count
        return torch.from_numpy(out)

    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors, float32 ``[len(self), dim]``, in insertion order
        (gathered from the shards into this process)."""
        return self.rows(0, self._count).numpy()


#: Bank rows sent to the shards per add() by :func:`shard_detector`.
_SHARD_CHUNK = 262144


def shard_detector(detector: Detector, num_shards: int = 2, **options: Any) -> Detector:
    """Move a fitted ``detector``'s memory banks (one per scale) each into a :class:`ShardedIndex`
    of ``num_shards`` Ray actors (the bank is sent in chunks, and the local index dropped).
    ``options`` as for ShardedIndex; ``backend``, ``device`` and ``rerank`` default to the
    detector's. Predictions are unchanged (but for the near-ties of :class:`ShardedIndex`'s
    note). Returns ``detector``."""
    if not detector.is_fitted:
        raise RuntimeError("shard_detector before fit: call fit(normal_images) or "
                           "Detector.load(path) first")
    config = detector.config_
    options = {"backend": config["backend"], "device": config["device"],
               "rerank": config["rerank"], **options}
    for scale in detector.scales_:
        bank = scale.index
        sharded = ShardedIndex(bank.dim, num_shards, **options)
        for start in range(0, len(bank), _SHARD_CHUNK):
            sharded.add(bank.rows(start, min(start + _SHARD_CHUNK, len(bank))))
        scale.index = sharded
    return detector
