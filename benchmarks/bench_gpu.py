"""Every GPU check of issue #22 in one command: exact search, coreset, the Detector end to end
and the decoding ceiling, on one CUDA device with the torch backend (no faiss needed), against
the CPU of the same machine.

  # The first CUDA GPU -> results/gpu-bottle-gpu.{md,json}:
  python benchmarks/bench_gpu.py
  # The whole script on a CPU, < 2 min, into a temporary folder:
  python benchmarks/bench_gpu.py --device cpu --quick
  # An MVTec AD root and local weights:
  python benchmarks/bench_gpu.py --data DIR --weights mobilenet_v2-b0353104.pth
  # Data and weights for a GPU machine:
  python benchmarks/bench_gpu.py --pack [DIR] [--pack-mib 56]

On a GPU machine lent through the run tool, which copies the working tree (tracked files and
untracked ones git does not ignore) and the git-ignored paths named in its carry list, 64 MiB in
all, and where ../shared, the internet and faiss are missing (Ray may be too):

  1. Here, at the commit to measure: ``python benchmarks/bench_gpu.py --pack`` writes the
     git-ignored folder benchmarks/.gpu_pack, under --pack-mib MiB: the MobileNetV2 weights file
     and an MVTec-layout share of bottle (see write_pack). It prints the pack's size, what travels
     with it, and the run call of step 2 with this commit filled in.
  2. One run call, with carry ["benchmarks/.gpu_pack"] and timeout_s 600, whose command is
       PYTHONPATH=. python3 benchmarks/bench_gpu.py --data benchmarks/.gpu_pack/mvtec
         --weights benchmarks/.gpu_pack/mobilenet_v2-b0353104.pth --commit COMMIT --out "$OUT"
  3. gpu-bottle-gpu.md and .json come back from $OUT (under the tool's files_at): copy them to
     benchmarks/results/ and commit them.

A pack holds the same evenly spread share of every folder of bottle (about 30 % under 56 MiB),
so the banks, the large one included, and the image counts are that share of the full
category's; the results record the data's image counts and the pack's manifest.

Float32 throughout with TF32 off (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` set to False, read back into the results): TF32 rounds the
products' inputs to 10-bit mantissas, which would make the search inexact. Timings synchronise
the device before and after each timed call; "best of" runs follow a warm-up.

1. Exact search: FlatL2Index (backend "torch") on the device, with its default memory budget
   and with SEARCH_BUDGET, against the floor, a bare torch.mm of the same shapes on the same
   device (the distance matrix's products in blocks of about 1 GiB, no top-k): random Gaussian
   queries x bank x dim (4096 x 100,000 x 1024, k = 10), and bottle's test patches against its
   full bank and its coreset bank (k = 1, the Detector's). The neighbours are compared with a
   float64 reference computed on the device for every query (a list counts as equal where its
   rows are the reference's or exactly as far: ties) and with FlatL2Index on the CPU for a
   subset of the queries.
2. Coreset (knnad.coreset at --coreset) on the device: bottle's full bank, whose picks are
   compared with the CPU's; a ~1M-row bank (bottle's 209 training images at image 640 / crop
   576: 1,083,456 x 128 rows; 5,184 rows an image), whose first picks are compared with a CPU
   run of that many picks (each prefix of the picks is the greedy's own). The large bank takes
   a tenth of --coreset where bottle's rate projects --coreset past LARGE_CORESET_S seconds
   (the results say so).
3. Detector end to end on bottle (mobilenet_v2, --coreset, backend "torch" on the device): fit
   and predict images/s from the files (decoding in the Detector's threads on this machine's
   CPU) and from preprocessed images; each stage's cost per image (decode, backbone with the
   patch embedding, search, maps); the fitted model saved and loaded on the CPU scores the test
   images again (largest relative differences of image scores and maps); and
   knnad.distributed.predict_dataset with one worker (on the GPU) on a local Ray cluster where
   Ray is installed, else the results say it is not.
4. Decoding ceiling: knnad's decoding and preprocessing of bottle's images in the Detector's
   own loader, in one thread per core, and in processes (knnad.decoding.decode_batch,
   predict_dataset's decoding task; the arrays stay in the workers) on 1 and on every core,
   next to the device's images/s without decoding.

``--quick`` takes 4 training images, every 12th test image (7 of bottle's 83) and small random
sizes, and writes to a temporary folder (or ``--out``), never over the committed results: what
a test runs so that the script cannot rot. The results file is ``gpu-<category>-gpu`` on a
CUDA device, ``gpu-<category>-cpu<cores>`` otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from knnad import Detector
from knnad.anomaly_map import anomaly_maps
from knnad.datasets import MVTecAD, Sample
from knnad.decoding import decode_batch
from knnad.embedding import patch_features
from knnad.index import DEFAULT_MEMORY_BUDGET, FlatL2Index
from knnad.preprocessing import Preprocessor
from knnad.runtime import resolve_device
from knnad.sampling import coreset, coreset_size
from knnad.scoring import patch_knn_scores
from knnad.sources import _DECODE_THREADS, batches

import _common
from _common import ONE_SCALE, best_time, category_parser, patch_embeddings, write_results

REPOSITORY = Path(__file__).resolve().parents[1]
#: The MVTec AD root beside the checkout (../shared), as the tests find it.
DEFAULT_ROOT = REPOSITORY.parent / "shared" / "data" / "mvtec"
#: The MobileNetV2 weights file beside the checkout (../shared), what --pack copies by default.
DEFAULT_WEIGHTS = REPOSITORY.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
#: The folder --pack writes by default (git-ignored: the run tool's carry list takes it along).
PACK_DIR = REPOSITORY / "benchmarks" / ".gpu_pack"
#: The pack's manifest, in its MVTec AD root (where --data points), so that the results find it.
PACK_MANIFEST = "pack-manifest.json"
#: Files of an MVTec AD category folder that a pack copies beside the images: licence, attribution.
LICENCE_FILES = ("license.txt", "readme.txt")
#: Bytes of --pack-mib kept for the manifest.
MANIFEST_RESERVE = 2**16
#: What one run call may send: the working tree and the carried paths together.
RUN_LIMIT = 64 * 2**20
#: The larger memory budget FlatL2Index is also measured with: whole banks per block on the GPU.
SEARCH_BUDGET = 8 * 2**30
#: Output bytes per block of the torch.mm floor and of the float64 reference.
BLOCK_BYTES = 2**30
#: The ~1M-row bank's geometry: bottle at this image and crop size gives 72 x 72 patches per image.
LARGE_BANK = {"image_size": 640, "crop_size": 576}
#: Seconds the large bank's coreset may be projected to take before a tenth of the ratio is used.
LARGE_CORESET_S = 150.0
#: Relative difference of scores allowed between the device and the CPU (issue #22).
TOLERANCE = 1e-5
BATCH_SIZES = (8, 32)
RANDOM_K = 10
CPU = torch.device("cpu")

TITLES = {"search": "1. Exact search: FlatL2Index (torch) against the torch.mm floor and float64",
          "coreset": "2. Coreset on the device against the CPU",
          "detector": "3. Detector end to end on bottle",
          "stages": "3. Stage costs of Detector.predict, one after another",
          "ray": "3. predict_dataset with one worker on a local Ray cluster (seconds include its "
                 "start)",
          "decoding": "4. Decoding ceiling: knnad's decoding and preprocessing on this CPU"}


@dataclass(frozen=True)
class Sizes:
    """How much each check does: the full run (at most 8 minutes on one H200) or ``--quick``."""

    random: Tuple[int, int, int]  # queries, bank rows and dimension of the random search case
    cpu_queries: int  # queries of the CPU search (a subset, compared with the device's lists)
    train: slice  # the training and test images taken
    test: slice
    prefix: int  # picks of the large bank's CPU coreset run
    repeats: int  # timed runs of the "best of" measurements
    predict_repeat: int  # the test images repeated this often for throughput and Ray
    decode_images: int  # images per decoding worker


FULL = Sizes(random=(4096, 100_000, 1024), cpu_queries=1024, train=slice(None), test=slice(None),
             prefix=2000, repeats=3, predict_repeat=4, decode_images=64)
QUICK = Sizes(random=(512, 20_000, 128), cpu_queries=256, train=slice(0, 4),
              test=slice(None, None, 12), prefix=200, repeats=1, predict_repeat=1, decode_images=16)

_STARTED = time.perf_counter()


def say(message: str) -> None:
    """Print ``message`` after the seconds since the start: progress on the device's log."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> Tuple[object, float]:
    """``(result, seconds)`` of one call of ``function``, ``device`` synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def module_version(name: str) -> str:
    """The version of the importable module ``name``, or why it is not importable."""
    try:
        return str(getattr(importlib.import_module(name), "__version__", "installed"))
    except ImportError as error:
        return f"not installed ({error})"


def nvidia_driver() -> str:
    """The NVIDIA driver's version as nvidia-smi reports it, or why it is unknown."""
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown (nvidia-smi: {error})"
    return answer[0] if answer else "unknown (nvidia-smi said nothing)"


def git(*arguments: str) -> str:
    """git's output for ``arguments`` in this checkout; raises OSError or SubprocessError where
    git fails."""
    return subprocess.run(["git", "-C", str(REPOSITORY), *arguments], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def git_commit() -> str:
    """The checkout's HEAD commit, marked when tracked files differ from it, or why unknown."""
    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here: pass --commit)"
    return head + (" with uncommitted changes" if changed else "")


def environment(device: torch.device, commit: Optional[str]) -> Dict[str, object]:
    """What the figures were measured with: device, GPU, driver, torch, CUDA and cuDNN versions,
    the TF32 settings as read back, faiss and Ray, the commit."""
    found = {"device": str(device),
             "TF32 matmul (torch.backends.cuda.matmul.allow_tf32)":
                 torch.backends.cuda.matmul.allow_tf32,
             "TF32 cuDNN (torch.backends.cudnn.allow_tf32)": torch.backends.cudnn.allow_tf32,
             "float32 matmul precision": torch.get_float32_matmul_precision(),
             "torch": torch.__version__, "CUDA (torch's)": torch.version.cuda,
             "cuDNN": (torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                       else None),
             "CPU cores": os.cpu_count(), "faiss": module_version("faiss"),
             "ray": module_version("ray"), "commit": commit or git_commit()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found.update({"GPU": properties.name,
                      "GPU memory GiB": round(properties.total_memory / 2**30, 1),
                      "GPU multiprocessors": properties.multi_processor_count,
                      "driver": nvidia_driver()})
    return found


# 1. Exact search


def product_floor(queries: torch.Tensor, bank: torch.Tensor) -> Callable[[], None]:
    """A call that computes ``queries @ bank.T`` with torch.mm in blocks of queries of about
    BLOCK_BYTES of output: the products of a distance matrix of these shapes, no top-k, the
    floor of an exact search on this device."""
    step = max(1, BLOCK_BYTES // (4 * len(bank)))
    out = torch.empty(min(step, len(queries)), len(bank), device=bank.device)
    transposed = bank.T

    def run() -> None:
        """One pass over the queries."""
        for start in range(0, len(queries), step):
            block = queries[start:start + step]
            torch.mm(block, transposed, out=out[:len(block)])
    return run


def float64_neighbours(queries: torch.Tensor, bank: torch.Tensor,
                       k: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(distances, indices)`` numpy ``[m, k]`` of the ``k`` nearest rows of ``bank`` for each
    query, computed in float64 on their device (blocks of about BLOCK_BYTES): the reference.
    Ranked by |q|² + |x|² − 2q·x, the winners' distances then taken as |q − x|, ascending."""
    bank64 = bank.double()
    norms = (bank64 * bank64).sum(dim=1)
    step = max(1, BLOCK_BYTES // (8 * len(bank)))
    distances, indices = [], []
    for start in range(0, len(queries), step):
        block = queries[start:start + step].double()
        squared = (block * block).sum(dim=1, keepdim=True) + norms - 2.0 * (block @ bank64.T)
        rows = torch.topk(squared, k, dim=1, largest=False, sorted=True)[1]
        exact = torch.linalg.vector_norm(bank64[rows] - block[:, None, :], dim=2)
        nearest, order = torch.sort(exact, dim=1, stable=True)
        distances.append(nearest.cpu())
        indices.append(torch.gather(rows, 1, order).cpu())
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def equal_lists(found: np.ndarray, reference: Tuple[np.ndarray, np.ndarray], queries: torch.Tensor,
                bank: torch.Tensor) -> int:
    """How many of the neighbour lists ``found`` ``[m, k]`` are the reference's: the same rows,
    or rows exactly as far (float64 distances within 1e-9 relative: ties)."""
    distances, indices = reference
    differ = np.flatnonzero((found != indices).any(axis=1))
    if len(differ):
        rows = torch.from_numpy(differ).to(queries.device)
        picked = bank[torch.from_numpy(found[differ]).to(bank.device)].double()
        own = torch.linalg.vector_norm(picked - queries[rows].double()[:, None, :], dim=2)
        own = own.cpu().numpy()
        ties = np.isclose(np.sort(own, axis=1), distances[differ], rtol=1e-9, atol=0).all(axis=1)
        differ = differ[~ties]
    return len(found) - len(differ)


def search_rows(case: str, queries: torch.Tensor, bank: torch.Tensor, k: int,
                sizes: Sizes) -> List[Dict]:
    """The search table's rows of one case: the torch.mm floor and FlatL2Index on the device
    (default and SEARCH_BUDGET memory budgets), FlatL2Index on the CPU for a subset of the
    queries; each list checked against the float64 reference, the CPU's against the device's."""
    device = bank.device
    (m, dim), n = queries.shape, len(bank)
    flops = 2.0 * m * n * dim
    floor = best_time(product_floor(queries, bank), sizes.repeats, warmup=1)
    reference = float64_neighbours(queries, bank, k)
    case = f"{case}: {m:,} queries x {n:,} rows x {dim}, k = {k}"
    rows = [{"case": case, "method": f"torch.mm floor ({device})", "queries": m, "seconds": floor,
             "queries/s": m / floor, "x floor": 1.0, "GFLOP/s": flops / floor / 1e9,
             "lists equal to float64": None, "lists equal to the device's": None,
             "max |distance - float64|": None}]
    found = {}
    for budget in (DEFAULT_MEMORY_BUDGET, SEARCH_BUDGET):
        index = FlatL2Index.of(bank, backend="torch", device=device, memory_budget=budget)
        distances, found[budget] = index.search(queries, k)  # also the warm-up
        seconds = best_time(lambda: index.search(queries, k), sizes.repeats, warmup=0)
        rows.append({"case": case,
                     "method": f"FlatL2Index torch ({device}), memory budget "
                               f"{budget / 2**20:,.0f} MiB",
                     "queries": m, "seconds": seconds, "queries/s": m / seconds,
                     "x floor": seconds / floor, "GFLOP/s": flops / seconds / 1e9,
                     "lists equal to float64": equal_lists(found[budget], reference, queries, bank),
                     "lists equal to the device's": None,
                     "max |distance - float64|": float(np.abs(distances - reference[0]).max())})
        del index
    step = max(1, m // sizes.cpu_queries)
    subset, cpu_bank = queries[::step].cpu(), bank.cpu()
    index = FlatL2Index.of(cpu_bank, backend="torch", device="cpu")
    (distances, neighbours), seconds = timed(lambda: index.search(subset, k), CPU)
    reference = (reference[0][::step], reference[1][::step])
    rows.append({"case": case, "method": "FlatL2Index torch (cpu), a subset of the queries",
                 "queries": len(subset), "seconds": seconds, "queries/s": len(subset) / seconds,
                 "x floor": None, "GFLOP/s": 2.0 * len(subset) * n * dim / seconds / 1e9,
                 "lists equal to float64": equal_lists(neighbours, reference, subset, cpu_bank),
                 "lists equal to the device's":
                     int((neighbours == found[DEFAULT_MEMORY_BUDGET][::step]).all(axis=1).sum()),
                 "max |distance - float64|": float(np.abs(distances - reference[0]).max())})
    return rows


def random_case(sizes: Sizes, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded Gaussian ``(queries, bank)`` of the random search case, made on ``device``."""
    m, n, dim = sizes.random
    generator = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(m, dim, generator=generator, device=device),
            torch.randn(n, dim, generator=generator, device=device))


# 2. Coreset


def coreset_row(name: str, bank: torch.Tensor, ratio: float, cpu_picks: Optional[int],
                note: str = "") -> Tuple[Dict, np.ndarray]:
    """The coreset table's row of ``bank`` (on the device) at ``ratio``: the device's selection
    and the CPU's first ``cpu_picks`` picks (None: all of them), compared pick by pick; and the
    device's picks."""
    device, count = bank.device, coreset_size(len(bank), ratio=ratio)
    picks, seconds = timed(lambda: coreset(bank, ratio=ratio, device=device), device)
    compared = count if cpu_picks is None else min(cpu_picks, count)
    cpu_bank = bank.cpu()
    cpu, cpu_seconds = timed(lambda: coreset(cpu_bank, n=compared, device="cpu"), CPU)
    same = picks[:compared] == cpu
    return {"bank": f"{name}, {len(bank):,} x {bank.shape[1]}",
            "coreset": f"{ratio:.0%} ({count:,} picks){note}", "device seconds": seconds,
            "device picks/s": count / seconds, "CPU picks": compared, "CPU seconds": cpu_seconds,
            "CPU picks/s": compared / cpu_seconds, "identical picks": bool(same.all()),
            "first different pick": None if same.all() else int(np.argmin(same))}, picks


def fitted_bank(detector: Detector, paths: List[str]) -> torch.Tensor:
    """``detector``'s memory bank once fitted on ``paths``: float32 rows on its device."""
    return detector.fit(paths).index_.rows(0, len(detector.index_))


# 3. Detector end to end


def relative_difference(values: np.ndarray, reference: np.ndarray,
                        scale: Optional[float] = None) -> float:
    """Largest ``|values - reference|``, relative to each reference value or to ``scale``."""
    gaps = np.abs(values.astype(np.float64) - reference)
    return float((gaps / (np.abs(reference) if scale is None else scale)).max())


def stage_rows(detector: Detector, paths: List[str], sizes: Sizes) -> List[Dict]:
    """Milliseconds per image of each stage of Detector.predict run one after another over
    ``paths`` in the detector's batches, as predict calls them (best of ``sizes.repeats``)."""
    device, preprocessor = detector.extractor_.device, detector.preprocessor_
    size = detector.batch_size
    images, decode = timed(lambda: np.stack([preprocessor(path) for path in paths]), CPU)
    chunks = [torch.from_numpy(images[start:start + size]) for start in range(0, len(images), size)]
    embedded = [patch_features(detector.extractor_, [detector.embedder_], chunk)[0][0]
                for chunk in chunks]
    stages = [("decode + preprocess (Preprocessor)", "CPU, 1 thread", decode),
              ("backbone + patch embedding (patch_features: to the device, forward, back)",
               str(device),
               best_time(lambda: [patch_features(detector.extractor_, [detector.embedder_], chunk)
                                  for chunk in chunks], sizes.repeats, warmup=0))]
    scores = [patch_knn_scores(detector.index_, embedding, detector.k) for embedding in embedded]
    stages.append((f"search (patch_knn_scores, k = {detector.k})", detector.index_.device,
                   best_time(lambda: [patch_knn_scores(detector.index_, embedding, detector.k)
                                      for embedding in embedded], sizes.repeats, warmup=0)))
    frame = preprocessor.frame
    stages.append(("anomaly maps (anomaly_maps, as predict: on the CPU)", "CPU",
                   best_time(lambda: [anomaly_maps(score, frame, detector.sigma,
                                                   detector.upsampling) for score in scores],
                             sizes.repeats, warmup=1)))
    return [{"stage": stage, "where": where, "ms/image": 1000 * seconds / len(paths),
             "images/s": len(paths) / seconds} for stage, where, seconds in stages]


def detector_rows(detector: Detector, device: torch.device, train: List[str], test: List[str],
                  sizes: Sizes, model: Path, weights: str
                  ) -> Tuple[List[Dict], List[Dict], Dict[str, object], Dict[str, float]]:
    """Fit and predict rows, stage costs, the device-against-CPU comparison, and the image
    score of each test path: ``detector`` (unfitted, on ``device``) is fit on ``train``, and
    saved to ``model`` and loaded on the CPU for the comparison."""
    _, seconds = timed(lambda: detector.fit(train), device)
    rows = [{"run": f"Detector.fit from files, coreset {detector.coreset} "
                    f"({len(detector.index_):,} rows)",
             "where": str(device), "batch": detector.batch_size, "images": len(train),
             "seconds": seconds, "images/s": len(train) / seconds}]
    say(f"fitted in {seconds:.1f} s; predicting")
    files = test * sizes.predict_repeat
    preprocessed = torch.from_numpy(np.stack([detector.preprocessor_(path) for path in test]
                                             * sizes.predict_repeat))
    for source, data in (("files", files), ("preprocessed images (no decoding)", preprocessed)):
        for batch in BATCH_SIZES:
            detector.set_params(batch_size=batch)
            seconds = best_time(lambda: detector.predict(data), sizes.repeats, warmup=1)
            rows.append({"run": f"Detector.predict from {source}", "where": str(device),
                         "batch": batch, "images": len(data), "seconds": seconds,
                         "images/s": len(data) / seconds})
    detector.set_params(batch_size=BATCH_SIZES[0])
    stages = stage_rows(detector, test, sizes)
    prediction = detector.predict(test)
    detector.save(model)
    on_cpu = Detector.load(model, weights=weights, backend="torch", device="cpu")
    cpu_prediction, seconds = timed(lambda: on_cpu.predict(test), CPU)
    rows.append({"run": "Detector.predict from files, the same model loaded on the CPU",
                 "where": "cpu", "batch": on_cpu.batch_size, "images": len(test),
                 "seconds": seconds, "images/s": len(test) / seconds})
    scores = relative_difference(prediction.image_scores, cpu_prediction.image_scores)
    maps = relative_difference(prediction.anomaly_maps, cpu_prediction.anomaly_maps,
                               float(np.abs(cpu_prediction.anomaly_maps).max()))
    comparison = {"image scores, largest relative difference device - CPU": scores,
                  "maps, largest difference device - CPU relative to the largest map value": maps,
                  f"scores and maps within {TOLERANCE:g} of the CPU's":
                      scores <= TOLERANCE and maps <= TOLERANCE}
    return rows, stages, comparison, dict(zip(prediction.paths, prediction.image_scores.tolist()))


def ray_row(model: Path, paths: List[str], reference: Dict[str, float], device: torch.device,
            weights: str, folder: Path) -> Dict:
    """predict_dataset of ``paths`` with ``model`` and one scoring worker (on the GPU when
    ``device`` is one) on a local Ray cluster of every CPU: seconds, images/s and the largest
    relative difference of its image scores to ``reference`` (path -> Detector.predict's score).
    Where Ray is missing, or fails, the row says so."""
    row = {"run": f"predict_dataset, 1 worker ({device.type})", "images": len(paths),
           "Ray start s": None, "seconds": None, "images/s": None,
           "image scores, largest relative difference to Detector.predict": None}
    try:
        import ray
    except ImportError as error:
        return {**row, "status": f"not run: Ray is not installed here ({error})"}
    from knnad.distributed import predict_dataset

    from bench_distributed import start_ray
    try:
        import pandas as pd
        _, row["Ray start s"] = timed(lambda: start_ray(os.cpu_count()), CPU)
        gpus = 1 if device.type == "cuda" else 0
        if ray.cluster_resources().get("GPU", 0) < gpus:
            return {**row, "status": "not run: Ray sees no GPU here"}
        summary, row["seconds"] = timed(lambda: predict_dataset(
            model, paths, folder / "ray", num_workers=1, num_gpus_per_worker=gpus,
            num_cpus_per_worker=1, params={"weights": weights}), device)
        scored = pd.read_parquet(folder / "ray", columns=["path", "image_score"])
        row["images/s"] = summary["scored"] / row["seconds"]
        row["image scores, largest relative difference to Detector.predict"] = relative_difference(
            scored["image_score"].to_numpy(),
            np.array([reference[path] for path in scored["path"]]))
        return {**row, "status": f"scored {summary['scored']}, skipped {summary['skipped']}"}
    except Exception as error:  # recorded in the results: Ray is optional on the GPU machine
        return {**row, "status": f"failed: {type(error).__name__}: {error}"}
    finally:
        ray.shutdown()


# 4. Decoding ceiling


def _decoded(paths: List[str], preprocessor: Preprocessor) -> int:
    """Decode and preprocess ``paths`` with knnad.decoding.decode_batch in a worker process;
    returns how many were read (the arrays stay in the worker: decoding's own cost)."""
    errors = decode_batch({"path": np.array(paths, dtype=object)}, preprocessor)["error"]
    return int((errors == "").sum())


def decoding_rows(paths: List[str], preprocessor: Preprocessor, batch_size: int,
                  sizes: Sizes) -> List[Dict]:
    """Images/s of knnad's decoding and preprocessing of ``paths`` (repeated to
    ``sizes.decode_images`` per worker) in the Detector's loader (batches of ``batch_size``), in
    one thread per core, and in pools of 1 and of every core's processes (one image per task,
    so that the workers share the images evenly)."""
    cores = os.cpu_count() or 1

    def images_for(workers: int) -> List[str]:
        """``paths`` repeated to at least ``sizes.decode_images`` per worker."""
        return paths * -(-sizes.decode_images * workers // len(paths))

    rows = []

    def add(how: str, workers: int, images: List[str], run: Callable[[], object]) -> None:
        """Time ``run``, which decodes ``images``, once, and add its row."""
        seconds = best_time(run, repeats=1, warmup=0)
        rows.append({"decoding": how, "workers": workers, "images": len(images), "seconds": seconds,
                     "images/s": len(images) / seconds})

    loader = images_for(_DECODE_THREADS)
    add("Detector's loader (knnad.sources.batches, threads)", _DECODE_THREADS, loader,
        lambda: [batch.images for batch in batches(loader, preprocessor, batch_size)])
    threaded = images_for(cores)
    with ThreadPoolExecutor(cores) as pool:
        add("Preprocessor in a thread pool, one thread per core", cores, threaded,
            lambda: list(pool.map(preprocessor, threaded)))
    # Forked workers start at once (a forkserver's would import this script, torch included, each)
    # and run only Pillow and numpy, never torch or CUDA: safe after the parent's CUDA work.
    context = multiprocessing.get_context("fork")
    for processes in sorted({1, cores}):
        images = images_for(processes)
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            # Start every worker
            list(pool.map(_decoded, [paths[:1]] * processes, repeat(preprocessor)))
            add("decode_batch (predict_dataset's decoding task) in processes", processes, images,
                lambda: sum(pool.map(_decoded, [[path] for path in images], repeat(preprocessor))))
    return rows


def decoding_summary(detector_table: List[Dict], decoding: List[Dict],
                     device: torch.device) -> Dict[str, object]:
    """Item 4's lines: the decoding ceiling of every core (the faster of threads and processes)
    next to the device's images/s, and whether bottle end to end reaches 500 images/s, or what
    stops it."""
    from_files = max(row["images/s"] for row in detector_table
                     if row["run"] == "Detector.predict from files")
    no_decoding = max(row["images/s"] for row in detector_table
                      if row["run"].startswith("Detector.predict from preprocessed"))
    cores = max(row["workers"] for row in decoding)
    loader = decoding[0]["images/s"]
    ceiling = max(row["images/s"] for row in decoding if row["workers"] == cores)
    bound = min((loader, "the Detector's decoding threads"),
                (no_decoding, f"scoring on {device} without decoding"))
    return {f"decoding ceiling on {cores} cores (threads or processes), images/s": ceiling,
            f"the Detector's {decoding[0]['workers']} decoding threads, images/s": loader,
            f"{device} without decoding (Detector.predict of preprocessed images, best batch), "
            "images/s": no_decoding,
            "Detector.predict from files (best batch), images/s": from_files,
            "target: bottle end to end >= 500 images/s": "reached" if from_files >= 500 else
            f"not reached: {from_files:.0f} images/s, bound by {bound[1]} at {bound[0]:.0f} "
            f"images/s; decoding on every core allows {ceiling:.0f}"}


# The data: a pack for a GPU machine, and what the results record


def mvtec_folders(root: Path, category: str) -> Dict[str, List[Sample]]:
    """The MVTec AD category's samples by folder, "train/good" then each "test/<type>", in
    MVTecAD's order (which checks that every defect image has its mask)."""
    folders: Dict[str, List[Sample]] = {}
    for split in ("train", "test"):
        for sample in MVTecAD(root, category, split).samples:
            folders.setdefault(f"{split}/{sample.defect}", []).append(sample)
    return folders


def spread(items: List, count: int) -> List:
    """``count`` of ``items`` (1 <= count <= len(items)) evenly spread, in their order: the
    middle one of each of ``count`` equal runs; all of them where ``count`` is their number."""
    return [items[(2 * i + 1) * len(items) // (2 * count)] for i in range(count)]


def sample_files(sample: Sample) -> List[Path]:
    """The sample's image and, for a defect image, its mask."""
    return [sample.path] + ([sample.mask_path] if sample.mask_path else [])


def pack_selection(folders: Dict[str, List[Sample]], budget: int) -> Dict[str, List[Sample]]:
    """The largest share of ``folders`` whose images and masks take at most ``budget`` bytes:
    from each folder the same share of its samples, at least one, evenly spread (spread).
    Raises ValueError where one sample of each folder does not fit."""
    size = {sample: sum(path.stat().st_size for path in sample_files(sample))
            for samples in folders.values() for sample in samples}
    train = len(folders["train/good"])
    for count in range(train, 0, -1):
        selection = {name: spread(samples, max(1, round(count * len(samples) / train)))
                     for name, samples in folders.items()}
        if sum(size[sample] for chosen in selection.values() for sample in chosen) <= budget:
            return selection
    raise ValueError(f"{budget / 2**20:.1f} MiB left for images beside the weights and licence "
                     f"files hold less than one image of each folder: raise --pack-mib")


def sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_pack(folder: Path, root: Path, category: str, weights: Path, limit_mib: float) -> Dict:
    """Write ``folder`` for a GPU machine, under ``limit_mib`` MiB in all: ``weights`` and
    ``mvtec/<category>``, an MVTec AD layout of ``root``'s category holding its LICENCE_FILES
    and pack_selection's share of its images (train/good, test/<type>) with the defect images'
    masks (ground_truth/<type>), every file copied byte for byte; and the manifest, written to
    ``mvtec/PACK_MANIFEST`` and returned. An earlier pack in ``folder`` is replaced;
    FileExistsError where ``folder`` holds anything else, ValueError where the limit is too low."""
    earlier_pack = (folder / "mvtec" / PACK_MANIFEST).is_file()
    if folder.exists() and any(folder.iterdir()) and not earlier_pack:
        raise FileExistsError(f"{folder} holds files but no pack: choose a new or empty folder")
    source = root / category
    folders = mvtec_folders(root, category)
    licences = [source / name for name in LICENCE_FILES if (source / name).is_file()]
    kept = weights.stat().st_size + sum(path.stat().st_size for path in licences) + MANIFEST_RESERVE
    selection = pack_selection(folders, int(limit_mib * 2**20) - kept)
    files = licences + sorted(path for chosen in selection.values() for sample in chosen
                              for path in sample_files(sample))
    if folder.exists():
        shutil.rmtree(folder)
    for path in files:
        copy = folder / "mvtec" / category / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    shutil.copyfile(weights, folder / weights.name)
    manifest = {"category": category, "source": str(source),
                "selection": f"the same share of each folder's images, at least one, evenly spread "
                             f"over its sorted files, the largest under {limit_mib:g} MiB; each "
                             f"defect image with its mask",
                "images": {name: len(chosen) for name, chosen in selection.items()},
                "images in the source": {name: len(samples) for name, samples in folders.items()},
                "weights": {"file": weights.name, "bytes": weights.stat().st_size,
                            "sha256": sha256(weights)},
                "files": [str(path.relative_to(source)) for path in files]}
    (folder / "mvtec" / PACK_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def run_call(folder: Path, manifest: Dict) -> str:
    """What --pack prints after writing the pack ``folder`` with ``manifest``: its size, what
    travels with it on a run call (the working tree git would send, RUN_LIMIT in all), warnings
    where it cannot travel as it is, and the run call that benchmarks the GPU on it."""
    folder = folder.resolve()
    pack = folder_bytes(folder)
    shown = folder.relative_to(REPOSITORY) if folder.is_relative_to(REPOSITORY) else folder
    lines = [f"pack: {shown}, {pack / 2**20:.2f} MiB ({pack:,} bytes)"]
    if shown == folder:
        lines.append(f"warning: the run tool carries only paths inside the checkout {REPOSITORY}: "
                     f"pack into {PACK_DIR.relative_to(REPOSITORY)}")
    try:
        names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
        listed = [REPOSITORY / name for name in names if name]
    except (OSError, subprocess.SubprocessError) as error:
        lines.append(f"warning: the working tree's size is unknown (git: {error})")
    else:
        tree = sum(path.stat().st_size for path in listed
                   if path.is_file() and not path.is_relative_to(folder))
        lines.append(f"travels: the working tree {tree / 2**20:.2f} MiB and the pack, "
                     f"{(tree + pack) / 2**20:.2f} MiB of the run call's {RUN_LIMIT / 2**20:.0f} "
                     "MiB")
        if any(path.is_relative_to(folder) for path in listed):
            lines.append(f"warning: {shown} is not git-ignored: add it to .gitignore, so that it "
                         f"travels by carry and is never committed")
        if tree + pack > RUN_LIMIT:
            lines.append(f"warning: too large: pack again with a --pack-mib under "
                         f"{(RUN_LIMIT - tree) / 2**20:.1f}")
    arguments = ["--data", f"{shown}/mvtec", "--category", manifest["category"],
                 "--weights", f"{shown}/{manifest['weights']['file']}", "--commit", git_commit()]
    command = ("PYTHONPATH=. python3 benchmarks/bench_gpu.py "
               + " ".join(map(shlex.quote, arguments)) + ' --out "$OUT"')
    return "\n".join(lines + ["the run call (the full run takes at most 8 minutes on one H200):",
                              f"  carry: {json.dumps([str(shown)])}", "  timeout_s: 600",
                              f"  command: {command}",
                              "then copy the .md and .json that come back from $OUT to "
                              "benchmarks/results/ and commit them"])


def pack(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--pack: write_pack into ``args.pack`` with ``args.weights``, a file (by default
    DEFAULT_WEIGHTS), and print run_call's lines; a parser error where it cannot."""
    weights = Path(args.weights)
    if not weights.is_file() and args.weights == parser.get_default("weights"):
        weights = DEFAULT_WEIGHTS
    if not weights.is_file():
        parser.error(f"--pack copies a weights file, and {weights} is none: pass --weights FILE")
    try:
        manifest = write_pack(args.pack, args.mvtec_root, args.category, weights, args.pack_mib)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(run_call(args.pack, manifest))


def data_record(root: Path, folders: Dict[str, List[Sample]], weights: str) -> Dict[str, object]:
    """What the results say of the data and the weights: the MVTec AD root, its images by
    folder (``folders``, mvtec_folders'), the pack's manifest where the root is a pack's (else
    that it is none), and the weights, with their SHA-256 where they are a file."""
    manifest, path = root / PACK_MANIFEST, Path(weights)
    return {"data": str(root),
            "images in the data": ", ".join(f"{name} {len(samples)}"
                                            for name, samples in folders.items()),
            "pack manifest": (json.loads(manifest.read_text()) if manifest.is_file()
                              else "none (no pack)"),
            "weights": f"{weights} (sha256 {sha256(path)})" if path.is_file() else weights}


def main() -> None:
    parser = category_parser(__doc__, root=DEFAULT_ROOT)
    parser.add_argument("--data", dest="mvtec_root", type=Path, default=argparse.SUPPRESS,
                        help=f"MVTec AD root, the same as --mvtec-root (default {DEFAULT_ROOT})")
    parser.add_argument("--device", default="cuda",
                        help="where to run: cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 training images, every 12th test image, small random "
                             "sizes, results to a temporary folder (or --out)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; "
                                                 "with --quick a new temporary folder)")
    parser.add_argument("--commit", help="the commit to record where the copy has no git checkout")
    parser.add_argument("--pack", nargs="?", const=PACK_DIR, type=Path, metavar="DIR",
                        help="measure nothing: write DIR (default "
                             f"{PACK_DIR.relative_to(REPOSITORY)}) for a GPU machine, the "
                             "--weights file and a share of the category's images, and print the "
                             "run call")
    parser.add_argument("--pack-mib", type=float, default=56.0,
                        help="--pack's size limit in MiB (default 56: the run call takes 64 in "
                             "all, the working tree included)")
    args = parser.parse_args()
    if args.pack is not None:
        pack(parser, args)
        return
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would make the search inexact
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.cuda.set_device(device)  # best_time synchronises the current device
    sizes = QUICK if args.quick else FULL
    if args.out or args.quick:
        _common.RESULTS = args.out or Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    root = args.mvtec_root.resolve()
    if Path(args.weights).is_file():  # a weights file, found from Ray's workers too
        args.weights = str(Path(args.weights).resolve())
    folders = mvtec_folders(root, args.category)
    train = [s.path for s in folders["train/good"]][sizes.train]
    test = [s.path for name, samples in folders.items() if name.startswith("test/")
            for s in samples][sizes.test]
    tables: Dict[str, List[Dict]] = {title: [] for title in TITLES.values()}
    summary = environment(device, args.commit)
    summary.update({"images (train / test)": f"{len(train)} / {len(test)}", "quick": args.quick,
                    **data_record(root, folders, args.weights)})
    say(f"on {device}: {summary}")

    def save() -> Path:
        """Write the tables and summary measured so far; returns the .md path."""
        summary["total seconds"] = time.perf_counter() - _STARTED
        tag = "gpu" if device.type == "cuda" else f"cpu{os.cpu_count()}"
        return write_results(f"gpu-{args.category}", tables, summary, tag=tag)

    try:
        with tempfile.TemporaryDirectory() as work:
            run_checks(args, sizes, device, train, test, tables, summary, Path(work), save)
    except BaseException as error:
        summary["error"] = (f"{type(error).__name__}: {error} (stopped here; the tables hold "
                            "what ran before)")
        raise
    finally:
        say(f"wrote {save()}")


def run_checks(args, sizes: Sizes, device: torch.device, train: List[str], test: List[str],
               tables: Dict[str, List[Dict]], summary: Dict[str, object], work: Path,
               save: Callable[[], Path]) -> None:
    """Items 1 to 4 in turn, each table's rows appended as they are measured; ``save`` writes
    the results so far (quietly before Ray, so that they outlast a run killed there)."""
    def detector(coreset=args.coreset, **params) -> Detector:
        """An unfitted Detector of the run's backbone, weights and coreset on the device, one
        scale (its stages are timed one by one below)."""
        return Detector("mobilenet_v2", weights=args.weights, coreset=coreset, backend="torch",
                        device=str(device), progress=False, **{"layers": ONE_SCALE, **params})

    say("1. exact search, random case")
    queries, bank = random_case(sizes, device)
    tables[TITLES["search"]] += search_rows("random Gaussian", queries, bank, RANDOM_K, sizes)
    del queries, bank

    say("2. coreset: bottle's full bank")
    full = detector(coreset=None)
    bank = fitted_bank(full, train)
    row, picks = coreset_row(f"{args.category} full bank", bank, args.coreset, None)
    tables[TITLES["coreset"]].append(row)
    per_pick = row["device seconds"] / len(picks)

    say("1. exact search, bottle's banks")
    queries = torch.from_numpy(patch_embeddings(test, full.extractor_))
    queries = queries.reshape(-1, bank.shape[1]).to(device)
    tables[TITLES["search"]] += search_rows(f"{args.category} test patches, full bank", queries,
                                            bank, 1, sizes)
    coreset_bank = bank[torch.from_numpy(np.sort(picks)).to(device)]
    tables[TITLES["search"]] += search_rows(f"{args.category} test patches, {args.coreset:.0%} "
                                            "coreset bank", queries, coreset_bank, 1, sizes)
    del full, bank, coreset_bank, queries

    say("2. coreset: the ~1M-row bank")
    bank = fitted_bank(detector(coreset=None, **LARGE_BANK), train)
    projected = coreset_size(len(bank), ratio=args.coreset) * per_pick
    ratio, note = args.coreset, ""
    if projected > LARGE_CORESET_S:
        ratio = args.coreset / 10
        note = f"; {args.coreset:.0%} projected {projected:.0f} s > {LARGE_CORESET_S:.0f} s"
    row, _ = coreset_row(f"{args.category} at image {LARGE_BANK['image_size']} / crop "
                         f"{LARGE_BANK['crop_size']}",
                         bank, ratio, sizes.prefix, note)
    tables[TITLES["coreset"]].append(row)
    del bank

    say("3. Detector end to end")
    model = work / f"{args.category}.npz"
    rows, stages, comparison, reference = detector_rows(detector(), device, train, test, sizes,
                                                        model, args.weights)
    tables[TITLES["detector"]] += rows
    tables[TITLES["stages"]] += stages
    summary.update(comparison)

    say("4. decoding ceiling")
    tables[TITLES["decoding"]] += decoding_rows(train + test, Preprocessor(), BATCH_SIZES[0], sizes)
    summary.update(decoding_summary(tables[TITLES["detector"]], tables[TITLES["decoding"]], device))

    say("3. predict_dataset on Ray")
    with contextlib.redirect_stdout(io.StringIO()):
        save()
    tables[TITLES["ray"]].append(ray_row(model, test * sizes.predict_repeat, reference, device,
                                         args.weights, work))


if __name__ == "__main__":
    main()
