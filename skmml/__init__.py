"""skmml: memory-modular, retrieval-augmented classification for scikit-learn."""

from .bank import MemoryBank
from .builders import build_memory
from .display import ExplanationDisplay
from .encoders import CLIPImageEncoder, CLIPTextEncoder, TimmImageEncoder
from .knn import KNNVoteClassifier
from .memory import Memory
from .milvus import MilvusMemory
from .mml import MemoryModularClassifier
from .retrieval import NeighborIndex
from .zero_shot import ZeroShotCLIPClassifier

__version__ = "0.1.0.dev0"

__all__ = [
    "CLIPImageEncoder",
    "CLIPTextEncoder",
    "ExplanationDisplay",
    "KNNVoteClassifier",
    "Memory",
    "MemoryBank",
    "MemoryModularClassifier",
    "MilvusMemory",
    "NeighborIndex",
    "TimmImageEncoder",
    "ZeroShotCLIPClassifier",
    "__version__",
    "build_memory",
]
