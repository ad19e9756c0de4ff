"""Where knnad computes: which faiss package is installed, which GPUs it sees, and the placement
of the backbone and the search (device and backend) that follows from them.

faiss-cpu and faiss-gpu ship the same importable ``faiss`` module, so two of them installed
side by side overwrite each other's files. :func:`backend_info` names the distribution that is
in effect and :func:`faiss_install_problem` explains how to get back to exactly one.
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

import torch

logger = logging.getLogger(__name__)

#: Search backends: ``"faiss"`` (IndexFlatL2), ``"torch"`` (torch.cdist + topk, the reference)
#: and ``"auto"`` (faiss where it can serve the device, else torch).
BACKENDS = ("auto", "faiss", "torch")
#: The device string that shards the faiss index over every GPU.
ALL_GPUS = "cuda:all"

#: PyPI distributions that provide the ``faiss`` module.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12",
                       "faiss-gpu-cu13")


def installed_faiss_distributions() -> List[str]:
    """Names of the installed PyPI distributions that provide ``faiss`` (possibly empty)."""
    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def faiss_install_problem() -> Optional[str]:
    """A sentence describing a broken faiss install (two distributions at once), else None."""
    found = installed_faiss_distributions()
    if len(found) > 1:
        gpu = [name for name in found if name != "faiss-cpu"][0]
        return (f"several faiss packages are installed ({', '.join(found)}); they share the "
                f"`faiss` module and overwrite each other. Keep exactly one: "
                f"`pip uninstall -y {' '.join(found)} && pip install {gpu}`")
    return None


@lru_cache(maxsize=None)
def import_faiss() -> Any:
    """The ``faiss`` module, or None when it cannot be imported (the reason is logged once)."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        logger.warning("faiss is not importable (%s); knnad falls back to the torch backend", error)
        return None
    problem = faiss_install_problem()
    if problem:
        logger.warning(problem)
    return faiss


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use: 0 for faiss-cpu, for a missing faiss, or without GPUs."""
    faiss = import_faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def backend_info() -> Dict[str, Any]:
    """What knnad found: faiss package and version, faiss GPU support, torch and its CUDA GPUs.

    Returns a JSON-serialisable dict, e.g. ``{"faiss_distribution": "faiss-cpu",
    "faiss_version": "1.8.0", "faiss_gpus": 0, "torch_version": "2.4.0", "torch_cuda_gpus": 0,
    ...}``.
    """
    faiss = import_faiss()
    distributions = installed_faiss_distributions()
    return {
        "faiss_distribution": (distributions[-1] if len(distributions) == 1
                               else distributions or None),
        "faiss_version": getattr(faiss, "__version__", None) if faiss is not None else None,
        "faiss_gpu_build": faiss is not None and hasattr(faiss, "StandardGpuResources"),
        "faiss_gpus": faiss_gpu_count(),
        "faiss_problem": faiss_install_problem(),
        "torch_version": torch.__version__,
        "torch_cuda_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch_threads": torch.get_num_threads(),
    }


def resolve_device(device: Any, argument: str = "device") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device` into a
    device that exists here; ``"auto"`` means the first CUDA GPU if torch sees one, else CPU.

    Raises ValueError naming ``argument`` for a GPU that is not there or an unknown string.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument}={device!r} is not a device; use 'auto', 'cpu', 'cuda' or "
                         f"'cuda:N'") from error
    if resolved.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if resolved.index is None else resolved.index
        if index >= available:
            raise ValueError(f"{argument}={device!r} asks for a GPU but torch sees "
                             f"{available} CUDA device(s) here; use device='cpu' or 'auto'")
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise ValueError(f"{argument}={device!r}: only 'cpu' and CUDA devices are supported")
    return resolved


def check_device(device: Any, argument: str = "device") -> str:
    """``device`` as a string if it names a device kind knnad knows (``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ``"cuda:all"`` or a :class:`torch.device`), without asking
    whether it exists here; else a ValueError naming ``argument``."""
    if device in ("auto", ALL_GPUS):
        return device
    try:  # torch's own reading of device strings
        parsed = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        parsed = None
    if parsed is not None and parsed.type in ("cpu", "cuda"):
        return str(device)
    raise ValueError(f"{argument}={device!r} is not a device; use 'auto', 'cpu', 'cuda', "
                     f"'cuda:N' or '{ALL_GPUS}'")


def backbone_device(device: Any) -> torch.device:
    """The device the backbone runs on for a detector ``device``: the first GPU for
    ``"cuda:all"`` (only the index is sharded), else :func:`resolve_device`."""
    return resolve_device("cuda:0" if str(device) == ALL_GPUS else device)


def resolve_backend(backend: str, device: Union[str, torch.device]) -> Tuple[str, str]:
    """``(backend, device)`` for a search index: ``"faiss"`` or ``"torch"``, and ``"cpu"``,
    ``"cuda:N"`` or ``"cuda:all"``. ``backend="auto"`` takes faiss where faiss can serve the
    device, else torch with a logged reason. Raises ValueError naming what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    faiss = import_faiss() if backend != "torch" else None
    faiss_gpus = faiss_gpu_count() if faiss is not None else 0
    if backend == "faiss" and faiss is None:
        raise ValueError("backend='faiss' but faiss cannot be imported; `pip install faiss-cpu` "
                         "or use backend='torch'")
    if str(device) == ALL_GPUS:
        if backend == "torch":
            raise ValueError(f"device='{ALL_GPUS}' shards a faiss index; use backend='faiss' or "
                             f"'auto', or device='cuda:N' with backend='torch'")
        if faiss_gpus == 0:
            raise ValueError(f"device='{ALL_GPUS}' shards the index over all GPUs with faiss, but "
                             f"faiss sees no GPU here (faiss-cpu installed, or no GPU); use "
                             f"device='cpu', or install faiss-gpu-cu12 (README: GPU install)")
        return "faiss", ALL_GPUS
    if str(device) == "auto" and faiss is not None:
        resolved = torch.device("cuda:0") if faiss_gpus else resolve_device("auto", "device")
    else:
        resolved = resolve_device(device, "device")
    if backend == "torch" or faiss is None:
        if backend == "auto":
            logger.info("faiss is not importable: using the torch backend on %s", resolved)
        return "torch", str(resolved)
    if resolved.type == "cuda" and resolved.index >= faiss_gpus:
        if backend == "faiss":
            raise ValueError(f"backend='faiss' on device={str(device)!r}, but faiss sees "
                             f"{faiss_gpus} GPU(s) (faiss-cpu installed?); install "
                             f"faiss-gpu-cu12 (README: GPU install) or use backend='torch'")
        logger.info("faiss sees no GPU %s (faiss-cpu installed?): using torch.cdist on %s "
                    "instead; install faiss-gpu-cu12 for faiss on GPU", resolved, resolved)
        return "torch", str(resolved)
    return "faiss", str(resolved)


def cpu_threads() -> Tuple[int, int]:
    """The sizes of torch's and faiss's CPU thread pools (faiss's is 1 without faiss)."""
    faiss = import_faiss()
    return torch.get_num_threads(), int(faiss.omp_get_max_threads()) if faiss is not None else 1


def set_cpu_threads(torch_threads: int, faiss_threads: Optional[int] = None) -> None:
    """Size torch's CPU thread pool to ``torch_threads`` and faiss's to ``faiss_threads``
    (default: the same), only where that changes them."""
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    faiss = import_faiss()
    faiss_threads = torch_threads if faiss_threads is None else faiss_threads
    if faiss is not None and faiss.omp_get_max_threads() != faiss_threads:
        faiss.omp_set_num_threads(faiss_threads)


@contextmanager
def kept_cpu_threads() -> Iterator[None]:
    """Give torch's and faiss's thread pools back their sizes on leaving the block."""
    before = cpu_threads()
    try:
        yield
    finally:
        set_cpu_threads(*before)


Item = TypeVar("Item")
Result = TypeVar("Result")


def one_thread_lanes(function: Callable[[Item], Result], items: Iterable[Item], lanes: int
                     ) -> Iterator[Result]:
    """``function(item)`` of each of ``items``, in their order, computed on ``lanes`` threads at
    once, each with torch's and faiss's thread counts at 1 (OpenMP's counts are per thread: the
    caller's stay as they are); at most ``lanes`` items in flight, the next item drawn while
    they run. On a CPU, batches of a forward pass and a search run faster this way than one
    after the other on ``lanes`` threads, whose OpenMP threads spin between the many small
    operations and collapse when another process takes a core (MVTec bottle, two CPUs:
    predict 55 -> 67 images/s at a 1 % coreset, 44 -> 57 at 10 %). ``function`` must be safe to
    call from several threads at once; its exceptions reach the caller. ``lanes`` 1: each item
    in turn on the caller's thread, with its thread counts."""
    if lanes <= 1:
        yield from map(function, items)
        return
    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(lanes, "knnad-lane", initializer=set_cpu_threads,
                                initargs=(1,)) as lane_pool:
            pending: Deque[Future] = deque()
            for item in items:
                pending.append(lane_pool.submit(function, item))
                if len(pending) >= lanes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        # torch.set_num_threads also sets the count that threads started later begin with;
        # the lanes' 1 must not become theirs.
        torch.set_num_threads(before)


class ThreadTuner:
    """Chooses the CPU thread count of a loop of similar steps by timing it (the coreset's
    picks; predict and fit use :func:`one_thread_lanes` instead). Work made of many small
    operations runs faster on two threads of a quiet machine, but when another process competes
    for the cores the threads wait on each other and the loop slows several-fold (predict,
    before its lanes, 4.5x on a 2-core machine with one competing process), while one thread
    keeps its pace. So every few blocks of ``block`` steps it times one block with each
    candidate count (``threads`` and 1) and runs the faster until the next probe, sizing torch's
    and faiss's pools (:func:`set_cpu_threads`); wrap the loop in :func:`kept_cpu_threads`. The
    count can change float32 rounding (on some CPUs a matrix-vector product rounds a row
    differently with one and two threads): a loop whose choices must not depend on it sums each
    value the same way on any count, as the coreset's distances do."""

    EXPLOIT = 16  # blocks run with the chosen count between two probes
    MARGIN = 1.5  # how much faster one thread must be to be chosen

    def __init__(self, threads: int, block: int):
        self.candidates = sorted({threads, 1}, reverse=True)
        self.block_steps = block
        self.schedule: List[Tuple[int, bool]] = [(count, True) for count in self.candidates]
        self.probe_times: Dict[int, float] = {}
        self.block: Optional[Tuple[int, bool]] = None
        self.started = 0.0

    def tick(self, step: int) -> None:
        """Call before each step (numbered from 0); acts at block boundaries."""
        if len(self.candidates) == 1 or step % self.block_steps:
            return
        if self.block is not None and self.block[1]:  # a probe ended
            self.probe_times[self.block[0]] = time.perf_counter() - self.started
        if not self.schedule:  # fewer threads only when clearly faster: blocks vary in cost
            best = min(self.probe_times, key=lambda count: self.probe_times[count]
                       * (1.0 if count == self.candidates[0] else self.MARGIN))
            probes = [(count, True) for count in self.candidates]
            self.schedule = [(best, False)] * self.EXPLOIT + probes
            self.probe_times = {}
        self.block = self.schedule.pop(0)
        set_cpu_threads(self.block[0])
        self.started = time.perf_counter()
