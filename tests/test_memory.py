import copy
import json

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


def test_all_zero_rows_are_kept_with_a_warning_and_queries_of_zeros_stay_zero():
    from skmml import ZeroEmbeddingWarning

    with pytest.warns(ZeroEmbeddingWarning, match="image embeddings has 1 all-zero rows .*row 0"):
        memory = Memory(np.array([[0.0, 0.0], [3.0, 4.0]]), [0, 1])
    np.testing.assert_array_equal(memory.image.embeddings[0], [0, 0])
    from skmml._validation import l2_normalize

    q = l2_normalize(np.float32([[0, 0], [3, 4]]))
    np.testing.assert_array_equal(q, np.float32([[0, 0], [0.6, 0.8]]))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e19, 1e25, 1e37])
def test_normalisation_is_exact_for_any_finite_nonzero_row(scale):
    # float32 squares overflow above ~1.8e19 and underflow below ~1e-19.
    rows = np.float32([[3, 4, 0], [1, 1, 1], [0, 0, -2]]) * np.float32(scale)
    memory = Memory(rows, [0, 1, 2])
    expected = np.float32([[0.6, 0.8, 0], [3 ** -0.5] * 3, [0, 0, -1]])
    np.testing.assert_allclose(memory.image.embeddings, expected, rtol=1e-6, atol=1e-7)


def test_negative_ids_are_an_error():
    with pytest.raises(ValueError, match="negative values .*-1 marks a missing neighbor"):
        Memory(np.eye(3), [0, 1, 2], image_ids=[0, -1, 2])


def test_ids_default_to_rows_then_continue_from_a_mark_that_never_goes_back():
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
    assert after_removal.next_id == 7  # forgotten ids are never given again
    np.testing.assert_array_equal(after_removal.add(rng.normal(size=(1, 4)), [2]).image.ids,
                                  [0, 1, 2, 7])


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


def _saved_arrays(tmp_path):
    """A valid saved memory (with metadata) as a dict of its archive's arrays."""
    rng = np.random.default_rng(0)
    memory = Memory(rng.normal(size=(6, 4)), ["cat", "cat", "dog", "dog", "owl", "owl"],
                    text_embeddings=rng.normal(size=(2, 4)), text_labels=["cat", "dog"],
                    image_metadata={"source": [f"{i}.png" for i in range(6)]})
    memory.save(tmp_path / "valid.npz")
    with np.load(tmp_path / "valid.npz") as archive:
        return {key: archive[key] for key in archive.files}


def _header(arrays):
    return json.loads(arrays["header"].tobytes())


def _with_header(arrays, header):
    return {**arrays, "header": np.frombuffer(json.dumps(header).encode(), np.uint8)}


def _malformed(arrays):
    """(name, writer) of malformed files; each writer writes the file at a path."""
    a = arrays

    def npz(**changes):
        def write(path):
            np.savez(path, **{k: v for k, v in {**a, **changes}.items() if v is not None})
        return write

    def raw(data):
        return lambda path: path.write_bytes(data)

    header = _header(a)
    truncating = json.loads(json.dumps(header))
    truncating["banks"]["image"]["labels_dtype"] = "<U2"
    overflowing = {**a, "image_labels": np.arange(6) * 1000}
    overflow_header = json.loads(json.dumps(header))
    overflow_header["banks"]["image"]["labels_dtype"] = "|i1"
    overflow_header["banks"]["text"]["labels_dtype"] = "|i1"
    overflowing["text_labels"] = np.array([0, 1000])
    emb = a["image_embeddings"]

    def bomb(path):
        # A valid archive whose embeddings member declares 2 GiB of zeros,
        # deflated to a few MiB: streamed, never held in memory here.
        import zipfile

        np.savez(path, **{k: v for k, v in a.items() if k != "image_embeddings"})
        n = 2**29  # float32 values: 2 GiB
        header = {"descr": "<f4", "fortran_order": False, "shape": (n // 4, 4)}
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            with archive.open("image_embeddings.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                chunk = bytes(2**24)
                for _ in range(4 * n // len(chunk)):
                    member.write(chunk)

    def objects(path):
        np.savez(path, **{**a, "image_labels": np.array(["cat", 1] * 3, dtype=object)})

    return {
        "not an archive": raw(b"this is not a zip file at all"),
        "empty file": raw(b""),
        "truncated archive": lambda p: (npz()(p), p.write_bytes(p.read_bytes()[:300])),
        "missing ids": npz(image_ids=None),
        "missing header": npz(header=None),
        "header not JSON": npz(header=np.frombuffer(b"{not json", np.uint8)),
        "not a Memory": lambda p: _with_header_file(p, a, {"format": "other"}),
        "future version": lambda p: _with_header_file(p, a, {**header, "version": 99}),
        "labels shorter than embeddings": npz(image_labels=a["image_labels"][:4]),
        "NaN embeddings": npz(image_embeddings=np.where(np.eye(6, 4, dtype=bool), np.nan,
                                                        emb).astype(np.float32)),
        "non-unit embeddings": npz(image_embeddings=emb * np.float32(2)),
        "a row neither unit nor zero": npz(image_embeddings=np.vstack(
            [np.full((1, 4), 0.1, np.float32), emb[1:]])),
        "float64 embeddings": npz(image_embeddings=emb.astype(np.float64)),
        "1-D embeddings": npz(image_embeddings=emb.ravel()),
        "duplicate ids": npz(image_ids=np.array([0, 1, 2, 3, 4, 4])),
        "negative ids": npz(image_ids=np.array([-1, 1, 2, 3, 4, 5])),
        "ids shared by both banks": npz(text_ids=np.array([0, 7])),
        "metadata of wrong length": lambda p: _metadata_rows(p, a, 5),
        "labels_dtype truncates labels": lambda p: _with_header_file(p, a, truncating),
        "labels_dtype overflows labels": lambda p: _with_header_file(p, overflowing,
                                                                     overflow_header),
        "dimension differs between banks": npz(text_embeddings=np.eye(2, 3, dtype=np.float32)),
        "Python objects inside": objects,
        "extra member": npz(extra=np.zeros(3)),
        "compressed bomb": bomb,
    }


def _with_header_file(path, arrays, header):
    np.savez(path, **_with_header(arrays, header))


def _metadata_rows(path, arrays, n):
    import io

    buffer = io.BytesIO()
    pd.DataFrame({"source": [f"{i}.png" for i in range(n)]}).to_parquet(buffer, index=False)
    np.savez(path, **{**arrays, "image_metadata": np.frombuffer(buffer.getvalue(), np.uint8)})


def test_every_malformed_file_is_a_value_error_naming_file_and_problem(tmp_path):
    arrays = _saved_arrays(tmp_path)
    assert Memory.load(tmp_path / "valid.npz").image.metadata["source"].tolist()[0] == "0.png"
    cases = _malformed(arrays)
    rejected = 0
    for name, write in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        write(path)
        with pytest.raises(ValueError, match="Cannot load a Memory from .*" + path.name) as info:
            Memory.load(path)
            pytest.fail(f"{name}: loaded without error")
        assert len(str(info.value)) > len(f"Cannot load a Memory from {path}: "), name
        rejected += 1
    assert rejected == len(cases) == 24


def test_the_bomb_is_refused_before_decompression_and_max_bytes_can_allow_it(tmp_path):
    arrays = _saved_arrays(tmp_path)
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **arrays)
    Memory.load(path)  # a compressed genuine memory is well under the default limit
    with pytest.raises(ValueError, match="declare more than max_bytes=1000 bytes"):
        Memory.load(path, max_bytes=1000)


def test_interrupted_or_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    import skmml.memory._io as memory_module

    path = tmp_path / "memory.npz"
    old = Memory(np.eye(3), [0, 1, 2])
    old.save(path)
    new = Memory(np.eye(4), [0, 1, 2, 3])
    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def failing_write(f, arrays, header):
            f.write(b"PK\x03\x04 partial")  # a partial write, then the failure
            raise error

        monkeypatch.setattr(memory_module, "_write_archive", failing_write)
        with pytest.raises(type(error)):
            new.save(path)
        monkeypatch.undo()
        assert len(Memory.load(path).image) == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.npz"]
    new.save(path)
    assert len(Memory.load(path).image) == 4


def test_saved_files_get_the_usual_mode_and_long_paths_load_by_default(tmp_path):
    import os

    path = tmp_path / "m.npz"
    umask = os.umask(0o022)
    try:
        # Repetitive metadata (long file paths) that Parquet compresses many times.
        n = 20_000
        paths = [f"/data/{'nested/' * 60}image_{i:06d}.png" for i in range(n)]
        Memory(np.ones((n, 2)) + np.arange(n)[:, None] * [0, 1e-3], np.zeros(n, int),
               image_metadata={"source": paths}).save(path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert Memory.load(path).image.metadata["source"].iloc[-1] == paths[-1]


def test_the_id_mark_survives_save_load_and_pickling(tmp_path):
    import pickle

    memory = Memory(np.eye(4), [0, 1, 2, 3]).remove([3])
    assert memory.next_id == 4
    memory.save(tmp_path / "m.npz")
    for copy in (Memory.load(tmp_path / "m.npz"), pickle.loads(pickle.dumps(memory))):
        assert copy.next_id == 4  # the forgotten id 3 is never given again
        np.testing.assert_array_equal(copy.add(np.eye(4)[:1], [0]).image.ids, [0, 1, 2, 4])
