"""Detector throughput per backbone and backend, with each stage timed on its own.

Fit and predict images/s of knnad.Detector on an MVTec AD category, and the cost per image of
each stage measured separately on the same test images: decode + preprocessing, backbone,
patch embedding, kNN search, anomaly map. Detector.predict overlaps decoding with the other
stages, so its total is below their sum; the slowest stage is the one to work on.
wide_resnet50_2 runs with random weights where its ImageNet file is not available (the cost
does not depend on the weights' values).

  python benchmarks/bench_end_to_end.py --mvtec-root ../shared/data/mvtec
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from knnad import Detector
from knnad.anomaly_map import anomaly_maps
from knnad.backbones import FeatureExtractor, WeightsUnavailableError
from knnad.datasets import MVTecAD
from knnad.fusion import fused_maps, normal_scores
from knnad.scoring import patch_knn_scores

from _common import ONE_SCALE, method, write_results


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def stage_costs(detector: Detector, paths) -> dict:
    """Milliseconds per image of each stage, run one after the other on one batch size; with
    several scales, embedding, search and map are summed over the scales, and the map includes
    their fusion."""
    images, decode = timed(lambda: [detector.preprocessor_(p) for p in paths])
    batches = [torch.from_numpy(np.stack(images[i:i + detector.batch_size]))
               for i in range(0, len(images), detector.batch_size)]
    scales = detector.scales_
    features, backbone = timed(lambda: [detector.extractor_(b) for b in batches])
    embedded, embed = timed(lambda: [[scale.embedder(f) for scale in scales] for f in features])
    scores, search = timed(lambda: [[patch_knn_scores(scale.index, embedding, detector.k)
                                     for scale, embedding in zip(scales, per_scale)]
                                    for per_scale in embedded])
    size = tuple(images[0].shape[-2:])

    def maps_of(per_scale):
        maps = [anomaly_maps(patch, size, detector.sigma, detector.upsampling)
                for patch in per_scale]
        if len(scales) == 1:
            return maps[0]
        return fused_maps(maps, normal_scores(scales), [scale.weight for scale in scales],
                          detector.fusion, [size[0] / patch.shape[1] for patch in per_scale])

    _, maps = timed(lambda: [maps_of(per_scale) for per_scale in scores])
    per_image = 1000 / len(paths)
    return {"decode+preprocess ms": decode * per_image, "backbone ms": backbone * per_image,
            "embedding ms": embed * per_image, "search ms": search * per_image,
            "anomaly map ms": maps * per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path, required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbones", nargs="+",
                        default=["mobilenet_v2", "resnet18", "wide_resnet50_2"])
    parser.add_argument("--backends", nargs="+", default=["faiss", "torch"])
    parser.add_argument("--coreset", type=float, default=0.1)
    args = parser.parse_args()
    train = MVTecAD(args.mvtec_root, args.category, "train")
    test = MVTecAD(args.mvtec_root, args.category, "test")
    test_paths = [s.path for s in test.samples]
    rows = []
    for backbone in args.backbones:
        for backend in args.backends:
            try:
                weights = "IMAGENET1K_V1"
                FeatureExtractor(backbone, weights=weights).close()
            except WeightsUnavailableError:  # the ImageNet file is not here
                weights = None
            detector = Detector(backbone, layers=ONE_SCALE, weights=weights, backend=backend,
                                coreset=args.coreset, progress=False)
            _, fit_seconds = timed(lambda: detector.fit(train))
            prediction, predict_seconds = timed(lambda: detector.predict(test))
            row = {"backbone": backbone, "weights": weights or "random",
                   "search": method(detector.index_.backend, detector.index_.device),
                   "bank": f"{len(detector.index_)}x{detector.index_.dim}",
                   "fit img/s": len(train) / fit_seconds,
                   "predict img/s": len(test) / predict_seconds}
            row.update(stage_costs(detector, test_paths))
            stages = {k: v for k, v in row.items() if k.endswith(" ms")}
            row["slowest stage"] = max(stages, key=stages.get).replace(" ms", "")
            rows.append(row)
            assert np.isfinite(prediction.image_scores).all()
    write_results(f"end_to_end-{args.category}",
                  {f"MVTec AD {args.category}, coreset {args.coreset}": rows})


if __name__ == "__main__":
    main()
