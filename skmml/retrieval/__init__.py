"""Nearest-neighbor search over a memory bank, in-process.

:class:`NeighborIndex` is the one interface over every index kind: exact
search (BLAS and FAISS brute force, optionally screened in float16 /
bfloat16 with a proven bound and re-ranked in float32), FAISS's approximate
indexes, and ScaNN. Every kind returns its neighbors in one order:
decreasing similarity, equal similarities to the lower id.
"""

from ._faiss import INDEX_SHORTCUTS, faiss_has_gpu
from ._index import NeighborIndex

__all__ = ["INDEX_SHORTCUTS", "NeighborIndex", "faiss_has_gpu"]
