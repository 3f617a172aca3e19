"""Where a classifier's memory lives: one protocol, implemented by every memory.

Both classifiers reach their memory only through a backend
(:class:`MemoryBackend`), so that neither names an engine:
:class:`LocalBackend` over an in-RAM :class:`~skmml.Memory` (each searched
modality indexed by a :class:`~skmml.NeighborIndex`), and the backend of a
:class:`~skmml.MilvusMemory` (:mod:`skmml.backends.milvus`). A new kind of
memory gives its own backend and passes ``tests/test_backend_contract.py``.
"""

from ._base import KeyCounts, MemoryBackend, Neighbors
from ._local import LocalBackend
from ._resolve import MemoryLike, as_backend, check_memory
from .milvus import MilvusMemory

__all__ = ["KeyCounts", "LocalBackend", "MemoryBackend", "MemoryLike", "MilvusMemory",
           "Neighbors", "as_backend", "check_memory"]
