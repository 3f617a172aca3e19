import copy

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from skmml import KNNVoteClassifier, Memory


def _memory(rng, n=6, d=4, labels=None, **kwargs):
    labels = ["a", "a", "b", "b", "c", "c"][:n] if labels is None else labels
    return Memory(rng.normal(size=(n, d)), labels, **kwargs)


def _state(memory):
    """Everything a memory holds, for comparing before and after."""
    return [
        (b.embeddings.copy(), b.labels.copy(), b.ids.copy(), b.metadata.copy())
        for b in (memory.image, memory.text)
    ]


def _assert_same_state(a, b):
    for (ea, la, ia, ma), (eb, lb, ib, mb) in zip(a, b):
        np.testing.assert_array_equal(ea, eb)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(ia, ib)
        pd.testing.assert_frame_equal(ma, mb)


def test_embeddings_are_l2_normalised_float32():
    rng = np.random.default_rng(0)
    memory = _memory(rng)
    emb = memory.image.embeddings
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    assert not emb.flags.writeable


def test_unit_norm_float32_input_is_kept_without_copy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    memory = Memory(X, np.arange(10) % 2)
    assert np.shares_memory(memory.image.embeddings, X)


def test_zero_rows_stay_zero():
    memory = Memory(np.array([[0.0, 0.0], [3.0, 4.0]]), [0, 1])
    np.testing.assert_array_equal(memory.image.embeddings, np.float32([[0, 0], [0.6, 0.8]]))


def test_ids_default_to_rows_then_continue_after_max():
    rng = np.random.default_rng(0)
    memory = Memory(
        rng.normal(size=(3, 4)), [0, 1, 1], text_embeddings=rng.normal(size=(2, 4)),
        text_labels=[0, 1],
    )
    np.testing.assert_array_equal(memory.image.ids, [0, 1, 2])
    np.testing.assert_array_equal(memory.text.ids, [3, 4])
    bigger = memory.add(rng.normal(size=(2, 4)), [1, 2])
    np.testing.assert_array_equal(bigger.image.ids, [0, 1, 2, 5, 6])
    after_removal = bigger.remove([6, 5])
    np.testing.assert_array_equal(after_removal.add(rng.normal(size=(1, 4)), [2]).image.ids,
                                  [0, 1, 2, 5])


def test_given_ids_are_kept_and_next_ids_follow_the_largest():
    rng = np.random.default_rng(0)
    memory = Memory(rng.normal(size=(3, 4)), [0, 1, 1], image_ids=[10, 40, 20])
    np.testing.assert_array_equal(memory.add(rng.normal(size=(2, 4)), [0, 0]).image.ids,
                                  [10, 40, 20, 41, 42])


def test_remove_keeps_order_ids_and_metadata_aligned():
    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"path": [f"img{i}.png" for i in range(6)]})
    memory = _memory(rng, image_metadata=meta)
    kept = memory.remove([1, 4])
    np.testing.assert_array_equal(kept.image.ids, [0, 2, 3, 5])
    np.testing.assert_array_equal(kept.image.labels, ["a", "b", "b", "c"])
    assert kept.image.metadata["path"].tolist() == ["img0.png", "img2.png", "img3.png",
                                                    "img5.png"]
    np.testing.assert_array_equal(kept.image.embeddings, memory.image.embeddings[[0, 2, 3, 5]])


def test_remove_spans_both_modalities():
    rng = np.random.default_rng(0)
    memory = _memory(rng, text_embeddings=rng.normal(size=(2, 4)), text_labels=["a", "b"])
    kept = memory.remove([0, 7])
    np.testing.assert_array_equal(kept.image.ids, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(kept.text.ids, [6])


def test_keep_and_drop_classes():
    rng = np.random.default_rng(0)
    memory = _memory(rng, text_embeddings=rng.normal(size=(3, 4)), text_labels=["a", "c", "c"])
    kept = memory.keep_classes(["a"])
    np.testing.assert_array_equal(kept.classes, ["a"])
    np.testing.assert_array_equal(kept.image.ids, [0, 1])
    np.testing.assert_array_equal(kept.text.ids, [6])
    dropped = memory.drop_classes(["a", "b"])
    np.testing.assert_array_equal(dropped.classes, ["c"])
    assert len(dropped) == 4


def test_expand_combines_and_reassigns_ids_on_request():
    rng = np.random.default_rng(0)
    a = _memory(rng)
    b = Memory(rng.normal(size=(2, 4)), ["d", "e"])
    with pytest.raises(ValueError, match="ids in both memories"):
        a.expand(b)
    both = a.expand(b, reassign_ids=True)
    np.testing.assert_array_equal(both.classes, ["a", "b", "c", "d", "e"])
    np.testing.assert_array_equal(both.image.ids, [0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(both.image.embeddings[6:], b.image.embeddings)


def test_counts_per_class_and_modality():
    rng = np.random.default_rng(0)
    memory = _memory(rng, text_embeddings=rng.normal(size=(1, 4)), text_labels=["c"])
    counts = memory.counts()
    assert counts.loc["a", "image"] == 2 and counts.loc["a", "text"] == 0
    assert counts.loc["c", "text"] == 1


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 0, 1, 1, 2, 2]),
        np.array([0.5, 0.5, 1.5, 1.5, 2.5, 2.5]),
        np.array(["cat", "cat", "dog", "dog", "emu", "emu"]),
        np.array(["cat", "cat", "dog", "dog", "emu", "emu"], dtype=object),
        np.array([True, True, False, False, True, False]),
    ],
)
def test_save_load_round_trips_exactly(tmp_path, labels):
    rng = np.random.default_rng(0)
    meta = pd.DataFrame({
        "path": [f"/data/{i}.jpg" for i in range(6)],
        "source": pd.Categorical(["web", "web", "wiki", "web", "wiki", "web"]),
        "score": rng.normal(size=6),
        "when": pd.date_range("2024-01-01", periods=6, freq="D"),
    })
    memory = Memory(
        rng.normal(size=(6, 5)), labels, image_ids=[3, 9, 4, 100, 7, 8], image_metadata=meta,
        text_embeddings=rng.normal(size=(2, 5)), text_labels=labels[:2],
        text_metadata={"caption": ["a photo", "a drawing"]},
    )
    path = tmp_path / "memory.npz"
    memory.save(path)
    loaded = Memory.load(path)
    _assert_same_state(_state(memory), _state(loaded))
    assert loaded.image.labels.dtype == memory.image.labels.dtype
    assert loaded.image.labels.dtype.kind == ("U" if labels.dtype.kind in "UO" else
                                              labels.dtype.kind)
    # The archive holds no pickle: it loads with pickling disabled.
    with np.load(path, allow_pickle=False) as archive:
        assert "image_embeddings" in archive.files


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, header=np.frombuffer(b'{"format": "other"}', np.uint8))
    with pytest.raises(ValueError, match="not a saved skmml Memory"):
        Memory.load(path)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, r: m.add(r.normal(size=(2, 3)), [0, 1]), "dimension 3"),
        (lambda m, r: m.add(np.array([[np.nan, 1, 2, 3]]), ["a"]), "NaN"),
        (lambda m, r: m.add(np.array([[np.inf, 1, 2, 3]]), ["a"]), "infinity"),
        (lambda m, r: m.add(np.empty((0, 4)), []), "0 sample"),
        (lambda m, r: m.add(r.normal(size=(2, 4)), ["a"]), "1 entries but there are 2"),
        (lambda m, r: m.add(r.normal(size=(2, 4)), ["a", "a"], ids=[7, 7]), "duplicates"),
        (lambda m, r: m.add(r.normal(size=(1, 4)), ["a"], ids=[2]), "already in the memory"),
        (lambda m, r: m.add(r.normal(size=(1, 4)), [3]), "Label type mismatch"),
        (lambda m, r: m.add(r.normal(size=(2, 4)), np.array(["a", 1], dtype=object)),
         "mixes strings and numbers"),
        (lambda m, r: m.add(r.normal(size=(4,)), ["a"]), "Expected 2D array"),
        (lambda m, r: m.remove([0, 99]), "Unknown memory ids: \\[99\\]"),
        (lambda m, r: m.keep_classes(["zebra"]), "Classes not in the memory"),
        (lambda m, r: m.expand(Memory(r.normal(size=(1, 5)), ["z"]), reassign_ids=True),
         "Dimension mismatch"),
        (lambda m, r: m.add(r.normal(size=(1, 4)), ["a"], metadata={"x": [1, 2]}),
         "metadata has 2 rows"),
    ],
)
def test_bad_input_raises_and_leaves_memory_unchanged(call, message):
    rng = np.random.default_rng(0)
    memory = _memory(rng)
    before = _state(memory)
    with pytest.raises(ValueError, match=message):
        call(memory, rng)
    _assert_same_state(before, _state(memory))


def test_text_items_must_share_the_image_dimension():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        Memory(rng.normal(size=(2, 4)), [0, 1], text_embeddings=rng.normal(size=(2, 3)),
               text_labels=[0, 1])


def test_copies_share_the_embeddings():
    rng = np.random.default_rng(0)
    memory = _memory(rng)
    assert copy.deepcopy(memory) is memory
    clf = KNNVoteClassifier(n_neighbors=2, memory=memory)
    assert clone(clf).memory is memory


def test_pickle_round_trip_keeps_arrays_read_only(tmp_path):
    rng = np.random.default_rng(0)
    memory = _memory(rng)
    joblib.dump(memory, tmp_path / "m.joblib")
    loaded = joblib.load(tmp_path / "m.joblib")
    _assert_same_state(_state(memory), _state(loaded))
    assert not loaded.image.embeddings.flags.writeable
