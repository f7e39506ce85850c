"""Business rules for add-on offers (see shared/DOMAIN.md). Every rule is a setting with a
default, never a constant in code.

Every rule lives here; :class:`serving.ranker.Ranker` parses requests, looks ids up and runs
the scorer. Before scoring, :class:`Offerable` says which candidates may be offered (stock, the
offer's category and price rules, the cart, the anchor, the caller's list, owned items with
``exclude_owned``), per candidate (:meth:`Offerable.allowed`, O(candidates)) or as a dense
mask (:func:`exclusion_mask`, the same rules over the catalog); after scoring, :func:`select` applies margin weighting, the per-category
cap and ``k``.

Offers: ``cross_sell`` (other categories than the anchor / cart, price at most
``cross_sell_max_price_ratio`` x the anchor's), ``up_sell`` (same category as the anchor,
price above it and at most ``1 + up_sell_max_price_increase`` times it), ``bundle`` (cross-sell
items to go with the anchor), ``impulse`` (cheap items, at most ``impulse_max_price``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from serving.sorted_arrays import in_sorted

OFFERS = ("cross_sell", "up_sell", "bundle", "impulse")
PLACEMENTS = ("product", "cart", "checkout", "category", "email")
CATEGORY_LEVELS = ("department", "category", "subcategory")
#: A rules file is a few hundred bytes; anything much larger is not one.
MAX_RULES_BYTES = 1 << 16


class RulesError(ValueError):
    """A rule setting is unknown, of the wrong type or out of range (names the key, and the
    file when it came from one)."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key, self.problem, self.source = key, problem, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


@dataclass(frozen=True)
class RuleSettings:
    """Defaults from the domain notes; change per deployment (a rules file: :func:`load_rules`).

    Every value is checked when the settings are made (:class:`RulesError` naming the key),
    so settings from a file, from command-line flags or from Python are held to one standard.
    """

    default_k: int = 3  # show few offers: 3 to 5
    max_k: int = 20
    max_cart_items: int = 100
    # Request size limits (HTTP validates them; the Python API applies them too).
    max_exclude_items: int = 1000
    max_history_items: int = 5000
    max_batch_requests: int = 1000
    exclude_owned: bool = False  # groceries are re-bought: repeat purchase stays possible
    in_stock_only: bool = True
    up_sell_max_price_increase: float = 0.25  # +25% over the anchor (another source: +40%)
    cross_sell_max_price_ratio: float = 0.4  # add-on at least 60% cheaper than the main item
    impulse_max_price: float = 5.0
    margin_weight: float = 0.0  # > 0 prefers high-margin items (scores are normalised first)
    max_per_category: int = 2
    category_level: str = "category"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_setting(f.name, getattr(self, f.name))
        if self.default_k > self.max_k:
            raise RulesError(
                "default_k", f"must be at most max_k ({self.max_k}), got {self.default_k}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The effective rules, JSON-able (``GET /v1/model`` shows them under ``"rules"``);
        a price limit set to infinity (no limit) is shown as the string ``"inf"``."""
        return {
            k: "inf" if isinstance(v, float) and math.isinf(v) else v
            for k, v in dataclasses.asdict(self).items()
        }

    def replace(self, **changes: Any) -> RuleSettings:
        """A copy with ``changes`` applied (checked like the file; unknown keys refused)."""
        unknown = sorted(set(changes) - set(_FIELDS))
        if unknown:
            raise RulesError(
                _short(unknown[0]).strip("'"), f"unknown rule; expected one of {', '.join(_FIELDS)}"
            )
        return dataclasses.replace(self, **changes)


#: (type, lower bound, whether the bound itself is allowed) of every setting but the level.
#: Floats must be finite, except the price limits, where infinity means "no limit".
_NO_LIMIT = ("up_sell_max_price_increase", "cross_sell_max_price_ratio", "impulse_max_price")
_RANGES: dict[str, tuple[type, float, bool]] = {
    "default_k": (int, 1, True), "max_k": (int, 1, True), "max_cart_items": (int, 1, True),
    "max_exclude_items": (int, 0, True), "max_history_items": (int, 0, True),
    "max_batch_requests": (int, 1, True), "exclude_owned": (bool, 0, True),
    "in_stock_only": (bool, 0, True), "up_sell_max_price_increase": (float, 0, False),
    "cross_sell_max_price_ratio": (float, 0, False), "impulse_max_price": (float, 0, True),
    "margin_weight": (float, 0, True), "max_per_category": (int, 1, True),
}  # fmt: skip
_FIELDS = tuple(f.name for f in dataclasses.fields(RuleSettings))


def _check_setting(key: str, value: Any) -> None:
    """Raise :class:`RulesError` unless ``value`` is a valid value of setting ``key``."""
    if key == "category_level":
        if value not in CATEGORY_LEVELS:
            raise RulesError(
                key, f"expected one of {', '.join(CATEGORY_LEVELS)}, got {_short(value)}"
            )
        return
    kind, low, inclusive = _RANGES[key]
    # bool is an int in Python: "max_k: true" must not mean 1
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise RulesError(
            key, f"expected {kind.__name__}, got {_short(value)} ({type(value).__name__})"
        )
    if kind is bool:
        return
    # a huge int is finite; +inf is "no limit" for a price limit
    finite = (
        not isinstance(value, float)
        or math.isfinite(value)
        or (key in _NO_LIMIT and value == math.inf)
    )
    if not finite or value < low or (value == low and not inclusive):
        what = "a number (.inf: no limit)" if key in _NO_LIMIT else "a finite number"
        raise RulesError(key, f"expected {what} {'>=' if inclusive else '>'} {low}, got {value!r}")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to a readable length (a message must not echo a huge value)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


def load_rules(path: str | Path, base: RuleSettings | None = None) -> RuleSettings:
    """Read a rules file: a mapping of setting names to values, YAML (``.yaml``, ``.yml``)
    or JSON (``.json``); keys left out keep ``base``'s values (the defaults).

    YAML anchors and aliases and repeated keys are refused, as in experiment configs (an
    alias bomb would expand a few bytes into gigabytes; a repeated key would silently
    replace the first value), and the file is at most :data:`MAX_RULES_BYTES`.

    Raises
    ------
    RulesError
        Naming the file and the key: unreadable file, not a mapping, unknown key, wrong
        type, value out of range.
    """
    p = Path(path)
    source = str(p)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_RULES_BYTES + 1)
    except OSError as exc:
        raise RulesError("<file>", f"cannot read the rules file ({exc.strerror})", source) from None
    if len(data) > MAX_RULES_BYTES:
        raise RulesError(
            "<file>", f"larger than {MAX_RULES_BYTES:,} bytes: not a rules file", source
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RulesError(
            "<file>", f"line {line}: not UTF-8; save the file as UTF-8", source
        ) from None
    try:
        payload = (
            json.loads(text, object_pairs_hook=_no_repeated_keys)
            if p.suffix.lower() == ".json"
            else _parse_yaml(text)
        )
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError (re-raised as such)
        problem = str(exc)
        problem = problem if len(problem) <= 300 else problem[:300] + "..."
        raise RulesError(
            "<file>",
            f"not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {problem}",
            source,
        ) from None
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise RulesError(
            "<root>",
            f"expected a mapping of rule names to values, got {type(payload).__name__}",
            source,
        )
    try:
        return (base or RuleSettings()).replace(**{str(k): v for k, v in payload.items()})
    except RulesError as exc:
        raise RulesError(exc.key, exc.problem, source) from None


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a repeated key would silently replace the first value."""
    keys = [k for k, _ in pairs]
    repeated = [k for i, k in enumerate(keys) if k in keys[:i]]
    if repeated:
        raise ValueError(f"key {repeated[0]!r} is repeated")
    return dict(pairs)


def _parse_yaml(text: str) -> Any:
    """Plain YAML (see :mod:`serving.plain_yaml`); ``ValueError`` if it is bad."""
    import yaml

    from serving.plain_yaml import load_plain_yaml

    try:
        return load_plain_yaml(text, "rules file")
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


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
    names: np.ndarray  # category name per item ("" where unknown): for messages
    margin: np.ndarray | None = None  # per item, NaN where unknown (margin weighting)

    @classmethod
    def from_table(cls, table: dict[str, np.ndarray], level: str) -> Catalog:
        category = np.asarray(table[level], dtype=np.int64)
        known = np.flatnonzero(category >= 0)
        by_category = known[np.argsort(category[known], kind="stable")]
        counts = np.bincount(category[known], minlength=int(category.max(initial=-1)) + 1)
        starts = np.concatenate([[0], np.cumsum(counts)])
        names = np.asarray(table.get(f"{level}_name", np.full(len(category), "")), dtype=str)
        margin = table.get("margin")
        return cls(np.asarray(table["price"], dtype=np.float64), np.asarray(table["in_stock"], bool),
                   category, by_category, starts, names,
                   None if margin is None else np.asarray(margin, dtype=np.float64))  # fmt: skip

    @property
    def n_items(self) -> int:
        return len(self.price)

    def items_in(self, categories: set[int]) -> np.ndarray:
        """Positions of the items in any of ``categories`` (codes)."""
        parts = [self.by_category[self.starts[c] : self.starts[c + 1]] for c in sorted(categories)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class _Reference:
    """What the offer rules compare a candidate with: the reference items' highest known
    price (NaN if none) and a flag per category code (the last slot, code -1, is False)."""

    price: float
    categories: set[int]
    flags: np.ndarray

    @classmethod
    def of(cls, catalog: Catalog, anchor: int | None, cart: np.ndarray) -> _Reference:
        _, price, categories = _reference(catalog, anchor, cart)
        flags = np.zeros(int(catalog.starts.size), dtype=bool)
        flags[list(categories)] = True
        return cls(price, categories, flags)


def offer_allowed(
    catalog: Catalog,
    settings: RuleSettings,
    offer: str,
    anchor: int | None,
    cart: np.ndarray,
    items: np.ndarray | None = None,
    reference: _Reference | None = None,
) -> np.ndarray:
    """Boolean per entry of ``items`` (item positions; None: the whole catalog): True where
    the stock and offer rules allow the item (categories and prices relative to the anchor,
    else the cart). Costs O(len(items) + len(cart)): the one definition of these rules, for
    a request's candidates (:class:`Offerable`) and for the catalog (:func:`candidate_mask`).
    ``reference``: the anchor's / cart's price and categories, if already known."""
    if items is None:  # the whole catalog: no gather
        stock, price, category = catalog.in_stock, catalog.price, catalog.category
    else:
        items = np.asarray(items, dtype=np.int64)
        stock, price = catalog.in_stock[items], catalog.price[items]
        category = catalog.category[items]
    ok = stock.copy() if settings.in_stock_only else np.ones(price.size, bool)
    ref = reference or _Reference.of(catalog, anchor, cart)
    same = ref.flags[category] if ref.categories else np.zeros(price.size, bool)
    if offer in ("cross_sell", "bundle"):
        ok &= ~same
        if np.isfinite(ref.price):
            ok &= price <= settings.cross_sell_max_price_ratio * ref.price
    elif offer == "up_sell":
        if not ref.categories or not np.isfinite(ref.price):
            return np.zeros(price.size, bool)  # nothing to up-sell from
        ceiling = (1 + settings.up_sell_max_price_increase) * ref.price
        ok &= same & (price > ref.price) & (price <= ceiling)
    elif offer == "impulse":
        ok &= price <= settings.impulse_max_price
    return ok


def candidate_mask(
    catalog: Catalog,
    settings: RuleSettings,
    offer: str,
    anchor: int | None,
    cart: np.ndarray,
) -> np.ndarray:
    """Boolean [n_items]: True where an item must NOT be offered (before the cart / owned
    mask): :func:`offer_allowed` over the whole catalog."""
    return ~offer_allowed(catalog, settings, offer, anchor, cart)


@dataclass(frozen=True, eq=False)
class Offerable:
    """Every pre-scoring rule of one request, asked per candidate: ``allowed(items)`` costs
    O(len(items) + cart + excluded + owned), not O(catalog), so a scorer that looks at a
    few hundred candidates never builds a catalog-wide mask.

    The offer rules (:func:`offer_allowed`), then what the shopper has or declined: the
    cart and the anchor (never offered back), ``excluded`` (the caller's list; -1 = unknown
    id, ignored) and, with ``settings.exclude_owned``, ``owned`` (the items of the user's
    re-buy history with a weight above 0).
    """

    catalog: Catalog
    settings: RuleSettings
    offer: str
    anchor: int | None
    cart: np.ndarray
    excluded: np.ndarray
    owned: np.ndarray

    @cached_property
    def blocked_items(self) -> np.ndarray:
        """Sorted positions refused whatever the offer rules say: cart, anchor, the caller's
        list and (with ``exclude_owned``) the owned items."""
        parts = [np.asarray(self.cart, np.int64)]
        if len(self.excluded):
            parts.append(np.asarray(self.excluded, np.int64))
        if self.anchor is not None:
            parts.append(np.array([self.anchor], np.int64))
        if self.settings.exclude_owned and len(self.owned):
            parts.append(np.asarray(self.owned, np.int64))
        out = np.unique(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return out[out >= 0]

    @cached_property
    def _reference(self) -> _Reference:
        return _Reference.of(self.catalog, self.anchor, self.cart)

    def allowed(self, items: np.ndarray | None = None) -> np.ndarray:
        """Boolean per entry of ``items`` (None: the whole catalog): True where every rule
        allows offering it."""
        ok = offer_allowed(self.catalog, self.settings, self.offer, self.anchor, self.cart, items,
                           self._reference)  # fmt: skip
        blocked = self.blocked_items
        if not blocked.size:
            return ok
        if items is None:
            ok[blocked] = False
            return ok
        return ok & ~in_sorted(np.asarray(items, dtype=np.int64), blocked)

    def mask(self) -> np.ndarray:
        """Boolean [n_items]: True where an item must not be offered (the dense form)."""
        return ~self.allowed()


def _reference(
    catalog: Catalog, anchor: int | None, cart: np.ndarray
) -> tuple[list[int], float, set[int]]:
    """The items an offer is relative to (the anchor, else the cart), their highest known
    price (NaN if none) and their category codes."""
    reference = [anchor] if anchor is not None else cart.tolist()
    at = np.asarray(reference, dtype=np.int64)
    price = catalog.price[at]
    price = price[np.isfinite(price)]
    ref_price = float(price.max()) if price.size else np.nan
    codes = catalog.category[at]
    return reference, ref_price, set(codes[codes >= 0].tolist())


def why_empty(
    catalog: Catalog,
    settings: RuleSettings,
    offer: str,
    anchor: int | None,
    cart: np.ndarray,
) -> str:
    """Why a request with these rules has no offer left: which rule left nothing (e.g. "no
    item of category X priced above P and at most 1.25 x P in stock"), or that every item
    the rules allow is in the cart, excluded or already owned."""
    reference, ref_price, ref_categories = _reference(catalog, anchor, cart)
    what = "the anchor" if anchor is not None else "the cart"
    names = ", ".join(
        sorted({str(catalog.names[i]) for i in reference if catalog.category[i] >= 0})
    )
    stock = " in stock" if settings.in_stock_only else ""
    if offer == "up_sell":
        if not reference:
            return "up_sell needs an anchor (or a cart) to up-sell from"
        missing = [m for m, bad in (("price", not np.isfinite(ref_price)),
                                    ("category", not ref_categories)) if bad]  # fmt: skip
        if missing:
            return f"up_sell needs the price and category of {what}: it has no {' and no '.join(missing)}"
        ceiling = (1 + settings.up_sell_max_price_increase) * ref_price
        rule = (
            f"item of category {names} priced above {ref_price:.2f} and at most {ceiling:.2f} "
            f"(+{settings.up_sell_max_price_increase:.0%}){stock}"
        )
    elif offer in ("cross_sell", "bundle"):
        rule = f"item outside category {names}" if names else "item"
        if np.isfinite(ref_price):
            cap = settings.cross_sell_max_price_ratio * ref_price
            rule += f" priced at most {cap:.2f} ({settings.cross_sell_max_price_ratio:.0%} of {what}'s {ref_price:.2f})"
        rule += stock
    elif offer == "impulse":
        rule = f"item priced at most {settings.impulse_max_price:.2f}{stock}"
    else:  # pragma: no cover - offers are validated before
        rule = f"{offer} item"
    allowed = int((~candidate_mask(catalog, settings, offer, anchor, cart)).sum())
    if not allowed:
        return f"no {rule}"
    return (
        f"{allowed:,} {rule.replace('item', 'items', 1)} pass the {offer} rules, but each is "
        "in the cart, the anchor, excluded or already owned"
    )


def exclusion_mask(
    catalog: Catalog,
    settings: RuleSettings,
    offer: str,
    anchor: int | None,
    cart: np.ndarray,
    excluded: np.ndarray,
    history: np.ndarray,
) -> np.ndarray:
    """Boolean [n_items]: True where an item must not be offered to this request.

    The dense form of :class:`Offerable` (one definition of each rule): the offer rules of
    :func:`offer_allowed`, the cart and the anchor, ``excluded`` (the caller's list; -1 =
    unknown id, ignored) and, with ``settings.exclude_owned``, every item of ``history``
    (the user's dense re-buy row) above 0.
    """
    owned = np.flatnonzero(history > 0) if settings.exclude_owned else np.zeros(0, np.int64)
    return Offerable(catalog, settings, offer, anchor, np.asarray(cart, np.int64),
                     np.asarray(excluded, np.int64), owned).mask()  # fmt: skip


def select(
    catalog: Catalog,
    settings: RuleSettings,
    scores: np.ndarray,
    items: np.ndarray,
    k: int,
    probabilities: bool = False,
) -> list[int]:
    """The slots of ``items`` (a scorer's answer for one request, best first, -inf = none)
    to offer, in offer order: at most ``k``, at most ``settings.max_per_category`` per
    category (unknown category: no cap), re-ranked by margin when ``margin_weight > 0``.

    Margin weighting (``w = margin_weight``, ``m = margin / the largest margin among the
    candidates``, missing margin = 0): model scores are ranked by ``s' + w * m``, ``s'`` the
    scores min-max scaled to [0, 1] over the candidates; calibrated add probabilities
    (``probabilities``, e.g. the learned ranker) are ranked by ``p * (1 + w * m)``, the
    expected margin blended with the probability (``w = 0``: by probability; large ``w``: by
    ``p * margin``).
    """
    slots = np.flatnonzero(np.isfinite(scores))
    if settings.margin_weight and slots.size:
        s = scores[slots]  # in the scorer's dtype, as the scores were always scaled
        margin = np.zeros(catalog.n_items) if catalog.margin is None else catalog.margin
        m = np.nan_to_num(margin[items[slots]], nan=0.0)
        top = m.max()
        m = m / top if top > 0 else m
        if probabilities:
            key = s * (1 + settings.margin_weight * m)
        else:
            span = s.max() - s.min()
            scaled = (s - s.min()) / span if span > 0 else np.zeros_like(s)
            key = scaled + settings.margin_weight * m
        slots = slots[np.argsort(-key, kind="stable")]
    taken: dict[int, int] = {}
    out: list[int] = []
    # plain lists: per-element numpy indexing would cost more than the rest of the request
    for slot, c in zip(slots.tolist(), catalog.category[items[slots]].tolist(), strict=True):
        if c >= 0 and taken.get(c, 0) >= settings.max_per_category:
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append(slot)
        if len(out) == k:
            break
    return out
