""":func:`predict_dataset`: a Ray Data pipeline that scores any number of image files with a
saved model, its decoding stage in Ray tasks (:mod:`knnad.decoding`) and its scoring stage in a
pool of actors (:mod:`knnad.distributed.scorer`); one Parquet row per image, written
complete-or-absent."""
from __future__ import annotations

import gc
import glob
import json
import logging
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._checks import check_bool, check_int, check_number, check_output_folder
from .._types import PathLike
from ..archive import ModelFileError, read_archive
from ..decoding import decode_batch
from ..detector import Detector
from ..options import OPTIONS, check
from ..persistence import FORMAT_VERSION, KIND, saved_frame
from ..preprocessing import Preprocessor, broken_link, image_files
from .connection import absolute, connect
from .failures import MAX_RETRIES, failure_text
from .scorer import LOAD_PARAMS, MAPS_FOLDER, _Scorer, schema

logger = logging.getLogger(__name__)

#: The file that marks a folder as predict_dataset's output (and describes it).
MANIFEST = "_knnad.json"
#: The predict-time options of a saved model, but for those predict_dataset sets itself.
_PREDICT_PARAMS = tuple(name for name, option in OPTIONS.items() if not option.refit
                        and name not in ("batch_size", "progress", "on_error"))
#: Images per Ray Data block at most, and blocks per worker at least: small enough to spread
#: the images over the workers and to lose little work with a worker, large enough that the
#: per-task overhead stays small.
_BLOCK_BATCHES = 64
_BLOCKS_PER_WORKER = 4


def predict_dataset(model: PathLike, images: Any, output: PathLike, *,
                    num_workers: Optional[int] = None, num_gpus_per_worker: float = 0,
                    num_cpus_per_worker: float = 1, batch_size: int = 8, maps: bool = False,
                    address: Optional[str] = None,
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
    Ray Dataset read lazily). Ray Data shows the progress. An actor that dies (killed, out of
    memory) is restarted and its block scored again (:data:`~knnad.distributed.MAX_RETRIES`
    times at most): every image gets exactly one row. With a fixed ``num_workers``, the workers
    must leave the decoding at least one of the cluster's CPUs.

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
    other existing folder refused. A failure in a worker raises a RuntimeError naming the
    worker's exception (its type and message), or Ray's error for a worker that died.

    Returns ``{"output", "images", "scored", "skipped", "seconds"}``.
    """
    batch_size = check_int(batch_size, "batch_size")
    num_workers = None if num_workers is None else check_int(num_workers, "num_workers")
    num_gpus_per_worker = check_number(num_gpus_per_worker, "num_gpus_per_worker", 0.0)
    num_cpus_per_worker = check_number(num_cpus_per_worker, "num_cpus_per_worker", 0.0)
    maps = check_bool(maps, "maps")
    params = _checked_params(params, num_gpus_per_worker)
    model = Path(absolute(model))
    preprocessor = _model_preprocessor(model, params)
    output = Path(absolute(output))
    _check_output(output)
    paths = None if _is_ray_dataset(images) else _paths(images)
    if paths is not None and not paths:
        raise ValueError(f"images: {images!r} holds no image")
    ray = connect(address)
    workers = _check_workers(ray, num_workers, num_cpus_per_worker)
    source = _source(ray, images, paths, batch_size, workers)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        staging.mkdir(parents=True)
        if maps:
            (staging / MAPS_FOLDER).mkdir()
        scored = _pipeline(ray, source, preprocessor, str(model), params,
                           staging if maps else None, num_workers, num_cpus_per_worker,
                           num_gpus_per_worker, batch_size)
        rows, skipped = _write(ray, scored, staging, output,
                               None if paths is None else len(paths))
        summary = {"output": str(output), "images": rows, "scored": rows - skipped,
                   "skipped": skipped, "seconds": round(time.perf_counter() - start, 3)}
        manifest = {**summary, "model": str(model), "maps": maps, "columns": schema(maps).names,
                    "params": {name: repr(value) for name, value in params.items()}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _put_in_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("predict_dataset: %d images scored, %d skipped, in %.1f s -> %s", rows - skipped,
                skipped, summary["seconds"], output)
    return {**summary, "output": output}


# --- the steps of predict_dataset, in their order ------------------------------------------

def _checked_params(params: Optional[Dict[str, Any]], num_gpus: float) -> Dict[str, Any]:
    """``params`` checked; ``device`` "auto" (the default) the actor's GPU where it has one,
    else the CPU: Ray leaves every GPU visible to an actor that asked for none."""
    allowed = LOAD_PARAMS + _PREDICT_PARAMS
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"params {unknown}: a saved model takes here the placement, weights and "
                         f"predict-time options {', '.join(allowed)} (batch_size is an argument; "
                         f"unreadable images are always skipped)")
    if params.get("device", "auto") == "auto":
        params["device"] = "auto" if num_gpus else "cpu"
    return {name: value if name == "weights" else check(name, value)
            for name, value in params.items()}


def _model_preprocessor(model: Path, params: Dict[str, Any]) -> Preprocessor:
    """The preprocessing of the saved ``model``, from its file's header only (the scoring
    actors read and check the whole file); FileNotFoundError for a missing file,
    ModelFileError for an invalid one, ValueError where ``params`` ask for maps of the images'
    size (``map_size="original"``) from a model that crops."""
    if not model.is_file():
        raise FileNotFoundError(f"model {model} is not a file; name a model written by knnad "
                                f"fit or Detector.save")
    meta, _, _ = read_archive(model, KIND, FORMAT_VERSION, arrays=False)
    stored = meta.get("params")
    saved = stored if isinstance(stored, dict) else {}
    defaults = Detector().get_params()
    geometry = {name: saved.get(name, defaults[name])
                for name in ("image_size", "crop_size", "bit_depth")}
    try:
        preprocessor = Preprocessor(**geometry, frame=saved_frame(model, geometry, meta))
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{model} holds an invalid setting ({error}); fit again and save a "
                             f"new model file") from None
    if params.get("map_size") == "original" and preprocessor.crop_size is not None:
        raise ValueError(f"params map_size='original' needs a whole-image model, and {model} "
                         f"crops (crop_size={preprocessor.crop_size}): its maps do not cover the "
                         f"images' borders; use map_size='processed', or a model fitted with "
                         f"crop_size=None")
    return preprocessor


def _check_output(output: Path) -> None:
    """An output that can be replaced at the end: a new path, an empty folder or an earlier
    output of predict_dataset; in a folder that exists or can be created, and is writable."""
    replaceable = output.is_dir() and (not any(output.iterdir())
                                       or (output / MANIFEST).is_file())
    if output.exists() and not replaceable:
        raise FileExistsError(f"output {output} exists and is not an output of predict_dataset; "
                              f"choose a new folder or remove it")
    check_output_folder(output.parent, "output's folder")


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
            return [absolute(p) for p in found]
        try:
            return [absolute(p) for p in image_files(text)]
        except FileNotFoundError as error:
            raise FileNotFoundError(f"images: {error}") from None
    if hasattr(images, "samples"):
        return [absolute(sample.path) for sample in images.samples]
    if isinstance(images, (list, tuple)):
        bad = [item for item in images if not isinstance(item, (str, os.PathLike))]
        if bad:
            raise TypeError(f"images: list items must be image paths, got "
                            f"{type(bad[0]).__name__}")
        return [absolute(item) for item in images]
    raise TypeError(f"images must be a folder, an image file, a glob pattern, a list of image "
                    f"paths, a knnad dataset or a Ray Dataset with a 'path' column; got "
                    f"{type(images).__name__}")


def _check_workers(ray, num_workers: Optional[int], num_cpus_per_worker: float) -> int:
    """The scoring workers to plan the blocks for: ``num_workers``, or one per CPU of the
    cluster; a ValueError for a fixed number that would leave the decoding no CPU (the run
    would wait forever)."""
    cpus = ray.cluster_resources().get("CPU", 0)
    if num_workers and cpus - num_workers * num_cpus_per_worker < 1:
        raise ValueError(f"num_workers={num_workers} scoring workers of num_cpus_per_worker="
                         f"{num_cpus_per_worker:g} CPUs leave none of the cluster's {cpus:g} CPUs "
                         f"to the decoding tasks, and the run would wait forever: use fewer "
                         f"workers, fewer CPUs per worker (e.g. num_cpus_per_worker=0.5) or "
                         f"num_workers=None")
    return num_workers or max(1, int(cpus))


def _source(ray, images: Any, paths: Optional[List[str]], batch_size: int, workers: int):
    """The Ray Dataset of the images' paths (one ``path`` column): the given Ray Dataset's, or
    ``paths`` in at least :data:`_BLOCKS_PER_WORKER` blocks per worker (fewer for few images:
    one batch each at least) of at most :data:`_BLOCK_BATCHES` batches."""
    if paths is None:
        if "path" not in images.schema().names:
            raise ValueError(f"images: the Ray Dataset has no 'path' column (columns: "
                             f"{images.schema().names})")
        return images.select_columns(["path"])
    import pyarrow as pa

    blocks = max(-(-len(paths) // (batch_size * _BLOCK_BATCHES)),
                 min(-(-len(paths) // batch_size), _BLOCKS_PER_WORKER * workers))
    size = -(-len(paths) // blocks)  # one Arrow table per block: no repartition task
    return ray.data.from_arrow([pa.table({"path": paths[i:i + size]})
                                for i in range(0, len(paths), size)])


def _pipeline(ray, source, preprocessor: Preprocessor, model: str, params: Dict[str, Any],
              staging: Optional[Path], num_workers: Optional[int], num_cpus: float,
              num_gpus: float, batch_size: int):
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


def _write(ray, scored, staging: Path, output: Path, expected: Optional[int]) -> Tuple[int, int]:
    """Run the pipeline ``scored``, writing its rows as Parquet files into ``staging``; returns
    ``(rows, skipped)``. A RuntimeError (:func:`_worker_failure`) when it fails in a worker, or
    when it wrote other than ``expected`` rows (None: a Ray Dataset's, not counted).

    For the run, the pipeline's ``DataContext.raise_original_map_exception`` is set, so that an
    exception of the scoring actors reaches this process as itself, not as its text
    (:mod:`knnad.distributed.failures`); the context is shared with the Ray Dataset given as
    ``images``, and restored after."""
    context = scored.context
    before = context.raise_original_map_exception
    context.raise_original_map_exception = True
    failure = None
    try:
        scored.write_parquet(str(staging))
    except ray.exceptions.RayError as error:
        failure = _worker_failure(error, output)
    finally:
        context.raise_original_map_exception = before
    if failure is not None:
        # Ray's error and its traceback form reference cycles holding the pipeline, whose
        # actors keep their CPUs and GPUs until the cycles are collected: collect them now.
        gc.collect()
        raise failure
    rows, skipped = _count(staging)
    if expected is not None and rows != expected:
        raise RuntimeError(f"predict_dataset wrote {rows} rows for {expected} images; nothing "
                           f"was written to {output}")
    return rows, skipped


def _worker_failure(error: BaseException, output: Path) -> RuntimeError:
    """A RuntimeError naming the worker's exception (:func:`failure_text`), for a pipeline that
    failed. Ray's error is not kept (as cause or context): its traceback holds the pipeline,
    whose actors would hold their CPUs and GPUs for as long as the caller keeps the
    exception."""
    kept = " (the earlier output there is kept)" if (output / MANIFEST).is_file() else ""
    return RuntimeError(f"predict_dataset failed in a Ray worker: {failure_text(error)}; nothing "
                        f"was written to {output}{kept}")


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
