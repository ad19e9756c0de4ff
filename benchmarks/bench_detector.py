"""knnad's detector on a genuine MVTec AD category against anomalib's PatchCore, in one run.

Both use MobileNetV2 with torchvision's IMAGENET1K_V1 weights, resize 256 / crop 224 and the
same coreset ratio, one scale (knnad: ``layers="coarse"``, the layers PatchCore hooks; the
multi-scale default is measured against it by bench_accuracy.py); knnad also reports the full
memory bank. The peer runs through
shared/tools/peer_anomalib.py in its own Python (with anomalib installed) when given; its
anomaly maps are kept, so the pixel AUROC difference is also given as a paired bootstrap over
the test images (same resamples for both methods): a 95 % interval for each method and for the
difference.

  python benchmarks/bench_detector.py --mvtec-root ../shared/data/mvtec \\
      --peer-python /tmp/peer/bin/python --peer-script ../shared/tools/peer_anomalib.py \\
      --peer-weights ../shared/weights/mobilenet_v2-b0353104.pth
"""
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from knnad import Detector, evaluate
from knnad.datasets import MVTecAD
from knnad.metrics import pixel_auroc, pixel_auroc_bootstrap

from _common import ONE_SCALE, category_parser, interval, write_results

PEER_PATTERN = re.compile(r"image AUROC=(?P<image>[\d.]+) pixel AUROC=(?P<pixel>[\d.]+).*?"
                          r"fit (?P<fit>[\d.]+)s predict (?P<predict>[\d.]+)s \((?P<rate>[\d.]+) "
                          r"img/s\)",
                          re.S)
#: Runs the peer script unchanged and keeps the maps it computed, in test-path order.
PEER_RUNNER = """
import runpy, sys, numpy as np
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
found = runpy.run_path(script, run_name="__main__")
np.savez(out, maps=np.asarray(found["maps"], np.float32), paths=np.array(found["test"]))
"""
BOOTSTRAP_ROUNDS = 2000


def knnad_row(root: Path, category: str, coreset, weights: str, **params):
    """knnad's table row, and its test paths (resolved), maps ``[N, 224, 224]`` and masks."""
    train, test = MVTecAD(root, category, "train"), MVTecAD(root, category, "test")
    detector = Detector("mobilenet_v2", layers=ONE_SCALE, weights=weights, coreset=coreset,
                        progress=False, **params)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    results, prediction, masks = evaluate(detector, test, return_prediction=True)
    row = {"method": f"knnad {detector.index_.backend}", "coreset": coreset or "none",
           "upsampling": detector.upsampling,
           "memory bank": len(detector.index_), "image AUROC": results["image_auroc"],
           "pixel AUROC": results["pixel_auroc"], "AUPRO": results["aupro"],
           "fit s": fit_seconds, "predict img/s": results["images_per_second"]}
    paths = [str(Path(path).resolve()) for path in prediction.paths]
    return row, paths, prediction.anomaly_maps, masks


def peer_row(args):
    """The peer's table row, and its maps ``[N, 224, 224]`` with their image paths."""
    environment = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as folder:
        kept = Path(folder) / "peer.npz"
        output = subprocess.run([args.peer_python, "-c", PEER_RUNNER, args.peer_script, str(kept),
                                 str(args.mvtec_root), args.category, args.peer_weights,
                                 str(args.coreset)], check=True, capture_output=True, text=True,
                                env=environment).stdout
        with np.load(kept) as arrays:
            maps, paths = arrays["maps"], [str(Path(p).resolve()) for p in arrays["paths"]]
    found = PEER_PATTERN.search(output)
    if not found:
        raise RuntimeError(f"cannot read the peer's output:\n{output}")
    bank = re.search(r"bank=\((\d+)", output)
    return {"method": "anomalib 2.7 PatchCore", "coreset": args.coreset, "upsampling": "nearest",
            "memory bank": int(bank.group(1)) if bank else "?",
            "image AUROC": float(found["image"]), "pixel AUROC": float(found["pixel"]),
            "AUPRO": None, "fit s": float(found["fit"]),
            "predict img/s": float(found["rate"])}, paths, maps


def main() -> None:
    parser = category_parser(__doc__)
    parser.add_argument("--peer-python", help="a Python with anomalib 2.7 installed")
    parser.add_argument("--peer-script", help="path of shared/tools/peer_anomalib.py")
    parser.add_argument("--peer-weights", help="the MobileNetV2 .pth file for the peer")
    args = parser.parse_args()
    coreset_row, order, coreset_maps, masks = knnad_row(args.mvtec_root, args.category,
                                                        args.coreset, args.weights)
    nearest_row, _, nearest_maps, _ = knnad_row(args.mvtec_root, args.category, args.coreset,
                                                args.weights, upsampling="nearest")
    full_row, _, full_maps, _ = knnad_row(args.mvtec_root, args.category, None, args.weights)
    rows, map_sets = [coreset_row, nearest_row, full_row], [coreset_maps, nearest_maps, full_maps]
    summary = {}
    if args.peer_python:
        peer, peer_paths, peer_maps = peer_row(args)
        map_sets.append(peer_maps[[peer_paths.index(path) for path in order]])
        peer["pixel AUROC"] = pixel_auroc(masks, map_sets[-1])  # all digits, not the printed 4
        rows.append(peer)
        summary = {"fit speedup over anomalib (same coreset)": peer["fit s"] / coreset_row["fit s"],
                   "predict speedup over anomalib (same coreset)":
                       coreset_row["predict img/s"] / peer["predict img/s"]}
    replicates = pixel_auroc_bootstrap(masks, *map_sets, rounds=BOOTSTRAP_ROUNDS)
    for row, column in zip(rows, replicates.T):
        row["pixel AUROC 95% interval"] = interval(column)
    if args.peer_python:
        for position, row in enumerate(rows[:2]):
            difference = replicates[:, position] - replicates[:, -1]
            name = f"pixel AUROC knnad ({row['upsampling']} upsampling) - anomalib"
            summary[name] = row["pixel AUROC"] - peer["pixel AUROC"]
            summary[f"its 95% paired bootstrap interval ({BOOTSTRAP_ROUNDS} image resamples)"
                    f" [{row['upsampling']}]"] = interval(difference, digits=5)
            summary[f"share of resamples where knnad's is the higher [{row['upsampling']}]"] = \
                float(np.mean(difference > 0))
    write_results(f"detector-{args.category}",
                  {f"MVTec AD {args.category}, MobileNetV2 IMAGENET1K_V1, 224 crop": rows}, summary)


if __name__ == "__main__":
    main()
