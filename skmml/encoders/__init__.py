"""Encoders as scikit-learn transformers, and the zero-shot CLIP baseline."""

from ._encoders import CLIPImageEncoder, CLIPTextEncoder, TimmImageEncoder, clear_model_cache
from ._zero_shot import ZeroShotCLIPClassifier

__all__ = ["CLIPImageEncoder", "CLIPTextEncoder", "TimmImageEncoder", "ZeroShotCLIPClassifier",
           "clear_model_cache"]
