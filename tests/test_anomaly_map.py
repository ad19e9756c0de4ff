import pytest
import torch
from torchvision.transforms.functional import gaussian_blur as torchvision_blur

from knnad.anomaly_map import anomaly_maps, gaussian_blur, gaussian_kernel_size


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_separable_blur_equals_torchvision(sigma):
    maps = torch.rand(3, 1, 64, 80)
    expected = torchvision_blur(maps, gaussian_kernel_size(sigma), sigma)
    torch.testing.assert_close(gaussian_blur(maps, sigma), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upsampling", ["bilinear", "nearest"])
@pytest.mark.parametrize("grid, size, sigma", [((28, 28), 224, 4.0), ((7, 9), (64, 80), 2.0),
                                               ((14, 14), 112, 0.0)])
def test_matrix_form_equals_upsample_then_blur(grid, size, sigma, upsampling):
    scores = torch.rand(3, *grid) * 5
    target = (size, size) if isinstance(size, int) else size
    corners = {"align_corners": False} if upsampling == "bilinear" else {}
    explicit = torch.nn.functional.interpolate(scores[:, None], size=target, mode=upsampling,
                                               **corners)
    if sigma:
        explicit = gaussian_blur(explicit, sigma)
    torch.testing.assert_close(anomaly_maps(scores, size, sigma, upsampling), explicit[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_nearest_upsampling_keeps_each_patch_score_on_its_cell():
    scores = torch.arange(12.0).reshape(1, 3, 4)
    maps = anomaly_maps(scores, (24, 32), sigma=0, upsampling="nearest")
    torch.testing.assert_close(maps, scores.repeat_interleave(8, 1).repeat_interleave(8, 2))


def test_anomaly_maps_shape_and_values():
    assert gaussian_kernel_size(4.0) == 33
    constant = torch.full((2, 7, 7), 3.0)
    maps = anomaly_maps(constant, 56, sigma=4.0)
    assert maps.shape == (2, 56, 56) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, torch.full((2, 56, 56), 3.0))
    spike = torch.zeros(1, 8, 8)
    spike[0, 4, 4] = 1.0
    sharp = anomaly_maps(spike, (64, 64), sigma=0)
    smooth = anomaly_maps(spike, (64, 64), sigma=4)
    assert abs(int(sharp.argmax()) - int(smooth.argmax())) <= 65
    assert smooth.max() < sharp.max()
    torch.testing.assert_close(smooth.sum(), sharp.sum(), rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        anomaly_maps(spike, 64, sigma=-1)
    with pytest.raises(ValueError, match="upsampling='bicubic'"):
        anomaly_maps(spike, 64, upsampling="bicubic")
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        anomaly_maps(spike[0], 64)
