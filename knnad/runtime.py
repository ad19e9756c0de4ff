"""What this process can compute with: which faiss package is installed and which GPUs it sees.

faiss-cpu and faiss-gpu ship the same importable ``faiss`` module, so two of them installed
side by side overwrite each other's files. :func:`backend_info` names the distribution that is
in effect and :func:`faiss_install_problem` explains how to get back to exactly one.
"""
from __future__ import annotations

import importlib.metadata
import logging
from functools import lru_cache
from typing import Any, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

#: PyPI distributions that provide the ``faiss`` module.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cu13")


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
        "faiss_distribution": distributions[-1] if len(distributions) == 1 else distributions or None,
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
