"""Faults as they happen: killed and hung processes, racing clients, damaged files.

Every fault is real: processes are SIGKILLed or SIGSTOPped (a writer, a Milvus
Lite client, the Milvus server itself, which is then restarted on its data
folder), sockets never answer, clients race in threads and in processes, and
saved files are damaged byte by byte. What is checked is what a user relies
on: a new handle sees each write wholly or not at all, a hung server fails
within about the timeout with a ConnectionError, two writers of the same ids
never both succeed, a damaged file is a ValueError naming it, and nothing is
left behind.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import numpy as np
import pytest

from skmml import KNNVoteClassifier, Memory

# -- files --------------------------------------------------------------------------------


def _saved(tmp_path):
    rng = np.random.default_rng(0)
    memory = Memory(rng.normal(size=(6, 4)), ["cat", "cat", "dog", "dog", "owl", "owl"],
                    image_metadata={"source": [f"{i}.png" for i in range(6)]})
    path = tmp_path / "memory.npz"
    memory.save(path)
    return memory, path


def _rezip(src, dst, change):
    """Copy the archive `src` to `dst`, members passed through `change(name, data)`."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            data = change(info.filename, a.read(info))
            if data is not None:
                b.writestr(info, data)


def _patched_bytes(src, dst, offset_of, value):
    raw = bytearray(src.read_bytes())
    offset_of(raw, value)
    dst.write_bytes(bytes(raw))


def _set_flag(raw, bit):  # a general-purpose flag bit of every entry
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            raw[i + at] |= bit
            start = i + 4


def _set_method(raw, method):  # the compression method of every entry
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            raw[i + at:i + at + 2] = method.to_bytes(2, "little")
            start = i + 4


def _damaged_files(tmp_path, path):
    """(name, damaged file) pairs, each a fault seen in the field or in fuzzing."""
    cases = []

    def case(name):
        return tmp_path / f"{name}.npz"

    for bit in (0x01, 0x20, 0x40):  # encrypted, patched data, strong encryption
        _patched_bytes(path, case(f"flag{bit}"), _set_flag, bit)
        cases.append((f"flag bit {bit:#x}", case(f"flag{bit}")))
    for method in (1, 12, 99):  # shrunk, bzip2 over stored data, AES
        _patched_bytes(path, case(f"method{method}"), _set_method, method)
        cases.append((f"compression method {method}", case(f"method{method}")))

    def broken_header(name, data):
        if name == "image_embeddings.npy":
            return data.replace(b"'descr'", b"'descr\"\x00(", 1)
        return data

    _rezip(path, case("npy_header"), broken_header)
    cases.append(("broken npy header", case("npy_header")))
    _rezip(path, case("no_metadata"),
           lambda name, data: None if name == "image_metadata.npy" else data)
    cases.append(("missing member", case("no_metadata")))

    def extra(name, data):
        return data

    _rezip(path, case("extra"), extra)
    with zipfile.ZipFile(case("extra"), "a") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3))
        archive.writestr("notes.npy", buffer.getvalue())
    cases.append(("extra member", case("extra")))

    def same_shape(name, data):
        if name == "image_embeddings.npy":
            array = np.load(io.BytesIO(data))
            buffer = io.BytesIO()
            np.save(buffer, array[::-1].copy())  # other rows, same shape, still unit norm
            return buffer.getvalue()
        return data

    _rezip(path, case("swapped"), same_shape)
    cases.append(("member replaced by one of the same shape", case("swapped")))
    return cases


def test_every_damaged_file_is_a_value_error_naming_the_file(tmp_path):
    memory, path = _saved(tmp_path)
    for name, damaged in _damaged_files(tmp_path, path):
        with pytest.raises(ValueError, match=f"Cannot load a Memory from {damaged}") as info:
            Memory.load(damaged)
        assert type(info.value) is ValueError, name
    assert len(Memory.load(path)) == len(memory)


def test_the_header_lists_each_member_with_its_digest(tmp_path):
    _, path = _saved(tmp_path)
    with np.load(path) as archive:
        header = json.loads(archive["header"].tobytes())
        members = set(archive.files) - {"header"}
    assert header["version"] == 3 and set(header["members"]) == members
    assert all(len(m["sha256"]) == 64 and m["bytes"] > 0 for m in header["members"].values())


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from skmml import Memory
    memory = Memory(np.random.default_rng(0).normal(size=(40000, 128)), np.arange(40000) % 5)
    print("ready", flush=True)
    while True:
        memory.save(sys.argv[1])
""")


def test_kills_during_save_leave_a_good_file_and_the_next_save_removes_their_temp_files(
        tmp_path):
    path = tmp_path / "memory.npz"
    Memory(np.eye(3), [0, 1, 2]).save(path)
    rng = np.random.default_rng(0)
    for _ in range(10):
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        assert len(Memory.load(path)) in (3, 40000)  # the old file or a whole new one
    Memory(np.eye(4), [0, 1, 2, 3]).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.npz"]
    assert len(Memory.load(path)) == 4


def test_a_live_saves_temp_file_is_left_alone(tmp_path):
    from skmml.memory._io import _tmp_name, remove_stale_tmp

    path = tmp_path / "memory.npz"
    live = _tmp_name(path)  # named by this (live) process
    open(live, "wb").close()
    assert remove_stale_tmp(path) == 0 and os.path.exists(live)


# -- Milvus Lite ----------------------------------------------------------------------------

pymilvus = pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from skmml import MilvusMemory  # noqa: E402


def _data(n, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 4, n)


#: A writer that reports each insert into the memory's collection, then partial_fits.
_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import pymilvus
    from skmml import KNNVoteClassifier, MilvusMemory
    uri, collection, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = pymilvus.MilvusClient.insert
    def insert(self, name, rows, **kwargs):
        result = real(self, name, rows, **kwargs)
        if name == collection:
            print("inserted", len(rows), flush=True)
        return result
    pymilvus.MilvusClient.insert = insert
    mm = MilvusMemory(uri, collection, batch_size=256)
    clf = KNNVoteClassifier(n_neighbors=3).set_memory(mm)
    rng = np.random.default_rng(1)
    clf.partial_fit(rng.normal(size=(n, 16)).astype(np.float32), rng.integers(0, 4, n))
    print("done", flush=True)
""")


def _kill_mid_batch(uri, collection, n, after, env=None):
    """Run the writer of `n` items; SIGKILL it once `after` of its inserts landed."""
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, uri, collection, str(n)],
                              stdout=subprocess.PIPE, text=True, env=env)
    seen = 0
    try:
        while seen < after:
            line = writer.stdout.readline()
            assert line.startswith("inserted"), f"the writer stopped: {line!r}"
            seen += 1
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    return seen


def _raw_rows(mm):
    """Rows in the collection, visible or not (what Milvus itself counts)."""
    return mm._count(mm.collection)


def test_a_lite_client_killed_mid_batch_leaves_nothing_visible(tmp_path):
    uri = str(tmp_path / "memory.db")
    X, y = _data(500)
    MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="photos").close()
    for round_ in range(3):
        _kill_mid_batch(uri, "photos", 3000, after=1 + round_ % 3)
        mm = MilvusMemory(uri, "photos")
        assert mm.n_items() == 500 and len(mm.to_memory()) == 500
        assert _raw_rows(mm) > 500  # the dead write's rows are there, hidden
        found = mm.search(X[:5] / np.linalg.norm(X[:5], axis=1, keepdims=True), 3)[1]
        assert found.max() < 500
        report = mm.recover()
        assert report["rows_removed"] > 0 and len(report["rolled_back"]) == 1
        assert _raw_rows(mm) == 500
        mm.close()
    mm = MilvusMemory(uri, "photos")
    assert mm.add(X[:5], y[:5]).tolist() == list(range(500 + 3 * 3000, 500 + 3 * 3000 + 5))
    mm.close()


def test_a_commit_log_too_long_to_read_whole_is_an_error_not_a_wrong_snapshot(
        tmp_path, monkeypatch):
    import skmml.backends.milvus._log as log

    X, y = _data(50)
    mm = MilvusMemory.from_memory(Memory(X, y), uri=str(tmp_path / "m.db"), collection="log")
    mm.add(X[:2], y[:2])
    monkeypatch.setattr(log, "_MAX_RECORDS", 1)
    with pytest.raises(RuntimeError, match="commit log .* holds 1 records or more"):
        mm.search(X[:1] / np.linalg.norm(X[:1]), 3)
    monkeypatch.undo()
    assert mm.n_items() == 52
    mm.close()


def test_no_finalizer_raises_at_exit_after_a_chdir(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        from skmml import Memory, MilvusMemory
        os.chdir(sys.argv[1])
        mm = MilvusMemory.from_memory(Memory(np.eye(4), [0, 1, 0, 1]), uri="photos.db",
                                      collection="photos")
        os.chdir("/")
        print(mm.n_items())
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "4", done.stderr
    assert "Exception" not in done.stderr and "Error" not in done.stderr, done.stderr


def test_a_socket_that_never_answers_fails_within_the_timeout():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="did not answer within the timeout"):
            MilvusMemory(uri, "photos", timeout=2)
        assert time.monotonic() - start < 8


# -- the real Milvus server, killed, stopped and restarted ------------------------------------


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A Milvus server of this module's own, to kill, stop and restart on its data folder."""
    pytest.importorskip("milvus")
    from _local_milvus import LocalMilvusServer

    folder = tmp_path_factory.mktemp("faulty_server")
    box = {}

    def start():
        box["server"] = LocalMilvusServer(folder, authorization=True)
        try:
            box["server"].start()
        except Exception as exc:
            pytest.skip(f"the real Milvus server could not start: {exc}")
        return box["server"]

    box["start"] = start
    start()
    yield box
    box["server"].stop()


def _unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_server_client_killed_mid_batch_leaves_nothing_visible(own_server):
    server = own_server["server"]
    X, y = _data(400)
    MilvusMemory.from_memory(Memory(X, y), uri=server.uri, collection="killed_client",
                             token=server.token).close()
    env = dict(os.environ, MILVUS_TOKEN=server.token)
    for after in (1, 3):
        _kill_mid_batch(server.uri, "killed_client", 2000, after=after, env=env)
        mm = MilvusMemory(server.uri, "killed_client", token=server.token)
        assert mm.n_items() == 400
        assert mm.search(_unit(X[:5]), 3)[1].max() < 400
        # The next write rolls back the dead one (its process is gone) and commits.
        added = mm.add(X[:4], y[:4])
        assert mm.refresh().n_items() == 404 and _raw_rows(mm) == 404
        mm.remove(added)
        assert mm.refresh().n_items() == 400
        mm.close()


def test_server_stopped_fails_within_the_timeout_and_killed_mid_batch_keeps_none(own_server):
    server = own_server["server"]
    X, y = _data(500)
    Q = _unit(_data(20, seed=3)[0])
    MilvusMemory.from_memory(Memory(X, y), uri=server.uri, collection="faulty",
                             token=server.token, timeout=60).close()
    mm = MilvusMemory(server.uri, "faulty", token=server.token, timeout=3, batch_size=256)
    clf = KNNVoteClassifier(n_neighbors=5).set_memory(mm)
    before = clf.predict(Q)
    # Hung (SIGSTOP): every call fails within about the timeout, as a ConnectionError.
    os.kill(server.pid, signal.SIGSTOP)
    try:
        for call in (lambda: clf.predict(Q), lambda: clf.forget([1]),
                     lambda: MilvusMemory(server.uri, "faulty", token=server.token,
                                          timeout=3)):
            start = time.monotonic()
            with pytest.raises(ConnectionError, match="timeout") as info:
                call()
            assert time.monotonic() - start < 3 * 3 + 2, info.value
    finally:
        os.kill(server.pid, signal.SIGCONT)
    _wait_until(lambda: np.array_equal(clf.predict(Q), before))
    # Killed (SIGKILL) mid-batch: the writer's error is a ConnectionError, and after a
    # restart on the same data the memory holds none of the batch.
    real, inserted = mm._client().insert, threading.Event()

    def insert(name, rows, **kwargs):
        result = real(name, rows, **kwargs)
        if name == "faulty" and len(rows) == 256:
            inserted.set()
        return result

    mm._client().insert = insert
    errors = []

    def write():
        try:
            clf.partial_fit(*_data(5000, seed=5))
        except Exception as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    assert inserted.wait(60)
    os.kill(server.pid, signal.SIGKILL)
    writer.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError), errors
    # The failed rollback is told, and does not replace the write's own error.
    assert "Rolling the write back failed too" in " ".join(getattr(errors[0], "__notes__", []))
    with pytest.raises(ConnectionError, match="faulty"):
        clf.predict(Q)
    mm.close()
    server.stop()
    server = own_server["start"]()  # the same data folder
    # Loading the collections again after a restart takes the server a while.
    fresh = MilvusMemory(server.uri, "faulty", token=server.token, timeout=120)
    assert fresh.n_items() == 500 and len(fresh.to_memory()) == 500
    np.testing.assert_array_equal(
        KNNVoteClassifier(n_neighbors=5).set_memory(fresh).predict(Q), before)
    fresh.recover(force=True)
    assert _raw_rows(fresh) == 500
    fresh.close()


def _wait_until(check, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the server did not come back")
        time.sleep(0.5)


# -- concurrent writers --------------------------------------------------------------------


def _race(fns):
    """Run `fns` at once in threads; return what each returned or raised."""
    barrier, out = threading.Barrier(len(fns)), [None] * len(fns)

    def run(i):
        barrier.wait()
        try:
            out[i] = fns[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_clients_expanding_the_same_ids_one_wins_in_threads(milvus_server):
    uri, token = milvus_server
    X, y = _data(300)
    MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="race_threads",
                             token=token).close()
    handles = [MilvusMemory(uri, "race_threads", token=token) for _ in range(2)]
    for round_ in range(5):
        ids = np.arange(1000 + 20 * round_, 1020 + 20 * round_)
        new = Memory(*_data(20, seed=round_), image_ids=ids)
        out = _race([lambda h=h: h.expand(new) for h in handles])
        wins = [o for o in out if isinstance(o, np.ndarray)]
        losses = [o for o in out if isinstance(o, ValueError)]
        assert len(wins) == 1 and len(losses) == 1, out
        assert str(ids[0]) in str(losses[0])
        mm = handles[0].refresh()
        assert mm.n_items() == 320 + 20 * round_ == _raw_rows(mm)
    # Two forgets of the same ids both succeed, with one end state.
    out = _race([lambda h=h: h.remove(np.arange(1000, 1010)) for h in handles])
    assert all(o is h for o, h in zip(out, handles)), out
    assert handles[0].refresh().n_items() == 390 == handles[1].refresh().n_items()
    for h in handles:
        h.close()


_EXPANDER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from skmml import Memory, MilvusMemory
    uri, start_at, first = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    mm = MilvusMemory(uri, "race_processes")
    new = Memory(np.random.default_rng(first).normal(size=(20, 16)), np.arange(20) % 4,
                 image_ids=np.arange(first, first + 20))
    time.sleep(max(0.0, start_at - time.time()))
    try:
        if sys.argv[4] == "expand":
            mm.expand(new)
        else:
            mm.remove(np.arange(first, first + 10))
        print("won")
    except ValueError as exc:
        print("lost", exc)
""")


def test_two_processes_expanding_the_same_ids_one_wins(milvus_server):
    uri, token = milvus_server
    X, y = _data(300)
    MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="race_processes",
                             token=token).close()
    env = dict(os.environ, MILVUS_TOKEN=token)
    for round_ in range(3):
        first = 1000 + 20 * round_
        said = _run_together(uri, env, first, "expand")
        assert said[0].startswith("lost") and said[1] == "won", said
        assert str(first) in said[0]
    mm = MilvusMemory(uri, "race_processes", token=token)
    assert mm.n_items() == 360 == _raw_rows(mm)
    # Two processes forgetting the same ids both succeed, with one end state.
    assert _run_together(uri, env, 1000, "forget") == ["won", "won"]
    assert mm.refresh().n_items() == 350 == _raw_rows(mm)
    mm.close()


def _run_together(uri, env, first, what):
    start_at = time.time() + 6  # both processes imported and connected by then
    runs = [subprocess.Popen([sys.executable, "-c", _EXPANDER, uri, str(start_at), str(first),
                              what], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    return sorted(run.communicate(timeout=120)[0].strip() for run in runs)
