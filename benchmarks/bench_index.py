r"""Exact kNN search and coreset selection, measured side by side in one run.

1. Search: knnad FlatL2Index on faiss against the torch.cdist + topk reference on the same
   queries, timed alternately (one ratio per round, median and range reported), for k=1 and
   k=9; throughput, GFLOP/s-equivalent (2·m·n·d / time), its share of this machine's float32
   matrix-multiply rate (torch.mm, same run), its share of the bare query × bank product of
   the same shapes (the float32 floor of any exact search), and neighbour agreement.
2. Coreset: knnad's greedy k-center against anomalib's KCenterGreedy (run in its own Python
   via --peer-python) on MobileNetV2 patch embeddings of MVTec bottle; time and covering
   radius (in the original feature space) of both.

Example:
  python benchmarks/bench_index.py --mvtec-root ../shared/data/mvtec \
      --peer-python /tmp/peer/bin/python
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from knnad.backbones import FeatureExtractor
from knnad.index import FlatL2Index
from knnad.preprocessing import list_images
from knnad.sampling import coreset, covering_radius

from _common import best_time, method, patch_embeddings, write_results

PEER_CODE = """
import sys, time, numpy as np, torch
from anomalib.models.components.sampling import KCenterGreedy
features = torch.from_numpy(np.load(sys.argv[1]))
torch.manual_seed(0)
start = time.perf_counter()
picks = KCenterGreedy(features, float(sys.argv[2])).select_coreset_idxs()
elapsed = time.perf_counter() - start
np.save(sys.argv[3], np.asarray(picks, dtype=np.int64))
print(elapsed)
"""


def matmul_gflops(m: int = 4096, k: int = 1024, n: int = 8192) -> float:
    """float32 GEMM rate of this machine through torch.mm (MKL), GFLOP/s: the best of five
    products of the shape a flat search multiplies (queries × dim by dim × bank block)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / best_time(lambda: torch.mm(a, b), repeats=5) / 1e9


def product_only(queries: torch.Tensor, vectors: torch.Tensor, block: int = 8192) -> None:
    """The query × bank inner products a flat search needs, by torch.mm in bank blocks, with no
    distances or selection: the float32 floor for any exact search of these shapes."""
    for start in range(0, vectors.shape[0], block):
        torch.mm(queries, vectors[start:start + block].T)


def search_rows(queries: int, bank: int, dim: int, ks, rounds: int, peak: float):
    """Per k: faiss and torch searches of the same queries, timed alternately over ``rounds``
    rounds (each round's torch/faiss ratio is paired in time), plus the bare matrix product of
    the same shapes as the floor."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((bank, dim), dtype=np.float32)
    query_vectors = rng.standard_normal((queries, dim), dtype=np.float32)
    flops = 2 * queries * bank * dim
    indexes = {}
    for backend in ("faiss", "torch"):
        indexes[backend] = FlatL2Index(dim, backend=backend, device="cpu")
        indexes[backend].add(vectors)
    floor_seconds = best_time(lambda: product_only(torch.from_numpy(query_vectors),
                                                   torch.from_numpy(vectors)), repeats=rounds)
    rows = [{"task": f"product only {queries}x{bank}x{dim}", "method": "torch.mm",
             "seconds": floor_seconds, "queries/s": queries / floor_seconds,
             "GFLOP/s": flops / floor_seconds / 1e9,
             "% of matmul": 100 * flops / floor_seconds / 1e9 / peak, "% of product": 100.0,
             "reference/faiss median (range)": ""}]
    summary = {"product_only_seconds": floor_seconds}
    for k in ks:
        results, times = {}, {"faiss": [], "torch": []}
        for backend, index in indexes.items():  # warm-up
            results[backend] = index.search(query_vectors, k)
        for _ in range(rounds):
            for backend, index in indexes.items():
                times[backend].append(best_time(lambda: index.search(query_vectors, k), repeats=1,
                                                warmup=0))
        ratios = np.array(times["torch"]) / np.array(times["faiss"])
        for backend in indexes:
            seconds = min(times[backend])
            rows.append({"task": f"search {queries}x{bank}x{dim} k={k}", "method": method(backend),
                         "seconds": seconds, "queries/s": queries / seconds,
                         "GFLOP/s": flops / seconds / 1e9,
                         "% of matmul": 100 * flops / seconds / 1e9 / peak,
                         "% of product": 100 * floor_seconds / seconds,
                         "reference/faiss median (range)": "" if backend == "torch" else
                         f"{np.median(ratios):.2f} ({ratios.min():.2f}-{ratios.max():.2f})"})
        summary[f"search_speedup_faiss_over_torch_k{k}_median"] = float(np.median(ratios))
        summary[f"search_speedup_faiss_over_torch_k{k}_range"] = [float(ratios.min()),
                                                                  float(ratios.max())]
        summary[f"faiss_share_of_product_floor_k{k}"] = floor_seconds / min(times["faiss"])
        summary[f"identical_neighbour_lists_k{k}"] = float(
            (results["faiss"][1] == results["torch"][1]).all(axis=1).mean())
    return rows, summary


def bottle_bank(root: Path, weights: str) -> np.ndarray:
    """MobileNetV2 patch embeddings of all bottle training images, [N·h·w, D]."""
    extractor = FeatureExtractor("mobilenet_v2", weights=weights)
    embedding = patch_embeddings(list_images(root / "bottle" / "train" / "good"), extractor)
    return embedding.reshape(-1, embedding.shape[-1])


def coreset_rows(features: np.ndarray, ratio: float, label: str, peer_python: str):
    rows = []
    start = time.perf_counter()
    picks = coreset(features, ratio=ratio)
    knnad_seconds = time.perf_counter() - start
    knnad_radius = covering_radius(features, picks)
    rows.append({"task": f"coreset {label} {features.shape[0]}x{features.shape[1]} ratio={ratio}",
                 "method": "knnad", "seconds": knnad_seconds, "covering radius": knnad_radius})
    if peer_python:
        with tempfile.TemporaryDirectory() as folder:
            np.save(f"{folder}/features.npy", features)
            output = subprocess.run([peer_python, "-c", PEER_CODE, f"{folder}/features.npy",
                                     str(ratio), f"{folder}/picks.npy"], check=True,
                                    capture_output=True, text=True).stdout
            peer_seconds = float(output.strip().splitlines()[-1])
            peer_picks = np.load(f"{folder}/picks.npy")
        rows.append({"task": rows[0]["task"], "method": "anomalib 2.7 KCenterGreedy",
                     "seconds": peer_seconds,
                     "covering radius": covering_radius(features, peer_picks)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 9],
                        help="neighbour counts (1 is the detector's default)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--mvtec-root", type=Path, help="MVTec AD root holding bottle/")
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="MobileNetV2 weights")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--peer-python", help="a Python with anomalib 2.7 installed")
    parser.add_argument("--peer-share", type=float, default=0.25,
                        help="share of bottle's training images for the side-by-side instance")
    args = parser.parse_args()

    peak = matmul_gflops()
    rows, summary = search_rows(args.queries, args.bank, args.dim, args.k, args.rounds, peak)
    summary["matmul_gflops"] = peak
    coreset_table = []
    if args.mvtec_root:
        full = bottle_bank(args.mvtec_root, args.weights)
        small = full[: int(len(full) * args.peer_share) // 784 * 784]
        coreset_table += coreset_rows(small, args.ratio, f"bottle {args.peer_share:.0%} of images",
                                      args.peer_python)
        coreset_table += coreset_rows(full, args.ratio, "bottle all images", None)
        if args.peer_python:
            summary["coreset_speedup_over_anomalib"] = (
                coreset_table[1]["seconds"] / coreset_table[0]["seconds"])
            summary["coreset_radius_ratio_knnad_over_anomalib"] = (
                coreset_table[0]["covering radius"] / coreset_table[1]["covering radius"])
    tables = {"Search (random data)": rows}
    if coreset_table:
        tables["Coreset (MobileNetV2 patch embeddings of MVTec bottle)"] = coreset_table
    write_results("index", tables, summary)


if __name__ == "__main__":
    sys.exit(main())
