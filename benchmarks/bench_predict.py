"""Predict speed: knnad against anomalib PatchCore, the decoders, and the CPU-work bound.

1. Decoders side by side on the category's test images (PNG as stored, and JPEG copies encoded
   at quality 90): ms per image on one thread, and whether the pixels equal Pillow's.
2. Stage costs of knnad's detectors (:data:`LAYERS`: the default, two scales fused, and one
   scale, ``layers="coarse"``) on one thread, torch's and faiss's, each the least of three runs
   (decode + preprocessing, backbone, patch embedding, search, anomaly map and fusion, the
   scales' summed; ms per image): their sum is the CPU work of an image, and ``cores x 1000 /
   sum`` images/s the most any pipeline can reach on this machine (the CPU-work bound).
   Detector.predict's images/s is reported as a share of it.
3. Detector.predict images/s of both at a 1 % coreset (all training images) and a 10 % coreset (the
   first ``--subset`` training images, so that anomalib's coreset selection stays within
   minutes): cold (the first predict after fit), warm (two more passes over their time, the
   estimate the peer gets too), and warm with one competing CPU-bound process (the same).
   anomalib 2.7's PatchCore on the same images and coreset ratio with
   ``--peer-python`` (../shared/tools/peer_anomalib.py, run twice: the test set once and three
   times, so that its warm images/s is the two extra passes over their extra time).

  python benchmarks/bench_predict.py --peer-python /path/to/anomalib-venv/bin/python
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
from PIL import Image

from knnad import Detector
from knnad.datasets import MVTecAD
from knnad.runtime import kept_cpu_threads, set_cpu_threads

from _common import CompetingProcess, category_parser, write_results
from bench_end_to_end import stage_costs

SHARED = Path(__file__).resolve().parents[2] / "shared"
PASSES = 3
#: knnad's detectors measured: the default (two scales, fused) and one scale (knnad 0.3's).
LAYERS = {"knnad (default: multiscale)": None, "knnad, layers=coarse": "coarse"}


def _optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _pillow_draft(size: int) -> Callable[[bytes], np.ndarray]:
    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))
            return np.asarray(image.convert("RGB"))
    return decode


def decoder_rows(paths: List[Path], image_size: int) -> List[Dict[str, object]]:
    """ms per image of each installed decoder on ``paths`` (PNG) and on JPEG copies of them."""
    imagecodecs, pyspng, simplejpeg = (_optional(name)
                                       for name in ("imagecodecs", "pyspng", "simplejpeg"))
    png = [path.read_bytes() for path in paths]
    jpeg = []
    for data in png:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=90)
        jpeg.append(buffer.getvalue())
    candidates = {"PNG": {"Pillow": _pillow}, "JPEG": {"Pillow": _pillow}}
    if imagecodecs is not None:
        candidates["PNG"]["imagecodecs (libspng): knnad's"] = imagecodecs.spng_decode
        candidates["PNG"]["imagecodecs (libpng)"] = imagecodecs.png_decode
        candidates["JPEG"]["imagecodecs (libjpeg-turbo): knnad's"] = imagecodecs.jpeg8_decode
    if pyspng is not None:
        candidates["PNG"]["pyspng (libspng)"] = pyspng.load
    if simplejpeg is not None:
        candidates["JPEG"]["simplejpeg (libjpeg-turbo)"] = simplejpeg.decode_jpeg
    draft = f"Pillow draft (DCT scaling to >= {image_size} px)"
    candidates["JPEG"][draft] = _pillow_draft(image_size)
    rows = []
    for fmt, files in (("PNG", png), ("JPEG", jpeg)):
        reference = [_pillow(data) for data in files]
        for name, decode in candidates[fmt].items():
            decoded = [decode(data) for data in files]
            seconds = min(_timed(lambda: [decode(data) for data in files]) for _ in range(3))
            same = all(a.shape == b.shape and np.array_equal(a, b)
                       for a, b in zip(decoded, reference))
            pixels = "= Pillow's" if same else f"differ ({decoded[0].shape[1]} px wide)"
            rows.append({"format": fmt, "decoder": name, "ms/image": 1000 * seconds / len(files),
                         "pixels": pixels})
    return rows


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def one_thread_stages(detector: Detector, paths: List[str], repeats: int = 3
                      ) -> Dict[str, float]:
    """Stage costs (ms per image) with torch and faiss on one thread: the CPU work of an image,
    each stage's least of ``repeats`` runs (a floor: the machine's noise only slows runs)."""
    with kept_cpu_threads():
        set_cpu_threads(1)
        stage_costs(detector, paths[:8])  # warm-up
        runs = [stage_costs(detector, paths) for _ in range(repeats)]
    return {stage: min(run[stage] for run in runs) for stage in runs[0]}


def knnad_rates(detector: Detector, train: List[str], test: List[str]) -> Dict[str, Any]:
    """Fit seconds and images/s of Detector.predict: cold, warm, warm with a competing process."""
    fit = _timed(lambda: detector.fit(train))
    cold = _timed(lambda: detector.predict(test))
    # Two passes over their total time, as the peer's warm rate is measured (not the best one).
    warm = sum(_timed(lambda: detector.predict(test)) for _ in range(PASSES - 1))
    with CompetingProcess():
        loaded = sum(_timed(lambda: detector.predict(test)) for _ in range(PASSES - 1))
    count = (PASSES - 1) * len(test)
    return {"bank rows": " + ".join(str(len(scale.index)) for scale in detector.scales_),
            "fit s": fit, "cold img/s": len(test) / cold,
            "warm img/s": count / warm, "loaded img/s": count / loaded}


def _link_tree(root: Path, category: str, train: List[Path], passes: int, folder: Path) -> Path:
    """An MVTec-layout copy (symbolic links) of ``category`` with only ``train`` as training
    images and each test image (and mask) ``passes`` times."""
    source = root / category
    target = folder / category
    (target / "train" / "good").mkdir(parents=True)
    for path in train:
        (target / "train" / "good" / path.name).symlink_to(path.resolve())
    for path in sorted(source.glob("test/*/*.png")):
        kind = path.parent.name
        mask = source / "ground_truth" / kind / f"{path.stem}_mask.png"
        for copy in range(passes):
            name = f"{path.stem}_{copy}"
            (target / "test" / kind).mkdir(parents=True, exist_ok=True)
            (target / "test" / kind / f"{name}.png").symlink_to(path.resolve())
            if mask.exists():
                (target / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                (target / "ground_truth" / kind / f"{name}_mask.png").symlink_to(mask.resolve())
    return folder


def _printed(pattern: str, output: str) -> str:
    """The first group of ``pattern`` in the peer's ``output``."""
    found = re.search(pattern, output)
    if found is None:
        raise RuntimeError(f"the peer printed no {pattern!r}: {output[-2000:]}")
    return found.group(1)


def peer_rates(python: str, root: Path, category: str, train: List[Path], weights: Path,
               ratio: float) -> Dict[str, float]:
    """anomalib PatchCore's fit seconds, bank rows and images/s: cold (the test set once, right
    after fit) and warm (two more passes over their extra time)."""
    runs = {}
    for passes in (1, PASSES):
        with tempfile.TemporaryDirectory() as folder:
            data = _link_tree(root, category, train, passes, Path(folder))
            environment = {"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin",
                           "HOME": os.environ.get("HOME", "/tmp")}
            output = subprocess.run([python, str(SHARED / "tools" / "peer_anomalib.py"),
                                     str(data), category, str(weights), str(ratio)],
                                    capture_output=True, text=True, check=True,
                                    env=environment).stdout
        runs[passes] = {"fit": float(_printed(r"fit ([0-9.]+)s", output)),
                        "predict": float(_printed(r"predict ([0-9.]+)s", output)),
                        "bank": int(_printed(r"bank=\((\d+),", output))}
    count = len(list((root / category).glob("test/*/*.png")))
    return {"bank rows": runs[1]["bank"], "fit s": runs[1]["fit"],
            "cold img/s": count / runs[1]["predict"],
            "warm img/s": (PASSES - 1) * count / (runs[PASSES]["predict"] - runs[1]["predict"])}


def main() -> None:
    parser = category_parser(__doc__, root=SHARED / "data" / "mvtec")
    parser.add_argument("--subset", type=int, default=60,
                        help="training images of the 10 %% coreset runs (default: %(default)s)")
    parser.add_argument("--peer-python",
                        help="a Python with anomalib installed: measures the peer too")
    parser.add_argument("--peer-weights", type=Path,
                        default=SHARED / "weights" / "mobilenet_v2-b0353104.pth")
    args = parser.parse_args()
    train_set, test_set = (MVTecAD(args.mvtec_root, args.category, split)
                           for split in ("train", "test"))
    train = [Path(sample.path) for sample in train_set.samples]
    test = [str(sample.path) for sample in test_set.samples]

    decoders = decoder_rows([Path(path) for path in test[:40]], Detector().image_size)
    runs = {"1 %": (0.01, train), "10 %": (0.1, train[:args.subset])}
    speed, stages = [], []
    for name, (ratio, images) in runs.items():
        ours = []
        for who, layers in LAYERS.items():
            detector = Detector("mobilenet_v2", layers=layers, weights=args.weights,
                                coreset=ratio, progress=False)
            rates = knnad_rates(detector, [str(path) for path in images], test)
            costs = one_thread_stages(detector, test)
            work = sum(costs.values())
            bound = (os.cpu_count() or 1) * 1000.0 / work
            stages.append({"coreset": name, "who": who, **costs, "CPU work ms": work,
                           "bound img/s": bound, "warm / bound": rates["warm img/s"] / bound})
            ours.append({"coreset": name, "training images": len(images), "who": who, **rates})
        speed += ours
        if args.peer_python:
            peer = peer_rates(args.peer_python, args.mvtec_root, args.category, images,
                              args.peer_weights, ratio)
            speed.append({"coreset": name, "training images": len(images), "who": "anomalib 2.7",
                          **peer, "loaded img/s": float("nan")})
            for row in ours:
                row["warm ratio"] = row["warm img/s"] / peer["warm img/s"]
                row["cold ratio"] = row["cold img/s"] / peer["cold img/s"]
    for row in speed:
        row.setdefault("warm ratio", float("nan"))
        row.setdefault("cold ratio", float("nan"))
    title = (f"Detector.predict and anomalib PatchCore, MVTec AD {args.category} ({len(test)} "
             f"test images)")
    write_results(f"predict-{args.category}", {
        title: speed,
        "Stage costs on one thread (ms per image) and the CPU-work bound": stages,
        "Decoders (one thread, 40 test images)": decoders})


if __name__ == "__main__":
    main()
