"""The ``knnad`` command: fit, fit-many, predict, evaluate, export, serve, demo and info. Argument
parsing and output only; the work is done by the library."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import errno
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from ._checks import check_bool, check_int, check_number, check_output_folder
from ._version import __version__
from .archive import check_target
from .datasets import DatasetPair, ImageFolder, dataset_pairs
from .deploy.export import MIN_OPSET, import_onnx
from .detector import Detector
from .distributed import fit_many, predict_dataset
from .options import OPTIONS, SCORING, Option, defaults, validate
from .preprocessing import IMAGE_SUFFIXES, ImageLoadError, image_files
from .runtime import backend_info
from .serve.settings import SERVE_OPTIONS, TOKEN_VARIABLE, ServeSettings
from .thresholds import check_quantile

if TYPE_CHECKING:
    from .html_report import HtmlReport

#: Settings of ``knnad demo``: MobileNetV2 with torchvision's IMAGENET1K_V1 weights (14 MB).
DEMO_PARAMS = {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
#: Exit status of ``knnad predict`` when some images could not be read (and were skipped).
PARTIAL = 3
#: What ``knnad predict`` may override in a saved model: placement and predict-time options.
PREDICT_OPTIONS = ("backend", "device") + tuple(name for name, option in OPTIONS.items()
                                                if not option.refit)


def _checked(check: Callable[[Any], Any],
             parse: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """argparse ``type=``: ``check(parse(text))``, with the check's message shown as is."""
    def read(text: str) -> Any:
        try:
            return check(parse(text))
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return read


def _reader(name: str, option: Option) -> Callable[[str], Any]:
    """argparse ``type=`` for ``option``: the option's own parsing and check."""
    return _checked(lambda value: value if option.nargs else option.check(value, name),
                    option.parse)


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


def detector_params(args: argparse.Namespace,
                    names: Sequence[str] = tuple(OPTIONS)) -> Dict[str, Any]:
    """The Detector parameters among parsed ``args`` (those added by
    :func:`add_detector_options`)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _images(arguments: List[str]) -> List[Path]:
    """Image files named on the command line, folders expanded."""
    found = [path for argument in arguments for path in image_files(argument)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {arguments}")
    return found


def command_fit(args: argparse.Namespace) -> None:
    # Everything that can be checked is checked before the fit, not after it: the model path,
    # the detector's options together (k against a coreset count, sigma against the crop) and
    # the images of fit and of --calibrate.
    check_target(args.model)
    detector = Detector(**detector_params(args))
    validate(detector.get_params())
    images = _images(args.images)
    calibration = _images(args.calibrate) if args.calibrate else None
    detector.fit(images)
    if calibration:
        detector.calibrate(calibration, quantile=args.quantile)
    path = detector.save(args.model)
    thresholds = detector.thresholds_
    print(f"saved {path}: {len(detector.train_paths_)} images, memory bank "
          + " + ".join(f"{len(scale.index)} x {scale.index.dim}" for scale in detector.scales_)
          + (f", image threshold {thresholds.image:.4f}" if thresholds is not None else ""))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the command removed what it had written; the message says so."""


def _new_folders(folder: Path) -> List[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    return [path for path in (folder, *folder.parents) if not path.exists()]


def _remove_empty(folders: List[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            break


def command_predict(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return _predict_on_ray(args)
    ray_only = [flag for flag, value in (("--workers", args.workers), ("--maps", args.maps),
                                         ("--gpus-per-worker", args.gpus_per_worker)) if value]
    if ray_only:
        raise ValueError(f"{', '.join(ray_only)}: only with --ray")
    overrides = {name: value for name, value in detector_params(args, PREDICT_OPTIONS).items()
                 if value is not None}
    placement = {name: overrides.pop(name, None) for name in ("backend", "device", "progress")}
    out = check_output_folder(args.out, "--out")
    detector = Detector.load(args.model, weights=args.weights, **placement).set_params(**overrides)
    check_int(detector.k, "--k", 1, min(len(scale.index) for scale in detector.scales_),
              f" (the patches in the memory bank of {args.model}; use a smaller --k)")
    paths = _images(args.images)
    new_folders = _new_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ScoresWriter(detector, out / "scores.partial.csv", None if args.no_heatmaps else out,
                           None if args.no_report else _html_report(detector, args.model))
    try:
        writer.write(paths)
    except KeyboardInterrupt:
        # Ctrl-C: the user stopped the run, so it leaves nothing half-done behind.
        writer.remove()
        _remove_empty(new_folders)
        kept = "; the previous scores.csv is kept" if (out / "scores.csv").exists() else ""
        raise Interrupted(f"interrupted; no output written ({writer.scored} images had been "
                          f"scored{kept})") from None
    except BaseException as error:
        # An error: what was done stays in scores.partial.csv, and the message says where.
        if writer.scored:
            _add_note(error, f"; the {writer.scored} images scored before it are in "
                             f"{writer.csv_path}")
        else:
            writer.remove()
            _remove_empty(new_folders)
        raise
    os.replace(writer.csv_path, out / "scores.csv")
    if not writer.scored:
        raise ValueError(f"none of the {len(paths)} images could be read (listed in "
                         f"{out / 'scores.csv'})")
    report = "" if writer.report is None else f", {writer.report.write(out / 'report.html')}"
    skipped = writer.skipped
    print(f"scored {writer.scored} images -> {out / 'scores.csv'}{report}"
          + (f"; skipped {len(skipped)} that could not be read (status 'skipped')"
             if skipped else ""))
    return PARTIAL if skipped else 0


def _predict_on_ray(args: argparse.Namespace) -> int:
    """``knnad predict ... --ray [ADDRESS]``: :func:`knnad.distributed.predict_dataset` into
    OUT/scores.parquet."""
    overrides = {name: value for name, value in detector_params(args, PREDICT_OPTIONS).items()
                 if value is not None and name != "progress"}  # Ray Data shows the progress
    if overrides.pop("on_error", "skip") != "skip":
        raise ValueError("--on-error raise: with --ray an unreadable image is always skipped "
                         "(status 'skipped' in its row)")
    batch_size = overrides.pop("batch_size", None) or 8
    if args.weights:
        overrides["weights"] = args.weights
    out = check_output_folder(args.out, "--out")
    summary = predict_dataset(args.model, _images(args.images), out / "scores.parquet",
                              num_workers=args.workers, num_gpus_per_worker=args.gpus_per_worker,
                              batch_size=batch_size, maps=args.maps, address=args.ray or None,
                              params=overrides)
    skipped = summary["skipped"]
    print(f"scored {summary['scored']} images on Ray in {summary['seconds']:.1f} s -> "
          f"{summary['output']}" + (f"; skipped {skipped} that could not be read (status "
                                    f"'skipped')" if skipped else ""))
    return PARTIAL if skipped else 0


#: The detector options of ``knnad fit-many`` (its jobs show no progress bars).
FIT_MANY_OPTIONS = tuple(name for name in OPTIONS if name != "progress")


def _named_folder(argument: str):
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder) as a fit_many job."""
    name, separator, folder = argument.partition("=")
    return (name, folder) if separator and name and not Path(argument).exists() else \
        (Path(argument).name, argument)


def command_fit_many(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out, "--out")
    if args.dataset:
        if args.folders:
            raise ValueError("give folders or --dataset, not both")
        if not args.root:
            raise ValueError(f"--dataset {args.dataset} needs --root")
        jobs = [(name, train) for name, train, _
                in dataset_pairs(args.dataset, Path(args.root), args.category)]
    elif args.folders:
        jobs = [_named_folder(folder) for folder in args.folders]
    else:
        raise ValueError("fit-many needs folders of normal images, or --dataset mvtec|btad "
                         "--root ROOT")
    rows = fit_many(jobs, out, address=args.address, num_cpus_per_job=args.cpus_per_job,
                    num_gpus_per_job=args.gpus_per_job, **detector_params(args, FIT_MANY_OPTIONS))
    for row in rows:
        print(f"{row['name']}: " + (f"saved {row['model']} (memory bank {row['bank_size']}, "
                                    f"{row['seconds']:.1f} s)" if row["error"] is None
                                    else f"failed: {row['error']}"))
    failed = sum(row["error"] is not None for row in rows)
    if failed == len(rows):
        raise RuntimeError(f"all {len(rows)} jobs failed (see above)")
    return PARTIAL if failed else 0


def _html_report(detector: Detector, model: str) -> "HtmlReport":
    """The :class:`knnad.html_report.HtmlReport` of ``knnad predict``: its images as the model
    sees them, its thresholds where they fit the scoring options given."""
    from .report import HtmlReport, display_images  # matplotlib: only here

    thresholds = detector.thresholds_
    usable = thresholds if thresholds and not thresholds.changed(detector.get_params()) else None
    return HtmlReport(display_images(detector), thresholds=usable, title=f"knnad predict: {model}")


class _ScoresWriter:
    """Scores of images into ``csv_path`` (and a heatmap per image into ``heatmaps``, each image
    into ``report``), batch by batch; counts what it has done (``scored``, ``skipped``) and
    remembers the files it created, so that an interrupted run can remove them."""

    def __init__(self, detector: Detector, csv_path: Path, heatmaps: Optional[Path],
                 report: Optional["HtmlReport"] = None):
        self.detector, self.csv_path, self.heatmaps = detector, csv_path, heatmaps
        self.report = report
        self.scored = 0
        self.skipped: List[Optional[str]] = []
        self.created: List[Path] = []

    def remove(self) -> None:
        """Delete the partial scores and the heatmaps this writer created (files that existed
        before it, such as an earlier run's, stay)."""
        for path in [self.csv_path, *self.created]:
            try:
                if path.is_file():
                    path.unlink()
            except OSError:  # gone already, or not ours to remove
                pass

    def _heatmap(self, folder: Path, path: str, batch: Any, row: int) -> None:
        from .plots import heatmap_grid  # matplotlib: only here

        detector, thresholds = self.detector, self.detector.thresholds_
        target = folder / f"{self.scored + row:04d}_{Path(path).stem}.png"
        if not target.exists():
            self.created.append(target)
        # The image under the map: as the model saw it, or as given (map_size="original").
        image = detector.preprocessor_.rgb(path, original=detector.map_size == "original")
        threshold = thresholds.pixel if thresholds and batch.masks is not None else None
        # Colour scale: twice the pixel threshold when calibrated, else the image's own.
        heatmap_grid([image], batch.anomaly_maps[row:row + 1], target, threshold=threshold,
                     titles=[f"{batch.image_scores[row]:.3f}"],
                     vmax=None if threshold is None else 2 * threshold)

    def write(self, paths: List[Path]) -> None:
        with open(self.csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "score", "anomalous", "status"])
            for batch in self.detector.predict_batches(paths):
                for row, path in enumerate(batch.paths):
                    label = "" if batch.labels is None else int(batch.labels[row])
                    writer.writerow([path, f"{batch.image_scores[row]:.6f}", label, "scored"])
                    if self.heatmaps is not None:
                        self._heatmap(self.heatmaps, str(path), batch, row)
                writer.writerows([path, "", "", "skipped"] for path in batch.skipped)
                handle.flush()
                self.scored += len(batch)
                self.skipped += batch.skipped
                if self.report is not None:
                    self.report.add(batch)


def _reporting(out: Path, run: Callable[[], Any]) -> None:
    """``run()``, which writes a report into ``out``; after Ctrl-C, the files it had written
    (those not in ``out`` before) and the folders it created are removed."""
    new_folders = _new_folders(out)
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        run()
    except KeyboardInterrupt:
        for path in (set(out.iterdir()) if out.is_dir() else set()) - before:
            if path.is_file():
                path.unlink(missing_ok=True)
        _remove_empty(new_folders)
        raise Interrupted("interrupted; no report written") from None
    except BaseException:
        _remove_empty(new_folders)  # an error before anything was written leaves no empty folder
        raise


def command_export(args: argparse.Namespace) -> None:
    import_onnx()  # before any work: the extra may be missing
    target = check_target(args.out, ".onnx")
    overrides = {name: value for name, value in detector_params(args, SCORING).items()
                 if value is not None}
    detector = Detector.load(args.model, weights=args.weights, device="cpu", progress=False)
    thresholds = detector.thresholds_
    params = detector.set_params(**overrides).get_params()
    changed = thresholds.changed(params) if thresholds else []
    path = detector.export_onnx(target, batch_size=args.batch_size, opset=args.opset)
    note = ("no thresholds: the model is not calibrated" if not thresholds else
            f"no thresholds: they were calibrated with {', '.join(changed)}; export without "
            f"those options, or fit again with --calibrate" if changed else
            "thresholds in its metadata")
    frame = ", ".join(map(str, detector.preprocessor_.frame or ()))  # fit and load fix it
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB): images float32 "
          f"[{args.batch_size or 'N'}, 3, {frame}] -> image_scores, anomaly_maps; {note}")


def _print_report(out: Path, pairs: Sequence[Any]) -> None:
    """The results table, then the report's files (``pairs``: the evaluated categories)."""
    from .report import REPORT

    pages = "" if len(pairs) == 1 else ", which links each category's report"
    print((out / "results.md").read_text())
    print(f"report written to {out}/ (results.md, results.csv, results.json, ROC and PRO plots, "
          f"heatmaps); open in a browser: {out / REPORT}{pages}")


def command_evaluate(args: argparse.Namespace) -> None:
    from .report import evaluate_and_report  # scikit-learn, matplotlib: only here

    params = detector_params(args)
    out = check_output_folder(args.out, "--out")
    if args.dataset == "folder":
        if not (args.train and args.test_normal and args.test_abnormal):
            raise ValueError("--dataset folder needs --train, --test-normal and --test-abnormal "
                             "(and optionally --masks)")
        pairs: List[DatasetPair] = [(Path(args.train).name, ImageFolder(args.train),
                  ImageFolder(args.test_normal, args.test_abnormal, args.masks))]
    else:
        if not args.root:
            raise ValueError(f"--dataset {args.dataset} needs --root")
        pairs = dataset_pairs(args.dataset, Path(args.root), args.category)
    _reporting(out, lambda: evaluate_and_report(pairs, params, out, title=f"knnad {args.dataset}"))
    _print_report(out, pairs)


def demo_root() -> Path:
    """Folder of the MVTec bottle sample shipped with knnad (MVTec AD layout)."""
    return Path(str(resources.files("knnad") / "data" / "mvtec_bottle_sample"))


def command_demo(args: argparse.Namespace) -> None:
    from .report import evaluate_and_report

    params = {**DEMO_PARAMS, **detector_params(args)}
    out = check_output_folder(args.out, "--out")
    pairs = dataset_pairs("mvtec", demo_root(), ["bottle"])
    _reporting(out, lambda: evaluate_and_report(pairs, params, out, save_models=True,
                                                title="knnad demo, MVTec bottle sample"))
    _print_report(out, pairs)
    print(f"The bottle images are MVTec AD's (c) MVTec Software GmbH, under CC BY-NC-SA 4.0, not "
          f"knnad's MIT licence: non-commercial use only, crediting MVTec and the MVTec AD paper, "
          f"and what you share made from them (such as these heatmaps and HTML reports) under the "
          f"same licence; see {demo_root() / 'NOTICE.md'}")


def command_serve(args: argparse.Namespace) -> None:
    given = {name: getattr(args, name) for name in SERVE_OPTIONS if hasattr(args, name)}
    given.setdefault("token", os.environ.get(TOKEN_VARIABLE))
    settings = ServeSettings(**given)  # an unguarded address is refused before anything loads
    from .serve.server import serve  # knnad[serve]: FastAPI and uvicorn
    serve(args.model, settings, weights=args.weights,
          **detector_params(args, ("backend", "device")))


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """A flag for each setting of :class:`~knnad.serve.settings.ServeSettings`, with the help
    and checks of :data:`~knnad.serve.settings.SERVE_OPTIONS` and its defaults; a flag not
    given is left out of the parsed arguments (the setting keeps its default)."""
    group = parser.add_argument_group("server options (knnad.serve.settings)")
    for field in dataclasses.fields(ServeSettings):
        option, flag = SERVE_OPTIONS[field.name], "--" + field.name.replace("_", "-")
        if option.check is check_bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                               help=option.help)
            continue
        shown = "" if field.default is None else f" (default: {field.default})"
        group.add_argument(flag, type=_reader(field.name, option), default=argparse.SUPPRESS,
                           metavar=field.name.upper(), help=option.help + shown)


def command_info(args: argparse.Namespace) -> None:
    print(json.dumps({"knnad": __version__, **backend_info()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="knnad", description="Visual anomaly detection by exact nearest-neighbour search on "
                                  "pretrained CNN features.",
        epilog="Examples:\n  knnad demo\n  knnad fit good_images/ --model model.npz "
               "--backbone mobilenet_v2\n  knnad predict model.npz new_images/ --out scores/\n"
               "  knnad evaluate --dataset mvtec --root mvtec_ad --category bottle --out report/\n"
               "  knnad export model.npz --out model.onnx\n"
               "  knnad serve model.npz\n"
               "  knnad predict model.npz archive/ --out scores/ --ray\n"
               "  knnad fit-many --dataset mvtec --root mvtec_ad --out models/",
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
    predict.add_argument("--out", required=True,
                         help="folder for scores.csv, report.html (an HTML inspection report to "
                              "open in a browser) and heatmaps")
    predict.add_argument("--no-heatmaps", action="store_true", help="no heatmap PNG per image")
    predict.add_argument("--no-report", action="store_true", help="no report.html")
    predict.add_argument("--weights", help="the .pth file the model was fit with, when it was fit "
                                            "with a local weight file")
    ray = predict.add_argument_group("on a Ray cluster (knnad[ray]; "
                                     "knnad.distributed.predict_dataset)")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="score on Ray into OUT/scores.parquet (one row per image; no heatmaps, "
                          "no report.html): "
                          "ADDRESS 'auto', HOST:PORT or ray://HOST:PORT, none: the local Ray, "
                          "started if need be. Put it last, or write --ray=ADDRESS")
    ray.add_argument("--workers", type=_checked(lambda n: check_int(n, "--workers"), int),
                     help="scoring actors, each loading the model once (default: as many as Ray "
                          "can run)")
    ray.add_argument("--gpus-per-worker", default=0.0,
                     type=_checked(lambda g: check_number(g, "--gpus-per-worker", 0.0)),
                     help="GPUs of each scoring actor (default: 0)")
    ray.add_argument("--maps", action="store_true",
                     help="also each anomaly map, as a .npy file named in the map_file column")
    add_detector_options(predict, PREDICT_OPTIONS, as_saved=True)
    predict.set_defaults(run=command_predict)

    many = commands.add_parser("fit-many", help="fit and save one model per folder or dataset "
                                                "category, each in a Ray task (knnad[ray])")
    many.add_argument("folders", nargs="*", metavar="[NAME=]FOLDER",
                      help="folders of normal images, one model each, named NAME or after the "
                           "folder")
    many.add_argument("--dataset", choices=("mvtec", "btad"),
                      help="one model per category, fit on its train split")
    many.add_argument("--root", help="dataset root (mvtec, btad)")
    many.add_argument("--category", nargs="+", help="categories (default: all found)")
    many.add_argument("--out", required=True, help="folder for the models, NAME.npz")
    many.add_argument("--address", help="the Ray cluster: 'auto', HOST:PORT or ray://HOST:PORT "
                                        "(default: the local Ray, started if need be)")
    many.add_argument("--cpus-per-job", default=1.0,
                      type=_checked(lambda c: check_number(c, "--cpus-per-job", 0.0)),
                      help="CPUs of each job (default: 1)")
    many.add_argument("--gpus-per-job", default=0.0,
                      type=_checked(lambda g: check_number(g, "--gpus-per-job", 0.0)),
                      help="GPUs of each job (default: 0)")
    add_detector_options(many, FIT_MANY_OPTIONS)
    many.set_defaults(run=command_fit_many)

    evaluate = commands.add_parser("evaluate", help="fit and evaluate on a labelled dataset")
    evaluate.add_argument("--dataset", choices=("mvtec", "btad", "folder"), required=True)
    evaluate.add_argument("--root", help="dataset root (mvtec, btad)")
    evaluate.add_argument("--category", nargs="+", help="categories (default: all found)")
    evaluate.add_argument("--train", help="folder: normal training images")
    evaluate.add_argument("--test-normal", help="folder: normal test images")
    evaluate.add_argument("--test-abnormal", help="folder: defect test images")
    evaluate.add_argument("--masks", help="folder: masks of the defect test images")
    evaluate.add_argument("--out", default="knnad-evaluation",
                          help="report folder (default: %(default)s)")
    add_detector_options(evaluate)
    evaluate.set_defaults(run=command_evaluate)

    demo = commands.add_parser("demo",
                               help="fit, predict and report on the bundled MVTec bottle sample")
    demo.add_argument("--out", default="knnad-demo", help="report folder (default: %(default)s)")
    add_detector_options(demo, ("weights", "device", "progress"))
    demo.set_defaults(weights=DEMO_PARAMS["weights"])
    demo.set_defaults(run=command_demo)

    export = commands.add_parser("export",
                                 help="write a saved model as one ONNX file (knnad[export])")
    export.add_argument("model", help="model file written by 'knnad fit'")
    export.add_argument("--out", required=True, help="output ONNX file (.onnx)")
    export.add_argument("--batch-size", type=_checked(lambda n: check_int(n, "--batch-size"), int),
                        help="a fixed batch size (default: any)")
    export.add_argument("--opset", type=_checked(lambda n: check_int(n, "--opset", MIN_OPSET), int),
                        default=MIN_OPSET, help="ONNX opset (default: %(default)s)")
    export.add_argument("--weights", help="the .pth file the model was fit with, when it was fit "
                                          "with a local weight file")
    add_detector_options(export, SCORING, as_saved=True)
    export.set_defaults(run=command_export)

    serve = commands.add_parser("serve", help="serve a saved model over HTTP: POST /v1/predict, "
                                              "a page at / (knnad[serve])")
    serve.add_argument("model", help="model file written by 'knnad fit' (read once, never "
                                     "written)")
    serve.add_argument("--weights", help="the .pth file the model was fit with, when it was fit "
                                         "with a local weight file")
    add_serve_options(serve)
    add_detector_options(serve, ("backend", "device"), as_saved=True)
    serve.set_defaults(run=command_serve)

    info = commands.add_parser("info", help="which faiss and GPUs knnad finds")
    info.set_defaults(run=command_info)
    return parser


#: What to do about an operating-system error, by errno name (those this platform has).
_OS_ADVICE = {getattr(errno, name): advice for name, advice in {
    "EACCES": "check its permissions or choose another path",
    "EPERM": "check its permissions or choose another path",
    "EROFS": "choose a folder on a writable file system",
    "ENOSPC": "free some disk space or choose another folder",
    "EDQUOT": "free some disk space or choose another folder",
    "EISDIR": "a folder has that name: rename it or choose another path",
    "ENOTDIR": "a part of the path is a file, not a folder; check the path",
    "ENOENT": "check the path"}.items() if hasattr(errno, name)}


def error_message(error: BaseException) -> str:
    """The one line a command prints for ``error``: its message, or for a raw operating-system
    error (``[Errno 13] Permission denied: 'x'``) the path, the cause and what to do; then any
    note the command added (where the work done so far is)."""
    message = str(error)
    if isinstance(error, OSError) and error.errno is not None and error.strerror \
            and message.startswith("["):
        where = f" {error.filename}" if error.filename is not None else ""
        message = (f"cannot access{where}: {error.strerror.lower()}; "
                   f"{_OS_ADVICE.get(error.errno, 'check the path and the disk')}")
    return message + getattr(error, "knnad_note", "")


def _add_note(error: BaseException, note: str, first: bool = False) -> None:
    """Append ``note`` to the one-line message :func:`error_message` prints for ``error`` (or
    put it before the notes already there: ``first``)."""
    notes = getattr(error, "knnad_note", "")
    setattr(error, "knnad_note", note + notes if first else notes + note)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line (the full usage is a screen long)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # faiss's loader reports each CPU variant it tries.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        status = args.run(args)
    except KeyboardInterrupt as interrupt:
        print(f"knnad {args.command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
    # OSError: the file system's errors.
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        if args.verbose:
            raise
        if isinstance(error, ImageLoadError) and hasattr(args, "on_error"):
            _add_note(error, "; --on-error skip skips such files", first=True)
        print(f"knnad {args.command}: error: {error_message(error)}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
