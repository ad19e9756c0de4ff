"""Exact Euclidean top-K search over a bank of vectors.

:class:`FlatL2Index` keeps the vectors in a FAISS ``IndexFlatL2`` (CPU, one GPU, or sharded over
all GPUs) or, as the reference, in a torch tensor searched with ``torch.cdist`` + ``topk``. Both
return Euclidean distances (not faiss's squared ones), each row ascending: candidates are ranked
by FAISS's (or cdist's) matrix-product distances and the winners' distances recomputed by
differences, |q − x|. Queries are converted and searched in chunks so that a search's working
memory stays within a budget whatever the number of queries.
"""
from __future__ import annotations

import abc
import logging
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import check_int
from ._types import ArrayLike, PathLike
from .archive import ModelFileError, read_archive, write_archive
from .runtime import ALL_GPUS, import_faiss, resolve_backend

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 512 * 2**20
#: Bytes alive per query/bank pair while a torch block is searched: the float32 distance block
#: and topk's working copy with its indices.
_TORCH_BYTES_PER_PAIR = 16
#: At most this many queries per FAISS call (FAISS tiles its distance computation itself).
_FAISS_MAX_QUERY_CHUNK = 16384
_FAISS_GPU_MAX_K = 2048
#: faiss's CPU search (1.15) streams the whole bank once per query below this many queries and
#: tiles queries from it on: 784 queries against 16,385 x 128 rows took 106 ms, the same queries
#: padded to 1,000 took 17 ms, with the same neighbours.
_FAISS_TILED_QUERIES = 1000
#: Pad a smaller query block to :data:`_FAISS_TILED_QUERIES` from this many queries, when the
#: bank does not fit in a core's cache (:data:`_FAISS_PADDED_BANK_BYTES`): below, padding costs
#: more than it saves.
_FAISS_PADDED_FROM = 250
_FAISS_PADDED_BANK_BYTES = 2**20
#: Rows checked for NaN/inf at a time, so that checking a large array needs no full-size mask.
_CHECK_ROWS = 65536
_FORMAT_VERSION = 1


def _nonfinite_rows(block: ArrayLike) -> int:
    if isinstance(block, np.ndarray):
        if not np.issubdtype(block.dtype, np.floating):
            return 0
        return int((~np.isfinite(block)).any(axis=1).sum())
    if not block.is_floating_point():
        return 0
    return int((~torch.isfinite(block)).any(dim=1).sum())


def check_matrix(values: ArrayLike, argument: str, dim: Optional[int] = None) -> ArrayLike:
    """``values`` unchanged once checked to be a real numeric matrix ``[n, d]`` (numpy array or
    torch tensor on any device), of dimension ``dim`` when given, without NaN or inf.

    Raises TypeError for a non-array or non-real input and ValueError for a wrong rank or
    dimension, or NaN/inf entries (saying how many rows hold them). Makes no full copy.
    """
    if isinstance(values, np.ndarray):
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_) \
                or np.iscomplexobj(values):
            raise TypeError(f"{argument} must hold real numbers, got dtype {values.dtype}")
    elif isinstance(values, torch.Tensor):
        if values.is_complex():
            raise TypeError(f"{argument} must be real, got dtype {values.dtype}")
    else:
        raise TypeError(f"{argument} must be a numpy array or torch tensor [n, d], got "
                        f"{type(values).__name__}")
    if values.ndim != 2:
        raise ValueError(f"{argument} must have rank 2 [n, d], got shape {tuple(values.shape)}")
    if dim is not None and values.shape[1] != dim:
        raise ValueError(f"{argument} has dimension {values.shape[1]}, the index has dimension "
                         f"{dim}")
    bad_rows = sum(_nonfinite_rows(values[start:start + _CHECK_ROWS])
                   for start in range(0, values.shape[0], _CHECK_ROWS))
    if bad_rows:
        raise ValueError(f"{argument} has NaN or inf in {bad_rows} of {values.shape[0]} rows; "
                         f"remove or repair those rows first")
    return values


def float32_rows(values: ArrayLike, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a matrix as a contiguous float32 tensor on its own device (no copy
    when they already are)."""
    block = values[start:stop]
    if isinstance(block, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    return block.detach().to(torch.float32).contiguous()


def as_float32_matrix(values: ArrayLike, argument: str, dim: Optional[int] = None) -> torch.Tensor:
    """:func:`check_matrix`, then all of ``values`` as a float32 tensor ``[n, d]``."""
    checked = check_matrix(values, argument, dim)
    return float32_rows(checked, 0, checked.shape[0])


def _shard_over_gpus(vectors: np.ndarray):
    """A faiss index holding ``vectors`` [n, d] sharded over every GPU faiss sees (an
    ``IndexShards`` of ``GpuIndexFlatL2``; it can be searched but not read back nor added to)."""
    faiss = import_faiss()
    cpu_index = faiss.IndexFlatL2(vectors.shape[1])
    cpu_index.add(vectors)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options)


class ExactIndex(abc.ABC):
    """What every exact index of knnad reports: its size, dimension, backend and device
    (``_count``, ``_dim``, ``_backend``, ``_device``, set by the subclass); and the searches
    and reads a detector's scale makes of its memory bank, which each subclass implements as
    :class:`FlatL2Index` documents them."""

    _count: int
    _dim: int
    _backend: str
    _device: str

    def __len__(self) -> int:
        return self._count

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def backend(self) -> str:
        """``"faiss"`` or ``"torch"``: what ``"auto"`` resolved to."""
        return self._backend

    @property
    def device(self) -> str:
        """``"cpu"``, ``"cuda:N"`` or ``"cuda:all"``, as resolved where the vectors live."""
        return self._device

    @abc.abstractmethod
    def search(self, queries: ArrayLike, k: int,
               progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored vectors of each query: ``(distances, indices)``."""

    @abc.abstractmethod
    def search_among(self, queries: ArrayLike, k: int, ranges: Sequence[Tuple[int, int]]
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`search` restricted to the stored rows in ``ranges``."""

    @abc.abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Stored vectors ``start:stop``, float32 ``[stop - start, dim]``."""

    @abc.abstractmethod
    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors, float32 ``[len(self), dim]``, in insertion order."""


class FlatL2Index(ExactIndex):
    """Exact Euclidean k-nearest-neighbour search, faiss-style ``add``/``search``.

    Parameters
    ----------
    dim
        Vector dimension (> 0).
    backend
        ``"faiss"`` (IndexFlatL2; GpuIndexFlatL2 on a CUDA device), ``"torch"``
        (``torch.cdist`` + ``topk``, the reference) or ``"auto"`` (faiss, on a GPU when faiss sees
        one; torch with a logged reason when faiss cannot serve the device).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"cuda:all"`` (faiss, sharded over
        every GPU).
    memory_budget
        Bytes that one search may use for its working memory (query chunk, distance block,
        candidates; default 512 MiB; faiss's own fixed 16 MiB distance tile comes on top): peak
        memory of :meth:`search` does not grow with the number of queries beyond its
        ``[m, k]`` outputs.
    rerank
        Extra candidates per query whose exact distances are computed before the ``k`` best
        are kept. The matrix-product form ranks candidates with a float32 error that grows
        with |x|², so two neighbours closer than that can swap; a few extra candidates repair
        such swaps (measured in ``benchmarks/bench_datasets.py``); 0 is fastest.
    """

    def __init__(self, dim: int, backend: str = "auto", device: Union[str, torch.device] = "auto",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, rerank: int = 0):
        self.rerank = check_int(rerank, "rerank", 0, hint=" (extra candidates)")
        self._dim = check_int(dim, "dim")
        self.memory_budget = check_int(memory_budget, "memory_budget", 2**20,
                                       hint=" (bytes, 1 MiB)")
        self._backend, self._device = resolve_backend(backend, device)
        self._count = 0
        if self._backend == "torch":
            self._vectors = torch.empty(0, self._dim, device=self._device)
        elif self._device == ALL_GPUS:
            # faiss's IndexShards can neither reconstruct vectors (refinement, vectors()) nor
            # take a second add(): a host copy serves the reads and rebuilds the shards.
            self._host = np.empty((0, self._dim), np.float32)
            self._faiss_index: Any = None  # faiss's IndexShards, built by add()
        else:
            self._faiss_index = self._new_faiss_index()

    @classmethod
    def of(cls, vectors: ArrayLike, **options: Any) -> "FlatL2Index":
        """A new index of ``vectors`` ``[n, d]``; ``options`` as for the constructor."""
        if not isinstance(vectors, (np.ndarray, torch.Tensor)) or vectors.ndim != 2:
            check_matrix(vectors, "vectors")  # says what is wrong; add() checks the values
        index = cls(vectors.shape[1], **options)
        index.add(vectors)
        return index

    def _new_faiss_index(self):
        faiss = import_faiss()
        cpu_index = faiss.IndexFlatL2(self._dim)
        if self._device == "cpu":
            return cpu_index
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, torch.device(self._device).index,
                                      cpu_index)

    def __repr__(self) -> str:
        return (f"FlatL2Index(dim={self._dim}, backend={self._backend!r}, "
                f"device={self._device!r}, size={self._count})")

    def add(self, vectors: ArrayLike) -> None:
        """Append ``vectors`` ``[n, dim]`` (numpy or torch, any device; converted to float32)."""
        tensor = as_float32_matrix(vectors, "vectors", self._dim)
        if self._backend == "torch":
            self._vectors = torch.cat([self._vectors, tensor.to(self._device)])
        elif self._device == ALL_GPUS:
            self._host = np.concatenate([self._host, tensor.cpu().numpy()])
            self._faiss_index = _shard_over_gpus(self._host)
        else:
            self._faiss_index.add(tensor.cpu().numpy())
        self._count += tensor.shape[0]

    def _view(self) -> Optional[torch.Tensor]:
        """All stored vectors ``[len, dim]`` without a copy, or None where faiss holds them on
        one GPU only. The view is valid until the next :meth:`add`."""
        if self._backend == "torch":
            return self._vectors
        if self._device == ALL_GPUS:
            return torch.from_numpy(self._host)
        if self._device == "cpu":
            if not self._count:
                return torch.empty(0, self._dim)
            stored = import_faiss().rev_swig_ptr(self._faiss_index.get_xb(),
                                                 self._count * self._dim)
            return torch.from_numpy(stored.reshape(self._count, self._dim))
        return None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Stored vectors ``start:stop`` as float32 ``[stop - start, dim]``: on the index's
        device for the torch backend, on the CPU for faiss. Read-only: a copy made as an
        inference tensor, so that writing to it in place raises torch's RuntimeError (outside
        ``torch.inference_mode``) and nothing written to it reaches the index; ``clone()`` it
        for a writable copy."""
        with torch.inference_mode():
            return self._rows(start, stop).clone()

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Stored vectors ``start:stop``: a view of the storage where it allows one (valid
        until the next :meth:`add`; not to be written), else a copy."""
        view = self._view()
        if view is not None:
            return view[start:stop]
        return torch.from_numpy(self._faiss_index.reconstruct_n(start, stop - start))

    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors, float32 ``[len(self), dim]``, in insertion order."""
        return self._rows(0, self._count).cpu().numpy().copy()

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored vectors at ``rows`` (int64, any shape), float32 ``[*rows.shape, dim]``."""
        view = self._view()
        if view is not None:
            return view[rows.to(view.device)]
        flat = rows.reshape(-1).numpy()
        found = torch.from_numpy(self._faiss_index.reconstruct_batch(flat))
        return found.reshape(*rows.shape, self._dim)

    def _query_chunk(self, candidates: int, bank_rows: int) -> int:
        """Queries per step such that the step's working memory stays within the budget: for
        faiss its outputs (12 bytes per candidate) and the float32 queries; for torch the
        distance block against ``bank_rows`` vectors."""
        per_query = 4 * self._dim + (12 * candidates if self._backend == "faiss"
                                     else _TORCH_BYTES_PER_PAIR * bank_rows)
        queries = max(1, (self.memory_budget * 3 // 4) // per_query)
        return min(queries, _FAISS_MAX_QUERY_CHUNK) if self._backend == "faiss" else queries

    def _check_ranges(self, ranges: Sequence[Tuple[int, int]]) -> None:
        previous = 0
        for pair in ranges:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                            for v in pair)
                    and previous <= pair[0] <= pair[1] <= self._count):
                raise ValueError("ranges must be ascending, disjoint (start, stop) int pairs "
                                 f"within [0, {self._count}]; got {pair!r} after stop {previous}")
            previous = pair[1]

    def _bank_chunk(self, rows: Optional[int] = None) -> int:
        """Rows per torch.cdist call against a bank of ``rows`` vectors (default: this index's):
        cdist copies its bank block (with two extra columns), so that copy gets a quarter of
        the budget."""
        rows = self._count if rows is None else rows
        return min(rows, max(1, self.memory_budget // 4 // (4 * (self._dim + 2))))

    def _torch_finder(self, vectors: torch.Tensor,
                      candidates: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Candidate rows ``[m, candidates]`` of a query block among ``vectors``, by
        torch.cdist + topk within the memory budget."""
        bank_chunk = self._bank_chunk(len(vectors))
        return lambda block: _torch_candidates(block.to(vectors.device), vectors, candidates,
                                               bank_chunk)

    def search(self, queries: ArrayLike, k: int,
               progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored vectors of each query.

        ``queries``: ``[m, dim]``, numpy or torch, any real dtype; converted to float32 chunk by
        chunk, so a float64 array is never copied whole. Returns ``(distances, indices)``:
        float32 ``[m, k]`` Euclidean distances (the square root, not faiss's squared L2), each
        row ascending, equal distances by ascending index; int64 ``[m, k]`` row numbers into the
        added vectors. ``progress`` shows a tqdm bar over query chunks.
        """
        if self._count == 0:
            raise ValueError("search on an empty index: add() normal vectors first")
        k = check_int(k, "k", 1, self._count, " (the index size)")
        candidates = min(k + self.rerank, self._count)
        if self._backend == "faiss" and self._device != "cpu" and candidates > _FAISS_GPU_MAX_K:
            raise ValueError(f"k + rerank = {candidates} exceeds faiss's GPU limit of "
                             f"{_FAISS_GPU_MAX_K}; use a smaller k or device='cpu'")
        checked = check_matrix(queries, "queries", self._dim)
        find: Callable[[torch.Tensor], torch.Tensor]
        if self._backend == "faiss":
            # A GPU index is not padded: its kernel is not the CPU one.
            bank_bytes = 4 * self._count * self._dim if self._device == "cpu" else 0

            def find(block: torch.Tensor) -> torch.Tensor:
                return _faiss_candidates(lambda queries: self._faiss_index.search(
                    queries, candidates)[1], block, bank_bytes)
        else:
            find = self._torch_finder(self._vectors, candidates)
        chunk = self._query_chunk(candidates, self._bank_chunk())
        return _search_in_chunks(checked, k, chunk, find, self._stored, self.memory_budget,
                                 progress)

    def search_among(self, queries: ArrayLike, k: int, ranges: Sequence[Tuple[int, int]]
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`search` restricted to the stored rows in ``ranges``: half-open
        ``(start, stop)`` row ranges, ascending and disjoint. Same outputs and tie order as a
        search of an index holding only those rows, with indices into this index. Copies those
        rows once (never the whole bank) and searches them on the CPU with ``faiss.knn`` or on
        the index's device with the torch kernel."""
        self._check_ranges(ranges)
        gallery = torch.cat([self._rows(start, stop) for start, stop in ranges]
                            or [torch.empty(0, self._dim)])
        if len(gallery) == 0:
            raise ValueError("search_among: the ranges hold no stored vectors")
        k = check_int(k, "k", 1, len(gallery), " (the rows in the ranges)")
        candidates = min(k + self.rerank, len(gallery))
        checked = check_matrix(queries, "queries", self._dim)
        find: Callable[[torch.Tensor], torch.Tensor]
        if self._backend == "faiss":
            faiss = import_faiss()

            def find(block: torch.Tensor) -> torch.Tensor:
                return _faiss_candidates(lambda queries: faiss.knn(queries, gallery.numpy(),
                                                                   candidates)[1],
                                         block, 4 * gallery.numel())
        else:
            find = self._torch_finder(gallery, candidates)
        chunk = self._query_chunk(candidates, self._bank_chunk(len(gallery)))
        distances, local = _search_in_chunks(checked, k, chunk, find,
                                             lambda rows: gallery[rows.to(gallery.device)],
                                             self.memory_budget, False)
        starts = np.array([start for start, _ in ranges], np.int64)
        first_local = np.cumsum([0] + [stop - start for start, stop in ranges])[:-1]
        which = np.searchsorted(first_local, local, side="right") - 1
        return distances, local - first_local[which] + starts[which]

    def save(self, path: PathLike) -> None:
        """Write the vectors and dimension to one ``.npz`` file, atomically."""
        write_archive(path, "FlatL2Index", _FORMAT_VERSION, {"dim": self._dim},
                      {"vectors": self.vectors()})

    @classmethod
    def load(cls, path: PathLike, backend: str = "auto", device: Union[str, torch.device] = "auto",
             memory_budget: int = DEFAULT_MEMORY_BUDGET, rerank: int = 0) -> "FlatL2Index":
        """Read a file written by :meth:`save` into a new index on ``backend``/``device``."""
        meta, arrays, _ = read_archive(path, "FlatL2Index", _FORMAT_VERSION)
        dim, vectors = meta.get("dim"), arrays.get("vectors")
        # A file can carry valid checksums and still be crafted or cut short: check what it holds.
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1
                and isinstance(vectors, np.ndarray) and vectors.ndim == 2
                and vectors.shape[1] == dim
                and np.issubdtype(vectors.dtype, np.floating)
                and all(_nonfinite_rows(vectors[start:start + _CHECK_ROWS]) == 0
                        for start in range(0, len(vectors), _CHECK_ROWS))):
            raise ModelFileError(
                f"{path} is not a consistent FlatL2Index file: dimension {dim!r}, vectors "
                f"{getattr(vectors, 'shape', None)} {getattr(vectors, 'dtype', '')} (finite floats "
                f"[n, dim] expected); restore it from a good copy or save the index again")
        index = cls(dim, backend=backend, device=device, memory_budget=memory_budget,
                    rerank=rerank)
        if len(vectors):
            index.add(vectors)
        return index


def _faiss_candidates(search: Callable[[np.ndarray], np.ndarray], block: torch.Tensor,
                      bank_bytes: int) -> torch.Tensor:
    """``search(queries)``'s candidate rows of ``block``'s queries (float32 ``[m, dim]``),
    with a block of :data:`_FAISS_PADDED_FROM` to :data:`_FAISS_TILED_QUERIES` queries against
    a bank of more than :data:`_FAISS_PADDED_BANK_BYTES` padded with zero queries to
    :data:`_FAISS_TILED_QUERIES`, so that faiss takes its tiled kernel."""
    queries = block.cpu().numpy()
    count = len(queries)
    if _FAISS_PADDED_FROM <= count < _FAISS_TILED_QUERIES and bank_bytes > _FAISS_PADDED_BANK_BYTES:
        padding = np.zeros((_FAISS_TILED_QUERIES - count, queries.shape[1]), np.float32)
        return torch.from_numpy(search(np.concatenate([queries, padding]))[:count])
    return torch.from_numpy(search(queries))


def _search_in_chunks(queries: ArrayLike, k: int, chunk: int,
                      find: Callable[[torch.Tensor], torch.Tensor],
                      stored: Callable[[torch.Tensor], torch.Tensor], memory_budget: int,
                      progress: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Shared loop of the searches: each chunk of ``queries`` is converted to float32, its
    candidate rows found by ``find`` and refined against ``stored`` vectors."""
    m = queries.shape[0]
    distances = np.empty((m, k), np.float32)
    indices = np.empty((m, k), np.int64)
    starts = range(0, m, chunk)
    for start in tqdm(starts, desc="kNN search", unit="chunk",
                      disable=not progress or len(starts) < 2):
        block = float32_rows(queries, start, start + chunk)
        block_d, block_i = _refine(block, find(block), stored, memory_budget)
        distances[start:start + chunk] = block_d[:, :k].cpu().numpy()
        indices[start:start + chunk] = block_i[:, :k].cpu().numpy()
    return distances, indices


def _refine(block: torch.Tensor, found: torch.Tensor,
            stored: Callable[[torch.Tensor], torch.Tensor],
            memory_budget: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact distances of the found neighbours, each row re-sorted ascending.

    Both backends rank by |q|² + |x|² − 2q·x, whose rounding error grows with |x|² and can
    swamp small distances; recomputing |q − x| for the k (+ rerank) candidates costs m·k·d, not
    m·n·d, and makes the distances of both backends identical where their neighbours are.
    Equal distances are ordered by index, whatever order the backend found them in."""
    dim = block.shape[1]
    sub = max(1, (memory_budget // 4) // (4 * found.shape[1] * dim))
    out_d, out_i = [], []
    for start in range(0, found.shape[0], sub):
        # Exact ties then go to the lowest index.
        rows, _ = torch.sort(found[start:start + sub], dim=1)
        neighbours = stored(rows)
        queries = block[start:start + sub].to(neighbours.device)
        exact = torch.linalg.vector_norm(neighbours - queries[:, None, :], dim=2)
        order = torch.argsort(exact, dim=1, stable=True)
        out_d.append(torch.gather(exact, 1, order))
        out_i.append(torch.gather(rows.to(order.device), 1, order))
    return torch.cat(out_d), torch.cat(out_i)


def _torch_candidates(block: torch.Tensor, vectors: torch.Tensor, count: int, bank_chunk: int
                      ) -> torch.Tensor:
    """Rows ``[m, count]`` of the ``count`` nearest ``vectors`` of each query of ``block`` by
    torch.cdist + topk, merging the top lists over bank chunks of ``bank_chunk`` rows."""
    best_d: Optional[torch.Tensor] = None
    best_i: Optional[torch.Tensor] = None
    for offset in range(0, vectors.shape[0], bank_chunk):
        bank = vectors[offset:offset + bank_chunk]
        d = torch.cdist(block, bank)
        chunk_d, chunk_i = torch.topk(d, min(count, bank.shape[0]), dim=1, largest=False,
                                      sorted=True)
        del d
        chunk_i += offset
        if best_d is None or best_i is None:
            best_d, best_i = chunk_d, chunk_i
        else:
            merged_d = torch.cat([best_d, chunk_d], dim=1)
            merged_i = torch.cat([best_i, chunk_i], dim=1)
            best_d, order = torch.topk(merged_d, count, dim=1, largest=False, sorted=True)
            best_i = torch.gather(merged_i, 1, order)
    assert best_i is not None, "no vectors to search"  # the callers' indexes hold some
    return best_i
