"""ONNX export against the detector it came from, on one MVTec AD category (bottle here).

In one run: the detector (torch + faiss) and its exported file run by ONNX Runtime's CPU
provider (and by OpenVINO's CPU runtime where it is installed) score the same test images,
alternately, from their paths (decoding included, batch 8): images/s, the largest relative
difference of image scores and maps, the process's resident-memory growth while scoring, file
sizes — for a 10 % coreset and for the full bank. Then, in fresh processes, a bank of about
a million patches (the category's training images at a 576-pixel crop, 72 × 72 patches each):
the resident memory that export adds to a process holding the fitted detector, and the peak
resident memory of a process that imports neither torch nor faiss, loads the file and scores
one image, each against the bank's bytes.

Usage: python benchmarks/bench_export.py --mvtec-root ../shared/data/mvtec
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from knnad import Detector, OnnxDetector
from knnad.datasets import MVTecAD
from knnad.sources import batches, image_items

from _common import ONE_SCALE, PeakMemory, category_parser, write_results

BIG_CROP = 576


def _openvino_runner(path: Path, detector: OnnxDetector, precision: str):
    """``(predict, precision used)``: ``predict(paths) -> (image scores, maps)`` with OpenVINO's
    CPU runtime on the same file (``precision``: ``"f32"``, or ``"default"``: OpenVINO's own
    hint, bf16 on CPUs with AVX512-BF16 or AMX), or None where OpenVINO is not installed."""
    try:
        import openvino
    except ImportError:  # not installed: the table then has no OpenVINO rows
        return None
    core = openvino.Core()
    config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(str(path), "CPU", config)

    def predict(paths):
        scores, maps = [], []
        for batch in batches(image_items(paths, "images"), detector.preprocessor, 8):
            result = compiled(np.asarray(batch.images))
            scores.append(result[compiled.output("image_scores")])
            maps.append(result[compiled.output("anomaly_maps")])
        return np.concatenate(scores), np.concatenate(maps)
    return predict, str(compiled.get_property("INFERENCE_PRECISION_HINT"))


def _timed_in_turn(runners, repeats=2):
    """``name -> (result, best seconds, resident growth in bytes of the first call)``, the
    runners called in turn ``repeats`` times so that machine noise falls on all of them."""
    found = {name: [None, float("inf"), None] for name in runners}
    for _ in range(repeats):
        for name, function in runners.items():
            with PeakMemory() as peak:
                start = time.perf_counter()
                result = function()
                seconds = time.perf_counter() - start
            entry = found[name]
            entry[0], entry[1] = result, min(entry[1], seconds)
            entry[2] = peak.bytes if entry[2] is None else entry[2]
    return found


def _max_relative(actual, expected):
    return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def compare(args, coreset, rerank, folder: Path, openvino: bool):
    train = MVTecAD(args.mvtec_root, args.category, "train")
    tests = [sample.path for sample in MVTecAD(args.mvtec_root, args.category, "test").samples]
    detector = Detector("mobilenet_v2", layers=ONE_SCALE, weights=args.weights, coreset=coreset,
                        rerank=rerank,
                        progress=False).fit(train)
    start = time.perf_counter()
    path = detector.export_onnx(folder / f"{args.category}-{coreset}-{rerank}.onnx")
    export_seconds = time.perf_counter() - start
    onnx_detector = OnnxDetector(path)
    runners = {"knnad Detector (torch, faiss)": lambda: detector.predict(tests),
               "ONNX Runtime CPU": lambda: onnx_detector.predict(tests)}
    for precision in ("f32", "default") if openvino else ():
        found = _openvino_runner(path, onnx_detector, precision)
        if found is not None:
            openvino, hint = found
            runners[f"OpenVINO CPU ({precision} precision hint: {hint})"] = \
                (lambda run: lambda: run(tests))(openvino)
    results = _timed_in_turn(runners)
    reference = results["knnad Detector (torch, faiss)"][0]
    bank_bytes = detector.index_.vectors().nbytes
    rows = []
    for name, (output, seconds, growth) in results.items():
        scores, maps = ((output.image_scores, output.anomaly_maps)
                        if hasattr(output, "image_scores") else output)
        rows.append({"coreset": str(coreset), "rerank": rerank, "runtime": name,
                     "images/s": len(tests) / seconds, "RSS growth MiB": growth / 2**20,
                     "max rel. diff image scores": _max_relative(scores, reference.image_scores),
                     "max rel. diff maps": _max_relative(maps, reference.anomaly_maps)})
    size = {"coreset": str(coreset), "bank rows": len(detector.index_),
            "bank MiB": bank_bytes / 2**20, "file MiB": path.stat().st_size / 2**20,
            "file - bank MiB (backbone)": (path.stat().st_size - bank_bytes) / 2**20,
            "export s": export_seconds}
    return rows, size


_EXPORT_BIG = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
from _common import PeakMemory
from knnad import Detector
from knnad.datasets import MVTecAD
detector = Detector("mobilenet_v2", layers={layers!r}, weights={weights!r}, coreset=None,
                    image_size={crop}, crop_size={crop}, progress=False)
detector.fit(MVTecAD({root!r}, {category!r}, "train"))
with PeakMemory() as peak:
    start = time.perf_counter()
    detector.export_onnx({path!r})
    seconds = time.perf_counter() - start
expected = detector.predict([{image!r}])
print(json.dumps({{"rows": len(detector.index_), "bank_bytes": detector.index_.vectors().nbytes,
                  "export_growth": peak.bytes, "export_seconds": seconds,
                  "score": float(expected.image_scores[0])}}))
"""

_SCORE_BIG = """
import json, sys, time
import onnxruntime
from knnad import OnnxDetector
options = onnxruntime.SessionOptions()
if {lean}:
    options.add_session_config_entry("session.disable_prepacking", "1")
start = time.perf_counter()
prediction = OnnxDetector({path!r}, session_options=options).predict([{image!r}])
seconds = time.perf_counter() - start
assert "torch" not in sys.modules and "faiss" not in sys.modules
# VmHWM: this process's own peak (ru_maxrss would count the forking parent's size).
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM"))
print(json.dumps({{"peak_kib": peak_kib, "seconds": seconds,
                  "score": float(prediction.image_scores[0])}}))
"""


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def big_bank(args, folder: Path):
    path = str(folder / "big.onnx")
    image = str(next((args.mvtec_root / args.category / "test" / "broken_large").glob("*.png")))
    fields = dict(benchmarks=str(Path(__file__).resolve().parent), weights=args.weights,
                  crop=BIG_CROP, root=str(args.mvtec_root), category=args.category, path=path,
                  image=image, layers=ONE_SCALE)
    exported = _run(_EXPORT_BIG.format(**fields))
    bank = exported["bank_bytes"]
    rows = [{"step": "export (process holding the fitted detector)", "bank rows": exported["rows"],
             "bank MiB": bank / 2**20, "file MiB": Path(path).stat().st_size / 2**20,
             "seconds": exported["export_seconds"], "RSS MiB": exported["export_growth"] / 2**20,
             "RSS / bank": exported["export_growth"] / bank, "rel. diff vs Detector": 0.0}]
    for lean in (False, True):
        scored = _run(_SCORE_BIG.format(lean=lean, **fields))
        step = "OnnxDetector: load, score one image" + (", prepacking off" if lean else "")
        rows.append({"step": step,
                     "bank rows": exported["rows"], "bank MiB": bank / 2**20,
                     "file MiB": Path(path).stat().st_size / 2**20, "seconds": scored["seconds"],
                     "RSS MiB": scored["peak_kib"] / 1024,
                     "RSS / bank": scored["peak_kib"] * 1024 / bank,
                     "rel. diff vs Detector":
                         abs(scored["score"] - exported["score"]) / exported["score"]})
    return rows


def main() -> None:
    parser = category_parser(__doc__)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        speed, sizes = [], []
        for coreset, rerank, openvino in ((args.coreset, 0, True), (None, 0, True),
                                          (None, 4, False)):
            rows, size = compare(args, coreset, rerank, folder, openvino)
            speed += rows
            if not rerank:
                sizes.append(size)
        big = big_bank(args, folder)
    write_results(f"export-{args.category}", {
        "Scoring the test images from their paths (decode included, batch 8, best of 2)": speed,
        "File sizes (mobilenet_v2, layers features.6 + features.13, crop 224)": sizes,
        f"A bank of about a million patches (crop {BIG_CROP}): memory (export: growth of the "
        f"process's resident memory; OnnxDetector: the whole process's peak, torch and faiss "
        f"not imported)": big})


if __name__ == "__main__":
    main()
