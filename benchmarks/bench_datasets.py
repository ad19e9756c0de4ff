"""FAISS against the torch.cdist reference on MVTec AD and BTAD categories.

For each category found under the given roots: features are extracted once (cached under
--cache), the memory bank is built with and without coreset, and for each backend (faiss and
torch on CPU; on CUDA too when a GPU is present) the script measures bank build time, search
time for all test patches, queries/s, GFLOP/s-equivalent and its share of the float32
matrix-multiply rate measured in the same run, peak search memory, exactness against a float64
reference (share of identical neighbour lists, ties excepted; largest relative distance
error), and the image and pixel AUROC each backend yields.

  python benchmarks/bench_datasets.py --mvtec-root ../shared/data/mvtec [--btad-root BTAD]
"""
import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from knnad import metrics
from knnad.anomaly_map import anomaly_maps
from knnad.backbones import FeatureExtractor
from knnad.datasets import dataset_pairs, discover_categories
from knnad.evaluation import load_masks
from knnad.index import FlatL2Index
from knnad.preprocessing import Preprocessor
from knnad.sampling import coreset

from _common import PeakMemory, best_time, method, patch_embeddings, search_backends, write_results
from bench_index import matmul_gflops

K = 1  # the detector's default


def embeddings(dataset, extractor, cache: Path):
    """Patch embeddings [N, h, w, D] of a dataset, cached as .npy."""
    if cache.exists():
        return np.load(cache)
    array = patch_embeddings([s.path for s in dataset.samples], extractor)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, array)
    return array


def float64_reference(bank: np.ndarray, queries: np.ndarray, k: int):
    """Exact neighbours and distances in float64: candidates by torch.cdist in float64, their
    distances recomputed by differences (the matrix-product form loses small distances)."""
    bank64, distances, indices = torch.from_numpy(bank).double(), [], []
    for start in range(0, len(queries), 512):
        block = torch.from_numpy(queries[start:start + 512]).double()
        found = torch.cdist(block, bank64).topk(k, largest=False).indices
        exact = torch.linalg.vector_norm(bank64[found] - block[:, None, :], dim=2)
        order = torch.argsort(exact, dim=1, stable=True)
        distances.append(torch.gather(exact, 1, order))
        indices.append(torch.gather(found, 1, order))
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def exactness(distances, indices, ref_d, ref_i, bank, queries):
    """Share of neighbour lists identical to the reference (ties excepted) and the largest
    relative distance error."""
    same = (indices == ref_i).all(axis=1)
    for row in np.flatnonzero(~same):  # a differing list is fine where the distances tie
        offsets = bank[indices[row]].astype(np.float64) - queries[row].astype(np.float64)
        true = np.linalg.norm(offsets, axis=1)
        same[row] = np.allclose(true, ref_d[row], rtol=1e-5, atol=1e-6)
    relative = np.abs(distances - ref_d) / np.maximum(ref_d, 1e-12)
    return float(same.mean()), float(relative.max())


def category_rows(name, train, test, extractor, cache, ratio, peak_gflops, reranks):
    train_embedding = embeddings(train, extractor, cache / f"{name}-train.npy")
    test_embedding = embeddings(test, extractor, cache / f"{name}-test.npy")
    n, h, w, dim = test_embedding.shape
    queries = test_embedding.reshape(-1, dim)
    full_bank = train_embedding.reshape(-1, dim)
    masks = load_masks(test, Preprocessor())
    rows = []
    for label, bank_ratio in (("none", None), (str(ratio), ratio)):
        start = time.perf_counter()
        bank = full_bank if bank_ratio is None else full_bank[coreset(full_bank, ratio=bank_ratio)]
        coreset_seconds = time.perf_counter() - start
        ref_d, ref_i = float64_reference(bank, queries, K)
        for (backend, device), rerank in itertools.product(search_backends(), reranks):
            start = time.perf_counter()
            index = FlatL2Index(dim, backend=backend, device=device, rerank=rerank)
            index.add(bank)
            build = time.perf_counter() - start
            with PeakMemory() as peak:
                distances, indices = index.search(queries, K)
            seconds = best_time(lambda: index.search(queries, K), repeats=2, warmup=0)
            same, error = exactness(distances, indices, ref_d, ref_i, bank, queries)
            maps = anomaly_maps(torch.from_numpy(distances.mean(1)).reshape(n, h, w), 224,
                                4.0).numpy()
            gflops = 2 * len(queries) * len(bank) * dim / seconds / 1e9
            rows.append({"category": name, "coreset": label, "bank": len(bank),
                         "backend": method(backend, device), "rerank": rerank,
                         "build s": build + coreset_seconds, "search s": seconds,
                         "queries/s": len(queries) / seconds, "GFLOP/s": gflops,
                         "% of matmul": 100 * gflops / peak_gflops, "peak MiB": peak.bytes / 2**20,
                         "identical lists": same, "max rel. error": error,
                         "image AUROC": metrics.image_auroc(test.labels,
                                                            maps.reshape(n, -1).max(1)),
                         "pixel AUROC": (metrics.pixel_auroc(masks, maps) if masks is not None
                                         else None)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path)
    parser.add_argument("--btad-root", type=Path)
    parser.add_argument("--categories", nargs="+", help="only these categories")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--reranks", type=int, nargs="+", default=[0, 4],
                        help="FlatL2Index rerank settings to measure (default: 0 4)")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    args = parser.parse_args()
    if not (args.mvtec_root or args.btad_root):
        parser.error("give --mvtec-root and/or --btad-root")
    extractor = FeatureExtractor(args.backbone, weights=args.weights)
    peak = matmul_gflops()
    rows = []
    for kind, root in (("mvtec", args.mvtec_root), ("btad", args.btad_root)):
        if root is None:
            continue
        wanted = [c for c in discover_categories(kind, root)
                  if not args.categories or c in args.categories]
        if not wanted:
            continue
        for category, train, test in dataset_pairs(kind, root, wanted):
            rows += category_rows(f"{kind}-{category}", train, test, extractor,
                                  args.cache / args.backbone, args.coreset, peak, args.reranks)
    summary = {"matmul GFLOP/s": peak}
    for row in rows:
        if row["backend"] == method("faiss"):
            torch_row = next(r for r in rows
                             if r["category"] == row["category"] and r["rerank"] == row["rerank"]
                             and r["coreset"] == row["coreset"] and r["backend"] == method("torch"))
            key = f"{row['category']} coreset={row['coreset']} rerank={row['rerank']}"
            summary[f"faiss/(torch.cdist + topk) speedup {key}"] = \
                torch_row["search s"] / row["search s"]
            summary[f"AUROC difference faiss - (torch.cdist + topk) {key}"] = max(
                abs(row[name] - torch_row[name]) for name in ("image AUROC", "pixel AUROC")
                if row[name] is not None)
    write_results("datasets", {f"{args.backbone} {args.weights}, k={K}": rows}, summary)


if __name__ == "__main__":
    main()
