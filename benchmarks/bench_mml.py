"""Memory replacement with MemoryModularClassifier on real embeddings, on a CPU.

Protocol (the paper's zero-shot setting by memory replacement): the heads
train on *training classes* with those classes' memory; then the memory is
replaced by the memory of *unseen test classes* and the classifier predicts
those classes' queries with no retraining. Compared on the unseen classes:

- MML (this library's recipe: zero-initialised residuals, epoch chosen on
  held-out training classes), MML with episodic training, and the faithful
  reference configuration (PyTorch initialisation, last epoch);
- MML "no kNN" (the query is the attention's key and value);
- baselines computed here with numpy alone, never through skmml (so that a bug
  shared with the library cannot hide in both columns): the class-mean
  prototype classifier, and kNN plurality and rank voting (cosine, k = 32)
  over the same memory. Zero-shot CLIP does not apply: no CLIP weights
  install offline, and these memories hold no class-name prompts.

A check prints, per dataset and memory, MML default minus the independent
mean prototype; it must be >= -0.01.

Each is run on a clean test memory and on one with 20% of its items
mislabelled; then a class-incremental run in 5 stages under a 2000-item
memory budget (herding), and timings: training seconds per epoch and
prediction throughput of MML vs KNNVoteClassifier over the same memory (the
trained heads also with ``heads_precision="bfloat16"``, with the number of
predictions that differ from float32).

Datasets (``benchmarks/mml_data.py`` builds and caches them offline):

- digits: scikit-learn's 1,797 handwritten digits through the pretrained
  EfficientNet-Lite0 (1280-d); 5 training classes, 5 unseen test classes;
- few classes: Fashion-MNIST images through the pretrained EfficientNet-Lite0
  (1280-d); 5 training classes, 5 unseen test classes; image branch;
- many classes: the ImageNet classes' descriptive sentences (CuPL, 998
  classes) through all-MiniLM-L6-v2 (384-d) with the class names masked; 4/5
  of the classes train (a quarter of them held out for epoch selection, as
  ImageNet-S's 600/200/200 split) and 1/5 are the unseen test classes.

Setup: ``pip install ".[benchmark]"``, ``pip install --no-deps clip-benchmark``
and ``apt-get install dataset-fashion-mnist``; the first run embeds the data
(about 20 minutes on 2 cores) and caches it outside the repository.
Run: ``python benchmarks/bench_mml.py [--quick] [--fit-only]``; ``--fit-only``
times the default ``fit`` on the three data sets and prints nothing else.
"""

import argparse
import time

import numpy as np
import pandas as pd

from mml_data import load_digit_features, load_image_features, load_text_features
from skmml import KNNVoteClassifier, Memory, MemoryModularClassifier

K = 32
CHUNK = 2048


# -- independent baselines: numpy only ---------------------------------------------------


def _unit(X):
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def numpy_mean_prototype(M, labels, Q):
    """Predict the class whose normalised mean memory item is most cosine-similar."""
    classes = np.unique(labels)
    means = _unit(np.stack([_unit(M[labels == c]).mean(axis=0) for c in classes]))
    return classes[np.argmax(_unit(Q) @ means.T, axis=1)]


def numpy_knn(M, labels, Q, k, voting):
    """kNN voting by cosine similarity: plurality (w = 1) or rank (w = 1 / (i + 2)).

    Ties between classes go to the lowest class (np.argmax).
    """
    classes, codes = np.unique(labels, return_inverse=True)
    M = _unit(M)
    weights = np.ones(k) if voting == "plurality" else 1.0 / (np.arange(k) + 2.0)
    out = []
    for start in range(0, len(Q), CHUNK):
        sims = _unit(Q[start:start + CHUNK]) @ M.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        neighbors = codes[np.take_along_axis(top, order, axis=1)]
        votes = np.zeros((len(sims), len(classes)))
        np.add.at(votes, (np.arange(len(sims))[:, None], neighbors), weights)
        out.append(classes[np.argmax(votes, axis=1)])
    return np.concatenate(out)


def accuracy(predicted, truth):
    return float(np.mean(predicted == truth))



def split_items(y, n_memory, n_train, rng):
    """Per class: rows for the memory, for training queries, and the rest for testing."""
    memory, train, test = [], [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        memory.append(rows[:n_memory])
        train.append(rows[n_memory:n_memory + n_train])
        test.append(rows[n_memory + n_train:])
    return np.concatenate(memory), np.concatenate(train), np.concatenate(test)


def mislabel(labels, fraction, rng):
    """A copy of `labels` with `fraction` of them moved to another class."""
    noisy = labels.copy()
    classes = np.unique(labels)
    flip = rng.choice(len(labels), int(fraction * len(labels)), replace=False)
    for i in flip:
        noisy[i] = rng.choice(classes[classes != labels[i]])
    return noisy


def mml_variants(max_epochs, seed, validation_fraction):
    common = {"n_neighbors": K, "random_state": seed}
    trained = {"max_epochs": max_epochs, "validation_fraction": validation_fraction, **common}
    return {
        "MML": MemoryModularClassifier(**trained),
        "MML episodic": MemoryModularClassifier(episode_classes=0.5, **trained),
        "MML reference (default init, last epoch)": MemoryModularClassifier(
            residual_init="default", max_epochs=max_epochs, validation_fraction=None, **common),
        "MML no kNN": MemoryModularClassifier(retrieval="none", **trained),
        "prototype only": MemoryModularClassifier(max_epochs=0, **common),
    }


def replacement_table(X, y, train_classes, test_classes, n_memory, n_train, max_epochs,
                      seed, validation_fraction):
    """Accuracy on unseen classes after memory replacement, clean and 20% noisy."""
    rng = np.random.default_rng(seed)
    mem_rows, train_rows, test_rows = split_items(y, n_memory, n_train, rng)
    in_train = lambda rows: rows[np.isin(y[rows], train_classes)]  # noqa: E731
    in_test = lambda rows: rows[np.isin(y[rows], test_classes)]  # noqa: E731
    train_memory = Memory(X[in_train(mem_rows)], y[in_train(mem_rows)])
    test_mem_rows = in_test(mem_rows)
    memories = {
        "clean": Memory(X[test_mem_rows], y[test_mem_rows]),
        "20% mislabelled": Memory(X[test_mem_rows], mislabel(y[test_mem_rows], 0.2, rng)),
    }
    queries, answers = X[in_test(test_rows)], y[in_test(test_rows)]
    X_fit, y_fit = X[in_train(train_rows)], y[in_train(train_rows)]
    rows, fitted = [], {}
    for name, clf in mml_variants(max_epochs, seed, validation_fraction).items():
        start = time.perf_counter()
        clf.set_params(memory=train_memory).fit(X_fit, y_fit)
        seconds = time.perf_counter() - start
        fitted[name] = clf
        row = {"method": name, "fit s": seconds, "best epoch": clf.best_epoch_}
        for memory_name, memory in memories.items():
            row[memory_name] = clf.set_memory(memory).score(queries, answers)
        rows.append(row)
    baselines = {
        "mean prototype (numpy)": numpy_mean_prototype,
        "kNN plurality (numpy)": lambda M, lab, Q: numpy_knn(M, lab, Q, K, "plurality"),
        "kNN rank (numpy)": lambda M, lab, Q: numpy_knn(M, lab, Q, K, "rank"),
    }
    for name, baseline in baselines.items():
        row = {"method": name}
        for memory_name, memory in memories.items():
            bank = memory.image
            row[memory_name] = accuracy(baseline(X[test_mem_rows], bank.labels, queries),
                                        answers)
        rows.append(row)
    return pd.DataFrame(rows).set_index("method"), fitted, memories["clean"], queries


def fit_seconds(X, y, train_classes, n_memory, n_train, max_epochs, seed,
                validation_fraction):
    """Seconds, kept epoch and epochs run of the default MML fit of `replacement_table`."""
    rng = np.random.default_rng(seed)
    mem_rows, train_rows, _ = split_items(y, n_memory, n_train, rng)
    mem_rows = mem_rows[np.isin(y[mem_rows], train_classes)]
    train_rows = train_rows[np.isin(y[train_rows], train_classes)]
    clf = MemoryModularClassifier(n_neighbors=K, random_state=seed, max_epochs=max_epochs,
                                  validation_fraction=validation_fraction,
                                  memory=Memory(X[mem_rows], y[mem_rows]))
    start = time.perf_counter()
    clf.fit(X[train_rows], y[train_rows])
    return time.perf_counter() - start, clf.best_epoch_, int(clf.history_["epoch"].max())


def incremental_table(X, y, classes, n_memory, n_train, max_epochs, seed, budget):
    """Class-incremental accuracy over 5 stages under a memory budget (herding).

    The heads train once, on the first stage's classes; later stages only
    expand the memory, which is then cut to the budget by herding.
    """
    rng = np.random.default_rng(seed)
    mem_rows, train_rows, test_rows = split_items(y, n_memory, n_train, rng)
    stages = np.array_split(rng.permutation(classes), 5)
    first = np.isin(y[train_rows], stages[0])
    stage_memory = lambda c: mem_rows[np.isin(y[mem_rows], c)]  # noqa: E731
    memory = Memory(X[stage_memory(stages[0])], y[stage_memory(stages[0])],
                    image_ids=stage_memory(stages[0])).limit(budget)
    mml = MemoryModularClassifier(n_neighbors=K, max_epochs=max_epochs, random_state=seed,
                                  memory=memory).fit(X[train_rows[first]], y[train_rows[first]])
    knn = KNNVoteClassifier(n_neighbors=K).set_memory(memory)
    rows, seen = [], []
    for i, stage in enumerate(stages):
        if i:
            new = stage_memory(stage)
            memory = memory.expand(Memory(X[new], y[new], image_ids=new)).limit(budget)
            mml.set_memory(memory)
            knn.set_memory(memory)
        seen.extend(stage)
        test = test_rows[np.isin(y[test_rows], seen)]
        rows.append({"stage": i + 1, "classes": len(seen), "memory items": len(memory.image),
                     "MML": mml.score(X[test], y[test]),
                     "kNN rank voting": knn.score(X[test], y[test])})
    return pd.DataFrame(rows).set_index("stage")


def timings(fitted, memory, queries, repeats=3):
    """Prediction q/s of MML (as selected, and with trained heads) vs KNNVoteClassifier.

    "MML" is the default recipe, whose heads stay the identity when no
    trained epoch beats them (then prediction skips heads and retrieval);
    "MML, trained heads" is the reference configuration's trained heads.
    """
    classifiers = {
        "MML": fitted["MML"],
        "MML, trained heads": fitted["MML reference (default init, last epoch)"],
        "KNNVoteClassifier": KNNVoteClassifier(n_neighbors=K),
    }
    if fitted["MML"].best_epoch_:
        classifiers["MML, trained heads"] = fitted["MML"]
    best, predicted = {}, {}
    for name, clf in classifiers.items():
        clf.set_memory(memory)
        precisions = ["float32", "bfloat16"] if name == "MML, trained heads" else [None]
        for precision in precisions:
            label = name if precision in (None, "float32") else f"{name}, bfloat16"
            if precision:
                clf.set_params(heads_precision=precision)
            predicted[label] = clf.predict(queries)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                clf.predict(queries)
                times.append(time.perf_counter() - start)
            best[label] = min(times)
        if name == "MML, trained heads":
            clf.set_params(heads_precision="auto")
    rows = [{"method": name, "queries/s": len(queries) / t,
             "time / kNN time": t / best["KNNVoteClassifier"]} for name, t in best.items()]
    table = pd.DataFrame(rows).set_index("method")
    table["predictions != float32"] = ""
    table.loc["MML, trained heads, bfloat16", "predictions != float32"] = int(np.sum(
        predicted["MML, trained heads, bfloat16"] != predicted["MML, trained heads"]))
    return table


def run(name, X, y, train_classes, test_classes, n_memory, n_train, max_epochs, seed,
        validation_fraction, incremental_classes=None, budget=None):
    print(f"\n=== {name}: {len(np.unique(y))} classes, d = {X.shape[1]}; "
          f"{len(train_classes)} training classes, {len(test_classes)} unseen test classes; "
          f"{n_memory} memory items and {n_train} training queries per class ===")
    start = time.perf_counter()
    table, fitted, memory, queries = replacement_table(
        X, y, train_classes, test_classes, n_memory, n_train, max_epochs, seed,
        validation_fraction)
    print("Accuracy on the unseen classes after memory replacement:")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    for memory_name in ("clean", "20% mislabelled"):
        gap = table.loc["MML", memory_name] - table.loc["mean prototype (numpy)", memory_name]
        print(f"CHECK {name}, {memory_name} memory: MML default - independent mean prototype "
              f"= {gap:+.3f} ({'ok' if gap >= -0.01 else 'FAILS'}: must be >= -0.010)")
    epochs = max(fitted["MML"].history_["epoch"].max(), 1)
    print(f"MML training: {table.loc['MML', 'fit s']:.1f} s for {epochs} epochs, "
          f"{table.loc['MML', 'fit s'] / epochs:.2f} s per epoch "
          f"(including retrieval and validation)")
    print(f"Prediction of the {len(queries)} test queries over the unseen classes' memory "
          f"({len(memory.image)} items):")
    print(timings(fitted, memory, queries).to_string(float_format=lambda v: f"{v:,.2f}"))
    if incremental_classes is not None:
        print(f"Class-incremental, {len(incremental_classes)} classes in 5 stages, "
              f"{budget}-item memory budget (herding):")
        print(incremental_table(X, y, incremental_classes, n_memory, n_train, max_epochs,
                                seed, budget).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"({time.perf_counter() - start:.0f} s)")


def datasets(quick, seed):
    """(name, X, y, keyword arguments of `run`) of the three real-data cases."""
    epochs = 3 if quick else 20
    digits = load_digit_features()
    yield ("digits, EfficientNet-Lite0 features", digits["X"], digits["y"], dict(
        train_classes=np.arange(5), test_classes=np.arange(5, 10), n_memory=60,
        n_train=16 if quick else 40, max_epochs=epochs, seed=seed, validation_fraction=0.2))
    images = load_image_features(n_per_class=300 if quick else 1000)
    yield ("Fashion-MNIST, EfficientNet-Lite0 features", images["X"], images["y"], dict(
        train_classes=np.arange(5), test_classes=np.arange(5, 10), n_memory=100,
        n_train=16 if quick else 100, max_epochs=epochs, seed=seed, validation_fraction=0.2,
        incremental_classes=np.arange(10), budget=200))
    texts = load_text_features()
    X, y = texts["X"], texts["y"]
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(y))
    if quick:
        classes = classes[:250]
        keep = np.isin(y, classes)
        X, y = X[keep], y[keep]
    n_test = len(classes) // 5
    counts = np.bincount(y)[classes]
    n_memory = int(np.median(counts)) // 2
    yield ("ImageNet class descriptions, MiniLM features (names masked)", X, y, dict(
        train_classes=np.sort(classes[n_test:]), test_classes=np.sort(classes[:n_test]),
        n_memory=n_memory, n_train=max(2, int(np.min(counts)) - n_memory),
        max_epochs=epochs, seed=seed, validation_fraction=0.25,
        incremental_classes=np.sort(classes[:100]), budget=2000))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and epochs")
    parser.add_argument("--fit-only", action="store_true",
                        help="only time the default fit on each data set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, X, y, kwargs in datasets(args.quick, args.seed):
        if args.fit_only:
            keys = ("train_classes", "n_memory", "n_train", "max_epochs", "seed",
                    "validation_fraction")
            seconds, best, ran = fit_seconds(X, y, **{key: kwargs[key] for key in keys})
            print(f"{name}: default fit {seconds:.1f} s, {ran} epochs run, epoch {best} kept")
        else:
            run(name, X, y, **kwargs)


if __name__ == "__main__":
    main()
