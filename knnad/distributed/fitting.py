""":func:`fit_many`: one Ray task per job, each fitting a :class:`~knnad.Detector` on its normal
images and saving it; a failing job records its error and the others go on."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .._checks import check_number, check_output_folder
from .._types import PathLike
from ..detector import Detector
from ..options import validate
from ..sources import image_items
from .connection import absolute, connect
from .failures import MAX_RETRIES, error_text, failure_text

logger = logging.getLogger(__name__)


def _job_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") \
            or any(char in name for char in '/\\:*?"<>|\0'):
        raise ValueError(f"job name {name!r}: a job's name is its model's file name; use a "
                         f"non-empty name without path separators or wildcards")
    return name


def _job_images(name: str, images: Any) -> Any:
    """What a fit task receives for ``images``: a folder or paths made absolute, or a knnad
    dataset's normal images as absolute paths (ValueError for one that holds defects)."""
    if isinstance(images, (str, os.PathLike)):
        return absolute(images)
    if hasattr(images, "samples") or isinstance(images, (list, tuple)):
        items = image_items(images, f"job {name!r}", normal_only=True)
        return [absolute(item) if isinstance(item, (str, os.PathLike)) else item
                for item in items]
    raise TypeError(f"job {name!r}: images must be a folder, a list of image paths or a knnad "
                    f"dataset, got {type(images).__name__}")


def _row(name: str, model: Optional[str], bank: Optional[int], seconds: float,
         error: Optional[str]) -> Dict[str, Any]:
    return {"name": name, "model": model, "bank_size": bank, "seconds": round(seconds, 3),
            "error": error}


def _fit_job(name: str, images: Any, model: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """One fit_many job, run in a Ray task: fit, save, and a row; an exception becomes the
    row's ``error`` (and no model file is written)."""
    start = time.perf_counter()
    try:
        detector = Detector(**params).fit(images)
        path = detector.save(model)
        bank = sum(len(scale.index) for scale in detector.scales_)
        return _row(name, str(path), bank, time.perf_counter() - start, None)
    except Exception as error:  # the job's own failure: recorded, the other jobs go on
        logger.warning("fit_many: job %r failed: %s", name, error)
        return _row(name, None, None, time.perf_counter() - start, error_text(error))


def _checked_params(detector_params: Dict[str, Any], num_gpus_per_job: float) -> Dict[str, Any]:
    """The Detector's parameters of every job, checked; ``progress`` False unless given, and
    ``device`` "auto" the CPU for a task without a GPU."""
    known = Detector._get_param_names()
    unknown = sorted(set(detector_params) - set(known))
    if unknown:
        raise ValueError(f"fit_many: Detector has no parameter(s) {unknown}; valid: {known}")
    params = {"progress": False, **detector_params}
    validate(Detector(**params).get_params())
    if params.get("device", "auto") == "auto" and not num_gpus_per_job:
        params["device"] = "cpu"  # Ray leaves every GPU visible to a task that asked for none
    return params


def _checked_jobs(jobs: Iterable[Tuple[str, Any]]) -> Tuple[List[str], List[Any]]:
    """The jobs' names (checked, unique) and what each task receives for its images, or the
    exception that fails the job (recorded in its row, no task started)."""
    jobs = list(jobs)
    if not jobs:
        raise ValueError("fit_many: no jobs; give (name, images) pairs")
    if not all(isinstance(job, (tuple, list)) and len(job) == 2 for job in jobs):
        raise ValueError("fit_many: each job must be a (name, images) pair")
    names = [_job_name(name) for name, _ in jobs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"fit_many: job names must be unique (they name the model files); "
                         f"repeated: {repeated}")
    prepared: List[Any] = []
    for name, images in jobs:
        try:
            prepared.append(_job_images(name, images))
        except (ValueError, FileNotFoundError) as error:  # this job's error, recorded below
            prepared.append(error)
    return names, prepared


def fit_many(jobs: Iterable[Tuple[str, Any]], output_dir: PathLike, *,
             address: Optional[str] = None, num_cpus_per_job: float = 1,
             num_gpus_per_job: float = 0, **detector_params: Any) -> List[Dict[str, Any]]:
    """Fit one :class:`~knnad.Detector` per job, each in its own Ray task, and save it as
    ``output_dir/NAME.npz``.

    ``jobs``: ``(name, images)`` pairs, ``images`` a folder, a list of image paths or a knnad
    dataset of normal images (e.g. ``MVTecAD(root, category, "train")``); names are unique and
    become file names. ``detector_params``: the Detector's parameters for every job
    (``progress`` is False unless given). Each task takes ``num_cpus_per_job`` CPUs and
    ``num_gpus_per_job`` GPUs; ``device="auto"`` (the default) is the task's GPU, and the CPU
    for a task without one (Ray leaves every GPU visible to a task that asked for none; the
    model file records "cpu" then, and ``Detector.load(path, device=...)`` places it anew). The
    output folder, the parameters and the job list are checked before any task starts; Ray is
    then reached at ``address``. Ctrl-C cancels the jobs not done. A task whose worker dies
    (killed, out of memory, node lost) runs again, :data:`~knnad.distributed.MAX_RETRIES`
    times at most.

    Returns one row per job, in the order of ``jobs``: ``name``, ``model`` (the file written,
    or None), ``bank_size`` (memory-bank rows of all scales), ``seconds`` (fit and save, in the
    task) and ``error`` (None, or the exception's type and message: a failing job, such as a folder
    without images, records it and the other jobs go on; a job whose worker died every time,
    Ray's error).
    """
    num_cpus_per_job = check_number(num_cpus_per_job, "num_cpus_per_job", 0.0)
    num_gpus_per_job = check_number(num_gpus_per_job, "num_gpus_per_job", 0.0)
    params = _checked_params(detector_params, num_gpus_per_job)
    # The tasks' working folder is not this process's.
    out = Path(absolute(check_output_folder(output_dir, "output_dir")))
    names, prepared = _checked_jobs(jobs)
    ray = connect(address)
    out.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=num_cpus_per_job, num_gpus=num_gpus_per_job,
                      max_retries=MAX_RETRIES)(_fit_job)
    pending = {task.remote(name, images, str(out / f"{name}.npz"), params): row
               for row, (name, images) in enumerate(zip(names, prepared))
               if not isinstance(images, Exception)}
    rows: List[Optional[Dict[str, Any]]] = [
        _row(name, None, None, 0.0, error_text(images)) if isinstance(images, Exception) else None
        for name, images in zip(names, prepared)]
    started = time.perf_counter()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            row = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as error:  # the worker died more than MAX_RETRIES times
                result = _row(names[row], None, None, time.perf_counter() - started,
                              failure_text(error))
            rows[row] = result
            logger.info("fit_many: %s %s (%d of %d jobs left)", names[row],
                        "failed" if result["error"] else "saved", len(pending), len(names))
    except BaseException:  # Ctrl-C: the jobs not done yet are cancelled
        for ref in pending:
            ray.cancel(ref)
        raise
    return rows  # type: ignore[return-value]  # every job has its row by now
