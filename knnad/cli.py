"""The ``knnad`` command: fit, predict, evaluate, demo and info. Argument parsing and output
only; the work is done by the library."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._checks import check_output_folder
from ._version import __version__
from .archive import check_target
from .datasets import ImageFolder, dataset_pairs
from .detector import Detector
from ._checks import check_bool
from .options import OPTIONS, Option, defaults
from .preprocessing import IMAGE_SUFFIXES, denormalise, image_files
from .runtime import backend_info
from .thresholds import check_quantile

#: Settings of ``knnad demo``: MobileNetV2 with torchvision's IMAGENET1K_V1 weights (14 MB).
DEMO_PARAMS = {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
#: Exit status of ``knnad predict`` when some images could not be read (and were skipped).
PARTIAL = 3
#: What ``knnad predict`` may override in a saved model: placement and predict-time options.
PREDICT_OPTIONS = ("backend", "device") + tuple(name for name, option in OPTIONS.items() if not option.refit)


def _checked(check: Callable[[Any], Any], parse: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """argparse ``type=``: ``check(parse(text))``, with the check's message shown as is."""
    def read(text: str) -> Any:
        try:
            return check(parse(text))
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return read


def _reader(name: str, option: Option) -> Callable[[str], Any]:
    """argparse ``type=`` for ``option``: the option's own parsing and check."""
    return _checked(lambda value: value if option.nargs else option.check(value, name), option.parse)


def add_detector_options(parser: argparse.ArgumentParser, names: Sequence[str] = tuple(OPTIONS),
                         as_saved: bool = False) -> None:
    """A flag for each Detector parameter in ``names`` (``--image-size`` for ``image_size``),
    with the help and checks of :data:`knnad.options.OPTIONS` and the defaults of
    ``Detector``'s signature; with ``as_saved`` the default is None (keep the saved value)."""
    group = parser.add_argument_group("detector options (knnad.options)")
    for name, default in defaults(Detector).items():
        if name not in names:
            continue
        option, flag = OPTIONS[name], "--" + name.replace("_", "-")
        shown = "as saved" if as_saved else "none" if default is None else default
        default = None if as_saved else default
        if option.check is check_bool:  # --progress / --no-progress
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{option.help} (default: {shown})")
        else:
            group.add_argument(flag, type=_reader(name, option), nargs=option.nargs,
                               default=default, metavar=name.upper(),
                               help=f"{option.help} (default: {shown})")


def detector_params(args: argparse.Namespace, names: Sequence[str] = tuple(OPTIONS)) -> Dict[str, Any]:
    """The Detector parameters among parsed ``args`` (those added by :func:`add_detector_options`)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _images(arguments: List[str]) -> List[Path]:
    """Image files named on the command line, folders expanded."""
    found = [path for argument in arguments for path in image_files(argument)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {arguments}")
    return found


def command_fit(args: argparse.Namespace) -> None:
    check_target(args.model)  # before a long fit, not after it
    detector = Detector(**detector_params(args)).fit(_images(args.images))
    if args.calibrate:
        detector.calibrate(_images(args.calibrate), quantile=args.quantile)
    path = detector.save(args.model)
    print(f"saved {path}: {len(detector.train_paths_)} images, memory bank "
          f"{len(detector.index_)} x {detector.index_.dim}"
          + (f", image threshold {detector.thresholds_.image:.4f}" if args.calibrate else ""))


def command_predict(args: argparse.Namespace) -> int:
    overrides = {name: value for name, value in detector_params(args, PREDICT_OPTIONS).items()
                 if value is not None}
    placement = {name: overrides.pop(name, None) for name in ("backend", "device", "progress")}
    out = check_output_folder(args.out, "--out")
    detector = Detector.load(args.model, weights=args.weights, **placement).set_params(**overrides)
    paths = _images(args.images)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "scores.partial.csv"  # written batch by batch; scores.csv once all are done
    try:
        scored, skipped = _write_scores(detector, paths, partial, None if args.no_heatmaps else out)
    except BaseException:
        if partial.exists():
            print(f"knnad predict: the scores done before this stop are in {partial}", file=sys.stderr)
        raise
    os.replace(partial, out / "scores.csv")
    if not scored:
        raise ValueError(f"none of the {len(paths)} images could be read (listed in {out / 'scores.csv'})")
    print(f"scored {scored} images -> {out / 'scores.csv'}"
          + (f"; skipped {len(skipped)} that could not be read (status 'skipped')" if skipped else ""))
    return PARTIAL if skipped else 0


def _write_scores(detector: Detector, paths: List[Path], csv_path: Path,
                  heatmaps: Optional[Path]) -> Tuple[int, List[str]]:
    """Scores of ``paths`` into ``csv_path`` (and a heatmap per image into ``heatmaps``), batch by
    batch. Returns the number of images scored and the paths skipped."""
    from .plots import heatmap_grid  # matplotlib: only here

    scored, skipped = 0, []
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "anomalous", "status"])
        for batch in detector.predict_batches(paths):
            for row, path in enumerate(batch.paths):
                label = "" if batch.labels is None else int(batch.labels[row])
                writer.writerow([path, f"{batch.image_scores[row]:.6f}", label, "scored"])
                if heatmaps is not None:
                    image = denormalise(detector.preprocessor_(path).numpy())
                    threshold = detector.thresholds_.pixel if batch.masks is not None else None
                    # Colour scale: twice the pixel threshold when calibrated, else the image's own.
                    heatmap_grid([image], batch.anomaly_maps[row:row + 1],
                                 heatmaps / f"{scored + row:04d}_{Path(path).stem}.png",
                                 threshold=threshold, titles=[f"{batch.image_scores[row]:.3f}"],
                                 vmax=None if threshold is None else 2 * threshold)
            writer.writerows([path, "", "", "skipped"] for path in batch.skipped)
            handle.flush()
            scored, skipped = scored + len(batch), skipped + batch.skipped
    return scored, skipped


def _print_report(out: Path) -> None:
    print((out / "results.md").read_text())
    print(f"report written to {out}/ (results.md, results.csv, results.json, ROC plots, heatmaps)")


def command_evaluate(args: argparse.Namespace) -> None:
    from .report import evaluate_and_report  # scikit-learn, matplotlib: only here

    params = detector_params(args)
    out = check_output_folder(args.out, "--out")
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
    evaluate_and_report(pairs, params, out, title=f"knnad {args.dataset}")
    _print_report(out)


def demo_root() -> Path:
    """Folder of the MVTec bottle sample shipped with knnad (MVTec AD layout)."""
    return Path(str(resources.files("knnad") / "data" / "mvtec_bottle_sample"))


def command_demo(args: argparse.Namespace) -> None:
    from .report import evaluate_and_report

    params = {**DEMO_PARAMS, **detector_params(args)}
    out = check_output_folder(args.out, "--out")
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
    fit.add_argument("--quantile", type=_checked(check_quantile), default=0.99,
                     help="threshold quantile in (0, 1] (default: 0.99)")
    add_detector_options(fit)
    fit.set_defaults(run=command_fit)

    predict = commands.add_parser("predict", help="score images with a saved model")
    predict.add_argument("model", help="model file written by 'knnad fit'")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for scores.csv and heatmaps")
    predict.add_argument("--no-heatmaps", action="store_true", help="write scores.csv only")
    predict.add_argument("--weights", help="the .pth file the model was fit with, when it was fit "
                                            "with a local weight file")
    add_detector_options(predict, PREDICT_OPTIONS, as_saved=True)
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
    add_detector_options(evaluate)
    evaluate.set_defaults(run=command_evaluate)

    demo = commands.add_parser("demo", help="fit, predict and report on the bundled MVTec bottle sample")
    demo.add_argument("--out", default="knnad-demo", help="report folder (default: %(default)s)")
    add_detector_options(demo, ("weights", "device", "progress"))
    demo.set_defaults(weights=DEMO_PARAMS["weights"])
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
        status = args.run(args)
    except KeyboardInterrupt:
        print(f"knnad {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:  # OSError: file system
        if args.verbose:
            raise
        print(f"knnad {args.command}: error: {error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
