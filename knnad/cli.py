"""The ``knnad`` command: fit, predict, evaluate, demo and info. Argument parsing and output
only; the work is done by the library."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import __version__
from .anomaly_map import UPSAMPLING
from .backbones import PRESET_LAYERS
from .datasets import ImageFolder
from .detector import IMAGE_SCORES, Detector
from .preprocessing import IMAGE_SUFFIXES, image_files
from .runtime import backend_info

logger = logging.getLogger("knnad.cli")

#: Settings of ``knnad demo``: MobileNetV2 with torchvision's IMAGENET1K_V1 weights (14 MB).
DEMO_PARAMS = {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1"}


def _coreset(value: str) -> Optional[float]:
    if value.lower() == "none":
        return None
    number = float(value)
    return int(number) if number > 1 else number


def _add_detector_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detector")
    group.add_argument("--backbone", default="wide_resnet50_2",
                       help=f"torchvision model name; presets: {', '.join(PRESET_LAYERS)} "
                            f"(default: %(default)s)")
    group.add_argument("--weights", default="DEFAULT",
                       help="'DEFAULT', a weight name such as IMAGENET1K_V1, 'none' (random), or "
                            "a .pth path (default: %(default)s)")
    group.add_argument("--layers", nargs="+", help="layer names to hook (default: the preset)")
    group.add_argument("--k", type=int, default=1, help="nearest normal patches per score (default: 1)")
    group.add_argument("--image-score", choices=IMAGE_SCORES, default="max",
                       help="image score: map maximum or SPADE global kNN (default: max)")
    group.add_argument("--coreset", type=_coreset, default=0.1,
                       help="share (0-1] or count of patches to keep, or 'none' (default: 0.1)")
    group.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or cuda:all")
    group.add_argument("--rerank", type=int, default=0,
                       help="extra candidates checked with exact distances (default: 0)")
    group.add_argument("--upsampling", choices=UPSAMPLING, default="bilinear",
                       help="patch scores to pixels (nearest: as anomalib; default: bilinear)")
    group.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    group.add_argument("--image-size", type=int, default=256, help="shorter side after resize")
    group.add_argument("--crop-size", type=int, default=224, help="centre crop side")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _detector_params(args: argparse.Namespace) -> Dict[str, Any]:
    return {"backbone": args.backbone, "weights": None if args.weights.lower() == "none" else args.weights,
            "layers": args.layers, "k": args.k, "image_score": args.image_score,
            "coreset": args.coreset, "backend": args.backend, "device": args.device,
            "rerank": args.rerank, "upsampling": args.upsampling,
            "batch_size": args.batch_size, "image_size": args.image_size,
            "crop_size": args.crop_size, "progress": not args.no_progress}


def _images(arguments: List[str]) -> List[Path]:
    """Image files named on the command line, folders expanded."""
    found = [path for argument in arguments for path in image_files(argument)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {arguments}")
    return found


def command_fit(args: argparse.Namespace) -> None:
    detector = Detector(**_detector_params(args)).fit(_images(args.images))
    if args.calibrate:
        detector.calibrate(_images(args.calibrate), quantile=args.quantile)
    path = detector.save(args.model)
    print(f"saved {path}: {len(detector.train_paths_)} images, memory bank "
          f"{len(detector.index_)} x {detector.index_.dim}"
          + (f", image threshold {detector.image_threshold_:.4f}" if args.calibrate else ""))


def command_predict(args: argparse.Namespace) -> None:
    from . import plots

    detector = Detector.load(args.model, device=args.device, progress=not args.no_progress)
    paths = _images(args.images)
    prediction = detector.predict(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "anomalous"])
        for row, path in enumerate(prediction.paths):
            label = "" if prediction.labels is None else int(prediction.labels[row])
            writer.writerow([path, f"{prediction.image_scores[row]:.6f}", label])
    if not args.no_heatmaps:
        top = float(prediction.anomaly_maps.max())
        for row, path in enumerate(prediction.paths):
            image = plots.denormalise(detector.preprocessor(path).numpy())
            plots.heatmap_grid([image], prediction.anomaly_maps[row:row + 1],
                               out / f"{row:04d}_{Path(path).stem}.png",
                               threshold=detector.pixel_threshold_,
                               titles=[f"{prediction.image_scores[row]:.3f}"], vmax=top)
    print(f"scored {len(prediction)} images -> {out / 'scores.csv'}"
          + (f"; skipped {prediction.skipped}" if prediction.skipped else ""))


def _print_report(out: Path) -> None:
    print((out / "results.md").read_text())
    print(f"report written to {out}/ (results.md, results.csv, results.json, ROC plots, heatmaps)")


def command_evaluate(args: argparse.Namespace) -> None:
    from .report import dataset_pairs, evaluate_and_report  # scikit-learn, matplotlib: only here

    params = _detector_params(args)
    if args.dataset == "folder":
        if not (args.train and args.test_normal and args.test_abnormal):
            raise ValueError("--dataset folder needs --train, --test-normal and --test-abnormal "
                             "(and optionally --masks)")
        pairs = [(Path(args.train).name, ImageFolder(args.train),
                  ImageFolder(args.test_normal, args.test_abnormal, args.masks))]
    else:
        if not args.root:
            raise ValueError(f"--dataset {args.dataset} needs --root")
        pairs = dataset_pairs(args.dataset, Path(args.root), args.category)
    out = Path(args.out)
    evaluate_and_report(pairs, params, out, title=f"knnad {args.dataset}")
    _print_report(out)


def demo_root() -> Path:
    """Folder of the MVTec bottle sample shipped with knnad (MVTec AD layout)."""
    return Path(str(resources.files("knnad") / "data" / "mvtec_bottle_sample"))


def command_demo(args: argparse.Namespace) -> None:
    from .report import dataset_pairs, evaluate_and_report

    params = {**DEMO_PARAMS, "device": args.device, "progress": not args.no_progress}
    out = Path(args.out)
    evaluate_and_report(dataset_pairs("mvtec", demo_root(), ["bottle"]), params, out,
                        title="knnad demo, MVTec bottle sample", save_models=True)
    _print_report(out)


def command_info(args: argparse.Namespace) -> None:
    print(json.dumps({"knnad": __version__, **backend_info()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnad", description="Visual anomaly detection by exact nearest-neighbour search on "
                                  "pretrained CNN features.",
        epilog="Examples:\n  knnad demo\n  knnad fit good_images/ --model model.npz "
               "--backbone mobilenet_v2\n  knnad predict model.npz new_images/ --out scores/\n"
               "  knnad evaluate --dataset mvtec --root mvtec_ad --category bottle --out report/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"knnad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="learn normal from defect-free images, save a model")
    fit.add_argument("images", nargs="+", help="normal image files or folders")
    fit.add_argument("--model", required=True, help="output model file (.npz)")
    fit.add_argument("--calibrate", nargs="+", help="held-out normal images to set thresholds")
    fit.add_argument("--quantile", type=float, default=0.99, help="threshold quantile (default: 0.99)")
    _add_detector_options(fit)
    fit.set_defaults(run=command_fit)

    predict = commands.add_parser("predict", help="score images with a saved model")
    predict.add_argument("model", help="model file written by 'knnad fit'")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for scores.csv and heatmaps")
    predict.add_argument("--device", help="override the saved device")
    predict.add_argument("--no-heatmaps", action="store_true", help="write scores.csv only")
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(run=command_predict)

    evaluate = commands.add_parser("evaluate", help="fit and evaluate on a labelled dataset")
    evaluate.add_argument("--dataset", choices=("mvtec", "btad", "folder"), required=True)
    evaluate.add_argument("--root", help="dataset root (mvtec, btad)")
    evaluate.add_argument("--category", nargs="+", help="categories (default: all found)")
    evaluate.add_argument("--train", help="folder: normal training images")
    evaluate.add_argument("--test-normal", help="folder: normal test images")
    evaluate.add_argument("--test-abnormal", help="folder: defect test images")
    evaluate.add_argument("--masks", help="folder: masks of the defect test images")
    evaluate.add_argument("--out", default="knnad-evaluation", help="report folder (default: %(default)s)")
    _add_detector_options(evaluate)
    evaluate.set_defaults(run=command_evaluate)

    demo = commands.add_parser("demo", help="fit, predict and report on the bundled MVTec bottle sample")
    demo.add_argument("--out", default="knnad-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=command_demo)

    info = commands.add_parser("info", help="which faiss and GPUs knnad finds")
    info.set_defaults(run=command_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports each CPU variant tried
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"knnad {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
