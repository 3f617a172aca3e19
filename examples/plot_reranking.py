"""
=====================================================
Re-ranking: a cheap memory, then a stronger embedding
=====================================================

A memory searched at scale is kept cheap (quantised, or reduced by PCA);
its nearest items are then re-ranked with a stronger embedding of the same
items, the second stage of the visual memory (Geirhos et al., 2024; their
strongest second stage is a vision-language model, see
:class:`~skmml.VLMReranker`).

Here the memory stores the digits at 1 bit per pixel (8 bytes per image).
:class:`~skmml.EmbeddingReranker` re-sorts the candidates that this memory
retrieves by their full 4-bit pixels and lets the 10 best vote. The more
candidates, the closer the two stages come to searching the full pixels.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skmml import EmbeddingReranker, ExplanationDisplay, KNNVoteClassifier

digits = load_digits()
X, y = digits.data.astype(np.float32), digits.target
ids = np.arange(len(y))
X_mem, X_test, y_mem, y_test, ids_mem, _ = train_test_split(
    X, y, ids, test_size=0.5, random_state=0, stratify=y)
bits = (X_mem > 8).astype(np.float32)   # the cheap memory: 1 bit per pixel

full = KNNVoteClassifier(n_neighbors=10).fit(X_mem, y_mem).score(X_test, y_test)
cheap = KNNVoteClassifier(n_neighbors=10).fit(bits, y_mem).score(X_test, y_test)
candidates = [10, 20, 50, 100, 200]
two_stage = []
for n in candidates:
    clf = KNNVoteClassifier(
        n_neighbors=n, reranker=EmbeddingReranker(X_mem, n_neighbors=10)).fit(bits, y_mem)
    two_stage.append(clf.score(X_test, y_test))   # the queries are full precision
    print(f"{n:3d} candidates: {two_stage[-1]:.3f}")
print(f"1-bit memory alone: {cheap:.3f}, full pixels: {full:.3f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(candidates, two_stage, "o-", label="1-bit search + re-ranking by full pixels")
ax.axhline(full, color="C2", linestyle="--", label="search on full pixels")
ax.axhline(cheap, color="C3", linestyle=":", label="search on the 1-bit memory")
ax.set_xscale("log")
ax.set_xlabel("candidates retrieved from the 1-bit memory")
ax.set_ylabel("test accuracy (10 neighbors vote)")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# Both stages in one explanation
# ------------------------------
# ``explain`` keeps the first stage's neighbors and adds the vote and the
# re-ranked answer; the display titles the query with both. Here is a query
# that the 1-bit vote gets wrong and the re-ranker right.
clf = KNNVoteClassifier(
    n_neighbors=50, reranker=EmbeddingReranker(X_mem, n_neighbors=10)).fit(bits, y_mem)
table = clf.explain(X_test)
answers = table.drop_duplicates("query")
fixed = answers[(answers["vote_label"] != answers["reranked_label"])
                & (answers["reranked_label"].to_numpy() == y_test[answers["query"]])]
query = int(fixed["query"].iloc[0])
ExplanationDisplay.from_estimator(
    clf, X_test, query=query, images=digits.images[ids_mem],
    query_image=X_test[query].reshape(8, 8),
    title=f"A {y_test[query]}: its 1-bit neighbors, then re-ranked")
plt.show()
