"""The visual memory: k-nearest-neighbor voting over a replaceable memory, and re-ranking."""

from ._classification import KNNVoteClassifier
from ._pruning import PRUNING_MODES
from ._rerank import (BaseReranker, EmbeddingReranker, RerankContext,
                      RerankFallbackWarning)
from ._vlm import VLMReranker
from ._voting import VOTING_SCHEMES

__all__ = [
    "BaseReranker",
    "EmbeddingReranker",
    "KNNVoteClassifier",
    "PRUNING_MODES",
    "RerankContext",
    "RerankFallbackWarning",
    "VLMReranker",
    "VOTING_SCHEMES",
]
