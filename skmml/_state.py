"""Copy-on-write estimator state: consistent reads while the memory changes.

Every read method of a fitted skmml estimator (``predict``, ``kneighbors``,
``explain``, ...) takes the estimator's current :class:`State` once and uses
nothing else. Every mutating method (``partial_fit``, ``forget``,
``set_memory``, ``prune``, ...) builds a complete new state aside, never
touching the published one, and installs it with :func:`publish`: one update
of the estimator's ``__dict__`` that also sets the public fitted attributes.
So a read sees the whole state before or after a change, never a mix, and a
change that raises (even ``KeyboardInterrupt``) leaves the estimator as it
was. Writers are serialised by a per-estimator lock (:func:`writer_lock`).
"""

import threading

from sklearn.utils.validation import validate_data

#: Input metadata that ``validate_data(reset=True)`` sets on an estimator.
INPUT_METADATA = ("n_features_in_", "feature_names_in_")


class State:
    """The fields a read needs; never changed after publication, except caches.

    A cache field (e.g. the memory's projections by a head) may be filled
    lazily by readers: it is derived from the other fields only.
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def replace(self, **changes):
        """A new state with `changes` applied; this one is left as it is."""
        return State(**{**self.__dict__, **changes})


class WriterLock:
    """Holds a re-entrant lock; pickles and deep-copies as a new, free lock."""

    def __init__(self):
        self.lock = threading.RLock()

    def __reduce__(self):
        return (WriterLock, ())

    def __deepcopy__(self, memo):
        return WriterLock()


_GUARD = threading.Lock()


def writer_lock(estimator):
    """The estimator's writer lock (created on first use), for a ``with`` block.

    It is the C-implemented ``threading.RLock`` itself, whose ``__enter__``
    and ``__exit__`` cannot be interrupted half-way by a signal.
    """
    holder = estimator.__dict__.get("_writer_lock")
    if holder is None:
        with _GUARD:
            holder = estimator.__dict__.setdefault("_writer_lock", WriterLock())
    return holder.lock


def validate_aside(estimator, *args, **kwargs):
    """``validate_data(..., reset=True)`` that leaves `estimator` untouched.

    A refit must not change the input metadata (``n_features_in_``,
    ``feature_names_in_``) that concurrent reads validate against before its
    new state is published: the validation runs on a stand-in with the same
    parameters, and the metadata it sets is returned, to be published with
    the state (:func:`publish`).

    Returns
    -------
    validated : the output of ``validate_data``
    metadata : dict
        Values of :data:`INPUT_METADATA` (None for feature names when ``X``
        had none).
    """
    stand_in = type(estimator).__new__(type(estimator))
    stand_in.__dict__.update(estimator.get_params(deep=False))
    validated = validate_data(stand_in, *args, reset=True, **kwargs)
    return validated, {name: stand_in.__dict__.get(name) for name in INPUT_METADATA}


def publish(estimator, state, **attributes):
    """Install `state` and the public attributes derived from it in one step.

    ``dict.update`` with string keys runs no Python code between its
    insertions, so no other thread (nor a signal handler) can observe a
    partial update; the previous state is kept alive until the update is
    done, so that no object's deallocation runs in the middle of it. An
    attribute given as None among :data:`INPUT_METADATA` is removed after
    the update (fitted feature names that no longer apply).
    """
    previous = estimator.__dict__.get("_state")
    drop = [name for name in INPUT_METADATA if name in attributes and attributes[name] is None]
    estimator.__dict__.update(
        {"_state": state, **{k: v for k, v in attributes.items() if k not in drop}})
    for name in drop:
        estimator.__dict__.pop(name, None)
    del previous
