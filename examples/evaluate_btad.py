r"""Evaluate knnad on BTAD (beanTech Anomaly Detection): every class (01, 02, 03) found under
--root (the BTech_Dataset_transformed folder or the one above it), or the ones named.

Writes results.md, results.csv, results.json, ROC/PRO plots and heatmap grids to --out.

  python examples/evaluate_btad.py --root /data/BTech_Dataset_transformed \
      --backbone mobilenet_v2 --out out/
"""
from evaluate_mvtec import main

if __name__ == "__main__":
    main("btad", __doc__)
