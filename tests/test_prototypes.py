import numpy as np
import pytest

from skmml import Memory
from skmml.mml import class_prototypes


def _unit(*rows):
    a = np.array(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_consensus_picks_the_items_that_agree_with_the_other_modality():
    # Class "a": images e1, e2 and an off-class e3; texts near e1 and e2.
    images = _unit([1, 0, 0], [0.9, 0.1, 0], [0, 0, 1])
    texts = _unit([1, 0.1, 0], [0.8, 0.2, 0.1])
    memory = Memory(images, ["a"] * 3, text_embeddings=texts, text_labels=["a"] * 2)
    image_p, text_p = class_prototypes(memory, np.array(["a"]), max_items=2)
    sim = images @ texts.T
    top = np.argsort(-sim.sum(axis=1))[:2]
    assert set(top) == {0, 1}
    expected = images[top].mean(axis=0)
    np.testing.assert_allclose(image_p[0], expected / np.linalg.norm(expected), rtol=1e-6)
    text_mean = texts.mean(axis=0)  # M = min(2, 2): both texts
    np.testing.assert_allclose(text_p[0], text_mean / np.linalg.norm(text_mean), rtol=1e-6)


def test_m_is_min_of_items_and_max_items_and_mean_mode_uses_all():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 5))
    texts = rng.normal(size=(3, 5))
    memory = Memory(images, [0] * 20, text_embeddings=texts, text_labels=[0] * 3)
    consensus, _ = class_prototypes(memory, np.array([0]), max_items=16)
    bank = memory.image.embeddings
    scores = (bank @ memory.text.embeddings.T).sum(axis=1)
    mean16 = bank[np.argsort(-scores, kind="stable")[:16]].mean(axis=0)
    np.testing.assert_allclose(consensus[0], mean16 / np.linalg.norm(mean16), rtol=1e-5)
    mean, _ = class_prototypes(memory, np.array([0]), mode="mean")
    full = bank.mean(axis=0)
    np.testing.assert_allclose(mean[0], full / np.linalg.norm(full), rtol=1e-5)


def test_random_mode_is_seeded_and_differs_from_consensus():
    rng = np.random.default_rng(0)
    memory = Memory(rng.normal(size=(40, 6)), [0] * 40, text_embeddings=rng.normal(size=(4, 6)),
                    text_labels=[0] * 4)
    a, _ = class_prototypes(memory, np.array([0]), mode="random", random_state=1)
    b, _ = class_prototypes(memory, np.array([0]), mode="random", random_state=1)
    c, _ = class_prototypes(memory, np.array([0]), mode="consensus")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_a_class_with_one_modality_gets_the_mean_of_all_its_items_for_both():
    # Hand-computed: the mean of (1, 0), (0.6, 0.8), (0, 1) is (1.6, 1.8) / 3,
    # normalised (0.6644, 0.7474); a top-2 "most central" rule would drop an item.
    items = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    memory = Memory(items, [0, 0, 0])
    image_p, text_p = class_prototypes(memory, np.array([0]), max_items=2)
    expected = np.array([1.6, 1.8]) / np.hypot(1.6, 1.8)
    np.testing.assert_allclose(image_p[0], expected, rtol=1e-6)
    np.testing.assert_allclose(image_p[0], [0.66436384, 0.74740932], rtol=1e-6)
    np.testing.assert_array_equal(image_p, text_p)


def test_text_only_classes_and_mixed_memories_follow_their_own_rule():
    # Class 0 has images and texts (consensus top-1); class 1 texts only (mean).
    images = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    texts = np.array([[0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    memory = Memory(images, [0, 0], text_embeddings=texts, text_labels=[0, 1, 1])
    image_p, text_p = class_prototypes(memory, np.array([0, 1]), max_items=1)
    # Class 0: image row sums against its one text (0.8, 0.6): image 0 wins;
    # its text prototype is its only text.
    np.testing.assert_allclose(image_p[0], [1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(text_p[0], [0.8, 0.6, 0], atol=1e-7)
    # Class 1: mean of both texts (0, 0.6, 1.8) / 2, normalised, in both branches.
    expected = np.array([0.0, 0.6, 1.8]) / np.hypot(0.6, 1.8)
    np.testing.assert_allclose(text_p[1], expected, rtol=1e-6)
    np.testing.assert_allclose(image_p[1], expected, rtol=1e-6)


def test_few_shot_support_sets_the_image_prototype():
    rng = np.random.default_rng(0)
    memory = Memory(rng.normal(size=(6, 3)), [0, 0, 0, 1, 1, 1])
    shots = _unit([1, 0, 0], [0, 1, 0])
    image_p, _ = class_prototypes(memory, np.array([0, 1]), support=(shots, np.array([1, 1])))
    expected = shots.mean(axis=0)
    np.testing.assert_allclose(image_p[1], expected / np.linalg.norm(expected), rtol=1e-6)


def test_errors():
    memory = Memory(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match="mode must be"):
        class_prototypes(memory, np.array([0]), mode="median")
    with pytest.raises(ValueError, match="Class 7 has no items"):
        class_prototypes(memory, np.array([0, 7]))
