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

#: Test processes on this machine: pytest-xdist's workers (``-n 2``) or this one.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# Two threads each at most, and one per worker under xdist: workers whose torch threads outnumber
# the cores wait on each other.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
#: Test files that start a Ray cluster in this process. Keep it to one file: ``--dist loadfile``
#: runs each file in one worker, so two such files could start two clusters at once on the two
#: cores. (test_bench_gpu's benchmark starts its own local cluster in a subprocess: a cluster
#: apart, which may run beside them.)
RAY_FILES = ("test_distributed.py",)
#: The slow tests (more than about 4 s each on two cores, measured): whole files (a Ray cluster,
#: ONNX exports, a server and a browser) and tests named by a part of their id (commands in a
#: subprocess, Ctrl-C and read-only folders of the bad-input catalogue, exports, the browser).
SLOW_FILES = RAY_FILES + ("test_bench_gpu.py", "test_export.py", "test_serve.py")
SLOW_TESTS = ("test_evaluate_mvtec_and_folder", "test_demo_with_genuine_weights",
              "test_whole_image_export_scores_like_the_detector",
              "test_exported_graph_fuses_like_the_detector", "ctrl-c-during", "read-only",
              "test_in_chromium", "test_evaluate_writes_a_report_per_category",
              "test_thread_tuning_changes_no_pick", "unreadable-folder", "other-account")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on machines where torch sees no CUDA GPU; the slow ones get
    the ``slow`` mark. (Under pytest-xdist, ``-n 2 --dist loadfile`` runs each file in one
    worker, so that its module fixtures are built once. Not ``loadgroup``: pytest-xdist 3.8
    marks a test's group by editing ``item._nodeid``, which pytest 9.2 no longer reads, so
    every group would be split.)"""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.path.name in SLOW_FILES or any(part in item.nodeid for part in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


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
