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


@dataclass(frozen=True, eq=False)
class Catalog:
    """The item columns the rules read, indexed once per artifact so that a request costs
    a few passes over the catalog, not a per-request lookup table (item positions as in the
    artifact; price NaN and category -1 where unknown).

    ``by_category`` lists item positions grouped by category code; ``starts[c]`` is where
    code ``c``'s group begins (CSR-style), so "items of these categories" costs the size
    of those categories only.
    """

    price: np.ndarray
    in_stock: np.ndarray
    category: np.ndarray
    by_category: np.ndarray
    starts: np.ndarray

    @classmethod
    def from_table(cls, table: dict[str, np.ndarray], level: str) -> Catalog:
        category = np.asarray(table[level], dtype=np.int64)
        known = np.flatnonzero(category >= 0)
        by_category = known[np.argsort(category[known], kind="stable")]
        counts = np.bincount(category[known], minlength=int(category.max(initial=-1)) + 1)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return cls(np.asarray(table["price"], dtype=np.float64), np.asarray(table["in_stock"], bool),
                   category, by_category, starts)  # fmt: skip

    @property
    def n_items(self) -> int:
        return len(self.price)

    def items_in(self, categories: set[int]) -> np.ndarray:
        """Positions of the items in any of ``categories`` (codes)."""
        parts = [self.by_category[self.starts[c] : self.starts[c + 1]] for c in sorted(categories)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def candidate_mask(
    catalog: Catalog,
    settings: RuleSettings,
    offer: str,
    anchor: int | None,
    cart: np.ndarray,
) -> np.ndarray:
    """Boolean [n_items]: True where an item must NOT be offered (before the cart / owned mask)."""
    price = catalog.price
    block = ~catalog.in_stock if settings.in_stock_only else np.zeros(catalog.n_items, bool)
    reference = [anchor] if anchor is not None else cart.tolist()
    ref_price = (
        np.nanmax(price[reference]) if reference and np.isfinite(price[reference]).any() else np.nan
    )
    ref_categories = {int(c) for c in catalog.category[reference] if c >= 0} if reference else set()
    if offer in ("cross_sell", "bundle"):
        block[catalog.items_in(ref_categories)] = True
        if np.isfinite(ref_price):
            block |= ~(price <= settings.cross_sell_max_price_ratio * ref_price)
    elif offer == "up_sell":
        if not ref_categories or not np.isfinite(ref_price):
            block[:] = True  # nothing to up-sell from
        else:
            same = catalog.items_in(ref_categories)
            ceiling = (1 + settings.up_sell_max_price_increase) * ref_price
            allowed = same[(price[same] > ref_price) & (price[same] <= ceiling)]
            outside = np.ones(catalog.n_items, dtype=bool)
            outside[allowed] = False
            block |= outside
    elif offer == "impulse":
        block |= ~(price <= settings.impulse_max_price)
    return block
