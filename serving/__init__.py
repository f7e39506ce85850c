"""Serving: load an exported artifact with onnxruntime and rank add-ons under business rules.

Depends only on numpy and onnxruntime; it never imports ``training``, ``features``, implicit,
lightfm, scipy or mlflow: the artifact directory is the only contract with training.
"""

from serving.artifact import Artifact, ArtifactError
from serving.ranker import RankedItem, Ranker, RankResult
from serving.rules import RuleSettings

__all__ = ["Artifact", "ArtifactError", "RankResult", "RankedItem", "Ranker", "RuleSettings"]
