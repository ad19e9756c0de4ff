"""Accuracy and cost of knnad's settings on a genuine MVTec AD category: the multi-scale default
(issue #20) against its coarse and fine scales alone, the other fusion rules, and the options of
issue #14, in one run.

knnad's Detector, MobileNetV2 with torchvision's IMAGENET1K_V1 weights, 10 % coreset, k = 1.
Fits (each named by its parameters, so that a later change of the defaults does not rename
them): the default (``layers="multiscale", fusion="refine"``: the coarse and the fine scale,
each in units of its normal scores, the coarse map cut to the fine map's outline where the
fine scale sees a defect), ``fusion="max"``, ``"mean"`` and ``"auto"`` (weights chosen from
synthetic defects), the coarse scale alone (``layers="coarse"``: knnad 0.3's default, also with
``k=3``, ``image_score="reweighted"``, whole-image mode and ``augment="rotations"`` at its bank
size), the fine scale alone (``layers="fine"``, as many rows as the coarse bank) and the issue's
fine row (``layers="fine", reduce_dim=128``, the same rows). Each row: image AUROC, pixel AUROC
with a 95 % bootstrap interval and the paired bootstrap differences (the same resamples of the
test images) to the coarse scale (knnad 0.3's default) and to the better of coarse-only and
fine-only, the paired differences of image AUROC to coarse-only and to fine-only (the same
resamples), AUPRO, ms/image (predict, decoding included, warm), fit seconds, memory-bank rows and
MiB over all scales (fits timed after an untimed warm-up fit).

Pixel figures are on the pixels every setting scores: the 224 crop of the 256-resized image
(for whole-image mode the same pixels cut from its frame). With ``--peer-python`` (a Python with
anomalib installed), anomalib 2.7's PatchCore runs in the same run through
``../shared/tools/peer_anomalib.py`` at a 1 % coreset; it prints image and pixel AUROC and
times (no maps: no interval or AUPRO).

  python benchmarks/bench_accuracy.py --category transistor --peer-python /work/peer-venv/bin/python
  python benchmarks/bench_accuracy.py --quick   # smoke run, < 2 min, to a temporary folder
"""
import re
import subprocess
import tempfile
import time
from pathlib import Path

from knnad import Detector, evaluate
from knnad.backbones import DEFAULT_PRESET
from knnad.datasets import MVTecAD
from knnad.metrics import (
    aupro,
    image_auroc,
    image_auroc_bootstrap,
    pixel_auroc,
    pixel_auroc_bootstrap,
)
from knnad.preprocessing import center_crop

import _common
from _common import category_parser, interval, write_results

BOOTSTRAP_ROUNDS = 2000
#: Training images of the untimed warm-up fit.
WARM_UP_IMAGES = 4
SHARED = Path(__file__).resolve().parents[2] / "shared"
#: A coreset of as many rows as the coarse scale's memory bank.
COARSE_ROWS = "coarse rows"
COARSE, FINE = "layers=coarse (knnad 0.3's default)", "layers=fine, coarse's bank rows"
MULTISCALE = {"layers": "multiscale"}
#: The fits: (parameters that need a new fit, then (row name, predict-time settings) of each).
FITS = [
    ({**MULTISCALE, "fusion": "refine"}, [("layers=multiscale, fusion=refine (default)", {})]),
    ({"layers": "coarse"},
     [(COARSE, {}), ("k=3", {"k": 3}), ("image_score=reweighted", {"image_score": "reweighted"})]),
    ({"layers": "fine", "coreset": COARSE_ROWS}, [(FINE, {})]),
    ({**MULTISCALE, "fusion": "max"}, [("layers=multiscale, fusion=max", {})]),
    ({**MULTISCALE, "fusion": "mean"}, [("layers=multiscale, fusion=mean", {})]),
    ({**MULTISCALE, "fusion": "auto"},
     [("layers=multiscale, fusion=auto (synthetic defects)", {})]),
    ({"layers": "fine", "reduce_dim": 128, "coreset": COARSE_ROWS},
     [("layers=fine, reduce_dim=128, coarse's bank rows", {})]),
    ({"layers": "coarse", "crop_size": None}, [("crop_size=None (whole image)", {})]),
    ({"layers": "coarse", "augment": "rotations", "coreset": COARSE_ROWS},
     [("augment=rotations, coarse's bank rows", {})]),
]
#: The defaults' crop, whose pixels every setting is compared on.
CROP = Detector().crop_size


def peer_row(python: str, root: Path, category: str, weights: Path) -> dict:
    """anomalib PatchCore at a 1 % coreset, run by ``python`` with the shared measuring tool."""
    output = subprocess.run([python, str(SHARED / "tools" / "peer_anomalib.py"), str(root),
                             category, str(weights), "0.01"], capture_output=True, text=True,
                            check=True, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"}).stdout
    found = dict(re.findall(r"(image AUROC|pixel AUROC|fit)[= ]*([0-9.]+)", output))
    found["img/s"] = re.search(r"([0-9.]+) img/s", output).group(1)
    bank = re.search(r"bank=\((\d+), (\d+)\)", output)
    return {"setting": "anomalib 2.7 PatchCore, coreset 1 %", "bank rows": int(bank.group(1)),
            "bank MiB": int(bank.group(1)) * int(bank.group(2)) * 4 / 2**20,
            "fit s": float(found["fit"]), "ms/image": 1000.0 / float(found["img/s"]),
            "image AUROC": float(found["image AUROC"]), "pixel AUROC": float(found["pixel AUROC"])}


def main() -> None:
    parser = category_parser(__doc__, root=SHARED / "data" / "mvtec")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 training and 7 test images, 100 resamples, results "
                             "to a temporary folder")
    parser.add_argument("--peer-python", help="a Python with anomalib installed: runs the peer too")
    args = parser.parse_args()
    rounds = 100 if args.quick else BOOTSTRAP_ROUNDS
    train = MVTecAD(args.mvtec_root, args.category, "train")
    test = MVTecAD(args.mvtec_root, args.category, "test")
    if args.quick:
        train.samples, test.samples = train.samples[:4], test.samples[::12]
        _common.RESULTS = Path(tempfile.mkdtemp(prefix="bench_accuracy-"))
    labels = test.labels
    rows, crop_maps, image_scores, crop_masks, coarse_rows = [], [], [], None, None
    # Warm-up: the process's first fit pays one-time setup (thread pools, kernels) that would
    # otherwise land on whichever setting comes first.
    Detector("mobilenet_v2", weights=args.weights, progress=False).fit(
        [sample.path for sample in train.samples[:WARM_UP_IMAGES]])
    for fit_params, settings in FITS:
        fit_params = {"coreset": args.coreset, **fit_params}
        if fit_params["coreset"] == COARSE_ROWS:
            fit_params["coreset"] = coarse_rows
        detector = Detector("mobilenet_v2", weights=args.weights, progress=False, **fit_params)
        start = time.perf_counter()
        detector.fit(train)
        fit_seconds = time.perf_counter() - start
        banks = [scale.index for scale in detector.scales_]
        coarse_rows = coarse_rows or len(banks[0])  # the coarse scale comes first in every fit
        detector.predict(test.samples[0].path)  # warm-up: the first call's setup is not timed
        fitted = detector.get_params()
        for name, params in settings:
            detector.set_params(**{**{key: fitted[key] for _, earlier in settings
                                      for key in earlier}, **params})
            results, prediction, masks = evaluate(detector, test, return_prediction=True)
            maps = prediction.anomaly_maps
            maps = maps if detector.crop_size else center_crop(maps, CROP)
            crop_masks = masks if crop_masks is None else crop_masks
            crop_maps.append(maps)
            image_scores.append(prediction.image_scores)
            rows.append({"setting": name, "bank rows": " + ".join(str(len(bank)) for bank in banks),
                         "bank MiB": sum(len(bank) * bank.dim * 4 for bank in banks) / 2**20,
                         "fusion weights": " / ".join(f"{scale.weight:g}"
                                                      for scale in detector.scales_)
                         if len(banks) > 1 and detector.fusion == "auto" else "",
                         "fit s": fit_seconds, "ms/image": 1000.0 / results["images_per_second"],
                         "image AUROC": image_auroc(labels, prediction.image_scores),
                         "pixel AUROC": pixel_auroc(crop_masks, maps),
                         "AUPRO": aupro(crop_masks, maps)})
            print(f"{name}: {rows[-1]}", flush=True)
    replicates = pixel_auroc_bootstrap(crop_masks, *crop_maps, rounds=rounds)
    names = [row["setting"] for row in rows]
    coarse, fine = names.index(COARSE), names.index(FINE)
    better = coarse if rows[coarse]["pixel AUROC"] >= rows[fine]["pixel AUROC"] else fine
    image_replicates = image_auroc_bootstrap(labels, *image_scores, rounds=rounds)
    for row, column, image_column in zip(rows, replicates.T, image_replicates.T):
        row["pixel AUROC 95% interval"] = interval(column)
        row["- coarse, paired 95%"] = interval(column - replicates[:, coarse], digits=5)
        row["- better single scale, paired 95%"] = interval(column - replicates[:, better],
                                                            digits=5)
        for scale, number in (("coarse", coarse), ("fine", fine)):
            row[f"image AUROC - {scale}, paired 95%"] = interval(
                image_column - image_replicates[:, number])
        row["AUPRO"] = row.pop("AUPRO")  # last, as in the other tables
    if args.peer_python and not args.quick:
        weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
        peer = peer_row(args.peer_python, args.mvtec_root, args.category, weights)
        rows.append({key: "" for key in rows[0]} | peer)
    summary = {"test images": len(labels), "defect images": int((labels == 1).sum()),
               "better single scale (point pixel AUROC)": names[better],
               "knnad's default": f"layers={DEFAULT_PRESET}, fusion={Detector().fusion}",
               "bootstrap resamples": rounds}
    title = (f"MVTec AD {args.category}, MobileNetV2 {args.weights}, coreset {args.coreset}, k = "
             f"1, pixels of the 224 crop"
             + (" (QUICK smoke run: a few images, not figures)" if args.quick else ""))
    write_results(f"accuracy-{args.category}", {title: rows}, summary)


if __name__ == "__main__":
    main()
