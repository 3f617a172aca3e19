import numpy as np
import pytest
from sklearn.preprocessing import FunctionTransformer

from skmml import ZeroShotCLIPClassifier
from skmml.memory import IMAGENET_TEMPLATES


def _letters(texts):
    return np.array([[t.count(c) + 0.1 for c in "abc"] for t in texts])


LETTERS = FunctionTransformer(_letters)


def test_prototypes_are_normalised_means_of_normalised_prompts():
    clf = ZeroShotCLIPClassifier(LETTERS, templates=["{}.", "a {}"]).fit(np.eye(3), [0, 1, 2])
    names = ["0", "1", "2"]
    for row, name in zip(clf.prototypes_, names):
        e = _letters([f"{name}.", f"a {name}"])
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        mean = e.mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-6)
    X = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    scores = Xn @ clf.prototypes_.T
    np.testing.assert_allclose(clf.decision_function(X), scores, rtol=1e-6)
    z = 100 * scores
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(clf.predict_proba(X), p / p.sum(axis=1, keepdims=True),
                               rtol=1e-5)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[scores.argmax(axis=1)])


def test_class_names_are_written_into_the_prompts():
    clf = ZeroShotCLIPClassifier(LETTERS, templates=["{}"], class_names={0: "aaa", 1: "ccc"})
    clf.fit(np.eye(3)[:2], [0, 1])
    np.testing.assert_array_equal(clf.predict([[1, 0, 0], [0, 0, 1]]), [0, 1])


def test_clip_pipeline_and_default_templates(tiny_clip):
    from skmml import CLIPTextEncoder

    name, checkpoint = tiny_clip
    text = CLIPTextEncoder(name, pretrained=checkpoint, device="cpu")
    clf = ZeroShotCLIPClassifier(text).fit(np.zeros((2, 16)), ["cat", "dog"])
    prompts = text.transform([t.format("cat") for t in IMAGENET_TEMPLATES])
    mean = prompts.mean(axis=0)
    np.testing.assert_allclose(clf.prototypes_[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_errors_keep_a_fitted_classifier():
    clf = ZeroShotCLIPClassifier(LETTERS, templates=["{}"]).fit(np.eye(3), [0, 1, 2])
    before = clf.prototypes_.copy()
    with pytest.raises(ValueError, match="3-dimensional embeddings, X has 4 features"):
        clf.fit(np.ones((3, 4)), [0, 1, 2])
    with pytest.raises(ValueError, match="one '{}'"):
        clf.set_params(templates=["no placeholder"]).fit(np.eye(3), [0, 1, 2])
    np.testing.assert_array_equal(clf.prototypes_, before)
    assert clf.n_features_in_ == 3


def test_what_the_skipped_estimator_checks_cover():
    """Pickling, unfitted use and bad input, at the encoder's dimension."""
    import pickle

    from sklearn.exceptions import NotFittedError

    clf = ZeroShotCLIPClassifier(LETTERS, templates=["{}"])
    with pytest.raises(NotFittedError):
        clf.predict(np.eye(3))
    assert clf.fit(np.eye(3), ["a", "b", "c"]) is clf
    restored = pickle.loads(pickle.dumps(clf))
    X = np.random.default_rng(1).random((6, 3))
    np.testing.assert_array_equal(restored.predict_proba(X), clf.predict_proba(X))
    with pytest.raises(ValueError, match="NaN"):
        clf.predict([[np.nan, 0, 1]])
    with pytest.raises(ValueError, match="X has 4 features"):
        clf.predict(np.ones((1, 4)))
    one = ZeroShotCLIPClassifier(LETTERS, templates=["{}"]).fit(np.eye(3)[:1], ["a"])
    np.testing.assert_array_equal(one.predict(X), ["a"] * 6)


def test_templates_need_exactly_one_placeholder():
    with pytest.raises(ValueError, match="one '{}'"):
        ZeroShotCLIPClassifier(LETTERS, templates=["{} and {}"]).fit(np.eye(3), [0, 1, 2])
