"""KNNVoteClassifier: the "visual memory" of Geirhos et al. (2024)."""

from numbers import Integral, Real

import numpy as np
import pandas as pd
from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets

from .._state import State, publish, writer_lock
from .._validation import check_n_neighbors, sources_of
from ..backends import MemoryLike
from ..base import BaseMemoryClassifier, source_metadata
from ..memory import Memory
from ._pruning import PRUNING_MODES, item_weights, wrong_neighbor_counts
from ._rerank import rerank_all
from ._voting import VOTING_SCHEMES, staged_winners, tally, vote_weights


class KNNVoteClassifier(BaseMemoryClassifier):
    """k-nearest-neighbor classifier over a replaceable memory of embeddings.

    The "visual memory" of Geirhos et al. (2024): a query is classified by
    the weighted votes of its nearest memory items (cosine similarity over
    L2-normalised embeddings, searched with FAISS). Knowledge lives in the
    memory, not in weights: items can be added (:meth:`partial_fit`),
    forgotten exactly (:meth:`forget`), pruned (:meth:`prune`) or swapped
    (:meth:`set_memory`) without retraining, and every decision can be
    explained by the neighbors that voted (:meth:`explain`).

    Parameters
    ----------
    n_neighbors : int, default=10
        Neighbors that vote, ``k``.
    voting : {"rank", "softmax", "distance", "plurality"} or callable, default="rank"
        Vote weight of a neighbor with 0-based rank ``i`` and cosine
        distance ``d``: ``1 / (i + rank_offset)``, ``exp((1 - d) /
        temperature)``, ``exp(-d) ** distance_exponent`` or ``1``. A callable
        gets ``(similarities, ranks)`` arrays of shape (n_queries, k) and
        returns non-negative weights of that shape.
    rank_offset : float, default=2.0
        Offset of rank voting; the nearest neighbor weighs ``1 / rank_offset``.
    temperature : float, default=0.07
        Temperature of softmax voting.
    distance_exponent : float, default=1.0
        Exponent of distance voting.
    index : str, default="flat"
        Search index: "flat" (exact), "ivf", "ivfsq8", "ivfpq", "hnsw", or any
        :func:`faiss.index_factory` string. See :class:`~skmml.retrieval.NeighborIndex`.
    index_params : dict, default=None
        FAISS search parameters, e.g. ``{"nprobe": 32}`` or ``{"efSearch": 256}``.
    index_device : {"auto", "cpu", "cuda"}, default="auto"
        Where the index lives; "auto" uses a GPU when FAISS has GPU support
        and one is present.
    verbose : int, default=0
        Show progress bars on long searches (pruning's memory-vs-memory
        search, large query sets) and over re-ranking.
    reranker : BaseReranker or None, default=None
        A second stage after the vote (see :ref:`rerank`): it gets each
        batch of queries with the neighbors that voted and answers in the
        vote's place in :meth:`predict`, :meth:`predict_proba` and
        :meth:`explain`, e.g. :class:`~skmml.EmbeddingReranker`
        or :class:`~skmml.VLMReranker`. Queries for which it
        raises or gives no valid answer keep the vote, with a
        :class:`~skmml.RerankFallbackWarning`. None: the vote
        decides.
    memory : Memory or MilvusMemory, default=None
        A prepared memory. When given, :meth:`fit` uses it as is (its image
        items vote; text items are ignored) and ``X, y`` only check the
        input dimension; it is never copied. When None, :meth:`fit` builds the
        memory from ``X, y``. A :class:`~skmml.MilvusMemory` is searched
        where it lives (see :ref:`scale`); ``index``, ``index_params`` and
        ``index_device`` then do not apply (the collection has its index).

    Attributes
    ----------
    memory_ : Memory or MilvusMemory
        The memory that votes. Its image items have ids ``0 .. n-1`` after
        ``fit(X, y)``; ids stay stable when items are added or forgotten,
        and a forgotten id is never given to another item.
    added_ids_ : ndarray of int64
        Ids of the items that the last :meth:`partial_fit` or
        ``set_memory(mode="expand")`` added (empty after any other change).
    classes_ : ndarray of shape (n_classes,)
        Classes of the memory's image items, sorted.
    n_features_in_ : int
        Embedding dimension.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``, when ``X`` has string
        column names.
    pruning_ : dict or None
        Active pruning: ``{"mode", "threshold", "n_neighbors"}``; None when
        off. See :meth:`prune` and :meth:`pruning_report`.
    rerank_fallbacks_ : dict of str to int
        With a ``reranker``, the queries of the last re-ranked call that
        kept the vote, by reason: ``"error"`` (it raised), ``"wrong shape"``,
        ``"invalid scores"`` (NaN, infinite, negative or all zero), ``"no
        answer"`` (None), ``"unknown label"`` (not in ``classes_``). Set by
        every :meth:`predict`, :meth:`predict_proba`, :meth:`explain` (and
        ``score``) that re-ranks.

    See Also
    --------
    sklearn.neighbors.KNeighborsClassifier : kNN with uniform or distance
        weights over a fixed training set.

    Notes
    -----
    **Inputs.** ``X`` may be sparse (e.g. TF-IDF): it is densified to
    float32 on the way in, a block of rows at a time, so the memory costs
    ``n_samples * n_features * 4`` bytes as for a dense ``X``. An all-zero
    row (an empty document) is kept, with a
    :class:`~skmml.ZeroEmbeddingWarning`: as in
    :func:`sklearn.metrics.pairwise.cosine_similarity`, its similarity to
    everything is 0. When ``X`` comes from a skmml image encoder
    (:class:`~skmml.encoders.Embeddings`), the files it was read from become
    the ``source`` metadata of the items that :meth:`fit` and
    :meth:`partial_fit` add.

    **Ties** between classes go to the class whose weighted vote reached
    the maximum first, scanning neighbors from the nearest (the reference
    code's rule). :meth:`predict` follows this rule;
    ``argmax(predict_proba)`` takes the lowest class index on exact ties.

    **Classes grow.** Unlike scikit-learn's ``partial_fit`` convention, where
    every class must be declared on the first call, :meth:`partial_fit`
    may add items of new classes at any time; ``classes_`` always lists the
    classes present in the memory (so forgetting every item of a class
    removes it). The ``classes`` argument of :meth:`partial_fit` is only
    checked against ``y``.

    **Exact unlearning.** With the exact ("flat") index, after
    ``forget(ids)`` every prediction and probability equals that of an
    estimator fitted from scratch on the remaining items. Approximate
    indexes never return a forgotten item, but their trained structure
    (IVF centroids, PQ codebooks) was learnt with it; rebuild the index
    from the remaining items with ``set_memory(clf.memory_)`` to remove
    that trace as well.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skmml import KNNVoteClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = KNNVoteClassifier(n_neighbors=10).fit(X[:1500], y[:1500])
    >>> round(clf.score(X[1500:], y[1500:]), 3)
    0.946
    >>> clf.explain(X[1500:1501]).loc[:2, ["rank", "id", "label", "weight"]]
       rank    id  label    weight
    0     0  1416      1  0.500000
    1     1  1426      1  0.333333
    2     2  1288      1  0.250000
    """

    _parameter_constraints = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "voting": [StrOptions(set(VOTING_SCHEMES)), callable],
        "rank_offset": [Interval(Real, 0, None, closed="neither")],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "distance_exponent": [Interval(Real, 0, None, closed="left")],
        "index": [str],
        "index_params": [dict, None],
        "index_device": [StrOptions({"auto", "cpu", "cuda"})],
        "verbose": ["verbose"],
        "reranker": [HasMethods(["rerank"]), None],
        "memory": [MemoryLike, None],
    }

    def __init__(
        self,
        n_neighbors=10,
        *,
        voting="rank",
        rank_offset=2.0,
        temperature=0.07,
        distance_exponent=1.0,
        index="flat",
        index_params=None,
        index_device="auto",
        verbose=0,
        reranker=None,
        memory=None,
    ):
        self.n_neighbors = n_neighbors
        self.voting = voting
        self.rank_offset = rank_offset
        self.temperature = temperature
        self.distance_exponent = distance_exponent
        self.index = index
        self.index_params = index_params
        self.index_device = index_device
        self.verbose = verbose
        self.reranker = reranker
        self.memory = memory

    # -- building the memory ---------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the memory from labelled embeddings, or adopt ``self.memory``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Embeddings. With ``self.memory`` set, only their dimension is
            checked against it.
        y : array-like of shape (n_samples,)
            Labels; required unless ``self.memory`` is set.

        Returns
        -------
        self : KNNVoteClassifier
        """
        with writer_lock(self):
            if self.memory is None:
                X, y, metadata, sources = self._fit_input(X, y)
                check_classification_targets(y)
                backend = self._backend(Memory(X, y, image_metadata=source_metadata(sources)))
            else:
                X, _, metadata, _ = self._fit_input(X)
                backend = self._backend(self.memory)
                if X.shape[1] != backend.n_features:
                    raise ValueError(
                        f"X has {X.shape[1]} features but the memory holds "
                        f"{backend.n_features}-dimensional embeddings."
                    )
            self._adopt(backend, pruning=None, metadata=metadata)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, *, ids=None):
        """Add labelled embeddings to the memory, possibly of new classes.

        No retraining happens: the items are indexed and vote from the next
        prediction on. New items get ids from the memory's high-water mark
        (``memory_.next_id``: after ``fit`` on ``n`` items, ``n, n + 1,
        ...``; a forgotten id is never given again), or the given `ids`; the
        ids given are in ``added_ids_``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Embeddings to add.
        y : array-like of shape (n_samples,)
            Their labels.
        classes : array-like of shape (n_classes,), default=None
            Accepted for scikit-learn compatibility: when given, every label
            in ``y`` must be in it. It does not restrict later calls.
        ids : array-like of int of shape (n_samples,), default=None
            Ids of the new items: unique, not in the memory, ``>= 0``.

        Returns
        -------
        self : KNNVoteClassifier
        """
        with writer_lock(self):
            first = not hasattr(self, "_state")
            if first:
                X, y, metadata, sources = self._fit_input(X, y)
            else:
                X, y, sources = self._more_input(X, y)
            check_classification_targets(y)
            self._check_classes(y, classes)
            if first and self.memory is None:
                backend = self._backend(Memory(X, y, image_ids=ids,
                                               image_metadata=source_metadata(sources)))
                self._adopt(backend, pruning=None, metadata=metadata,
                            added_ids=backend.memory.image.ids)
            else:
                backend = (self._backend(self.memory) if first
                           else self._state.backend)
                backend, added = backend.add(X, y, ids, source_metadata(sources))
                self._adopt(backend, added_ids=added,
                            **({"pruning": None, "metadata": metadata} if first else {}))
        return self

    def _check_fits(self, memory, n_items=None):
        n = memory.n_items() if n_items is None else n_items["image"]
        if not n:
            raise ValueError("The memory has no image items to vote with." if n_items is None
                             else "forget() would leave the memory without image items.")
        check_n_neighbors(self.n_neighbors, n)
        state = getattr(self, "_state", None)
        if state is not None and state.pruning is not None:
            check_n_neighbors(state.pruning["n_neighbors"] + 1, n)

    _KEEP = object()

    def _adopt(self, backend, replace=False, added_ids=None, pruning=_KEEP, metadata=None):
        """Make `backend`'s memory the estimator's memory, in one step.

        Pruning (by default the published one), when on, is recomputed for
        the new memory before anything is published (see :mod:`skmml._state`);
        with `metadata` (input metadata from
        :func:`~skmml._state.validate_aside`), the expected queries change in
        the same step. A replacement keeps the feature names when the width
        stays.
        """
        previous = getattr(self, "_state", None)
        if pruning is KNNVoteClassifier._KEEP:
            pruning = None if previous is None else previous.pruning
        if replace:
            same = getattr(self, "n_features_in_", None) == backend.n_features
            metadata = {"n_features_in_": backend.n_features, "feature_names_in_": getattr(
                self, "feature_names_in_", None) if same else None}
        counts = None
        if pruning is not None:
            check_n_neighbors(pruning["n_neighbors"] + 1, backend.n_items())
            counts = wrong_neighbor_counts(backend, pruning["n_neighbors"], bool(self.verbose))
        added = np.empty(0, dtype=np.int64) if added_ids is None else np.asarray(added_ids)
        self._publish(State(backend=backend, classes=backend.classes()), pruning, counts,
                      metadata, added)

    def _publish(self, state, pruning, counts, metadata=None, added_ids=None):
        """Publish `state` with its pruning and the public attributes, in one step."""
        state = state.replace(pruning=pruning, wrong_counts=counts)
        if added_ids is not None:
            metadata = {**(metadata or {}), "added_ids_": added_ids}
        publish(self, state, memory_=state.backend.memory, classes_=state.classes,
                pruning_=pruning, **(metadata or {}))

    # -- pruning ---------------------------------------------------------------------

    def prune(self, mode="hard", threshold=1, n_neighbors=None):
        """Down-weight or exclude memory items that mislead their neighbors.

        Every memory item queries the memory (leave-one-out) and each
        neighbor of another class gets one wrong-neighbor count. Pruning
        is recomputed whenever the memory changes and undone by
        :meth:`unprune`; :meth:`pruning_report` shows which items are
        affected and why.

        Parameters
        ----------
        mode : {"hard", "soft"}, default="hard"
            "hard" excludes items with ``count >= threshold``: they are skipped
            and do not consume a rank; a query whose neighbors are all
            excluded votes unpruned. "soft" multiplies each item's vote by
            ``1.75 / (1 + count)``.
        threshold : int, default=1
            Wrong-neighbor count from which hard pruning excludes an item.
        n_neighbors : int, default=None
            Neighbors per leave-one-out query; defaults to ``self.n_neighbors``.

        Returns
        -------
        self : KNNVoteClassifier
        """
        if mode not in PRUNING_MODES:
            raise ValueError(f"mode must be one of {PRUNING_MODES}, got {mode!r}.")
        if not isinstance(threshold, Integral) or threshold < 1:
            raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}.")
        with writer_lock(self):
            state = self._read_state()
            k = self.n_neighbors if n_neighbors is None else n_neighbors
            check_n_neighbors(k + 1, state.backend.n_items())
            counts = wrong_neighbor_counts(state.backend, k, bool(self.verbose))
            pruning = {"mode": mode, "threshold": threshold, "n_neighbors": k}
            self._publish(state, pruning, counts)
        return self

    def unprune(self):
        """Switch pruning off; every memory item votes again. Returns self."""
        with writer_lock(self):
            self._publish(self._read_state(), None, None)
        return self

    def pruning_report(self):
        """Per memory item: id, label, wrong-neighbor count, vote multiplier.

        Returns
        -------
        report : pandas.DataFrame
            Columns ``id``, ``label``, ``wrong_count``, ``weight`` (the vote
            multiplier) and ``excluded``, one row per image item, sorted by
            decreasing ``wrong_count``.
        """
        state = self._read_state()
        if state.pruning is None:
            raise ValueError("Pruning is off; call prune() first.")
        keys, ids, labels = state.backend.items(
            None if state.backend.lists_all_items else state.wrong_counts.keys)
        counts = state.wrong_counts[keys]
        weights = item_weights(counts, state.pruning["mode"], state.pruning["threshold"])
        report = pd.DataFrame({
            "id": ids,
            "label": labels,
            "wrong_count": counts,
            "weight": weights,
            "excluded": weights == 0,
        })
        return report.sort_values("wrong_count", ascending=False, kind="stable")

    # -- prediction --------------------------------------------------------------------

    def _search(self, X, k=None):
        """(state, unit queries, neighbors): one snapshot for the whole read."""
        state, X = self._snapshot(X)
        k = self.n_neighbors if k is None else k
        check_n_neighbors(k, state.backend.n_items())
        return state, X, state.backend.search(X, k, verbose=bool(self.verbose))

    def _vote(self, state, neighbors):
        """Class codes, final vote weights, per-prefix winners and voters of each query.

        The voters are the neighbors that vote (the re-ranker's candidates).
        A neighbor whose class is not in the state's class list (an item a
        concurrent writer put into a shared Milvus collection, with a new
        class the state has not published yet) counts as not found.
        """
        sims, keys = neighbors.sims, neighbors.keys
        classes = state.classes
        codes = np.minimum(np.searchsorted(classes, neighbors.labels), len(classes) - 1)
        found = (keys >= 0) & (classes[codes] == neighbors.labels)
        hard = state.pruning is not None and state.pruning["mode"] == "hard"
        item_weight = None
        if state.pruning is not None:
            item_weight = item_weights(state.wrong_counts[keys], state.pruning["mode"],
                                       state.pruning["threshold"])
        kept = found & (item_weight > 0) if hard else found
        weights = self._weights(sims, kept)
        if state.pruning is not None and not hard:
            weights *= item_weight
        winners = staged_winners(codes, weights, kept)
        voters = kept
        if hard:
            # Where a prefix holds only excluded items, exclusion is off for it.
            off = np.cumsum(kept, axis=1) == 0
            need = np.flatnonzero(off.any(axis=1) & found[:, 0])
            if need.size:
                plain = self._weights(sims[need], found[need])
                winners[need] = np.where(
                    off[need], staged_winners(codes[need], plain, found[need]), winners[need]
                )
                final_off = need[off[need, -1]]
                weights[final_off] = self._weights(sims[final_off], found[final_off])
                voters = kept.copy()
                voters[final_off] = found[final_off]
        return codes, weights, winners, voters

    def _weights(self, sims, kept):
        ranks = np.cumsum(kept, axis=1) - 1
        w = vote_weights(
            sims, ranks, self.voting, rank_offset=self.rank_offset,
            temperature=self.temperature, distance_exponent=self.distance_exponent,
        )
        return np.where(kept, w, 0.0)

    @staticmethod
    def _winning_codes(codes, winners):
        return codes[np.arange(codes.shape[0])[:, None], np.maximum(winners, 0)]

    @staticmethod
    def _vote_proba(codes, weights, vote_codes, n_classes):
        """Votes per class normalised; all-zero rows give their vote probability one."""
        votes = tally(codes, weights, n_classes)
        total = votes.sum(axis=1)
        empty = total == 0
        if empty.any():
            votes[empty] = 0.0
            votes[np.flatnonzero(empty), vote_codes[empty]] = 1.0
            total[empty] = 1.0
        return votes / total[:, None]

    def _decide(self, X, proba=False):
        """Both stages for `X`: (state, neighbors, weights, vote codes, vote proba, second).

        The vote's proba is None unless asked for or re-ranking; `second`
        the re-ranker's :class:`~skmml.neighbors._rerank.SecondStage`, None
        without a re-ranker. A call that re-ranks sets ``rerank_fallbacks_``
        and warns when queries fell back.
        """
        sources = sources_of(X)  # before validation turns X into a plain array
        state, queries, neighbors = self._search(X)
        codes, weights, winners, voters = self._vote(state, neighbors)
        vote = self._winning_codes(codes, winners[:, -1:])[:, 0]
        vote_proba = second = None
        if proba or self.reranker is not None:
            vote_proba = self._vote_proba(codes, weights, vote, len(state.classes))
        if self.reranker is not None:
            second = rerank_all(self.reranker, state=state, queries=queries, sources=sources,
                                neighbors=neighbors, weights=weights, voters=voters,
                                vote_codes=vote, vote_proba=vote_proba,
                                verbose=bool(self.verbose))
            self.rerank_fallbacks_ = second.counts
            second.warn()
        return state, neighbors, weights, vote, vote_proba, second

    def predict(self, X):
        """Predict the class of each query by the weighted vote of its neighbors.

        With a ``reranker``, its answer, or the vote where it fell back.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        y : ndarray of shape (n_queries,)
        """
        state, _, _, vote, _, second = self._decide(X)
        return state.classes[vote if second is None else second.codes]

    def staged_predict(self, X):
        """Predictions for every ``k = 1 .. n_neighbors`` from one neighbor search.

        Use it to choose ``k`` without searching again: the ``j``-th yielded
        array equals ``predict(X)`` with ``n_neighbors=j`` (the vote: a
        ``reranker`` does not take part).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Yields
        ------
        y : ndarray of shape (n_queries,)
            Predictions with the ``k`` nearest neighbors, for ``k = 1, 2, ...``.
        """
        state, _, neighbors = self._search(X)
        codes, _, winners, _ = self._vote(state, neighbors)
        labels = state.classes[self._winning_codes(codes, winners)]
        for k in range(labels.shape[1]):
            yield labels[:, k]

    def predict_proba(self, X):
        """Votes per class, normalised to sum to one.

        A query whose neighbors all have zero weight gets probability one
        for its predicted class (its nearest neighbor's). With a
        ``reranker``: its scores normalised to sum to one (probability one
        for a label it answers), or the votes where it fell back.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        proba : ndarray of shape (n_queries, n_classes)
            Columns follow ``classes_``.
        """
        _, _, _, _, proba, second = self._decide(X, proba=True)
        return proba if second is None else second.proba

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the nearest memory items of each query (scikit-learn semantics).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features), default=None
            Queries. None queries every memory item, excluding itself.
        n_neighbors : int, default=None
            Defaults to ``self.n_neighbors``.
        return_distance : bool, default=True
            Also return the cosine distances.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors)
            Cosine distances ``1 - similarity``; only if `return_distance`.
        ids : ndarray of shape (n_queries, n_neighbors)
            Memory ids of the neighbors, nearest first (the row indices of
            the training data as long as no item was forgotten); -1 where an
            approximate index found fewer items.
        """
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if X is None:
            state = self._read_state()
            check_n_neighbors(k + 1, state.backend.n_items())
            batches = [nb for _, _, nb in state.backend.leave_one_out(k, bool(self.verbose))]
            sims = np.concatenate([nb.sims for nb in batches])
            ids = np.concatenate([nb.ids for nb in batches])
        else:
            _, _, neighbors = self._search(X, k)
            sims, ids = neighbors.sims, neighbors.ids
        return (1.0 - sims, ids) if return_distance else ids

    def explain(self, X):
        """The neighbors behind each decision, one row per (query, neighbor).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        explanation : pandas.DataFrame
            Columns ``query`` (row of `X`), ``modality`` ("image"), ``rank``
            (0-based search rank), ``id``, ``label``, ``similarity``
            (cosine), ``weight`` (the vote it cast; 0 for an item excluded
            by hard pruning), then the item's metadata columns: the schema
            of every skmml classifier. With a ``reranker``, both stages, per
            query on each of its rows: ``vote_label`` (the first stage's
            answer), ``reranked_label`` (the final answer, what
            :meth:`predict` gives) and ``rerank_fallback`` (why the query
            kept the vote, see ``rerank_fallbacks_``; missing where the
            re-ranker answered).
        """
        state, neighbors, weights, vote, _, second = self._decide(X)
        table = self._explain_frame(state.backend, "image", neighbors, weights)
        if second is not None:
            query = table["query"].to_numpy()
            table["vote_label"] = state.classes[vote][query]
            table["reranked_label"] = state.classes[second.codes][query]
            table["rerank_fallback"] = second.fallbacks[query]
        return table

    def _state_for_pickle(self, published):
        if published.pruning is None:
            return published
        # An in-RAM bank pickles its live items only (forgotten ones never
        # reach a file), renumbered from slot 0: so do the pruning counts.
        return published.replace(
            wrong_counts=published.backend.for_pickle(published.wrong_counts))


