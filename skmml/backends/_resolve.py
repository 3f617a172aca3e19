"""Which backend a memory gives: the in-RAM memory's, or the memory's own."""

import abc

from ..memory._memory import Memory
from ._local import LocalBackend


class MemoryLike(abc.ABC):
    """Any memory a classifier takes: an object that gives a :class:`MemoryBackend`.

    :class:`~skmml.Memory` and :class:`~skmml.MilvusMemory` are memories; a
    new kind of memory is one whose ``_as_backend(index, modalities,
    unified)`` returns a backend that passes ``tests/test_backend_contract.py``.
    """

    @classmethod
    def __subclasshook__(cls, other):
        return True if callable(getattr(other, "_as_backend", None)) else NotImplemented


def as_backend(memory, index, modalities=("image",), unified=False):
    """The backend of `memory` searching `modalities` (an unbuilt NeighborIndex as `index`).

    With `unified`, the modalities are searched as one memory. A TypeError
    names anything that is not a memory.
    """
    check_memory(memory)
    if isinstance(memory, Memory):
        return LocalBackend.build(memory, index, tuple(modalities), unified)
    return memory._as_backend(index, tuple(modalities), unified)


def check_memory(memory):
    """Raise a TypeError naming what `memory` is when it is not a memory."""
    if not isinstance(memory, MemoryLike):
        raise TypeError(f"The classifier needs a Memory or a MilvusMemory as its memory, got "
                        f"{type(memory).__name__}.")


MemoryLike.register(Memory)
