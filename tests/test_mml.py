import pickle

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

import skmml.mml._classifier as mml
from skmml import Memory, MemoryModularClassifier
from skmml.mml import class_prototypes


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def _multimodal_memory(n_classes=8, d=16, seed=0):
    """Image and text items per class around shared class directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    img_y = np.repeat(np.arange(n_classes), 20)
    txt_y = np.repeat(np.arange(n_classes), 5)
    memory = Memory(
        centres[img_y] + 0.6 * rng.normal(size=(len(img_y), d)), img_y,
        text_embeddings=centres[txt_y] + 0.6 * rng.normal(size=(len(txt_y), d)),
        text_labels=txt_y,
    )
    q_y = np.repeat(np.arange(n_classes), 10)
    return memory, (centres[q_y] + 0.6 * rng.normal(size=(len(q_y), d))).astype(np.float32), q_y


def _weights(clf):
    return {b: {k: v.clone() for k, v in h.state_dict().items()} for b, h in clf.heads_.items()}


def test_untrained_zero_init_heads_are_the_prototype_classifier():
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(max_epochs=0, memory=memory, random_state=0).fit(X, y)
    assert clf.branches_ == ("image", "text")
    img_p, txt_p = class_prototypes(memory, clf.classes_)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    expected = 16.0 * (Xn @ img_p.T + Xn @ txt_p.T)
    np.testing.assert_allclose(clf.decision_function(X), expected, rtol=1e-5, atol=1e-5)
    proba = clf.predict_proba(X)
    e = np.exp(expected - expected.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, e / e.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_logits_follow_the_formula_for_trained_heads():
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(n_neighbors=5, max_epochs=3, memory=memory,
                                  random_state=0).fit(X, y)
    Xn = torch.from_numpy(X / np.linalg.norm(X, axis=1, keepdims=True))
    z = 0
    for branch, head in clf.heads_.items():
        bank = memory.bank(branch)
        sims = Xn.numpy() @ bank.embeddings.T
        rows = torch.from_numpy(np.argsort(-sims, axis=1, kind="stable")[:, :5])
        keys, values = head.project_memory(torch.from_numpy(bank.embeddings.copy()))
        with torch.no_grad():
            out = head(Xn, keys, values, rows)
        proto = torch.from_numpy(class_prototypes(memory, clf.classes_)[branch == "text"])
        z = z + torch.nn.functional.normalize(out, dim=1) @ proto.T
    np.testing.assert_allclose(clf.decision_function(X), 16.0 * z.numpy(), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("residual_init", ["default", "zero"])
def test_folded_prediction_equals_the_heads_computation(digits, residual_init):
    # Prediction folds the heads into the memory's cached projections
    # (FoldedHead); the training path runs the heads as written. Float32
    # predictions must be the same: probabilities to float32 rounding, classes exactly.
    X, y = digits
    clf = MemoryModularClassifier(n_neighbors=16, max_epochs=2, residual_init=residual_init,
                                  validation_fraction=None, heads_precision="float32",
                                  heads_device="cpu", random_state=0).fit(X[:500], y[:500])
    assert clf.best_epoch_ == 2 and not any(clf._state.identity.values())
    queries = X[500:1500]
    state, query_set = clf._queries(queries)
    with torch.no_grad():  # no state: the heads' own forward over projected neighbors
        reference = clf._logits(state.heads, query_set, np.arange(len(queries))).numpy()
    e = np.exp(reference - reference.max(axis=1, keepdims=True))
    proba = clf.predict_proba(queries)
    np.testing.assert_allclose(proba, e / e.sum(axis=1, keepdims=True), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(clf.predict(queries),
                                  clf.classes_[reference.argmax(axis=1)])
    # bfloat16 MLPs: close, and on these queries the same classes.
    half = clf.set_params(heads_precision="bfloat16").predict_proba(queries)
    assert np.abs(half - proba).max() < 0.02
    np.testing.assert_array_equal(half.argmax(axis=1), proba.argmax(axis=1))


def test_training_queries_never_retrieve_themselves(monkeypatch, digits):
    X, y = digits
    seen = []

    class Recording(mml._QuerySet):
        def __init__(self, X, codes, view, branches, estimator, labels=None, query_ids=None):
            super().__init__(X, codes, view, branches, estimator, labels, query_ids)
            if query_ids is not None:
                seen.append((self.neighbors["image"].ids, query_ids))

    monkeypatch.setattr(mml, "_QuerySet", Recording)
    MemoryModularClassifier(n_neighbors=8, max_epochs=1, random_state=0).fit(X[:300], y[:300])
    assert seen
    for neighbor_ids, query_ids in seen:
        assert neighbor_ids.shape[1] == 8
        assert not np.any(neighbor_ids == query_ids[:, None])


def test_set_memory_changes_classes_and_predictions_but_not_weights(digits):
    X, y = digits
    low, high = y < 5, y >= 5
    clf = MemoryModularClassifier(max_epochs=3, random_state=0).fit(X[low][:600], y[low][:600])
    before = _weights(clf)
    clf.set_memory(Memory(X[high][:500], y[high][:500]))
    np.testing.assert_array_equal(clf.classes_, [5, 6, 7, 8, 9])
    unseen_X, unseen_y = X[high][500:], y[high][500:]
    assert np.isin(clf.predict(unseen_X), [5, 6, 7, 8, 9]).all()
    assert clf.score(unseen_X, unseen_y) > 0.7  # 5 classes never trained on; chance is 0.2
    for branch, state in _weights(clf).items():
        for key, value in state.items():
            torch.testing.assert_close(value, before[branch][key])
    clf.set_memory(Memory(X[low][:600], y[low][:600], image_ids=np.arange(10**6, 10**6 + 600)),
                   mode="expand")
    np.testing.assert_array_equal(clf.classes_, np.arange(10))


def test_forget_updates_classes_and_prototypes(digits):
    X, y = digits
    clf = MemoryModularClassifier(max_epochs=1, random_state=0).fit(X[:500], y[:500])
    clf.forget(np.flatnonzero(y[:500] == 3))
    assert 3 not in clf.classes_
    assert 3 not in clf.predict(X[500:700])
    with pytest.raises(ValueError, match="Unknown memory ids"):
        clf.forget([10**9])


def test_validation_classes_select_the_epoch_and_never_lose_to_epoch_zero():
    memory, X, y = _multimodal_memory(n_classes=30, d=24, seed=1)
    clf = MemoryModularClassifier(max_epochs=4, memory=memory, validation_fraction=0.2,
                                  random_state=0).fit(X, y)
    history = clf.history_
    assert list(history["epoch"]) == [0, 1, 2, 3, 4]
    assert history["validation_accuracy"].notna().all()
    best = history.loc[clf.best_epoch_, "validation_accuracy"]
    base = history.loc[0, "validation_accuracy"]
    n_val = 6 * 10  # 6 held-out classes x 10 queries
    if clf.best_epoch_:
        assert best == history["validation_accuracy"].max()
        assert best > base + 2 * np.sqrt(base * (1 - base) / n_val)
    else:
        assert history["validation_accuracy"].max() <= base + 2 * np.sqrt(
            base * (1 - base) / n_val)


def test_too_few_classes_hold_out_queries_instead(digits):
    X, y = digits
    seen = y < 3  # three classes: none can be held out with two left to train on
    clf = MemoryModularClassifier(max_epochs=2, validation_fraction=0.25, random_state=0)
    clf.fit(X[seen], y[seen])
    assert clf.history_["validation_accuracy"].notna().all()
    assert list(clf.classes_) == [0, 1, 2]
    no_val = clone(clf).set_params(validation_fraction=None).fit(X[seen], y[seen])
    assert no_val.history_["validation_accuracy"].isna().all()
    assert no_val.best_epoch_ == 2


def test_identity_heads_skip_their_retrieval_and_match_the_full_computation(monkeypatch):
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(max_epochs=0, memory=memory, random_state=0).fit(X, y)
    assert clf._state.identity == {"image": True, "text": True}
    trained = MemoryModularClassifier(max_epochs=2, memory=memory, validation_fraction=None,
                                      random_state=0).fit(X[:5], y[:5])
    assert trained._state.identity == {"image": False, "text": False}
    full = clf._all_logits(*clf._queries(X, explain=True), attention={})
    searched = []
    monkeypatch.setattr(mml._View, "neighbors", lambda *args: searched.append(args))
    np.testing.assert_allclose(clf.decision_function(X), full, rtol=1e-5, atol=1e-5)
    assert not searched


def test_ablations_run(digits):
    memory, X, y = _multimodal_memory()
    for params in ({"retrieval": "none"}, {"unified_memory": True}, {"branches": "text"},
                   {"branches": "image", "prototypes": "mean"}, {"prototypes": "random"}):
        clf = MemoryModularClassifier(max_epochs=2, memory=memory, random_state=0, **params)
        assert clf.fit(X, y).score(X, y) > 0.8, params
    with pytest.raises(ValueError, match="needs text items"):
        MemoryModularClassifier(branches="both").fit(*digits)


def test_explain_reports_retrieved_items_and_attention():
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(n_neighbors=4, max_epochs=1, memory=memory,
                                  random_state=0).fit(X, y)
    table = clf.explain(X[:3])
    assert list(table.columns) == ["query", "modality", "rank", "id", "label", "similarity",
                                   "weight"]
    assert len(table) == 3 * 4 * 2
    sums = table.groupby(["query", "modality"])["weight"].sum()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    assert set(table.loc[table["modality"] == "text", "id"]) <= set(memory.text.ids)


def test_partial_fit_trains_further_without_touching_memory():
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(max_epochs=1, memory=memory, random_state=0).fit(X, y)
    before = _weights(clf)
    clf.partial_fit(X[:40], y[:40])
    assert clf.memory_ is memory
    changed = any(not torch.equal(v, before["image"][k])
                  for k, v in clf.heads_["image"].state_dict().items())
    assert changed


def test_joblib_round_trip_gives_identical_predictions(tmp_path):
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(max_epochs=2, memory=memory, random_state=0,
                                  index="hnsw").fit(X, y)
    joblib.dump(clf, tmp_path / "mml.joblib")
    loaded = joblib.load(tmp_path / "mml.joblib")
    np.testing.assert_array_equal(loaded.decision_function(X), clf.decision_function(X))


def test_training_is_reproducible_with_random_state():
    memory, X, y = _multimodal_memory()
    params = {"max_epochs": 2, "memory": memory, "validation_fraction": None}
    a = MemoryModularClassifier(random_state=3, **params).fit(X, y)
    b = MemoryModularClassifier(random_state=3, **params).fit(X, y)
    c = MemoryModularClassifier(random_state=4, **params).fit(X, y)
    # Equal up to float rounding (CPU kernels may split reductions differently).
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(a.decision_function(X), c.decision_function(X), atol=1e-3)


def test_grid_search_over_a_given_memory_shares_it():
    memory, X, y = _multimodal_memory()
    grid = GridSearchCV(
        MemoryModularClassifier(max_epochs=1, memory=memory, random_state=0),
        {"n_neighbors": [4, 8], "logit_scale": [8.0, 16.0]}, cv=2,
    ).fit(X, y)
    assert grid.best_estimator_.memory_.image.embeddings is memory.image.embeddings
    assert clone(grid.best_estimator_).memory is memory


def test_errors(digits):
    X, y = digits
    memory = Memory(X[:100], y[:100])
    with pytest.raises(NotFittedError):
        MemoryModularClassifier().predict(X[:2])
    with pytest.raises(ValueError, match="Classes of y not in the memory: \\[9\\]"):
        MemoryModularClassifier(memory=memory.drop_classes([9])).fit(X[:100], y[:100])
    clf = MemoryModularClassifier(max_epochs=1, memory=memory).fit(X[:100], y[:100])
    with pytest.raises(ValueError, match="Dimension mismatch"):
        clf.set_memory(Memory(X[:10, 1:], y[:10]))
    with pytest.raises(ValueError, match="X has 63 features"):
        clf.predict(X[:3, 1:])


def test_few_shot_support_sets_image_prototypes():
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(max_epochs=0, memory=memory, random_state=0).fit(X, y)
    shots = X[y == 2][:3]
    clf.set_memory(memory, support=(shots, [2, 2, 2]))
    mean = shots / np.linalg.norm(shots, axis=1, keepdims=True)
    mean = mean.mean(axis=0)
    np.testing.assert_allclose(clf._state.view.prototypes["image"][2], mean / np.linalg.norm(mean),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="not in the memory"):
        clf.set_memory(memory, support=(shots, [99, 99, 99]))


def test_episodic_training_restricts_retrieval_and_prototypes(monkeypatch):
    memory, X, y = _multimodal_memory(n_classes=10)
    episodes = []

    class Recording(mml._Episode):
        def neighbors(self, branch, X, k, query_ids=None):
            found, rows, bank = super().neighbors(branch, X, k, query_ids)
            codes = np.searchsorted(self.view.classes, found.labels.ravel())
            episodes.append((set(self.class_codes), set(codes)))
            return found, rows, bank

    monkeypatch.setattr(mml, "_Episode", Recording)
    clf = MemoryModularClassifier(max_epochs=2, episode_classes=3, memory=memory,
                                  random_state=0).fit(X, y)
    assert episodes
    for classes, retrieved in episodes:
        assert len(classes) == 3 and retrieved <= classes
    assert clf.score(X, y) > 0.8


def test_episodic_training_in_the_supervised_setting_never_retrieves_itself(monkeypatch,
                                                                             digits):
    X, y = digits
    checked = []

    class Checking(mml._Episode):
        def neighbors(self, branch, X, k, query_ids=None):
            found, rows, bank = super().neighbors(branch, X, k, query_ids)
            assert not np.any(bank.slot_ids[rows] == query_ids[:, None])
            checked.append(rows.shape)
            return found, rows, bank

    monkeypatch.setattr(mml, "_Episode", Checking)
    MemoryModularClassifier(n_neighbors=4, max_epochs=1, episode_classes=0.5,
                            random_state=0).fit(X[:300], y[:300])
    assert checked and all(shape[1] == 4 for shape in checked)


def test_missing_neighbors_of_an_approximate_index_get_no_attention():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(2000, 16)).astype(np.float32), rng.integers(0, 5, 2000)
    clf = MemoryModularClassifier(max_epochs=1, index="IVF64,Flat", index_params={"nprobe": 1},
                                  index_device="cpu", random_state=0).fit(X, y)
    assert (clf._queries(X[:200], explain=True)[1].slots["image"] < 0).any()
    table = clf.explain(X[:200])
    assert np.isfinite(table["similarity"]).all()
    np.testing.assert_allclose(table.groupby("query")["weight"].sum(), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to explain"):
        MemoryModularClassifier(max_epochs=0, retrieval="none").fit(X[:50], y[:50]).explain(X[:2])


def test_failed_refit_leaves_a_fitted_classifier_usable():
    memory, X, y = _multimodal_memory()
    clf = MemoryModularClassifier(max_epochs=1, memory=memory, random_state=0).fit(X, y)
    expected = clf.predict(X)
    with pytest.raises(ValueError, match="memory holds 16-dimensional"):
        clf.fit(X[:, :4], y)
    assert clf.n_features_in_ == 16
    np.testing.assert_array_equal(clf.predict(X), expected)


def test_expand_with_clashing_ids_can_renumber(digits):
    X, y = digits
    clf = MemoryModularClassifier(max_epochs=0).fit(X[:300][y[:300] < 5], y[:300][y[:300] < 5])
    new = Memory(X[300:600][y[300:600] >= 5], y[300:600][y[300:600] >= 5])
    with pytest.raises(ValueError, match="reassign_ids=True"):
        clf.set_memory(new, mode="expand")
    clf.set_memory(new, mode="expand", reassign_ids=True)
    np.testing.assert_array_equal(clf.classes_, np.arange(10))


def test_reassign_ids_only_with_expand_and_interrupted_partial_fit_changes_nothing(
        digits, monkeypatch):
    X, y = digits
    clf = MemoryModularClassifier(max_epochs=0, random_state=0).fit(X[:200], y[:200])
    with pytest.raises(ValueError, match="mode='expand' only"):
        clf.set_memory(clf.memory_, reassign_ids=True)
    assert clf._state.identity == {"image": True}
    before = _weights(clf)
    z_before = clf.decision_function(X[200:260])
    steps = []

    def failing_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        clf.set_params(batch_size=50).partial_fit(X[:200], y[:200])
    # The epoch trained a copy of the heads: interrupted, it published nothing.
    assert len(steps) == 2
    assert clf._state.identity == {"image": True}
    for branch, weights in _weights(clf).items():
        for name, value in weights.items():
            torch.testing.assert_close(value, before[branch][name], rtol=0, atol=0)
    np.testing.assert_array_equal(clf.decision_function(X[200:260]), z_before)
    clf.partial_fit(X[:200], y[:200])  # completed: the trained copy is published
    assert clf._state.identity == {"image": False}
    full = clf._all_logits(*clf._queries(X[200:260], explain=True), attention={})
    np.testing.assert_allclose(clf.decision_function(X[200:260]), full, rtol=1e-4, atol=1e-4)


def _scripted_accuracy(monkeypatch, scores):
    """Make the validation accuracy of successive epochs follow `scores`."""
    it = iter(scores)
    monkeypatch.setattr(MemoryModularClassifier, "_accuracy", lambda self, heads, val: next(it))


def test_training_stops_when_validation_accuracy_stops_improving(monkeypatch, capsys):
    memory, X, y = _multimodal_memory(n_classes=10)
    params = {"max_epochs": 10, "memory": memory, "random_state": 0, "n_neighbors": 4}
    # Epoch 2 is the best; epochs 3, 4, 5 do not improve on it: stop after epoch 5.
    _scripted_accuracy(monkeypatch, [0.5, 0.6, 0.9, 0.8, 0.9, 0.7] + [0.0] * 10)
    clf = MemoryModularClassifier(n_iter_no_change=3, verbose=1, **params).fit(X, y)
    assert clf.n_iter_ == 5
    assert list(clf.history_["epoch"]) == [0, 1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    assert "Stopped after epoch 5 of 10" in out
    # 0.9 beats 0.5 + 2 standard errors (20 queries: 0.5 + 0.224), 0.6 does not.
    assert clf.best_epoch_ == 2
    assert "Keeping epoch 2: validation accuracy 0.900" in out
    _scripted_accuracy(monkeypatch, [0.5] + [0.4] * 10)
    clf = MemoryModularClassifier(n_iter_no_change=None, **params).fit(X, y)
    assert clf.n_iter_ == 10 and clf.best_epoch_ == 0


def test_verbose_says_when_the_prototype_classifier_is_kept(monkeypatch, capsys):
    memory, X, y = _multimodal_memory(n_classes=10)
    _scripted_accuracy(monkeypatch, [0.8, 0.85, 0.7, 0.7])
    clf = MemoryModularClassifier(max_epochs=3, memory=memory, random_state=0, verbose=1,
                                  n_neighbors=4).fit(X, y)
    assert clf.best_epoch_ == 0 and clf._identity_heads()
    out = capsys.readouterr().out
    assert ("Trained heads did not beat the untrained heads on held-out classes (best "
            "trained validation accuracy 0.850 at epoch 1") in out
    assert "keeping the prototype classifier" in out


def test_untrained_heads_pickle_to_about_the_size_of_the_memory():
    rng = np.random.default_rng(0)
    d = 256  # a head holds 12 d^2 floats: 3 MiB per head here
    y = np.repeat(np.arange(8), 30)
    X = (rng.normal(size=(8, d))[y] + rng.normal(size=(len(y), d))).astype(np.float32)
    memory = Memory(X, y)
    clf = MemoryModularClassifier(max_epochs=0, memory=memory, random_state=0).fit(X, y)
    untrained = pickle.dumps(clf)
    head_bytes = 4 * sum(p.numel() for p in clf.heads_["image"].parameters())
    assert len(untrained) < 1.5 * memory.image.embeddings.nbytes + 100_000
    assert len(untrained) < head_bytes / 2
    loaded = pickle.loads(untrained)
    for name, p in clf.heads_["image"].state_dict().items():
        torch.testing.assert_close(loaded.heads_["image"].state_dict()[name], p, rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.decision_function(X), clf.decision_function(X))
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(loaded.explain(X[:3]), clf.explain(X[:3]))
    # Trained heads are stored in full and round-trip too.
    clf.partial_fit(X, y)
    trained = pickle.dumps(clf)
    assert len(trained) > head_bytes
    np.testing.assert_array_equal(pickle.loads(trained).decision_function(X),
                                  clf.decision_function(X))


def test_n_neighbors_larger_than_the_memory_is_the_same_error_in_both_classifiers(digits):
    from skmml import KNNVoteClassifier

    X, y = digits
    message = "n_neighbors=40 is larger than the memory, which holds 30 image items"
    small = Memory(X[:30], y[:30])
    # Refused at the call that would make the memory too small, which changes nothing.
    with pytest.raises(ValueError, match=message):
        KNNVoteClassifier(n_neighbors=40).set_memory(small)
    knn = KNNVoteClassifier(n_neighbors=40).fit(X[:30], y[:30])  # as scikit-learn's fit
    with pytest.raises(ValueError, match=message):
        knn.predict(X[:2])
    with pytest.raises(ValueError, match=message):
        MemoryModularClassifier(n_neighbors=40, memory=small, max_epochs=1).fit(X[:30], y[:30])
    clf = MemoryModularClassifier(n_neighbors=40, max_epochs=0).fit(X[:200], y[:200])
    with pytest.raises(ValueError, match=message):
        clf.set_memory(small)
    assert len(clf.memory_.image) == 200
    with pytest.raises(ValueError, match="holds 39 image items"):
        clf.forget(np.arange(161))
    assert len(clf.memory_.image) == 200
    # With memory=None a training query never retrieves itself: n_neighbors < n_samples.
    with pytest.raises(ValueError, match="holds 30 image items and a training query never"):
        MemoryModularClassifier(n_neighbors=30, max_epochs=0).fit(X[:30], y[:30])
    MemoryModularClassifier(n_neighbors=29, max_epochs=0).fit(X[:30], y[:30])


def test_a_single_class_is_a_clear_error_and_unknown_classes_point_to_expand(digits):
    X, y = digits
    with pytest.raises(ValueError, match="needs at least 2 classes .* holds one class: 3"):
        MemoryModularClassifier().fit(X[y == 3], y[y == 3])
    clf = MemoryModularClassifier(max_epochs=0).fit(X[y < 5], y[y < 5])
    with pytest.raises(ValueError, match=r"not in the memory: \[7\].*mode='expand'"):
        clf.partial_fit(X[y == 7], y[y == 7])


def test_verbose_shows_progress_while_retrieving_for_a_prediction(digits, capsys):
    X, y = digits
    clf = MemoryModularClassifier(max_epochs=1, validation_fraction=None, n_neighbors=5,
                                  verbose=1, random_state=0).fit(X[:600], y[:600])
    assert "training" in capsys.readouterr().err
    clf.explain(X[600:1000])  # retrieval for 400 queries
    assert "searching" in capsys.readouterr().err


def test_bfloat16_heads_predict_as_float32_heads_and_auto_follows_the_machine(monkeypatch):
    memory, X, y = _multimodal_memory(d=32)
    # "default" init: heads far from the identity, so bfloat16 rounding shows.
    clf = MemoryModularClassifier(n_neighbors=5, max_epochs=3, memory=memory, random_state=0,
                                  residual_init="default", validation_fraction=None,
                                  heads_device="cpu").fit(X, y)
    full = clf.set_params(heads_precision="float32").decision_function(X)
    half = clf.set_params(heads_precision="bfloat16").decision_function(X)
    # bfloat16 keeps 8 significant bits: logits agree to about 2^-8 of their scale.
    assert 0 < np.abs(half - full).max() < 0.05 * np.abs(full).max()
    np.testing.assert_array_equal(half.argmax(axis=1), full.argmax(axis=1))
    explained = clf.explain(X[:2])
    assert np.isfinite(explained["weight"]).all()
    # The cached key / value projections stay float32 whichever precision filled them.
    assert clf._state.projected
    assert all(t.dtype == torch.float32 for folded in clf._state.projected.values()
               for t in folded.memory_tensors())
    for gain, expected in ((0.02, full), (3.0, half)):
        monkeypatch.setattr(mml, "bf16_matmul_gain", lambda gain=gain: gain)
        np.testing.assert_array_equal(
            clf.set_params(heads_precision="auto").decision_function(X), expected)
