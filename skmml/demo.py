"""A tour of KNNVoteClassifier on real images: ``python -m skmml.demo``.

Uses scikit-learn's bundled handwritten digits (1797 real 8x8 scans), with
each image's pixels as its embedding. Shows accuracy per voting scheme, a
prediction explained by its nearest memory items, a new class added to memory
without retraining, exact unlearning, and pruning of a noisy memory.
"""

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skmml import KNNVoteClassifier, Memory
from skmml.voting import VOTING_SCHEMES


def _heading(text):
    print(f"\n{text}\n{'-' * len(text)}")


def main():
    """Run the tour and print what it shows."""
    X, y = load_digits(return_X_y=True)
    X_mem, X_test, y_mem, y_test, row_mem, _ = train_test_split(
        X, y, np.arange(len(y)), test_size=0.3, random_state=0, stratify=y
    )
    metadata = pd.DataFrame({"source": [f"load_digits()[{i}]" for i in row_mem]})
    memory = Memory(X_mem, y_mem, image_metadata=metadata)
    print(f"Memory: {memory} from scikit-learn's handwritten digits; "
          f"{len(y_test)} test images.")

    _heading("1. Accuracy, k = 10 neighbours")
    clf = KNNVoteClassifier(n_neighbors=10).set_memory(memory)
    for voting in VOTING_SCHEMES:
        print(f"  {voting:<9} voting: {clf.set_params(voting=voting).score(X_test, y_test):.3f}")
    clf.set_params(voting="rank")
    staged = [np.mean(p == y_test) for p in clf.staged_predict(X_test)]
    print("  rank voting for k = 1..10 from one search: "
          + " ".join(f"{a:.3f}" for a in staged))

    _heading("2. A prediction explained by its nearest memory items")
    query = X_test[:1]
    print(f"  query 0 is a {y_test[0]}; predicted {clf.predict(query)[0]} "
          f"with probability {clf.predict_proba(query).max():.2f}")
    print(clf.explain(query).head(5).to_string(index=False))

    _heading("3. A new class, added to memory without retraining")
    no_nines = KNNVoteClassifier(n_neighbors=10).set_memory(memory.drop_classes([9]))
    nines = y_test == 9
    print(f"  memory without 9s: accuracy on test 9s = "
          f"{np.mean(no_nines.predict(X_test[nines]) == 9):.3f}")
    nine_items = memory.keep_classes([9])
    no_nines.set_memory(nine_items, mode="expand")
    print(f"  after adding {len(nine_items)} images of 9 to memory: "
          f"accuracy on test 9s = {np.mean(no_nines.predict(X_test[nines]) == 9):.3f}, "
          f"overall = {no_nines.score(X_test, y_test):.3f}")

    _heading("4. Forgetting items: exact unlearning")
    voters = clf.explain(query)["id"].to_numpy()
    clf.forget(voters)
    print(f"  forgot the {len(voters)} items that voted for query 0; "
          f"its new neighbours: {clf.explain(query)['id'].head(5).tolist()} ...")
    scratch = KNNVoteClassifier(n_neighbors=10).set_memory(memory.remove(voters))
    same = np.array_equal(clf.predict_proba(X_test), scratch.predict_proba(X_test))
    print(f"  identical to a classifier built from scratch without them: {same}")

    _heading("5. Pruning a memory with 20% wrong labels")
    rng = np.random.default_rng(0)
    noisy = y_mem.copy()
    flipped = rng.choice(len(noisy), size=len(noisy) // 5, replace=False)
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, flipped.size)) % 10
    dirty = KNNVoteClassifier(n_neighbors=3).fit(X_mem, noisy)
    print(f"  k = 3, no pruning:           {dirty.score(X_test, y_test):.3f}")
    # Wrong-neighbour counts from 10 leave-one-out neighbours per memory item.
    dirty.prune("hard", threshold=8, n_neighbors=10)
    report = dirty.pruning_report()
    excluded = report.loc[report["excluded"], "id"]
    print(f"  hard pruning (threshold 8):  {dirty.score(X_test, y_test):.3f}  "
          f"({len(excluded)} items excluded, {np.isin(excluded, flipped).mean():.0%} of "
          "them mislabelled)")
    dirty.prune("soft", n_neighbors=10)
    print(f"  soft pruning:                {dirty.score(X_test, y_test):.3f}")


if __name__ == "__main__":
    main()
