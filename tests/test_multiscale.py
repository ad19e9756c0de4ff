"""Several feature scales in one detector (issue #20): the fused maps and the normal statistics
against their definitions computed by brute force in float64, the model file, the ONNX graph,
the refusals, the fusion weights chosen from synthetic defects."""
import logging

import numpy as np
import pytest
import torch

from knnad import Detector, OnnxDetector
from knnad.anomaly_map import anomaly_maps
from knnad.archive import read_archive, write_archive
from knnad.embedding import embed_images, pooled_rows
from knnad.fusion import NormalScores, Scale, normal_scores, refined_map, weight_grid
from knnad.options import check
from knnad.selection import DEFECT_AREA, held_out_numbers, synthetic_defects
from knnad.sources import batches

from test_detector import textured_images, with_defect

#: The multiscale preset on small images: a 16 x 16 fine grid, 8 x 8 coarse.
SMALL = dict(backbone="mobilenet_v2", layers="multiscale", weights=None, image_size=72,
             crop_size=64, progress=False, coreset=None)


@pytest.fixture(scope="module")
def images():
    return textured_images(8, seed=3)


@pytest.fixture(scope="module")
def fitted(images):
    """The default fusion ("refine")."""
    return Detector(**SMALL, k=2).fit(images)


def brute_force_patch_scores(detector, scale, batch, k, excluded_image=None):
    """float64 [B, h, w]: mean of the k smallest Euclidean distances to the scale's bank rows
    (without the rows of ``excluded_image``), by torch.cdist."""
    embedding = scale.embedder(detector.extractor_(batch)).double()
    bank = torch.from_numpy(scale.index.vectors()).double()
    if excluded_image is not None:
        bank = bank[torch.from_numpy(scale.image_ids != excluded_image)]
    count, height, width, dim = embedding.shape
    distances = torch.cdist(embedding.reshape(-1, dim), bank)
    return distances.topk(k, largest=False).values.mean(1).reshape(count, height, width)


def test_multiscale_fuses_a_coarse_and_a_fine_scale(fitted):
    assert fitted.extractor_.scales == (("features.6", "features.13"),
                                        ("features.3", "features.6", "features.13"))
    coarse, fine = fitted.scales_
    assert (coarse.index.dim, fine.index.dim) == (32 + 96, 24 + 32 + 96)
    # Coreset=None: every patch
    assert len(coarse.index) == 8 * 8 * 8 and len(fine.index) == 8 * 16 * 16
    assert coarse.weight == fine.weight == 0.5 and coarse.normal.k == 2


def test_a_finer_scale_keeps_a_seeded_pool_of_each_image_s_patches(fitted, images):
    embedders = [scale.embedder for scale in fitted.scales_]

    def embedded(batch_size, pool_seed):
        return embed_images(batches(images, fitted.preprocessor_, batch_size),
                            fitted.extractor_, embedders, pool_seed=pool_seed)

    every, pooled = embedded(3, None), embedded(3, 7)
    assert every.patches == pooled.patches == [8 * 64, 8 * 256]
    same = dict(rtol=1e-5, atol=1e-9)  # two forward passes may round differently
    np.testing.assert_allclose(pooled.banks[0], every.banks[0], **same)  # the first scale: all
    assert len(pooled.banks[1]) == 8 * 64  # as many per image as the first scale
    np.testing.assert_array_equal(pooled.image_ids[1], np.repeat(np.arange(8), 64))
    for image in range(8):
        rows = pooled_rows(256, 64, 7, image, 1)
        assert len(set(rows)) == 64
        np.testing.assert_allclose(pooled.banks[1][image * 64:(image + 1) * 64],
                                   every.banks[1][image * 256 + rows], **same)
    # The same pool in batches of another size; another seed, another pool.
    np.testing.assert_allclose(embedded(5, 7).banks[1], pooled.banks[1], **same)
    assert not np.allclose(embedded(3, 8).banks[1], pooled.banks[1], **same)


def test_a_coreset_share_is_of_the_coarse_scale_and_the_fine_bank_costs_as_much_to_search(
        fitted, images):
    coarse_rows = (64, 128)  # patches per image, dims
    fine_rows = (256, 24 + 32 + 96)
    detector = Detector(**{**SMALL, "coreset": 0.5}, k=2).fit(images)
    coarse, fine = detector.scales_
    assert len(fine.index) == round(len(coarse.index) * coarse_rows[0] * coarse_rows[1]
                                    / (fine_rows[0] * fine_rows[1]))
    assert np.bincount(fine.image_ids).max() <= 64  # picked from each image's pool of 64
    # The scales in the other order: banks of the same sizes (their pools are drawn per scale
    # number) and, with every patch kept, the same maps.
    reverse = dict(SMALL, layers=[["features.3", "features.6", "features.13"],
                                  ["features.6", "features.13"]], k=2)
    reversed_sizes = [len(scale.index)
                      for scale in Detector(**{**reverse, "coreset": 0.5}).fit(images).scales_]
    assert reversed_sizes == [len(fine.index), len(coarse.index)]
    tests = [with_defect(textured_images(1, seed=16)[0])]
    np.testing.assert_allclose(Detector(**reverse).fit(images).predict(tests).anomaly_maps,
                               fitted.predict(tests).anomaly_maps, atol=1e-5)
    every = Detector(**{**SMALL, "coreset": 1.0}, k=2).fit(images)  # 1.0 keeps every patch
    assert [len(scale.index) for scale in every.scales_] == [8 * 64, 8 * 256]


def test_normal_scores_are_the_held_out_images_scored_without_their_own_rows(fitted, images):
    kept = held_out_numbers(len(images))
    assert kept == list(range(8))  # up to 16, evenly spread: all 8 here
    batch = torch.from_numpy(np.stack([fitted.preprocessor_(image) for image in images]))
    for scale in fitted.scales_:
        scores = np.concatenate([brute_force_patch_scores(fitted, scale, batch[i:i + 1], 2,
                                                          excluded_image=i).numpy().ravel()
                                 for i in kept])
        assert scale.normal.patches == scores.size and scale.normal.images == 8
        assert scale.normal.location == pytest.approx(np.median(scores), rel=1e-5)
        assert scale.normal.spread == pytest.approx(np.quantile(scores, 0.999) - np.median(scores),
                                                    rel=1e-4)


def refined_by_definition(coarse, fine, radius):
    """float64 refine fusion of [B, H, W] maps, the local maximum by a loop over offsets."""
    height, width = fine.shape[-2:]
    padded = torch.nn.functional.pad(fine, (radius,) * 4, value=-float("inf"))
    local = torch.stack([padded[:, dy:dy + height, dx:dx + width]
                         for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]).amax(0)
    outline = torch.where(local > 1, fine / local, fine).clamp(0, 1)
    found = (local - 1).clamp(0, 1)
    return torch.maximum(fine, coarse * (1 - found * (1 - outline)))


def test_refine_cuts_the_coarse_halo_to_the_fine_outline_and_keeps_what_fine_misses():
    coarse = torch.zeros(1, 40, 40)
    fine = torch.zeros(1, 40, 40)
    coarse[0, 5:19, 5:19] = 4.0  # a blurred coarse response around a small defect ...
    fine[0, 10:14, 10:14] = 3.0  # ... that the fine scale outlines
    coarse[0, 25:35, 25:35] = 2.5  # a defect only the coarse scale sees
    fused = refined_map(coarse, fine, radius=2)
    assert torch.all(fused[0, 10:14, 10:14] == 4.0)  # coarse x outline 1
    assert fused[0, 8, 8] == 0.0  # the halo within reach of the fine detection: cut
    assert fused[0, 5, 5] == 4.0  # out of reach (radius 2): the coarse map stands
    assert torch.all(fused[0, 25:35, 25:35] == 2.5)  # fine sees nothing nearby: max(coarse, fine)
    weak = fine * 0.3  # a fine response below normal's 99.9th percentile gates nothing
    assert torch.equal(refined_map(coarse, weak, 2), torch.maximum(coarse, weak))
    np.testing.assert_allclose(fused.double(), refined_by_definition(coarse.double(),
                                                                     fine.double(), 2))


@pytest.mark.parametrize("fusion", ["max", "mean", "refine"])
def test_fused_maps_equal_their_definition(fitted, images, fusion):
    if fusion != fitted.fusion:
        fitted = Detector(**SMALL, k=2, fusion=fusion).fit(images)
    tests = [with_defect(textured_images(1, seed=9)[0]), textured_images(1, seed=10)[0]]
    batch = torch.from_numpy(np.stack([fitted.preprocessor_(image) for image in tests]))
    normalised = []
    for scale in fitted.scales_:
        patch = brute_force_patch_scores(fitted, scale, batch, 2)
        maps = anomaly_maps(patch.float(), 64, fitted.sigma, fitted.upsampling).double()
        normalised.append((maps - scale.normal.location) / scale.normal.spread)
    stacked = torch.stack(normalised)
    expected = (stacked.amax(0) if fusion == "max" else stacked.mean(0) if fusion == "mean"
                else refined_by_definition(*normalised, radius=8))  # 2 fine patches of 4 px
    if fusion == "refine":  # the fine scale sees the defect: the gate acts
        assert (expected - stacked.amax(0)).abs().max() > 0.5
    prediction = fitted.predict(tests)
    np.testing.assert_allclose(prediction.anomaly_maps, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(prediction.image_scores, expected.amax(dim=(1, 2)).numpy(),
                               atol=1e-4)
    # The defect: far above normal
    assert prediction.image_scores[0] > 2 * max(prediction.image_scores[1], 1.0)


def test_model_file_holds_the_scales_and_scores_as_saved(fitted, tmp_path):
    path = fitted.save(tmp_path / "multi.npz")
    meta, arrays, version = read_archive(path, "Detector", 3)
    assert version == 3 and {"memory_bank", "memory_bank_1", "patch_image_ids_1"} <= set(arrays)
    assert [scale["weight"] for scale in meta["scales"]] == [0.5, 0.5]
    assert meta["scales"][1]["layers"] == ["features.3", "features.6", "features.13"]
    loaded = Detector.load(path)
    assert [scale.normal for scale in loaded.scales_] == [scale.normal for scale in fitted.scales_]
    tests = textured_images(2, seed=11)
    np.testing.assert_array_equal(loaded.predict(tests).anomaly_maps,
                                  fitted.predict(tests).anomaly_maps)
    single = Detector(**{**SMALL, "layers": "coarse"}).fit(textured_images(2, seed=4))
    # Older knnad reads it
    assert read_archive(single.save(tmp_path / "single.npz"), "Detector", 3)[2] == 2


def test_files_of_the_one_scale_default_and_of_max_fusion_load_and_score_as_saved(images,
                                                                                tmp_path):
    """The default became two scales fused by "refine": a file of knnad 0.3's default (saved
    with layers=None, no fusion setting) stays one coarse scale; a two-scale file of fusion="max"
    stays "max"."""
    coarse = Detector(**{**SMALL, "layers": "coarse"}).fit(textured_images(3, seed=4))
    path = coarse.save(tmp_path / "coarse.npz")
    meta, arrays, version = read_archive(path, "Detector", 3)
    meta["params"]["layers"] = None
    del meta["params"]["fusion"]
    old = write_archive(tmp_path / "old.npz", "Detector", version, meta, arrays)
    tests = [with_defect(textured_images(1, seed=14)[0])] + textured_images(1, seed=15)
    loaded = Detector.load(old)
    assert loaded.extractor_.scales == (("features.6", "features.13"),)
    np.testing.assert_array_equal(loaded.predict(tests).anomaly_maps,
                                  coarse.predict(tests).anomaly_maps)
    fused_by_max = Detector(**SMALL, k=2, fusion="max").fit(images)
    reloaded = Detector.load(fused_by_max.save(tmp_path / "max.npz"))
    assert reloaded.fusion == "max" != Detector().fusion
    np.testing.assert_array_equal(reloaded.predict(tests).anomaly_maps,
                                  fused_by_max.predict(tests).anomaly_maps)


def test_settings_that_the_statistics_do_not_cover_are_refused(fitted):
    with pytest.raises(ValueError,
                       match=r"k=3: .*measured with k=2; set k=2, or fit again with k=3"):
        Detector(**SMALL, k=2).fit(textured_images(4, seed=5)).set_params(k=3).predict(
            textured_images(1, seed=6))
    with pytest.raises(ValueError, match=r"image_score='spade' scores one scale.*layers='coarse'"):
        Detector(**SMALL).set_params(image_score="spade")
    with pytest.raises(ValueError,
                       match=r"several scales needs at least 2 readable training images.*got 1"):
        Detector(**SMALL).fit(textured_images(1, seed=7))
    with pytest.raises(ValueError,
                       match=r"banks \(128, 512 rows\) keep fewer than k=100 rows of other images"):
        Detector(**SMALL, k=100).fit(textured_images(2, seed=7))  # 64 coarse rows per image


def test_fusing_needs_every_scale_s_normal_scores(fitted):
    measured = fitted.scales_
    assert normal_scores(measured) == [scale.normal for scale in measured]
    unmeasured = Scale(measured[1].embedder, measured[1].index, measured[1].image_ids)
    with pytest.raises(ValueError,
                       match="scale 1 of 2 has no normal scores.*fit the detector again"):
        normal_scores([measured[0], unmeasured])


def test_layers_name_scales_in_the_api_and_on_the_command_line():
    assert check("layers", ["features.6+features.13", "features.3+features.6"]) == (
        ("features.6", "features.13"), ("features.3", "features.6"))
    assert check("layers", [["features.6"], ["features.3"]]) == (("features.6",), ("features.3",))
    # One scale
    assert check("layers", ["features.6", "features.13"]) == ("features.6", "features.13")
    assert check("layers", "multiscale") == "multiscale"
    with pytest.raises(ValueError, match="several scales"):
        check("layers", ["features.6+", "features.3"])


@pytest.mark.parametrize("fusion", ["max", "refine"])
def test_exported_graph_fuses_like_the_detector(fitted, images, fusion, tmp_path):
    if fusion != fitted.fusion:
        fitted = Detector(**SMALL, k=2, fusion=fusion).fit(images)
    tests = [with_defect(textured_images(1, seed=12)[0])] + textured_images(2, seed=13)
    onnx = OnnxDetector(fitted.export_onnx(tmp_path / "multi.onnx")).predict(tests)
    expected = fitted.predict(tests)
    np.testing.assert_allclose(onnx.anomaly_maps, expected.anomaly_maps, atol=1e-4)
    np.testing.assert_allclose(onnx.image_scores, expected.image_scores, atol=1e-4)


def test_weight_grid():
    assert weight_grid(2) == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    three = weight_grid(3)
    assert len(three) == 15 and all(sum(weights) == 1 for weights in three)
    assert three[0] == (1.0, 0.0, 0.0)


def test_synthetic_defects_change_only_their_masks_and_repeat_with_the_seed():
    images = torch.randn(3, 3, 64, 64)
    defective, masks, sources = synthetic_defects(images, 2, seed=0)
    assert defective.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64)
    assert list(sources) == [0, 1, 2, 0, 1, 2]
    areas = masks.mean(axis=(1, 2))
    assert (areas >= DEFECT_AREA[0] - 1 / 4096).all() and (areas <= DEFECT_AREA[1] + 1 / 4096).all()
    for image, mask, source in zip(defective, masks, sources):
        outside = torch.from_numpy(~mask)
        assert torch.equal(image[:, outside], images[source][:, outside])
        assert not torch.equal(image[:, ~outside], images[source][:, ~outside])
    again = synthetic_defects(images, 2, seed=0)
    assert torch.equal(again[0], defective) and np.array_equal(again[1], masks)


def test_auto_fusion_chooses_weights_of_the_grid_and_says_so(images, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="knnad.selection"):
        detector = Detector(**SMALL, fusion="auto").fit(images)
    weights = tuple(scale.weight for scale in detector.scales_)
    assert weights in weight_grid(2)
    assert f"fusion weights {list(weights)}" in caplog.text
    assert "synthetic defects' pixel AUROC" in caplog.text
    loaded = Detector.load(detector.save(tmp_path / "auto.npz"))
    assert tuple(scale.weight for scale in loaded.scales_) == weights


def test_normal_scores_refuse_constant_scores():
    with pytest.raises(ValueError, match="do not vary"):
        NormalScores.of([np.ones(10), np.ones(10)], k=1)
