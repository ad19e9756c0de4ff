"""Past one machine, on a Ray cluster (optional extra ``knnad[ray]``).

* :func:`fit_many`: one Ray task per job (a name and its normal images), each fitting a
  :class:`~knnad.Detector` and saving it as ``NAME.npz``; a failing job records its error and
  the others go on.
* :func:`predict_dataset`: a Ray Data pipeline scoring any number of image files with a saved
  model in a pool of actors that each load the model once; one Parquet row per image, written
  complete-or-absent.
* :class:`ShardedIndex`: the memory bank split over Ray actors each holding a
  :class:`~knnad.index.FlatL2Index`, searched in parallel with an exact top-k merge;
  :func:`shard_detector` makes it a fitted detector's index.

On the command line: ``knnad predict MODEL IMAGES --out DIR --ray [ADDRESS]`` and
``knnad fit-many``.

Ray is imported inside the functions that use it, so ``import knnad`` (and this module) works
without it; using them without Ray raises an ImportError naming the extra. ``address``: None
uses the Ray instance this process is connected to, or starts a local one; ``"auto"`` the
cluster started on this machine by ``ray start``; ``"host:port"`` a cluster's head (GCS port,
6379 by default); ``"ray://host:port"`` a Ray Client server. Image and model paths must be
readable where the workers run (a shared file system on a multi-node cluster); relative paths
are made absolute on the driver.
"""
from __future__ import annotations

import gc
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import check_bool, check_int, check_number, check_output_folder
from ._types import ArrayLike, PathLike
from .archive import ModelFileError, read_archive
from .decoding import decode_batch
from .detector import Detector
from .index import DEFAULT_MEMORY_BUDGET, ExactIndex, FlatL2Index, check_matrix, float32_rows
from .options import OPTIONS, check, validate
from .persistence import FORMAT_VERSION, KIND, saved_frame
from .preprocessing import Preprocessor, broken_link, image_files, upright_size
from .sources import image_items

logger = logging.getLogger(__name__)

#: What to install when Ray is missing.
RAY_EXTRA = "pip install 'knnad[ray]'"
#: Tries again of a block of images whose scoring actor died (killed, out of memory, node
#: lost; the actor itself is restarted each time), and of a fit task whose worker died. A block
#: that kills its actor this often fails the run (no output) instead of looping; a Python
#: exception is not retried: it is an image's or a job's own error.
MAX_RETRIES = 4
#: Seconds to wait for a cluster's head to accept a connection before calling it unreachable
#: (Ray itself waits minutes).
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """The ``ray`` module (with Ray Data), or an ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data: pyarrow, pandas)
    except ImportError as error:
        raise ImportError(f"knnad.distributed needs Ray with Ray Data (ray[data] >= 2.60, < 2.64): "
                          f"{RAY_EXTRA} ({error})") from error
    return ray


def _host_port(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address={address!r} is not a Ray cluster address; use None (this "
                         f"process's Ray, or a new local one), 'auto' (the cluster started here "
                         f"by 'ray start'), 'host:port' (the head's GCS port, 6379 by default) or "
                         f"'ray://host:port'")
    return host.strip("[]"), int(port)


def _local(host: str) -> bool:
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        return False
    return resolved.startswith("127.") or resolved in _node_addresses()


def _node_addresses() -> List[str]:
    try:
        return [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        return []


def connect(address: Optional[str] = None):
    """Connect this process to Ray at ``address`` (see the module docstring) and return ``ray``.

    Raises ValueError for a malformed address, or for one that is not the cluster this process
    is already connected to; ConnectionError, naming the address and what to do, when nothing
    answers there (checked within :data:`CONNECT_TIMEOUT_S`)."""
    ray = import_ray()
    if address is None:
        if not ray.is_initialized():
            logger.info("starting a local Ray instance (address=None); pass address='auto' or "
                        "'host:port' to use a running cluster")
            ray.init(logging_level=logging.WARNING)
        return ray
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be None or a string such as 'auto' or 'host:6379', got {address!r}")
    if address != "auto":
        host, port = _host_port(address[len("ray://"):] if address.startswith("ray://") else address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise ConnectionError(
                f"no Ray cluster answers at address={address!r} ({error}); start one with "
                f"'ray start --head' on that machine, check the host and port (the head's GCS "
                f"port, 6379 by default, or the Ray Client port 10001 for ray://), or pass "
                f"address=None to run on a local Ray instance") from None
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            current_host, current_port = _host_port(current)
            same = port == current_port and (host == current_host or (_local(host) and _local(current_host)))
            if not same and not address.startswith("ray://"):
                raise ValueError(f"this process is already connected to the Ray cluster at "
                                 f"{current}, not address={address!r}; call ray.shutdown() "
                                 f"first, or pass address=None to use the connected one")
            return ray
    elif ray.is_initialized():
        return ray
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as error:
        raise ConnectionError(f"no Ray cluster at address={address!r}: {error} Start one with "
                              f"'ray start --head', or pass address=None to run on a local Ray "
                              f"instance") from None
    return ray


def _absolute(path: PathLike) -> str:
    return os.path.abspath(os.fspath(path))


# --- fit_many ------------------------------------------------------------------------------

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
        return _absolute(images)
    if hasattr(images, "samples") or isinstance(images, (list, tuple)):
        items = image_items(images, f"job {name!r}", normal_only=True)
        return [_absolute(item) if isinstance(item, (str, os.PathLike)) else item for item in items]
    raise TypeError(f"job {name!r}: images must be a folder, a list of image paths or a knnad "
                    f"dataset, got {type(images).__name__}")


def _row(name: str, model: Optional[str], bank: Optional[int], seconds: float,
         error: Optional[str]) -> Dict[str, Any]:
    return {"name": name, "model": model, "bank_size": bank, "seconds": round(seconds, 3), "error": error}


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _fit_job(name: str, images: Any, model: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """One fit_many job, run in a Ray task: fit, save, and a row; an exception becomes the
    row's ``error`` (and no model file is written)."""
    start = time.perf_counter()
    try:
        detector = Detector(**params).fit(images)
        path = detector.save(model)
        return _row(name, str(path), len(detector.index_), time.perf_counter() - start, None)
    except Exception as error:  # the job's own failure: recorded, the other jobs go on
        logger.warning("fit_many: job %r failed: %s", name, error)
        return _row(name, None, None, time.perf_counter() - start, _error_text(error))


def fit_many(jobs: Iterable[Tuple[str, Any]], output_dir: PathLike, *, address: Optional[str] = None,
             num_cpus_per_job: float = 1, num_gpus_per_job: float = 0, **detector_params: Any
             ) -> List[Dict[str, Any]]:
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
    then reached at ``address``. Ctrl-C cancels the jobs not done.

    Returns one row per job, in the order of ``jobs``: ``name``, ``model`` (the file written,
    or None), ``bank_size`` (memory-bank rows), ``seconds`` (fit and save, in the task) and
    ``error`` (None, or the exception's type and message: a failing job, such as a folder
    without images, records it and the other jobs go on).
    """
    known = Detector._get_param_names()
    unknown = sorted(set(detector_params) - set(known))
    if unknown:
        raise ValueError(f"fit_many: Detector has no parameter(s) {unknown}; valid: {known}")
    params = {"progress": False, **detector_params}
    validate(Detector(**params).get_params())
    num_cpus_per_job = check_number(num_cpus_per_job, "num_cpus_per_job", 0.0)
    num_gpus_per_job = check_number(num_gpus_per_job, "num_gpus_per_job", 0.0)
    if params.get("device", "auto") == "auto" and not num_gpus_per_job:
        params["device"] = "cpu"  # Ray leaves every GPU visible to a task that asked for none
    out = Path(_absolute(check_output_folder(output_dir, "output_dir")))  # the tasks' cwd is not ours
    jobs = list(jobs)
    if not jobs:
        raise ValueError("fit_many: no jobs; give (name, images) pairs")
    if not all(isinstance(job, (tuple, list)) and len(job) == 2 for job in jobs):
        raise ValueError("fit_many: each job must be a (name, images) pair")
    names = [_job_name(name) for name, _ in jobs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"fit_many: job names must be unique (they name the model files); repeated: {repeated}")
    prepared: List[Any] = []
    for name, images in jobs:
        try:
            prepared.append(_job_images(name, images))
        except (ValueError, FileNotFoundError) as error:  # this job's error, recorded below
            prepared.append(error)
    ray = connect(address)
    out.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=num_cpus_per_job, num_gpus=num_gpus_per_job,
                      max_retries=MAX_RETRIES)(_fit_job)
    pending = {task.remote(name, images, str(out / f"{name}.npz"), params): row
               for row, (name, images) in enumerate(zip(names, prepared))
               if not isinstance(images, Exception)}
    rows: List[Optional[Dict[str, Any]]] = [
        _row(name, None, None, 0.0, _error_text(images)) if isinstance(images, Exception) else None
        for name, images in zip(names, prepared)]
    started = time.perf_counter()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            row = pending.pop(done[0])
            try:
                rows[row] = ray.get(done[0])
            except ray.exceptions.RayError as error:  # the worker died more than MAX_RETRIES times
                rows[row] = _row(names[row], None, None, time.perf_counter() - started,
                                 _error_text(error).splitlines()[0])
            logger.info("fit_many: %s %s (%d of %d jobs left)", names[row],
                        "failed" if rows[row]["error"] else "saved", len(pending), len(jobs))
    except BaseException:  # Ctrl-C: the jobs not done yet are cancelled
        for ref in pending:
            ray.cancel(ref)
        raise
    return rows  # type: ignore[return-value]


# --- predict_dataset -----------------------------------------------------------------------

#: Placement and weights are given to Detector.load; the predict-time options to set_params.
_LOAD_PARAMS = ("weights", "backend", "device")
_PREDICT_PARAMS = tuple(name for name, option in OPTIONS.items() if not option.refit)
#: The file that marks a folder as predict_dataset's output (and describes it).
MANIFEST = "_knnad.json"
#: Folder of the anomaly maps (``maps=True``) inside the output; the leading underscore makes
#: pyarrow, pandas and Ray skip it when they read the output as a Parquet dataset.
MAPS_FOLDER = "_maps"
#: Images per Ray Data block at most, and blocks per worker at least: small enough to spread
#: the images over the workers and to lose little work with a worker, large enough that the
#: per-task overhead stays small.
_BLOCK_BATCHES = 64
_BLOCKS_PER_WORKER = 4


def _schema(maps: bool):
    import pyarrow as pa

    fields = [("path", pa.string()), ("image_score", pa.float32()), ("label", pa.bool_()),
              ("map_max", pa.float32()), ("status", pa.string()), ("error", pa.string())]
    return pa.schema(fields + ([("map_file", pa.string())] if maps else []))


def _map_name(path: str) -> str:
    """The anomaly map file of image ``path``: unique per path, and the same in a retried task
    (which then overwrites the map of its failed try)."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{MAPS_FOLDER}/{Path(path).stem[:80]}-{digest}.npy"


def _preprocessor(model: Path) -> Preprocessor:
    """The preprocessing of the saved ``model``, from its file's header only (the scoring
    actors read and check the whole file)."""
    meta, _, _ = read_archive(model, KIND, FORMAT_VERSION, arrays=False)
    saved = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    defaults = Detector().get_params()
    geometry = {name: saved.get(name, defaults[name]) for name in ("image_size", "crop_size", "bit_depth")}
    try:
        return Preprocessor(**geometry, frame=saved_frame(model, geometry, meta))
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{model} holds an invalid setting ({error}); fit again and save a "
                             f"new model file") from None


class _Scorer:
    """The callable class of predict_dataset's actor pool: loads the model once, then scores
    the decoded images of each batch (rows that could not be decoded become skipped rows)."""

    def __init__(self, model: str, params: Dict[str, Any], batch_size: int, staging: Optional[str],
                 preprocessor: Preprocessor):
        load = {name: params[name] for name in _LOAD_PARAMS if name in params}
        self.detector = Detector.load(model, **load)
        predict = {name: value for name, value in params.items() if name not in load}
        # The decoded arrays no longer know their images' sizes: the detector gives maps at the
        # model's frame, and map_size="original" (params only) resizes each to its file's size.
        self.original = predict.pop("map_size", "processed") == "original"
        self.detector.set_params(**predict, batch_size=batch_size, progress=False, map_size="processed")
        if vars(self.detector.preprocessor_) != vars(preprocessor):
            raise RuntimeError(f"the images were decoded with {preprocessor!r}, but {model} "
                               f"prepares them with {self.detector.preprocessor_!r}; report this "
                               f"knnad bug")
        self.staging = staging

    def _save_map(self, path: str, anomaly_map: np.ndarray) -> str:
        name = _map_name(path)
        target = os.path.join(self.staging, name)
        partial = f"{target}.{os.getpid()}.partial"
        with open(partial, "wb") as handle:
            np.save(handle, anomaly_map)
        os.replace(partial, target)
        return name

    def __call__(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa

        paths = [str(path) for path in batch["path"]]
        decoded = [row for row, error in enumerate(batch["error"]) if not error]
        columns: Dict[str, list] = {name: [] for name in _schema(self.staging is not None).names}
        # Indexing copies the images: Ray's arrays are read-only, torch wants writable ones.
        predictions = self.detector.predict_batches(batch["image"][decoded]) if decoded else []
        rows = iter(decoded)
        for prediction in predictions:
            labels = [None] * len(prediction) if prediction.labels is None else prediction.labels
            for score, anomaly_map, label in zip(prediction.image_scores, prediction.anomaly_maps, labels):
                path = paths[next(rows)]
                if self.original:
                    width, height = upright_size(path)
                    anomaly_map = self.detector.preprocessor_.original_maps(anomaly_map[None],
                                                                            [(height, width)])[0]
                columns["path"].append(path)
                columns["image_score"].append(float(score))
                columns["label"].append(None if label is None else bool(label))
                columns["map_max"].append(float(anomaly_map.max()))
                columns["status"].append("scored")
                columns["error"].append(None)
                if self.staging is not None:
                    columns["map_file"].append(self._save_map(path, anomaly_map))
        for row, error in enumerate(batch["error"]):
            if error:
                for name, values in columns.items():
                    values.append(paths[row] if name == "path" else "skipped" if name == "status"
                                  else str(error) if name == "error" else None)
        return pa.Table.from_pydict(columns, schema=_schema(self.staging is not None))


def _is_ray_dataset(images: Any) -> bool:
    data = sys.modules.get("ray.data")
    return data is not None and isinstance(images, data.Dataset)


def _paths(images: Any) -> List[str]:
    """Absolute paths of ``images``: a folder, an image file, a glob pattern, a list of paths or
    a knnad dataset. Broken symbolic links are kept: their rows are skipped, naming them."""
    if isinstance(images, (str, os.PathLike)):
        text = os.fspath(images)
        if not os.path.exists(text) and glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True)
                           if os.path.isfile(p) or broken_link(Path(p)))
            if not found:
                raise FileNotFoundError(f"images: no file matches the pattern {text!r}")
            return [_absolute(p) for p in found]
        try:
            return [_absolute(p) for p in image_files(text)]
        except FileNotFoundError as error:
            raise FileNotFoundError(f"images: {error}") from None
    if hasattr(images, "samples"):
        return [_absolute(sample.path) for sample in images.samples]
    if isinstance(images, (list, tuple)):
        bad = [item for item in images if not isinstance(item, (str, os.PathLike))]
        if bad:
            raise TypeError(f"images: list items must be image paths, got {type(bad[0]).__name__}")
        return [_absolute(item) for item in images]
    raise TypeError(f"images must be a folder, an image file, a glob pattern, a list of image paths, a "
                    f"knnad dataset or a Ray Dataset with a 'path' column; got {type(images).__name__}")


#: What predict_dataset itself sets on the loaded model.
_OWN_PARAMS = ("batch_size", "progress", "on_error")


def _checked_params(params: Optional[Dict[str, Any]], num_gpus: float) -> Dict[str, Any]:
    """``params`` checked; ``device`` "auto" (the default) the actor's GPU where it has one,
    else the CPU: Ray leaves every GPU visible to an actor that asked for none."""
    allowed = _LOAD_PARAMS + tuple(name for name in _PREDICT_PARAMS if name not in _OWN_PARAMS)
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"params {unknown}: a saved model takes here the placement, weights and "
                         f"predict-time options {', '.join(allowed)} (batch_size is an argument; "
                         f"unreadable images are always skipped)")
    if params.get("device", "auto") == "auto":
        params["device"] = "auto" if num_gpus else "cpu"
    return {name: value if name == "weights" else check(name, value) for name, value in params.items()}


def _check_output(output: Path) -> None:
    """An output that can be replaced at the end: a new path, an empty folder or an earlier
    output of predict_dataset; in a folder that exists or can be created, and is writable."""
    if output.exists() and not (output.is_dir() and (not any(output.iterdir()) or (output / MANIFEST).is_file())):
        raise FileExistsError(f"output {output} exists and is not an output of predict_dataset; "
                              f"choose a new folder or remove it")
    check_output_folder(output.parent, "output's folder")


def _count(staging: Path) -> Tuple[int, int]:
    """``(rows, skipped)`` of the Parquet files in ``staging``, reading the status column only,
    file by file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = skipped = 0
    for path in sorted(staging.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["status"]):
            rows += batch.num_rows
            skipped += pc.sum(pc.equal(batch.column(0), "skipped")).as_py() or 0
    return rows, skipped


def _put_in_place(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``; an earlier output there is swapped out, then removed."""
    if output.is_dir() and any(output.iterdir()):
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def predict_dataset(model: PathLike, images: Any, output: PathLike, *, num_workers: Optional[int] = None,
                    num_gpus_per_worker: float = 0, num_cpus_per_worker: float = 1, batch_size: int = 8,
                    maps: bool = False, address: Optional[str] = None,
                    params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Score ``images`` with the saved ``model`` on a Ray cluster; one Parquet row per image.

    A Ray Data pipeline in two stages. Ray tasks (one CPU each, as many as the free CPUs
    allow) decode the image files and preprocess them as the model does, in batches of
    ``batch_size``; files that cannot be read are passed on as skipped. A pool of
    ``num_workers`` actors (None: as many as Ray Data scales to), each with
    ``num_cpus_per_worker`` CPUs (its torch threads) and ``num_gpus_per_worker`` GPUs, loads the
    model file once and scores the decoded batches. Ray Data streams the blocks with
    backpressure, so the workers' memory stays bounded whatever the number of images; the
    driver holds the list of paths (about 240 bytes each, with their Arrow copy; nothing for a
    Ray Dataset read lazily). Ray Data shows the progress. An actor that dies (killed, out of memory) is
    restarted and its block scored again: every image gets exactly one row. With a fixed
    ``num_workers``, the workers must leave the decoding at least one of the cluster's CPUs.

    ``images``: a folder, an image file, a glob pattern (``"archive/**/*.png"``), a list of
    paths, a knnad dataset, or a ``ray.data.Dataset`` with a ``path`` column (any other column
    is dropped; repartition it for parallelism; its paths are read as the workers see them,
    and its rows are not counted against the output). ``params``: overrides of the saved
    model's ``weights``, ``backend``, ``device`` (by default the actor's GPU with
    ``num_gpus_per_worker``, else the CPU) and predict-time options (``k``, ``sigma`` ...;
    ``map_size``: "processed", the default whatever the model's, or "original" for a
    whole-image model: each map resized to its image's size, as Detector.predict does).

    ``output``: a folder of Parquet files with the columns ``path`` (absolute), ``image_score``,
    ``label`` (True = anomalous; null when the model is not calibrated for its settings),
    ``map_max`` (the anomaly map's maximum), ``status`` (``"scored"`` or ``"skipped"``: the
    file could not be read; the scores are then null), ``error`` (why it was skipped; null for
    a scored image) and, with ``maps=True``, ``map_file``: the map as float32 ``[H, W]`` (the
    model's frame: its crop, or a whole-image model's frame; the image's size with
    ``params={"map_size": "original"}``) ``.npy`` file, relative to ``output`` (under
    ``_maps/``). Rows are in no particular order.
    Written complete-or-absent: into a hidden folder next to ``output``, renamed to it at the
    end and removed on failure; an earlier output of predict_dataset there is replaced, any
    other existing folder refused.

    Returns ``{"output", "images", "scored", "skipped", "seconds"}``.
    """
    batch_size = check_int(batch_size, "batch_size")
    num_workers = None if num_workers is None else check_int(num_workers, "num_workers")
    num_gpus_per_worker = check_number(num_gpus_per_worker, "num_gpus_per_worker", 0.0)
    num_cpus_per_worker = check_number(num_cpus_per_worker, "num_cpus_per_worker", 0.0)
    maps = check_bool(maps, "maps")
    params = _checked_params(params, num_gpus_per_worker)
    model = Path(_absolute(model))
    if not model.is_file():
        raise FileNotFoundError(f"model {model} is not a file; name a model written by knnad "
                                f"fit or Detector.save")
    preprocessor = _preprocessor(model)
    if params.get("map_size") == "original" and preprocessor.crop_size is not None:
        raise ValueError(f"params map_size='original' needs a whole-image model, and {model} "
                         f"crops (crop_size={preprocessor.crop_size}): its maps do not cover the "
                         f"images' borders; use map_size='processed', or a model fitted with "
                         f"crop_size=None")
    output = Path(_absolute(output))
    _check_output(output)
    paths = None if _is_ray_dataset(images) else _paths(images)
    if paths is not None and not paths:
        raise ValueError(f"images: {images!r} holds no image")
    ray = connect(address)
    cpus = ray.cluster_resources().get("CPU", 0)
    if num_workers and cpus - num_workers * num_cpus_per_worker < 1:
        raise ValueError(f"num_workers={num_workers} scoring workers of num_cpus_per_worker="
                         f"{num_cpus_per_worker:g} CPUs leave none of the cluster's {cpus:g} CPUs "
                         f"to the decoding tasks, and the run would wait forever: use fewer "
                         f"workers, fewer CPUs per worker (e.g. num_cpus_per_worker=0.5) or "
                         f"num_workers=None")
    import pyarrow as pa

    if paths is None:
        if "path" not in images.schema().names:
            raise ValueError(f"images: the Ray Dataset has no 'path' column (columns: "
                             f"{images.schema().names})")
        source = images.select_columns(["path"])
    else:
        workers = num_workers or max(1, int(cpus))
        blocks = max(-(-len(paths) // (batch_size * _BLOCK_BATCHES)),
                     min(-(-len(paths) // batch_size), _BLOCKS_PER_WORKER * workers))
        size = -(-len(paths) // blocks)  # one Arrow table per block: no repartition task
        source = ray.data.from_arrow([pa.table({"path": paths[i:i + size]}) for i in range(0, len(paths), size)])
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    failure: Optional[BaseException] = None
    try:
        staging.mkdir(parents=True)
        if maps:
            (staging / MAPS_FOLDER).mkdir()
        try:
            scored = _pipeline(ray, source, preprocessor, str(model), params, staging if maps else None,
                               num_workers, num_cpus_per_worker, num_gpus_per_worker, batch_size)
            scored.write_parquet(str(staging))
        except ray.exceptions.RayError as error:
            failure = _worker_failure(error, output)
        if failure is not None:
            # Ray's error and its traceback form reference cycles holding the pipeline, whose
            # actors keep their CPUs and GPUs until the cycles are collected: collect them now.
            gc.collect()
        else:
            rows, skipped = _count(staging)
            if paths is not None and rows != len(paths):
                failure = RuntimeError(f"predict_dataset wrote {rows} rows for {len(paths)} "
                                       f"images; nothing was written to {output}")
        if failure is not None:
            raise failure
        seconds = time.perf_counter() - start
        summary = {"output": str(output), "images": rows, "scored": rows - skipped,
                   "skipped": skipped, "seconds": round(seconds, 3)}
        manifest = {**summary, "model": str(model), "params": {k: repr(v) for k, v in params.items()},
                    "maps": maps, "columns": _schema(maps).names}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _put_in_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("predict_dataset: %d images scored, %d skipped, in %.1f s -> %s", rows - skipped,
                skipped, seconds, output)
    return {**summary, "output": output}


def _pipeline(ray, source, preprocessor: Preprocessor, model: str, params: Dict[str, Any],
              staging: Optional[Path], num_workers: Optional[int], num_cpus: float, num_gpus: float,
              batch_size: int):
    """The Ray Dataset of :func:`predict_dataset`'s rows (lazy): ``source``'s paths decoded by
    Ray tasks, then scored by the actor pool; the maps are saved into ``staging``'s
    ``_maps/`` (None: no maps)."""
    decoded = source.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",
                                 fn_kwargs={"preprocessor": preprocessor}, num_cpus=1)
    pool = (ray.data.ActorPoolStrategy(size=num_workers) if num_workers
            else ray.data.ActorPoolStrategy(min_size=1, max_size=None))
    with warnings.catch_warnings():
        # The actors are restarted whenever they die (Ray Data's default too) and a batch is
        # tried again at most MAX_RETRIES times (Ray Data's default: without end). Ray 2.60
        # deprecates these ray_remote_args of map_batches for removal in Ray 2.64, without a
        # named replacement (hence knnad[ray] requires ray < 2.64); its warning is silenced here.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return decoded.map_batches(
            _Scorer, compute=pool, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"model": model, "params": params, "batch_size": batch_size,
                                   "staging": None if staging is None else str(staging),
                                   "preprocessor": preprocessor},
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=MAX_RETRIES)


#: The line of a worker's traceback that names the exception: ``ValueError: k must be ...``.
_EXCEPTION_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b[^:\n]*:.*$", re.M)


def _worker_failure(error: BaseException, output: Path) -> RuntimeError:
    """A RuntimeError with the worker's exception line, for a pipeline that failed. Ray's error
    is not kept (as cause or context): its traceback holds the pipeline, whose actors would
    hold their CPUs and GPUs for as long as the caller keeps the exception."""
    text = str(error)
    found = _EXCEPTION_LINE.search(text)
    reason = found.group(0) if found else f"{type(error).__name__}: {text.strip().splitlines()[-1]}"
    kept = " (the earlier output there is kept)" if (output / MANIFEST).is_file() else ""
    return RuntimeError(f"predict_dataset failed in a Ray worker: {reason}; nothing was written to "
                        f"{output}{kept}")


# --- ShardedIndex --------------------------------------------------------------------------

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
        return np.concatenate([self.index.rows(start, stop).cpu().numpy() for start, stop in ranges])




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

    def __init__(self, dim: int, num_shards: int = 2, *, backend: str = "auto", device: str = "auto",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, rerank: int = 0,
                 num_cpus_per_shard: float = 1, num_gpus_per_shard: float = 0,
                 address: Optional[str] = None, placement_timeout: float = 60):
        self._dim = check_int(dim, "dim")
        self.num_shards = check_int(num_shards, "num_shards")
        num_cpus = check_number(num_cpus_per_shard, "num_cpus_per_shard", 0.0)
        num_gpus = check_number(num_gpus_per_shard, "num_gpus_per_shard", 0.0)
        placement_timeout = check_number(placement_timeout, "placement_timeout", 0.0, " (seconds)")
        if device == "auto" and num_gpus == 0:
            device = "cpu"  # not a GPU the actor was not given
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
                f"ShardedIndex: only {started} of num_shards={self.num_shards} shards started within "
                f"placement_timeout={placement_timeout:g} s; each asks for num_cpus_per_shard="
                f"{num_cpus:g} CPUs and num_gpus_per_shard={num_gpus:g} GPUs, and the cluster had "
                f"{free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} "
                f"of {total.get('GPU', 0):g} GPUs free: use fewer shards or fewer CPUs per shard "
                f"(e.g. num_cpus_per_shard=0.25), free or add resources, or wait longer "
                f"(placement_timeout)")
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
        return (f"ShardedIndex(dim={self._dim}, shards={self.num_shards}, backend={self._backend!r}, "
                f"device={self._device!r}, size={self._count}, rows per shard={self._sizes})")

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
        order = np.argsort(indices, axis=1, kind="stable")  # by row, then stably by distance
        distances, indices = np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
        order = np.argsort(distances, axis=1, kind="stable")
        distances, indices = np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
        return np.ascontiguousarray(distances[:, :k]), np.ascontiguousarray(indices[:, :k])

    def _queries(self, queries: ArrayLike):
        checked = check_matrix(queries, "queries", self._dim)
        return import_ray().put(float32_rows(checked, 0, checked.shape[0]).cpu().numpy())

    def search(self, queries: ArrayLike, k: int, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
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
                    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair)
                    and previous <= pair[0] <= pair[1] <= self._count):
                raise ValueError(f"ranges must be ascending, disjoint (start, stop) int pairs within "
                                 f"[0, {self._count}]; got {pair!r} after stop {previous}")
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
                calls.append((shard, self._actors[shard].search_among.remote(block, min(k, rows), local)))
        found = ray.get([call for _, call in calls])
        return self._merge([(shard, result) for (shard, _), result in zip(calls, found)], k)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Stored vectors ``start:stop`` (``0 <= start <= stop <= len(self)``), float32
        ``[stop - start, dim]`` on the CPU (a copy)."""
        self._check_open("rows")
        start = check_int(start, "start", 0, self._count, f" (rows stored: {self._count})")
        stop = check_int(stop, "stop", start, self._count, f" (from start={start} to the {self._count} rows stored)")
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
        raise RuntimeError("shard_detector before fit: call fit(normal_images) or Detector.load(path) first")
    config = detector.config_
    options = {"backend": config["backend"], "device": config["device"], "rerank": config["rerank"], **options}
    for scale in detector.scales_:
        bank = scale.index
        sharded = ShardedIndex(bank.dim, num_shards, **options)
        for start in range(0, len(bank), _SHARD_CHUNK):
            sharded.add(bank.rows(start, min(start + _SHARD_CHUNK, len(bank))))
        scale.index = sharded
    return detector
