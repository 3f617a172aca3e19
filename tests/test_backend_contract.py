"""The memory contract: every backend, under both classifiers, keeps the same promises.

Each test runs over every backend (``BACKENDS``): the in-RAM memory with each
index kind, Milvus Lite, and a real Milvus server (skipped, with the reason,
where it cannot start). A new backend is added by adding it to ``BACKENDS``
and making this file pass.

What every backend promises:

- the same ids: after ``n`` items, new items get ``n, n + 1, ...`` from a
  high-water mark that never goes back, so a forgotten id is never reused;
  given ids are kept and checked unique against the whole memory;
- the same answers as the in-RAM exact memory after fit, partial_fit,
  forget, expand, replace and prune: identical for exact backends
  (``EXACT``); for approximate ones, a recall@k of at least ``RECALL`` (IVF-PQ
  and ScaNN compress the vectors, so they get less) and predictions that agree with
  the exact ones on at least ``AGREEMENT`` of the queries;
- the same errors at the same calls, and a rejected call changes nothing.

The items here have no exact duplicates: a Milvus server breaks a tie at the
k-th neighbor by its own order, not by the lower id.
"""

import io
import uuid

import joblib
import numpy as np
import pytest

from skmml import KNNVoteClassifier, Memory, MemoryModularClassifier

BACKENDS = ["flat", "ivf", "hnsw", "ivfpq", "scann", "milvus-lite", "milvus-server"]
EXACT = {"flat", "milvus-lite", "milvus-server"}
#: Least recall@k of each approximate backend against exact search.
RECALL = {"ivf": 0.9, "hnsw": 0.9, "scann": 0.8, "ivfpq": 0.8}
#: Least share of queries on which an approximate backend predicts as exact search.
AGREEMENT = 0.9

N, D, K = 300, 16, 5


def _data(n=N, seed=0, n_classes=4):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(n_classes, D))
    y = rng.integers(0, n_classes, n)
    X = (centres[y] + 0.7 * rng.normal(size=(n, D))).astype(np.float32)
    return X, y


QUERIES, QUERY_LABELS = _data(60, seed=7)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """`make(memory)`: the memory object of this backend holding `memory`, and its kwargs."""
    kind = request.param

    def make(memory):
        if kind.startswith("milvus"):
            pytest.importorskip("pymilvus")
            pytest.importorskip("milvus_lite")
            from skmml import MilvusMemory

            if kind == "milvus-lite":
                uri, token = str(tmp_path / f"{uuid.uuid4().hex}.db"), None
            else:
                uri, token = request.getfixturevalue("milvus_server")
                # An unpickled handle reads its token from the environment.
                request.getfixturevalue("monkeypatch").setenv("MILVUS_TOKEN", token)
            return MilvusMemory.from_memory(memory, uri=uri, token=token,
                                            collection=f"contract_{uuid.uuid4().hex}"), {}
        if kind == "scann":
            pytest.importorskip("scann")
        # Settings for the small memories here: IVF-PQ with 4-bit codes (whose
        # codebooks train on 30 items), ScaNN searching half its leaves.
        return memory, {"index": "IVF4,PQ16x4"} if kind == "ivfpq" else {
            "index": kind, "index_params": {"num_leaves": 4, "num_leaves_to_search": 2}
            if kind == "scann" else None}

    make.kind = kind
    return make


def _agree(clf, ref, kind, k=K):
    """The answers of `clf` are those of the exact in-RAM `ref` (within the tolerance)."""
    exact = kind in EXACT
    np.testing.assert_array_equal(clf.classes_, ref.classes_)
    ids, ref_ids = clf.kneighbors(QUERIES, k)[1], ref.kneighbors(QUERIES, k)[1]
    predicted, expected = clf.predict(QUERIES), ref.predict(QUERIES)
    if exact:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(predicted, expected)
        np.testing.assert_allclose(clf.predict_proba(QUERIES), ref.predict_proba(QUERIES),
                                   rtol=1e-5, atol=1e-6)
    else:
        recall = np.mean([np.isin(a, b).mean() for a, b in zip(ids, ref_ids)])
        assert recall >= RECALL[kind]
        assert np.mean(predicted == expected) >= AGREEMENT
    assert not np.isin(ids, _gone(ref)).any()


def _gone(ref):
    return np.setdiff1d(np.arange(ref.memory_.next_id), ref.memory_.ids)


def _unchanged(clf, before):
    n, predicted = before
    assert clf.memory_.n_items() == n
    np.testing.assert_array_equal(clf.predict(QUERIES), predicted)


def _snapshot(clf):
    return clf.memory_.n_items(), clf.predict(QUERIES)


def test_knn_ids_answers_and_errors_follow_the_contract(backend):
    X, y = _data()
    memory, kwargs = backend(Memory(X, y))
    clf = KNNVoteClassifier(n_neighbors=K, **kwargs).set_memory(memory)
    ref = KNNVoteClassifier(n_neighbors=K).set_memory(Memory(X, y))
    exact = backend.kind in EXACT
    _agree(clf, ref, backend.kind)

    # partial_fit: ids from the high-water mark, the same on every backend.
    X_new, _ = _data(5, seed=1)
    for est in (clf, ref):
        est.partial_fit(X_new, np.full(5, 9))
        np.testing.assert_array_equal(est.added_ids_, np.arange(N, N + 5))
    assert clf.memory_.next_id == N + 5
    _agree(clf, ref, backend.kind)

    # forget: exact and immediate; a forgotten id is never given again.
    gone = np.unique(ref.kneighbors(QUERIES[:3], 2)[1])
    for est in (clf, ref):
        est.forget(gone).forget([N + 4])
        est.partial_fit(X_new[:1] + 0.02, [9])
        np.testing.assert_array_equal(est.added_ids_, [N + 5])
    _agree(clf, ref, backend.kind)

    # Given ids are kept and move the mark above them; a clash changes nothing.
    for est in (clf, ref):
        est.partial_fit(X_new[:2] + 0.03, [1, 2], ids=[1000, 1001])
        np.testing.assert_array_equal(est.added_ids_, [1000, 1001])
        est.partial_fit(X_new[2:3] + 0.04, [2])
        np.testing.assert_array_equal(est.added_ids_, [1002])
    before = _snapshot(clf)
    with pytest.raises(ValueError, match=r"ids already in the memory: \[1000\]"):
        clf.partial_fit(X_new[:1], [1], ids=[1000])
    _unchanged(clf, before)

    # expand: the added items keep their ids, or get new ones from the mark.
    X_more, y_more = _data(20, seed=2)
    extra = Memory(X_more, y_more, image_ids=np.arange(2000, 2020))
    for est in (clf, ref):
        est.set_memory(extra, mode="expand")
        np.testing.assert_array_equal(est.added_ids_, np.arange(2000, 2020))
        est.set_memory(Memory(X_more[:3] + 0.01, y_more[:3]), mode="expand",
                       reassign_ids=True)
        np.testing.assert_array_equal(est.added_ids_, [2020, 2021, 2022])
    with pytest.raises(ValueError, match="ids"):
        clf.set_memory(extra, mode="expand")
    _agree(clf, ref, backend.kind)

    # prune: the same wrong-neighbor counts, then the same answers.
    for est in (clf, ref):
        est.prune("hard")
    if exact:
        report, ref_report = clf.pruning_report(), ref.pruning_report()
        listed = ref_report[ref_report["wrong_count"] > 0]
        assert set(report[report["wrong_count"] > 0]["id"]) == set(listed["id"])
    _agree(clf, ref, backend.kind)
    clf.unprune()
    ref.unprune()

    # The same errors at the same calls, and nothing changes.
    before = _snapshot(clf)
    for bad, error in (([1.5], TypeError), (["3"], TypeError), ([True], TypeError),
                       ([2**63], ValueError), ([-1], ValueError)):
        with pytest.raises(error, match="ids must be"):
            clf.forget(bad)
    with pytest.raises(ValueError, match=r"Unknown memory ids: \[99999\]"):
        clf.forget([3, 99999])
    with pytest.raises(ValueError, match="n_neighbors=5 is larger than the memory"):
        clf.forget(ref.memory_.ids[: ref.memory_.n_items() - 4])  # the same ids
    _unchanged(clf, before)
    with pytest.raises(ValueError, match="n_neighbors=5 is larger than the memory"):
        KNNVoteClassifier(n_neighbors=K, **kwargs).set_memory(backend(Memory(X[:4], y[:4]))[0])

    # Pickling keeps the answers (a Milvus handle reconnects, token from the environment).
    _agree(_reloaded(clf), ref, backend.kind)

    # replace: the classifier follows a new memory with no retraining.
    X_other, y_other = _data(200, seed=3)
    clf.set_memory(backend(Memory(X_other, y_other + 10))[0])
    ref.set_memory(Memory(X_other, y_other + 10))
    _agree(clf, ref, backend.kind)


def _reloaded(clf):
    buffer = io.BytesIO()
    joblib.dump(clf, buffer)
    buffer.seek(0)
    return joblib.load(buffer)


def _multimodal(n_classes=5, per_class=30, texts=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, D))
    y = np.repeat(np.arange(n_classes), per_class)
    X = (centres[y] + 0.6 * rng.normal(size=(len(y), D))).astype(np.float32)
    t_y = np.repeat(np.arange(n_classes), texts)
    T = (centres[t_y] + 0.3 * rng.normal(size=(len(t_y), D))).astype(np.float32)
    return Memory(X, y, text_embeddings=T, text_labels=t_y), X, y


def test_mml_over_every_backend_equals_mml_in_ram_after_forget_and_expand(backend):
    memory, X, y = _multimodal()
    train = MemoryModularClassifier(n_neighbors=4, max_epochs=2, validation_fraction=None,
                                    memory=memory, random_state=0)
    kwargs = backend(memory)[1]
    clf = MemoryModularClassifier(n_neighbors=4, max_epochs=2, validation_fraction=None,
                                  memory=memory, random_state=0, **kwargs).fit(X, y)
    ref = train.fit(X, y)
    held, _ = backend(memory)
    clf.set_memory(held)
    exact = backend.kind in EXACT
    queries = X[::7] + 0.05

    def check():
        predicted, expected = clf.predict(queries), ref.predict(queries)
        if exact:
            np.testing.assert_array_equal(predicted, expected)
            np.testing.assert_allclose(clf.predict_proba(queries), ref.predict_proba(queries),
                                       rtol=1e-4, atol=1e-5)
            a, b = clf.explain(queries[:2]), ref.explain(queries[:2])
            np.testing.assert_array_equal(a[["modality", "rank", "id"]].to_numpy(),
                                          b[["modality", "rank", "id"]].to_numpy())
        else:
            assert np.mean(predicted == expected) >= AGREEMENT

    check()
    gone = [0, 1, 2, memory.text.ids[0]]
    for est in (clf, ref):
        est.forget(gone)
    check()
    more = Memory(X[:6] + 0.01, np.full(6, 7), text_embeddings=X[:2] + 0.02,
                  text_labels=[7, 7])
    for est in (clf, ref):
        est.set_memory(more, mode="expand", reassign_ids=True)
        np.testing.assert_array_equal(est.added_ids_, np.arange(memory.next_id,
                                                                memory.next_id + 8))
    check()
    before = clf.predict(queries)
    with pytest.raises(ValueError, match="n_neighbors=4 is larger than the memory"):
        clf.forget(ref.memory_.text.ids[:-3])  # the same ids in every backend
    np.testing.assert_array_equal(clf.predict(queries), before)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        clf.set_memory(backend(memory.keep_classes([0]))[0])
    np.testing.assert_array_equal(clf.predict(queries), before)
    with pytest.raises(TypeError, match="ids must be integers"):
        clf.forget([0.5])
