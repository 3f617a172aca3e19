"""skmml: memory-modular, retrieval-augmented classification for scikit-learn."""

from ._display import ExplanationDisplay
from ._validation import ZeroEmbeddingWarning
from .backends import MilvusMemory
from .encoders import CLIPImageEncoder, CLIPTextEncoder, TimmImageEncoder, ZeroShotCLIPClassifier
from .memory import Memory, MemoryBank, build_memory
from .mml import MemoryModularClassifier
from .neighbors import (BaseReranker, EmbeddingReranker, KNNVoteClassifier, RerankContext,
                        RerankFallbackWarning, VLMReranker)
from .retrieval import NeighborIndex

__version__ = "0.1.0.dev0"

__all__ = [
    "BaseReranker",
    "CLIPImageEncoder",
    "CLIPTextEncoder",
    "EmbeddingReranker",
    "ExplanationDisplay",
    "KNNVoteClassifier",
    "Memory",
    "MemoryBank",
    "MemoryModularClassifier",
    "MilvusMemory",
    "NeighborIndex",
    "RerankContext",
    "RerankFallbackWarning",
    "TimmImageEncoder",
    "VLMReranker",
    "ZeroEmbeddingWarning",
    "ZeroShotCLIPClassifier",
    "__version__",
    "build_memory",
]
