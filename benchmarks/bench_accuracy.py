"""Accuracy of each option of issue #14 on a genuine MVTec AD category, against the defaults.

knnad's Detector, MobileNetV2 with torchvision's IMAGENET1K_V1 weights, 10 % coreset, k = 1.
Options: the image score (``"max"``, the default, ``"spade"``, ``"reweighted"``: one fit),
whole-image mode (``crop_size=None``), the ``"fine"`` layer preset (adds ``features.3``, stride
4) with and without ``reduce_dim=128`` (and with both the dimension and the number of rows of the
defaults' memory bank), and memory-bank augmentation (``augment="flips"``,
``"rotations"``). Each fit's figures: image AUROC, pixel AUROC with a 95 % bootstrap interval
and the paired bootstrap difference to the defaults (the same resamples of the test images),
AUPRO, ms/image (predict, decoding included), fit seconds, memory-bank rows and MiB.

Pixel figures of the first table are on the pixels every setting scores: the 224 crop of the
256-resized image, for whole-image mode the same pixels cut from its 256 frame. The second
table scores the whole frame against full-frame masks: whole-image mode against the defaults
with the border (which the crop never sees) given the lowest score of their maps. anomalib's
PatchCore is not rerun here: its row is the committed one of ``results/detector-bottle-cpu2.md``
(same backbone, weights, preprocessing and coreset ratio; an earlier run, so not paired).

  python benchmarks/bench_accuracy.py --mvtec-root ../shared/data/mvtec
  python benchmarks/bench_accuracy.py --mvtec-root ../shared/data/mvtec --quick   # smoke run, < 1 min

``--quick`` fits on 4 training images and scores 7 test images with 100 resamples, and writes
its tables to a temporary folder, never over the committed results.
"""
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import _common
from _common import category_parser, interval, write_results
from knnad import Detector, evaluate
from knnad.datasets import MVTecAD
from knnad.metrics import aupro, image_auroc, pixel_auroc, pixel_auroc_bootstrap
from knnad.preprocessing import center_crop

BOOTSTRAP_ROUNDS = 2000
#: A coreset of as many patches as the defaults' memory bank: the same bank bytes at reduce_dim 128.
SAME_BANK = "same bank"
#: The fits: (name, parameters that need a new fit), then the predict-time settings of each.
FITS = [
    ("defaults", {}, [("defaults", {}), ("image_score=spade", {"image_score": "spade"}),
                      ("image_score=reweighted", {"image_score": "reweighted"})]),
    ("whole image", {"crop_size": None}, [("crop_size=None (whole image)", {})]),
    ("fine layers", {"layers": "fine"}, [("layers=fine", {})]),
    ("fine layers, reduced", {"layers": "fine", "reduce_dim": 128}, [("layers=fine, reduce_dim=128", {})]),
    ("fine layers, default bank size", {"layers": "fine", "reduce_dim": 128, "coreset": SAME_BANK},
     [("layers=fine, reduce_dim=128, coreset=the defaults' bank rows", {})]),
    ("flips", {"augment": "flips"}, [("augment=flips", {})]),
    ("rotations", {"augment": "rotations"}, [("augment=rotations", {})]),
]
PEER_RESULTS = _common.RESULTS / "detector-bottle-cpu2.json"
#: The defaults' crop, whose pixels every setting is compared on.
CROP = Detector().crop_size


def peer_row(category: str):
    """anomalib's row of the committed detector benchmark (bottle only), or None."""
    if category != "bottle" or not PEER_RESULTS.is_file():
        return None
    tables = json.loads(PEER_RESULTS.read_text())["tables"]
    for row in (row for rows in tables.values() for row in rows):
        if str(row["method"]).startswith("anomalib"):
            return {"setting": f"{row['method']} (results/detector-bottle-cpu2.md, not rerun)",
                    "bank rows": row["memory bank"], "bank MiB": None, "fit s": row["fit s"],
                    "ms/image": 1000.0 / row["predict img/s"], "image AUROC": row["image AUROC"],
                    "pixel AUROC": row["pixel AUROC"],
                    "pixel AUROC 95% interval": row["pixel AUROC 95% interval"],
                    "pixel AUROC - defaults, paired 95% interval": "– (other run)", "AUPRO": row["AUPRO"]}
    return None


def main() -> None:
    parser = category_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 training and 7 test images, 100 resamples, results "
                             "to a temporary folder")
    args = parser.parse_args()
    rounds = 100 if args.quick else BOOTSTRAP_ROUNDS
    train = MVTecAD(args.mvtec_root, args.category, "train")
    test = MVTecAD(args.mvtec_root, args.category, "test")
    if args.quick:
        train.samples, test.samples = train.samples[:4], test.samples[::12]
        _common.RESULTS = Path(tempfile.mkdtemp(prefix="bench_accuracy-"))
    labels = test.labels
    rows, crop_maps, crop_masks = [], [], None
    whole = None  # (maps, full-frame masks) of whole-image mode
    for fit_name, fit_params, settings in FITS:
        fit_params = {"coreset": args.coreset, **fit_params}
        if fit_params["coreset"] == SAME_BANK:
            fit_params["coreset"] = rows[0]["bank rows"]
        detector = Detector("mobilenet_v2", weights=args.weights, progress=False, **fit_params)
        start = time.perf_counter()
        detector.fit(train)
        fit_seconds = time.perf_counter() - start
        bank_rows, dim = len(detector.index_), detector.index_.dim
        detector.predict(test.samples[0].path)  # warm-up: the first call's setup is not timed
        for name, params in settings:
            detector.set_params(**params)
            results, prediction, masks = evaluate(detector, test, return_prediction=True)
            maps = prediction.anomaly_maps
            if detector.crop_size is None:  # the pixels of the crop, cut from the whole frame
                whole = (maps, masks)
                maps = center_crop(maps, CROP)
            elif crop_masks is None:
                crop_masks = masks
            crop_maps.append(maps)
            rows.append({"setting": name,
                         "bank rows": bank_rows, "bank MiB": bank_rows * dim * 4 / 2**20,
                         "fit s": fit_seconds, "ms/image": 1000.0 / results["images_per_second"],
                         "image AUROC": image_auroc(labels, prediction.image_scores),
                         "pixel AUROC": pixel_auroc(crop_masks, maps), "AUPRO": aupro(crop_masks, maps)})
            print(f"{name}: {rows[-1]}", flush=True)
    replicates = pixel_auroc_bootstrap(crop_masks, *crop_maps, rounds=rounds)
    for row, column in zip(rows, replicates.T):
        row["pixel AUROC 95% interval"] = interval(column)
        row["pixel AUROC - defaults, paired 95% interval"] = interval(column - replicates[:, 0], digits=5)
    for row in rows:  # AUPRO last, as in the other tables
        row["AUPRO"] = row.pop("AUPRO")
    peer = peer_row(args.category)

    # The whole frame: whole-image mode, and the defaults with the border unscored (lowest score).
    whole_maps, frame_masks = whole
    frame = frame_masks.shape[1:]
    defaults = np.full((len(labels), *frame), crop_maps[0].min(), np.float32)
    top, left = int(round((frame[0] - CROP) / 2.0)), int(round((frame[1] - CROP) / 2.0))
    defaults[:, top:top + CROP, left:left + CROP] = crop_maps[0]
    frame_replicates = pixel_auroc_bootstrap(frame_masks, defaults, whole_maps, rounds=rounds)
    frame_rows = []
    for name, maps, column in (("defaults, border unscored", defaults, frame_replicates[:, 0]),
                               ("crop_size=None (whole image)", whole_maps, frame_replicates[:, 1])):
        frame_rows.append({"setting": name, "pixel AUROC": pixel_auroc(frame_masks, maps),
                           "pixel AUROC 95% interval": interval(column),
                           "pixel AUROC - defaults, paired 95% interval":
                               interval(column - frame_replicates[:, 0], digits=5),
                           "AUPRO": aupro(frame_masks, maps)})
    inside = center_crop(frame_masks, CROP).reshape(len(labels), -1).sum(axis=1)
    total = frame_masks.reshape(len(labels), -1).sum(axis=1)
    summary = {"test images": len(labels), "defect images": int((labels == 1).sum()),
               "defect masks that the 224 crop cuts (of the 256 frame)": int((inside < total).sum()),
               "share of defect pixels outside the 224 crop (256 frame)": float(1 - inside.sum() / max(1, total.sum())),
               "bootstrap resamples": rounds}
    title = (f"MVTec AD {args.category}, MobileNetV2 {args.weights}, coreset {args.coreset}, k = 1"
             + (" (QUICK smoke run: a few images, not figures)" if args.quick else ""))
    write_results(f"accuracy-{args.category}",
                  {f"{title}: pixels of the 224 crop": rows + ([peer] if peer else []),
                   f"{title}: the whole {frame[1]}x{frame[0]} frame, full-frame masks": frame_rows},
                  summary)


if __name__ == "__main__":
    main()
