import numpy as np
import pytest
from scipy import ndimage

from knnad import metrics


def test_image_auroc_hand_computed():
    # Pairs (defect, good): 3 of 4 ordered correctly -> 0.75; ties count half.
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert metrics.image_auroc([1, 0, 1], [3, 1, 2]) == 1.0


def test_pixel_auroc_and_roc_curve():
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = True
    maps = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.4, 0.0], [0.1, 0.2]]])
    assert metrics.pixel_auroc(masks, maps) == 1.0
    fpr, tpr, thresholds = metrics.roc_curve(masks, maps)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_f1_max_hand_computed():
    # Top two: precision 1, recall 2/3 -> F1 0.8; all four: precision 3/4, recall 1 -> 6/7.
    assert metrics.f1_max([1, 1, 0, 1], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(6 / 7)
    assert metrics.f1_max([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(1.0)


def test_errors():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        metrics.image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="must match"):
        metrics.pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0, 1], [np.nan, 1])
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), fpr_limit=0)


def pro_by_thresholds(masks, maps, fpr_limit, steps=4000):
    """Independent AUPRO: explicit thresholds, per-region overlap averaged over regions."""
    structure = np.ones((3, 3), bool)
    regions = []
    for image_index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        regions += [(image_index, labelled == r) for r in range(1, count + 1)]
    normal = ~masks
    thresholds = np.linspace(maps.max(), maps.min(), steps)
    fprs, pros = [0.0], [0.0]
    for threshold in thresholds:
        above = maps >= threshold
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    x = np.append(fprs[keep], fpr_limit)
    y = np.append(pros[keep], np.interp(fpr_limit, fprs, pros))
    return np.trapezoid(y, x) / fpr_limit


def test_aupro_against_threshold_loop():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 40, 40), bool)
    masks[0, 5:10, 5:10] = True       # two regions of different size in one image
    masks[0, 20:35, 22:37] = True
    masks[1, 30:33, 2:6] = True
    masks[1, 33, 6] = True            # touches diagonally: same 8-connected region
    maps = rng.normal(0, 1, masks.shape) + masks * rng.uniform(0.5, 2.5, masks.shape)
    for limit in (0.05, 0.3, 1.0):
        expected = pro_by_thresholds(masks, maps, limit)
        assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=3e-3)


def test_aupro_extremes_and_pro_curve():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 6:9, 6:9] = True
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert metrics.aupro(masks, 1.0 - masks) == pytest.approx(0.0)
    fpr, pro = metrics.pro_curve(masks, np.random.default_rng(1).random(masks.shape))
    assert fpr[0] == pro[0] == 0 and fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_pixel_auroc_bootstrap_equals_auroc_of_repeated_images():
    rng = np.random.default_rng(1)
    masks = rng.random((7, 9, 9)) < 0.2
    masks[0] = False  # an image without defect pixels
    tied_maps = np.round(rng.random((7, 9, 9)) + 0.3 * masks, 1)  # many exact ties
    noise_maps = rng.random((7, 9, 9))
    replicates = metrics.pixel_auroc_bootstrap(masks, tied_maps, noise_maps, rounds=6, seed=3)
    assert replicates.shape == (6, 2)
    draws = np.random.default_rng(3).multinomial(7, [1 / 7] * 7, size=6)
    for replicate, draw in zip(replicates, draws):
        images = np.repeat(np.arange(7), draw)
        if not masks[images].any():
            assert np.isnan(replicate).all()
            continue
        for value, maps in zip(replicate, (tied_maps, noise_maps)):
            assert value == pytest.approx(metrics.pixel_auroc(masks[images], maps[images]),
                                          abs=1e-12)


def test_image_auroc_bootstrap_equals_auroc_of_repeated_images_on_pixel_resamples():
    rng = np.random.default_rng(2)
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1])
    tied = np.round(rng.random(9) + 0.4 * labels, 1)
    noise = rng.random(9)
    replicates = metrics.image_auroc_bootstrap(labels, tied, noise, rounds=8, seed=5)
    assert replicates.shape == (8, 2)
    draws = np.random.default_rng(5).multinomial(9, [1 / 9] * 9, size=8)
    checked = 0
    for replicate, draw in zip(replicates, draws):
        images = np.repeat(np.arange(9), draw)
        if labels[images].all() or not labels[images].any():
            assert np.isnan(replicate).all()
            continue
        checked += 1
        for value, scores in zip(replicate, (tied, noise)):
            assert value == pytest.approx(metrics.image_auroc(labels[images], scores[images]),
                                          abs=1e-12)
    assert checked >= 6
    # the same resamples as the pixel bootstrap: images as one-pixel maps give the same figures
    pixel = metrics.pixel_auroc_bootstrap(labels[:, None, None].astype(bool),
                                          tied[:, None, None], rounds=8, seed=5)
    np.testing.assert_array_equal(pixel[:, 0], replicates[:, 0])


def test_image_auroc_bootstrap_errors():
    labels = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="image_auroc_bootstrap needs at least one set of scores"):
        metrics.image_auroc_bootstrap(labels)
    with pytest.raises(ValueError, match="scores #0 has shape"):
        metrics.image_auroc_bootstrap(labels, np.zeros(4))
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        metrics.image_auroc_bootstrap(labels[:, None], np.zeros((3, 1)))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        metrics.image_auroc_bootstrap(np.ones(3), np.zeros(3))


def test_pixel_auroc_bootstrap_errors():
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="at least one"):
        metrics.pixel_auroc_bootstrap(masks)
    with pytest.raises(ValueError, match="maps #1 has shape"):
        metrics.pixel_auroc_bootstrap(masks, np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="rounds"):
        metrics.pixel_auroc_bootstrap(masks, np.zeros((2, 3, 3)), rounds=0)


@pytest.mark.parametrize("labels", [[-1, 1, 1, -1], ["ok", "ng", "ng", "ok"], [0, 2, 1, 0]])
def test_labels_other_than_0_1_are_refused(labels):
    with pytest.raises(ValueError, match="must be 0/1 or bool"):
        metrics.image_auroc(np.array(labels), [0.1, 0.9, 0.8, 0.2])
