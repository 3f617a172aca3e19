"""Input checks and L2 normalisation shared by the memory and the estimators."""

import warnings
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_array

# Rows whose norm is this close to 1 are taken as already normalised: they are
# stored as given (no copy), which keeps a saved and re-loaded memory bit-exact.
_UNIT_NORM_ATOL = 1e-5


def check_embeddings(X, *, name="embeddings", dim=None):
    """Return `X` as a finite, non-empty, C-contiguous float32 matrix.

    Raises a ValueError naming `name` for a wrong shape, NaN or inf, an empty
    array, or a dimension other than `dim`.
    """
    X = check_array(
        X,
        dtype=np.float32,
        order="C",
        ensure_all_finite=True,
        ensure_min_samples=1,
        ensure_min_features=1,
        input_name=name,
    )
    if dim is not None and X.shape[1] != dim:
        raise ValueError(
            f"Dimension mismatch: {name} have dimension {X.shape[1]}, but the memory holds "
            f"{dim}-dimensional embeddings."
        )
    return X


def resolve_device(device):
    """"cpu" or "cuda" for a ``device`` parameter; "auto" picks CUDA when torch sees a GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU.")
    return device


def check_n_neighbors(k, n_items, bank="image", exclude_self=False):
    """Raise the same error in every estimator when `k` exceeds a memory bank.

    skmml never silently retrieves fewer than ``n_neighbors`` items: as
    scikit-learn's ``kneighbors``, a memory smaller than ``n_neighbors`` is an
    error that says how to fix it. With `exclude_self` (the training queries
    are the memory and never retrieve themselves) one item fewer is available.
    """
    if k > n_items - exclude_self:
        why = (" and a training query never retrieves itself, so n_neighbors must be "
               "below that") if exclude_self else ""
        raise ValueError(
            f"n_neighbors={k} is larger than the memory, which holds {n_items} {bank} "
            f"items{why}: lower n_neighbors (set_params(n_neighbors=...)) or add items "
            "to the memory."
        )


def l2_normalize(X):
    """Return the rows of float32 `X` scaled to unit L2 norm, read-only.

    Rows already of unit norm are returned without a copy. Other rows are
    first divided by their largest absolute entry and only then squared, so
    that every finite non-zero row comes out of unit norm: rows of norm 1e30
    do not overflow to zero and rows of norm 1e-30 do not underflow and stay
    unnormalised (float32 squares overflow above about 1.8e19 and underflow
    below about 1e-19). All-zero rows stay zero (their cosine similarity to
    everything is 0), as in :func:`sklearn.preprocessing.normalize`
    (:func:`warn_zero_rows` says so).
    """
    with np.errstate(over="ignore", under="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    if np.all(np.abs(norms - 1.0) <= _UNIT_NORM_ATOL):
        out = X.view()
    else:
        scale = np.max(np.abs(X), axis=1) if X.shape[1] else np.zeros(X.shape[0], X.dtype)
        scale[scale == 0.0] = 1.0
        scaled = X / scale[:, None]
        norms = np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        norms[norms == 0.0] = 1.0
        out = (scaled / norms[:, None]).astype(np.float32, copy=False)
    out.flags.writeable = False
    return out


class ZeroEmbeddingWarning(UserWarning):
    """An all-zero embedding: it has no direction, so its similarity to everything is 0."""


def warn_zero_rows(X, *, name="embeddings"):
    """Warn, naming the rows of `X` that are all zero; they are kept.

    As in :func:`sklearn.metrics.pairwise.cosine_similarity`, an all-zero
    row (an empty TF-IDF document, a blank image's features) has cosine
    similarity 0 to every vector: in the memory it is never nearer than
    another item, and as a query all its neighbors tie.
    """
    zero = ~np.any(X, axis=1)
    if zero.any():
        rows = np.flatnonzero(zero)
        warnings.warn(
            f"{name} has {rows.size} all-zero rows (e.g. row {rows[0]}): an all-zero "
            "embedding has no direction, so its cosine similarity to everything is 0.",
            ZeroEmbeddingWarning, stacklevel=3)


#: Rows of a sparse matrix converted to dense at a time (bounds the float32 temporary).
_DENSE_BLOCK = 4096


def densified(X):
    """`X` as a dense C-contiguous float32 array; a sparse `X` is converted in blocks.

    The memory and the searches work on dense rows: a sparse input costs
    ``n_samples * n_features * 4`` bytes once densified, converted
    :data:`_DENSE_BLOCK` rows at a time so that no dense copy in another
    dtype is ever made.
    """
    if not sp.issparse(X):
        return X
    X = X.tocsr()
    out = np.empty(X.shape, dtype=np.float32)
    for start in range(0, X.shape[0], _DENSE_BLOCK):
        out[start:start + _DENSE_BLOCK] = X[start:start + _DENSE_BLOCK].toarray()
    return out


#: Sparse formats taken as they are; any other is converted to CSR first (then densified).
SPARSE_FORMATS = ("csr", "csc", "coo")


def sources_of(X):
    """The file paths an encoder embedded `X` from, or None.

    Image encoders return :class:`~skmml.encoders.Embeddings`, an ndarray
    that carries its items' paths in ``sources``; a classifier reads them
    before validation turns `X` into a plain array, and keeps them as the
    ``source`` metadata of the items it adds to its memory.
    """
    sources = getattr(X, "sources", None)
    if sources is None or len(sources) != np.shape(X)[0]:
        return None
    return list(sources)


def check_labels(labels, n, *, name="labels"):
    """Return `labels` as a 1-D array of length `n`, or raise a ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {labels.shape}.")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but there are {n} embeddings."
        )
    if labels.dtype.kind == "O":
        # Object labels hold strings or numbers, never a mix (as in scikit-learn).
        if all(isinstance(v, str) for v in labels):
            labels = labels.astype(str)
        elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                 for v in labels):
            labels = np.array(labels.tolist())
        else:
            raise ValueError(f"{name} mixes strings and numbers or holds other objects.")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise ValueError(f"{name} contains NaN or inf.")
    if labels.dtype.kind not in "biufUSO":
        raise ValueError(f"{name} has unsupported dtype {labels.dtype}.")
    return labels


def check_ids(ids, n, *, name="ids"):
    """Return `ids` as unique int64 of length `n`, or raise a ValueError."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {ids.shape}.")
    if n and ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}.")
    if n and ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has values above the int64 range.")
    ids = ids.astype(np.int64, copy=False)
    if n and ids.min() < 0:
        raise ValueError(
            f"{name} contains negative values (e.g. {int(ids.min())}): ids are >= 0, and "
            "-1 marks a missing neighbor in search results."
        )
    if np.unique(ids).shape[0] != n:
        raise ValueError(f"{name} contains duplicates.")
    return ids


_INT64_MAX = np.iinfo(np.int64).max


def check_item_ids(ids, *, name="ids"):
    """Return `ids` (ints or an integer array) as sorted unique int64, or raise.

    Item ids are integers in ``0 .. 2**63 - 1``. Floats, strings and bools are
    refused with a TypeError rather than converted (``1.5`` is not id 1 and
    ``"3"`` is not id 3); values outside that range raise a ValueError.
    """
    if isinstance(ids, (bool, np.bool_)) or not isinstance(ids, np.ndarray) and any(
            isinstance(v, (bool, np.bool_)) for v in np.ravel(np.asarray(ids, dtype=object))):
        raise TypeError(f"{name} must be integers, got a bool.")
    array = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    if array.ndim > 1:
        raise ValueError(f"{name} must be a 1-D list of integers, got shape {array.shape}.")
    array = array.reshape(-1)
    if not array.size:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind == "O":
        if not all(isinstance(v, (int, np.integer)) for v in array):
            bad = next(v for v in array if not isinstance(v, (int, np.integer)))
            raise TypeError(f"{name} must be integers, got {type(bad).__name__} {bad!r}.")
        big = [int(v) for v in array if not 0 <= int(v) <= _INT64_MAX]
        raise ValueError(f"{name} must be in 0 .. 2**63 - 1, got {big[0]}.")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got {array.dtype} values "
                        f"(e.g. {array[0].item()!r}).")
    if array.dtype.kind == "u" and array.max() > _INT64_MAX:
        raise ValueError(f"{name} must be in 0 .. 2**63 - 1, got {int(array.max())}.")
    if array.dtype.kind == "i" and array.min() < 0:
        raise ValueError(f"{name} must be in 0 .. 2**63 - 1, got {int(array.min())}.")
    array = array.astype(np.int64, copy=False)
    return np.unique(array) if array.size > 1 else array


@contextmanager
def input_metadata_kept_on_error(estimator):
    """Restore ``n_features_in_`` / ``feature_names_in_`` if the block raises.

    ``validate_data(reset=True)`` sets them before the rest of a ``fit`` is
    checked; a ``fit`` that then fails must leave a fitted estimator usable.
    """
    names = ("n_features_in_", "feature_names_in_")
    saved = {n: estimator.__dict__[n] for n in names if n in estimator.__dict__}
    try:
        yield
    except BaseException:
        for name in names:
            estimator.__dict__.pop(name, None)
        estimator.__dict__.update(saved)
        raise
