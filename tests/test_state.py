"""All-or-nothing mutations and consistent reads (skmml._state).

The fault-injection tests interrupt every mutating method at many points of
skmml's own code (a KeyboardInterrupt raised from a trace function at the
n-th line executed) and check that the estimator is then exactly as before
the call, or exactly as after it, never a mix. The concurrency test runs
writers and readers in a subprocess, so that a crash fails the test.
"""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import skmml
from skmml import KNNVoteClassifier, Memory, MemoryModularClassifier

SKMML_DIR = str(Path(skmml.__file__).parent)


class _Interrupt:
    """Trace function raising KeyboardInterrupt at the n-th line run in skmml."""

    def __init__(self, at):
        self.at, self.count, self.fired = at, 0, False

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(SKMML_DIR):
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.at:
                self.fired = True
                raise KeyboardInterrupt
        return self._line


def _run_interrupted(mutation, estimator, at):
    tracer = _Interrupt(at)
    sys.settrace(tracer)
    try:
        mutation(estimator)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return tracer


def _knn_fingerprint(clf, probe):
    memory = clf.memory_
    report = None if clf.pruning_ is None else clf.pruning_report().to_numpy().tolist()
    distances, ids = clf.kneighbors(probe)
    return (
        memory.image.ids.tolist(), memory.image.labels.tolist(), clf.classes_.tolist(),
        clf.pruning_, report, clf.n_features_in_, np.round(clf.predict_proba(probe), 6).tolist(),
        ids.tolist(), np.round(distances, 5).tolist(), clf.explain(probe)["id"].tolist(),
    )


def _mml_fingerprint(clf, probe):
    weights = {b: [p.detach().numpy().tobytes() for p in h.parameters()]
               for b, h in clf.heads_.items()}
    return (clf.memory_.image.ids.tolist(), clf.classes_.tolist(), weights,
            np.round(clf.decision_function(probe), 5).tolist(), clf._state.identity)


def _check_all_or_nothing(base, mutation, fingerprint, probe, n_points):
    """Interrupt `mutation` of copies of `base` at `n_points` places; check each outcome."""
    before = fingerprint(base, probe)
    done = pickle.loads(pickle.dumps(base))
    total = _run_interrupted(mutation, done, at=-1).count  # uninterrupted: count lines
    after = fingerprint(done, probe)
    assert after != before, "the mutation must change something for this test to mean it"
    points = np.unique(np.linspace(1, total, min(n_points, total)).astype(int))
    outcomes = {"before": 0, "after": 0}
    for at in points:
        clf = pickle.loads(pickle.dumps(base))
        tracer = _run_interrupted(mutation, clf, at)
        assert tracer.fired
        state = fingerprint(clf, probe)
        assert state in (before, after), f"mixed state after an interrupt at line {at}/{total}"
        outcome = "before" if state == before else "after"
        outcomes[outcome] += 1
        if outcome == "before" and outcomes["before"] <= 3:
            # Nothing is left half-done (e.g. a held lock): the call now completes.
            mutation(clf)
            assert fingerprint(clf, probe) == after
    return outcomes


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    y = np.repeat(np.arange(6), 60)
    X = (centres[y] + 0.8 * rng.normal(size=(len(y), 16))).astype(np.float32)
    extra = (centres[[1, 2, 6 % 6]] + rng.normal(size=(3, 16))).astype(np.float32)
    return X, y, extra, X[::37] + 0.1


KNN_MUTATIONS = {
    "partial_fit": lambda c, e: c.partial_fit(e, [1, 2, 7]),
    "forget": lambda c, e: c.forget([3, 40, 200]),
    "expand": lambda c, e: c.set_memory(Memory(e, [1, 7, 7], image_ids=[900, 901, 902]),
                                        mode="expand"),
    "replace": lambda c, e: c.set_memory(c.memory_.drop_classes([0])),
    "prune": lambda c, e: c.prune("hard", threshold=2),
    "unprune": lambda c, e: c.unprune(),
}


# "IVF8,PQ4x4" is an IVF-PQ index with 4-bit codes: cheap to train on this data.
@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw", "IVF8,PQ4x4"])
@pytest.mark.parametrize("name", list(KNN_MUTATIONS))
def test_knn_mutations_are_all_or_nothing(data, index, name):
    X, y, extra, probe = data
    base = KNNVoteClassifier(n_neighbors=5, index=index, index_device="cpu").fit(X, y)
    base.prune("soft")
    mutation = KNN_MUTATIONS[name]
    outcomes = _check_all_or_nothing(base, lambda c: mutation(c, extra), _knn_fingerprint,
                                      probe, n_points=25)
    assert outcomes["before"] > 0


MML_MUTATIONS = {
    "partial_fit": lambda c, X, y: c.partial_fit(X[:120], y[:120]),
    "forget": lambda c, X, y: c.forget([3, 40, 200]),
    "expand": lambda c, X, y: c.set_memory(Memory(X[:4] + 0.5, [0, 1, 1, 2],
                                                  image_ids=[900, 901, 902, 903]),
                                           mode="expand"),
    "replace": lambda c, X, y: c.set_memory(c.memory_.drop_classes([0, 5])),
}


@pytest.mark.parametrize("name", list(MML_MUTATIONS))
def test_mml_mutations_with_trained_heads_are_all_or_nothing(data, name):
    X, y, _, probe = data
    base = MemoryModularClassifier(n_neighbors=5, max_epochs=1, validation_fraction=None,
                                   batch_size=64, random_state=0, heads_device="cpu").fit(X, y)
    assert not any(base._state.identity.values())
    mutation = MML_MUTATIONS[name]
    outcomes = _check_all_or_nothing(base, lambda c: mutation(c, X, y), _mml_fingerprint,
                                     probe, n_points=20)
    assert outcomes["before"] > 0


CONCURRENCY_SCRIPT = textwrap.dedent("""
    import sys, threading, time, traceback
    import numpy as np
    from skmml import KNNVoteClassifier, Memory, MemoryModularClassifier

    rng = np.random.default_rng(0)
    d, n = 32, 3000
    centres = rng.normal(size=(20, d))
    y = rng.integers(0, 20, n)
    X = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    probe = (centres[rng.integers(0, 20, 40)] + rng.normal(size=(40, d))).astype(np.float32)
    # An anchor item with the largest id is never forgotten, so partial_fit's
    # new ids are never reused and every id keeps one embedding and label.
    anchor = Memory(X, y, image_ids=np.r_[np.arange(n - 1), 10**6])

    def run(name, clf, read, write, seconds):
        published, outputs, errors = [], [], []
        published.append(read(clf))
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    outputs.append(read(clf))
                except BaseException:
                    errors.append(traceback.format_exc())
                    stop.set()

        def writer():
            step = 0
            try:
                while not stop.is_set():
                    write(clf, step)
                    published.append(read(clf))
                    step += 1
            except BaseException:
                errors.append(traceback.format_exc())
                stop.set()

        threads = [threading.Thread(target=reader) for _ in range(3)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        known = {o.tobytes() for o in published}
        bad = [o for o in outputs if o.tobytes() not in known
               and not any(o.shape == p.shape and np.allclose(o, p, rtol=1e-5, atol=1e-6)
                           for p in published)]
        print(f"{name}: {len(outputs)} reads checked, {len(published) - 1} mutations, "
              f"{len(bad)} inconsistent reads, {len(errors)} errors", flush=True)
        if errors:
            print(errors[0])
        return len(bad) + len(errors)

    def knn_write(clf, step):
        new = (centres[[step % 20, (step + 3) % 20]] + rng.normal(size=(2, d))).astype(np.float32)
        op = step % 5
        if op == 0:
            clf.partial_fit(new, [step % 20, 25])
        elif op == 1:
            clf.forget(clf.memory_.image.ids[-2:])
        elif op == 2:
            clf.prune("soft") if clf.pruning_ is None else clf.unprune()
        elif op == 3:
            clf.set_memory(Memory(new, [3, 26], image_ids=[2 * 10**6 + 2 * step,
                                                            2 * 10**6 + 2 * step + 1]),
                           mode="expand")
        else:
            clf.forget(clf.memory_.image.ids[-2:])

    def knn_read(clf):
        return clf.predict_proba(probe)  # its width is the number of classes

    seconds = float(sys.argv[1])
    failures = 0
    for index in ("flat", "ivf", "hnsw", "IVF16,PQ8x4"):
        clf = KNNVoteClassifier(n_neighbors=8, index=index, index_device="cpu").set_memory(anchor)
        failures += run(f"KNNVoteClassifier({index})", clf, knn_read, knn_write, seconds)

    mml = MemoryModularClassifier(n_neighbors=8, max_epochs=1, validation_fraction=None,
                                  random_state=0, heads_device="cpu",
                                  memory=anchor).fit(X[:600], y[:600])
    other = Memory(X[:1500], y[:1500])

    def mml_write(clf, step):
        if step % 3 == 0:
            clf.partial_fit(X[600:700], y[600:700])
        else:
            clf.set_memory(other if step % 3 == 1 else anchor)

    def mml_read(clf):
        return clf.decision_function(probe).ravel()

    failures += run("MemoryModularClassifier(trained heads)", mml, mml_read, mml_write, seconds)
    sys.exit(1 if failures else 0)
""")


def test_reads_see_whole_states_while_a_writer_mutates(tmp_path):
    script = tmp_path / "concurrency.py"
    script.write_text(CONCURRENCY_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), "2.5"], capture_output=True,
                            text=True, timeout=300, env=env)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count(" 0 inconsistent reads, 0 errors") == 5


@pytest.mark.parametrize("make", [
    lambda: KNNVoteClassifier(n_neighbors=3),
    lambda: MemoryModularClassifier(n_neighbors=3, max_epochs=0, heads_device="cpu"),
])
def test_reads_during_a_refit_to_another_width_see_the_old_classifier(make, monkeypatch):
    import threading

    import skmml.retrieval as retrieval

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    X8, X4 = rng.normal(size=(30, 8)), rng.normal(size=(30, 4))
    clf = make().fit(X8, y)
    expected = clf.predict(X8[:5])
    entered, release = threading.Event(), threading.Event()
    build = retrieval.NeighborIndex.build

    def slow_build(self, bank):
        entered.set()
        release.wait(10)
        return build(self, bank)

    monkeypatch.setattr(retrieval.NeighborIndex, "build", slow_build)
    refit = threading.Thread(target=clf.fit, args=(X4, y))
    refit.start()
    assert entered.wait(10)
    try:
        # The refit has validated its data but not published: reads see the
        # old classifier whole, old width included.
        assert clf.n_features_in_ == 8
        np.testing.assert_array_equal(clf.predict(X8[:5]), expected)
        with pytest.raises(ValueError, match="X has 4 features, but .* is expecting 8"):
            clf.predict(X4[:5])
    finally:
        release.set()
        refit.join()
    assert clf.n_features_in_ == 4 and clf.predict(X4[:5]).shape == (5,)


def test_untrained_heads_reload_as_fitted_after_set_params():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    X = rng.normal(size=(60, 8)).astype(np.float32)
    clf = MemoryModularClassifier(n_neighbors=3, max_epochs=0, residual_init="default",
                                  random_state=0, heads_device="cpu").fit(X, y)
    clf.set_params(residual_init="zero")  # a parameter change after fit
    loaded = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(loaded.decision_function(X), clf.decision_function(X))
