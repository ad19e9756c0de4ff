import numpy as np
import pytest
from PIL import Image

from knnad import plots


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_roc_and_pro_plots(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 10)
    curves = {"faiss": (labels, labels + rng.normal(0, 0.6, 20)),
              "torch": (labels, labels + rng.normal(0, 0.9, 20))}
    assert png_size(plots.roc_plot(curves, tmp_path / "roc.png")) == (600, 600)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    maps = masks + rng.normal(0, 0.3, masks.shape)
    assert png_size(plots.roc_plot({"pixels": (masks, maps)}, tmp_path / "pixel.png")) == (600, 600)
    assert png_size(plots.pro_plot({"bottle": (masks, maps)}, tmp_path / "pro.png")) == (600, 600)
    with pytest.raises(ValueError, match="at least one curve"):
        plots.roc_plot({}, tmp_path / "none.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        plots.roc_plot(curves, tmp_path / "missing" / "roc.png")


def test_heatmap_grid(tmp_path):
    images = [np.full((32, 32, 3), 0.5)] * 3
    maps = np.random.default_rng(0).random((3, 32, 32))
    masks = maps > 0.9
    path = plots.heatmap_grid(images, maps, tmp_path / "grid.png", masks=masks, threshold=0.8,
                              titles=["a", "b", "c"])
    assert png_size(path) == (4 * 250, 3 * 250)  # 4 panels of 2.5 in at 100 dpi, 3 rows
    assert png_size(plots.heatmap_grid(images[:1], maps[:1], tmp_path / "one.png")) == (500, 250)
    with pytest.raises(ValueError, match="as many maps"):
        plots.heatmap_grid(images, maps[:2], tmp_path / "bad.png")
