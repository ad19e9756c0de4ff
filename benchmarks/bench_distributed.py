"""knnad.distributed on a local Ray cluster against one process, on one MVTec AD category.

In one run, on the category's genuine test images (repeated to N images by repeating paths),
with a MobileNetV2 model (IMAGENET1K_V1 weights, 10 % coreset) fitted on its training images:

1. Throughput, the methods in turn (``--rounds`` times; the best time of each is kept):
   plain ``Detector.predict`` of the paths in this process (model loaded beforehand), with
   torch and faiss on every CPU (the default) and on one thread (what a scoring worker of one
   CPU gets: Ray sets OMP_NUM_THREADS to a worker's CPUs; decoding threads as usual), and
   ``predict_dataset`` with 1 and with 2 scoring workers (actor start-up and model loading
   included, since every run pays them). The Ray cluster has as many CPUs as the machine; one
   worker takes one CPU, two workers half a CPU each, the decoding tasks the rest. Each is
   timed at N1 = the test images once and at N2 = ``--repeat`` times them: images/s at N2, and
   the steady rate (N2 - N1) / (t2 - t1) with the fixed start-up cost t1 - N1 / rate, so that
   Ray's cost per image and its fixed cost are told apart. Ray's overhead at one worker is
   measured against Detector.predict on one thread: the same share of the machine for scoring.
2. Peak memory against the number of images: for each of ``--memory-repeats`` (N = the test
   images times it), a fresh process starts its own Ray cluster and runs predict_dataset with
   one worker; the driver's VmHWM (``/proc/self/status``) and the largest VmHWM of the scoring
   actor and of the decoding workers (``/proc/<pid>/status``, polled while it runs; the peak
   of a process's whole life, not ru_maxrss, which misses other processes), and their largest
   RssAnon: a worker's VmHWM also counts the pages of Ray's shared object store it has read,
   bounded by the store's size, while its private memory must level off.
3. ShardedIndex: the full memory bank of the training images (no coreset, 163,856 x 128 on
   bottle) searched with the patches of ``--query-images`` test images (k = 1; 784 patches
   each) by one FlatL2Index in this process
   and by a ShardedIndex of 1, 2 and 4 shards (the machine's CPUs split between them); best of
   three after a warm-up; the neighbours are checked to be the same.

  python benchmarks/bench_distributed.py --mvtec-root ../shared/data/mvtec
  # A smoke test, no result files:
  python benchmarks/bench_distributed.py --mvtec-root ../shared/data/mvtec --quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from knnad import Detector
from knnad.datasets import MVTecAD

from _common import ONE_SCALE, best_time, markdown_table, patch_embeddings, write_results

#: Titles Ray gives its worker processes (``ray::<what runs>``), by role.
ROLES = {"scoring actor": "_Scorer", "decoding tasks": "decode_batch"}


def vm_hwm(pid="self", field: str = "VmHWM") -> int:
    """Peak resident memory (VmHWM) of process ``pid`` in bytes, or another field of its
    /proc status such as RssAnon (its private memory now: what is not the pages of Ray's
    shared object store that it has read); 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle
                        if line.startswith(f"{field}:"))
    except (OSError, StopIteration, ValueError):
        return 0


class RayWorkerPeaks:
    """Polls this machine's Ray worker processes (command line ``ray::...``) every
    ``interval`` seconds and keeps, per role of :data:`ROLES`, the largest VmHWM seen. A worker
    process runs tasks of several kinds in its life (and idles as ``ray::IDLE``): it counts in
    every role it was seen in. ``private`` keeps, per role, the largest RssAnon seen: VmHWM
    also counts the object store's shared pages a worker has touched."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peaks, self.titles = interval, {role: 0 for role in ROLES}, {}
        self.private = {role: 0 for role in ROLES}

    def _poll(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    title = handle.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::"):
                self.titles.setdefault(int(entry), set()).add(title)
                for role, mark in ROLES.items():
                    if any(mark in seen for seen in self.titles[int(entry)]):
                        self.peaks[role] = max(self.peaks[role], vm_hwm(entry))
                        self.private[role] = max(self.private[role], vm_hwm(entry, "RssAnon"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RayWorkerPeaks":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_ray(cpus: int):
    import ray
    env = {"TORCH_HOME": os.environ["TORCH_HOME"]} if "TORCH_HOME" in os.environ else {}
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": env} if env else None)
    return ray


def memory_child(model: str, paths_file: str, out: str, cpus: int) -> None:
    """Run in a fresh process: predict_dataset with one worker on the paths in ``paths_file``;
    writes the driver's and the workers' peaks to ``out`` (JSON)."""
    from knnad.distributed import predict_dataset
    paths = json.loads(Path(paths_file).read_text())
    start_ray(cpus)
    with RayWorkerPeaks() as workers, tempfile.TemporaryDirectory() as folder:
        summary = predict_dataset(model, paths, Path(folder) / "out", num_workers=1)
    Path(out).write_text(json.dumps({"images": summary["images"], "seconds": summary["seconds"],
                                     "driver": vm_hwm(), **workers.peaks,
                                     "private": workers.private,
                                     "titles": sorted({t for ts in workers.titles.values()
                                                       for t in ts})}))


def memory_rows(model: Path, test: List[str], repeats: List[int], cpus: int,
                folder: Path) -> List[Dict]:
    rows = []
    for repeat in repeats:
        paths_file, out = folder / f"paths-{repeat}.json", folder / f"memory-{repeat}.json"
        paths_file.write_text(json.dumps(test * repeat))
        done = subprocess.run([sys.executable, __file__, "--memory-child", str(model),
                               str(paths_file), str(out), "--cpus", str(cpus)], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"memory run of {len(test) * repeat} images "
                               f"failed:\n{done.stderr[-3000:]}")
        found = json.loads(out.read_text())
        missing = [role for role in ROLES if not found[role]]
        if missing:
            raise RuntimeError(f"no Ray worker seen for {missing}; titles seen: {found['titles']}")
        rows.append({"images": found["images"], "driver VmHWM MiB": found["driver"] / 2**20,
                     **{f"{role} VmHWM MiB": found[role] / 2**20 for role in ROLES},
                     **{f"{role} largest RssAnon MiB": found["private"][role] / 2**20
                        for role in ROLES},
                     "seconds": found["seconds"]})
    return rows


class Threads:
    """torch's and faiss's threads set to ``count`` inside the block, as Ray sets them in a
    worker of ``count`` CPUs (``OMP_NUM_THREADS``), restored after."""

    def __init__(self, count: int):
        self.count = count

    def __enter__(self):
        import faiss
        import torch
        self.before = torch.get_num_threads(), faiss.omp_get_max_threads()
        torch.set_num_threads(self.count)
        faiss.omp_set_num_threads(self.count)

    def __exit__(self, *exc):
        import faiss
        import torch
        torch.set_num_threads(self.before[0])
        faiss.omp_set_num_threads(self.before[1])


def throughput_rows(model: Path, test: List[str], repeat: int, rounds: int, cpus: int,
                    folder: Path):
    """Rows of seconds and images/s per method at N1 and N2 images, and the largest difference
    of predict_dataset's image scores to Detector.predict's."""
    import pandas as pd

    from knnad.distributed import predict_dataset

    detector = Detector.load(model)
    detector.predict(test[:8])  # warm-up: torch's and the decoding threads' first use
    sizes = {"N1": test, "N2": test * repeat}
    plain = "Detector.predict (this process; torch and faiss threads: %d)"
    runs = {plain % cpus: cpus, plain % 1 + ", the scoring worker's share": 1,
            f"predict_dataset, 1 worker (1 CPU; decoding: {cpus - 1})": (1, 1.0),
            f"predict_dataset, 2 workers (0.5 CPU each; decoding: {cpus - 1})": (2, 0.5)}
    best = {(name, size): float("inf") for name in runs for size in sizes}
    difference, reference = 0.0, {}
    for _ in range(rounds):
        for size, paths in sizes.items():
            for name, run in runs.items():
                start = time.perf_counter()
                if isinstance(run, int):
                    with Threads(run):
                        scores = detector.predict(paths).image_scores
                    seconds = time.perf_counter() - start
                    reference.update(zip(paths, scores))
                else:
                    out = folder / f"out-{size}"
                    predict_dataset(model, paths, out, num_workers=run[0],
                                    num_cpus_per_worker=run[1])
                    seconds = time.perf_counter() - start
                    rows = pd.read_parquet(out, columns=["path", "image_score"])
                    gap = np.abs(rows.image_score - rows.path.map(reference)).max()
                    difference = max(difference, float(gap))
                best[name, size] = min(best[name, size], seconds)
    n1, n2 = len(sizes["N1"]), len(sizes["N2"])
    table = []
    for name in runs:
        t1, t2 = best[name, "N1"], best[name, "N2"]
        rate = (n2 - n1) / (t2 - t1)
        table.append({"method": name, f"s at {n1} images": t1, f"s at {n2} images": t2,
                      f"images/s at {n2}": n2 / t2, "steady images/s": rate,
                      "fixed s": t1 - n1 / rate})
    return table, difference


def shard_rows(bank: np.ndarray, queries: np.ndarray, shards: List[int], cpus: int) -> List[Dict]:
    from knnad.distributed import ShardedIndex
    from knnad.index import FlatL2Index

    flat = FlatL2Index.of(bank, backend="faiss", device="cpu")
    expected_d, expected_i = flat.search(queries, 1)
    rows = [{"index": "FlatL2Index (this process)", "shards": 1, "CPUs per shard": float(cpus),
             "search s": best_time(lambda: flat.search(queries, 1)), "same neighbours": 1.0,
             "same distances": 1.0}]
    for count in shards:
        with ShardedIndex.of(bank, count, backend="faiss",
                             num_cpus_per_shard=cpus / count) as sharded:
            distances, indices = sharded.search(queries, 1)
            rows.append({"index": "ShardedIndex", "shards": count, "CPUs per shard": cpus / count,
                         "search s": best_time(lambda: sharded.search(queries, 1)),
                         "same neighbours": float((indices == expected_i).mean()),
                         "same distances": float((distances == expected_d).mean())})
    for row in rows:
        row["time / FlatL2Index"] = row["search s"] / rows[0]["search s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=4,
                        help="N2 = the test images this many times")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--query-images", type=int, default=16,
                        help="test images whose patches are the search's queries")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="the Ray cluster's CPUs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a few images, one round, small bank; prints, writes no "
                             "results")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "PATHS_JSON", "OUT_JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child, cpus=args.cpus)
    if args.mvtec_root is None:
        parser.error("--mvtec-root is required")
    if args.cpus < 2:
        parser.error("--cpus must be at least 2: the decoding tasks need a CPU beside the workers")
    train = [str(s.path.resolve())
             for s in MVTecAD(args.mvtec_root, args.category, "train").samples]
    test = [str(s.path.resolve()) for s in MVTecAD(args.mvtec_root, args.category, "test").samples]
    if args.quick:
        train, test = train[:4], test[:3]
        args.repeat, args.rounds, args.memory_repeats, args.shards = 2, 1, [1], [2]
    params = dict(backbone="mobilenet_v2", layers=ONE_SCALE, weights=args.weights, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = Detector(**params, coreset=args.coreset).fit(train).save(folder / "model.npz")
        memory = memory_rows(model, test, args.memory_repeats, args.cpus, folder)
        full = Detector(**params, coreset=None).fit(train)
        bank = full.index_.vectors()
        queries = patch_embeddings(test[:args.query_images], full.extractor_)
        queries = queries.reshape(-1, queries.shape[-1])
        ray = start_ray(args.cpus)
        throughput, difference = throughput_rows(model, test, args.repeat, args.rounds, args.cpus,
                                                 folder)
        shards = shard_rows(bank, queries, args.shards, args.cpus)
        ray.shutdown()
    n2 = len(test) * args.repeat
    default, share, one, two = throughput

    def overhead(row, baseline, key):
        return 1 - row[key] / baseline[key]

    tables = {
        f"Throughput on {args.category}: {len(test)} and {n2} test images, mobilenet_v2, coreset "
        f"{args.coreset}, batch 8; best of {args.rounds} rounds; local Ray cluster of {args.cpus} "
        f"CPUs": throughput,
        "Peak memory against the number of images (predict_dataset, 1 worker, fresh process and "
        "cluster each)": memory,
        f"Exact search, k = 1: bank {bank.shape[0]} x {bank.shape[1]} (no coreset), "
        f"{len(queries)} query patches; best of 3 after a warm-up": shards}
    summary = {
        "Ray overhead at one worker, steady, against Detector.predict with the worker's threads "
        "(target <= 0.15)":
            overhead(one, share, "steady images/s"),
        f"Ray overhead at one worker, at {n2} images (start-up included), against the same":
            overhead(one, share, f"images/s at {n2}"),
        "Ray overhead at one worker, steady, against Detector.predict on every thread":
            overhead(one, default, "steady images/s"),
        "Ray fixed start-up s, one worker (actor start, model load)": one["fixed s"],
        "2 workers / 1 worker, steady images/s": two["steady images/s"] / one["steady images/s"],
        "largest |predict_dataset - Detector.predict| image score": difference,
        **{f"{process} VmHWM growth MiB, {memory[first]['images']} to {memory[last]['images']} "
           "images":
            memory[last][f"{process} VmHWM MiB"] - memory[first][f"{process} VmHWM MiB"]
            for process in ("driver", "scoring actor", "decoding tasks")
            for first, last in sorted({(0, len(memory) - 1),
                                       (max(0, len(memory) - 2), len(memory) - 1)})}}
    summary.update({f"ShardedIndex {row['shards']} shards / FlatL2Index": row["time / FlatL2Index"]
                    for row in shards[1:]})
    if args.quick:
        print("".join(f"\n## {title}\n\n{markdown_table(rows)}" for title, rows in tables.items()))
        print("\n".join(f"- {key}: {value:.4g}" for key, value in summary.items()))
        return
    write_results(f"distributed-{args.category}", tables, summary)


if __name__ == "__main__":
    main()
