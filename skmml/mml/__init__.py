"""The memory-modular learner: retrieval, cross-attention heads, class prototypes."""

from ._classifier import MemoryModularClassifier
from ._heads import IntegrationHead
from ._prototypes import PROTOTYPE_MODES, class_prototypes

__all__ = ["IntegrationHead", "MemoryModularClassifier", "PROTOTYPE_MODES",
           "class_prototypes"]
