"""Distributed prediction: every skmml estimator under dask_ml's ParallelPostFit.

A ``LocalCluster`` of two worker processes bound to 127.0.0.1; predictions
must equal the in-process ones. With a Milvus memory, the workers connect to
the server themselves: the estimator they receive holds no embeddings.
"""

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits

pytest.importorskip("dask_ml")
distributed = pytest.importorskip("distributed")
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
from dask_ml.wrappers import ParallelPostFit  # noqa: E402

from skmml import (  # noqa: E402
    CLIPImageEncoder,
    CLIPTextEncoder,
    KNNVoteClassifier,
    Memory,
    MemoryModularClassifier,
    ZeroShotCLIPClassifier,
)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1,
                                       processes=True, dashboard_address=None)
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:1200].astype(np.float32), y[:1200], X[1200:].astype(np.float32)


def _same_under_dask(estimator, X, methods=("predict", "predict_proba")):
    wrapped = ParallelPostFit(estimator)
    chunks = da.from_array(X, chunks=(100, X.shape[1]))
    for method in methods:
        got = getattr(wrapped, method)(chunks).compute()
        np.testing.assert_array_equal(got, getattr(estimator, method)(X), err_msg=method)


def test_knn_and_mml_predict_the_same_on_the_cluster(client, digits):
    X, y, Q = digits
    knn = KNNVoteClassifier(n_neighbors=10).fit(X, y).prune("soft")
    _same_under_dask(knn, Q)
    keep = y < 7
    mml = MemoryModularClassifier(n_neighbors=8, max_epochs=2, random_state=0,
                                  heads_device="cpu").fit(X[keep], y[keep])
    mml.set_memory(Memory(X, y))  # classes it never trained on
    _same_under_dask(mml, Q)


def test_workers_connect_to_a_milvus_server_instead_of_receiving_the_memory(
        client, digits, milvus_server):
    from skmml import MilvusMemory

    uri, token = milvus_server
    X, y, Q = digits
    mm = MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="dask_digits",
                                  token=token)
    knn = KNNVoteClassifier(n_neighbors=10).set_memory(mm)
    assert len(pickle.dumps(knn)) < 20_000  # the connection description, not 1,200 items
    client.run(_set_token, token)  # the token travels by environment, never pickled
    _same_under_dask(knn, Q)


def _set_token(token):
    import os

    os.environ["MILVUS_TOKEN"] = token


def _register(config_folder):
    import open_clip

    open_clip.add_model_config(config_folder)


def test_encoders_map_over_image_paths_and_zero_shot_predicts(client, tiny_clip,
                                                              image_folder):
    name, checkpoint = tiny_clip
    client.run(_register, str(checkpoint).replace("tiny_clip.pt", "skmml-tiny-clip.json"))
    paths = sorted(str(p) for p in image_folder.glob("*/*.png"))
    encoder = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu")
    expected = encoder.transform(paths)
    bag = db.from_sequence(paths, npartitions=3)
    got = np.concatenate(bag.map_partitions(lambda part: [encoder.transform(list(part))])
                         .compute())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    as_array = da.from_array(np.array(paths, dtype=object), chunks=5)
    transformed = as_array.map_blocks(encoder.transform, new_axis=1, dtype=np.float32,
                                      chunks=(5, expected.shape[1]))
    np.testing.assert_allclose(transformed.compute(), expected, rtol=1e-5, atol=1e-6)
    labels = np.array([p.split("/")[-2] for p in paths])
    zero_shot = ZeroShotCLIPClassifier(
        CLIPTextEncoder(name, pretrained=checkpoint, device="cpu"), templates=["a {}."]
    ).fit(expected, labels)
    _same_under_dask(zero_shot, expected)
