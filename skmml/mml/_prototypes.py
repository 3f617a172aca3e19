"""Class prototypes built from the memory, as in the memory-modular learner.

For each class ``c`` with image items ``I_c`` and text items ``T_c`` (rows
L2-normalised), the reference code computes ``S = I_c @ T_c.T`` and takes

- the image prototype: the mean of the ``M`` images with the largest row sums
  of ``S`` (the images that agree most with the class's texts);
- the text prototype: the mean of the ``M`` texts with the largest column sums;

with ``M = min(n, max_items)`` (16 by default), then L2-normalises each.

A class with items of one modality only has no cross-modal consensus, and
the reference defines none: its prototype is the plain mean of *all* its
items (the neutral choice; a "most central top-M" rule loses to it on real
single-modality memories, see ``doc/benchmarks.rst``), and the missing
modality's prototype is the present modality's, since both live in one
embedding space.
"""

import numpy as np

PROTOTYPE_MODES = ("consensus", "mean", "random")


def _normalise(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _top_mean(items, scores, m):
    top = np.argsort(-scores, kind="stable")[:m]
    return _normalise(items[top].mean(axis=0))


def _class_prototypes(images, texts, mode, max_items, rng):
    """(image prototype, text prototype) of one class; either input may be empty."""
    present = [x for x in (images, texts) if len(x)]
    if mode == "mean":
        protos = [_normalise(x.mean(axis=0)) if len(x) else None for x in (images, texts)]
    elif mode == "random":
        protos = [
            _normalise(x[rng.choice(len(x), min(len(x), max_items), replace=False)].mean(axis=0))
            if len(x) else None
            for x in (images, texts)
        ]
    elif len(present) == 2:
        # Row / column sums of images @ texts.T, without forming the matrix.
        protos = [
            _top_mean(images, images @ texts.sum(axis=0), min(len(images), max_items)),
            _top_mean(texts, texts @ images.sum(axis=0), min(len(texts), max_items)),
        ]
    else:
        (items,) = present
        proto = _normalise(items.mean(axis=0))
        protos = [proto if len(x) else None for x in (images, texts)]
    image_proto, text_proto = protos
    return (
        image_proto if image_proto is not None else text_proto,
        text_proto if text_proto is not None else image_proto,
    )


def class_prototypes(memory, classes, *, mode="consensus", max_items=16, support=None,
                     random_state=None):
    """Image and text prototypes of `classes` from `memory`.

    Parameters
    ----------
    memory : Memory
        The memory; every class in `classes` needs at least one item.
    classes : ndarray of shape (n_classes,)
        The classes, in the order of the returned rows.
    mode : {"consensus", "mean", "random"}, default="consensus"
        "consensus": top-M items by cross-modal similarity (the reference)
        for a class with both modalities, the mean of all items for a class
        with one; "mean": mean of all items; "random": mean of M random
        items.
    max_items : int, default=16
        ``M`` is ``min(n_items, max_items)`` per class and modality.
    support : tuple (X, y), default=None
        Few-shot support embeddings (L2-normalised) and labels: the image
        prototype of each class in ``y`` is the mean of its support shots.
    random_state : int, RandomState or Generator, default=None
        Seeds the "random" mode.

    Returns
    -------
    image_prototypes, text_prototypes : ndarrays of shape (n_classes, n_features)
        L2-normalised, float32.
    """
    if mode not in PROTOTYPE_MODES:
        raise ValueError(f"mode must be one of {PROTOTYPE_MODES}, got {mode!r}.")
    rng = np.random.default_rng(random_state)
    image, text = memory.image, memory.text
    image_rows = _rows_by_class(image.labels, classes)
    text_rows = _rows_by_class(text.labels, classes)
    image_protos = np.empty((len(classes), memory.n_features), dtype=np.float32)
    text_protos = np.empty_like(image_protos)
    for c, label in enumerate(classes):
        images = image.embeddings[image_rows[c]]
        texts = text.embeddings[text_rows[c]]
        if not len(images) and not len(texts):
            raise ValueError(f"Class {label.item()!r} has no items in the memory.")
        image_protos[c], text_protos[c] = _class_prototypes(images, texts, mode, max_items, rng)
    if support is not None:
        X, y = support
        for c in np.flatnonzero(np.isin(classes, y)):
            image_protos[c] = _normalise(X[y == classes[c]].mean(axis=0))
    return image_protos, text_protos


def _rows_by_class(labels, classes):
    """Rows of `labels` per class of `classes`, as a list of index arrays."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, classes, side="left")
    ends = np.searchsorted(sorted_labels, classes, side="right")
    return [order[s:e] for s, e in zip(starts, ends)]
