import importlib.util

import joblib
import numpy as np
import pytest

from skmml import Memory
from skmml.retrieval import NeighborIndex

SCANN = pytest.param("scann", marks=pytest.mark.skipif(
    importlib.util.find_spec("scann") is None, reason="ScaNN is not installed"))
INDEXES = ["flat", "Flat", "ivf", "ivfsq8", "ivfpq", "hnsw", "IVF8,Flat", SCANN]


def _params(spec):
    """Search settings that make each approximate index look at most of the memory."""
    if spec.lower().startswith("ivf"):
        return {"nprobe": 64}
    if spec == "scann":
        return {"num_leaves": 8, "num_leaves_to_search": 8}
    return None


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(0)
    return Memory(rng.normal(size=(800, 16)), rng.integers(0, 5, 800)).image


@pytest.fixture(scope="module")
def queries():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _exact(bank, queries, k):
    sims = queries @ bank.embeddings.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


@pytest.mark.parametrize("n_queries", [1, 3, 40])  # few queries take the BLAS path
def test_flat_search_is_exact_and_reads_the_bank_in_place(bank, queries, n_queries):
    index = NeighborIndex("flat", device="cpu").build(bank)
    assert not hasattr(index.kind_, "faiss_index") and index.bank_.embeddings is bank.embeddings
    sims, rows = index.search(queries[:n_queries], 7)
    exact_sims, exact_rows = _exact(bank, queries[:n_queries], 7)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(sims, exact_sims, rtol=1e-5)


@pytest.mark.parametrize("spec", INDEXES)
def test_every_index_type_finds_the_nearest_items(bank, queries, spec):
    index = NeighborIndex(spec, params=_params(spec), device="cpu").build(bank)
    _, rows = index.search(queries, 5)
    _, exact_rows = _exact(bank, queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, exact_rows)])
    assert recall >= (0.6 if spec == "ivfpq" else 0.9)


@pytest.mark.parametrize("spec", ["flat", "ivf", "hnsw", "ivfpq", SCANN])
def test_removed_items_never_come_back_and_rows_follow_stable_ids(bank, queries, spec):
    old = NeighborIndex(spec, params=_params(spec), device="cpu").build(bank)
    old_sims, rows = old.search(queries, 3)
    gone = np.unique(bank.ids[rows[:, 0]])
    memory = Memory._from_banks(bank, None).remove(gone)
    index = old.remove(memory.image, gone)
    # Copy-on-write: the old index still answers for the old bank (ScaNN,
    # changed in place, answers a superseded version by exact search).
    if spec == "scann":
        np.testing.assert_array_equal(old.search(queries, 3)[1], _exact(bank, queries, 3)[1])
    else:
        np.testing.assert_array_equal(old.search(queries, 3)[1], rows)
        np.testing.assert_array_equal(old.search(queries, 3)[0], old_sims)
    _, new_rows = index.search(queries, 3)
    found_ids = memory.image.slot_ids[new_rows]
    assert not np.isin(found_ids, gone).any()
    # Rows point at the right items of the new bank: their ids are unchanged
    # (PQ similarities are approximate, so only exact vectors compare).
    if spec != "ivfpq":
        sims_new = np.einsum("qd,qkd->qk", queries, memory.image.slot_embeddings[new_rows])
        np.testing.assert_allclose(index.search(queries, 3)[0], sims_new, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["flat", "ivf", "hnsw", "ivfpq", SCANN])
def test_added_items_are_found_by_id(bank, spec):
    old = NeighborIndex(spec, params=_params(spec), device="cpu").build(bank)
    rng = np.random.default_rng(5)
    memory = Memory._from_banks(bank, None).add(rng.normal(size=(3, 16)), [9, 9, 9])
    index = old.add(memory.image, 3)
    _, rows = index.search(memory.image.embeddings[-3:], 1)
    np.testing.assert_array_equal(memory.image.slot_ids[rows[:, 0]], [800, 801, 802])
    # The old index never sees the new items.
    _, old_rows = old.search(memory.image.embeddings[-3:], 5)
    assert old_rows.max() < len(bank)


@pytest.mark.parametrize("spec", INDEXES)
def test_pickle_round_trip_gives_identical_results(bank, queries, spec, tmp_path):
    index = NeighborIndex(spec, params={"nprobe": 4} if "ivf" in spec.lower() else None,
                          device="cpu").build(bank)
    joblib.dump(index, tmp_path / "index.joblib")
    loaded = joblib.load(tmp_path / "index.joblib")
    for a, b in zip(index.search(queries, 6), loaded.search(queries, 6)):
        np.testing.assert_array_equal(a, b)


def test_bad_index_or_parameter_is_a_clear_error(bank):
    with pytest.raises(ValueError, match="Invalid FAISS index 'IVFbanana'"):
        NeighborIndex("IVFbanana", device="cpu").build(bank)
    with pytest.raises(ValueError, match="nprobe"):
        NeighborIndex("hnsw", params={"nprobe": 3}, device="cpu").build(bank)
    with pytest.raises(ValueError, match="empty memory"):
        NeighborIndex("flat").build(Memory().image)


def test_cuda_without_gpu_faiss_is_a_clear_error(bank):
    from skmml.retrieval import faiss_has_gpu

    if faiss_has_gpu():
        pytest.skip("this machine has GPU FAISS")
    with pytest.raises(ValueError, match="no GPU support"):
        NeighborIndex("flat", device="cuda").build(bank)


@pytest.mark.parametrize("spec", ["flat", "IVF8,Flat"])
def test_gpu_index_matches_cpu_and_survives_pickling(bank, queries, spec, tmp_path):
    from skmml.retrieval import faiss_has_gpu

    if not faiss_has_gpu():
        pytest.skip("needs FAISS with GPU support and a GPU")
    params = {"nprobe": 8} if spec != "flat" else None
    cpu = NeighborIndex(spec, params=params, device="cpu").build(bank)
    gpu = NeighborIndex(spec, params=params, device="cuda").build(bank)
    assert gpu.kind_.on_gpu
    np.testing.assert_array_equal(cpu.search(queries, 5)[1], gpu.search(queries, 5)[1])
    joblib.dump(gpu, tmp_path / "gpu.joblib")
    loaded = joblib.load(tmp_path / "gpu.joblib")
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], gpu.search(queries, 5)[1])
    memory = Memory._from_banks(bank, None).remove([int(bank.ids[0])])
    gpu = gpu.remove(memory.image, [int(bank.ids[0])])
    assert not np.isin(memory.image.slot_ids[gpu.search(queries, 5)[1]], [bank.ids[0]]).any()


def test_verbose_search_shows_progress_and_gives_the_same_result(bank, capsys):
    assert len(bank) < 16384  # a bar for every search of 128 queries or more
    index = NeighborIndex("flat", device="cpu").build(bank)
    quiet = index.search(bank.embeddings, 4)
    loud = index.search(bank.embeddings, 4, verbose=True)
    assert "searching" in capsys.readouterr().err
    for a, b in zip(quiet, loud):
        np.testing.assert_array_equal(a, b)


def _canonical_reference(queries, embeddings, ids, k):
    """Definition: float32 scores of one fixed kernel, sorted by (-score, id)."""
    scores = np.einsum("qd,nd->qn", queries, embeddings).astype(np.float32)
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]
    return ids[order]


@pytest.mark.parametrize("k", [1, 7, 40, 300])
def test_ties_go_to_the_lower_id_on_every_path_and_batch_size(k):
    rng = np.random.default_rng(0)
    d = 64
    base = rng.normal(size=(30, d))
    # 300 items: each of 30 directions 10 times (exact duplicates), ids shuffled,
    # plus near-duplicates a few ulps apart.
    X = np.repeat(base, 10, axis=0)
    X[::7] += 1e-7 * rng.normal(size=X[::7].shape)
    ids = rng.permutation(10_000)[:300]
    memory = Memory(X, np.repeat(np.arange(30), 10), image_ids=ids)
    bank = memory.image
    queries = np.ascontiguousarray(bank.embeddings[rng.integers(0, 300, 64)])
    index = NeighborIndex("flat", device="cpu").build(bank)
    expected = _canonical_reference(queries, bank.embeddings, bank.ids, k)
    for batch in (1, 5, 19, 20, 64):
        got = np.concatenate([index.search(queries[i:i + batch], k)[1]
                              for i in range(0, 64, batch)])
        np.testing.assert_array_equal(bank.ids[got], expected, err_msg=f"batch {batch}")


def test_more_duplicates_than_the_margin_are_settled_by_a_full_scan():
    rng = np.random.default_rng(1)
    d = 32
    v = rng.normal(size=d)
    X = np.vstack([np.tile(v, (500, 1)), rng.normal(size=(2000, d))])
    ids = rng.permutation(2500) + 1000
    bank = Memory(X, np.zeros(2500, int), image_ids=ids).image
    index = NeighborIndex("flat", device="cpu").build(bank)
    query = np.ascontiguousarray(bank.embeddings[:1])
    for k in (10, 64, 1024):
        _, rows = index.search(np.repeat(query, 25, axis=0), k)  # the FAISS path
        expected = _canonical_reference(query, bank.embeddings, bank.ids, k)[0]
        assert np.all(bank.ids[rows] == expected)
        assert np.all(np.diff(bank.ids[rows[0, :min(k, 500)]]) > 0)  # the copies, by id
        np.testing.assert_array_equal(index.search(query, k)[1][0], rows[0])  # BLAS path


def test_a_query_alone_and_in_a_batch_gets_the_same_prediction():
    from skmml import KNNVoteClassifier

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(5, 16))
    X = np.repeat(centres, 4, axis=0)  # every item has 3 exact duplicates ...
    y = np.arange(20) % 5               # ... of other classes: all votes are ties
    clf = KNNVoteClassifier(n_neighbors=4, voting="plurality").fit(X, y)
    Q = np.repeat(centres, 10, axis=0)
    batched = clf.predict(Q)
    alone = np.concatenate([clf.predict(Q[i:i + 1]) for i in range(len(Q))])
    np.testing.assert_array_equal(alone, batched)
