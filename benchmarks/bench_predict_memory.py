"""Peak memory of `knnad predict` against the number of images: it must stay flat.

Fits a model once on a genuine MVTec AD category, then runs `knnad predict` (scores only, no
heatmaps) in a fresh process on N images (the category's test images repeated, through
symbolic links) for each N, and reports the process's peak resident memory (ru_maxrss).

  python benchmarks/bench_predict_memory.py --mvtec-root ../shared/data/mvtec
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from knnad import Detector
from knnad.datasets import MVTecAD

from _common import ONE_SCALE, write_results

RUN = "import resource, sys; from knnad.cli import main; code = main(sys.argv[1:]); " \
      "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path, required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--counts", type=int, nargs="+", default=[40, 480, 1920])
    args = parser.parse_args()
    train = MVTecAD(args.mvtec_root, args.category, "train")
    test = [s.path.resolve() for s in MVTecAD(args.mvtec_root, args.category, "test").samples]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        detector = Detector("mobilenet_v2", layers=ONE_SCALE, weights="IMAGENET1K_V1",
                            progress=False)
        model = detector.fit(train).save(folder / "m.npz")
        for count in args.counts:
            images = folder / f"images-{count}"
            images.mkdir()
            for i in range(count):
                (images / f"{i:05d}{test[i % len(test)].suffix}").symlink_to(test[i % len(test)])
            start = time.perf_counter()
            output = subprocess.run([sys.executable, "-c", RUN, "predict", str(model), str(images),
                                     "--out", str(folder / f"out-{count}"), "--no-heatmaps",
                                     "--no-progress"], capture_output=True, text=True)
            if output.returncode:
                raise RuntimeError(f"knnad predict failed: {output.stderr}")
            output = output.stdout
            seconds = time.perf_counter() - start
            peak_kib = int(output.split("PEAK")[-1].split()[0])
            rows.append({"images": count, "peak RSS MiB": peak_kib / 1024, "seconds": seconds,
                         "images/s (with start-up)": count / seconds})
    write_results(f"predict_memory-{args.category}",
                  {"knnad predict, mobilenet_v2, 10 % coreset, no heatmaps": rows},
                  {"peak growth MiB from first to last":
                       rows[-1]["peak RSS MiB"] - rows[0]["peak RSS MiB"]})


if __name__ == "__main__":
    main()
