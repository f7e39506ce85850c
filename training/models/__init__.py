"""Models behind one interface (:class:`training.models.base.RecommenderBase`)."""

from training.models.base import RecommenderBase
from training.models.baselines import (
    CooccurrenceRecommender,
    PersonalPopularityRecommender,
    PopularityRecommender,
)

MODELS: dict[str, type[RecommenderBase]] = {
    "popularity": PopularityRecommender,
    "personal_popularity": PersonalPopularityRecommender,
    "cooccurrence": CooccurrenceRecommender,
}

__all__ = [
    "MODELS",
    "CooccurrenceRecommender",
    "PersonalPopularityRecommender",
    "PopularityRecommender",
    "RecommenderBase",
]
