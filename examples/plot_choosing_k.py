"""
==========================================
Choosing k: accuracy of each voting scheme
==========================================

How many neighbors should vote? :meth:`~skmml.KNNVoteClassifier.staged_predict`
returns the predictions for every ``k = 1 .. n_neighbors`` from a single
neighbor search, so a whole accuracy-vs-k curve costs one search per voting
scheme.

The visual-memory paper (Geirhos et al., 2024) found that plurality voting
degrades as ``k`` grows, because far neighbors count as much as near ones,
while rank voting (weight ``1 / (rank + 2)``) stays stable. The digits below
show the same shape.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skmml import KNNVoteClassifier
from skmml.neighbors import VOTING_SCHEMES

X, y = load_digits(return_X_y=True)
X_mem, X_test, y_mem, y_test = train_test_split(
    X, y, test_size=0.5, random_state=0, stratify=y
)

k_max = 100
ks = np.arange(1, k_max + 1)
fig, ax = plt.subplots(figsize=(7, 4))
for voting in VOTING_SCHEMES:
    clf = KNNVoteClassifier(n_neighbors=k_max, voting=voting).fit(X_mem, y_mem)
    accuracy = [np.mean(pred == y_test) for pred in clf.staged_predict(X_test)]
    ax.plot(ks, accuracy, label=voting)
    print(f"{voting:>9}: k=1 {accuracy[0]:.3f}  k=10 {accuracy[9]:.3f}  "
          f"k=100 {accuracy[-1]:.3f}")
ax.set_xscale("log")
ax.set_xlabel("neighbors that vote, k")
ax.set_ylabel("test accuracy")
ax.set_title("Digits: accuracy vs k, one neighbor search per scheme")
ax.legend()
fig.tight_layout()
plt.show()
