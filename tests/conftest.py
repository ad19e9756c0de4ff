"""Shared fixtures. Tests that need ../shared (genuine weights and MVTec data), or the system's
chromium, skip when it is absent, unless KNNAD_REQUIRE_SHARED=1 (set by .ci/run), which turns
the skip into a failure."""
import os
import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("KNNAD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
#: knnad fit's options for a quick model: MobileNetV2 with random weights, no progress bars.
FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--no-progress"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on machines where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


def skip_or_fail(message: str) -> None:
    """Skip the test for ``message`` (something it needs is missing), or fail it when
    KNNAD_REQUIRE_SHARED=1 (CI, where everything must be there)."""
    if os.environ.get("KNNAD_REQUIRE_SHARED") == "1":
        pytest.fail(message + "; KNNAD_REQUIRE_SHARED=1 makes this an error")
    pytest.skip(message)


def need_shared(relative: str) -> Path:
    """Path under ../shared, or skip (fail when KNNAD_REQUIRE_SHARED=1) when it is missing."""
    path = SHARED / relative
    if not path.exists():
        skip_or_fail(f"{path} is missing (../shared not laid out here)")
    return path


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose checkpoint cache holds the genuine MobileNetV2 weights: from ../shared,
    or from the TORCH_HOME of this environment where ../shared is absent."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_FILE
    source = cached if cached.is_file() and not (SHARED / "weights").is_dir() else \
        need_shared(f"weights/{MOBILENET_FILE}")
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(source, home / "hub" / "checkpoints" / MOBILENET_FILE)
    return home


@pytest.fixture
def seeded_torch_home(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


@pytest.fixture(scope="session")
def bottle_root():
    """Root holding the genuine MVTec AD bottle category (../shared/data/mvtec)."""
    return need_shared("data/mvtec/bottle").parent


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory):
    """A model of the bottle sample (random weights), calibrated on two good test images."""
    from knnad.cli import demo_root, main

    sample = demo_root() / "bottle"
    model = tmp_path_factory.mktemp("model") / "model.npz"
    good = sorted((sample / "test" / "good").iterdir())
    assert main(["fit", str(sample / "train" / "good"), "--model", str(model), "--coreset", "300",
                 "--calibrate", *map(str, good[:2]), *FAST]) == 0
    return model
