r"""Evaluate knnad on MVTec AD: every category found under --root, or the ones named.

Writes results.md, results.csv, results.json, ROC/PRO plots and heatmap grids to --out. Takes
every detector option of `knnad evaluate` (see --help), with the same defaults.

  python examples/evaluate_mvtec.py --root /data/mvtec_ad --category bottle \
      --backbone mobilenet_v2 --out out/
"""
import argparse
import logging
from pathlib import Path

from knnad.cli import add_detector_options, detector_params
from knnad.datasets import dataset_pairs
from knnad.report import evaluate_and_report

DATASET = "mvtec"


def main(dataset: str = DATASET, description: str = __doc__) -> None:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="dataset root")
    parser.add_argument("--category", nargs="+", help="categories (default: all found)")
    parser.add_argument("--out", required=True, type=Path, help="report folder")
    add_detector_options(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    evaluate_and_report(dataset_pairs(dataset, args.root, args.category), detector_params(args),
                        args.out, title=f"knnad {dataset} {args.backbone}")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
