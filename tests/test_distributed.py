"""knnad.distributed on a real local Ray cluster (two CPUs, no dashboard): fit_many,
predict_dataset, ShardedIndex, the command line, and faults (a corrupt image, a killed worker,
a wrong address)."""
import gc
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import pytest

from knnad import Detector
from knnad.archive import ModelFileError
from knnad.cli import demo_root

if os.environ.get("KNNAD_REQUIRE_SHARED") == "1":  # CI installs the test extra: Ray must be there
    import ray
else:
    ray = pytest.importorskip("ray")

from knnad import distributed  # noqa: E402
from knnad.distributed import failures, predict, scorer  # noqa: E402 (their private steps)

#: Genuine MobileNetV2 weights on small crops: a real model, quick on two CPUs.
PARAMS = dict(backbone="mobilenet_v2", weights="IMAGENET1K_V1", image_size=128, crop_size=112,
              coreset=None, progress=False)
BOTTLE = demo_root() / "bottle"


@pytest.fixture(scope="session")
def cluster(torch_home):
    """A local Ray cluster for the session; its workers find the genuine weights in TORCH_HOME
    (set for its processes as they start, not as a runtime_env: the workers that Ray starts
    with the cluster would not match one, and would be left idle beside new ones)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(torch_home))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def free_the_cpus():
    """Ray Data logs a failed pipeline's exception, and pytest's log capture keeps the record
    until the test ends: through the exception's traceback, the pipeline's actors and their
    CPUs stay taken (a second run in the same test would wait for CPUs forever). Where the
    cluster's CPUs are taken, collect the earlier tests' reference cycles, so that they are
    free again (only then: a collection takes about 0.4 s in this process)."""
    if ray.is_initialized() \
            and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        gc.collect()


@pytest.fixture(autouse=True)
def release_failed_pipelines(request):
    """Before each test on the cluster, :func:`free_the_cpus` (module fixtures that run on the
    cluster, set up before this one, call it themselves)."""
    if "cluster" in request.fixturenames:
        free_the_cpus()


@pytest.fixture
def local_weights(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))


def test_fit_many_records_a_broken_job_and_keeps_the_others(cluster, local_weights, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output_dir: the tasks write where the driver means
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    from knnad.datasets import MVTecAD
    train = MVTecAD(demo_root(), "bottle", "train")
    good = sorted((BOTTLE / "train" / "good").iterdir())
    jobs = [("bottle", train), ("broken", empty), ("half", good[:4])]
    rows = distributed.fit_many(jobs, "models", **PARAMS)

    assert [row["name"] for row in rows] == ["bottle", "broken", "half"]
    broken = rows[1]
    assert broken["model"] is None and broken["bank_size"] is None
    assert "ValueError" in broken["error"] and str(empty) in broken["error"]
    assert not (tmp_path / "models" / "broken.npz").exists()
    patches = 14 * 14 + 28 * 28  # crop 112: the coarse scale at stride 8, the fine one at 4
    for row, images in ((rows[0], len(train)), (rows[2], 4)):
        assert row["error"] is None and row["seconds"] > 0
        assert row["model"] == str(tmp_path / "models" / f"{row['name']}.npz")
        assert row["bank_size"] == images * patches
        loaded = Detector.load(row["model"])
        assert sum(len(scale.index) for scale in loaded.scales_) == row["bank_size"]
        assert loaded.train_paths_ == [str(p)
                                       for p in (good if row["name"] == "bottle" else good[:4])]
    # The same fit in this process gives the same memory bank (to float32 rounding: the worker
    # runs torch on one thread, this process on two).
    local = Detector(**PARAMS).fit(good[:4])
    for remote, here in zip(Detector.load(rows[2]["model"]).scales_, local.scales_):
        np.testing.assert_allclose(remote.index.vectors(), here.index.vectors(), rtol=0,
                                   atol=1e-5)


def test_fit_many_checks_before_any_task(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(NotADirectoryError, match="output_dir"):
        distributed.fit_many([("a", BOTTLE)], target / "models", **PARAMS)
    with pytest.raises(ValueError, match="coreset"):
        distributed.fit_many([("a", BOTTLE)], tmp_path, **{**PARAMS, "coreset": 1.5})
    with pytest.raises(ValueError, match="no parameter"):
        distributed.fit_many([("a", BOTTLE)], tmp_path, colour="red")
    with pytest.raises(ValueError, match="unique"):
        distributed.fit_many([("a", BOTTLE), ("a", BOTTLE)], tmp_path, **PARAMS)
    with pytest.raises(ValueError, match="name"):
        distributed.fit_many([("../a", BOTTLE)], tmp_path, **PARAMS)
    assert list(tmp_path.iterdir()) == [target]


# --- predict_dataset -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread, as in a one-CPU Ray worker: the same float32 rounding."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(torch_home, tmp_path_factory, single_thread):
    """A calibrated model of the bottle sample, saved; and the detector itself."""
    os.environ["TORCH_HOME"] = str(torch_home)
    detector = Detector(**PARAMS).fit(BOTTLE / "train" / "good")
    detector.calibrate(sorted((BOTTLE / "test" / "good").iterdir()))
    return detector.save(tmp_path_factory.mktemp("model") / "bottle.npz"), detector


def corrupt_file(folder):
    path = folder / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


@pytest.fixture(scope="module")
def sample_run(cluster, model, tmp_path_factory):
    """predict_dataset over a Ray Dataset of the sample's test images and a corrupt file, with
    maps; Detector.predict of the same images in this process; and the run's Ray Data stats
    (those of the pipeline that predict._pipeline built for it, kept as it returns it)."""
    import pandas as pd
    free_the_cpus()
    folder = tmp_path_factory.mktemp("sample_run")
    images = sorted(str(p) for p in (BOTTLE / "test").glob("*/*.png"))
    dataset = ray.data.from_items([{"path": p, "other": 1}
                                   for p in images + [str(corrupt_file(folder))]])
    build, built = predict._pipeline, []

    def pipeline(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "_pipeline", pipeline)
        summary = distributed.predict_dataset(model[0], dataset, folder / "out", batch_size=4,
                                              maps=True)
    reference = model[1].predict(images)
    return (summary, pd.read_parquet(folder / "out").set_index("path"), reference, folder,
            built[0].stats())


def test_predict_dataset_scores_equal_detector_predict(sample_run, model):
    summary, rows, reference, folder, _ = sample_run
    assert summary["images"] == 13 and summary["scored"] == 12 and summary["skipped"] == 1
    assert list(rows.columns) == ["image_score", "label", "map_max", "status", "error", "map_file"]
    scored = rows.loc[reference.paths]
    assert (scored.status == "scored").all()
    np.testing.assert_allclose(scored.image_score, reference.image_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scored.map_max, reference.anomaly_maps.max(axis=(1, 2)), rtol=0,
                               atol=1e-6)
    assert reference.labels is not None and reference.labels.any() and not reference.labels.all()
    assert scored.label.tolist() == reference.labels.tolist()
    for path, expected in zip(reference.paths, reference.anomaly_maps):
        saved = np.load(folder / "out" / scored.loc[path, "map_file"])
        assert saved.dtype == np.float32 and saved.shape == (112, 112)
        np.testing.assert_allclose(saved, expected, rtol=0, atol=1e-6)
    # Complete: the manifest says what was written; nothing was left beside the output.
    manifest = json.loads((folder / "out" / distributed.MANIFEST).read_text())
    assert manifest["scored"] == 12 and manifest["maps"] is True
    assert sorted(p.name for p in folder.iterdir()) == ["corrupt.png", "out"]


def test_a_corrupt_image_is_recorded_as_skipped(sample_run):
    _, rows, _, folder, _ = sample_run
    skipped = rows[rows.status == "skipped"]
    assert skipped.index.tolist() == [str(folder / "corrupt.png")]
    assert skipped[["image_score", "label", "map_max", "map_file"]].isna().all(axis=None)
    assert "corrupt.png" in skipped.error.iloc[0]
    assert "not a decodable image" in skipped.error.iloc[0]
    assert rows[rows.status == "scored"].error.isna().all()


def test_images_are_decoded_in_tasks_apart_from_the_scoring_actors(sample_run, model):
    """Decoding runs in Ray tasks (on any free CPU), not fused into the model's actors: the
    operators that ran in sample_run's pipeline."""
    _, rows, _, _, stats = sample_run
    assert "MapBatches(decode_batch):" in stats and "MapBatches(_Scorer):" in stats, stats
    assert "decode_batch)->" not in stats  # fused, the actors would decode
    images = sorted(str(p) for p in (BOTTLE / "test" / "good").iterdir())
    np.testing.assert_allclose(rows.loc[images].image_score,
                               model[1].predict(images).image_scores, rtol=0, atol=1e-6)


def test_the_decoding_workers_load_no_torch():
    """Their processes stay small (one per CPU beside the scoring workers)."""
    import subprocess
    code = "import sys, knnad.decoding; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_actors_refuse_images_decoded_otherwise(model):
    from knnad.preprocessing import Preprocessor
    with pytest.raises(RuntimeError, match="decoded with Preprocessor.image_size=200"):
        scorer._Scorer(str(model[0]), {"device": "cpu"}, 2, None, Preprocessor(200, 112))


def test_a_failed_run_leaves_the_earlier_output_and_nothing_else(cluster, model, sample_run,
                                                                 tmp_path):
    shutil.copytree(sample_run[3] / "out", tmp_path / "out")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    images = sorted((BOTTLE / "test" / "good").iterdir())
    # k beyond the memory bank passes the driver's checks and fails in the workers.
    with pytest.raises(RuntimeError, match="k must be an int.*the earlier output there is kept"):
        distributed.predict_dataset(model[0], images, tmp_path / "out", params={"k": 10**6})
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_run_into_a_new_folder_leaves_nothing(cluster, model, tmp_path):
    images = [str(p) for p in sorted((BOTTLE / "test" / "good").iterdir())]
    with pytest.raises(RuntimeError,
                       match="failed in a Ray worker: ValueError: k must be an int") as error:
        distributed.predict_dataset(model[0], images, tmp_path / "new", params={"k": 10**6})
    assert str(tmp_path / "new") in str(error.value) and error.value.__context__ is None
    assert list(tmp_path.iterdir()) == []


def test_a_scoring_actor_that_cannot_start_is_named(cluster, model, tmp_path):
    """An exception of the actors' constructor reaches the driver inside Ray's ActorDiedError."""
    images = [str(p) for p in sorted((BOTTLE / "test" / "good").iterdir())]
    missing = tmp_path / "missing.pth"
    with pytest.raises(RuntimeError, match=r"failed in a Ray worker: ValueError: weights='.*"
                                           r"missing\.pth' is neither a weight name") as error:
        distributed.predict_dataset(model[0], images, tmp_path / "out",
                                    params={"weights": str(missing)})
    assert error.value.__context__ is None and list(tmp_path.iterdir()) == []


def test_worker_failures_are_told_apart_by_ray_exception_types():
    """The worker's own exception behind each of Ray's wrappers, whatever their text says; Ray's
    own error (its first line) for a worker that died."""
    exceptions = ray.exceptions
    own = ValueError("k must be an int in [1, 10] (the index size), got 11")

    def task_error(cause):
        return exceptions.RayTaskError("score", "Traceback ...\nKeyError: not this one", cause,
                                       proctitle="ray::score", pid=1, ip="127.0.0.1")

    carried = failures.carried(own)  # as the scoring actors raise it
    for error in (task_error(own), task_error(own).as_instanceof_cause(), task_error(carried),
                  task_error(carried).as_instanceof_cause(),
                  exceptions.ActorDiedError(task_error(own))):  # the constructor raised
        assert failures.worker_exception(error) is own
        assert failures.failure_text(error) == f"ValueError: {own}"
    died = exceptions.ActorDiedError()
    assert failures.worker_exception(died) is died
    assert failures.failure_text(died) == ("ActorDiedError: The actor died unexpectedly before "
                                           "finishing this task.")
    # Ray Data's own wrapping (raise_original_map_exception unset) keeps only text: its line.
    wrapped = exceptions.UserCodeException("UDF failed to process a data block.\nFailed to ...")
    assert failures.failure_text(task_error(wrapped)) == ("UserCodeException: UDF failed to "
                                                          "process a data block.")


def test_predict_dataset_checks_before_any_work(model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an output of predict_dataset"):
        distributed.predict_dataset(model[0], BOTTLE / "test" / "good", tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match="model"):
        distributed.predict_dataset(tmp_path / "none.npz", BOTTLE / "test" / "good",
                                    tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        distributed.predict_dataset(model[0], str(tmp_path / "*.png"), tmp_path / "out")
    with pytest.raises(ValueError, match="predict-time"):
        distributed.predict_dataset(model[0], BOTTLE / "test" / "good", tmp_path / "out",
                                    params={"coreset": 0.5})
    with pytest.raises(ValueError, match="batch_size"):
        distributed.predict_dataset(model[0], BOTTLE / "test" / "good", tmp_path / "out",
                                    batch_size=0)
    not_a_model = tmp_path / "mine" / "notes.txt"
    with pytest.raises(ModelFileError, match="not an .npz archive"):
        distributed.predict_dataset(not_a_model, BOTTLE / "test" / "good", tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    pattern = str(BOTTLE / "test" / "*" / "0*5.png")
    assert predict._paths(pattern) == sorted(str(p) for p in (BOTTLE / "test").glob("*/005.png"))


def test_workers_that_take_every_cpu_are_refused(cluster, model, tmp_path):
    """Two workers of one CPU on two CPUs would leave the decoding tasks none: the run would
    wait forever."""
    with pytest.raises(ValueError, match=r"num_workers=2 .* leave none of the cluster's 2 CPUs"):
        distributed.predict_dataset(model[0], BOTTLE / "test" / "good", tmp_path / "out",
                                    num_workers=2)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_worker_is_restarted_and_every_image_scored_once(cluster, model, tmp_path):
    import pandas as pd
    from PIL import Image
    from ray._private.state import actors

    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((BOTTLE / "test").glob("*/*.png"))
    for i in range(24):
        image = Image.open(sources[i % len(sources)]).resize((160, 160)).rotate(7 * i)
        image.save(folder / f"{i:03d}.png")

    def scorers(state="ALIVE"):
        return [a for a in actors().values()
                if "_Scorer" in a["ActorClassName"] and a["State"] == state]

    result = {}

    def run():
        try:
            result["summary"] = distributed.predict_dataset(model[0], folder, tmp_path / "out",
                                                            num_workers=1, batch_size=1)
        except BaseException as error:  # reported by the assertions below
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    killed, deadline = None, time.time() + 120
    while killed is None and thread.is_alive() and time.time() < deadline:
        written = list(tmp_path.glob(".out.partial-*/*.parquet"))
        if written and scorers():  # the actor is scoring: some images are written, not all
            killed = scorers()[0]["Pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(timeout=180)
    assert killed is not None, "the run ended before the worker could be killed"
    assert "error" not in result, result.get("error")
    assert result["summary"]["scored"] == 24 and result["summary"]["skipped"] == 0
    rows = pd.read_parquet(tmp_path / "out")
    assert sorted(rows.path) == sorted(str(p) for p in folder.iterdir())  # no duplicate, no gap
    restarted = [a for a in actors().values()
                 if "_Scorer" in a["ActorClassName"] and a.get("NumRestarts")]
    assert restarted and all(a["Pid"] != killed for a in restarted)
    reference = model[1].predict(sorted(folder.iterdir()))
    np.testing.assert_allclose(rows.set_index("path").loc[reference.paths].image_score,
                               reference.image_scores, rtol=0, atol=1e-6)


# --- ShardedIndex --------------------------------------------------------------------------

def bank_with_ties(seed=0, n=3000, dim=24):
    """Random rows, a hundred of them repeated in another shard's part, and one row 100 times;
    queries: random, and some equal to stored rows (distance 0, tied with their copies)."""
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(n, dim)).astype(np.float32)
    bank[1500:1600] = bank[100:200]
    bank[n - 100:] = bank[0]
    queries = np.concatenate([rng.normal(size=(200, dim)), bank[95:105], bank[:3]])
    return bank, queries.astype(np.float32)


def test_sharded_index_equals_a_flat_index_ties_included(cluster):
    from knnad.index import FlatL2Index
    bank, queries = bank_with_ties()
    flat = FlatL2Index.of(bank, backend="faiss", device="cpu")
    with distributed.ShardedIndex.of(bank[:1000], 3, backend="faiss",
                                     num_cpus_per_shard=0.25) as sharded:
        sharded.add(bank[1000:])  # a second add: each shard holds two pieces
        assert len(sharded) == 3000 and sharded.dim == 24
        assert sharded.shard_sizes() == [999, 1000, 1001]
        assert (sharded.backend, sharded.device) == ("faiss", "cpu")
        assert len(set(sharded.shard_pids())) == 3
        for k in (1, 5, 120, 3000):
            distances, indices = sharded.search(queries, k)
            expected_d, expected_i = flat.search(queries, k)
            assert distances.dtype == np.float32 and indices.dtype == np.int64
            np.testing.assert_array_equal(distances, expected_d)
            np.testing.assert_array_equal(indices, expected_i)
        # The ties were there: a query equal to row 0 finds it and its 100 copies at distance 0,
        # in ascending rows across the shards.
        distances, indices = sharded.search(bank[:1], 101)
        assert (distances == 0).all() and indices[0].tolist() == [0] + list(range(2900, 3000))
        ranges = [(0, 10), (90, 1200), (1500, 1510), (2890, 3000)]
        for k in (1, 7):
            np.testing.assert_array_equal(sharded.search_among(queries, k, ranges)[0],
                                          flat.search_among(queries, k, ranges)[0])
            np.testing.assert_array_equal(sharded.search_among(queries, k, ranges)[1],
                                          flat.search_among(queries, k, ranges)[1])
        np.testing.assert_array_equal(sharded.vectors(), bank)
        np.testing.assert_array_equal(sharded.rows(950, 1700).numpy(), bank[950:1700])
        with pytest.raises(ValueError, match="stop must be"):  # not rows of garbage
            sharded.rows(2990, 3010)
        with pytest.raises(ValueError, match="start must be"):
            sharded.rows(-1, 10)
        with pytest.raises(ValueError, match="k must be"):
            sharded.search(queries, 3001)
        with pytest.raises(ValueError, match="dimension"):
            sharded.search(queries[:, :5], 1)
    for action in (lambda: sharded.search(queries, 1), lambda: sharded.rows(0, 1),
                   lambda: sharded.search_among(queries, 1, [(0, 5)])):
        with pytest.raises(RuntimeError, match="closed ShardedIndex"):
            action()


def test_sharded_index_with_torch_finds_the_same_neighbours(cluster):
    """The torch backend's topk keeps any of several rows tied at the k-th place (a
    FlatL2Index with torch too): the distances are the same, and the rows are the same vectors."""
    from knnad.index import FlatL2Index
    bank, queries = bank_with_ties(seed=1)
    flat = FlatL2Index.of(bank, backend="torch", device="cpu")
    with distributed.ShardedIndex.of(bank, 2, backend="torch", num_cpus_per_shard=0.25) as sharded:
        every = flat.search(queries, len(bank))[0]
        for k in (1, 5, 120):
            distances, indices = sharded.search(queries, k)
            expected_d, expected_i = flat.search(queries, k)
            np.testing.assert_array_equal(distances, expected_d)
            np.testing.assert_array_equal(bank[indices], bank[expected_i])
            untied = expected_d[:, -1] < every[:, k]  # no row left out at the k-th distance
            assert untied.sum() > 150
            np.testing.assert_array_equal(indices[untied], expected_i[untied])


def test_a_detector_scores_the_same_with_a_sharded_index(cluster, model, tmp_path):
    images = sorted((BOTTLE / "test").glob("*/*.png"))[::3]  # every defect type and good ones
    one_scale = Detector(**PARAMS, layers="coarse").fit(BOTTLE / "train" / "good")
    # The default's two scales fuse the maps' maxima; one scale scores every way.
    for path, image_scores in ((model[0], ("max",)),
                               (one_scale.save(tmp_path / "one.npz"), ("max", "spade",
                                                                        "reweighted"))):
        local = Detector.load(path)
        detector = distributed.shard_detector(Detector.load(path), 3, num_cpus_per_shard=0.25)
        assert all(isinstance(scale.index, distributed.ShardedIndex)
                   for scale in detector.scales_)
        assert [len(scale.index) for scale in detector.scales_] == [len(scale.index)
                                                                     for scale in local.scales_]
        for image_score in image_scores:
            expected = local.set_params(image_score=image_score).predict(images)
            got = detector.set_params(image_score=image_score).predict(images)
            np.testing.assert_allclose(got.image_scores, expected.image_scores, rtol=0, atol=1e-6)
            np.testing.assert_allclose(got.anomaly_maps, expected.anomaly_maps, rtol=0, atol=1e-6)
        saved = Detector.load(detector.set_params(image_score="max").save(tmp_path / "shard.npz"))
        for restored, original in zip(saved.scales_, local.scales_):
            np.testing.assert_array_equal(restored.index.vectors(), original.index.vectors())
        for scale in detector.scales_:
            scale.index.close()


# --- command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(cluster, model, tmp_path_factory):
    """knnad predict --ray (--sigma 2, batches of 2, --map-size processed) on the sample's good test
    images and a corrupt file: its exit status, what it printed, the images' folder and the
    output folder."""
    import contextlib
    import io

    from knnad.cli import main
    free_the_cpus()
    tmp_path = tmp_path_factory.mktemp("cli_run")
    folder = tmp_path / "images"
    folder.mkdir()
    for source in sorted((BOTTLE / "test" / "good").iterdir()):
        shutil.copy(source, folder / source.name)
    corrupt_file(folder)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["predict", str(model[0]), str(folder), "--out", str(tmp_path / "out"),
                       "--sigma", "2", "--batch-size", "2", "--map-size", "processed", "--ray"])
    return status, printed.getvalue(), folder, tmp_path / "out"


def test_cli_predict_on_ray(cli_run, model, tmp_path, capsys):
    import pandas as pd

    from knnad.cli import main
    status, printed, folder, out = cli_run
    assert status == 3  # PARTIAL: one image skipped
    assert "scored 3 images on Ray" in printed
    rows = pd.read_parquet(out / "scores.parquet").set_index("path")
    expected = Detector.load(model[0]).set_params(sigma=2).predict(sorted(folder.glob("0*.png")))
    np.testing.assert_allclose(rows.loc[expected.paths].image_score, expected.image_scores, rtol=0,
                               atol=1e-6)
    assert rows.loc[str(folder / "corrupt.png"), "status"] == "skipped"
    # Flags that need --ray, and a wrong address: one line, exit 2, nothing written.
    assert main(["predict", str(model[0]), str(folder), "--out", str(tmp_path / "b"),
                 "--maps"]) == 2
    assert "--maps: only with --ray" in capsys.readouterr().err
    assert main(["predict", str(model[0]), str(folder), "--out", str(tmp_path / "b"),
                 "--ray=127.0.0.1:1"]) == 2
    assert "no Ray cluster answers at address='127.0.0.1:1'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cli_fit_many(cluster, local_weights, tmp_path, capsys):
    from knnad.cli import main
    flags = ["--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--image-size", "128",
             "--crop-size", "112", "--coreset", "none"]
    assert main(["fit-many", "--dataset", "mvtec", "--root", str(demo_root()), "--out",
                 str(tmp_path / "models"), *flags]) == 0
    assert "bottle: saved" in capsys.readouterr().out
    assert len(Detector.load(tmp_path / "models" / "bottle.npz").index_) == 16 * 14 * 14
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit-many", f"nothing={empty}", "--out", str(tmp_path / "models"), *flags]) == 2
    captured = capsys.readouterr()
    assert "nothing: failed: ValueError" in captured.out and "all 1 jobs failed" in captured.err


# --- faults: Ray missing, wrong addresses --------------------------------------------------

def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ImportError, match=r"pip install 'knnad\[ray\]'"):
        distributed.fit_many([("a", BOTTLE)], tmp_path, **PARAMS)
    with pytest.raises(ImportError, match=r"pip install 'knnad\[ray\]'"):
        distributed.ShardedIndex(8)


def test_a_wrong_address_is_named_with_what_to_do(cluster):
    with pytest.raises(ConnectionError, match=r"address='127.0.0.1:1'.*ray start --head"):
        distributed.connect("127.0.0.1:1")
    with pytest.raises(ValueError, match=r"address='nowhere' is not a Ray cluster address"):
        distributed.connect("nowhere")
    # Something answers there, but this process is connected to another cluster.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(ValueError, match=f"already connected .*not address='127.0.0.1:{port}'"):
            distributed.connect(f"127.0.0.1:{port}")
    assert distributed.connect(None) is ray and distributed.connect("auto") is ray
    assert distributed.connect(ray.get_runtime_context().gcs_address) is ray


def test_a_whole_image_model_scores_on_ray_as_in_one_process(cluster, single_thread, torch_home,
                                                             tmp_path):
    """crop_size=None: the decoding tasks prepare the model's own frame (from its file)."""
    import pandas as pd
    detector = Detector(**{**PARAMS, "crop_size": None, "map_size": "original"})
    detector.fit(BOTTLE / "train" / "good")
    path = detector.save(tmp_path / "whole.npz")
    images = sorted(str(p) for p in (BOTTLE / "test").glob("*/*.png"))[:4]
    distributed.predict_dataset(path, images, tmp_path / "out", batch_size=2, maps=True)
    rows = pd.read_parquet(tmp_path / "out").set_index("path").loc[images]
    reference = detector.set_params(map_size="processed").predict(images)
    frame = detector.preprocessor_.frame
    assert reference.anomaly_maps.shape[1:] == frame != (PARAMS["crop_size"],) * 2
    np.testing.assert_allclose(rows.image_score, reference.image_scores, rtol=0, atol=1e-6)
    for map_file, expected in zip(rows.map_file, reference.anomaly_maps):
        np.testing.assert_allclose(np.load(tmp_path / "out" / map_file), expected, rtol=0,
                                   atol=1e-6)


def test_a_broken_link_among_the_images_gets_a_skipped_row(tmp_path):
    """A symbolic link to a file that is gone is listed from a folder or a pattern, and its
    decoding names it (issue #21; the pattern left it out without a word)."""
    from knnad.decoding import decode_batch
    from knnad.preprocessing import Preprocessor
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(BOTTLE / "test" / "good" / "000.png", folder / "000.png")
    (folder / "gone.png").symlink_to(tmp_path / "moved.png")
    expected = [str(folder / "000.png"), str(folder / "gone.png")]
    assert predict._paths(folder) == predict._paths(str(folder / "*.png")) == expected
    decoded = decode_batch({"path": np.array(expected, dtype=object)}, Preprocessor(128, 112))
    assert decoded["error"][0] == ""
    assert "gone.png: a broken symbolic link to" in decoded["error"][1]


def test_map_size_reaches_the_scoring_actors(cluster, model, single_thread, torch_home, tmp_path,
                                             cli_run):
    """params={"map_size": ...} (knnad predict --ray --map-size) was passed twice to every
    scoring actor, a TypeError (issue #21). "original" gives a whole-image model's maps at
    their images' size, as Detector.predict does; a cropping model refuses it before any work;
    knnad predict --ray --map-size processed (cli_run) scores as Detector.predict."""
    import pandas as pd
    detector = Detector(**{**PARAMS, "crop_size": None}).fit(BOTTLE / "train" / "good")
    path = detector.save(tmp_path / "whole.npz")
    images = sorted(str(p) for p in (BOTTLE / "test").glob("*/*.png"))[:4]
    distributed.predict_dataset(path, images, tmp_path / "out", batch_size=2, maps=True,
                                params={"map_size": "original"})
    rows = pd.read_parquet(tmp_path / "out").set_index("path").loc[images]
    reference = detector.set_params(map_size="original").predict(images)
    assert reference.anomaly_maps.shape[1:] == (256, 256) != detector.preprocessor_.frame
    np.testing.assert_allclose(rows.image_score, reference.image_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rows.map_max, reference.anomaly_maps.max(axis=(1, 2)), rtol=0,
                               atol=1e-6)
    for map_file, expected in zip(rows.map_file, reference.anomaly_maps):
        np.testing.assert_allclose(np.load(tmp_path / "out" / map_file), expected, rtol=0,
                                   atol=1e-6)
    with pytest.raises(ValueError,
                       match=r"map_size='original' needs a whole-image model.*crop_size=112"):
        distributed.predict_dataset(model[0], images, tmp_path / "crop",
                                    params={"map_size": "original"})
    assert not (tmp_path / "crop").exists()
    status, _, folder, out = cli_run
    assert status == 3  # every image scored, and the corrupt file skipped
    good = sorted(str(p) for p in folder.glob("0*.png"))
    scored = pd.read_parquet(out / "scores.parquet").set_index("path").loc[good]
    np.testing.assert_allclose(scored.image_score,
                               Detector.load(model[0]).set_params(sigma=2).predict(good).image_scores,
                               rtol=0, atol=1e-6)


def test_shards_the_cluster_cannot_place_fail_within_the_timeout(cluster):
    """Three shards of one CPU on two CPUs waited forever, with only a warning (issue #21):
    now a RuntimeError after placement_timeout naming the counts and what to do, and the
    shards' actors are ended (two shards of one CPU fit again)."""
    start = time.perf_counter()
    with pytest.raises(RuntimeError,
                       match=r"of num_shards=3 shards started within placement_timeout=1 s; "
                                           r"each asks for num_cpus_per_shard=1 CPUs.* of 2 "
                                           r"CPUs.*fewer shards"):
        distributed.ShardedIndex(8, 3, num_cpus_per_shard=1, placement_timeout=1)
    assert time.perf_counter() - start < 30
    bank = np.eye(8, dtype=np.float32)
    with distributed.ShardedIndex.of(bank, 2, num_cpus_per_shard=1, placement_timeout=60) as index:
        np.testing.assert_array_equal(index.search(bank, 1)[1][:, 0], np.arange(8))
