"""knnad's detector on a genuine MVTec AD category against anomalib's PatchCore, in one run.

Both use MobileNetV2 with torchvision's IMAGENET1K_V1 weights, resize 256 / crop 224 and the
same coreset ratio; knnad also reports the full memory bank. The peer runs through
shared/tools/peer_anomalib.py in its own Python (with anomalib installed) when given.

  python benchmarks/bench_detector.py --mvtec-root ../shared/data/mvtec \\
      --peer-python /tmp/peer/bin/python --peer-script ../shared/tools/peer_anomalib.py \\
      --peer-weights ../shared/weights/mobilenet_v2-b0353104.pth
"""
import argparse
import os
import re
import subprocess
import time
from pathlib import Path

from knnad import Detector, evaluate
from knnad.datasets import MVTecAD

from _common import write_results

PEER_PATTERN = re.compile(r"image AUROC=(?P<image>[\d.]+) pixel AUROC=(?P<pixel>[\d.]+).*?"
                          r"fit (?P<fit>[\d.]+)s predict (?P<predict>[\d.]+)s \((?P<rate>[\d.]+) img/s\)",
                          re.S)


def knnad_row(root: Path, category: str, coreset, weights: str, **params):
    train, test = MVTecAD(root, category, "train"), MVTecAD(root, category, "test")
    detector = Detector("mobilenet_v2", weights=weights, coreset=coreset, progress=False, **params)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    results = evaluate(detector, test)
    return {"method": f"knnad {detector.index_.backend}", "coreset": coreset or "none",
            "memory bank": len(detector.index_), "image AUROC": results["image_auroc"],
            "pixel AUROC": results["pixel_auroc"], "AUPRO": results["aupro"],
            "fit s": fit_seconds, "predict img/s": results["images_per_second"]}


def peer_row(args):
    environment = {**os.environ, "TQDM_DISABLE": "1"}
    output = subprocess.run([args.peer_python, args.peer_script, str(args.mvtec_root), args.category,
                             args.peer_weights, str(args.coreset)], check=True, capture_output=True,
                            text=True, env=environment).stdout
    found = PEER_PATTERN.search(output)
    if not found:
        raise RuntimeError(f"cannot read the peer's output:\n{output}")
    bank = re.search(r"bank=\((\d+)", output)
    return {"method": "anomalib 2.7 PatchCore", "coreset": args.coreset,
            "memory bank": int(bank.group(1)) if bank else "?", "image AUROC": float(found["image"]),
            "pixel AUROC": float(found["pixel"]), "AUPRO": None, "fit s": float(found["fit"]),
            "predict img/s": float(found["rate"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path, required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--peer-python", help="a Python with anomalib 2.7 installed")
    parser.add_argument("--peer-script", help="path of shared/tools/peer_anomalib.py")
    parser.add_argument("--peer-weights", help="the MobileNetV2 .pth file for the peer")
    args = parser.parse_args()
    rows = [knnad_row(args.mvtec_root, args.category, args.coreset, args.weights),
            knnad_row(args.mvtec_root, args.category, None, args.weights)]
    summary = {}
    if args.peer_python:
        peer = peer_row(args)
        rows.append(peer)
        summary = {"fit speedup over anomalib (same coreset)": peer["fit s"] / rows[0]["fit s"],
                   "predict speedup over anomalib (same coreset)": rows[0]["predict img/s"] / peer["predict img/s"]}
    write_results(f"detector-{args.category}", {f"MVTec AD {args.category}, MobileNetV2 IMAGENET1K_V1, 224 crop": rows},
                  summary)


if __name__ == "__main__":
    main()
