"""A fault campaign: how often the memory's promises break under real faults (tries / failures).

Each fault is real and repeated: the Milvus server SIGKILLed during a
50,000-row ``partial_fit`` and restarted on its data folder, a Milvus Lite
client SIGKILLed during a 30,000-row ``partial_fit``, the server SIGSTOPped
under a handle with ``timeout=5``, two processes (and two threads) expanding
the same explicit ids at once, two forgetting the same ids, damaged memory
files (every zip flag bit, compression methods, broken npy headers, missing,
extra and swapped members), SIGKILLs during ``Memory.save``, and a script
that opens a Lite memory by a relative path and changes directory. A
failure is a broken promise: a batch seen in part, an error of the wrong
type or past the timeout, two winners, a damaged file loaded or raising
anything but ValueError, a temp file left behind, output at exit.

Run: ``python benchmarks/bench_faults.py [--quick]`` (``pip install
".[milvus]" milvus==2.3.5``); about 10 minutes, --quick about 3.
"""

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

D = 64
ROWS = []


def report(fault, tries, failures, detail=""):
    ROWS.append((fault, tries, failures, detail))
    print(f"{fault:62s} {tries:5d} {failures:5d}  {detail}", flush=True)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, 10, n)


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import pymilvus
    from skmml import KNNVoteClassifier, MilvusMemory
    uri, n = sys.argv[1], int(sys.argv[2])
    real = pymilvus.MilvusClient.insert
    def insert(self, name, rows, **kwargs):
        result = real(self, name, rows, **kwargs)
        if name == "photos":
            print("inserted", flush=True)
        return result
    pymilvus.MilvusClient.insert = insert
    clf = KNNVoteClassifier(n_neighbors=3).set_memory(MilvusMemory(uri, "photos"))
    rng = np.random.default_rng(1)
    clf.partial_fit(rng.normal(size=(n, %d)).astype(np.float32), rng.integers(0, 10, n))
    print("done", flush=True)
""" % D)


def lite_client_kills(folder, tries, rng):
    from skmml import Memory, MilvusMemory

    uri = os.path.join(folder, "lite.db")
    X, y = _data(2000)
    MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="photos").close()
    failures, seen = 0, []
    for _ in range(tries):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, uri, "30000"],
                                  stdout=subprocess.PIPE, text=True)
        for _ in range(int(rng.integers(1, 7))):
            writer.stdout.readline()
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        mm = MilvusMemory(uri, "photos")
        n = mm.n_items()
        seen.append(n)
        failures += n != 2000 or len(mm.to_memory()) != 2000
        mm.recover()
        mm.close()
    report("Lite client SIGKILLed during a 30k-row partial_fit", tries, failures,
           f"items seen after: {sorted(set(seen))} (expected 2000)")


def server_kills(folder, tries, rng):
    from _local_milvus import LocalMilvusServer

    from skmml import KNNVoteClassifier, Memory, MilvusMemory

    data = os.path.join(folder, "server")
    server = LocalMilvusServer(data, authorization=True).start()
    X, y = _data(2000)
    Q = _data(50, seed=9)[0]
    MilvusMemory.from_memory(Memory(X, y), uri=server.uri, collection="photos",
                             token=server.token, timeout=60).close()
    failures, wrong_errors, predict_errors, seen = 0, 0, [], []
    try:
        for _ in range(tries):
            mm = MilvusMemory(server.uri, "photos", token=server.token, timeout=5)
            clf = KNNVoteClassifier(n_neighbors=3).set_memory(mm)
            before = clf.predict(Q)
            real, count, go = mm._client().insert, [0], threading.Event()
            after = int(rng.integers(1, 12))

            def insert(name, rows, **kwargs):
                result = real(name, rows, **kwargs)
                if name == "photos":
                    count[0] += 1
                    if count[0] == after:
                        go.set()
                return result

            mm._client().insert = insert
            errors = []

            def write():
                try:
                    clf.partial_fit(*_data(50000, seed=int(rng.integers(1 << 30))))
                except Exception as exc:
                    errors.append(exc)

            writer = threading.Thread(target=write)
            writer.start()
            go.wait(120)
            os.kill(server.pid, signal.SIGKILL)
            writer.join(120)
            wrong_errors += not (len(errors) == 1 and isinstance(errors[0], ConnectionError))
            try:
                clf.predict(Q)
                predict_errors.append("none")
            except Exception as exc:
                predict_errors.append(type(exc).__name__)
            mm.close()
            server.stop()
            server = LocalMilvusServer(data, authorization=True).start()
            fresh = MilvusMemory(server.uri, "photos", token=server.token, timeout=120)
            n = fresh.n_items()
            seen.append(n)
            same = np.array_equal(KNNVoteClassifier(n_neighbors=3).set_memory(fresh)
                                  .predict(Q), before)
            failures += n != 2000 or len(fresh.to_memory()) != 2000 or not same
            fresh.recover(force=True)
            fresh.close()
    finally:
        server.stop()
    report("server SIGKILLed during a 50k-row partial_fit, restarted", tries, failures,
           f"items seen after restart: {sorted(set(seen))} (expected 2000)")
    report("  ... the writer's error is not a ConnectionError", tries, wrong_errors)
    report("  ... predict on the killed server: not a ConnectionError", tries,
           sum(e != "ConnectionError" for e in predict_errors), f"{set(predict_errors)}")


def server_stops(folder, tries):
    from _local_milvus import LocalMilvusServer

    from skmml import KNNVoteClassifier, Memory, MilvusMemory

    server = LocalMilvusServer(os.path.join(folder, "stopped"), authorization=True).start()
    X, y = _data(2000)
    MilvusMemory.from_memory(Memory(X, y), uri=server.uri, collection="photos",
                             token=server.token, timeout=60).close()
    mm = MilvusMemory(server.uri, "photos", token=server.token, timeout=5)
    clf = KNNVoteClassifier(n_neighbors=3).set_memory(mm)
    clf.predict(X[:5])
    times = {"predict": [], "forget": [], "new handle": []}
    failures = 0
    try:
        for _ in range(tries):
            os.kill(server.pid, signal.SIGSTOP)
            try:
                for name, call in (("predict", lambda: clf.predict(X[:5])),
                                   ("forget", lambda: clf.forget([1])),
                                   ("new handle", lambda: MilvusMemory(
                                       server.uri, "photos", token=server.token, timeout=5))):
                    start = time.monotonic()
                    try:
                        call()
                        failures += 1
                    except ConnectionError:
                        pass
                    except Exception:
                        failures += 1
                    times[name].append(time.monotonic() - start)
                    failures += times[name][-1] > 2 * 5 + 1
            finally:
                os.kill(server.pid, signal.SIGCONT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    clf.predict(X[:5])
                    break
                except ConnectionError:
                    time.sleep(0.5)
    finally:
        mm.close()
        server.stop()
    report("server SIGSTOPped, timeout=5: predict, forget, new handle", 3 * tries, failures,
           ", ".join(f"{k} {max(v):.1f} s" for k, v in times.items()))


def silent_socket(tries):
    from skmml import MilvusMemory

    failures, took = 0, []
    for _ in range(tries):
        with socket.create_server(("127.0.0.1", 0)) as silent:
            start = time.monotonic()
            try:
                MilvusMemory(f"http://127.0.0.1:{silent.getsockname()[1]}", "x", timeout=5)
                failures += 1
            except ConnectionError as exc:
                failures += "did not answer" not in str(exc)
            except Exception:
                failures += 1
            took.append(time.monotonic() - start)
    report("a socket that never answers, timeout=5", tries, failures,
           f"failed after {max(took):.1f} s")


_RACER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from skmml import Memory, MilvusMemory
    uri, start_at, first, what = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mm = MilvusMemory(uri, "race")
    new = Memory(np.random.default_rng(first).normal(size=(20, %d)), np.arange(20) %% 4,
                 image_ids=np.arange(first, first + 20))
    time.sleep(max(0.0, start_at - time.time()))
    try:
        mm.expand(new) if what == "expand" else mm.remove(np.arange(first, first + 10))
        print("won")
    except ValueError:
        print("lost")
""" % D)


def races(uri, token, rounds_processes, rounds_threads):
    from skmml import Memory, MilvusMemory

    X, y = _data(900)
    MilvusMemory.from_memory(Memory(X, y), uri=uri, collection="race", token=token).close()
    env = dict(os.environ, MILVUS_TOKEN=token or "")
    failures, first = 0, 10_000
    for _ in range(rounds_processes):
        start_at = time.time() + 6
        runs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, str(start_at), str(first),
                                  "expand"], stdout=subprocess.PIPE, text=True, env=env)
                for _ in range(2)]
        said = sorted(r.communicate(timeout=120)[0].strip() for r in runs)
        failures += said != ["lost", "won"]
        first += 20
    mm = MilvusMemory(uri, "race", token=token)
    expected = 900 + 20 * rounds_processes
    failures += mm.n_items() != expected or mm._count("race") != expected
    report("two processes expand the same 20 ids: not exactly one winner", rounds_processes,
           failures, f"items {mm.n_items()}, rows {mm._count('race')} (expected {expected})")
    handles = [mm, MilvusMemory(uri, "race", token=token)]
    failures = 0
    for _ in range(rounds_threads):
        new = Memory(*_data(20, seed=first), image_ids=np.arange(first, first + 20))
        out, barrier = [None, None], threading.Barrier(2)

        def run(i):
            barrier.wait()
            try:
                out[i] = handles[i].expand(new)
            except ValueError as exc:
                out[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        failures += sum(isinstance(o, np.ndarray) for o in out) != 1
        first += 20
    expected += 20 * rounds_threads
    failures += mm.refresh().n_items() != expected or mm._count("race") != expected
    report("two threads expand the same 20 ids: not exactly one winner", rounds_threads,
           failures, f"rows {mm._count('race')} (expected {expected})")
    failures = 0
    for round_ in range(rounds_processes // 2):
        start_at = time.time() + 6
        runs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, str(start_at),
                                  str(10_000 + 20 * round_), "forget"],
                                 stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        said = sorted(r.communicate(timeout=120)[0].strip() for r in runs)
        failures += said != ["won", "won"]
    expected -= 10 * (rounds_processes // 2)
    failures += mm.refresh().n_items() != expected or mm._count("race") != expected
    report("two processes forget the same 10 ids: not both done, one end state",
           rounds_processes // 2, failures)
    for h in handles:
        h.close()


def damaged_files(folder):
    from skmml import Memory

    rng = np.random.default_rng(0)
    memory = Memory(rng.normal(size=(50, 8)), np.arange(50) % 5,
                    image_metadata={"source": [f"{i}.png" for i in range(50)]})
    path = os.path.join(folder, "memory.npz")
    memory.save(path)
    raw = open(path, "rb").read()
    mutants = []
    for bit in range(16):  # every general-purpose flag bit, central and local headers
        data = bytearray(raw)
        for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            i = data.find(sig)
            while i >= 0:
                data[i + at:i + at + 2] = (int.from_bytes(data[i + at:i + at + 2], "little")
                                          ^ (1 << bit)).to_bytes(2, "little")
                i = data.find(sig, i + 4)
        mutants.append(bytes(data))
    for method in (1, 2, 6, 8, 9, 12, 14, 93, 95, 98, 99):
        data = bytearray(raw)
        for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            i = data.find(sig)
            while i >= 0:
                data[i + at:i + at + 2] = method.to_bytes(2, "little")
                i = data.find(sig, i + 4)
        mutants.append(bytes(data))

    def rezip(change):
        out = io.BytesIO()
        with zipfile.ZipFile(path) as a, zipfile.ZipFile(out, "w") as b:
            for info in a.infolist():
                member = change(info.filename, a.read(info))
                if member is not None:
                    b.writestr(info, member)
        return out.getvalue()

    for junk in (b"'descr\"\x00(", b"'descr': '<f4' '", b"{{{", b"\x00" * 8, b"'shape': (-1,"):
        mutants.append(rezip(lambda n, d, j=junk: d.replace(b"'descr'", j, 1)
                             if n == "image_embeddings.npy" else d))
    for name in ("image_metadata.npy", "image_ids.npy", "text_labels.npy"):
        mutants.append(rezip(lambda n, d, m=name: None if n == m else d))

    def swapped(n, d):
        if n != "image_embeddings.npy":
            return d
        buffer = io.BytesIO()
        np.save(buffer, np.load(io.BytesIO(d))[::-1].copy())
        return buffer.getvalue()

    mutants.append(rezip(swapped))
    for offset in rng.integers(0, len(raw), 400):  # and single bytes anywhere
        data = bytearray(raw)
        data[offset] ^= 1 << int(rng.integers(8))
        mutants.append(bytes(data))
    loaded_same, wrong = 0, []
    for i, data in enumerate(mutants):
        mutant = os.path.join(folder, f"mutant{i}.npz")
        open(mutant, "wb").write(data)
        try:
            back = Memory.load(mutant)
            loaded_same += not (np.array_equal(back.image.embeddings, memory.image.embeddings)
                                and np.array_equal(back.image.ids, memory.image.ids)
                                and back.image.metadata.equals(memory.image.metadata))
        except ValueError as exc:
            wrong += [] if str(exc).startswith(f"Cannot load a Memory from {mutant}") else [i]
        except Exception as exc:
            wrong.append(f"{i}: {type(exc).__name__}")
        os.unlink(mutant)
    report("damaged file loaded with other content, or not a ValueError naming it",
           len(mutants), loaded_same + len(wrong), f"{wrong[:5]}")


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from skmml import Memory
    memory = Memory(np.random.default_rng(0).normal(size=(40000, 128)), np.arange(40000) % 5)
    print("ready", flush=True)
    while True:
        memory.save(sys.argv[1])
""")


def save_kills(folder, tries, rng):
    from skmml import Memory

    path = os.path.join(folder, "saved", "memory.npz")
    os.makedirs(os.path.dirname(path))
    Memory(np.eye(3), [0, 1, 2]).save(path)
    bad = 0
    for _ in range(tries):
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, path], stdout=subprocess.PIPE,
                                 text=True)
        saver.stdout.readline()
        time.sleep(rng.uniform(0, 0.5))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        try:
            bad += len(Memory.load(path)) not in (3, 40000)
        except Exception:
            bad += 1
    Memory(np.eye(4), [0, 1, 2, 3]).save(path)
    left = [n for n in os.listdir(os.path.dirname(path)) if n != "memory.npz"]
    size = sum(os.path.getsize(os.path.join(os.path.dirname(path), n)) for n in left)
    report("SIGKILL during Memory.save, then a good save: temp files left", tries, len(left),
           f"{size} bytes left; unreadable files {bad}")


def chdir_exit(folder):
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
    done = subprocess.run([sys.executable, "-c", script, folder], capture_output=True,
                          text=True, timeout=120)
    report("relative Lite path + chdir: output at exit", 1,
           int(done.returncode != 0 or bool(done.stderr.strip())), done.stderr.strip()[-120:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    line = next((x for x in open("/proc/cpuinfo") if x.startswith("flags")), "")
    print("flags:", " ".join(f for f in line.split() if f.startswith(("avx", "amx", "fma"))))
    print(f"{'fault':62s} {'tries':>5s} {'fail':>5s}")
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp(prefix="skmml-faults-")
    damaged_files(folder)
    save_kills(folder, 10 if quick else 36, rng)
    chdir_exit(folder)
    silent_socket(2 if quick else 3)
    lite_client_kills(folder, 3 if quick else 8, rng)
    try:
        from _local_milvus import LocalMilvusServer

        server = LocalMilvusServer(os.path.join(folder, "race"), authorization=True).start()
    except Exception as exc:
        print(f"Milvus server: skipped ({exc})")
        return
    try:
        races(server.uri, server.token, 4 if quick else 16, 4 if quick else 10)
    finally:
        server.stop()
    server_stops(folder, 1 if quick else 3)
    server_kills(folder, 2 if quick else 6, rng)


if __name__ == "__main__":
    main()
