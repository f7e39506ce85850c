"""Business rules for add-on offers (see shared/DOMAIN.md). Every rule is a setting with a
default, never a constant in code.

Offers: ``cross_sell`` (other categories than the anchor / cart, price at most
``cross_sell_max_price_ratio`` x the anchor's), ``up_sell`` (same category as the anchor,
price above it and at most ``1 + up_sell_max_price_increase`` times it), ``bundle`` (cross-sell
items to go with the anchor), ``impulse`` (cheap items, at most ``impulse_max_price``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OFFERS = ("cross_sell", "up_sell", "bundle", "impulse")
PLACEMENTS = ("product", "cart", "checkout", "category", "email")


@dataclass(frozen=True)
class RuleSettings:
    """Defaults from the domain notes; change per deployment."""

    default_k: int = 3  # show few offers: 3 to 5
    max_k: int = 20
    max_cart_items: int = 100
    exclude_owned: bool = False  # groceries are re-bought: repeat purchase stays possible
    in_stock_only: bool = True
    up_sell_max_price_increase: float = 0.25  # +25% over the anchor (another source: +40%)
    cross_sell_max_price_ratio: float = 0.4  # add-on at least 60% cheaper than the main item
    impulse_max_price: float = 5.0
    margin_weight: float = 0.0  # > 0 prefers high-margin items (scores are normalised first)
    max_per_category: int = 2
    category_level: str = "category"


def candidate_mask(
    table: dict[str, np.ndarray],
    settings: RuleSettings,
    offer: str,
    anchor: int | None,
    cart: np.ndarray,
) -> np.ndarray:
    """Boolean [n_items]: True where an item must NOT be offered (before the cart / owned mask)."""
    n = len(table["price"])
    block = np.zeros(n, dtype=bool)
    if settings.in_stock_only:
        block |= ~table["in_stock"]
    price = table["price"]
    category = table[settings.category_level]
    reference = [anchor] if anchor is not None else cart.tolist()
    ref_price = (
        np.nanmax(price[reference]) if reference and np.isfinite(price[reference]).any() else np.nan
    )
    ref_categories = {int(c) for c in category[reference] if c >= 0} if reference else set()
    if offer in ("cross_sell", "bundle"):
        if ref_categories:
            block |= _in_categories(category, ref_categories)
        if np.isfinite(ref_price):
            block |= ~(price <= settings.cross_sell_max_price_ratio * ref_price)
    elif offer == "up_sell":
        if not ref_categories or not np.isfinite(ref_price):
            block[:] = True  # nothing to up-sell from
        else:
            same = _in_categories(category, ref_categories)
            ceiling = (1 + settings.up_sell_max_price_increase) * ref_price
            block |= ~(same & (price > ref_price) & (price <= ceiling))
    elif offer == "impulse":
        block |= ~(price <= settings.impulse_max_price)
    return block


def _in_categories(category: np.ndarray, wanted: set[int]) -> np.ndarray:
    """``category in wanted`` per item via a lookup table (np.isin sorts 90k codes per call)."""
    table = np.zeros(int(category.max()) + 2, dtype=bool)
    table[[c + 1 for c in wanted]] = True
    return table[category + 1]
