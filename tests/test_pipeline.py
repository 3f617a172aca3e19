"""The practitioner's path: raw image files through a Pipeline into a skmml classifier.

Memory operations on raw inputs (skmml.pipeline), the files' paths kept as the
memory's ``source``, each file encoded once per process across folds and
candidates, DataFrame columns of paths, sparse and all-zero inputs, and the
errors a user meets on the way.
"""

import pickle
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline as sklearn_make_pipeline
from sklearn.preprocessing import FunctionTransformer

import skmml.encoders._encoders as encoders
from skmml import CLIPImageEncoder, KNNVoteClassifier, Memory, MemoryModularClassifier
from skmml import ZeroEmbeddingWarning
from skmml.encoders import (Embeddings, clear_embedding_cache, embedding_cache_info,
                            set_embedding_cache)
from skmml.pipeline import Pipeline, make_pipeline

pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def files(image_folder):
    return sorted(str(p) for p in image_folder.glob("*/*.png"))


@pytest.fixture
def labels(files):
    return [f.split("/")[-2] for f in files]


@pytest.fixture
def encoder(tiny_clip):
    name, checkpoint = tiny_clip
    return CLIPImageEncoder(name, pretrained=checkpoint, device="cpu", num_workers=0)


@pytest.fixture(autouse=True)
def empty_cache():
    clear_embedding_cache()
    yield
    clear_embedding_cache()


@pytest.fixture
def counted(monkeypatch):
    """Number of images the encoders actually run their model on."""
    calls = []
    real = encoders._ImageEncoder._encode
    monkeypatch.setattr(encoders._ImageEncoder, "_encode",
                        lambda self, items, *at: calls.append(len(items)) or real(self, items,
                                                                                  *at))
    return calls


# -- memory operations through the pipeline ----------------------------------------------


def test_memory_operations_take_raw_files(encoder, files, labels):
    pipe = make_pipeline(encoder, KNNVoteClassifier(n_neighbors=3)).fit(files[:9], labels[:9])
    assert isinstance(pipe, Pipeline)
    pipe.partial_fit(files[9:], labels[9:])
    np.testing.assert_array_equal(pipe[-1].added_ids_, [9, 10, 11])
    np.testing.assert_array_equal(pipe.predict(files), pipe[-1].predict(encoder.transform(files)))
    table = pipe.explain(files[:2])
    pd.testing.assert_frame_equal(table, pipe[-1].explain(encoder.transform(files[:2])))
    assert pipe.forget([0, 10]) is pipe
    assert 0 not in pipe.memory_.image.ids and 10 not in pipe.memory_.image.ids
    ids = pipe.kneighbors(files[:1], return_distance=False)
    assert 0 not in ids
    staged = list(pipe.staged_predict(files[:4]))
    np.testing.assert_array_equal(staged[-1], pipe.predict(files[:4]))
    assert pipe.prune().pruning_report().shape[0] == 10
    pipe.unprune()
    other = Memory.from_folder(files[0].rsplit("/", 2)[0], encoder)
    pipe.set_memory(other)
    assert pipe.memory_ is other


def test_memory_operations_follow_the_final_step(encoder, files, labels):
    pipe = make_pipeline(encoder, MemoryModularClassifier(n_neighbors=2, max_epochs=1,
                                                          random_state=0))
    pipe.fit(files, labels)
    assert hasattr(pipe, "explain") and hasattr(pipe, "partial_fit")
    assert not hasattr(pipe, "prune")  # MML has no pruning
    assert not hasattr(make_pipeline(encoder, FunctionTransformer()), "forget")
    pipe.partial_fit(files[:6], labels[:6])  # one epoch of the heads
    assert set(pipe.explain(files[:1])["modality"]) == {"image"}


def test_pipeline_clones_and_pickles_with_its_memory(encoder, files, labels):
    from sklearn.base import clone

    pipe = make_pipeline(encoder, KNNVoteClassifier(n_neighbors=3)).fit(files, labels)
    assert isinstance(clone(pipe), Pipeline)
    again = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(again.predict(files), pipe.predict(files))
    pd.testing.assert_frame_equal(again.explain(files[:1]), pipe.explain(files[:1]))


# -- sources kept ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: KNNVoteClassifier(n_neighbors=3),
    lambda: MemoryModularClassifier(n_neighbors=2, max_epochs=1, random_state=0),
])
def test_fit_keeps_the_files_as_sources(encoder, files, labels, make):
    pipe = sklearn_make_pipeline(encoder, make()).fit(files, labels)  # scikit-learn's own
    assert pipe[-1].memory_.image.metadata["source"].tolist() == files
    table = pipe[-1].explain(encoder.transform(files[:1]))
    assert set(table["source"]) <= set(files)
    # Each neighbor's source is the file whose embedding it is.
    embedded = dict(zip(files, encoder.transform(files)))
    for source, item in zip(table["source"], table["id"]):
        np.testing.assert_allclose(embedded[source], pipe[-1].memory_.image.embeddings[item],
                                   atol=1e-6)


def test_partial_fit_adds_sources_and_arrays_have_none(encoder, files, labels):
    clf = KNNVoteClassifier(n_neighbors=3).fit(encoder.transform(files[:6]), labels[:6])
    clf.partial_fit(encoder.transform(files[6:]), labels[6:])
    clf.partial_fit(np.asarray(encoder.transform(files[:1])), labels[:1])  # a plain array
    sources = clf.memory_.image.metadata["source"].tolist()
    assert sources[:12] == files and pd.isna(sources[12])


def test_embeddings_carry_sources_only_as_the_encoder_gave_them(encoder, files):
    Z = encoder.transform([files[0], np.zeros((8, 8), np.uint8), files[1]])
    assert isinstance(Z, Embeddings) and Z.sources == [files[0], None, files[1]]
    assert Z[:2].sources is None and (Z * 1).__class__ is np.ndarray
    assert pickle.loads(pickle.dumps(Z)).sources == Z.sources
    assert type(encoder.transform(np.zeros((2, 8, 8), np.uint8))) is np.ndarray


# -- encode once ------------------------------------------------------------------------


def test_cross_validation_and_grid_search_encode_each_file_once(encoder, files, labels,
                                                                counted):
    pipe = make_pipeline(encoder, KNNVoteClassifier(n_neighbors=2))
    scores = cross_val_score(pipe, files, labels, cv=3)
    assert sum(counted) == len(files)
    search = GridSearchCV(pipe, {"knnvoteclassifier__n_neighbors": [1, 2, 3, 4]}, cv=3)
    search.fit(files, labels)
    assert sum(counted) == len(files)  # every file was already in the process's cache
    info = embedding_cache_info()
    assert info["items"] == len(files) and info["hits"] > 10 * len(files)
    # Same answers as with no cache at all.
    set_embedding_cache(0)
    try:
        np.testing.assert_array_equal(cross_val_score(pipe, files, labels, cv=3), scores)
    finally:
        set_embedding_cache(512 * 2**20)


def test_cache_is_bounded_and_follows_file_changes(encoder, files, tmp_path, counted):
    width = encoder.transform(files[:1]).shape[1]
    clear_embedding_cache()
    set_embedding_cache(3 * 4 * width)  # room for three rows
    try:
        encoder.transform(files[:5])
        info = embedding_cache_info()
        assert info["items"] == 3 and info["nbytes"] == 3 * 4 * width
        counted.clear()
        encoder.transform(files[2:5])  # the three most recent: no encoding
        assert counted == []
        encoder.transform(files[:1])
        assert counted == [1]
    finally:
        set_embedding_cache(512 * 2**20)
    copy = tmp_path / "a.png"
    shutil.copy(files[0], copy)
    before = encoder.transform([str(copy)])
    shutil.copy(files[11], copy)
    import os
    os.utime(copy, ns=(0, 10**18))
    after = encoder.transform([str(copy)])
    np.testing.assert_allclose(after, encoder.transform(files[11:12]), atol=1e-6)
    assert not np.allclose(before, after)
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 0"):
        set_embedding_cache(-1)


def test_random_weights_are_cached_per_loaded_model(tiny_clip, files, counted):
    name, _ = tiny_clip
    encoder = CLIPImageEncoder(name, pretrained=None, device="cpu", num_workers=0)
    first = encoder.transform(files[:2])
    np.testing.assert_array_equal(encoder.transform(files[:2]), first)
    assert sum(counted) == 2
    encoders.clear_model_cache()  # new random weights: the old embeddings must go
    assert embedding_cache_info()["items"] == 0
    assert not np.allclose(encoder.transform(files[:2]), first)


# -- inputs ------------------------------------------------------------------------------


def test_a_dataframe_or_series_column_of_paths(encoder, files, labels):
    pipe = make_pipeline(encoder, KNNVoteClassifier(n_neighbors=2))
    expected = cross_val_score(pipe, files, labels, cv=3)
    frame = pd.DataFrame({"path": files})
    np.testing.assert_array_equal(cross_val_score(pipe, frame, labels, cv=3), expected)
    np.testing.assert_array_equal(cross_val_score(pipe, frame["path"], labels, cv=3), expected)
    with pytest.raises(ValueError, match="one column of images, got a DataFrame with 2"):
        encoder.transform(pd.DataFrame({"path": files, "other": files}))


@pytest.mark.parametrize("make", [
    lambda: KNNVoteClassifier(n_neighbors=3),
    lambda: MemoryModularClassifier(n_neighbors=3, max_epochs=2, random_state=0),
])
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "dok"])
def test_sparse_input_equals_dense(make, fmt):
    rng = np.random.default_rng(0)
    X = rng.random((60, 12)) * (rng.random((60, 12)) < 0.4) + np.eye(60, 12)
    y = np.arange(60) % 3
    dense = make().fit(X[:45], y[:45])
    sparse = make().fit(sp.csr_matrix(X[:45]).asformat(fmt), y[:45])
    np.testing.assert_array_equal(sparse.memory_.image.embeddings, dense.memory_.image.embeddings)
    queries = sp.csr_matrix(X[45:]).asformat(fmt)
    np.testing.assert_allclose(sparse.predict_proba(queries), dense.predict_proba(X[45:]))


def test_all_zero_rows_have_similarity_zero_with_a_warning():
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = ["red apple", "green apple", "red car", "fast car", "", "blue sky"]
    y = ["fruit", "fruit", "car", "car", "none", "sky"]
    X = TfidfVectorizer().fit_transform(docs)  # the empty document is an all-zero row
    with pytest.warns(ZeroEmbeddingWarning, match="1 all-zero rows .*row 4"):
        clf = KNNVoteClassifier(n_neighbors=6, voting="plurality").fit(X, y)
    table = clf.explain(X[:1])
    assert table.loc[table["label"] == "none", "similarity"].item() == 0.0
    with pytest.warns(ZeroEmbeddingWarning, match="X has 1 all-zero rows"):
        sims = clf.explain(X[4:5])["similarity"]
    assert (sims == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.predict(X[:4])  # no zero row: no warning


def test_a_memory_with_a_zero_row_saves_and_loads(tmp_path):
    with pytest.warns(ZeroEmbeddingWarning):
        memory = Memory(np.float32([[0, 0], [3, 4], [1, 0]]), [0, 1, 1])
    memory.save(tmp_path / "m.npz")
    again = Memory.load(tmp_path / "m.npz")
    np.testing.assert_allclose(again.image.embeddings, [[0, 0], [0.6, 0.8], [1, 0]], rtol=1e-6)


# -- errors --------------------------------------------------------------------------------


def test_an_unreadable_file_is_named_by_its_place_in_the_input(encoder, files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    encoder.transform(files[:7])  # cached: the broken file is the only one encoded
    with pytest.raises(ValueError, match=r"Image 7 \('.*broken.png'\) could not be read"):
        encoder.transform(files[:7] + [str(bad)])


def test_a_pickled_pipeline_whose_weights_moved_says_how_to_fix_it(tiny_clip, files, labels,
                                                                    tmp_path):
    name, checkpoint = tiny_clip
    weights = tmp_path / "weights.pt"
    shutil.copy(checkpoint, weights)
    encoder = CLIPImageEncoder(name, pretrained=str(weights), device="cpu", num_workers=0)
    pipe = make_pipeline(encoder, KNNVoteClassifier(n_neighbors=2)).fit(files, labels)
    blob, expected = pickle.dumps(pipe), pipe.predict(files)
    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    encoders.clear_model_cache()
    again = pickle.loads(blob)
    with pytest.raises(FileNotFoundError, match=r"weights\.pt' of CLIPImageEncoder does not "
                       r"exist.*pipe\.set_params\(clipimageencoder__pretrained=NEW_PATH\)"):
        again.predict(files[:1])
    again.set_params(clipimageencoder__pretrained=str(moved))
    np.testing.assert_array_equal(again.predict(files), expected)
