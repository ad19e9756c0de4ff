import numpy as np
import pytest
import torch

from knnad import index as index_module
from knnad import runtime
from knnad.archive import ModelFileError
from knnad.index import FlatL2Index
from knnad.runtime import resolve_backend

BACKENDS = ["faiss", "torch"]


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int):
    """float64 NumPy reference: Euclidean distances by differences, stable sort."""
    bank64, queries64 = bank.astype(np.float64), queries.astype(np.float64)
    distances = np.sqrt(((queries64[:, None, :] - bank64[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, 1), order


def assert_matches_reference(bank, queries, k, distances, indices, rtol=1e-4, atol=1e-5):
    ref_d, ref_i = brute_force(bank, queries, k)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    assert distances.shape == indices.shape == (len(queries), k)
    np.testing.assert_allclose(distances, ref_d, rtol=rtol, atol=atol)
    assert np.all(np.diff(distances, axis=1) >= 0), "rows must be ascending"
    # The true distance of every returned neighbour equals the reference distance at that
    # rank: indices may differ only where distances tie.
    offsets = queries[:, None, :].astype(np.float64) - bank[indices].astype(np.float64)
    true_d = np.sqrt((offsets ** 2).sum(-1))
    np.testing.assert_allclose(true_d, ref_d, rtol=rtol, atol=atol)
    differs = indices != ref_i
    for row, col in zip(*np.nonzero(differs)):
        tied = np.isclose(true_d[row, col], ref_d[row, col], rtol=rtol, atol=atol)
        assert tied, f"row {row} rank {col}: index differs without a tie"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, m, d, k", [(1, 3, 8, 1), (50, 20, 1, 50), (300, 64, 1792, 5),
                                        (1000, 200, 32, 10), (2000, 30, 128, 2000)])
def test_agrees_with_float64_brute_force(backend, n, m, d, k):
    rng = np.random.default_rng(n + d)
    bank = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((m, d)).astype(np.float32)
    index = FlatL2Index(d, backend=backend, device="cpu")
    index.add(bank)
    assert len(index) == n and index.dim == d and index.backend == backend and index.device == "cpu"
    distances, indices = index.search(queries, k)
    assert_matches_reference(bank, queries, k, distances, indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_and_exact_ties(backend):
    rng = np.random.default_rng(1)
    base = rng.integers(-3, 4, (40, 6)).astype(np.float32)
    bank = np.concatenate([base, base, base[:10]])  # duplicated rows: exact ties
    queries = np.concatenate([base[:15], rng.integers(-3, 4, (15, 6)).astype(np.float32)])
    index = FlatL2Index(6, backend=backend, device="cpu")
    index.add(bank[:45])
    index.add(torch.from_numpy(bank[45:]))  # several adds, numpy and torch
    distances, indices = index.search(queries, 7)
    assert_matches_reference(bank, queries, 7, distances, indices)
    assert np.all(distances[:15, :2] == 0)  # each query is in the bank at least twice


def test_backends_agree_and_dtypes_are_converted():
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((500, 48))
    queries = torch.from_numpy(rng.standard_normal((70, 48))).to(torch.float64)
    results = {}
    for backend in BACKENDS:
        index = FlatL2Index(48, backend=backend, device="cpu")
        index.add(bank)  # float64 numpy
        results[backend] = index.search(queries, 9)
    np.testing.assert_array_equal(results["faiss"][1], results["torch"][1])
    np.testing.assert_allclose(results["faiss"][0], results["torch"][0], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_memory_budget_chunks_give_the_same_answer(backend):
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((20000, 40)).astype(np.float32)
    queries = rng.standard_normal((300, 40)).astype(np.float32)
    wide = FlatL2Index(40, backend=backend, device="cpu")
    tight = FlatL2Index(40, backend=backend, device="cpu", memory_budget=2**20)
    for index in (wide, tight):
        index.add(bank)
    bank_rows = tight._bank_chunk()
    queries_per_step = tight._query_chunk(4, bank_rows)
    if backend == "torch":
        assert bank_rows < len(bank)  # the bank itself is split and the top-k merged
        assert queries_per_step * (bank_rows * 16 + 40 * 4) <= 2**20
    else:
        assert queries_per_step * (4 * 12 + 40 * 4) <= 2**20
    expected = wide.search(queries, 4)
    got = tight.search(queries, 4, progress=True)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(backend, tmp_path):
    rng = np.random.default_rng(4)
    bank = rng.standard_normal((400, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    index = FlatL2Index(16, backend=backend, device="cpu")
    index.add(bank)
    index.save(tmp_path / "bank.npz")
    np.testing.assert_array_equal(index.vectors(), bank)
    loaded = FlatL2Index.load(tmp_path / "bank.npz", backend=backend, device="cpu")
    assert len(loaded) == 400 and loaded.dim == 16
    for got, expected in zip(loaded.search(queries, 6), index.search(queries, 6)):
        np.testing.assert_array_equal(got, expected)


def test_load_refuses_bad_files(tmp_path):
    index = FlatL2Index(4, backend="faiss", device="cpu")
    index.add(np.eye(4, dtype=np.float32))
    index.save(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for name, match in [("cut.npz", "truncated"), ("foreign.npz", "truncated"),
                        ("other.npz", "not a knnad model")]:
        with pytest.raises(ModelFileError, match=name):
            FlatL2Index.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FlatL2Index.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        index.save(tmp_path / "bank.faiss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    index = FlatL2Index(3, backend=backend, device="cpu")
    with pytest.raises(ValueError, match="empty index"):
        index.search(np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="dimension 4, the index has dimension 3"):
        index.add(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="rank 2"):
        index.add(np.zeros(3))
    bad = np.zeros((5, 3))
    bad[1, 0], bad[3, 2] = np.nan, np.inf
    with pytest.raises(ValueError, match="NaN or inf in 2 of 5 rows"):
        index.add(bad)
    with pytest.raises(TypeError, match="vectors must be"):
        index.add([[1, 2, 3]])
    with pytest.raises(TypeError, match="numbers"):
        index.add(np.array([["a", "b", "c"]]))
    index.add(np.zeros((2, 3)))
    for k in (0, 3, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 2\]"):
            index.search(np.zeros((1, 3)), k)
    with pytest.raises(ValueError, match="queries has NaN or inf in 1 of 1 rows"):
        index.search(np.full((1, 3), np.nan), 1)
    with pytest.raises(ValueError, match="queries has dimension 2"):
        index.search(np.zeros((1, 2)), 1)


def test_bad_construction():
    for dim in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="dim must be"):
            FlatL2Index(dim)
    with pytest.raises(ValueError, match="backend='annoy'"):
        FlatL2Index(3, backend="annoy")
    with pytest.raises(ValueError, match="memory_budget"):
        FlatL2Index(3, memory_budget=10)
    with pytest.raises(ValueError, match="GPU but torch sees"):
        FlatL2Index(3, backend="torch", device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="cuda:all.*backend='faiss'"):
        FlatL2Index(3, backend="torch", device="cuda:all")


def test_placement_on_a_machine_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 0)
    assert resolve_backend("auto", "auto") == ("faiss", "cpu")
    with pytest.raises(ValueError, match="asks for a GPU but torch sees 0"):
        resolve_backend("torch", "cuda")
    with pytest.raises(ValueError, match="faiss sees no GPU"):
        resolve_backend("faiss", "cuda:all")


def test_auto_falls_back_to_torch_where_faiss_cannot_serve_the_gpu(monkeypatch, caplog):
    # faiss sees no GPU while torch does: "auto" falls back to torch with a logged reason and
    # an explicit faiss backend on the GPU is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 0)
    with caplog.at_level("INFO", logger="knnad.runtime"):
        assert resolve_backend("auto", "cuda:0") == ("torch", "cuda:0")
        assert resolve_backend("auto", "auto") == ("torch", "cuda:0")
    assert "faiss sees no GPU" in caplog.text
    with pytest.raises(ValueError, match="faiss-gpu-cu12"):
        resolve_backend("faiss", "cuda")
    monkeypatch.setattr(runtime, "import_faiss", lambda: None)
    assert resolve_backend("auto", "cpu") == ("torch", "cpu")


def test_auto_takes_what_this_machine_has():
    faiss_gpus = runtime.faiss_gpu_count()
    expected = ("faiss", "cuda:0") if faiss_gpus else \
        ("torch", "cuda:0") if torch.cuda.is_available() else ("faiss", "cpu")
    index = FlatL2Index(3)
    assert (index.backend, index.device) == expected


def test_backend_info_names_the_one_faiss_installed():
    info = runtime.backend_info()
    installed = runtime.installed_faiss_distributions()
    assert len(installed) == 1, f"exactly one faiss distribution expected, found {installed}"
    assert info["faiss_distribution"] == installed[0] and info["faiss_problem"] is None
    assert info["faiss_gpu_build"] == (installed[0] != "faiss-cpu")
    assert info["faiss_gpus"] == (0 if installed[0] == "faiss-cpu" else runtime.faiss_gpu_count())
    import faiss
    assert info["faiss_version"] == faiss.__version__


def test_two_faiss_packages_are_reported(monkeypatch):
    monkeypatch.setattr(runtime, "installed_faiss_distributions",
                        lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    problem = runtime.faiss_install_problem()
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12 && pip install faiss-gpu-cu12" in problem


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerank_recovers_neighbours_lost_to_float32_cancellation(backend):
    # A large common offset makes |x|² huge next to the distances: the matrix-product form
    # then misranks close neighbours, and exact reranking of extra candidates repairs it.
    rng = np.random.default_rng(7)
    bank = (30.0 + rng.standard_normal((2000, 64)) * 0.05).astype(np.float32)
    queries = (30.0 + rng.standard_normal((200, 64)) * 0.05).astype(np.float32)
    ref_d, ref_i = brute_force(bank, queries, 3)
    plain = FlatL2Index(64, backend=backend, device="cpu")
    full = FlatL2Index(64, backend=backend, device="cpu", rerank=2000)
    for index in (plain, full):
        index.add(bank)
    distances, indices = full.search(queries, 3)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-5)
    plain_d, _ = plain.search(queries, 3)
    assert np.all(plain_d >= distances - 1e-6)  # reranking never returns a farther neighbour
    with pytest.raises(ValueError, match="rerank"):
        FlatL2Index(64, rerank=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_among_row_ranges_equals_an_index_of_those_rows(backend):
    rng = np.random.default_rng(8)
    bank = rng.integers(-2, 3, (600, 12)).astype(np.float32)  # many exact ties
    queries = rng.integers(-2, 3, (70, 12)).astype(np.float32)
    ranges = [(0, 40), (100, 103), (250, 400), (599, 600)]
    rows = np.concatenate([np.arange(start, stop) for start, stop in ranges])
    index = FlatL2Index.of(bank, backend=backend, device="cpu", rerank=2)
    alone = FlatL2Index.of(bank[rows], backend=backend, device="cpu", rerank=2)
    distances, indices = index.search_among(queries, 5, ranges)
    expected_d, expected_local = alone.search(queries, 5)
    np.testing.assert_array_equal(distances, expected_d)
    np.testing.assert_array_equal(indices, rows[expected_local])  # same tie order
    assert_matches_reference(bank[rows], queries, 5, distances, np.searchsorted(rows, indices))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        index.search_among(queries, 5, [(0, 3), (599, 600)])
    for ranges in ([(5, 5)], []):
        with pytest.raises(ValueError, match="no stored vectors"):
            index.search_among(queries, 1, ranges)
    for ranges in ([(10, 20), (15, 30)], [(20, 10)], [(-1, 5)], [(590, 601)], [(0.5, 3)],
                   [(1, 2, 3)]):
        with pytest.raises(ValueError, match="ranges must be ascending, disjoint"):
            index.search_among(queries, 1, ranges)


def test_queries_are_converted_chunk_by_chunk(monkeypatch):
    rng = np.random.default_rng(9)
    bank = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((20000, 32))  # float64: never copied whole to float32
    index = FlatL2Index.of(bank, backend="faiss", device="cpu", memory_budget=2**20)
    converted = []
    original = index_module.float32_rows

    def spy(values, start, stop):
        block = original(values, start, stop)
        converted.append(len(block))
        return block

    monkeypatch.setattr(index_module, "float32_rows", spy)
    distances, indices = index.search(queries, 3)
    assert sum(converted) == len(queries) and max(converted) == index._query_chunk(3, 0) < 5000
    monkeypatch.undo()
    reference = FlatL2Index.of(bank, backend="faiss", device="cpu")
    whole = reference.search(queries.astype(np.float32), 3)
    np.testing.assert_array_equal(distances, whole[0])
    np.testing.assert_array_equal(indices, whole[1])


def test_all_gpus_logic_with_faiss_cpu_shards(monkeypatch):
    """device='cuda:all' as it runs on several GPUs, with faiss's own IndexShards of CPU flat
    indexes standing in for the GPU shards (the same class, without reconstruct or a second
    add): searches, a second add, vectors() and save/load must all work."""
    import faiss

    def cpu_shards(vectors):
        shards = faiss.IndexShards(vectors.shape[1], False, True)  # threaded, successive_ids
        for _ in range(3):
            shards.add_shard(faiss.IndexFlatL2(vectors.shape[1]))
        shards.add(vectors)
        return shards

    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 3)
    monkeypatch.setattr(index_module, "_shard_over_gpus", cpu_shards)
    rng = np.random.default_rng(10)
    bank = rng.standard_normal((900, 24)).astype(np.float32)
    queries = rng.standard_normal((80, 24)).astype(np.float32)
    sharded = FlatL2Index(24, device="cuda:all", rerank=3)
    assert (sharded.backend, sharded.device) == ("faiss", "cuda:all")
    sharded.add(bank[:500])
    sharded.add(bank[500:])  # IndexShards alone refuses this
    plain = FlatL2Index.of(bank, backend="faiss", device="cpu", rerank=3)
    for got, expected in zip(sharded.search(queries, 6), plain.search(queries, 6)):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(sharded.search_among(queries, 2, [(10, 80), (700, 900)]),
                             plain.search_among(queries, 2, [(10, 80), (700, 900)])):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(sharded.vectors(), bank)
    assert sharded._faiss_index.count() == 3 and sharded._faiss_index.ntotal == 900


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_gpu_search_matches_the_cpu(backend):
    if backend == "faiss" and runtime.faiss_gpu_count() == 0:
        pytest.skip("faiss-gpu not installed")
    rng = np.random.default_rng(11)
    bank = rng.standard_normal((5000, 64)).astype(np.float32)
    queries = rng.standard_normal((300, 64)).astype(np.float32)
    gpu = FlatL2Index.of(bank, backend=backend, device="cuda:0", rerank=4)
    cpu = FlatL2Index.of(bank, backend=backend, device="cpu", rerank=4)
    got, expected = gpu.search(queries, 5), cpu.search(queries, 5)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    np.testing.assert_array_equal(gpu.vectors(), bank)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_rows_are_read_only(backend):
    """Writing to what rows() returns raises, and the index keeps its vectors (issue #21)."""
    bank = np.random.default_rng(12).standard_normal((50, 8)).astype(np.float32)
    index = FlatL2Index.of(bank, backend=backend, device="cpu")
    rows = index.rows(10, 20)
    for write in (lambda: rows.__setitem__(0, 1.0), lambda: rows.add_(1.0),
                  lambda: rows[2:5].zero_()):
        with pytest.raises(RuntimeError, match="[Ii]nplace"):
            write()
    index.rows(10, 20).numpy()[:] = 0  # numpy's view of the result: not the index's storage
    writable = index.rows(10, 20).clone()
    writable += 1
    np.testing.assert_array_equal(index.vectors(), bank)
    np.testing.assert_array_equal(index.search(bank[:5], 1)[1][:, 0], np.arange(5))


def test_a_mid_sized_query_block_is_padded_into_faiss_tiled_kernel(monkeypatch):
    """faiss 1.15 streams the bank once per query below 1,000 queries: a block of 250-999
    queries against a bank over 1 MiB goes to faiss padded to 1,000 queries, and only its own
    rows come back, with the neighbours of the float64 reference (the same as unpadded), in
    search and in search_among."""
    rng = np.random.default_rng(12)
    bank = rng.standard_normal((4000, 96)).astype(np.float32)  # 1.5 MiB
    queries = rng.standard_normal((300, 96)).astype(np.float32)
    index = FlatL2Index.of(bank, backend="faiss", device="cpu")
    sizes = []
    faiss = runtime.import_faiss()
    search, knn = type(index._faiss_index).search, faiss.knn
    monkeypatch.setattr(type(index._faiss_index), "search",
                        lambda self, x, k: (sizes.append(len(x)), search(self, x, k))[1])
    monkeypatch.setattr(faiss, "knn", lambda x, y, k: (sizes.append(len(x)), knn(x, y, k))[1])
    for k in (1, 4):
        distances, indices = index.search(queries, k)
        assert_matches_reference(bank, queries, k, distances, indices)
        distances, indices = index.search_among(queries, k, [(0, 1500), (2000, 4000)])
        kept = np.r_[0:1500, 2000:4000]
        local_d, local_i = brute_force(bank[kept], queries, k)
        np.testing.assert_array_equal(indices, kept[local_i])
        np.testing.assert_allclose(distances, local_d, rtol=1e-4, atol=1e-5)
    assert sizes == [1000] * 4
    index.search(queries[:249], 1)  # fewer: not padded
    FlatL2Index.of(bank[:2000], backend="faiss", device="cpu").search(queries, 1)  # 0.73 MiB
    assert sizes[4:] == [249, 300]
