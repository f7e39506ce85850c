"""Adapters turn a known source's files into validated canonical tables (:class:`RawData`)."""

from features.adapters.base import RawData
from features.adapters.completejourney import load_complete_journey
from features.adapters.movielens import load_movielens_100k
from features.adapters.shop_transactions import load_shop_transactions

__all__ = ["RawData", "load_complete_journey", "load_movielens_100k", "load_shop_transactions"]
