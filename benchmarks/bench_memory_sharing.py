"""Peak memory of GridSearchCV over an estimator that holds a large Memory.

A Memory passed to an estimator must not be duplicated by ``clone`` or per
grid-search candidate. This script builds a memory of N x d float32
embeddings, runs ``GridSearchCV(KNNVoteClassifier(memory=memory), ...)`` with
6 candidates x 3 folds, and reports the peak memory above the baseline (after
the memory was built) as a multiple of the embedding bytes:

- ``n_jobs=1``: peak resident set size of the process (``ru_maxrss``);
- ``n_jobs=2``: peak proportional set size (PSS) summed over the process and
  its joblib workers, sampled every 20 ms; PSS counts pages shared between
  processes (joblib memory-maps large arrays for its workers) once in total.
  The workers' own interpreters and libraries (a few hundred MiB) are
  included, and so is joblib's one memory-mapped copy of the memory that
  the workers share.

A copy per candidate would add 1.0x per fitted candidate (19 fits).

Run: ``python benchmarks/bench_memory_sharing.py [--n 500000] [--dim 512]``
"""

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _pss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid):
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            pids.extend(_tree(int(child)))
    return pids


def _rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run(n, dim, n_jobs):
    from sklearn.model_selection import GridSearchCV

    from skmml import KNNVoteClassifier, Memory

    rng = np.random.default_rng(0)
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in blocks: no full-size temporaries
        block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        X[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    y = rng.integers(0, 100, n)
    memory = Memory(X, y)
    X_query, y_query = X[:600].copy(), y[:600]
    grid = GridSearchCV(
        KNNVoteClassifier(memory=memory),
        {"n_neighbors": [1, 10, 32], "voting": ["rank", "plurality"]},
        cv=3, n_jobs=n_jobs,
    )
    if n_jobs == 1:
        base = _rss_kib()
        start = time.perf_counter()
        grid.fit(X_query, y_query)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    else:
        base = _pss_kib(os.getpid())
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(sum(_pss_kib(p) for p in _tree(os.getpid())))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        grid.fit(X_query, y_query)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        peak = max(samples) - base
    shared = grid.best_estimator_.memory_.image.embeddings is memory.image.embeddings
    print(f"n_jobs={n_jobs}: peak +{peak / 1024:.0f} MiB = {peak * 1024 / X.nbytes:.2f}x "
          f"the {X.nbytes / 2**20:.0f} MiB of embeddings; {len(grid.cv_results_['params'])} "
          f"candidates x 3 folds in {seconds:.1f} s; best estimator shares the "
          f"memory's array: {shared}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n-jobs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n_jobs is not None:
        run(args.n, args.dim, args.n_jobs)
        return
    print(f"GridSearchCV over KNNVoteClassifier(memory=Memory of {args.n} x {args.dim})")
    for n_jobs in (1, 2):
        # A fresh process per setting, so that peaks do not mix.
        subprocess.run([sys.executable, __file__, "--n", str(args.n), "--dim",
                        str(args.dim), "--n-jobs", str(n_jobs)], check=True)


if __name__ == "__main__":
    main()
