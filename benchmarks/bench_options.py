"""Detector options on a genuine MVTec AD category, from one fit: k, image score and upsampling.

Fits knnad's Detector once (MobileNetV2 IMAGENET1K_V1, resize 256 / crop 224, 10 % coreset),
then predicts the test set once per setting of the options that apply without a new fit
(``set_params``), and reports image AUROC, pixel AUROC with a 95 % bootstrap interval, AUPRO,
and the paired bootstrap difference of pixel AUROC against the defaults (k = 1, image score
"max", bilinear maps). These are the figures the defaults rest on (docs/guide/options.md);
they describe one category and choose nothing on their own.

  python benchmarks/bench_options.py --mvtec-root ../shared/data/mvtec
"""
import time

from knnad import Detector, evaluate
from knnad.datasets import MVTecAD
from knnad.metrics import pixel_auroc_bootstrap

from _common import ONE_SCALE, category_parser, interval, write_results

DEFAULTS = {"k": 1, "image_score": "max", "upsampling": "bilinear"}
SETTINGS = [DEFAULTS, {"k": 3}, {"k": 5}, {"k": 9}, {"upsampling": "nearest"},
            {"image_score": "spade"}]
BOOTSTRAP_ROUNDS = 2000


def main() -> None:
    parser = category_parser(__doc__)
    args = parser.parse_args()
    train = MVTecAD(args.mvtec_root, args.category, "train")
    test = MVTecAD(args.mvtec_root, args.category, "test")
    detector = Detector("mobilenet_v2", layers=ONE_SCALE, weights=args.weights,
                        coreset=args.coreset, progress=False)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    rows, map_sets, masks = [], [], None
    for setting in SETTINGS:
        detector.set_params(**{**DEFAULTS, **setting})
        results, prediction, masks = evaluate(detector, test, return_prediction=True)
        map_sets.append(prediction.anomaly_maps)
        name = ", ".join(f"{k}={v}" for k, v in setting.items())
        rows.append({"setting": name + (" (defaults)" if setting is DEFAULTS else ""),
                     "image AUROC": results["image_auroc"], "pixel AUROC": results["pixel_auroc"],
                     "AUPRO": results["aupro"], "predict img/s": results["images_per_second"]})
    replicates = pixel_auroc_bootstrap(masks, *map_sets, rounds=BOOTSTRAP_ROUNDS)
    for row, column in zip(rows, replicates.T):
        row["pixel AUROC 95% interval"] = interval(column)
        row["pixel AUROC - defaults, paired 95% interval"] = interval(column - replicates[:, 0],
                                                                      digits=5)
    write_results(f"options-{args.category}",
                  {f"MVTec AD {args.category}, MobileNetV2 {args.weights}, coreset {args.coreset}, "
                   f"one fit ({fit_seconds:.1f} s, bank {len(detector.index_)})": rows})


if __name__ == "__main__":
    main()
