"""Encoders as scikit-learn transformers, and the zero-shot CLIP baseline."""

from ._embeddings import Embeddings
from ._encoders import (CLIPImageEncoder, CLIPTextEncoder, TimmImageEncoder,
                        clear_embedding_cache, clear_model_cache, embedding_cache_info,
                        set_embedding_cache)
from ._zero_shot import ZeroShotCLIPClassifier

__all__ = ["CLIPImageEncoder", "CLIPTextEncoder", "Embeddings", "TimmImageEncoder",
           "ZeroShotCLIPClassifier", "clear_embedding_cache", "clear_model_cache",
           "embedding_cache_info", "set_embedding_cache"]
