"""A Pipeline whose memory operations reach its classifier through the encoder.

scikit-learn's :class:`~sklearn.pipeline.Pipeline` exposes ``fit``,
``predict`` and the other methods of a plain classifier, so a pipeline of an
encoder and a skmml classifier cross-validates and grid-searches on raw
images as it is. What it does not expose are the operations on the
classifier's memory: adding labelled items, forgetting items, swapping the
memory, explaining a decision. :class:`Pipeline` (and :func:`make_pipeline`)
adds them, as imbalanced-learn's pipeline adds resampling: each one passes
raw inputs through the steps before the classifier, then calls the
classifier. The item ids, explanations and memory are the classifier's own.
"""

from sklearn import pipeline as _sklearn_pipeline
from sklearn.utils.metaestimators import available_if

__all__ = ["Pipeline", "make_pipeline"]


def _final_has(method):
    """For :func:`available_if`: whether the final step has `method`."""

    def check(self):
        getattr(self._final_estimator, method)  # AttributeError: not available
        return True

    return check


class Pipeline(_sklearn_pipeline.Pipeline):
    """scikit-learn's Pipeline, plus the memory operations of its final classifier.

    Everything of :class:`sklearn.pipeline.Pipeline` works as there. When the
    final step is a :class:`~skmml.KNNVoteClassifier` or a
    :class:`~skmml.MemoryModularClassifier`, its memory operations are
    available on the pipeline and take raw inputs (e.g. image file paths):
    :meth:`partial_fit`, :meth:`explain`, :meth:`kneighbors`,
    :meth:`staged_predict` transform `X` through the steps before the
    classifier; :meth:`forget`, :meth:`set_memory`, :meth:`prune`,
    :meth:`unprune` and :meth:`pruning_report` act on the classifier. Items
    embedded from files keep their paths as the ``source`` metadata of the
    memory (see :class:`~skmml.encoders.Embeddings`), so explanations name
    and show the memory images.

    The steps before the classifier must be fitted (or, as skmml's encoders,
    need no fitting) before :meth:`partial_fit` on an unfitted pipeline.

    Parameters
    ----------
    steps, transform_input, memory, verbose
        As for :class:`sklearn.pipeline.Pipeline`.

    See Also
    --------
    make_pipeline : build one from its steps, naming them.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from skmml import KNNVoteClassifier
    >>> from skmml.pipeline import make_pipeline
    >>> flatten = FunctionTransformer(lambda images: np.reshape(images, (len(images), -1)))
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, (6, 4, 4)).astype(np.float32)
    >>> pipe = make_pipeline(flatten, KNNVoteClassifier(n_neighbors=2))
    >>> pipe = pipe.fit(images, [0, 0, 0, 1, 1, 1])
    >>> pipe.partial_fit(images[:1] + 1, [2]).forget([3]).memory_.image.ids
    array([0, 1, 2, 4, 5, 6])
    >>> pipe.explain(images[:1])[["rank", "id", "label"]]
       rank  id  label
    0     0   0      0
    1     1   6      2
    """

    def _transform_to_final(self, X):
        """`X` through every step before the final one (their ``transform``)."""
        for _, _, transformer in self._iter(with_final=False, filter_passthrough=True):
            X = transformer.transform(X)
        return X

    @property
    def memory_(self):
        """The final classifier's memory."""
        return self._final_estimator.memory_

    @available_if(_final_has("partial_fit"))
    def partial_fit(self, X, y, **params):
        """Transform `X`, then call the classifier's ``partial_fit``.

        For a :class:`~skmml.KNNVoteClassifier`: add the labelled items to
        the memory, no retraining (``ids=`` and ``classes=`` pass through;
        the ids given are ``self[-1].added_ids_``). For a
        :class:`~skmml.MemoryModularClassifier`: one training epoch of the
        heads.

        Parameters
        ----------
        X : iterable
            Raw inputs, as the first step takes them.
        y : array-like of shape (n_samples,)
        **params : dict
            Keyword arguments of the classifier's ``partial_fit``.

        Returns
        -------
        self : Pipeline
        """
        self._final_estimator.partial_fit(self._transform_to_final(X), y, **params)
        return self

    @available_if(_final_has("forget"))
    def forget(self, ids):
        """Forget memory items by id (exact unlearning); see the classifier's ``forget``.

        Parameters
        ----------
        ids : int or array-like of int

        Returns
        -------
        self : Pipeline
        """
        self._final_estimator.forget(ids)
        return self

    @available_if(_final_has("set_memory"))
    def set_memory(self, memory, mode="replace", **params):
        """Replace or expand the classifier's memory; see its ``set_memory``.

        The memory holds embeddings: build it with the pipeline's encoder,
        e.g. ``Memory.from_folder(root, pipe[0])``.

        Parameters
        ----------
        memory : Memory or MilvusMemory
        mode : {"replace", "expand"}, default="replace"
        **params : dict
            Other keyword arguments of the classifier's ``set_memory``.

        Returns
        -------
        self : Pipeline
        """
        self._final_estimator.set_memory(memory, mode, **params)
        return self

    @available_if(_final_has("explain"))
    def explain(self, X):
        """The neighbors behind each decision on raw inputs; see the classifier's ``explain``.

        Parameters
        ----------
        X : iterable
            Raw inputs, as the first step takes them.

        Returns
        -------
        explanation : pandas.DataFrame
            One row per (query, neighbor), with the memory items' metadata
            (``source``: the file of each memory image, when known).
        """
        return self._final_estimator.explain(self._transform_to_final(X))

    @available_if(_final_has("kneighbors"))
    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Nearest memory items of raw inputs; see the classifier's ``kneighbors``.

        Parameters
        ----------
        X : iterable, default=None
            Raw inputs; None queries every memory item, excluding itself.
        n_neighbors : int, default=None
        return_distance : bool, default=True

        Returns
        -------
        distances, ids : ndarrays of shape (n_queries, n_neighbors)
        """
        if X is not None:
            X = self._transform_to_final(X)
        return self._final_estimator.kneighbors(X, n_neighbors, return_distance)

    @available_if(_final_has("staged_predict"))
    def staged_predict(self, X):
        """Predictions for every ``k = 1 .. n_neighbors`` on raw inputs.

        Parameters
        ----------
        X : iterable

        Yields
        ------
        y : ndarray of shape (n_queries,)
        """
        yield from self._final_estimator.staged_predict(self._transform_to_final(X))

    @available_if(_final_has("prune"))
    def prune(self, mode="hard", threshold=1, n_neighbors=None):
        """Prune the classifier's memory; see :meth:`skmml.KNNVoteClassifier.prune`.

        Returns
        -------
        self : Pipeline
        """
        self._final_estimator.prune(mode, threshold, n_neighbors)
        return self

    @available_if(_final_has("unprune"))
    def unprune(self):
        """Switch the classifier's pruning off. Returns self."""
        self._final_estimator.unprune()
        return self

    @available_if(_final_has("pruning_report"))
    def pruning_report(self):
        """The classifier's :meth:`~skmml.KNNVoteClassifier.pruning_report`."""
        return self._final_estimator.pruning_report()


def make_pipeline(*steps, memory=None, transform_input=None, verbose=False):
    """A :class:`Pipeline` of `steps`, named as :func:`sklearn.pipeline.make_pipeline` names them.

    Parameters
    ----------
    *steps : estimators
    memory, transform_input, verbose
        As for :func:`sklearn.pipeline.make_pipeline`.

    Returns
    -------
    pipeline : Pipeline

    Examples
    --------
    >>> from skmml import KNNVoteClassifier, TimmImageEncoder
    >>> from skmml.pipeline import make_pipeline
    >>> make_pipeline(TimmImageEncoder("resnet18", pretrained=False),
    ...               KNNVoteClassifier()).named_steps.keys()
    dict_keys(['timmimageencoder', 'knnvoteclassifier'])
    """
    return Pipeline(_sklearn_pipeline._name_estimators(steps), memory=memory,
                    transform_input=transform_input, verbose=verbose)
