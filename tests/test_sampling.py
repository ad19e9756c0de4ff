import numpy as np
import pytest
import torch

from knnad import sampling
from knnad.runtime import ThreadTuner
from knnad.sampling import coreset, coreset_size, covering_radius, parse_coreset, subsample


def clustered(n_clusters=20, per_cluster=150, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 10
    sizes = rng.integers(per_cluster // 10, per_cluster * 2, n_clusters)  # uneven clusters
    points = np.concatenate([c + rng.standard_normal((s, dim)) * 0.5
                             for c, s in zip(centres, sizes)])
    return points.astype(np.float32)


def brute_force_greedy(points: np.ndarray, count: int, first: int) -> np.ndarray:
    """The textbook greedy k-center in float64."""
    points = points.astype(np.float64)
    nearest = np.full(len(points), np.inf)
    picks = [first]
    for _ in range(count - 1):
        nearest = np.minimum(nearest, np.linalg.norm(points - points[picks[-1]], axis=1))
        picks.append(int(np.argmax(nearest)))
    return np.array(picks)


def test_unique_count_and_deterministic():
    points = clustered()
    picks = coreset(points, ratio=0.1, seed=3)
    assert picks.dtype == np.int64 and len(picks) == int(len(points) * 0.1)
    assert len(np.unique(picks)) == len(picks)
    assert picks.min() >= 0 and picks.max() < len(points)
    np.testing.assert_array_equal(picks, coreset(points, ratio=0.1, seed=3))
    assert not np.array_equal(picks, coreset(points, ratio=0.1, seed=4))
    assert len(coreset(torch.from_numpy(points), n=7)) == 7


def test_matches_textbook_greedy_without_projection():
    points = clustered(dim=8, seed=1)
    picks = coreset(points, n=60, projection_dim=None, seed=0)
    expected = brute_force_greedy(points, 60, first=int(picks[0]))
    np.testing.assert_array_equal(picks, expected)


def test_covering_radius_beats_random_sampling_on_clustered_data():
    points = clustered(n_clusters=30, dim=64, seed=2)
    count = 60
    greedy = covering_radius(points, coreset(points, n=count, projection_dim=16))
    rng = np.random.default_rng(0)
    random_radii = [covering_radius(points, rng.choice(len(points), count, replace=False))
                    for _ in range(5)]
    assert greedy < min(random_radii)
    # Greedy k-center covers every cluster, so its radius is about a cluster's spread.
    assert greedy < 0.5 * np.median(random_radii)


def test_projection_keeps_quality():
    points = clustered(n_clusters=40, dim=256, seed=5)
    full = covering_radius(points, coreset(points, n=100, projection_dim=None))
    projected = covering_radius(points, coreset(points, n=100, projection_dim=32))
    assert projected < 1.25 * full


def test_covering_radius_definition():
    points = np.array([[0.0, 0], [3, 4], [6, 8], [0, 1]], np.float32)
    assert covering_radius(points, [0]) == pytest.approx(10.0)
    assert covering_radius(points, [0, 2]) == pytest.approx(5.0)
    assert covering_radius(points, [0, 1, 2, 3]) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0.0}, r"ratio must be a fraction in \(0, 1\]"),
    ({"ratio": 1.5}, r"ratio must be a fraction in \(0, 1\]"),
    ({"ratio": 0.5, "n": 3}, "exactly one"),
    ({}, "exactly one"),
    ({"n": 0}, r"n must be an int in \[1, 10\]"),
    ({"n": 11}, r"n must be an int in \[1, 10\]"),
    ({"ratio": 0.5, "projection_dim": -2}, "projection_dim"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coreset(np.zeros((10, 4), np.float32), **kwargs)


def test_bad_features():
    with pytest.raises(ValueError, match="empty"):
        coreset(np.zeros((0, 4), np.float32), ratio=0.5)
    with pytest.raises(ValueError, match="NaN or inf in 1 of 3 rows"):
        coreset(np.array([[0.0], [np.nan], [1.0]]), ratio=0.5)
    with pytest.raises(ValueError, match="rank 2"):
        coreset(np.zeros(5), ratio=0.5)
    assert coreset_size(10, ratio=0.01) == 1


@pytest.mark.parametrize("text, value", [("none", None), ("None", None), ("0.1", 0.1), ("1.0", 1.0),
                                         ("1e-2", 0.01), ("10000", 10000), ("1", 1)])
def test_parse_coreset_reads_text_and_values(text, value):
    assert parse_coreset(text) == value and type(parse_coreset(text)) is type(value)
    assert parse_coreset(value) == value


@pytest.mark.parametrize("value", [1.5, 0, 0.0, -1, -0.1, float("inf"), float("nan"), "abc", "1.5",
                                   "", True, [0.1]])
def test_parse_coreset_refuses_anything_else(value):
    with pytest.raises(ValueError, match="coreset must be none, a share of patches in"):
        parse_coreset(value)


def test_subsample_keeps_rows_in_order_and_skips_the_selection_when_all_are_kept(caplog):
    points = clustered()
    picks = subsample(points, 0.1, seed=3)
    np.testing.assert_array_equal(picks, np.sort(coreset(points, ratio=0.1, seed=3)))
    for keep_all in (None, 1.0, len(points), 10 * len(points)):
        np.testing.assert_array_equal(subsample(points, keep_all), np.arange(len(points)))
    with caplog.at_level("WARNING", logger="knnad.sampling"):
        assert len(subsample(points, 1)) == 1
    assert "single patch" in caplog.text


def test_picks_stay_unique_beyond_the_distinct_rows():
    points = np.concatenate([clustered()[:50]] * 4)  # 50 distinct rows, each 4 times
    picks = coreset(points, n=120, seed=1)
    assert len(np.unique(picks)) == 120
    assert covering_radius(points, picks[:50]) == 0  # the first 50 picks cover every row


def test_numpy_ratios_and_counts_are_accepted():
    points = clustered()
    expected = coreset(points, ratio=0.1, seed=2)
    np.testing.assert_array_equal(coreset(points, ratio=np.float32(0.1), seed=2)[:10],
                                  expected[:10])
    assert len(coreset(points, n=np.int64(7))) == 7


def test_thread_tuning_changes_no_pick_and_restores_the_thread_count(monkeypatch):
    points = clustered(n_clusters=40, per_cluster=300, dim=32)  # float data: rounding matters
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = coreset(points, ratio=0.2, seed=5)  # one thread: no tuning
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(sampling, "_TUNED_PICKS", 4)  # switch often
    monkeypatch.setattr(ThreadTuner, "EXPLOIT", 2)
    switches = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, original=torch.set_num_threads: (
        switches.append(n), original(n))[1])
    np.testing.assert_array_equal(coreset(points, ratio=0.2, seed=5), expected)
    assert torch.get_num_threads() == threads
    if threads > 1:
        assert set(switches) >= {1, threads}


PATHS = {  # module settings that force each code path of the selection loop
    "dense passes only": {"_DENSE_FRACTION": -1.0},
    "dense passes in blocks of 7 rows": {"_DENSE_FRACTION": -1.0, "_DOT_ROWS": 7},
    "pruned steps only": {"_DENSE_FRACTION": 1.0, "_LISTED_FRACTION": 1.0},
    "pruned, no screening projection": {"_DENSE_FRACTION": 1.0, "_LISTED_FRACTION": 1.0,
                                        "_SCREEN_DIM": 1000},
    "cell lists rebuilt often": {"_DENSE_FRACTION": 1.0, "_LISTED_FRACTION": 1.0,
                                 "_Cells.SPACE": 1.02},
    "default switching": {},
}


def force_path(monkeypatch, path):
    for name, value in PATHS[path].items():
        owner, _, attribute = name.rpartition(".")
        monkeypatch.setattr(getattr(sampling, owner) if owner else sampling, attribute, value)


def integer_clusters(dim=64, seed=7):
    """Clustered points with small integer coordinates: every squared distance is computed
    exactly in float32 too, so paths can only differ by a wrong pick, and exact ties abound."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-20, 21, (25, dim))
    points = np.concatenate([c + rng.integers(-3, 4, (rng.integers(20, 200), dim))
                             for c in centres])
    points = np.concatenate([points, points[rng.integers(0, len(points), 500)]])  # duplicate rows
    return points.astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_code_path_and_thread_count_picks_the_textbook_greedy(monkeypatch, path, threads):
    points = integer_clusters()  # 64 dimensions: the cell test is screened in a projection
    force_path(monkeypatch, path)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        picks = coreset(points, n=400, projection_dim=None, seed=11)
    finally:
        torch.set_num_threads(before)
    # Ties included: the textbook takes the first of the farthest rows (np.argmax).
    np.testing.assert_array_equal(picks, brute_force_greedy(points, 400, first=int(picks[0])))
