import pickle
import tracemalloc

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skmml import KNNVoteClassifier, Memory


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:1400], y[:1400], X[1400:], y[1400:]


def _blobs(n=600, d=16, n_classes=6, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * 1.5
    y = rng.integers(0, n_classes, n)
    return (centres[y] + noise * rng.normal(size=(n, d))).astype(np.float32), y


def _fitted_state(clf):
    """What a fitted classifier holds, for before/after comparisons."""
    bank = clf.memory_.image
    return (bank.embeddings.copy(), bank.labels.copy(), bank.ids.copy(),
            clf.classes_.copy(), clf.pruning_)


def _assert_same_fitted_state(a, b):
    for x, y in zip(a[:4], b[:4]):
        np.testing.assert_array_equal(x, y)
    assert a[4] == b[4]


# -- agreement with scikit-learn and with the reference rules -------------------------


@pytest.mark.parametrize("k", [1, 5, 15])
def test_plurality_matches_sklearn_kneighbors_without_ties(k):
    X, y = _blobs(noise=2.0)
    y = y % 2  # two classes and odd k: plurality ties cannot happen
    X_test, y_test = _blobs(n=300, seed=1, noise=2.0)
    ours = KNNVoteClassifier(n_neighbors=k, voting="plurality").fit(X, y)
    ref = KNeighborsClassifier(n_neighbors=k, weights="uniform", metric="cosine",
                               algorithm="brute").fit(X, y)
    np.testing.assert_array_equal(ours.predict(X_test), ref.predict(X_test))
    np.testing.assert_allclose(ours.predict_proba(X_test), ref.predict_proba(X_test))


def test_plurality_matches_sklearn_multiclass_where_there_is_no_tie():
    X, y = _blobs(noise=2.5)
    X_test, _ = _blobs(n=400, seed=2, noise=2.5)
    ours = KNNVoteClassifier(n_neighbors=6, voting="plurality").fit(X, y)
    ref = KNeighborsClassifier(n_neighbors=6, metric="cosine", algorithm="brute").fit(X, y)
    proba = ref.predict_proba(X_test)
    no_tie = (proba == proba.max(axis=1, keepdims=True)).sum(axis=1) == 1
    assert no_tie.sum() > 200
    np.testing.assert_array_equal(ours.predict(X_test)[no_tie], ref.predict(X_test)[no_tie])


def test_kneighbors_matches_sklearn_and_reports_ids():
    X, y = _blobs()
    ours = KNNVoteClassifier(n_neighbors=4).fit(X, y)
    ref = KNeighborsClassifier(n_neighbors=4, metric="cosine", algorithm="brute").fit(X, y)
    for query in (X[:50], None):
        dist, ids = ours.kneighbors(query)
        ref_dist, ref_ids = ref.kneighbors(query)
        np.testing.assert_array_equal(ids[:50], ref_ids[:50])
        np.testing.assert_allclose(dist[:50], ref_dist[:50], atol=1e-5)
    assert ours.kneighbors(X[:3], n_neighbors=2, return_distance=False).shape == (3, 2)


def test_rank_voting_by_hand():
    # Query at angle 0; memory at angles .1 (A), .2 (B), .3 (B), .4 (A), .5 (A).
    angles = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    X = np.c_[np.cos(angles), np.sin(angles)]
    clf = KNNVoteClassifier(n_neighbors=5).fit(X, ["A", "B", "B", "A", "A"])
    votes_a, votes_b = 1 / 2 + 1 / 5 + 1 / 6, 1 / 3 + 1 / 4
    proba = clf.predict_proba([[1.0, 0.0]])
    np.testing.assert_allclose(proba, [[votes_a, votes_b]] / np.float64(votes_a + votes_b))
    table = clf.explain([[1.0, 0.0]])
    np.testing.assert_allclose(table["weight"], [1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    np.testing.assert_array_equal(table["id"], [0, 1, 2, 3, 4])


def test_ties_go_to_the_class_that_reached_the_maximum_first():
    # Plurality over A, B, B, A: tie 2-2, B reached 2 first.
    angles = np.array([0.1, 0.2, 0.3, 0.4])
    X = np.c_[np.cos(angles), np.sin(angles)]
    clf = KNNVoteClassifier(n_neighbors=4, voting="plurality").fit(X, ["A", "B", "B", "A"])
    assert clf.predict([[1.0, 0.0]])[0] == "B"
    assert [p[0] for p in clf.staged_predict([[1.0, 0.0]])] == ["A", "A", "B", "B"]


@pytest.mark.parametrize("voting", ["rank", "softmax", "distance", "plurality"])
def test_staged_predict_equals_predict_for_every_k(digits, voting):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier(n_neighbors=12, voting=voting).fit(X, y)
    staged = list(clf.staged_predict(X_test))
    assert len(staged) == 12
    for k in (1, 2, 7, 12):
        np.testing.assert_array_equal(staged[k - 1],
                                      clf.set_params(n_neighbors=k).predict(X_test))


def test_predict_proba_columns_follow_classes(digits):
    X, y, X_test, _ = digits
    labels = np.array(list("abcdefghij"))[y]
    clf = KNNVoteClassifier().fit(X, labels)
    proba = clf.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X_test))


def test_zero_weights_fall_back_to_the_nearest_neighbor():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    clf = KNNVoteClassifier(n_neighbors=3, voting=lambda s, r: np.zeros_like(s))
    clf.fit(X, [0, 1, 1])
    np.testing.assert_array_equal(clf.predict([[1.0, 0.1]]), [0])
    np.testing.assert_array_equal(clf.predict_proba([[1.0, 0.1]]), [[1.0, 0.0]])


def test_digits_accuracy_is_that_of_a_good_knn(digits):
    X, y, X_test, y_test = digits
    for voting in ("rank", "softmax", "distance", "plurality"):
        assert KNNVoteClassifier(voting=voting).fit(X, y).score(X_test, y_test) > 0.93


# -- memory lifecycle ---------------------------------------------------------------


def test_partial_fit_adds_a_new_class_without_retraining(digits):
    X, y, X_test, y_test = digits
    seen = y < 9
    clf = KNNVoteClassifier().fit(X[seen], y[seen])
    nines = y_test == 9
    assert not np.any(clf.predict(X_test[nines]) == 9)
    clf.partial_fit(X[~seen], y[~seen])
    np.testing.assert_array_equal(clf.classes_, np.arange(10))
    assert np.mean(clf.predict(X_test[nines]) == 9) > 0.9
    np.testing.assert_array_equal(clf.memory_.image.ids, np.arange(len(X)))


def test_partial_fit_from_scratch_and_with_declared_classes(digits):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier().partial_fit(X[:700], y[:700], classes=np.arange(10))
    clf.partial_fit(X[700:], y[700:])
    ref = KNNVoteClassifier().fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X_test), ref.predict_proba(X_test))
    with pytest.raises(ValueError, match="labels not in classes"):
        KNNVoteClassifier().partial_fit(X[:10], y[:10], classes=[0])


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_partial_fit_matches_fit_for_every_index(digits, index):
    X, y, X_test, _ = digits
    params = {"nprobe": 1000} if index == "ivf" else None
    grown = KNNVoteClassifier(index=index, index_params=params, index_device="cpu")
    grown.fit(X[:1000], y[:1000]).partial_fit(X[1000:], y[1000:])
    _, ids = grown.kneighbors(X_test)
    assert ids.max() >= 1000  # the added items are found, under their new ids
    if index != "hnsw":  # exact search (IVF probing every list) finds the same
        np.testing.assert_array_equal(ids, KNNVoteClassifier().fit(X, y).kneighbors(X_test)[1])


@pytest.mark.parametrize("pruning", [None, "hard", "soft"])
def test_forget_is_exact_unlearning(digits, pruning):
    X, y, X_test, _ = digits
    rng = np.random.default_rng(0)
    forgotten = rng.choice(len(X), size=300, replace=False)
    remaining = np.setdiff1d(np.arange(len(X)), forgotten)
    # Forgetting every item of class 3 removes the class too.
    forgotten = np.union1d(forgotten, np.flatnonzero(y == 3))
    remaining = np.setdiff1d(remaining, np.flatnonzero(y == 3))
    clf = KNNVoteClassifier(n_neighbors=8).fit(X, y)
    scratch = KNNVoteClassifier(n_neighbors=8).fit(X[remaining], y[remaining])
    if pruning:
        clf.prune(pruning, threshold=2)
        scratch.prune(pruning, threshold=2)
    clf.forget(forgotten)
    np.testing.assert_array_equal(clf.classes_, scratch.classes_)
    assert 3 not in clf.classes_
    np.testing.assert_array_equal(clf.predict(X_test), scratch.predict(X_test))
    np.testing.assert_array_equal(clf.predict_proba(X_test), scratch.predict_proba(X_test))
    np.testing.assert_array_equal(clf.memory_.image.ids, remaining)
    # Neighbor ids stay those of the original rows.
    np.testing.assert_array_equal(clf.kneighbors(X_test)[1],
                                  remaining[scratch.kneighbors(X_test)[1]])


@pytest.mark.parametrize("index", ["ivf", "hnsw", "Flat"])
def test_forgotten_items_never_vote_with_approximate_indexes(digits, index):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier(index=index, index_device="cpu").fit(X, y)
    voters = np.unique(clf.kneighbors(X_test, return_distance=False))
    clf.forget(voters[:200])
    assert not np.isin(clf.kneighbors(X_test, return_distance=False), voters[:200]).any()
    assert not np.isin(clf.explain(X_test)["id"], voters[:200]).any()


def test_failed_forget_leaves_the_classifier_unchanged(digits):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier().fit(X, y).prune("soft")
    before, pred = _fitted_state(clf), clf.predict_proba(X_test)
    with pytest.raises(ValueError, match="Unknown memory ids: \\[99999\\]"):
        clf.forget([0, 99999])
    with pytest.raises(ValueError, match="without image items"):
        clf.forget(np.arange(len(X)))
    _assert_same_fitted_state(before, _fitted_state(clf))
    np.testing.assert_array_equal(pred, clf.predict_proba(X_test))


def test_set_memory_replaces_and_expands(digits):
    X, y, X_test, y_test = digits
    low, high = y < 5, y >= 5
    clf = KNNVoteClassifier().fit(X[low], y[low])
    clf.set_memory(Memory(X[high], y[high], image_ids=np.flatnonzero(high)))
    np.testing.assert_array_equal(clf.classes_, [5, 6, 7, 8, 9])
    assert clf.score(X_test[y_test >= 5], y_test[y_test >= 5]) > 0.95
    clf.set_memory(Memory(X[low], y[low], image_ids=np.flatnonzero(low)), mode="expand")
    np.testing.assert_array_equal(clf.classes_, np.arange(10))
    assert clf.score(X_test, y_test) > 0.95
    with pytest.raises(ValueError, match="ids in both memories"):
        clf.set_memory(Memory(X[:2], y[:2]), mode="expand")


def test_set_memory_on_an_unfitted_classifier_and_text_only_memory(digits):
    X, y, X_test, y_test = digits
    clf = KNNVoteClassifier().set_memory(Memory(X, y))
    assert clf.n_features_in_ == 64 and clf.score(X_test, y_test) > 0.95
    with pytest.raises(ValueError, match="no image items"):
        KNNVoteClassifier().set_memory(Memory(text_embeddings=X, text_labels=y))
    with pytest.raises(TypeError, match="needs a Memory"):
        KNNVoteClassifier().set_memory(X)


def test_memory_parameter_is_used_as_is(digits):
    X, y, X_test, y_test = digits
    memory = Memory(X, y)
    clf = KNNVoteClassifier(memory=memory).fit(X_test, y_test)
    assert clf.memory_ is memory
    with pytest.raises(ValueError, match="63 features"):
        KNNVoteClassifier(memory=memory).fit(X_test[:, 1:], y_test)


# -- pruning ------------------------------------------------------------------------


def test_pruning_finds_mislabelled_items_and_is_reversible(digits):
    X, y, X_test, y_test = digits
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flipped = rng.choice(len(y), size=len(y) // 5, replace=False)
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, flipped.size)) % 10
    clf = KNNVoteClassifier(n_neighbors=10).fit(X, noisy)
    plain = clf.predict(X_test)
    clf.prune("hard", threshold=5)
    report = clf.pruning_report()
    assert set(report.columns) == {"id", "label", "wrong_count", "weight", "excluded"}
    excluded = report.loc[report["excluded"], "id"].to_numpy()
    # 20% of the memory is mislabelled; over half of the excluded items are.
    assert len(excluded) > 100 and np.isin(excluded, flipped).mean() > 0.5
    clf.prune("soft")
    assert np.mean(clf.predict(X_test) == y_test) > np.mean(plain == y_test) + 0.005
    np.testing.assert_array_equal(clf.unprune().predict(X_test), plain)
    assert clf.pruning_ is None


def test_excluded_items_do_not_consume_a_rank():
    # Items on a circle; item 2 (class B) sits among class A items and is the
    # nearest neighbor of items 1 and 3: two wrong-neighbor counts.
    angles = np.array([0.2, 0.21, 0.214, 0.22, 0.23])
    X = np.c_[np.cos(angles), np.sin(angles)]
    clf = KNNVoteClassifier(n_neighbors=3).fit(X, ["A", "A", "B", "A", "A"])
    clf.prune("hard", threshold=2, n_neighbors=1)
    report = clf.pruning_report().set_index("id").sort_index()
    np.testing.assert_array_equal(report["wrong_count"], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(report["excluded"], [False, False, True, False, False])
    table = clf.explain(X[2:3])
    np.testing.assert_array_equal(table["id"], [2, 1, 3])
    np.testing.assert_allclose(table["weight"], [0.0, 1 / 2, 1 / 3])
    assert clf.predict(X[2:3])[0] == "A"


def test_all_excluded_neighbors_vote_unpruned():
    angles = np.array([0.1, 0.2, 1.5, 1.6, 1.7])
    X = np.c_[np.cos(angles), np.sin(angles)]
    clf = KNNVoteClassifier(n_neighbors=1).fit(X, ["B", "C", "A", "A", "A"])
    clf.prune("hard", threshold=1, n_neighbors=1)
    assert clf.pruning_report().set_index("id").loc[[0, 1], "excluded"].all()
    assert clf.predict([[1.0, 0.0]])[0] == "B"
    np.testing.assert_allclose(clf.explain([[1.0, 0.0]])["weight"], [0.5])


def test_soft_pruning_scales_votes():
    angles = np.array([0.1, 0.2, 0.3, 1.5])
    X = np.c_[np.cos(angles), np.sin(angles)]
    clf = KNNVoteClassifier(n_neighbors=2).fit(X, ["A", "B", "A", "B"])
    clf.prune("soft", n_neighbors=1)
    counts = clf.pruning_report().set_index("id").sort_index()["wrong_count"].to_numpy()
    table = clf.explain([[1.0, 0.0]])
    np.testing.assert_allclose(table["weight"], [1.75 / 2 / (1 + counts[0]),
                                                 1.75 / 3 / (1 + counts[1])])


def test_pruning_follows_memory_changes(digits):
    X, y, _, _ = digits
    clf = KNNVoteClassifier().fit(X[:1000], y[:1000]).prune("soft")
    clf.partial_fit(X[1000:], y[1000:])
    ref = KNNVoteClassifier().fit(X, y).prune("soft")
    pd.testing.assert_frame_equal(clf.pruning_report(), ref.pruning_report())


def test_pruning_argument_errors(digits):
    X, y, _, _ = digits
    clf = KNNVoteClassifier().fit(X, y)
    with pytest.raises(ValueError, match="Pruning is off"):
        clf.pruning_report()
    with pytest.raises(ValueError, match="mode must be"):
        clf.prune("medium")
    with pytest.raises(ValueError, match="threshold"):
        clf.prune("hard", threshold=0)


# -- explanations -------------------------------------------------------------------


def test_explain_lists_neighbors_with_their_metadata(digits):
    X, y, X_test, _ = digits
    meta = pd.DataFrame({"source": [f"digits row {i}" for i in range(len(X))]})
    clf = KNNVoteClassifier(n_neighbors=3).set_memory(Memory(X, y, image_metadata=meta))
    table = clf.explain(X_test[:4])
    assert list(table.columns) == ["query", "modality", "rank", "id", "label", "similarity",
                                   "weight", "source"]
    assert len(table) == 12
    np.testing.assert_array_equal(table["query"], np.repeat(np.arange(4), 3))
    assert (table["source"] == [f"digits row {i}" for i in table["id"]]).all()
    np.testing.assert_array_equal(table["id"].to_numpy().reshape(4, 3),
                                  clf.kneighbors(X_test[:4])[1])
    np.testing.assert_array_equal(table["label"], y[table["id"]])


# -- errors -------------------------------------------------------------------------


def test_clear_errors(digits):
    X, y, X_test, _ = digits
    with pytest.raises(NotFittedError):
        KNNVoteClassifier().predict(X_test)
    clf = KNNVoteClassifier(n_neighbors=5).fit(X[:4], y[:4])
    with pytest.raises(ValueError, match="n_neighbors=5 is larger than the memory, which "
                                         "holds 4"):
        clf.predict(X_test)
    clf = KNNVoteClassifier().fit(X, y)
    with pytest.raises(ValueError, match="X has 63 features, but KNNVoteClassifier is "
                                         "expecting 64"):
        clf.predict(X_test[:, 1:])
    bad = X_test[:2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(bad)
    with pytest.raises(ValueError, match="n_neighbors"):
        KNNVoteClassifier(n_neighbors=0).fit(X, y)
    with pytest.raises(ValueError, match="voting"):
        KNNVoteClassifier(voting="majority").fit(X, y)


def test_failed_partial_fit_leaves_the_classifier_unchanged(digits):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier().fit(X, y)
    before = _fitted_state(clf)
    with pytest.raises(ValueError, match="features"):
        clf.partial_fit(X_test[:, 1:], y[:len(X_test)])
    bad = X_test.copy()
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        clf.partial_fit(bad, y[:len(X_test)])
    with pytest.raises(ValueError, match="Label type mismatch"):
        clf.partial_fit(X_test[:2], ["a", "b"])
    _assert_same_fitted_state(before, _fitted_state(clf))


# -- persistence and model selection --------------------------------------------------


@pytest.mark.parametrize("index", ["flat", "Flat", "ivf", "ivfsq8", "ivfpq", "hnsw"])
def test_joblib_round_trip_gives_identical_predictions(digits, index, tmp_path):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier(index=index, index_device="cpu").fit(X, y).prune("soft")
    joblib.dump(clf, tmp_path / "clf.joblib")
    loaded = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(loaded.predict_proba(X_test), clf.predict_proba(X_test))
    loaded.forget([0, 1])  # the restored index is fully functional
    clf.forget([0, 1])
    np.testing.assert_array_equal(loaded.predict(X_test), clf.predict(X_test))
    assert pickle.loads(pickle.dumps(clf)).score(X_test, clf.predict(X_test)) == 1.0


def test_grid_search_in_a_pipeline(digits):
    X, y, _, _ = digits
    pipe = make_pipeline(FunctionTransformer(np.sqrt), KNNVoteClassifier())
    grid = GridSearchCV(
        pipe,
        {"knnvoteclassifier__n_neighbors": [1, 10],
         "knnvoteclassifier__voting": ["rank", "plurality"]},
        n_jobs=2, cv=3,
    ).fit(X, y)
    assert grid.best_score_ > 0.9
    assert len(grid.cv_results_["params"]) == 4


def test_grid_search_over_a_given_memory_does_not_copy_it():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, 256)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = rng.integers(0, 10, 20000)
    memory = Memory(X, y)
    X_query, y_query = X[:300] + 0.01, y[:300]
    assert np.shares_memory(memory.image.embeddings, X)
    tracemalloc.start()
    grid = GridSearchCV(KNNVoteClassifier(memory=memory),
                        {"n_neighbors": [1, 3, 5], "voting": ["rank", "softmax"]},
                        cv=2, n_jobs=1).fit(X_query, y_query)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Six candidates x two folds + refit: any copy would cost X.nbytes (20 MB) each.
    assert peak < 0.25 * X.nbytes
    assert grid.best_estimator_.memory_.image.embeddings is memory.image.embeddings
    assert clone(grid.best_estimator_).memory is memory


def test_failed_refit_leaves_a_fitted_classifier_usable(digits):
    X, y, X_test, _ = digits
    clf = KNNVoteClassifier(memory=Memory(X, y)).fit(X_test, None)
    expected = clf.predict(X_test)
    with pytest.raises(ValueError, match="memory holds 64-dimensional"):
        clf.fit(X_test[:, :4])
    assert clf.n_features_in_ == 64
    np.testing.assert_array_equal(clf.predict(X_test), expected)


def test_expand_with_clashing_ids_can_renumber():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)), np.repeat([0, 1, 2], 20)
    clf = KNNVoteClassifier(n_neighbors=3).fit(X[:40], y[:40])
    with pytest.raises(ValueError, match="reassign_ids=True"):
        clf.set_memory(Memory(X[40:], y[40:]), mode="expand")
    assert len(clf.memory_.image) == 40
    clf.set_memory(Memory(X[40:], y[40:]), mode="expand", reassign_ids=True)
    np.testing.assert_array_equal(clf.memory_.image.ids, np.arange(60))
    assert 2 in clf.classes_


def test_reassign_ids_only_with_expand():
    rng = np.random.default_rng(0)
    clf = KNNVoteClassifier(n_neighbors=3).fit(rng.normal(size=(20, 4)), np.arange(20) % 2)
    with pytest.raises(ValueError, match="mode='expand' only"):
        clf.set_memory(clf.memory_, reassign_ids=True)


def test_verbose_shows_progress_for_pruning_and_predicting_a_small_data_set(digits, capsys):
    X, y, _, _ = digits  # 1,400 items: progress is shown for small inputs too
    clf = KNNVoteClassifier(n_neighbors=5, verbose=1).fit(X, y)
    capsys.readouterr()
    clf.prune("soft")
    assert "searching" in capsys.readouterr().err
    quiet = clf.set_params(verbose=0).predict(X)
    assert "searching" not in capsys.readouterr().err
    loud = clf.set_params(verbose=1).predict(X)
    assert "searching" in capsys.readouterr().err
    np.testing.assert_array_equal(loud, quiet)
