"""Memory replacement with MemoryModularClassifier on real embeddings, on a CPU.

Protocol (the paper's zero-shot setting by memory replacement): the heads
train on *training classes* with those classes' memory; then the memory is
replaced by the memory of *unseen test classes* and the classifier predicts
those classes' queries with no retraining. Compared on the unseen classes:

- MML (this library's recipe: zero-initialised residuals, epoch chosen on
  held-out training classes), MML with episodic training, and the faithful
  reference configuration (PyTorch initialisation, last epoch);
- MML "no kNN" (the query is the attention's key and value);
- the prototype-only classifier (MML's prototypes, no head);
- kNN plurality and kNN rank voting (KNNVoteClassifier) over the same memory.

Each is run on a clean test memory and on one with 20% of its items
mislabelled; then a class-incremental run in 5 stages under a 2000-item
memory budget (herding), and timings: training seconds per epoch and
prediction throughput of MML vs KNNVoteClassifier over the same memory.

Datasets (``benchmarks/mml_data.py`` builds and caches them offline):

- few classes: Fashion-MNIST images through the pretrained EfficientNet-Lite0
  (1280-d); 5 training classes, 5 unseen test classes; image branch;
- many classes: the ImageNet classes' descriptive sentences (CuPL, 998
  classes) through all-MiniLM-L6-v2 (384-d) with the class names masked; 4/5
  of the classes train (a quarter of them held out for epoch selection, as
  ImageNet-S's 600/200/200 split) and 1/5 are the unseen test classes.

Setup: ``pip install ".[benchmark]"``, ``pip install --no-deps clip-benchmark``
and ``apt-get install dataset-fashion-mnist``; the first run embeds the data
(about 20 minutes on 2 cores) and caches it outside the repository.
Run: ``python benchmarks/bench_mml.py [--quick]``.
"""

import argparse
import time

import numpy as np
import pandas as pd

from mml_data import load_image_features, load_text_features
from skmml import KNNVoteClassifier, Memory, MemoryModularClassifier

K = 32


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
    for voting in ("plurality", "rank"):
        knn = KNNVoteClassifier(n_neighbors=K, voting=voting)
        row = {"method": f"kNN {voting} voting"}
        for memory_name, memory in memories.items():
            row[memory_name] = knn.set_memory(memory).score(queries, answers)
        rows.append(row)
    return pd.DataFrame(rows).set_index("method"), fitted, memories["clean"], queries


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
    best = {}
    for name, clf in classifiers.items():
        clf.set_memory(memory)
        clf.predict(queries)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            clf.predict(queries)
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    rows = [{"method": name, "queries/s": len(queries) / t,
             "time / kNN time": t / best["KNNVoteClassifier"]} for name, t in best.items()]
    return pd.DataFrame(rows).set_index("method")


def run(name, X, y, train_classes, test_classes, n_memory, n_train, max_epochs, seed,
        validation_fraction, incremental_classes, budget):
    print(f"\n=== {name}: {len(np.unique(y))} classes, d = {X.shape[1]}; "
          f"{len(train_classes)} training classes, {len(test_classes)} unseen test classes; "
          f"{n_memory} memory items and {n_train} training queries per class ===")
    start = time.perf_counter()
    table, fitted, memory, queries = replacement_table(
        X, y, train_classes, test_classes, n_memory, n_train, max_epochs, seed,
        validation_fraction)
    print("Accuracy on the unseen classes after memory replacement:")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    epochs = max(fitted["MML"].history_["epoch"].max(), 1)
    print(f"MML training: {table.loc['MML', 'fit s'] / epochs:.2f} s per epoch "
          f"(including retrieval and validation)")
    print(f"Prediction of the {len(queries)} test queries over the unseen classes' memory "
          f"({len(memory.image)} items):")
    print(timings(fitted, memory, queries).to_string(float_format=lambda v: f"{v:,.2f}"))
    print(f"Class-incremental, {len(incremental_classes)} classes in 5 stages, "
          f"{budget}-item memory budget (herding):")
    print(incremental_table(X, y, incremental_classes, n_memory, n_train, max_epochs, seed,
                            budget).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"({time.perf_counter() - start:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    epochs = 3 if args.quick else 20

    images = load_image_features(n_per_class=300 if args.quick else 1000)
    run("Fashion-MNIST, EfficientNet-Lite0 features", images["X"], images["y"],
        np.arange(5), np.arange(5, 10), n_memory=100, n_train=16 if args.quick else 100,
        max_epochs=epochs, seed=args.seed, validation_fraction=0.2,
        incremental_classes=np.arange(10), budget=200)

    texts = load_text_features()
    X, y = texts["X"], texts["y"]
    rng = np.random.default_rng(args.seed)
    classes = rng.permutation(np.unique(y))
    if args.quick:
        classes = classes[:250]
        keep = np.isin(y, classes)
        X, y = X[keep], y[keep]
    n_test = len(classes) // 5
    counts = np.bincount(y)[classes]
    n_memory = int(np.median(counts)) // 2
    run("ImageNet class descriptions, MiniLM features (names masked)", X, y,
        np.sort(classes[n_test:]), np.sort(classes[:n_test]), n_memory=n_memory,
        n_train=max(2, int(np.min(counts)) - n_memory), max_epochs=epochs, seed=args.seed,
        validation_fraction=0.25, incremental_classes=np.sort(classes[:100]), budget=2000)


if __name__ == "__main__":
    main()
