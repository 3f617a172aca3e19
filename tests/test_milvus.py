"""A memory held in Milvus (skmml.backends.milvus): Milvus Lite always, the real server when it starts.

The Lite tier checks the API contract in ``tmp_path``; the server tier (the
``milvus_server`` fixture, a real Milvus 2.3.5 standalone on 127.0.0.1 with
authentication on) checks what only a server shows: consistency of deletes
and inserts, authentication, and ids reserved by concurrent clients.
"""

import os
import pickle
import subprocess
import sys
import threading
import time

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

pymilvus = pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from skmml import KNNVoteClassifier, Memory, MilvusMemory  # noqa: E402


def _data(n=600, d=16, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    y = rng.integers(0, n_classes, n)
    X = (centres[y] + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
    return X, y, (rng.normal(size=(40, d)) + centres[rng.integers(0, n_classes, 40)])


def _memory(X, y, **kwargs):
    return Memory(X, y, image_metadata={"path": [f"img/{i}.jpg" for i in range(len(y))]},
                  **kwargs)


def _same_answers(clf, ref, Q):
    np.testing.assert_array_equal(clf.classes_, ref.classes_)
    np.testing.assert_array_equal(clf.kneighbors(Q)[1], ref.kneighbors(Q)[1])
    np.testing.assert_allclose(clf.predict_proba(Q), ref.predict_proba(Q), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(clf.predict(Q), ref.predict(Q))
    a, b = clf.explain(Q[:3]), ref.explain(Q[:3])
    pd.testing.assert_frame_equal(a[["query", "rank", "id", "label", "path"]],
                                  b[["query", "rank", "id", "label", "path"]])


@pytest.fixture
def lite(tmp_path):
    return str(tmp_path / "memory.db")


def _check_lifecycle(uri, token=None, collection="photos"):
    """Import, predict, add, forget, prune: equal to the in-RAM exact classifier throughout."""
    X, y, Q = _data()
    memory = _memory(X, y)
    mm = MilvusMemory.from_memory(memory, uri=uri, collection=collection, token=token,
                                  batch_size=256)
    clf = KNNVoteClassifier(n_neighbors=7).set_memory(mm)
    ref = KNNVoteClassifier(n_neighbors=7).set_memory(memory)
    _same_answers(clf, ref, Q)
    # partial_fit inserts (a new class too); forget deletes; both visible at once.
    X_new, _, _ = _data(n=20, seed=1)
    clf.partial_fit(X_new, np.full(20, 9))
    new_ids = np.setdiff1d(clf.kneighbors(X_new, 1)[1][:, 0], memory.ids)
    assert new_ids.size == 20 and new_ids.min() >= 600  # fresh ids after the imported ones
    ref.set_memory(ref.memory_.add(X_new, np.full(20, 9), ids=np.sort(new_ids)), mode="replace")
    _same_answers(clf, ref, Q)
    gone = np.unique(ref.kneighbors(Q[:5])[1])
    clf.forget(gone)
    ref.forget(gone)
    assert not np.isin(clf.kneighbors(Q)[1], gone).any()
    _same_answers(clf, ref, Q)
    for mode in ("soft", "hard"):
        clf.prune(mode)
        ref.prune(mode)
        _same_answers(clf, ref, Q)
        report, ref_report = clf.pruning_report(), ref.pruning_report()
        listed = ref_report[ref_report["wrong_count"] > 0]
        assert set(report["id"]) == set(listed["id"])
        merged = report.merge(listed, on="id")
        np.testing.assert_array_equal(merged["wrong_count_x"], merged["wrong_count_y"])
    clf.unprune()
    counts = ref.memory_.counts()
    pd.testing.assert_frame_equal(mm.counts(), counts)  # followed by this handle's writes
    pd.testing.assert_frame_equal(mm.refresh().counts(), counts)  # re-read from the collection
    return mm, clf


# -- Milvus Lite: the API contract ------------------------------------------------------


def test_lite_gives_the_in_ram_answers_through_the_whole_lifecycle(lite):
    mm, _ = _check_lifecycle(lite)
    assert len(mm) == mm.n_items("image") == mm.counts()["image"].sum() < 620


def test_both_modalities_round_trip_through_to_memory(lite):
    X, y, _ = _data(n=50)
    T, t, _ = _data(n=8, seed=3)
    memory = _memory(X, y, text_embeddings=T, text_labels=t[:8],
                     text_metadata={"caption": [f"text {i}" for i in range(8)]})
    mm = MilvusMemory.from_memory(memory, uri=lite, collection="both")
    back = mm.to_memory()
    for modality in ("image", "text"):
        a, b = memory.bank(modality), back.bank(modality)
        order = np.argsort(b.ids)
        np.testing.assert_array_equal(a.ids, b.ids[order])
        np.testing.assert_array_equal(a.labels, b.labels[order])
        np.testing.assert_allclose(a.embeddings, b.embeddings[order], atol=1e-7)
        pd.testing.assert_frame_equal(a.metadata, b.metadata.iloc[order].reset_index(drop=True))
    assert mm.counts().loc[:, "text"].sum() == 8 and mm.n_items("image") == 50
    text_neighbors = mm.search(T[:2] / np.linalg.norm(T[:2], axis=1, keepdims=True), 1,
                                modality="text")[1]
    np.testing.assert_array_equal(text_neighbors[:, 0], memory.text.ids[:2])


def test_string_labels_and_the_memory_parameter(lite):
    X, y, Q = _data()
    names = np.array(["cat", "dog", "emu", "owl"])[y]
    mm = MilvusMemory.from_memory(Memory(X, names), uri=lite, collection="named")
    clf = KNNVoteClassifier(n_neighbors=5, memory=mm).fit(X[:1])
    ref = KNNVoteClassifier(n_neighbors=5).fit(X, names)
    np.testing.assert_array_equal(clf.predict(Q), ref.predict(Q))
    assert clf.classes_.tolist() == ["cat", "dog", "emu", "owl"]
    with pytest.raises(ValueError, match="Label type mismatch"):
        clf.partial_fit(X[:1], [3])


def test_a_failed_insert_leaves_no_partial_items(lite, monkeypatch):
    X, y, Q = _data()
    mm = MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="atomic", batch_size=8)
    clf = KNNVoteClassifier(n_neighbors=5).set_memory(mm)
    before = clf.predict_proba(Q), clf.kneighbors(Q)[1], mm.counts()
    client = mm._client()
    real_insert, calls = client.insert, []

    def failing_insert(name, rows, **kwargs):
        calls.append(name)
        if name == "atomic" and calls.count("atomic") == 3:
            raise pymilvus.exceptions.MilvusException(message="disk full")
        return real_insert(name, rows, **kwargs)

    monkeypatch.setattr(client, "insert", failing_insert)
    with pytest.raises(RuntimeError, match="insert failed on Milvus collection 'atomic'.*"
                                           "disk full"):
        clf.partial_fit(X[:30], y[:30])  # 4 batches: the third fails
    monkeypatch.undo()
    np.testing.assert_array_equal(clf.predict_proba(Q), before[0])
    np.testing.assert_array_equal(clf.kneighbors(Q)[1], before[1])
    pd.testing.assert_frame_equal(mm.refresh().counts(), before[2])  # re-read: nothing left


def test_a_failed_import_leaves_no_collection(lite, monkeypatch):
    X, y, _ = _data()
    real = pymilvus.MilvusClient.insert
    calls = []

    def failing(self, name, rows, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, name, rows, **kwargs)

    monkeypatch.setattr(pymilvus.MilvusClient, "insert", failing)
    with pytest.raises(KeyboardInterrupt):
        MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="half", batch_size=100)
    monkeypatch.undo()
    assert not pymilvus.MilvusClient(lite).has_collection("half")


def test_forget_of_unknown_ids_deletes_nothing(lite):
    X, y, Q = _data()
    mm = MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="unknown")
    clf = KNNVoteClassifier(n_neighbors=5).set_memory(mm)
    with pytest.raises(ValueError, match=r"Unknown memory ids: \[100000\]"):
        clf.forget([3, 100000])
    assert mm.n_items() == 600 and 3 in clf.kneighbors(X[3:4], 1)[1]


def test_ids_reserved_by_two_handles_never_clash(lite):
    X, y, _ = _data()
    one = MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="ids")
    two = MilvusMemory(lite, "ids")
    got = [one.add(X[:5], y[:5]), two.add(X[:7], y[:7]), one.add(X[:3], y[:3])]
    ids = np.concatenate(got)
    assert np.unique(ids).size == 15 and ids.min() >= 600


def test_the_id_mark_lives_in_the_collection(lite):
    X, y, _ = _data(n=50)
    mm = MilvusMemory.from_memory(Memory(X, y).remove([49]), uri=lite, collection="mark")
    assert mm.next_id == 50  # the memory's mark, not one above its largest id
    mm.remove([48])
    mm.close()
    again = MilvusMemory(lite, "mark")  # a new handle reads the mark from the collection
    assert again.next_id == 50
    np.testing.assert_array_equal(again.add(X[:2], y[:2]), [50, 51])
    again.close()


def test_pickles_as_a_connection_description_and_reloads_in_a_new_process(lite, tmp_path):
    X, y, Q = _data()
    mm = MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="pickled",
                                  token="secret-token-123")
    clf = KNNVoteClassifier(n_neighbors=5).set_memory(mm).prune("soft")
    data = pickle.dumps(clf)
    assert b"secret-token-123" not in data and len(data) < 20_000  # no embeddings either
    assert "secret" not in repr(mm)
    assert clone(clf).memory is None and clone(KNNVoteClassifier(memory=mm)).memory is mm
    np.save(tmp_path / "q.npy", Q)
    np.save(tmp_path / "expected.npy", clf.predict_proba(Q))
    joblib.dump(clf, tmp_path / "clf.joblib")
    mm.close()  # Milvus Lite serves one process per file
    script = (
        "import joblib, numpy as np, sys; d = sys.argv[1]; "
        "clf = joblib.load(d + '/clf.joblib'); "
        "np.testing.assert_array_equal(clf.predict_proba(np.load(d + '/q.npy')), "
        "np.load(d + '/expected.npy')); print('same')"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "same", out.stderr[-2000:]


def test_clear_errors_name_the_uri_and_collection(lite, tmp_path):
    X, y, Q = _data()
    with pytest.raises(ValueError, match=f"collection 'nope' at {lite} does not exist.*"
                                         "from_memory"):
        MilvusMemory(lite, "nope")
    mm = MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="dims")
    clf = KNNVoteClassifier(n_neighbors=5).set_memory(mm)
    with pytest.raises(ValueError, match="16 features"):
        clf.predict(Q[:, :8])
    with pytest.raises(ValueError, match="Dimension mismatch.*16-dimensional"):
        mm.add(X[:2, :8], [0, 0])
    with pytest.raises(ValueError, match="already exists"):
        MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="dims")
    with pytest.raises(ValueError, match="largest top-k"):
        mm.search(Q, 20000)
    # A collection that skmml did not create, and one indexed for L2 distance.
    client = mm._client()
    schema = pymilvus.MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("embedding", pymilvus.DataType.FLOAT_VECTOR, dim=4)
    for name, metric, properties in (("foreign", "IP", {}),
                                     ("l2", "L2", {"skmml.layout": '{"format": '
                                      '"skmml.MilvusMemory", "labels": "integer", '
                                      '"id_base": 0, "version": 2}'})):
        index = client.prepare_index_params()
        index.add_index("embedding", index_type="FLAT", metric_type=metric)
        client.create_collection(name, schema=schema, index_params=index,
                                 properties=properties)
    with pytest.raises(ValueError, match="'foreign' at .* was not created by skmml"):
        MilvusMemory(lite, "foreign")
    with pytest.raises(ValueError, match="'l2' at .* metric L2; skmml needs IP"):
        MilvusMemory(lite, "l2")


def test_unreachable_server_fails_within_seconds():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"Milvus at http://127.0.0.1:{port}: nothing accepts connections"):
        MilvusMemory(f"http://127.0.0.1:{port}", "photos", timeout=3)
    assert time.perf_counter() - start < 10


def test_a_lite_file_held_by_another_process_says_how_to_share_it(lite):
    X, y, _ = _data(n=30)
    MilvusMemory.from_memory(Memory(X, y), uri=lite, collection="held").close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from skmml import MilvusMemory; "
         "mm = MilvusMemory(sys.argv[1], 'held'); print('open', flush=True); time.sleep(60)", lite],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ConnectionError, match="another process has this Milvus Lite file "
                                                  "open.*milvus-lite server"):
            MilvusMemory(lite, "held")
    finally:
        holder.kill()
        holder.wait()


# -- The real Milvus server ------------------------------------------------------------------


def _drop_all(uri, token):
    client = pymilvus.MilvusClient(uri, token=token)
    for name in client.list_collections():
        client.drop_collection(name)
    client.close()


def test_server_gives_the_in_ram_answers_and_unlearns_at_once(milvus_server):
    uri, token = milvus_server
    _drop_all(uri, token)
    mm, clf = _check_lifecycle(uri, token, collection="server_photos")
    # Deletes and inserts are visible to the very next search, every time.
    X, y, Q = _data()
    for round_ in range(5):
        victim = clf.kneighbors(Q[round_:round_ + 1], 1)[1][0, 0]
        clf.forget([victim])
        assert victim not in clf.kneighbors(Q[round_:round_ + 1], 3)[1]
        clf.partial_fit(Q[round_:round_ + 1], [5])
        nearest = clf.explain(Q[round_:round_ + 1]).iloc[0]
        assert nearest["label"] == 5 and nearest["similarity"] > 0.9999
    assert mm.consistency == "Strong"


def test_server_is_reachable_only_through_loopback(milvus_local_server):
    """No port of the server is reachable from another host: it has no other interface."""
    psutil = pytest.importorskip("psutil")
    server = milvus_local_server
    if not server.isolated:
        pytest.skip(f"no network namespace here: {server.why_not_isolated}")
    assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    with open(f"/proc/{server.pid}/net/dev") as f:
        interfaces = {line.split(":")[0].strip() for line in f.readlines()[2:]}
    assert interfaces == {"lo"}
    port = int(server.uri.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"]


def test_server_import_waits_until_the_index_covers_every_row(milvus_server):
    uri, token = milvus_server
    X, y, Q = _data(n=3000)
    mm = MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="ivf_wait", token=token,
                                  index_type="IVF_FLAT", index_params={"nlist": 16},
                                  search_params={"nprobe": 16})
    info = mm._client().describe_index("ivf_wait", "embedding")
    assert info["index_type"] == "IVF_FLAT" and info["indexed_rows"] == info["total_rows"] == 3000
    assert mm.wait_for_index(timeout=5) is True
    # nprobe = nlist: the IVF search is exhaustive, so it equals exact search.
    ref = KNNVoteClassifier(n_neighbors=5).fit(X, y)
    np.testing.assert_array_equal(KNNVoteClassifier(n_neighbors=5).set_memory(mm).kneighbors(Q)[1],
                                  ref.kneighbors(Q)[1])


def test_server_refuses_a_wrong_token(milvus_server):
    uri, _ = milvus_server
    with pytest.raises(ValueError, match=f"Milvus at {uri}.*refused the handshake: the token"):
        MilvusMemory(uri, "server_photos", token="root:wrong")


def test_server_ids_from_concurrent_clients_never_clash(milvus_server):
    uri, token = milvus_server
    X, y, _ = _data(n=100)
    MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="ids_race", token=token)
    got, errors = [], []

    def client(seed):
        try:
            mm = MilvusMemory(uri, "ids_race", token=token)
            for _ in range(5):
                got.append(mm.add(X[:10], y[:10]))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = np.concatenate(got)
    assert ids.size == 150 and np.unique(ids).size == 150 and ids.min() >= 100


def test_server_token_comes_from_the_environment_after_unpickling(milvus_server, monkeypatch):
    uri, token = milvus_server
    X, y, Q = _data(n=100)
    mm = MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="env_token", token=token)
    clf = KNNVoteClassifier(n_neighbors=3).set_memory(mm)
    data = pickle.dumps(clf)
    assert token.encode() not in data
    monkeypatch.setenv("MILVUS_TOKEN", token)
    np.testing.assert_array_equal(pickle.loads(data).predict(Q), clf.predict(Q))
    monkeypatch.delenv("MILVUS_TOKEN")
    loaded = pickle.loads(data)  # connects on first use, not on load
    with pytest.raises(ValueError, match="the token is wrong or missing"):
        loaded.predict(Q)
    assert os.environ.get("MILVUS_TOKEN") is None


# -- MemoryModularClassifier over a Milvus memory -----------------------------------------


def test_mml_predicts_over_milvus_as_over_the_same_memory_in_ram(lite):
    from skmml import MemoryModularClassifier

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32))
    y = rng.integers(0, 8, 800)
    X = (centres[y] + 0.7 * rng.normal(size=(800, 32))).astype(np.float32)
    t = np.repeat(np.arange(8), 5)
    T = (centres[t] + 0.5 * rng.normal(size=(40, 32))).astype(np.float32)
    memory = _memory(X[:600], y[:600], text_embeddings=T, text_labels=t)
    seen = y[600:] < 5
    # validation_fraction=None keeps the last epoch: trained, non-identity heads.
    mml = MemoryModularClassifier(n_neighbors=8, max_epochs=2, random_state=0,
                                  validation_fraction=None, heads_device="cpu",
                                  memory=memory.keep_classes(np.arange(5)))
    mml.fit(X[600:][seen], y[600:][seen])
    assert not any(mml._state.identity.values())
    mm = MilvusMemory.from_memory(memory, uri=lite, collection="mml")
    Q = X[700:]
    in_ram = mml.set_memory(memory).predict_proba(Q), mml.explain(Q[:2])
    over_milvus = mml.set_memory(mm).predict_proba(Q), mml.explain(Q[:2])
    np.testing.assert_allclose(over_milvus[0], in_ram[0], rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(over_milvus[1], in_ram[1], rtol=1e-5)
    assert mml.memory_ is mm and len(pickle.dumps(mml)) < 200_000  # heads, no embeddings
    # Forgetting and expanding go to the collection; prototypes follow.
    mml.forget([0, 1, 2])
    ref = clone_mml_over(mml, memory.remove([0, 1, 2]))
    np.testing.assert_allclose(mml.predict_proba(Q), ref.predict_proba(Q), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(TypeError, match="trains its heads on an in-RAM Memory"):
        mml.partial_fit(X[600:610], y[600:610])
    with pytest.raises(TypeError, match="trains its heads on an in-RAM Memory"):
        MemoryModularClassifier(memory=mm).fit(X[600:610], y[600:610])


def clone_mml_over(mml, memory):
    """`mml` (fitted) with another memory, leaving `mml` as it is."""
    copy = pickle.loads(pickle.dumps(mml))
    return copy.set_memory(memory)
