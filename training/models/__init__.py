"""Models behind one interface (:class:`training.models.base.RecommenderBase`).

``MODELS`` maps the ``model.kind`` of a config to its class. Library-backed models import
their library only when fitted.
"""

from training.models.addon import AddonScorer
from training.models.base import RecommenderBase
from training.models.baselines import (
    CooccurrenceRecommender,
    PersonalPopularityRecommender,
    PopularityRecommender,
)
from training.models.ease import EASERecommender
from training.models.implicit_models import (
    ALSRecommender,
    BPRRecommender,
    ItemKNNRecommender,
    LMFRecommender,
)
from training.models.lightfm_model import LightFMRecommender
from training.models.ranker import RankerRecommender

MODELS: dict[str, type[RecommenderBase]] = {
    cls.kind: cls
    for cls in (
        PopularityRecommender,
        PersonalPopularityRecommender,
        CooccurrenceRecommender,
        ALSRecommender,
        BPRRecommender,
        LMFRecommender,
        ItemKNNRecommender,
        LightFMRecommender,
        EASERecommender,
        AddonScorer,
        RankerRecommender,
    )
}

__all__ = [
    "MODELS",
    "ALSRecommender",
    "AddonScorer",
    "BPRRecommender",
    "CooccurrenceRecommender",
    "EASERecommender",
    "ItemKNNRecommender",
    "LMFRecommender",
    "LightFMRecommender",
    "PersonalPopularityRecommender",
    "PopularityRecommender",
    "RecommenderBase",
]
