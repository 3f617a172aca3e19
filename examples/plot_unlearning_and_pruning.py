"""
======================
Unlearning and pruning
======================

A :class:`~skmml.KNNVoteClassifier` knows exactly what its memory holds, so
two kinds of repair need no retraining:

- **pruning** (:meth:`~skmml.KNNVoteClassifier.prune`) finds memory items that
  mislead their neighbors, typically mislabelled ones, and excludes them
  (``"hard"``) or down-weights them (``"soft"``); it is reversible with
  :meth:`~skmml.KNNVoteClassifier.unprune`;
- **forgetting** (:meth:`~skmml.KNNVoteClassifier.forget`) removes items by id,
  and is *exact unlearning*: afterwards the classifier predicts exactly as one
  built from scratch without those items.

The memory below is the digits' training half with 20% of its labels flipped
to a wrong class.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skmml import KNNVoteClassifier

X, y = load_digits(return_X_y=True)
X_mem, X_test, y_mem, y_test = train_test_split(
    X, y, test_size=0.5, random_state=0, stratify=y
)


def flip_labels(rate, seed=0):
    """`y_mem` with a fraction `rate` of the labels changed to another class."""
    rng = np.random.default_rng(seed)
    noisy = y_mem.copy()
    flipped = rng.choice(len(noisy), size=int(round(rate * len(noisy))), replace=False)
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, flipped.size)) % 10
    return noisy, flipped


noisy, flipped = flip_labels(0.2)
k = 5
clf = KNNVoteClassifier(n_neighbors=k).fit(X_mem, noisy)  # memory ids = rows of X_mem
unpruned = clf.predict_proba(X_test)
print(f"memory: {len(noisy)} items, {len(flipped)} mislabelled; k = {k}")
print(f"no pruning:   accuracy {clf.score(X_test, y_test):.3f}")

# %%
# Pruning
# -------
# Every memory item queries the memory (leave-one-out) for its 10 nearest
# neighbors; each neighbor of another class gets one *wrong-neighbor* count.
# Hard pruning excludes the items counted ``threshold`` times or more; soft
# pruning multiplies each item's vote by ``1.75 / (1 + count)``.
# :meth:`~skmml.KNNVoteClassifier.pruning_report` lists the counts.

clf.prune("hard", threshold=8, n_neighbors=10)
report = clf.pruning_report()
hard_accuracy = clf.score(X_test, y_test)
excluded = report.loc[report["excluded"], "id"].to_numpy()
print(f"hard pruning: accuracy {hard_accuracy:.3f}, {len(excluded)} items excluded, "
      f"{np.isin(excluded, flipped).mean():.0%} of them mislabelled")
print(report.head(5).to_string(index=False))

clf.prune("soft", n_neighbors=10)
print(f"soft pruning: accuracy {clf.score(X_test, y_test):.3f}")

# Pruning only changes vote weights; unprune() restores the original votes.
clf.unprune()
assert np.array_equal(clf.predict_proba(X_test), unpruned)
print("after unprune(): predictions identical to the unpruned classifier")

# %%
# Mislabelled items are the ones their neighbors disagree with: their
# wrong-neighbor counts sit far to the right of the clean items'.

is_flipped = np.isin(report["id"], flipped)
fig, ax = plt.subplots(figsize=(7, 3.8))
bins = np.arange(report["wrong_count"].max() + 2) - 0.5
ax.hist(report.loc[~is_flipped, "wrong_count"], bins=bins, alpha=0.6,
        label="correct label")
ax.hist(report.loc[is_flipped, "wrong_count"], bins=bins, alpha=0.6,
        label="flipped label")
ax.axvline(7.5, color="k", ls="--", lw=1)
ax.text(7.7, ax.get_ylim()[1] * 0.9, "hard pruning\nexcludes (threshold 8)", va="top")
ax.set_xlabel("wrong-neighbor count (leave-one-out, 10 neighbors)")
ax.set_ylabel("memory items")
ax.set_title("Which memory items mislead their neighbors?")
ax.legend(loc="center right")
fig.tight_layout()

# %%
# Exact unlearning with ``forget``
# --------------------------------
# First forget a whole class: every memory item labelled 3. The class
# disappears from ``classes_``, and the classifier, with hard pruning on
# (recomputed for the smaller memory), predicts *exactly* as a classifier
# fitted from scratch on the remaining items and pruned the same way.

clf.prune("hard", threshold=8, n_neighbors=10)
memory = clf.memory_.image
threes = memory.ids[memory.labels == 3]
clf.forget(threes)
keep = ~np.isin(np.arange(len(noisy)), threes)
scratch = KNNVoteClassifier(n_neighbors=k).fit(X_mem[keep], noisy[keep])
scratch.prune("hard", threshold=8, n_neighbors=10)
same = np.array_equal(clf.predict_proba(X_test), scratch.predict_proba(X_test))
assert same and np.array_equal(clf.predict(X_test), scratch.predict(X_test))
print(f"\nforgot {len(threes)} items of class 3: classes_ = {clf.classes_}; "
      f"predictions and probabilities equal a refit from scratch: {same}")

# Then forget a set of items: the mislabelled ones, as if an annotator had
# flagged them. Again the result is the refit on what remains.
clf = KNNVoteClassifier(n_neighbors=k).fit(X_mem, noisy)
clf.forget(flipped)
keep = ~np.isin(np.arange(len(noisy)), flipped)
scratch = KNNVoteClassifier(n_neighbors=k).fit(X_mem[keep], noisy[keep])
same = np.array_equal(clf.predict_proba(X_test), scratch.predict_proba(X_test))
assert same
print(f"forgot the {len(flipped)} mislabelled items: accuracy "
      f"{clf.score(X_test, y_test):.3f}; equal to a refit from scratch: {same}")

# %%
# Accuracy against the noise rate
# -------------------------------
# Without knowing which labels are wrong, pruning recovers part of the
# accuracy that label noise costs; forgetting the mislabelled items (possible
# only when they are known) shows how much there is to recover. Each point
# averages three random draws of the flipped labels.

rates = [0.0, 0.1, 0.2, 0.3, 0.4]
curves = {"no pruning": [], "hard pruning (threshold 8)": [], "soft pruning": [],
          "forget the mislabelled items": []}
for rate in rates:
    scores = np.zeros(len(curves))
    for seed in range(3):
        noisy_r, flipped_r = flip_labels(rate, seed)
        clf = KNNVoteClassifier(n_neighbors=k).fit(X_mem, noisy_r)
        scores[0] += clf.score(X_test, y_test)
        clf.prune("hard", threshold=8, n_neighbors=10)
        scores[1] += clf.score(X_test, y_test)
        scores[2] += clf.prune("soft", n_neighbors=10).score(X_test, y_test)
        scores[3] += clf.unprune().forget(flipped_r).score(X_test, y_test)
    for curve, score in zip(curves.values(), scores / 3):
        curve.append(score)

print("\nnoise rate:                    " + "  ".join(f"{r:>5.0%}" for r in rates))
for name, accuracy in curves.items():
    print(f"{name:<30} " + "  ".join(f"{a:.3f}" for a in accuracy))

fig, ax = plt.subplots(figsize=(7, 4))
for (name, accuracy), style in zip(curves.items(), ["-o", "-s", "-^", ":"]):
    ax.plot(np.multiply(rates, 100), accuracy, style, label=name)
ax.set_xlabel("memory labels flipped (%)")
ax.set_ylabel("test accuracy")
ax.set_title(f"Digits, k = {k} rank voting: pruning a noisy memory")
ax.legend()
fig.tight_layout()
plt.show()
