"""Greedy coreset time on a quiet machine and with one competing CPU-bound process.

Inspection PCs and CI runners are shared: the selection loop's small operations can collapse
when another process wants a core. Times knnad.coreset (10 % of MobileNetV2 patch features of
MVTec bottle, cached by bench_datasets.py or computed here) with torch's thread count fixed at
2 and at 1, and with knnad's run-time choice, first alone, then beside a one-thread numpy
matrix-product loop started by this script; each case checks that the picks are the same.

  python benchmarks/bench_coreset_sharing.py --mvtec-root ../shared/data/mvtec
"""
import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

import knnad.sampling as sampling
from knnad.backbones import FeatureExtractor
from knnad.datasets import MVTecAD

from _common import patch_embeddings, write_results

CACHE = Path(__file__).resolve().parent / ".cache" / "mobilenet_v2" / "mvtec-bottle-train.npy"


def busy_loop(stop) -> None:
    """One CPU-bound thread: a numpy matrix product, again and again."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        matrix = np.random.default_rng(0).random((600, 600))
        while not stop.is_set():
            matrix @ matrix


def timed_coreset(bank: np.ndarray, threads: int, tuned: bool):
    torch.set_num_threads(threads)
    original = sampling._ThreadTuner.__init__
    if not tuned:  # one fixed count: the tuner has a single candidate
        def fixed(self, _threads):
            original(self, threads)
            self.candidates = [threads]
        sampling._ThreadTuner.__init__ = fixed
    try:
        start = time.perf_counter()
        picks = sampling.coreset(bank, ratio=0.1, seed=0)
        return time.perf_counter() - start, picks
    finally:
        sampling._ThreadTuner.__init__ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path, help="needed when the feature cache is absent")
    args = parser.parse_args()
    if CACHE.is_file():
        bank = np.load(CACHE)
    else:
        paths = [s.path for s in MVTecAD(args.mvtec_root, "bottle", "train").samples]
        bank = patch_embeddings(paths, FeatureExtractor("mobilenet_v2", weights="IMAGENET1K_V1"))
    bank = bank.reshape(-1, bank.shape[-1])
    cases = [("torch threads fixed at 2", 2, False), ("torch threads fixed at 1", 1, False),
             ("knnad's run-time choice (from 2)", 2, True)]
    rows, reference = [], None
    for load in ("quiet", "one competing process"):
        stop = multiprocessing.Event()
        competitor = multiprocessing.Process(target=busy_loop, args=(stop,)) if load != "quiet" else None
        if competitor:
            competitor.start()
            time.sleep(1.0)
        try:
            for name, threads, tuned in cases:
                seconds, picks = timed_coreset(bank, threads, tuned)
                reference = picks if reference is None else reference
                rows.append({"machine": load, "threads": name, "seconds": seconds,
                             "picks/s": len(picks) / seconds,
                             "same picks": bool(np.array_equal(picks, reference))})
        finally:
            if competitor:
                stop.set()
                competitor.join()
    quiet = {row["threads"]: row["seconds"] for row in rows if row["machine"] == "quiet"}
    summary = {f"slow-down with a competing process, {row['threads']}": row["seconds"] / quiet[row["threads"]]
               for row in rows if row["machine"] != "quiet"}
    write_results("coreset_sharing", {f"coreset 10 % of {bank.shape[0]} x {bank.shape[1]} bottle patches": rows},
                  summary)


if __name__ == "__main__":
    main()
