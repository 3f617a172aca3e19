"""Certified exact search: a reduced-precision screen, then an exact float32 re-rank.

Exact inner-product search costs one float32 multiply-add per (query, item,
dimension). Where the CPU multiplies float16 or bfloat16 faster (AVX-512
BF16, AMX, or a half-precision matrix-vector kernel that streams half the
bytes), the search can run in that format and still return *exactly* the
float32 result:

1. Round queries q and items e to the format (q', e'), keeping each row's
   rounding residual norm (``||q' - q||``, ``||e' - e||``, exact in float64).
2. Screen: ``s' = q' . e'`` for every item (accumulated in float32, the result
   rounded to the format). For each query,
   ``|s' - q . e| <= B = ||q'|| max||e' - e|| + ||q' - q|| max||e||
   + (gamma_d + u (1 + gamma_d)) ||q'|| max||e'||``
   (Cauchy-Schwarz on ``q'.e' - q.e = q'.(e' - e) + (q' - q).e``, plus the
   float32 accumulation ``gamma_d = d 2^-24 / (1 - d 2^-24)`` and the output
   rounding ``u``: 2^-11 for float16, 2^-8 for bfloat16).
3. With ``t`` the k-th largest screened score, the k best items have exact
   scores >= t - B, so the exact k-th best is >= t - B; an item with
   ``s' < t - 2B`` scores exactly < t - B and cannot be among the k best,
   ties included.
4. Selection at a small cost beside the product: the screened scores stay
   in the format (never copied to float32), and per chunk of :data:`CHUNK`
   slots only the maximum is kept (an integer max over the scores' bit
   patterns). The k best items lie in the k chunks of largest maximum, so
   ``t`` comes from those k chunks alone; only the chunks whose maximum
   reaches ``t - 2B`` are read again, for their items that reach it: the
   candidates. Their number adapts to the data, query by query. A query
   whose threshold is not positive, or whose candidates lie in more than
   :data:`MAX_CANDIDATE_FRACTION` of the chunks (near-equal scores
   everywhere: duplicates, degenerate data), is handed to plain float32
   search; the answer is exact either way.
5. Re-rank the candidates with the float32 kernel of
   :func:`skmml.retrieval.canonical_neighbors` and keep the k best by
   (decreasing score, increasing id), the project's one order.

The same pipeline runs with a float32 product (``screen="fp32"``, whose
bound is the float32 accumulation error): its cost beyond the product is
the pipeline's overhead, measurable on any CPU. The low-precision copy of a
memory (half its float32 bytes) lives with the bank's append-only store
(``skmml.memory._bank``): built on first use, extended as items are added,
never rewritten, so readers of any version share it.
Whether the screen pays is measured once per machine and dimension
(:func:`screen_format`).
"""

import threading
import time
import warnings

import numpy as np
import torch

from .._machine import best_time, measured
from ..memory._bank import MemoryBank
from ._exact import SMALL_BATCH, _top_k_blas, rescore, score_error, tie_order

#: The reduced-precision formats a screen may use.
FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Every format the screen pipeline runs in: "fp32" is the same pipeline
#: with a float32 product (its bound the accumulation error), which measures
#: the pipeline's overhead on any CPU.
SCREEN_FORMATS = (*FORMATS, "fp32")
#: Unit roundoff of each format (round to nearest).
_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
#: Values of the ``screen`` search parameter of the exact index.
SCREEN_OPTIONS = ("auto", "off", *SCREEN_FORMATS)
#: Items per chunk: the selection keeps each chunk's largest screened score.
CHUNK = 32
#: A query whose candidates lie in more than this fraction of the memory's chunks
#: is searched in float32.
MAX_CANDIDATE_FRACTION = 1 / 4
#: Rows converted at a time when a store's copy is extended (its float64
#: temporaries stay near 16 MB at d = 512).
_CONVERT_BLOCK = 1 << 12
#: The screen must beat float32 search by this factor to be chosen automatically.
_MIN_GAIN = 1.15
#: "auto" screens memories of at least this many items.
AUTO_MIN_ITEMS = 1 << 15
#: "auto" screens batches of queries against memories of at least this many
#: items: below it the product is too short for the screen to gain.
AUTO_MIN_BATCH_ITEMS = 1 << 17


def _gamma(d):
    u = 2.0**-24
    return d * u / (1 - d * u)


def _low(x, fmt):
    """`x` (float32 rows, numpy) as a torch tensor in `fmt`, and each row's
    (residual norm, norm, low-precision norm) in float64."""
    with warnings.catch_warnings():  # read-only arrays: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    low = t.to(FORMATS[fmt])
    back = low.to(torch.float32).numpy()
    # e - round(e) is exact in float32 (Sterbenz), so these norms are exact
    # up to float64 rounding.
    residual = np.linalg.norm((x - back).astype(np.float64), axis=1)
    norm = np.linalg.norm(x.astype(np.float64), axis=1)
    low_norm = np.linalg.norm(back.astype(np.float64), axis=1)
    return low, residual, norm, low_norm


class LowPrecisionCopy:
    """A store's rows in float16 or bfloat16, with the bounds the screen needs.

    Rows are converted on first use, in order; rows below the store's length
    never change (:class:`skmml.memory._bank._RowStore`), so converted rows stay
    valid for every version of the bank. Running maxima of the per-row
    bounds make ``max over the first n rows`` an O(1) lookup.
    """

    def __init__(self, capacity, dim, fmt):
        self.fmt = fmt
        # Rows up to a whole number of chunks, zero until converted: a view of
        # the first n slots can end on a chunk boundary (see low_precision_view).
        padded = -(-capacity // CHUNK) * CHUNK
        self.values = torch.zeros((padded, dim), dtype=FORMATS[fmt])
        # Running maxima of ||e' - e||, ||e|| and ||e'|| over rows 0..i.
        self.max_residual = np.zeros(capacity)
        self.max_norm = np.zeros(capacity)
        self.max_low_norm = np.zeros(capacity)
        self.filled = 0
        self.lock = threading.Lock()

    def extend(self, embeddings, n):
        """Convert rows up to `n` of `embeddings` (the store's array)."""
        with self.lock:
            for start in range(self.filled, n, _CONVERT_BLOCK):
                rows = slice(start, min(n, start + _CONVERT_BLOCK))
                low, residual, norm, low_norm = _low(embeddings[rows], self.fmt)
                self.values[rows] = low
                for out, new in ((self.max_residual, residual), (self.max_norm, norm),
                                 (self.max_low_norm, low_norm)):
                    if start:
                        new[0] = max(new[0], out[start - 1])
                    out[rows] = np.maximum.accumulate(new)
            self.filled = max(self.filled, n)


def low_precision_view(bank, fmt):
    """(values, max residual, max norm, max low norm) over the bank's slots in `fmt`.

    `values` has the bank's slots, then rows up to a whole number of chunks
    (:data:`CHUNK`): zeros, or items of later versions of the bank, which the
    screen scores -inf.
    """
    store = bank._store
    with store.lock:
        if fmt not in store.low_precision:
            store.low_precision[fmt] = LowPrecisionCopy(store.capacity,
                                                        store.embeddings.shape[1], fmt)
        copy = store.low_precision[fmt]
    n = bank.n_slots
    if copy.filled < n:
        copy.extend(store.embeddings, n)
    last = n - 1
    return (copy.values[:-(-n // CHUNK) * CHUNK], copy.max_residual[last], copy.max_norm[last],
            copy.max_low_norm[last])


def screen_bound(queries, fmt, view):
    """Per query: the float64 residual norms, and the bound B of the module docstring."""
    low, residual, _, low_norm = _low(queries, fmt)
    _, max_res, max_norm, max_low = view
    d = queries.shape[1]
    gamma = _gamma(d)
    bound = (low_norm * max_res + residual * max_norm
             + (gamma + _ROUNDOFF[fmt] * (1 + gamma)) * low_norm * max_low)
    # A relative margin for the float64 arithmetic above, and an absolute one
    # for products that underflow the format.
    return low, bound * (1 + 1e-9) + d * 2.0**-126 + 2.0**-40


#: Most screened scores (queries x slots) one block of queries holds (512 MiB
#: in a half-precision format).
_BLOCK_SCORES = 1 << 28
#: Items per product of a block: a block's product runs tile by tile into
#: its scores (a large matrix product's output past the caches runs at half
#: the rate).
_TILE = 1 << 16
#: Most queries per block (one matrix product each).
_MAX_BLOCK = 256
#: Integer types of the same width as each format: their bit patterns order
#: the format's non-negative values as the values.
_KEYS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


class Stages:
    """Seconds spent in each stage of certified searches, summed over calls."""

    NAMES = ("product", "selection", "re-rank", "fallback")

    def __init__(self):
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.queries = self.candidates = self.fallback = 0

    def add(self, stage, seconds):
        self.seconds[stage] += seconds


def _screen_inputs(queries, bank, fmt):
    """(item matrix, query matrix, per-query bound B) of the screen in `fmt`."""
    if fmt == "fp32":
        with warnings.catch_warnings():  # read-only arrays: torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            values = torch.from_numpy(bank.slot_embeddings)
            low_queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        bound = np.full(queries.shape[0], score_error(queries.shape[1]))
        return values, low_queries, bound
    view = low_precision_view(bank, fmt)
    low_queries, bound = screen_bound(queries, fmt, view)
    return view[0], low_queries, bound


def _chunk_maxima(keys):
    """Per query and chunk of :data:`CHUNK` slots, the largest key (the last chunk may be short)."""
    b, n = keys.shape
    full = n // CHUNK * CHUNK
    parts = [keys[:, :full].view(b, -1, CHUNK).amax(dim=2)] if full else []
    if full < n:
        parts.append(keys[:, full:].amax(dim=1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _chunk_scores(scores, rows, chunks):
    """The float32 scores of chunk ``chunks[i]`` of query ``rows[i]``: (len, CHUNK).

    Whole chunks are copied (:data:`CHUNK` contiguous scores), not gathered
    score by score; the slots past the end of a short last chunk score -inf.
    """
    b, n = scores.shape
    full = n // CHUNK
    if full * CHUNK == n:
        flat = scores.view(b * full, CHUNK)
        return flat.index_select(0, rows * full + chunks).float()
    out = torch.empty((len(rows), CHUNK), dtype=torch.float32)
    if full:
        out[:] = scores[:, :full * CHUNK].view(b, full, CHUNK)[rows, chunks.clamp(max=full - 1)]
    if full * CHUNK < n:
        last = chunks == full
        tail = torch.full((int(last.sum()), CHUNK), -torch.inf, dtype=torch.float32)
        tail[:, :n - full * CHUNK] = scores[rows[last], full * CHUNK:]
        out[last] = tail
    return out


def _key_at_or_below(threshold, dtype):
    """Per query, the key of the largest `dtype` value <= `threshold` (float64, > 0)."""
    value = torch.from_numpy(threshold).to(dtype)
    key = value.view(_KEYS[dtype]).clone()
    key[value.to(torch.float64) > torch.from_numpy(threshold)] -= 1  # the next value down
    return key


def _select(scores, maxima, k, bound, cap):
    """The candidates of each query of a block, certified: (queries, slots), settled mask.

    `scores` (b, n) are one block's screened scores (forgotten slots -inf),
    `maxima` their chunk maxima as integer keys (:func:`_chunk_maxima`),
    `bound` the queries' B. The k best items lie in the k chunks of largest
    maximum, so ``t``, the k-th best score in those chunks, is the k-th best
    screened score (ties only lower it, which is safe). Every chunk whose
    maximum is below ``t - 2B`` holds no candidate (step 3 of the module
    docstring); in the others, the items scoring at least ``t - 2B`` are
    the candidates. Keys order non-negative values only, so a query whose
    threshold is not positive, or that has more than `cap` candidate
    chunks, is not settled (plain float32 search answers it).
    """
    b = scores.shape[0]
    n_top = min(k, maxima.shape[1])
    top = torch.topk(maxima, n_top, dim=1).indices
    rows = torch.arange(b)[:, None].expand(b, n_top).reshape(-1)
    best = _chunk_scores(scores, rows, top.reshape(-1)).view(b, -1)
    kth = torch.topk(best, k, dim=1).values[:, -1].to(torch.float64).numpy()
    threshold = kth - 2 * bound
    settled = threshold > 0
    safe = np.where(settled, threshold, 1.0)
    hit = maxima >= _key_at_or_below(safe, scores.dtype)[:, None]
    q, chunk = torch.nonzero(hit, as_tuple=True)
    settled &= np.bincount(q.numpy(), minlength=b) <= cap
    if not settled.all():
        mine = torch.from_numpy(settled)[q]
        q, chunk = q[mine], chunk[mine]
    block = _chunk_scores(scores, q, chunk)
    keep = block >= torch.from_numpy(threshold)[q].to(torch.float32)[:, None].nextafter(
        torch.tensor(-torch.inf))  # float32 at or below the float64 threshold
    i, j = torch.nonzero(keep, as_tuple=True)
    return q[i].numpy(), (chunk[i] * CHUNK + j).numpy(), settled


def _product(queries, values):
    """The screened scores ``queries @ values.T``, tile by tile of :data:`_TILE` items."""
    if queries.shape[0] == 1:
        return (values @ queries[0])[None, :]  # the matrix-vector kernel
    n = values.shape[0]
    if n <= _TILE:
        return queries @ values.T
    scores = torch.empty((queries.shape[0], n), dtype=values.dtype)
    for start in range(0, n, _TILE):
        torch.matmul(queries, values[start:start + _TILE].T,
                     out=scores[:, start:start + _TILE])
    return scores


def _block_size(n_slots):
    """Queries per block: the screened scores of a block stay below :data:`_BLOCK_SCORES`."""
    rows = max(1, _BLOCK_SCORES // max(n_slots, 1))
    return min(_MAX_BLOCK, 1 << (rows.bit_length() - 1))


def certified_search(queries, bank, k, fmt, stages=None):
    """Exact top-`k` by a `fmt` screen, a cheap selection and a float32 re-rank.

    Per block of queries: one matrix product in `fmt` (the screened scores,
    never copied to float32), the chunk maxima of the scores, the certified
    candidates of each query (:func:`_select`), and their float32 scores
    (:func:`skmml.retrieval._exact.rescore`) ordered by (decreasing score,
    increasing id). `fmt` "fp32" runs the same pipeline with a float32
    product, whose bound is its accumulation error. `stages` (a
    :class:`Stages`) collects the time of each stage.

    Returns (sims, slots, done): the k best live slots of each query in the
    project's order, and a mask of the settled queries; the others (a
    threshold that is not positive, or candidates in more than
    :data:`MAX_CANDIDATE_FRACTION` of the memory's chunks) are left for plain
    float32 search. The caller ensures ``k`` is below the number of live items.
    """
    n, d = queries.shape
    sims = np.empty((n, k), dtype=np.float32)
    slots = np.empty((n, k), dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    if fmt == "fp16" and not _fp16_accumulates_in_float32():
        # torch was told to accumulate float16 products in float16: the
        # bound does not hold, so every query goes to float32 search.
        return sims, slots, done
    clock = time.perf_counter
    values, low_queries, bound = _screen_inputs(queries, bank, fmt)
    n_slots = bank.n_slots
    dead = torch.from_numpy(np.asarray(bank.dead_slots, dtype=np.int64))
    n_chunks = -(-n_slots // CHUNK)
    cap = max(k, int(MAX_CANDIDATE_FRACTION * n_chunks))
    embeddings, slot_ids = bank.slot_embeddings, bank.slot_ids
    block = _block_size(n_slots)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        t0 = clock()
        scores = _product(low_queries[start:rows[-1] + 1], values)
        t1 = clock()
        if dead.numel():
            scores.index_fill_(1, dead, -torch.inf)
        scores[:, n_slots:] = -torch.inf  # the padding of the low-precision copy
        maxima = _chunk_maxima(scores.view(_KEYS[scores.dtype]))
        q, cand, settled = _select(scores, maxima, k, bound[rows], cap)
        t2 = clock()
        q_global = rows[q]
        exact = rescore(queries, embeddings, q_global, cand)
        # Per query, candidates by (-score, id); then the first k of each.
        order = np.lexsort((slot_ids[cand], -exact, q))
        q, cand, exact = q[order], cand[order], exact[order]
        ok = np.flatnonzero(settled)
        take = (np.searchsorted(q, ok)[:, None] + np.arange(k)).ravel()
        sims[rows[ok]] = exact[take].reshape(-1, k)
        slots[rows[ok]] = cand[take].reshape(-1, k)
        done[rows[ok]] = True
        if stages is not None:
            stages.add("product", t1 - t0)
            stages.add("selection", t2 - t1)
            stages.add("re-rank", clock() - t2)
            stages.queries += len(rows)
            stages.candidates += len(cand)
    return sims, slots, done


# -- choosing the format: measured once per process and dimension ------------------------

def _fp16_accumulates_in_float32():
    get = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    return get is None or not get()


def _multiplies_fast(fmt, dim):
    """Whether a small matrix product in `fmt` is at least as fast as in float32."""
    if fmt == "fp32":
        return True
    a = torch.randn(64, dim)
    b = torch.randn(dim, 2048)
    low_a, low_b = a.to(FORMATS[fmt]), b.to(FORMATS[fmt])
    return best_time(lambda: low_a @ low_b) <= best_time(lambda: a @ b)


def _measure(regime, dim):
    """The fastest format for `regime` ("single" or "batch") at `dim`, or None for float32.

    Times the whole certified search (screen, selection, re-rank: the code
    path a search takes) against float32 exact search on a synthetic memory
    of the regime's shape: 64 MB of float32 items for one query (a
    memory-bound scan, past the caches); for a batch, one full block of
    queries (:func:`_block_size`, at most 256) against
    :data:`AUTO_MIN_BATCH_ITEMS` items, the smallest memory "auto" screens
    batches of. A format whose small matrix products are slower than
    float32's (emulated) is not timed for batches. Queries lie near items, as retrieval
    queries do. A format that is not faster is dropped after one call.
    """

    import faiss
    import pandas as pd

    rng = np.random.default_rng(0)
    if regime == "single":
        n_items, n_queries = max(4096, (64 << 20) // (4 * dim)), 1
    else:
        n_items = AUTO_MIN_BATCH_ITEMS
        n_queries = _block_size(n_items)
    items = rng.standard_normal((n_items, dim), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    near = items[rng.integers(0, n_items, n_queries)]
    queries = near + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    bank = MemoryBank(items, np.zeros(n_items, dtype=np.int64), np.arange(n_items),
                      pd.DataFrame(index=pd.RangeIndex(n_items)))
    if regime == "single":
        baseline = best_time(lambda: _top_k_blas(queries, items, 32, bank.dead_slots))
    else:
        baseline = best_time(
            lambda: faiss.knn(queries, items, 32, metric=faiss.METRIC_INNER_PRODUCT))
    best, choice = baseline / _MIN_GAIN, None
    for fmt in SCREEN_FORMATS:
        if fmt == "fp16" and not _fp16_accumulates_in_float32():
            continue
        if regime == "batch" and not _multiplies_fast(fmt, dim):
            continue  # an emulated format: a block's product would take seconds
        if fmt in FORMATS:
            low_precision_view(bank, fmt)  # the copy, built once, is not timed
        t = best_time(lambda fmt=fmt: certified_search(queries, bank, 32, fmt),
                      give_up=2 * best)
        if t < best:
            best, choice = t, fmt
    return choice


def screen_format(requested, n_queries, n_items, dim):
    """The format to screen `n_queries` queries of `n_items` with, or None for float32.

    `requested` is the exact index's ``screen`` parameter: "off", a format,
    or "auto": a format only where :func:`_measure` found it faster on this
    machine at this dimension (rounded up to a power of two), for memories of
    at least :data:`AUTO_MIN_ITEMS` items for one query at a time (smaller
    ones are searched in well under a millisecond), and of at least
    :data:`AUTO_MIN_BATCH_ITEMS` items for batches of at least 20 (2 to 19 queries share one float32 pass over the memory, which a
    per-query screen does not beat). Measurements are cached in this process
    and on disk (:func:`skmml._machine.cache_path`), keyed by the CPU's flags and the
    library versions (:func:`skmml._machine.measured`).
    """
    if requested == "off":
        return None
    if requested in SCREEN_FORMATS:
        return requested

    if n_queries == 1:
        regime = "single"
    elif n_queries >= SMALL_BATCH:
        regime = "batch"
    else:
        return None
    if n_items < (AUTO_MIN_ITEMS if regime == "single" else AUTO_MIN_BATCH_ITEMS):
        return None
    width = max(64, 1 << (int(dim) - 1).bit_length())
    choice = measured(f"screen-chunks/{regime}/{width}", lambda: _measure(regime, width))
    return choice if choice in SCREEN_FORMATS else None
