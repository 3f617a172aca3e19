"""The visual memory: k-nearest-neighbor voting over a replaceable memory."""

from ._classification import KNNVoteClassifier
from ._pruning import PRUNING_MODES
from ._voting import VOTING_SCHEMES

__all__ = ["KNNVoteClassifier", "PRUNING_MODES", "VOTING_SCHEMES"]
