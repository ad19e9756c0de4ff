import threading
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from knnad.backbones import (
    PRESET_LAYERS,
    FeatureExtractor,
    WeightsUnavailableError,
    module_fingerprint,
)
from knnad.preprocessing import Preprocessor


@pytest.fixture(scope="module")
def wide_resnet():
    return FeatureExtractor("wide_resnet50_2", layers="coarse", weights=None)


@pytest.mark.parametrize("backbone, expected", [
    ("mobilenet_v2", {"features.6": (2, 32, 28, 28), "features.13": (2, 96, 14, 14)}),
    ("resnet18", {"layer2": (2, 128, 28, 28), "layer3": (2, 256, 14, 14)}),
])
def test_preset_shapes(backbone, expected):
    extractor = FeatureExtractor(backbone, layers="coarse", weights=None)
    features = extractor(torch.randn(2, 3, 224, 224))
    assert list(features) == list(PRESET_LAYERS[backbone])
    assert {k: tuple(v.shape) for k, v in features.items()} == expected
    assert all(v.dtype == torch.float32 for v in features.values())
    pooled = extractor.global_features(features)
    assert pooled.shape == (2, sum(v[1] for v in expected.values()))
    first = features[PRESET_LAYERS[backbone][0]]
    torch.testing.assert_close(pooled[:, :first.shape[1]], first.mean(dim=(2, 3)))


def test_wide_resnet_shapes_and_all_layers(wide_resnet):
    features = wide_resnet(torch.randn(1, 3, 224, 224))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "layer2": (1, 512, 28, 28), "layer3": (1, 1024, 14, 14)}
    every = FeatureExtractor("wide_resnet50_2", layers=["layer1", "layer4", "layer3"], weights=None)
    shapes = {k: tuple(v.shape) for k, v in every(torch.randn(1, 3, 224, 224)).items()}
    assert list(shapes) == ["layer1", "layer4", "layer3"]  # the order asked for
    assert shapes == {"layer1": (1, 256, 56, 56), "layer4": (1, 2048, 7, 7),
                      "layer3": (1, 1024, 14, 14)}


@pytest.mark.parametrize("layers", [None, "default", "multiscale"])
def test_default_layers_are_the_coarse_and_the_fine_scale(layers):
    extractor = FeatureExtractor("resnet18", layers=layers, weights=None)
    assert extractor.scales == (("layer2", "layer3"), ("layer1", "layer2", "layer3"))


def test_coarse_preset_is_one_scale():
    extractor = FeatureExtractor("resnet18", layers="coarse", weights=None)
    assert extractor.scales == (("layer2", "layer3"),)


def test_multiscale_preset_is_a_coarse_and_a_fine_scale_hooked_once():
    extractor = FeatureExtractor("resnet18", layers="multiscale", weights=None)
    assert extractor.scales == (("layer2", "layer3"), ("layer1", "layer2", "layer3"))
    assert extractor.layers == ("layer2", "layer3", "layer1")
    assert set(extractor(torch.randn(1, 3, 64, 64))) == {"layer1", "layer2", "layer3"}


def test_scales_by_name():
    extractor = FeatureExtractor("resnet18", layers=["layer1+layer2", "layer3"], weights=None)
    assert extractor.scales == (("layer1", "layer2"), ("layer3",))
    assert extractor.layers == ("layer1", "layer2", "layer3")
    with pytest.raises(ValueError, match="distinct such lists"):
        FeatureExtractor("resnet18", layers=[["layer2"], ["layer2"]], weights=None)


def test_random_init_is_seeded():
    first = FeatureExtractor("resnet18", weights=None)
    second = FeatureExtractor("resnet18", weights=None)
    assert module_fingerprint(first.model) == module_fingerprint(second.model)
    assert first.weights_id == "random:seed=0"


def test_threads_extract_at_once_each_their_own_features():
    """Two threads running one extractor at once (knnad serve's helper beside its model thread)
    each get their own images' features, equal to a pass alone."""
    extractor = FeatureExtractor("mobilenet_v2", layers="coarse", weights=None)
    batches = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
               for seed in (0, 1)]
    alone = [extractor(batch) for batch in batches]
    found, start = [[], []], threading.Barrier(2)

    def extract(number):
        start.wait()
        for _ in range(20):
            found[number].append(extractor(batches[number]))

    threads = [threading.Thread(target=extract, args=(number,)) for number in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for number in (0, 1):
        assert len(found[number]) == 20
        for features in found[number]:
            assert features.keys() == alone[number].keys()
            for name in features:
                torch.testing.assert_close(features[name], alone[number][name], rtol=1e-5,
                                           atol=1e-5)


def test_truncation_skips_later_layers_and_keeps_values(wide_resnet):
    calls = {"layer4": 0, "fc": 0}
    modules = dict(wide_resnet.model.named_modules())
    handles = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
    images = torch.randn(1, 3, 224, 224)
    try:
        features = wide_resnet(images)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"layer4": 0, "fc": 0}
    # The same activations as an untruncated forward pass of an identical model.
    reference = torchvision.models.wide_resnet50_2()
    reference.load_state_dict(wide_resnet.model.state_dict())
    reference.eval()
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        layer2 = reference.layer2(reference.layer1(stem))
        layer3 = reference.layer3(layer2)
    # Channels-last convolutions sum in another order: equal to float32 rounding.
    for name, expected in (("layer2", layer2), ("layer3", layer3)):
        scale = float(expected.abs().max())
        torch.testing.assert_close(features[name], expected, rtol=1e-4, atol=1e-5 * scale)


def test_genuine_mobilenet_weights_classify_a_cat(seeded_torch_home):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    # torchvision's normal API, offline, from the seeded cache (hash check included).
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    image = torch.from_numpy(Preprocessor(256, 224)(Image.fromarray(skimage_data.chelsea())))[None]
    with torch.no_grad():
        top = model(image).softmax(1).topk(3)
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(top.indices[0, 0]) in cats
    assert float(top.values[0, 0]) > 0.3
    extractor = FeatureExtractor("mobilenet_v2", layers="coarse", weights="IMAGENET1K_V1")
    assert extractor.weights_id == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert module_fingerprint(extractor.model) == module_fingerprint(model)
    # The hooked, truncated, channels-last extractor gives torchvision's own plain forward
    # activations, and a known value of them (the global feature's norm on this image).
    pooled = extractor.global_features(extractor(image))
    with torch.no_grad():
        plain = torch.cat([model.features[:7](image).mean(dim=(2, 3)),
                           model.features[:14](image).mean(dim=(2, 3))], dim=1)
    torch.testing.assert_close(pooled, plain, rtol=1e-4, atol=1e-5)
    assert float(plain.norm()) == pytest.approx(2.4301, abs=2e-3)


def test_weights_from_local_file(tmp_path):
    source = torchvision.models.mobilenet_v2()
    path = tmp_path / "my_weights.pth"
    torch.save(source.state_dict(), path)
    extractor = FeatureExtractor("mobilenet_v2", weights=path)
    assert module_fingerprint(extractor.model) == module_fingerprint(source)
    assert extractor.weights_id.startswith("sha256:")
    extractor_str = FeatureExtractor("mobilenet_v2", weights=str(path))
    assert extractor_str.weights_id == extractor.weights_id


def test_custom_module_by_layer_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 10))
    extractor = FeatureExtractor(model, layers=["0", "2"])
    features = extractor(torch.randn(3, 3, 32, 32))
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    assert shapes == {"0": (3, 8, 16, 16), "2": (3, 16, 8, 8)}
    assert extractor.weights_id.startswith("module:")


def test_offline_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        FeatureExtractor("mobilenet_v2", weights="IMAGENET1K_V2")
    message = str(info.value)
    assert "mobilenet_v2-7ebf99e0.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "weights=PATH" in message
    assert not list((tmp_path / "hub" / "checkpoints").glob("*.pth"))


def test_damaged_cached_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "mobilenet_v2-b0353104.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="damaged"):
        FeatureExtractor("mobilenet_v2", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backbone": "wide_resnet_50"}, ValueError, "unknown backbone.*wide_resnet50_2"),
    ({"backbone": 42}, TypeError, "backbone must be"),
    ({"backbone": "mobilenet_v2", "layers": ["features.66"], "weights": None}, ValueError,
     r"unknown layer.*features\.6.*features\.13"),
    ({"backbone": "mobilenet_v2", "layers": [], "weights": None}, ValueError, "non-empty"),
    ({"backbone": "mobilenet_v2", "layers": ["features.6", "features.6"], "weights": None},
     ValueError, "distinct"),
    ({"backbone": "mobilenet_v2", "weights": "IMAGENET9K"}, ValueError, "IMAGENET1K_V1"),
    ({"backbone": "mobilenet_v2", "weights": torchvision.models.ResNet18_Weights.DEFAULT},
     ValueError, "do not belong"),
    ({"backbone": "mobilenet_v2", "weights": None, "device": "cuda:99"}, ValueError, "GPU"),
    ({"backbone": "mobilenet_v2", "weights": None, "device": "tpu"}, ValueError, "device"),
    ({"backbone": "alexnet", "weights": None}, ValueError, "no preset layers"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureExtractor(**kwargs)


def test_weights_file_of_another_model(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit backbone 'mobilenet_v2'"):
        FeatureExtractor("mobilenet_v2", weights=path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="garbage.pth"):
        FeatureExtractor("mobilenet_v2", weights=garbage)


@pytest.mark.parametrize("images, error", [
    ([[0.0]], TypeError),
    (np.zeros((1, 3, 32, 32), np.uint8), TypeError),
    (torch.zeros(3, 32, 32), ValueError),
    (torch.zeros(1, 1, 32, 32), ValueError),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError),
])
def test_bad_images(images, error):
    extractor = FeatureExtractor("mobilenet_v2", weights=None)
    with pytest.raises(error, match="images"):
        extractor(images)


def test_numpy_batches_as_preprocessor_gives_them():
    extractor = FeatureExtractor("mobilenet_v2", weights=None)
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    from_numpy, from_tensor = extractor(batch), extractor(torch.from_numpy(batch))
    for name in extractor.layers:
        assert torch.equal(from_numpy[name], from_tensor[name])
