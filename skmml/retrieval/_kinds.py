"""One class per index kind, behind one interface (:class:`IndexKind`).

A kind holds a built index over one version of a bank and answers
``search``; ``added`` and ``removed`` return the kind for the next version
of the bank (copy-on-write: this one keeps serving reads in flight).
:class:`~skmml.NeighborIndex` chooses the kind from its ``index`` parameter.
"""

import time
from collections import namedtuple

import numpy as np

from ._exact import SMALL_BATCH, canonical_neighbors, exact_search
from ._screening import certified_search, screen_format

#: A :class:`~skmml.NeighborIndex`'s parameters, as each kind keeps them.
IndexSpec = namedtuple("IndexSpec", "index params device")


class IndexKind:
    """A built index over `bank` (a MemoryBank version), for the parameters of `spec`.

    `spec` holds the parameters of the :class:`~skmml.NeighborIndex` that
    chose the kind (an :data:`IndexSpec`).
    """

    #: Whether searches return the exact neighbors (then certified by a margin).
    exact = False

    def __init__(self, spec, bank):
        self.spec, self.bank = spec, bank

    def added(self, bank, n_new):
        """The kind over `bank`, whose last `n_new` slots are new items."""
        raise NotImplementedError

    def removed(self, bank, ids):
        """The kind over `bank`, from which the items `ids` were removed."""
        raise NotImplementedError

    def raw_search(self, queries, k):
        """(similarities, slots) of about the `k` nearest items; slot -1 where none."""
        raise NotImplementedError

    def search(self, queries, k):
        """The `k` nearest items in the project's order (:func:`canonical_neighbors`)."""
        margin = min(len(self.bank) - k, max(4, k // 4))
        sims, rows = self.raw_search(queries, k + max(margin, 0))
        return canonical_neighbors(queries, self.bank, sims, rows, k, exact=self.exact)


class ExactIndex(IndexKind):
    """Exact search on the CPU, reading the bank's storage in place (no copy).

    Following an added or forgotten item costs nothing. Takes
    ``{"screen": "auto" | "off" | "fp16" | "bf16"}``: certified search with a
    reduced-precision screen (:mod:`skmml.retrieval._screening`).
    """

    exact = True

    def __init__(self, spec, bank):
        super().__init__(spec, bank)
        self.screen = (spec.params or {}).get("screen", "auto")

    @classmethod
    def build(cls, spec, bank):
        kind = cls(spec, bank)
        # Decide now (measured once per machine) whether to screen, so that
        # the first query does not pay for the measurement.
        for n_queries in (1, SMALL_BATCH):
            screen_format(kind.screen, n_queries, len(bank), bank.dim)
        return kind

    def added(self, bank, n_new):
        return ExactIndex(self.spec, bank)

    def removed(self, bank, ids):
        return ExactIndex(self.spec, bank)

    def raw_search(self, queries, k):
        return exact_search(queries, self.bank, k)

    def search(self, queries, k, stages=None):
        """The `k` nearest; `stages` (a :class:`~skmml.retrieval._screening.Stages`)
        collects the time of each stage of a certified search."""
        fmt = None
        if k < len(self.bank):
            fmt = screen_format(self.screen, queries.shape[0], self.bank.n_slots,
                                queries.shape[1])
        if fmt is None:
            return super().search(queries, k)
        sims, rows, done = certified_search(queries, self.bank, k, fmt, stages)
        if not done.all():
            start = time.perf_counter()
            rest = np.flatnonzero(~done)
            sims[rest], rows[rest] = super().search(queries[rest], k)
            if stages is not None:
                stages.add("fallback", time.perf_counter() - start)
                stages.fallback += rest.size
        return sims, rows
