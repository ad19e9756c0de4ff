r"""Greedy coreset at scale, on real banks, against anomalib 2.7's KCenterGreedy; quiet and loaded.

Banks (MobileNetV2 patch features of MVTec AD bottle's 209 training images, cached under
benchmarks/.cache/coreset/):
  A  image 320, crop 288: 270,864 x 128 (the issue's ~270k bank; the targets apply here)
  B  image 256, crop 224, layers features.6 + .13 + .16: 163,856 x 288 (a wider bank: knnad
     selects on its 128-dim projection, anomalib on its own ~300-dim one)
  C  image 640, crop 576: 1,083,456 x 128 (growth to a million patches)

For each bank, at 10 % and 1 %, first on a quiet machine, then beside one competing CPU-bound
process (a one-thread numpy matrix-product loop started here): knnad.coreset's seconds, picks/s
and peak memory above the bank; anomalib's KCenterGreedy in its own interpreter (--peer-python,
a venv with anomalib 2.7), timed over 600 picks: its projection's seconds plus its per-pick
rate (picks 100 to 600; its per-pick cost is one pass over all points, constant) extrapolated
to the coreset size — marked as such. Then, on bank A's settings: Detector.fit with
coreset=0.1 from the image files (feature extraction included), FlatL2Index.search of the test
images' patches in the fitted bank, and Detector.predict of the test images, quiet and loaded.
Finally the covering radius (largest distance of a bank row to its nearest pick, in the bank's
own space) of knnad's picks and of anomalib's: anomalib's whole selection is its greedy on its
projected features, run to the end with knnad's exact loop from anomalib's first pick (its 600
measured picks are compared with it).

  python benchmarks/bench_coreset.py --mvtec-root ../shared/data/mvtec \
      --peer-python /tmp/peer/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from knnad import Detector
from knnad.datasets import MVTecAD
from knnad.sampling import _greedy_k_center, coreset, covering_radius

import _common
from _common import ONE_SCALE, CompetingProcess, PeakMemory, write_results

CACHE = Path(__file__).resolve().parent / ".cache" / "coreset"
BANKS = {  # name: (description, Detector settings)
    "A": ("bottle 320/288", dict(image_size=320, crop_size=288)),
    "B": ("bottle 256/224, 3 layers", dict(image_size=256, crop_size=224,
                                           layers=["features.6", "features.13", "features.16"])),
    "C": ("bottle 640/576", dict(image_size=640, crop_size=576)),
}
RATIOS = (0.1, 0.01)
PEER_PICKS, PEER_SKIPPED = 600, 100  # anomalib: picks timed, first picks left out of its rate
QUICK_ROWS = 20000  # --quick: the first rows of each bank
#: The tables' titles.
KNNAD = "knnad.coreset"
PEER = "anomalib KCenterGreedy (per-pick rate over picks 100-600, extrapolated)"
END_TO_END = "Bank A's settings end to end"
RADIUS = "Covering radius (largest distance to the nearest pick, bank space)"

_PEER = textwrap.dedent("""
    import json, sys, time, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    def peak():
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024

    bank_path, picks, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    bank = torch.from_numpy(np.load(bank_path))
    torch.manual_seed(0)
    before = peak()[1]
    sampler = KCenterGreedy(bank, 0.1)
    sampler.coreset_size = picks
    stamps, update = [], sampler.update_distances
    sampler.update_distances = lambda cluster_center: (stamps.append(time.perf_counter()),
                                                       update(cluster_center))[1]
    start = time.perf_counter()
    chosen = sampler.select_coreset_idxs()
    stamps.append(time.perf_counter())
    np.save(out + ".features.npy", sampler.features.numpy())
    json.dump({"projection_s": stamps[0] - start, "stamps": stamps, "picks": chosen,
               "dim": sampler.features.shape[1], "peak_bytes": peak()[0] - before,
               "threads": torch.get_num_threads()}, open(out + ".json", "w"))
""")


def bank_of(name: str, mvtec_root: Path) -> np.ndarray:
    """Bank ``name``'s float32 rows, built once with the Detector's own feature path."""
    path = CACHE / f"{name}.npy"
    if not path.is_file():
        paths = [s.path for s in MVTecAD(mvtec_root, "bottle", "train").samples]
        detector = Detector(backbone="mobilenet_v2", weights="IMAGENET1K_V1", coreset=None,
                            backend="torch", device="cpu", progress=False,
                            **{"layers": ONE_SCALE, **BANKS[name][1]}).fit(paths)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, detector.index_.vectors())
    return np.load(path)


def run_peer(python: str, name: str, bank: np.ndarray, load: str) -> dict:
    """anomalib's KCenterGreedy on ``bank`` (bank ``name``), ``PEER_PICKS`` picks, in its
    interpreter. Its random projection is unseeded: each run keeps its own projected features."""
    source = CACHE / f"{name}.npy"  # the whole bank, or (--quick) its first rows
    if len(np.load(source, mmap_mode="r")) != len(bank):
        source = CACHE / f"{name}-{len(bank)}.npy"
        np.save(source, bank)
    out = str(CACHE / f"{name}-{len(bank)}-{'quiet' if load == 'quiet' else 'loaded'}.anomalib")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(_PEER)
    try:
        subprocess.run([python, script.name, str(source), str(PEER_PICKS), out],
                       check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    finally:
        os.unlink(script.name)
    result = json.load(open(out + ".json"))
    result["features"] = out + ".features.npy"
    stamps = result.pop("stamps")
    result["per_pick_s"] = (stamps[-1] - stamps[PEER_SKIPPED]) / (len(stamps) - 1 - PEER_SKIPPED)
    return result


def knnad_rows(banks: dict, load: str, picks: dict) -> list:
    rows = []
    for name, bank in banks.items():
        for ratio in RATIOS:
            with PeakMemory() as memory:
                start = time.perf_counter()
                chosen = coreset(bank, ratio=ratio, seed=0)
                seconds = time.perf_counter() - start
            picks.setdefault((name, ratio), chosen)
            rows.append({"bank": f"{name}: {BANKS[name][0]}, {bank.shape[0]:,} x {bank.shape[1]}",
                         "machine": load, "coreset": f"{ratio:.0%} ({len(chosen):,})",
                         "seconds": seconds, "picks/s": len(chosen) / seconds,
                         "peak MiB above bank": memory.bytes / 2 ** 20,
                         "bank MiB": bank.nbytes / 2 ** 20,
                         "same picks as quiet": bool(np.array_equal(chosen, picks[(name, ratio)]))})
    return rows


def peer_rows(python: str, banks: dict, load: str, peers: dict) -> list:
    rows = []
    for name, bank in banks.items():
        peer = peers.setdefault((name, load), run_peer(python, name, bank, load))
        for ratio in RATIOS:
            count = int(len(bank) * ratio)
            rows.append({"bank": name, "machine": load, "coreset": f"{ratio:.0%} ({count:,})",
                         "projection dim": peer["dim"], "projection s": peer["projection_s"],
                         "ms per pick": 1e3 * peer["per_pick_s"],
                         "seconds (extrapolated)":
                             peer["projection_s"] + count * peer["per_pick_s"],
                         "peak MiB above bank (600 picks)": peer["peak_bytes"] / 2 ** 20})
    return rows


def detector_rows(args, load: str) -> list:
    """Fit (coreset 10 %), search and predict on bank A's settings, from image files."""
    train = [s.path for s in MVTecAD(args.mvtec_root, "bottle", "train").samples]
    test = [s.path for s in MVTecAD(args.mvtec_root, "bottle", "test").samples]
    detector = Detector(backbone="mobilenet_v2", layers=ONE_SCALE, weights="IMAGENET1K_V1",
                        coreset=0.1, progress=False, **BANKS["A"][1])
    start = time.perf_counter()
    detector.fit(train)
    fit = time.perf_counter() - start
    queries = np.load(CACHE / "A-test.npy") if (CACHE / "A-test.npy").is_file() else None
    if queries is None:
        probe = Detector(**{**detector.get_params(), "coreset": None, "backend": "torch"}).fit(test)
        queries = probe.index_.vectors()
        np.save(CACHE / "A-test.npy", queries)
    start = time.perf_counter()
    detector.index_.search(queries, 1)
    search = time.perf_counter() - start
    start = time.perf_counter()
    detector.predict(test)
    predict = time.perf_counter() - start
    return [{"machine": load, "step": "Detector.fit, coreset 10 % (209 images from files)",
             "seconds": fit, "rate": f"{len(train) / fit:.2f} img/s",
             "bank": f"{len(detector.index_):,} x {detector.index_.dim}"},
            {"machine": load, "step": f"FlatL2Index.search, {len(queries):,} test patches, k=1",
             "seconds": search, "rate": f"{len(queries) / search:,.0f} queries/s",
             "bank": f"{len(detector.index_):,} x {detector.index_.dim}"},
            {"machine": load, "step": f"Detector.predict, {len(test)} test images from files",
             "seconds": predict, "rate": f"{len(test) / predict:.2f} img/s",
             "bank": f"{len(detector.index_):,} x {detector.index_.dim}"}]


def radius_rows(banks: dict, picks: dict, peers: dict) -> list:
    """Covering radius of knnad's and anomalib's selections, in each bank's own space."""
    rows = []
    for name, bank in banks.items():
        peer = peers.get((name, "quiet"))
        features = np.load(peer["features"]) if peer else None
        for ratio in RATIOS:
            if name == "C" and ratio > 0.05:
                continue  # 1M queries x 108k picks: minutes of search for one figure
            count = int(len(bank) * ratio)
            row = {"bank": name, "coreset": f"{ratio:.0%} ({count:,})",
                   "knnad radius": covering_radius(bank, picks[(name, ratio)])}
            if peer:
                theirs = _greedy_k_center(torch.from_numpy(features), count, peer["picks"][0],
                                          False).numpy()
                measured = np.asarray(peer["picks"])[:count]
                row["anomalib radius"] = covering_radius(bank, theirs)
                row["knnad / anomalib"] = row["knnad radius"] / row["anomalib radius"]
                reproduced = np.argmin(np.append(theirs[:len(measured)] == measured, False))
                row["anomalib's measured picks: reproduced / measured"] = \
                    f"{reproduced} / {len(measured)}"
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path, required=True)
    parser.add_argument("--peer-python",
                        help="python of a venv with anomalib 2.7 (no anomalib figures without)")
    parser.add_argument("--banks", default="ABC", help="which banks (default ABC)")
    parser.add_argument("--loaded-banks", default="AB",
                        help="banks measured again beside the competing process (default AB: C's "
                             "10 %% selection alone takes minutes)")
    parser.add_argument("--peer-loaded-banks", default="A",
                        help="banks on which anomalib also runs beside the competing process "
                             "(default A: its 600 picks take minutes on the larger banks)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the first {QUICK_ROWS:,} rows of each bank, the detector "
                             f"only on a quiet machine, no result files")
    args = parser.parse_args()
    banks = {name: bank_of(name, args.mvtec_root)[:QUICK_ROWS if args.quick else None]
             for name in args.banks}
    tables = {KNNAD: [], PEER: [], END_TO_END: []}
    picks, peers = {}, {}
    for load in ("quiet", "one competing process"):
        with CompetingProcess(load != "quiet"):
            measured = banks if load == "quiet" else {
                n: banks[n] for n in args.loaded_banks if n in banks}
            tables[KNNAD] += knnad_rows(measured, load, picks)
            if args.peer_python:
                chosen = banks if load == "quiet" else {
                    n: banks[n] for n in args.peer_loaded_banks if n in banks}
                tables[PEER] += peer_rows(args.peer_python, chosen, load, peers)
            if "A" in banks and not (args.quick and load != "quiet"):
                tables[END_TO_END] += detector_rows(args, load)
    tables[RADIUS] = radius_rows(banks, picks, peers)
    knnad_s = {(r["bank"][0], r["machine"], r["coreset"]): r["seconds"]
               for r in tables[KNNAD]}
    summary = {}
    for row in tables[PEER]:
        summary[f"knnad speed-up over anomalib, bank {row['bank']}, {row['coreset']}, "
                f"{row['machine']}"] = \
            row["seconds (extrapolated)"] / knnad_s[(row["bank"], row["machine"], row["coreset"])]
    for key, seconds in knnad_s.items():
        if key[1] != "quiet":
            summary[f"knnad slow-down with a competing process, bank {key[0]}, {key[2]}"] = \
                seconds / knnad_s[(key[0], "quiet", key[2])]
    end_to_end = tables[END_TO_END]
    for row in end_to_end:
        if row["machine"] != "quiet":
            quiet = next(r for r in end_to_end
                         if r["machine"] == "quiet" and r["step"] == row["step"])
            summary[f"slow-down with a competing process: {row['step']}"] = \
                row["seconds"] / quiet["seconds"]
    if args.quick:  # a smoke run's figures are not results
        _common.RESULTS = Path(tempfile.mkdtemp())
    write_results("coreset", tables, summary)


if __name__ == "__main__":
    main()
