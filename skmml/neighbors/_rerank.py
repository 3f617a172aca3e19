"""The visual memory's second stage: re-ranking the retrieved neighbors.

:class:`~skmml.KNNVoteClassifier` retrieves and votes; with a ``reranker`` it
then hands each batch of queries, with the neighbors that voted, to the
re-ranker, whose answer replaces the vote. A re-ranker is a
:class:`BaseReranker`: one method, ``rerank(context) -> scores or labels``,
that gets a :class:`RerankContext`. Whatever goes wrong in it (an exception,
NaN scores, a wrong shape, a label that is not a class) falls back to the
vote for the queries concerned, counted and warned about
(:class:`RerankFallbackWarning`), never an error of the classifier.

- :class:`EmbeddingReranker` re-scores the candidates with a second, stronger
  embedding of the same items and votes again;
- :class:`~skmml.VLMReranker` shows a vision-language model the
  query with its neighbors and their labels, and reads its answer.
"""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from tqdm.auto import tqdm

from .._validation import l2_normalize
from ._voting import VOTING_SCHEMES, tally, vote_weights

#: Why a query fell back to the vote, as counted in ``rerank_fallbacks_``.
FALLBACK_REASONS = ("error", "wrong shape", "invalid scores", "no answer", "unknown label")

# Elements of the (queries, candidates, dimension) block EmbeddingReranker gathers at once.
_GATHER_ELEMENTS = 2**23


class RerankFallbackWarning(UserWarning):
    """Some queries kept the vote: the re-ranker raised or gave no valid answer for them."""


@dataclass(frozen=True, eq=False)
class RerankContext:
    """What a re-ranker gets for one batch of queries.

    The candidates of each query are the neighbors that voted, nearest
    first: neighbors excluded by hard pruning (weight 0) and missing ones
    never appear. Rows have ``n_candidates`` columns, padded at the end
    where a query has fewer (``ids == -1``, see :attr:`mask`).

    Attributes
    ----------
    queries : ndarray of shape (n_queries, n_features), float32
        The query embeddings as searched (L2-normalised).
    query_sources : list of (str or None) or None
        The file each query was encoded from (the ``sources`` of
        :class:`~skmml.encoders.Embeddings` given to ``predict``), or None
        when unknown.
    rows : ndarray of shape (n_queries,), int
        Row of each query in the ``X`` of the call.
    ids : ndarray of shape (n_queries, n_candidates), int64
        Memory ids of the candidates; -1 in padding.
    labels : ndarray of shape (n_queries, n_candidates)
        Their labels (undefined in padding).
    similarities : ndarray of shape (n_queries, n_candidates), float32
        Their cosine similarity to the query; -inf in padding.
    weights : ndarray of shape (n_queries, n_candidates), float64
        The vote each cast in the first stage; 0 in padding.
    metadata : dict of str to ndarray of shape (n_queries, n_candidates)
        The memory's metadata columns for the candidates (e.g. ``"source"``,
        the file of each memory image), as object arrays; None in padding.
    classes : ndarray of shape (n_classes,)
        The classifier's ``classes_``: the columns of returned scores, the
        values of returned labels.
    vote_labels : ndarray of shape (n_queries,)
        The first stage's answer (what ``predict`` gives without a re-ranker).
    vote_proba : ndarray of shape (n_queries, n_classes)
        The first stage's ``predict_proba``.
    """

    queries: np.ndarray
    query_sources: list | None
    rows: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    similarities: np.ndarray
    weights: np.ndarray
    metadata: dict
    classes: np.ndarray
    vote_labels: np.ndarray
    vote_proba: np.ndarray

    @property
    def mask(self):
        """ndarray of bool (n_queries, n_candidates): where a candidate is (not padding)."""
        return self.ids >= 0

    @property
    def n_queries(self):
        """Number of queries in the batch."""
        return self.ids.shape[0]


class BaseReranker(BaseEstimator):
    """Base class of re-rankers: the second stage of :class:`~skmml.KNNVoteClassifier`.

    A subclass implements :meth:`rerank`. Its parameters are those of its
    ``__init__`` (as for scikit-learn estimators), so a classifier holding a
    re-ranker clones, prints and grid-searches it; whatever it loads or
    caches is best kept out of its pickle (see :class:`VLMReranker`).

    Attributes
    ----------
    batch_size : int or None
        Queries per :meth:`rerank` call; None gives all the queries of a
        ``predict`` at once. A subclass sets it as a class attribute or a
        parameter.
    """

    batch_size = None
    _parameter_constraints = {}  # checked by the classifier before each call's batches

    def rerank(self, context):
        """Answer for each query of a batch.

        Parameters
        ----------
        context : RerankContext
            The queries, their candidates and the classes.

        Returns
        -------
        answer : ndarray of shape (n_queries, n_classes) or (n_queries,)
            Non-negative class scores whose columns follow
            ``context.classes`` (``predict_proba`` normalises each row to sum
            to one; ``predict`` takes the largest, the lowest class index on
            ties), or one label of ``context.classes`` per query (None for no
            answer). A query whose row is NaN, negative or all zero, whose
            label is None or not a class, and every query of a call that
            raises or returns another shape, keep the vote.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement rerank().")


class EmbeddingReranker(BaseReranker):
    """Re-score the retrieved candidates with a second, stronger embedding, then vote.

    The memory is searched with a cheap embedding (e.g. PCA to a few
    dimensions, or int8-quantised); the candidates are then re-sorted by
    their cosine similarity to the query in a second embedding of the same
    items (e.g. the full-precision features) and vote again. Searching the
    cheap memory costs little, and the full features are read only for the
    candidates.

    Parameters
    ----------
    embeddings : array-like, mapping, pandas DataFrame or None, default=None
        The memory items' second embeddings, looked up by memory id: an
        array whose row ``i`` belongs to id ``i`` (e.g. the full features
        the memory was fitted from), a mapping ``id -> vector``, or a
        DataFrame indexed by id. None encodes the items' ``source`` files
        with `encoder` (their metadata column ``"source"``, kept by
        :meth:`~skmml.KNNVoteClassifier.fit` on encoder output and by
        :meth:`~skmml.Memory.from_folder`).
    encoder : transformer, callable or None, default=None
        Maps a list of file paths to second embeddings (``transform`` or
        call), e.g. a :class:`~skmml.TimmImageEncoder`, whose embedding cache
        makes a file encoded once per process. It embeds the queries from
        their files (``RerankContext.query_sources``) and, when `embeddings`
        is None, the items. None uses the query embeddings as searched: right
        when only the memory was made cheap (quantised), so queries and
        second embeddings share a space.
    voting : {"rank", "softmax", "distance", "plurality"} or callable, default="rank"
        Vote weight of a re-sorted candidate, as in
        :class:`~skmml.KNNVoteClassifier` (rank ``i`` is its rank after
        re-sorting, the distance its second-embedding cosine distance).
    n_neighbors : int or None, default=None
        Candidates that vote after re-sorting, the most similar first; None:
        all (the classifier's ``n_neighbors`` minus excluded ones).
    rank_offset, temperature, distance_exponent : float
        Parameters of the voting schemes, as in
        :class:`~skmml.KNNVoteClassifier`.
    batch_size : int or None, default=None
        Queries per :meth:`rerank` call; None: all at once.

    See Also
    --------
    VLMReranker : re-rank with a vision-language model.

    Examples
    --------
    A memory of 1 bit per pixel (8 bytes per digit) searched, its 50
    candidates re-sorted by the full pixels (the queries are full):

    >>> import numpy as np
    >>> from sklearn.datasets import load_digits
    >>> from skmml import EmbeddingReranker, KNNVoteClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> bits = (X > 8).astype(np.float32)
    >>> cheap = KNNVoteClassifier(n_neighbors=50).fit(bits[:1000], y[:1000])
    >>> round(cheap.score(X[1000:], y[1000:]), 3)
    0.927
    >>> two_stage = KNNVoteClassifier(
    ...     n_neighbors=50, reranker=EmbeddingReranker(X[:1000], n_neighbors=10))
    >>> round(two_stage.fit(bits[:1000], y[:1000]).score(X[1000:], y[1000:]), 3)
    0.959
    """

    _parameter_constraints = {
        "embeddings": ["array-like", Mapping, None],
        "encoder": [HasMethods(["transform"]), callable, None],
        "voting": [StrOptions(set(VOTING_SCHEMES)), callable],
        "n_neighbors": [Interval(Integral, 1, None, closed="left"), None],
        "rank_offset": [Interval(Real, 0, None, closed="neither")],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "distance_exponent": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(self, embeddings=None, *, encoder=None, voting="rank", n_neighbors=None,
                 rank_offset=2.0, temperature=0.07, distance_exponent=1.0, batch_size=None):
        self.embeddings = embeddings
        self.encoder = encoder
        self.voting = voting
        self.n_neighbors = n_neighbors
        self.rank_offset = rank_offset
        self.temperature = temperature
        self.distance_exponent = distance_exponent
        self.batch_size = batch_size

    def rerank(self, context):
        """Class scores: the votes of the candidates re-sorted by the second embedding.

        Parameters
        ----------
        context : RerankContext

        Returns
        -------
        scores : ndarray of shape (n_queries, n_classes)
        """
        if self.embeddings is None and self.encoder is None:
            raise ValueError("EmbeddingReranker needs embeddings= (by memory id) or "
                             "encoder= (applied to the items' source files).")
        mask = context.mask
        items = self._item_embeddings(context, mask)
        sims = self._similarities(self._query_embeddings(context), items, mask)
        order = np.argsort(-sims, axis=1, kind="stable")  # ties keep the search order
        k = order.shape[1] if self.n_neighbors is None else min(self.n_neighbors,
                                                                 order.shape[1])
        order = order[:, :k]
        sims = np.take_along_axis(sims, order, axis=1)
        kept = np.take_along_axis(mask, order, axis=1)
        labels = np.take_along_axis(context.labels, order, axis=1)
        weights = vote_weights(
            np.where(kept, sims, 0.0), np.cumsum(kept, axis=1) - 1, self.voting,
            rank_offset=self.rank_offset, temperature=self.temperature,
            distance_exponent=self.distance_exponent)
        classes = context.classes
        codes = np.minimum(np.searchsorted(classes, labels), len(classes) - 1)
        return tally(codes, np.where(kept, weights, 0.0), len(classes))

    def _encode(self, sources):
        encoder = self.encoder
        out = encoder.transform(sources) if hasattr(encoder, "transform") else encoder(sources)
        return np.asarray(out, dtype=np.float32)

    def _query_embeddings(self, context):
        if self.encoder is None:
            return context.queries
        sources = context.query_sources
        if sources is None or pd.isna(np.asarray(sources, dtype=object)).any():
            raise ValueError(
                "EmbeddingReranker(encoder=...) embeds the queries from their files, but "
                "the queries' files are unknown: pass the encoder's output (Embeddings, "
                "e.g. through a pipeline), or leave encoder=None when the second "
                "embeddings share the queries' space.")
        return self._encode(list(sources))

    def _item_embeddings(self, context, mask):
        """(second embeddings, row of each candidate in them; 0 in padding)."""
        index = np.zeros(mask.shape, dtype=np.int64)
        embeddings = self.embeddings
        if embeddings is not None and not isinstance(embeddings, (Mapping, pd.DataFrame)):
            vectors = np.asarray(embeddings)  # rows by id: gathered block by block, no copy
            if vectors.ndim != 2:
                raise ValueError(f"embeddings must be 2-D (row i is id i), got shape "
                                 f"{vectors.shape}.")
            ids = context.ids[mask]
            if ids.size and ids.max() >= len(vectors):
                raise ValueError(f"Memory id {ids[ids >= len(vectors)][0]} has no second "
                                 f"embedding: embeddings holds {len(vectors)} rows (row i "
                                 "is id i).")
            index[mask] = ids
            return vectors, index
        if embeddings is None:
            sources = context.metadata.get("source")
            if sources is None or pd.isna(sources[mask]).any():
                raise ValueError("EmbeddingReranker(embeddings=None) encodes the items' "
                                 "'source' files, but some memory items have none.")
            unique, where = np.unique(sources[mask].astype(str), return_inverse=True)
            vectors = self._encode(unique.tolist())
        else:
            unique, where = np.unique(context.ids[mask], return_inverse=True)
            vectors = _lookup(embeddings, unique)
        index[mask] = where.ravel()
        return vectors, index

    @staticmethod
    def _similarities(queries, items, mask):
        """Cosine similarity of each candidate to its query; -inf in padding."""
        vectors, index = items
        if vectors.shape[1] != queries.shape[1]:
            raise ValueError(
                f"The second embeddings have dimension {vectors.shape[1]} but the queries "
                f"{queries.shape[1]}: pass encoder= to embed the queries' files in the "
                "second embedding's space.")
        queries = l2_normalize(np.ascontiguousarray(queries, dtype=np.float32))
        n, m = index.shape
        sims = np.empty((n, m), dtype=np.float32)
        step = max(1, _GATHER_ELEMENTS // max(1, m * vectors.shape[1]))
        for start in range(0, n, step):  # blocks of queries bound the gathered array
            rows = slice(start, start + step)
            block = vectors[index[rows]].astype(np.float32, copy=False)
            norms = np.sqrt(np.einsum("qmd,qmd->qm", block, block))
            dots = np.einsum("qd,qmd->qm", queries[rows], block)
            sims[rows] = dots / np.where(norms > 0, norms, 1.0)  # an all-zero item: 0
        sims[~mask] = -np.inf
        return sims


def _lookup(embeddings, ids):
    """The second embeddings of memory `ids` (sorted unique) from a mapping or a frame."""
    if isinstance(embeddings, pd.DataFrame):
        found = embeddings.reindex(ids)
        missing = found.isna().any(axis=1).to_numpy()
        if missing.any():
            raise ValueError(f"Memory id {ids[missing][0]} has no second embedding.")
        return found.to_numpy(dtype=np.float32)
    missing = [i for i in ids.tolist() if i not in embeddings]
    if missing:
        raise ValueError(f"Memory id {missing[0]} has no second embedding.")
    return np.stack([np.asarray(embeddings[i], dtype=np.float32) for i in ids.tolist()])


# -- the classifier's side ----------------------------------------------------------------


class SecondStage:
    """The re-ranker's answers for every query of a call, with the vote where it fell back.

    Attributes: ``codes`` (n,) final class indices, ``proba`` (n, n_classes),
    ``fallbacks`` (n,) object: None or the reason of a query's fallback,
    ``counts`` {reason: count}, ``errors`` the message of each error raised.
    """

    def __init__(self, vote_codes, vote_proba):
        self.codes = vote_codes.copy()
        self.proba = vote_proba.copy()
        self.fallbacks = np.full(len(vote_codes), None, dtype=object)
        self.errors = []

    @property
    def counts(self):
        return {reason: int(np.count_nonzero(self.fallbacks == reason))
                for reason in FALLBACK_REASONS}

    def warn(self):
        """Warn with how many queries fell back, and why; no warning when none did."""
        counts = {r: c for r, c in self.counts.items() if c}
        if not counts:
            return
        why = ", ".join(f"{c} {r}" for r, c in counts.items())
        detail = f" (first error: {self.errors[0]})" if self.errors else ""
        warnings.warn(
            f"{sum(counts.values())} of {len(self.codes)} queries fell back to the vote: "
            f"{why}{detail}.", RerankFallbackWarning, stacklevel=4)


def rerank_all(reranker, *, state, queries, sources, neighbors, weights, voters,
               vote_codes, vote_proba, verbose=False):
    """Run `reranker` over every query in batches; return a :class:`SecondStage`.

    `voters` marks the neighbors that voted (found, not excluded by hard
    pruning): only those become candidates.
    """
    if isinstance(reranker, BaseEstimator):
        reranker._validate_params()  # a wrong setting is an error, not a fallback
    classes = state.classes
    result = SecondStage(vote_codes, vote_proba)
    n = len(vote_codes)
    size = reranker.batch_size
    if size is None:
        size = max(n, 1)
    elif not isinstance(size, Integral) or size < 1:
        raise ValueError(f"The re-ranker's batch_size must be None or an int >= 1, got "
                         f"{size!r}.")
    # Candidates: the voters, moved to the front of each row in search order.
    order = np.argsort(~voters, axis=1, kind="stable")[:, :max(1, voters.sum(axis=1).max())]
    mask = np.take_along_axis(voters, order, axis=1)
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    ids, keys = np.where(mask, take(neighbors.ids), -1), take(neighbors.keys)
    labels, sims = take(neighbors.labels), np.where(mask, take(neighbors.sims), -np.inf)
    weights = np.where(mask, take(weights), 0.0)
    with tqdm(total=n, desc="re-ranking", unit="query", disable=not verbose) as bar:
        for start in range(0, n, size):
            rows = np.arange(start, min(start + size, n))
            batch_mask = mask[rows]
            context = RerankContext(
                queries=queries[rows], rows=rows,
                query_sources=None if sources is None else sources[start:start + size],
                ids=ids[rows], labels=labels[rows], similarities=sims[rows],
                weights=weights[rows],
                metadata=_metadata(state.backend, keys[rows], batch_mask),
                classes=classes, vote_labels=classes[vote_codes[rows]],
                vote_proba=vote_proba[rows])
            try:
                codes, proba, fallbacks = _read_answer(reranker.rerank(context), classes,
                                                       len(rows))
            except Exception as exc:  # a failing re-ranker keeps the vote
                result.errors.append(f"{type(exc).__name__}: {exc}")
                codes, proba = None, None
                fallbacks = np.full(len(rows), "error", dtype=object)
            ok = pd.isna(fallbacks)
            result.fallbacks[rows] = fallbacks
            if codes is not None:
                result.codes[rows[ok]] = codes[ok]
                result.proba[rows[ok]] = proba[ok]
            bar.update(len(rows))
    return result


def _metadata(backend, keys, mask):
    """{column: (n, m) object array} of the candidates' metadata; None in padding."""
    frame = backend.metadata(keys[mask], "image")
    columns = {}
    for name in frame.columns:
        column = np.full(mask.shape, None, dtype=object)
        column[mask] = frame[name].to_numpy(dtype=object)
        columns[name] = column
    return columns


def _read_answer(answer, classes, n):
    """(codes, proba, fallbacks) of a re-ranker's scores or labels for `n` queries."""
    answer = np.asarray(answer)
    fallbacks = np.full(n, None, dtype=object)
    if answer.shape == (n, len(classes)) and answer.dtype.kind in "biuf":
        scores = answer.astype(np.float64)
        with np.errstate(invalid="ignore"):
            total = scores.sum(axis=1)
            valid = np.isfinite(scores).all(axis=1) & (scores >= 0).all(axis=1) & (total > 0)
        fallbacks[~valid] = "invalid scores"
        codes = np.argmax(np.where(valid[:, None], scores, 0.0), axis=1)
        proba = np.where(valid[:, None], scores, 0.0) / np.where(valid, total, 1.0)[:, None]
        return codes, proba, fallbacks
    if answer.shape == (n,):
        codes = pd.Index(classes).get_indexer(answer.astype(object))
        none = pd.isna(answer) if answer.dtype.kind in "Of" else np.zeros(n, dtype=bool)
        fallbacks[none] = "no answer"
        fallbacks[(codes < 0) & ~none] = "unknown label"
        proba = np.zeros((n, len(classes)))
        proba[np.arange(n), np.maximum(codes, 0)] = 1.0
        return np.maximum(codes, 0), proba, fallbacks
    fallbacks[:] = "wrong shape"
    return None, None, fallbacks
