"""
======================================
Tuning with GridSearchCV in a Pipeline
======================================

skmml's classifiers are ordinary scikit-learn estimators: they clone, they
sit in a :class:`~sklearn.pipeline.Pipeline` behind a feature transform, and
:class:`~sklearn.model_selection.GridSearchCV` tunes their parameters. Here a
grid search picks the feature transform, the number of neighbors and the
voting scheme of a :class:`~skmml.KNNVoteClassifier` on the digits, then tunes
``logit_scale`` and ``n_neighbors`` of a small
:class:`~skmml.MemoryModularClassifier`.
"""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skmml import KNNVoteClassifier, MemoryModularClassifier

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.3, random_state=0, stratify=y
)

# %%
# A kNN pipeline
# --------------
# The first step is the "embedding": the raw pixels, standardised pixels, or
# square-rooted pixels (which flattens the ink intensities). The classifier
# L2-normalises whatever it gets and votes by cosine similarity. Every
# candidate is a fresh clone of the pipeline; fitting a kNN classifier only
# stores and indexes its memory, so the 216 fits below take seconds.

pipe = Pipeline([("features", "passthrough"), ("knn", KNNVoteClassifier())])
features = {"raw pixels": "passthrough", "standardised": StandardScaler(),
            "sqrt pixels": FunctionTransformer(np.sqrt)}
param_grid = {
    "features": list(features.values()),
    "knn__n_neighbors": [1, 3, 5, 10, 20, 50],
    "knn__voting": ["rank", "softmax", "distance", "plurality"],
}
search = GridSearchCV(pipe, param_grid, cv=3).fit(X_train, y_train)

best = {k: v for k, v in search.best_params_.items() if k != "features"}
best_features = next(
    n for n, f in features.items() if f is search.best_params_["features"]
)
print(f"best: features={best_features}, {best}; CV accuracy {search.best_score_:.3f}, "
      f"test accuracy {search.score(X_test, y_test):.3f}")

results = pd.DataFrame(search.cv_results_)
results["features"] = [next(n for n, f in features.items() if f is p)
                       for p in results["param_features"]]
scores = results.pivot_table(index=["features", "param_knn__voting"],
                             columns="param_knn__n_neighbors", values="mean_test_score")
print(scores.round(3).to_string())

# %%
# The left panel shows the mean cross-validated accuracy of every voting
# scheme and ``k`` on the raw pixels; the right one, rank voting under each
# feature transform. Rank voting is the one scheme whose accuracy hardly
# depends on ``k``, and standardising the pixels hurts, presumably because it
# gives the rarely-inked border pixels as much weight as the informative
# ones.

raw = scores.loc["raw pixels"]
fig, (ax_map, ax_lines) = plt.subplots(1, 2, figsize=(11, 4))
image = ax_map.imshow(raw.to_numpy(), cmap="viridis", aspect="auto")
ax_map.set_xticks(range(raw.shape[1]), raw.columns)
ax_map.set_yticks(range(raw.shape[0]), raw.index)
for (i, j), value in np.ndenumerate(raw.to_numpy()):
    ax_map.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8,
                color="white" if value < raw.to_numpy().mean() else "black")
ax_map.set_xlabel("n_neighbors")
ax_map.set_title("Raw pixels: mean CV accuracy")
fig.colorbar(image, ax=ax_map)

for name in features:
    rank = scores.loc[(name, "rank")]
    ax_lines.plot(rank.index, rank.to_numpy(), "-o", label=name)
ax_lines.set_xscale("log")
ax_lines.set_xticks(raw.columns, [str(k) for k in raw.columns])
ax_lines.set_xlabel("n_neighbors")
ax_lines.set_ylabel("mean CV accuracy")
ax_lines.set_title("Rank voting, per feature transform")
ax_lines.legend()
fig.tight_layout()

# %%
# Tuning the memory-modular classifier
# ------------------------------------
# :class:`~skmml.MemoryModularClassifier` trains small attention heads, so its
# search is kept small: 500 training images, a 3 x 2 grid, 2 folds, and a
# single training epoch in one batch (``batch_size=512``) with no epoch
# selection (``validation_fraction=None``).
# ``logit_scale`` is the ``s`` in ``z_c = s * cos(...)``: it sets how
# confident the softmax is, so the search scores the candidates by log-loss
# as well as accuracy and refits the one with the best log-loss.

mml_search = GridSearchCV(
    MemoryModularClassifier(max_epochs=1, batch_size=512, validation_fraction=None,
                            random_state=0),
    {"logit_scale": [4.0, 16.0, 64.0], "n_neighbors": [8, 32]},
    cv=2, scoring=["accuracy", "neg_log_loss"], refit="neg_log_loss",
).fit(X_train[:500], y_train[:500])
mml_results = pd.DataFrame(mml_search.cv_results_)
print(mml_results[["param_logit_scale", "param_n_neighbors", "mean_test_accuracy",
                   "mean_test_neg_log_loss"]].round(3).to_string(index=False))
best_mml = mml_search.best_estimator_
print(f"best: {mml_search.best_params_}; test accuracy "
      f"{np.mean(best_mml.predict(X_test) == y_test):.3f}")

fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
for n_neighbors, group in mml_results.groupby("param_n_neighbors"):
    ax_loss.plot(group["param_logit_scale"], -group["mean_test_neg_log_loss"], "-o",
                 label=f"n_neighbors={n_neighbors}")
    ax_acc.plot(group["param_logit_scale"], group["mean_test_accuracy"], "-o",
                label=f"n_neighbors={n_neighbors}")
for ax, what in ((ax_loss, "mean CV log-loss (lower is better)"),
                 (ax_acc, "mean CV accuracy")):
    ax.set_xscale("log")
    ax.set_xticks([4, 16, 64], ["4", "16", "64"])
    ax.minorticks_off()
    ax.set_xlabel("logit_scale")
    ax.set_ylabel(what)
    ax.legend()
fig.suptitle("MemoryModularClassifier: logit_scale sets the confidence")
fig.tight_layout()
plt.show()

# %%
# With a small ``logit_scale`` the logits (here, with an image memory only,
# ``s`` times a cosine, so within ``[-s, s]``) barely separate the classes
# after the softmax: the log-loss is poor. Accuracy moves far less, since
# the scale changes the ranking of the classes only through the training
# step it scales, and the two scores need not agree on the best candidate:
# ``refit`` decides which one picks the model.
