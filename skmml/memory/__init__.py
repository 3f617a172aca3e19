"""The memory: labelled image and text embeddings, stored, changed and built.

- :class:`Memory`, immutable, with stable ids from a high-water mark;
  :class:`MemoryBank`, one modality's items in an append-only store shared
  by a memory's versions;
- building a memory from raw items (:func:`build_memory`,
  :func:`memory_from_folder`) and text documents (:func:`split_document`,
  :func:`fill_templates`); class-incremental budgets by herding
  (:func:`herding_order`).
"""

from ._bank import MODALITIES, MemoryBank
from ._builders import IMAGE_EXTENSIONS, build_memory, memory_from_folder
from ._herding import herding_order
from ._memory import Memory
from ._text import IMAGENET_TEMPLATES, fill_templates, split_document

__all__ = ["IMAGENET_TEMPLATES", "IMAGE_EXTENSIONS", "MODALITIES", "Memory", "MemoryBank",
           "build_memory", "fill_templates", "herding_order", "memory_from_folder",
           "split_document"]
