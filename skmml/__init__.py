"""skmml: memory-modular, retrieval-augmented classification for scikit-learn."""

from .knn import KNNVoteClassifier
from .memory import Memory, MemoryBank
from .mml import MemoryModularClassifier
from .retrieval import NeighborIndex

__version__ = "0.1.0.dev0"

__all__ = [
    "KNNVoteClassifier",
    "Memory",
    "MemoryBank",
    "MemoryModularClassifier",
    "NeighborIndex",
    "__version__",
]
