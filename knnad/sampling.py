"""Coreset subsampling of a memory bank: greedy k-center selection (PatchCore).

Greedy k-center picks, one at a time, the point farthest from everything picked so far, which
keeps the covering radius (the largest distance from any point to its nearest pick) within a
factor of two of the optimum. Distances for the selection can be computed on a random
Johnson–Lindenstrauss projection to speed it up; the picks are points of the original bank.
The loop is exact: triangle-inequality bounds over the picks' cells (and a PCA projection's
lower bounds) only skip points that cannot come closer (``bench_coreset.py`` measures it).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import check_int
from ._types import ArrayLike
from .index import FlatL2Index, as_float32_matrix
from .runtime import ThreadTuner, kept_cpu_threads, resolve_device

logger = logging.getLogger(__name__)

#: Above this share of candidate points, one dense pass over all points is cheaper than
#: gathering the candidates (measured on MVTec features and on Gaussian noise).
_DENSE_FRACTION = 0.25
#: Above this share of points listed in the near cells, the dense pass is taken at once.
_LISTED_FRACTION = 0.5
#: Slack on the cell tests, relative to the squared norms: above float32's rounding of
#: |a|² − 2a·c + |c|², so that rounding never drops a cell or a point.
_SLACK = 2e-5
#: Dimension of the projection in which the cell test is screened first.
_SCREEN_DIM = 32
#: Picks per block timed by the loop's thread tuner.
_TUNED_PICKS = 64
#: Rows per block of a dense pass's products (its temporary: this many rows).
_DOT_ROWS = 65536


CoresetSpec = Union[None, float, int]


def parse_coreset(value: Any, argument: str = "coreset") -> CoresetSpec:
    """The one reading of a coreset setting, for the API and every front end.

    ``None`` (or the text ``"none"``) keeps every patch; a float in (0, 1] is the share of
    patches kept (``1.0`` keeps them all); an int >= 1 is a count of patches. Text is read as
    an int when it has no decimal point or exponent (``"10000"``), else as a float (``"0.1"``).
    Anything else (``1.5``, ``0``, ``-1``, ``inf``, ``"abc"``, ``True``) raises a ValueError
    naming ``argument``.
    """
    original = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "none":
            return None
        try:
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            value = original
    if value is None:
        return None
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and 0 < value <= 1:
        return float(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{argument} must be none, a share of patches in (0, 1] such as 0.1, or a "
                     f"count of patches >= 1 such as 10000; got {original!r}")


def coreset_size(total: int, ratio: Optional[float] = None, n: Optional[int] = None) -> int:
    """Number of points to keep from ``total``: exactly one of ``ratio`` in (0, 1] (at least
    one point is kept) or ``n`` in [1, total]."""
    if (ratio is None) == (n is None):
        raise ValueError("give exactly one of ratio (a fraction in (0, 1]) or n (a count)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) \
                or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
        return max(1, int(total * ratio))
    return check_int(n, "n", 1, total, " (the number of points)")


def coreset(features: ArrayLike, ratio: Optional[float] = None, n: Optional[int] = None,
            seed: int = 0, projection_dim: Optional[int] = 128,
            device: Union[str, torch.device] = "cpu", progress: bool = False) -> np.ndarray:
    """Greedy k-center coreset of ``features`` ``[N, d]``.

    Give exactly one of ``ratio`` (fraction of N, in (0, 1]) or ``n`` (count). When ``d`` exceeds
    ``projection_dim``, selection distances are computed on a seeded Gaussian random projection
    to ``projection_dim`` dimensions (``None`` or 0: no projection). The first pick is a
    seeded random point; the result is deterministic for a ``seed``.

    Returns int64 ``[count]``: unique row numbers in selection order (every prefix is itself a
    greedy coreset). The picks are the textbook greedy's on float32 squared distances
    (|x|² − 2x·c + |c|²), the first of the farthest rows on a tie, whatever the code path or
    thread count. Working memory beyond ``features`` (and its projection): a temporary of their
    size while the squared norms are computed, then about 36 bytes per row, 132 more when
    ``dim`` >= 64 (the rows' 32-dim PCA projection, for pruning), and ``4 * (dim + 37)`` bytes
    per pick (``dim`` after projection), and a temporary of 65,536 rows in a dense pass;
    ``bench_coreset.py`` measured a peak of 1.25 times the bank's bytes above it at 10 % of
    270,864 x 128 rows.
    """
    points = as_float32_matrix(features, "features")
    total, dim = points.shape
    if total == 0:
        raise ValueError("features is empty: nothing to subsample")
    count = coreset_size(total, ratio, n)
    if projection_dim is not None:
        check_int(projection_dim, "projection_dim", 0, hint=" or None (0 or None: no projection)")
    generator = torch.Generator().manual_seed(int(seed))
    target = resolve_device(device, "device")
    points = points.to(target)
    if projection_dim and dim > projection_dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / projection_dim ** 0.5
        points = points @ projection.to(target)
    first = int(torch.randint(total, (1,), generator=generator))
    with kept_cpu_threads():  # the loop's tuner may change them
        return _greedy_k_center(points, count, first, progress).cpu().numpy()


class _Cells:
    """Which points each pick owns (its cell), listed per pick: the points a pick took over when
    it was made, in one flat array of row numbers (``flat[starts[j]:starts[j] + lengths[j]]``
    for pick ``j``). A point only ever moves to the newest pick, so a pick's list is written once
    and afterwards only goes stale (points that moved on are skipped when read: their owner is
    checked). When the flat array is full, it is rebuilt from the owners, without stale rows."""

    SPACE = 2.0  # room in the flat array, in rows per point

    def __init__(self, total: int, count: int, device: torch.device):
        self.flat = torch.empty(max(int(self.SPACE * total), total), dtype=torch.int64,
                                device=device)
        self.starts = torch.zeros(count, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(count, dtype=torch.int64, device=device)
        self.fill = 0

    def add(self, step: int, moved: torch.Tensor, owner: torch.Tensor) -> None:
        """Record that pick ``step`` took over the rows ``moved`` (``owner`` already updated)."""
        if self.fill + len(moved) > len(self.flat):
            order = torch.argsort(owner, stable=True)
            self.flat[:len(order)] = order
            self.lengths[:step + 1] = torch.bincount(owner, minlength=step + 1)
            counts = self.lengths[:step + 1]
            self.starts[:step + 1] = torch.cumsum(counts, 0) - counts
            self.fill = len(order)
            return
        self.starts[step], self.lengths[step] = self.fill, len(moved)
        self.flat[self.fill:self.fill + len(moved)] = moved
        self.fill += len(moved)

    def listed(self, cells: torch.Tensor) -> int:
        """How many rows the lists of ``cells`` hold, stale ones included."""
        return int(self.lengths.index_select(0, cells).sum())

    def members(self, cells: torch.Tensor,
                owner: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cell of each row)``: the points that ``cells`` own now."""
        lengths = self.lengths.index_select(0, cells)
        shift = self.starts.index_select(0, cells) - (torch.cumsum(lengths, 0) - lengths)
        positions = torch.repeat_interleave(shift, lengths)
        positions += torch.arange(len(positions), device=positions.device)
        rows = self.flat.index_select(0, positions)
        row_cells = torch.repeat_interleave(cells, lengths)
        current = torch.nonzero(owner.index_select(0, rows) == row_cells).squeeze(1)
        return rows.index_select(0, current), row_cells.index_select(0, current)


def _rows(values: torch.Tensor, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
    """``values[rows]``; ``index_select`` for row numbers, several times faster than indexing."""
    return values[rows] if isinstance(rows, slice) else values.index_select(0, rows)


def _row_dots(rows: torch.Tensor, centre: torch.Tensor,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rows @ centre`` (float32 ``[n]``, into ``out`` when given), each row's sum taken the
    same way whatever the number of rows and threads: a matrix-vector product rounds a row
    differently with one and two threads on some CPUs, and the thread tuner switches between
    them mid-selection. Products of :data:`_DOT_ROWS` rows at a time (a bounded temporary)."""
    out = torch.empty(len(rows), dtype=rows.dtype, device=rows.device) if out is None else out
    for start in range(0, len(rows), _DOT_ROWS):
        torch.sum(rows[start:start + _DOT_ROWS] * centre, dim=1,
                  out=out[start:start + _DOT_ROWS])
    return out


def _lower_gaps(vectors: torch.Tensor, norms: torch.Tensor, rows: Union[slice, torch.Tensor],
                at: Union[int, torch.Tensor], bank_norms: torch.Tensor) -> torch.Tensor:
    """Lower bounds of the squared distances from ``vectors[rows]`` to ``vectors[at]``
    (``norms``: their squared norms), as |x|² + |c|² − 2x·c less a slack above float32's
    rounding of it, relative to the bank's squared norms ``bank_norms`` of the same rows (the
    same slack whether ``vectors`` are the bank's rows or their projections)."""
    lower = _rows(norms, rows) + norms[at] - 2.0 * (_rows(vectors, rows) @ vectors[at])
    return lower.sub_(_SLACK * (_rows(bank_norms, rows) + bank_norms[at]))


def _screening_basis(points: torch.Tensor) -> Optional[torch.Tensor]:
    """Orthonormal ``[dim, _SCREEN_DIM]`` basis of the bank's main directions (PCA of a sample),
    or None when ``dim`` is too small for it to pay. Distances between projections never exceed
    the true ones, so a cell that the projection puts too far away is too far away."""
    total, dim = points.shape
    if dim < 2 * _SCREEN_DIM:
        return None
    sample = points[::max(1, total // 20000)].double()
    sample = sample - sample.mean(dim=0)
    _, vectors = torch.linalg.eigh(sample.T @ sample)
    return vectors[:, -_SCREEN_DIM:].to(points.dtype).contiguous()


class _Centres:
    """The picks so far and the squared radius of each one's cell (the largest ``u²`` of its
    members), with the cell test: which cells a new pick ``c`` can take points from
    (``d(a, c) < 2R``), screened first in the projection when there is one."""

    def __init__(self, points: torch.Tensor, basis: Optional[torch.Tensor], count: int):
        self.basis = basis
        self.vectors = torch.empty(count, points.shape[1], dtype=points.dtype, device=points.device)
        self.norms = torch.empty(count, dtype=points.dtype, device=points.device)
        self.radii = torch.full((count,), float("-inf"), dtype=points.dtype, device=points.device)
        self.gaps = torch.empty(count, dtype=points.dtype, device=points.device)
        if basis is not None:
            self.projected = torch.empty(count, basis.shape[1], dtype=points.dtype,
                                         device=points.device)
            self.projected_norms = torch.empty(count, dtype=points.dtype, device=points.device)

    def add(self, step: int, centre: torch.Tensor, norm: torch.Tensor) -> None:
        self.vectors[step], self.norms[step] = centre, norm
        if self.basis is not None:
            projected = centre @ self.basis
            self.projected[step], self.projected_norms[step] = projected, projected @ projected

    def near(self, step: int) -> torch.Tensor:
        """The cells, among picks ``0 .. step-1``, that pick ``step`` may take points from;
        ``gaps[cell]`` then holds a lower bound of ``d(a, c)²`` (float32 rounding taken off)."""
        everyone = slice(0, step)
        if self.basis is None:
            return self._closer(everyone, self.vectors, self.norms, step)
        # A cheap test first, in the projection, then the exact one for the cells it keeps.
        cells = self._closer(everyone, self.projected, self.projected_norms, step)
        return cells[self._closer(cells, self.vectors, self.norms, step)]

    def _closer(self, cells, vectors, norms, step) -> torch.Tensor:
        """Positions in ``cells`` (a slice or row numbers) of those that pass the cell test."""
        lower = _lower_gaps(vectors, norms, cells, step, self.norms)
        self.gaps[cells] = lower
        return torch.nonzero(lower < 4.0 * _rows(self.radii, cells)).squeeze(1)


class _Points:
    """The bank's side of the loop: its rows, their squared norms and, when there is a
    projection, their projections, in which most candidates are ruled out by a lower bound of
    their distance before the exact one is computed."""

    def __init__(self, points: torch.Tensor, basis: Optional[torch.Tensor]):
        self.vectors = points
        self.norms = (points * points).sum(dim=1)
        self.distances = torch.empty_like(self.norms)
        self.projected: Optional[torch.Tensor] = None
        if basis is not None:
            self.projected = points @ basis
            self.projected_norms = (self.projected * self.projected).sum(dim=1)

    def closer(self, pick: torch.Tensor, candidates: Optional[torch.Tensor],
               nearest: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, squared distances)`` of the points, among ``candidates`` (None: all), to
        which the point ``pick`` is strictly closer than their ``nearest``."""
        if self.projected is not None:
            candidates = self._bounded(self.projected, pick, candidates, nearest)
        centre, centre_norm = self.vectors[pick], self.norms[pick]
        if candidates is None or len(candidates) > _DENSE_FRACTION * len(self.vectors):
            # Most points may come closer: one pass over all beats gathering them.
            _row_dots(self.vectors, centre, out=self.distances)
            self.distances.mul_(-2.0).add_(self.norms).add_(centre_norm)
            moved = torch.nonzero(self.distances < nearest).squeeze(1)
            return moved, self.distances.index_select(0, moved)
        near = self.norms.index_select(0, candidates) + centre_norm \
            - 2.0 * _row_dots(self.vectors.index_select(0, candidates), centre)
        closer = torch.nonzero(near < nearest.index_select(0, candidates)).squeeze(1)
        return candidates.index_select(0, closer), near.index_select(0, closer)

    def _bounded(self, projected: torch.Tensor, pick, candidates, nearest) -> torch.Tensor:
        """The ``candidates`` (None: all rows) whose distance to ``pick`` in the projection
        (``projected``, the rows' projections), a lower bound of the true one, is below their
        ``nearest``."""
        rows = slice(None) if candidates is None else candidates
        lower = _lower_gaps(projected, self.projected_norms, rows, pick, self.norms)
        passed = torch.nonzero(lower < _rows(nearest, rows)).squeeze(1)
        return passed if candidates is None else candidates.index_select(0, passed)


def _greedy_k_center(points: torch.Tensor, count: int, first: int, progress: bool) -> torch.Tensor:
    """Selection loop with triangle-inequality pruning over the picks' cells.

    Each point remembers its nearest pick ``a`` (its owner; the points a pick owns are its cell)
    and the squared distance ``u²`` to it; each cell the largest ``u²`` of its members, ``R²``.
    A new pick ``c`` can only come closer to a point than ``u`` if ``d(a, c) < 2u <= 2R``: only
    the members of cells with ``d(a, c) < 2R`` that pass ``d(a, c) < 2u`` are candidates —
    nearly all points early on, a small neighbourhood once many picks exist (when the near cells
    list more than half the bank, or more than a quarter passes, all points are). Candidates
    whose distance in a PCA projection (a lower bound) is already ``u`` or more are left out;
    the rest are measured exactly. The next pick, the point with the largest ``u``, is found
    among the members of the cells with the largest ``R``. Squared distances use
    |x|² − 2x·c + |c|².
    """
    total = len(points)
    basis = _screening_basis(points)
    bank, centres = _Points(points, basis), _Centres(points, basis, count)
    cells = _Cells(total, count, points.device)
    nearest = torch.full_like(bank.norms, float("inf"))
    owner = torch.zeros(total, dtype=torch.int64, device=points.device)
    picks = torch.empty(count, dtype=torch.int64, device=points.device)
    pick = torch.tensor(first, device=points.device)
    tuner = ThreadTuner(torch.get_num_threads() if points.device.type == "cpu" else 1,
                        _TUNED_PICKS)
    for step in tqdm(range(count), desc="coreset", unit="pt", disable=not progress,
                     mininterval=1.0):
        tuner.tick(step)
        picks[step] = pick
        centres.add(step, bank.vectors[pick], bank.norms[pick])
        rows = candidates = None  # rows: the near cells' members, when measured through them
        near_cells = centres.near(step)
        if step and cells.listed(near_cells) <= _LISTED_FRACTION * total:  # the first pick: all
            rows, row_cells = cells.members(near_cells, owner)
            passed = centres.gaps.index_select(0, row_cells) < 4.0 * nearest.index_select(0, rows)
            candidates = rows.index_select(0, torch.nonzero(passed).squeeze(1))
            if len(candidates) > _DENSE_FRACTION * total:
                rows = candidates = None
        moved, moved_distances = bank.closer(pick, candidates, nearest)
        nearest[moved] = moved_distances
        owner[moved] = step
        nearest[pick] = float("-inf")  # never picked again, even among duplicate rows
        cells.add(step, moved, owner)
        if rows is None:  # cells far away may have lost points too: all radii again
            centres.radii[:step + 1] = float("-inf")
            centres.radii.scatter_reduce_(0, owner, nearest, "amax")
        else:  # only the measured cells changed, and the new one
            stay = torch.nonzero(owner.index_select(0, rows) == row_cells).squeeze(1)
            centres.radii[near_cells] = float("-inf")
            centres.radii.scatter_reduce_(0, row_cells.index_select(0, stay),
                                          nearest.index_select(0, rows.index_select(0, stay)),
                                          "amax")
            if len(moved):
                centres.radii[step] = nearest[moved].max()
        if step + 1 < count:
            pick = _farthest(centres.radii[:step + 1], cells, owner, nearest)
    return picks


def _farthest(radii: torch.Tensor, cells: _Cells, owner: torch.Tensor,
              nearest: torch.Tensor) -> torch.Tensor:
    """The row with the largest ``nearest``, the first one if several: among the members of the
    cells whose radius is the largest."""
    largest = radii.max()
    rows, _ = cells.members(torch.nonzero(radii == largest).squeeze(1), owner)
    return rows[nearest.index_select(0, rows) == largest].min()


def keeps_every_row(spec: CoresetSpec) -> bool:
    """Whether coreset setting ``spec`` (checked) keeps every patch: None or a share of 1.0."""
    return spec is None or (isinstance(spec, float) and spec >= 1.0)


def subsample(bank: ArrayLike, spec: CoresetSpec, seed: int = 0,
              device: Union[str, torch.device] = "cpu", progress: bool = False) -> np.ndarray:
    """Rows of ``bank`` to keep for a coreset setting (see :func:`parse_coreset`; a count above
    the bank's size keeps every row), as int64 ``[count]`` in ascending order."""
    spec = parse_coreset(spec)
    if spec is None:
        count = len(bank)
    elif isinstance(spec, float):
        count = coreset_size(len(bank), ratio=spec)
    else:
        count = min(spec, len(bank))
        if spec == 1:
            logger.warning("coreset=1 keeps a single patch; for all patches use coreset=None or "
                           "1.0")
    if count == len(bank):  # every row: no selection to run
        return np.arange(len(bank), dtype=np.int64)
    return np.sort(coreset(bank, n=count, seed=seed, device=device, progress=progress))


def _shown(values: np.ndarray) -> str:
    text = np.array2string(values.ravel()[:6], separator=", ")
    if not values.size:
        return f"{values.dtype} []"
    return f"{values.dtype} {text[:-1]}{', ...' if values.size > 6 else ''}]"


def covering_radius(features: ArrayLike, selected: ArrayLike, backend: str = "auto") -> float:
    """Largest Euclidean distance from any row of ``features`` to its nearest selected row
    (``selected``: row numbers). Smaller is better; 0 when every row is selected."""
    points = as_float32_matrix(features, "features")
    picked = np.asarray(selected)
    # Row numbers only: floats would be truncated and negative numbers wrap around, silently.
    if picked.ndim != 1 or picked.size == 0 or not (np.issubdtype(picked.dtype, np.integer)
                                                    and picked.dtype != np.bool_) \
            or picked.min() < 0 or picked.max() >= len(points):
        raise ValueError(f"selected must be a non-empty 1-d array of row numbers in "
                         f"[0, {len(points) - 1}] (as coreset returns), got {_shown(picked)}")
    rows = torch.from_numpy(picked.astype(np.int64))
    index = FlatL2Index(points.shape[1], backend=backend, device="cpu")
    index.add(points[rows])
    distances, _ = index.search(points, 1)
    return float(distances.max())
