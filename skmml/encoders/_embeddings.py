"""Embeddings that remember which files they were computed from."""

import numpy as np


class Embeddings(np.ndarray):
    """An ``(n, d)`` float32 array of embeddings with the source of each row.

    What the image encoders return: a plain :class:`numpy.ndarray` for every
    purpose, plus ``sources``, the file path of each row (None for an
    in-memory image). A skmml classifier that follows the encoder in a
    :class:`~sklearn.pipeline.Pipeline` keeps them as the ``source`` metadata
    of the items it puts in its memory, so its explanations show the memory
    images. Any array derived from this one (a slice, a copy, the result of
    arithmetic) is a plain array without sources: only the encoder's own
    output vouches for which row came from which file.

    Parameters
    ----------
    array : ndarray of shape (n, d)
    sources : sequence of str or None, of length n
    """

    def __new__(cls, array, sources):
        obj = np.asarray(array).view(cls)
        if len(sources) != obj.shape[0]:
            raise ValueError(f"{len(sources)} sources for {obj.shape[0]} rows.")
        obj.sources = list(sources)
        return obj

    def __array_finalize__(self, obj):
        self.sources = None

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # A ufunc's result is a new array, not the encoder's output.
        plain = self.view(np.ndarray)
        return plain.__array_wrap__(array.view(np.ndarray), context, return_scalar)

    def __reduce__(self):
        constructor, args, state = super().__reduce__()
        return constructor, args, (state, self.sources)

    def __setstate__(self, state):
        array_state, self.sources = state
        super().__setstate__(array_state)
