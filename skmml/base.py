"""The base of every classifier over a memory: the memory contract in one place.

:class:`BaseMemoryClassifier` holds what both skmml classifiers do the same
way, as scikit-learn's ``NeighborsBase`` does for its neighbors estimators:

- the memory is reached only through a backend (:mod:`skmml.backends`);
- the state is published copy-on-write (:mod:`skmml._state`): every read
  takes one snapshot, every change builds the next state aside and installs
  it in one step, so a failed or interrupted change leaves the estimator as
  it was;
- :meth:`~BaseMemoryClassifier.set_memory` (replace or expand) and
  :meth:`~BaseMemoryClassifier.forget` check, at the call and before any
  backend writes, that the resulting memory fits the estimator;
- one explanation schema (:data:`EXPLAIN_COLUMNS`) and pickling.

A subclass supplies what is its own: which modalities it searches
(``_modalities``), what a memory must hold for it (``_check_fits``), and how
it builds and publishes its state from a backend (``_adopt``).
"""

from abc import ABCMeta, abstractmethod

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ._state import validate_aside, writer_lock
from ._validation import (SPARSE_FORMATS, check_item_ids, densified, l2_normalize,
                          sources_of, warn_zero_rows)
from .backends import as_backend, check_memory
from .memory import Memory
from .retrieval import NeighborIndex

#: Columns of every ``explain`` table, before the items' metadata columns.
EXPLAIN_COLUMNS = ("query", "modality", "rank", "id", "label", "similarity", "weight")

SET_MEMORY_MODES = ("replace", "expand")

#: How every classifier checks its ``X``: float32 rows, sparse matrices accepted.
_X_CHECKS = {"dtype": np.float32, "order": "C", "accept_sparse": SPARSE_FORMATS}


def source_metadata(sources):
    """The item metadata that records `sources` (file paths), or None without them."""
    return None if sources is None else pd.DataFrame({"source": sources})


class BaseMemoryClassifier(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """Base class of the classifiers over a replaceable memory (private).

    Warning: this class should not be used directly; use the derived classes.
    """

    #: The fitted attribute that :func:`~sklearn.utils.validation.check_is_fitted` needs.
    _fitted_attribute = "memory_"

    # -- the memory's backend ------------------------------------------------------------

    def _modalities(self, memory):
        """The modalities the estimator searches in `memory`."""
        return ("image",)

    def _unified(self):
        """Whether the searched modalities are one memory."""
        return False

    def _backend(self, memory, modalities=None):
        """The backend of `memory` for this estimator's parameters.

        It searches `modalities`, by default :meth:`_modalities`.
        """
        return as_backend(
            memory, NeighborIndex(self.index, self.index_params, self.index_device),
            self._modalities(memory) if modalities is None else modalities, self._unified())

    def _check_fits(self, memory, n_items=None):
        """Raise a ValueError when `memory` (with `n_items` per modality left) cannot serve.

        Checked before any index is built or any backend writes.
        """

    @staticmethod
    def _check_classes(y, classes):
        """The ``classes`` argument of ``partial_fit``: every label of `y` must be in it."""
        if classes is not None:
            unknown = np.setdiff1d(np.asarray(y), classes)
            if unknown.size:
                raise ValueError(f"y has labels not in classes: {unknown[:10].tolist()}.")

    def _check_replacement(self, memory):
        """Raise a ValueError when `memory` cannot replace the fitted memory."""

    def _read_state(self):
        """The published state, for a read (or a writer that derives the next one)."""
        check_is_fitted(self, self._fitted_attribute)
        return self._state

    def _fit_input(self, X, y=None):
        """Input of a fit, validated aside (see :func:`~skmml._state.validate_aside`).

        Returns ``(X, y, input_metadata, sources)``: `X` dense float32 (a
        sparse `X` densified), and the file paths `X` was encoded from, if
        any (:func:`~skmml._validation.sources_of`).
        """
        sources = sources_of(X)
        if y is None:
            X, metadata = validate_aside(self, X, **_X_CHECKS)
        else:
            (X, y), metadata = validate_aside(self, X, y, **_X_CHECKS)
        return densified(X), y, metadata, sources

    def _more_input(self, X, y=None):
        """Input of a fitted estimator, checked against the fit's: ``(X, y, sources)``."""
        sources = sources_of(X)
        if y is None:
            X = validate_data(self, X, reset=False, **_X_CHECKS)
        else:
            X, y = validate_data(self, X, y, reset=False, **_X_CHECKS)
        return densified(X), y, sources

    def _snapshot(self, X):
        """(state, unit queries): one published state for the whole read, and `X` checked.

        All-zero queries are kept (similarity 0 to every item) with a warning.
        """
        check_is_fitted(self, self._fitted_attribute)
        X = self._more_input(X)[0]
        state = self._state
        if X.shape[1] != state.backend.n_features:
            # A memory of another width was published after validation: the
            # read sees the new memory, so it fails as it would have after.
            validate_data(self, X, reset=False)
        warn_zero_rows(X, name="X")
        return state, l2_normalize(X)

    # -- changing the memory -------------------------------------------------------------

    def set_memory(self, memory, mode="replace", *, reassign_ids=False):
        """Replace the memory, or expand it with new items; no retraining.

        Parameters
        ----------
        memory : Memory or MilvusMemory
            The new memory (``mode="replace"``), or the items to add
            (``mode="expand"``: a :class:`~skmml.Memory`, whose ids must not
            clash with the current memory's). A :class:`~skmml.MilvusMemory`
            is searched where it lives; see :ref:`scale`.
        mode : {"replace", "expand"}, default="replace"
            Replace indexes the new memory; expand indexes only the added items.
        reassign_ids : bool, default=False
            With ``mode="expand"``, give the added items new ids from the
            memory's high-water mark instead of raising on clashing ids.

        Returns
        -------
        self : estimator
            The ids that an expansion gave are in ``added_ids_``.
        """
        return self._set_memory(memory, mode, reassign_ids)

    def _set_memory(self, memory, mode, reassign_ids, **extra):
        self._validate_params()
        if mode not in SET_MEMORY_MODES:
            raise ValueError(f"mode must be 'replace' or 'expand', got {mode!r}.")
        if reassign_ids and mode != "expand":
            raise ValueError("reassign_ids=True applies to mode='expand' only.")
        with writer_lock(self):
            if mode == "replace":
                check_memory(memory)
                self._check_replacement(memory)
                self._check_fits(memory)
                self._adopt(self._backend(memory), replace=True, **extra)
                return self
            if not isinstance(memory, Memory):
                raise TypeError("set_memory(mode='expand') adds the items of a Memory, got "
                                f"{type(memory).__name__}.")
            state = self._read_state()
            if memory.n_features is not None and memory.n_features != state.backend.n_features:
                raise ValueError(
                    f"Dimension mismatch: the added items have dimension {memory.n_features}, "
                    f"the memory holds {state.backend.n_features}-dimensional embeddings.")
            backend, ids = state.backend.expand(memory, reassign_ids)
            self._adopt(backend, added_ids=ids, **extra)
        return self

    def forget(self, ids):
        """Remove items from the memory by id: exact unlearning, no retraining.

        Parameters
        ----------
        ids : int or array-like of int
            Ids of the items to forget (image or text items). Floats, strings
            and bools are refused (TypeError); an id that is not in the
            memory, or a removal that would leave the memory too small for
            the estimator, is a ValueError and nothing is removed.

        Returns
        -------
        self : estimator
        """
        ids = check_item_ids(ids)
        with writer_lock(self):
            state = self._read_state()
            # Before the backend writes: a Milvus collection changes at once.
            self._check_fits(state.backend.memory, state.backend.n_items_without(ids))
            self._adopt(state.backend.remove(ids))
        return self

    @abstractmethod
    def _adopt(self, backend, replace=False, added_ids=None, **extra):
        """Build the state of `backend` aside and publish it (see :mod:`skmml._state`).

        `replace`: `backend` is a new memory (``set_memory``), not a change
        of the published one; `added_ids`: the ids the change gave.
        """

    # -- explanations --------------------------------------------------------------------

    @staticmethod
    def _explain_frame(backend, modality, neighbors, weights):
        """The :data:`EXPLAIN_COLUMNS` rows of one modality's neighbors, with metadata."""
        n, k = neighbors.keys.shape
        found = (neighbors.keys >= 0).ravel()
        keys = neighbors.keys.ravel()[found]
        table = pd.DataFrame({
            "query": np.repeat(np.arange(n), k)[found],
            "modality": modality,
            "rank": np.tile(np.arange(k), n)[found],
            "id": neighbors.ids.ravel()[found],
            "label": neighbors.labels.ravel()[found],
            "similarity": neighbors.sims.ravel()[found],
            "weight": np.asarray(weights).ravel()[found],
        })
        metadata = backend.metadata(keys, modality)
        return pd.concat([table, metadata], axis=1) if metadata.shape[1] else table

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # densified on the way in (see _fit_input)
        tags.input_tags.allow_nan = False
        tags.classifier_tags.multi_label = False
        return tags

    # -- pickling ------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: never alter the live estimator
        if state.get("_state") is not None:
            state["_state"] = self._state_for_pickle(state["_state"])
        return state

    def _state_for_pickle(self, published):
        """The published state as it pickles (caches dropped, keys renumbered)."""
        return published
