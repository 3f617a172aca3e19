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
   ties included. Every other item is a candidate.
4. Re-rank the candidates with the float32 kernel of
   :func:`skmml.retrieval.canonical_neighbors` and keep the k best by
   (decreasing score, increasing id), the project's one order.

A query with more than :data:`MAX_CANDIDATE_FRACTION` of the memory among its
candidates (near-equal scores everywhere: duplicates, degenerate data) is
handed back to plain float32 search; the answer is exact either way. The
low-precision copy of a memory (half its float32 bytes) lives with the
bank's append-only store (``skmml.memory._bank``): built on first use, extended
as items are added, never rewritten, so readers of any version share it.
Whether the screen pays is measured once per machine and dimension
(:func:`screen_format`).
"""

import threading
import warnings

import numpy as np
import torch

from .._machine import best_time, measured
from ..memory._bank import MemoryBank
from ._exact import SMALL_BATCH, _top_k_blas, rescore

#: The reduced-precision formats a screen may use.
FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Unit roundoff of each format (round to nearest).
_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
#: Values of the ``screen`` search parameter of the exact index.
SCREEN_OPTIONS = ("auto", "off", "fp16", "bf16")
#: A query whose candidates exceed this fraction of the memory is searched in float32.
MAX_CANDIDATE_FRACTION = 1 / 16
#: Most screened scores (queries x items) one block holds.
_SCREEN_BLOCK = 1 << 24
#: Rows converted at a time when a store's copy is extended (its float64
#: temporaries stay near 16 MB at d = 512).
_CONVERT_BLOCK = 1 << 12
#: The screen must beat float32 search by this factor to be chosen automatically.
_MIN_GAIN = 1.15
#: "auto" screens memories of at least this many items.
AUTO_MIN_ITEMS = 1 << 15


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
        self.values = torch.empty((capacity, dim), dtype=FORMATS[fmt])
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
    """(values, max residual, max norm, max low norm) over the bank's slots in `fmt`."""
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
    return (copy.values[:n], copy.max_residual[last], copy.max_norm[last],
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


def _float32_at_or_below(thr):
    """Float32 thresholds no larger than the float64 ones (a conservative screen)."""
    rounded = thr.astype(np.float32)
    too_high = rounded.astype(np.float64) > thr
    rounded[too_high] = np.nextafter(rounded[too_high], np.float32(-np.inf))
    return torch.from_numpy(rounded)


def certified_search(queries, bank, k, fmt):
    """Exact top-`k` by a `fmt` screen and a float32 re-rank.

    Returns (sims, slots, done): the k best live slots of each query in the
    project's order (decreasing score, increasing id), and a mask of the
    queries that were settled; the others (too many candidates) are left
    for plain float32 search. The caller ensures ``k`` is below the number
    of live items.
    """
    n, d = queries.shape
    if fmt == "fp16" and not _fp16_accumulates_in_float32():
        # torch was told to accumulate float16 products in float16: the
        # bound does not hold, so every query goes to float32 search.
        return (np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64),
                np.zeros(n, dtype=bool))
    view = low_precision_view(bank, fmt)
    values = view[0]
    n_slots = values.shape[0]
    low_queries, bound = screen_bound(queries, fmt, view)
    dead = torch.from_numpy(np.asarray(bank.dead_slots, dtype=np.int64))
    cap = max(4 * k, int(MAX_CANDIDATE_FRACTION * n_slots))
    sims = np.empty((n, k), dtype=np.float32)
    slots = np.empty((n, k), dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    embeddings, slot_ids = bank.slot_embeddings, bank.slot_ids
    block = max(1, _SCREEN_BLOCK // max(n_slots, 1))
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        if rows.stop - rows.start == 1:
            scores = (values @ low_queries[rows][0])[None, :]  # matrix-vector kernel
        else:
            scores = low_queries[rows] @ values.T
        # Selection runs on a float32 copy: exact (every float16 / bfloat16
        # value is a float32), and torch's half-precision comparisons and
        # top-k on a CPU are several times slower than the product.
        scores = scores.float()
        if dead.numel():
            scores[:, dead] = -torch.inf
        kth = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1)
        thr = kth.to(torch.float64).numpy() - 2 * bound[rows]
        passed = scores >= _float32_at_or_below(thr)[:, None]
        counts = passed.sum(dim=1).numpy()
        settled = counts <= cap
        if not settled.all():
            passed[torch.from_numpy(~settled)] = False
        q, cand = (t.numpy() for t in torch.nonzero(passed, as_tuple=True))
        q_global = q + rows.start
        exact = rescore(queries, embeddings, q_global, cand)
        # Per query, candidates by (-score, id); then the first k of each.
        order = np.lexsort((slot_ids[cand], -exact, q))
        q, cand, exact = q[order], cand[order], exact[order]
        starts = np.searchsorted(q, np.flatnonzero(settled))
        take = (starts[:, None] + np.arange(k)).ravel()
        out = np.flatnonzero(settled) + rows.start
        sims[out] = exact[take].reshape(-1, k)
        slots[out] = cand[take].reshape(-1, k)
        done[out] = True
    return sims, slots, done


# -- choosing the format: measured once per process and dimension ------------------------

def _fp16_accumulates_in_float32():
    get = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    return get is None or not get()


def _measure(regime, dim):
    """The fastest format for `regime` ("single" or "batch") at `dim`, or None for float32.

    Times the whole certified search (screen, selection, re-rank) against
    float32 exact search on a synthetic memory of the regime's shape: 64 MB
    of float32 items for one query (a memory-bound scan, past the caches),
    64 queries against 8192 items for a batch (compute-bound). A format that is not faster is
    dropped after one call, so the measurement takes well under a second
    where half precision is emulated.
    """

    import faiss
    import pandas as pd

    rng = np.random.default_rng(0)
    n_items = max(4096, (64 << 20) // (4 * dim)) if regime == "single" else 8192
    n_queries = 1 if regime == "single" else 64
    items = rng.standard_normal((n_items, dim), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:n_queries] + 0.1 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bank = MemoryBank(items, np.zeros(n_items, dtype=np.int64), np.arange(n_items),
                      pd.DataFrame(index=pd.RangeIndex(n_items)))
    if regime == "single":
        baseline = best_time(lambda: _top_k_blas(queries, items, 32, bank.dead_slots))
    else:
        baseline = best_time(
            lambda: faiss.knn(queries, items, 32, metric=faiss.METRIC_INNER_PRODUCT))
    best, choice = baseline / _MIN_GAIN, None
    for fmt in FORMATS:
        if fmt == "fp16" and not _fp16_accumulates_in_float32():
            continue
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
    at least :data:`AUTO_MIN_ITEMS` items (smaller ones are searched in well
    under a millisecond), for one query at a time or for batches of at least
    20 (2 to 19 queries share one float32 pass over the memory, which a
    per-query screen does not beat). Measurements are cached in this process
    and on disk (:func:`skmml._machine.cache_path`), keyed by the CPU's flags and the
    library versions (:func:`skmml._machine.measured`).
    """
    if requested == "off":
        return None
    if requested in FORMATS:
        return requested

    if n_items < AUTO_MIN_ITEMS:
        return None
    if n_queries == 1:
        regime = "single"
    elif n_queries >= SMALL_BATCH:
        regime = "batch"
    else:
        return None
    width = max(64, 1 << (int(dim) - 1).bit_length())
    choice = measured(f"screen/{regime}/{width}", lambda: _measure(regime, width))
    return choice if choice in FORMATS else None
