"""Evaluate knnad on MVTec AD: every category found under --root, or the ones named.

Writes results.md, results.csv, results.json, ROC/PRO plots and heatmap grids to --out.

  python examples/evaluate_mvtec.py --root /data/mvtec_ad --category bottle --backbone mobilenet_v2 --out out/
"""
import argparse
import logging
from pathlib import Path

from knnad.report import dataset_pairs, evaluate_and_report

DATASET = "mvtec"


def main(dataset: str = DATASET, description: str = __doc__) -> None:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="dataset root")
    parser.add_argument("--category", nargs="+", help="categories (default: all found)")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--weights", default="DEFAULT", help="e.g. IMAGENET1K_V1 or a .pth path")
    parser.add_argument("--coreset", type=float, default=0.1, help="share of patches kept (1 = all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    params = {"backbone": args.backbone, "weights": args.weights, "device": args.device,
              "coreset": None if args.coreset >= 1 else args.coreset}
    evaluate_and_report(dataset_pairs(dataset, args.root, args.category), params, args.out,
                        title=f"knnad {dataset} {args.backbone}")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
