"""Banks share storage between versions: changes cost what they change (skmml.memory._bank)."""

import pickle

import numpy as np
import pandas as pd
import pytest

from skmml import KNNVoteClassifier, Memory
from skmml.retrieval import _exact
from skmml.memory import MemoryBank


def _unit(rng, n, d=8):
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _snapshot(bank):
    return (bank.embeddings.copy(), bank.labels.copy(), bank.ids.copy(), bank.metadata.copy())


def _assert_bank(bank, snapshot):
    embeddings, labels, ids, metadata = snapshot
    np.testing.assert_array_equal(bank.embeddings, embeddings)
    np.testing.assert_array_equal(bank.labels, labels)
    np.testing.assert_array_equal(bank.ids, ids)
    pd.testing.assert_frame_equal(bank.metadata, metadata)


def test_additions_after_the_first_share_storage_and_leave_old_versions_intact():
    rng = np.random.default_rng(0)
    v0 = Memory(_unit(rng, 5000), rng.integers(0, 3, 5000))
    v1 = v0.add(_unit(rng, 2), [0, 1])  # the first addition copies into spare capacity
    v2 = v1.add(_unit(rng, 3), [2, 2, 2])
    v3 = v2.add(_unit(rng, 1), [1])
    assert np.shares_memory(v1.image.slot_embeddings, v3.image.slot_embeddings)
    assert v3.image.slot_embeddings.base is v1.image.slot_embeddings.base
    before = _snapshot(v2.image)
    v2.add(_unit(rng, 4), [0] * 4)  # a second branch from v2 must not overwrite v3's rows
    _assert_bank(v2.image, before)
    assert len(v3.image) == 5006 and v3.image.ids[-1] == 5005
    np.testing.assert_array_equal(v3.image.ids, np.arange(5006))
    np.testing.assert_array_equal(v3.classes, [0, 1, 2])
    assert not v3.image.embeddings.flags.writeable


def test_forgetting_marks_slots_dead_without_copying_and_compacts_past_a_sixteenth():
    rng = np.random.default_rng(1)
    memory = Memory(_unit(rng, 1000), np.arange(1000) % 4,
                    image_metadata={"path": [f"{i}.jpg" for i in range(1000)]})
    before = _snapshot(memory.image)
    smaller = memory.remove([3, 500, 999])
    _assert_bank(memory.image, before)  # the old version is untouched
    bank = smaller.image
    assert len(bank) == 997 and bank.n_slots == 1000
    np.testing.assert_array_equal(bank.dead_slots, [3, 500, 999])
    assert np.shares_memory(bank.slot_embeddings, memory.image.embeddings)
    keep = np.setdiff1d(np.arange(1000), [3, 500, 999])
    np.testing.assert_array_equal(bank.ids, keep)
    np.testing.assert_array_equal(bank.embeddings, before[0][keep])
    assert bank.metadata["path"].tolist() == [f"{i}.jpg" for i in keep]
    assert bank.max_id == 998
    slots, found = bank.slots_of([4, 998])
    assert found.all()
    np.testing.assert_array_equal(np.searchsorted(bank.live_slots, slots), [3, 996])  # rows
    np.testing.assert_array_equal(bank.contains([3, 4, 999]), [False, True, False])
    # From the high-water mark: the forgotten 999 is never given again.
    assert smaller.add(_unit(rng, 1), [0]).image.ids[-1] == 1000
    # More than 1/16 dead: compacted into a store of the live items only.
    compact = smaller.remove(np.arange(100, 164)).image
    assert compact.n_slots == len(compact) == 933 and not compact.dead_slots.size
    np.testing.assert_array_equal(compact.ids, np.setdiff1d(keep, np.arange(100, 164)))


def test_class_counts_follow_additions_and_removals():
    rng = np.random.default_rng(2)
    memory = Memory(_unit(rng, 6), ["a", "a", "b", "b", "c", "c"])
    assert memory.image.classes.tolist() == ["a", "b", "c"]
    memory = memory.remove([4, 5]).add(_unit(rng, 1), ["zebra"])
    assert memory.image.classes.tolist() == ["a", "b", "zebra"]
    assert memory.image.labels.dtype == np.dtype("<U5")  # the store grew a wider dtype
    np.testing.assert_array_equal(memory.image.labels, ["a", "a", "b", "b", "zebra"])


def test_ids_that_do_not_increase_are_looked_up_by_sorting():
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(100, 140))
    memory = Memory(_unit(rng, 40), np.arange(40) % 2, image_ids=ids)
    memory = memory.add(_unit(rng, 2), [1, 1], ids=[5, 60]).remove([ids[3]])
    bank = memory.image
    assert bank.n_slots == 42 and len(bank) == 41  # a tombstone, not compacted
    expected = np.concatenate([np.delete(ids, 3), [5, 60]])
    np.testing.assert_array_equal(bank.ids, expected)
    slots, found = bank.slots_of([5, ids[0], 60, ids[4]])
    assert found.all()
    np.testing.assert_array_equal(np.searchsorted(bank.live_slots, slots), [39, 0, 40, 3])
    np.testing.assert_array_equal(bank.slots_of([5, ids[0], 60, ids[4]])[0], [40, 0, 41, 4])
    assert bank.max_id == 139
    assert not bank.slots_of([ids[3]])[1].any()  # forgotten: not a live item


def test_metadata_by_slot_spans_the_chunks_of_several_additions():
    rng = np.random.default_rng(4)
    memory = Memory(_unit(rng, 3), [0, 1, 0], image_metadata={"path": ["a", "b", "c"]})
    memory = memory.add(_unit(rng, 2), [1, 1], metadata={"path": ["d", "e"]})
    memory = memory.add(_unit(rng, 1), [0], metadata={"source": ["web"]})
    bank = memory.image
    picked = bank.metadata_at([5, 0, 3, 4])
    assert picked["path"].tolist()[1:] == ["a", "d", "e"] and pd.isna(picked["path"][0])
    assert picked["source"].tolist()[0] == "web"
    assert bank.metadata["path"].tolist()[:5] == ["a", "b", "c", "d", "e"]


def test_pickled_banks_hold_the_live_items_only():
    rng = np.random.default_rng(5)
    X = _unit(rng, 200)
    memory = Memory(X, np.arange(200) % 2).remove([7])
    data = pickle.dumps(memory.image)
    assert X[7].tobytes() not in data  # forgotten items never reach a file
    loaded = pickle.loads(data)
    assert isinstance(loaded, MemoryBank) and loaded.n_slots == 199
    np.testing.assert_array_equal(loaded.embeddings, memory.image.embeddings)


@pytest.mark.parametrize("pruning", [None, "hard", "soft"])
@pytest.mark.parametrize("n_queries", [1, 5, 40])  # BLAS path and FAISS path
def test_predictions_over_dead_slots_equal_a_fresh_fit_on_the_remaining_items(
        pruning, n_queries, monkeypatch):
    blas_calls = []
    blas = _exact._top_k_blas
    monkeypatch.setattr(_exact, "_top_k_blas",
                        lambda q, *args: blas_calls.append(len(q)) or blas(q, *args))
    rng = np.random.default_rng(6)
    centres = _unit(rng, 4, d=16)
    y = rng.integers(0, 4, 8000)
    X = centres[y] + 0.6 * rng.normal(size=(8000, 16)).astype(np.float32)
    queries = X[:n_queries] + 0.01
    clf = KNNVoteClassifier(n_neighbors=9, index_device="cpu").fit(X, y)
    if pruning:
        clf.prune(pruning)
    # Forget the 80 nearest items of the first queries: more than the FAISS
    # path's margin, so it must search again around them.
    gone = np.unique(clf.kneighbors(queries[:5], n_neighbors=80)[1])
    clf.forget(gone)
    assert clf.memory_.image.dead_slots.size == gone.size  # not compacted: tombstones
    keep = np.setdiff1d(np.arange(8000), gone)
    fresh = KNNVoteClassifier(n_neighbors=9, index_device="cpu").fit(X[keep], y[keep])
    if pruning:
        fresh.prune(pruning)
    blas_calls.clear()
    ids = clf.kneighbors(queries)[1]
    assert not np.isin(ids, gone).any()
    assert blas_calls == [n_queries if n_queries < _exact.SMALL_BATCH else 5]
    np.testing.assert_array_equal(ids, keep[fresh.kneighbors(queries)[1]])
    np.testing.assert_array_equal(clf.predict_proba(queries), fresh.predict_proba(queries))
    np.testing.assert_array_equal(clf.kneighbors()[1], keep[fresh.kneighbors()[1]])
    explained = clf.explain(queries)
    np.testing.assert_array_equal(explained["id"], keep[fresh.explain(queries)["id"]])
    if pruning:
        report, fresh_report = clf.pruning_report(), fresh.pruning_report()
        np.testing.assert_array_equal(report["id"], keep[fresh_report["id"]])
        np.testing.assert_array_equal(report["weight"], fresh_report["weight"])
        loaded = pickle.loads(pickle.dumps(clf))
        np.testing.assert_array_equal(loaded.predict_proba(queries),
                                      clf.predict_proba(queries))
