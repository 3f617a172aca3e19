"""Certified exact search (skmml.retrieval._screening): a reduced-precision screen, a float32 re-rank.

The screen may only change how fast the exact index is, never what it returns:
every test compares ids and their order with float32 search (``screen="off"``)
and with a float64 reference, on data built to defeat a screen.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from skmml import KNNVoteClassifier, Memory
from skmml.retrieval import _screening as screening
from skmml.retrieval import NeighborIndex

FORMATS = ["fp16", "bf16", "fp32"]


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(bank, queries, k):
    """The k best live slots by (float32 score, then lower id), scored pair by pair.

    Float32 scores are those of the one fixed kernel the project orders by;
    :func:`_check_near_optimal` checks them against float64 independently.
    """
    n, m = queries.shape[0], bank.n_slots
    q, slots = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
    scores = np.einsum("md,md->m", queries[q], bank.slot_embeddings[slots]).reshape(n, m)
    scores[:, bank.dead_slots] = -np.inf
    order = np.lexsort((np.broadcast_to(bank.slot_ids, scores.shape), -scores), axis=1)
    _check_near_optimal(bank, queries, order[:, :k])
    return order[:, :k]


def _check_near_optimal(bank, queries, slots):
    """In float64, no left-out item beats a returned one by more than float32 error."""
    exact = queries.astype(np.float64) @ bank.slot_embeddings.astype(np.float64).T
    exact[:, bank.dead_slots] = -np.inf
    worst_kept = np.take_along_axis(exact, slots, axis=1).min(axis=1)
    exact[np.arange(len(slots))[:, None], slots] = -np.inf
    assert np.all(exact.max(axis=1) <= worst_kept + 1e-5)


def _adversarial(kind, rng, d=64):
    """(items, queries) on which a screen has to keep many candidates."""
    if kind == "near_equal":
        # Items on a thin shell around each query direction: exact scores
        # within ~1e-4 of each other, far below the screen's bound.
        q = _unit(rng.normal(size=(12, d)))
        items = np.repeat(q, 150, axis=0) + 3e-3 * rng.normal(size=(1800, d))
        return _unit(np.vstack([items, rng.normal(size=(400, d))])), q
    if kind == "duplicates":
        # Exact duplicates with different ids: ties go to the lower id.
        base = _unit(rng.normal(size=(40, d)))
        items = np.repeat(base, 30, axis=0)
        return items[rng.permutation(len(items))], _unit(base[:10] + 0.05 * rng.normal(
            size=(10, d)))
    if kind == "sparse_large":
        # Large and tiny components (fp16 underflow, bf16 coarse rounding).
        items = rng.normal(size=(1500, d)) * np.where(rng.random((1500, d)) < 0.1, 1.0, 1e-5)
        return _unit(items), _unit(items[:10] + 1e-3 * rng.normal(size=(10, d)))
    raise ValueError(kind)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["near_equal", "duplicates", "sparse_large"])
@pytest.mark.parametrize("n_queries", [1, 25])
def test_screened_search_equals_float32_search_on_adversarial_data(fmt, kind, n_queries):
    rng = np.random.default_rng(0)
    items, queries = _adversarial(kind, rng)
    queries = np.resize(queries, (n_queries, queries.shape[1]))
    bank = Memory(items, np.zeros(len(items), dtype=int)).image
    for k in (1, 10, 200):
        screened = NeighborIndex("flat", params={"screen": fmt}, device="cpu").build(bank)
        plain = NeighborIndex("flat", params={"screen": "off"}, device="cpu").build(bank)
        sims, slots = screened.search(queries, k)
        ref_sims, ref_slots = plain.search(queries, k)
        np.testing.assert_array_equal(slots, ref_slots)
        np.testing.assert_array_equal(slots, _reference(bank, queries, k))
        np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=2e-7)


@pytest.mark.parametrize("fmt", FORMATS)
def test_k_up_to_1024_with_forgotten_and_added_items(fmt):
    rng = np.random.default_rng(1)
    memory = Memory(rng.normal(size=(3000, 32)), rng.integers(0, 4, 3000))
    memory = memory.add(rng.normal(size=(50, 32)), np.zeros(50, dtype=int))
    memory = memory.remove(np.arange(0, 3000, 20))  # dead slots, not yet compacted
    bank = memory.image
    assert bank.dead_slots.size
    queries = _unit(rng.normal(size=(30, 32)))
    for k in (1, 33, 1024):
        for n in (1, 30):
            sims, slots = NeighborIndex("flat", params={"screen": fmt},
                                        device="cpu").build(bank).search(queries[:n], k)
            np.testing.assert_array_equal(slots, _reference(bank, queries[:n], k))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_bound_holds_for_every_pair(fmt):
    """|screened score - exact score| <= B, the bound of the module docstring."""
    rng = np.random.default_rng(2)
    for kind in ("near_equal", "sparse_large"):
        items, queries = _adversarial(kind, rng)
        bank = Memory(items, np.zeros(len(items), dtype=int)).image
        values, low_q, bound = screening._screen_inputs(queries, bank, fmt)
        screened = (low_q @ values[:bank.n_slots].T).to(torch.float64).numpy()
        exact = queries.astype(np.float64) @ bank.slot_embeddings.astype(np.float64).T
        error = np.abs(screened - exact).max(axis=1)
        assert np.all(error <= bound)
        assert np.all(bound < 0.05)  # and is small enough to screen with


def test_degenerate_memory_falls_back_to_float32_and_stays_exact():
    """Identical items: every item is a candidate, so the queries go to float32 search."""
    rng = np.random.default_rng(3)
    items = np.repeat(_unit(rng.normal(size=(1, 16))), 500, axis=0)
    bank = Memory(items, np.zeros(500, dtype=int)).image
    queries = _unit(rng.normal(size=(5, 16)))
    _, _, done = screening.certified_search(queries, bank, 3, "fp16")
    assert not done.any()
    _, slots = NeighborIndex("flat", params={"screen": "fp16"}, device="cpu").build(
        bank).search(queries, 3)
    np.testing.assert_array_equal(slots, np.tile([0, 1, 2], (5, 1)))  # ties: lower ids


def test_the_low_precision_copy_is_half_the_bytes_and_follows_additions():
    rng = np.random.default_rng(4)
    memory = Memory(rng.normal(size=(1000, 64)), rng.integers(0, 3, 1000))
    clf = KNNVoteClassifier(n_neighbors=5, index_params={"screen": "fp16"}).set_memory(memory)
    # The first addition copies the memory once into a store with room to grow.
    clf.partial_fit(rng.normal(size=(20, 64)), np.full(20, 7))
    clf.predict(memory.image.embeddings[:1])
    store = clf.memory_.image._store
    copy = store.low_precision["fp16"]
    assert set(store.low_precision) == {"fp16"}
    assert copy.values.element_size() * 2 == store.embeddings.itemsize
    rows = copy.values.shape[0]  # the store's capacity, up to a whole chunk
    assert rows - screening.CHUNK < store.embeddings.shape[0] <= rows
    assert copy.values.shape[1] == store.embeddings.shape[1] and copy.filled == 1020
    new = rng.normal(size=(1, 64))
    clf.partial_fit(new, [9])
    assert clf.memory_.image._store is store  # appended in place
    assert clf.predict(new)[0] == 9
    assert store.low_precision["fp16"] is copy and copy.filled == 1021  # extended
    ref = KNNVoteClassifier(n_neighbors=5, index_params={"screen": "off"}).set_memory(
        clf.memory_)
    Q = rng.normal(size=(40, 64))
    np.testing.assert_array_equal(clf.kneighbors(Q)[1], ref.kneighbors(Q)[1])
    np.testing.assert_array_equal(clf.predict(Q), ref.predict(Q))
    np.testing.assert_allclose(clf.predict_proba(Q), ref.predict_proba(Q), rtol=1e-6)


def test_readers_get_exact_answers_while_a_writer_adds_and_forgets(read_while_writing):
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(2000, 32)), rng.integers(0, 5, 2000)
    clf = KNNVoteClassifier(n_neighbors=8, index_params={"screen": "fp16"}).fit(X, y)
    Q = _unit(rng.normal(size=(21, 32)))

    def read():
        index = clf._state.backend.index()  # one published version
        for n in (1, 21):
            if not np.array_equal(index.search(Q[:n], 8)[1], _reference(index.bank_, Q[:n], 8)):
                return n
        return None

    def write(step):
        clf.partial_fit(rng.normal(size=(5, 32)), rng.integers(0, 5, 5))
        clf.forget(clf.memory_.image.ids[step * 3:step * 3 + 2])

    assert not read_while_writing(read, write, steps=30)


def test_screen_parameter_errors():
    bank = Memory(np.eye(4), [0, 1, 2, 3]).image
    with pytest.raises(ValueError, match="screen must be one of"):
        NeighborIndex("flat", params={"screen": "int4"}).build(bank)
    with pytest.raises(ValueError, match="applies to the exact index"):
        NeighborIndex("hnsw", params={"screen": "fp16"}, device="cpu").build(bank)


def test_auto_choice_is_measured_once_and_cached_on_disk(tmp_path, monkeypatch):
    from skmml import _machine

    monkeypatch.setenv("SKMML_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_machine, "_CHOICES", {})
    calls = []
    measure = screening._measure
    monkeypatch.setattr(screening, "_measure",
                        lambda regime, dim: calls.append((regime, dim)) or measure(regime, dim))
    big = screening.AUTO_MIN_ITEMS
    first = screening.screen_format("auto", 1, big, 24)
    assert first in (None, "fp16", "bf16", "fp32")
    assert calls == [("single", 64)]  # measured at the dimension's power-of-two bucket
    assert screening.screen_format("auto", 1, big, 50) == first and len(calls) == 1
    assert screening.screen_format("auto", 5, big, 24) is None  # 2-19 queries: float32
    assert screening.screen_format("auto", 1, big - 1, 24) is None  # small memory: float32
    monkeypatch.setattr(_machine, "_CHOICES", {})  # a new process reads the file
    assert list(tmp_path.iterdir()) == [Path(_machine.cache_path())]
    assert screening.screen_format("auto", 1, big, 24) == first and len(calls) == 1
    assert screening.screen_format("off", 1, big, 24) is None
    assert screening.screen_format("bf16", 5, 10, 24) == "bf16"


def test_float16_accumulated_in_float16_is_never_trusted(monkeypatch):
    bank = Memory(np.random.default_rng(6).normal(size=(300, 16)), np.zeros(300, int)).image
    queries = _unit(np.random.default_rng(7).normal(size=(4, 16)))
    monkeypatch.setattr(screening, "_fp16_accumulates_in_float32", lambda: False)
    assert not screening.certified_search(queries, bank, 3, "fp16")[2].any()
    _, slots = NeighborIndex("flat", params={"screen": "fp16"}).build(bank).search(queries, 3)
    np.testing.assert_array_equal(slots, _reference(bank, queries, 3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_short_chunks_and_retries_give_the_exact_answer(fmt, monkeypatch):
    """Many blocks of queries, products in tiles, a short last chunk, dead slots and
    crowded scores: the answer is float32 search's."""
    monkeypatch.setattr(screening, "_BLOCK_SCORES", 8 * 4000)  # 8 queries a block
    monkeypatch.setattr(screening, "_TILE", 1000)  # products in tiles, the last one short
    rng = np.random.default_rng(8)
    centers = _unit(rng.normal(size=(20, 48)))
    # 150 items around each center: their scores crowd within the bound of a query
    # near the center, so 64 candidates cannot certify and the count must grow.
    items = _unit(np.repeat(centers, 150, axis=0) + 2e-3 * rng.normal(size=(3000, 48)))
    extra = _unit(rng.normal(size=(1003, 48)))
    memory = Memory(np.vstack([items, extra]), np.zeros(4003, dtype=int)).remove(
        np.arange(5, 4003, 97))
    bank = memory.image
    assert bank.n_slots % screening.CHUNK and bank.dead_slots.size
    queries = _unit(np.vstack([centers[:10] + 1e-3 * rng.normal(size=(10, 48)),
                               rng.normal(size=(30, 48))]))
    stages = screening.Stages()
    index = NeighborIndex("flat", params={"screen": fmt}, device="cpu").build(bank)
    for k in (1, 32, 100):
        sims, slots = index.kind_.search(queries, k, stages)
        np.testing.assert_array_equal(slots, _reference(bank, queries, k))
    assert stages.queries + stages.fallback >= 3 * len(queries)
    if fmt != "fp32":  # crowded scores: far more candidates than k for the first queries
        assert stages.candidates > 10 * 100 * 3
    assert all(seconds >= 0 for seconds in stages.seconds.values())
