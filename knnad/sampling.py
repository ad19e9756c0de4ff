"""Coreset subsampling of a memory bank: greedy k-center selection (PatchCore).

Greedy k-center picks, one at a time, the point farthest from everything picked so far, which
keeps the covering radius (the largest distance from any point to its nearest pick) within a
factor of two of the optimum. Distances for the selection can be computed on a random
Johnson–Lindenstrauss projection to speed it up; the picks are points of the original bank.
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import check_int
from ._types import ArrayLike
from .index import FlatL2Index, as_float32_matrix
from .runtime import resolve_device

logger = logging.getLogger(__name__)

#: Above this share of candidate points, one dense pass over all points is cheaper than
#: gathering the candidates (measured on MVTec features and on Gaussian noise).
_DENSE_FRACTION = 0.25


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
    greedy coreset).
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
    threads = torch.get_num_threads()
    try:
        return _greedy_k_center(points, count, first, progress).cpu().numpy()
    finally:
        torch.set_num_threads(threads)  # the loop's tuner may have changed it


class _ThreadTuner:
    """Chooses torch's CPU thread count for the selection loop by timing it. Each pick is a few
    small operations (a matrix-vector product over the bank): on a quiet machine two threads
    are faster, but when another process competes for the cores they wait on each other and
    the loop slows several-fold, while one thread keeps its pace (``bench_coreset_sharing.py``).
    So every few blocks of picks it times one block with each candidate count and runs the
    faster until the next probe. The picks do not depend on the thread count."""

    BLOCK = 64  # picks per timed block
    EXPLOIT = 16  # blocks run with the chosen count between two probes
    MARGIN = 1.5  # how much faster one thread must be to be chosen

    def __init__(self, threads: int):
        self.candidates = sorted({threads, 1}, reverse=True)
        self.schedule: List[Tuple[int, bool]] = [(count, True) for count in self.candidates]
        self.probe_times: Dict[int, float] = {}
        self.block: Optional[Tuple[int, bool]] = None
        self.started = 0.0

    def tick(self, step: int) -> None:
        """Call before each pick; acts at block boundaries."""
        if len(self.candidates) == 1 or step % self.BLOCK:
            return
        if self.block is not None and self.block[1]:  # a probe ended
            self.probe_times[self.block[0]] = time.perf_counter() - self.started
        if not self.schedule:  # fewer threads only when clearly faster: blocks vary in cost
            best = min(self.probe_times, key=lambda count: self.probe_times[count]
                       * (1.0 if count == self.candidates[0] else self.MARGIN))
            self.schedule = [(best, False)] * self.EXPLOIT + [(count, True) for count in self.candidates]
            self.probe_times = {}
        self.block = self.schedule.pop(0)
        if self.block[0] != torch.get_num_threads():
            torch.set_num_threads(self.block[0])
        self.started = time.perf_counter()


def _greedy_k_center(points: torch.Tensor, count: int, first: int, progress: bool) -> torch.Tensor:
    """Selection loop with triangle-inequality pruning.

    Each point remembers its nearest pick ``a`` and the squared distance ``u²`` to it. A new
    pick ``c`` can only come closer than ``u`` if ``d(a, c) < 2u``, so only those points are
    measured against ``c``: nearly all of them early on, a small neighbourhood once many picks
    exist (on data without such structure every step falls back to one dense pass). Squared
    distances use |x|² − 2x·c + |c|² (one matrix-vector product).
    """
    total, dim = points.shape
    squared_norms = (points * points).sum(dim=1)
    nearest = torch.full_like(squared_norms, float("inf"))
    owner = torch.zeros(total, dtype=torch.int64, device=points.device)
    centres = torch.empty(count, dim, dtype=points.dtype, device=points.device)
    picks = torch.empty(count, dtype=torch.int64, device=points.device)
    distances = torch.empty_like(squared_norms)
    pick = torch.tensor(first, device=points.device)
    next_check = 1
    tuner = _ThreadTuner(torch.get_num_threads() if points.device.type == "cpu" else 1)
    for step in tqdm(range(count), desc="coreset", unit="pt", disable=not progress, mininterval=1.0):
        tuner.tick(step)
        picks[step] = pick
        centre = points[pick]
        centres[step] = centre
        centre_norm = squared_norms[pick]
        dense = True
        if step >= next_check:
            centre_gaps = squared_norms[picks[:step]] - 2.0 * (centres[:step] @ centre) + centre_norm
            candidates = torch.nonzero(centre_gaps[owner] < 4.0 * nearest).squeeze(1)
            dense = candidates.numel() > _DENSE_FRACTION * total
            if dense:  # pruning does not pay yet: look again a little later
                next_check = step + 1 + step // 16
        if dense:
            # Most points are candidates: a full pass beats gathering them.
            torch.mv(points, centre, out=distances)
            distances.mul_(-2.0).add_(squared_norms).add_(centre_norm)
            owner.masked_fill_(distances < nearest, step)
            torch.minimum(nearest, distances, out=nearest)
        else:
            near = squared_norms[candidates] - 2.0 * (points[candidates] @ centre) + centre_norm
            closer = near < nearest[candidates]
            moved = candidates[closer]
            nearest[moved] = near[closer]
            owner[moved] = step
        nearest[pick] = float("-inf")  # never picked again, even among duplicate rows
        pick = torch.argmax(nearest)
    return picks


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
            logger.warning("coreset=1 keeps a single patch; for all patches use coreset=None or 1.0")
    if count == len(bank):  # every row: no selection to run
        return np.arange(len(bank), dtype=np.int64)
    return np.sort(coreset(bank, n=count, seed=seed, device=device, progress=progress))


def _shown(values: np.ndarray) -> str:
    text = np.array2string(values.ravel()[:6], separator=", ")
    return f"{values.dtype} {text[:-1]}{', ...' if values.size > 6 else ''}]" if values.size else f"{values.dtype} []"


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
