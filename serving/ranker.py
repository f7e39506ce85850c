"""``Ranker``: personalised add-ons from an exported artifact, in-process.

Data flow of one request: external ids -> internal indices (unknown ids are named in the
result) -> the rules of the request (:class:`serving.rules.Offerable`: cart, owned, stock,
offer rules, caller's list; asked per candidate, a catalog-wide mask only where a dense
scorer needs one) -> the artifact's scorer (:mod:`serving.scorers`; for most kinds
one ONNX graph: scores, user / cart terms, TopK over a few times k) -> the rules' selection
(:func:`serving.rules.select`: margin re-ranking, the per-category cap, k) -> the offers with
a reason each. The Ranker holds no business rule itself.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.artifact import Artifact, IdIndex
from serving.rules import (
    OFFERS,
    PLACEMENTS,
    Catalog,
    Offerable,
    RuleSettings,
    select,
    why_empty,
)
from serving.scorers import Batch, Scored, load_scorer

#: How many more candidates than k the scorer returns, so rules applied after it still fill k.
OVERFETCH = 10
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"-?[0-9]{1,19}")  # as written by str(int): no spaces, signs, "_", ".0"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(ValueError):
    """A request field is invalid (HTTP 422)."""


@dataclass(frozen=True)
class RankedItem:
    """One offer: the item, its model score, why it is offered, and its shelf facts."""

    item_id: Any
    score: float
    reason: str
    category: str | None = None
    price: float | None = None


@dataclass
class RankResult:
    """The offers for one request, and what the caller should know about it.

    ``notes``: unknown ids (with the known id each resembles, "did you mean 1234?"), an
    unknown anchor. ``why_empty``: when there is no offer, the rule that left none (e.g. no
    item of the anchor's category in the up-sell price window), else None.
    """

    items: list[RankedItem]
    unknown_user: bool = False
    unknown_items: list[Any] = field(default_factory=list)
    model_kind: str = ""
    notes: list[str] = field(default_factory=list)
    why_empty: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": [
                {"item_id": i.item_id, "score": i.score, "reason": i.reason} for i in self.items
            ],
            "unknown_user": self.unknown_user,
            "unknown_items": self.unknown_items,
            "model_kind": self.model_kind,
            "notes": self.notes,
            "why_empty": self.why_empty,
        }


@dataclass
class _Prepared:
    """One validated request as graph inputs, and what post-processing needs of it."""

    user: int
    cart: np.ndarray  # the graph's cart term: the cart and the anchor
    history_items: np.ndarray  # the re-buy history: item positions, ascending, unique
    history_weights: np.ndarray  # and their float32 weights
    rules: Offerable
    k: int
    unknown_user: bool
    unknown: list[Any]
    offer: str
    anchor: int | None
    basket: np.ndarray  # the cart alone (the rules' reference when there is no anchor)
    anchor_id: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """The rules as a dense [n_items] mask (True: not offered); O(catalog), for dense
        scorers and diagnostics only."""
        return self.rules.mask()

    def bought(self, item: int) -> bool:
        """Whether ``item`` has a re-buy weight above 0 in this request's history."""
        at = int(np.searchsorted(self.history_items, item))
        return (
            at < self.history_items.size
            and int(self.history_items[at]) == item
            and bool(self.history_weights[at] > 0)
        )


def _unique_last(items: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``items`` ascending and unique with their ``weights`` (float32); a repeated item keeps
    its last weight, as assigning them into a dense row would."""
    items = np.asarray(items, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float32)
    if items.size < 2 or bool(np.all(items[1:] > items[:-1])):
        return items, weights
    last = items.size - 1 - np.unique(items[::-1], return_index=True)[1]
    return items[last], weights[last]


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to a readable length (a message must not echo a huge value)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


def _check_ids(name: str, values: Sequence[Any]) -> None:
    """Ids are integers or strings: a bool, a float or anything else is refused (a float
    id would be silently truncated; ``True`` would mean item 1)."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, str | numbers.Integral):
            raise RequestError(
                f"{name}: ids are integers or strings, got {_short(v)} ({type(v).__name__})"
            )


def _normalised(value: Any) -> str:
    """How an id is likely meant: no surrounding space, lower case, no ``.0`` / ``.00``
    ending, no leading zeros or plus sign (``" 01234.0"`` -> ``"1234"``)."""
    text = str(value).strip().lower()
    text = re.sub(r"\.0*$", "", text)
    if re.fullmatch(r"[+-]?[0-9]{1,40}", text):
        text = str(int(text))
    return text


class Ranker:
    """Ranks add-ons with an artifact's scorer (:mod:`serving.scorers`) and the business
    rules (:mod:`serving.rules`)."""

    def __init__(
        self, artifact: Artifact, settings: RuleSettings | None = None, threads: int = 1
    ) -> None:
        self._normal_ids: dict[int, dict[str, Any]] = {}  # built on the first suggestion
        self.artifact = artifact
        self._settings = settings or RuleSettings()
        self.scorer = load_scorer(artifact, threads)
        self.n_items = len(artifact.items.ids)
        self.catalog = Catalog.from_table(artifact.item_table, self.settings.category_level)

    @classmethod
    def load(
        cls,
        path: str | Path,
        settings: RuleSettings | None = None,
        threads: int = 1,
        trusted_keys: Sequence[str | Path] | None = None,
    ) -> Ranker:
        """Load and verify an artifact directory (hashes checked; a mismatch is refused).

        ``trusted_keys``: Ed25519 public key files; when given, an artifact without a valid
        signature by one of them is refused (see :mod:`serving.signing`)."""
        return cls(Artifact.load(path, trusted_keys=trusted_keys), settings, threads)

    @property
    def inputs(self) -> set[str]:
        """The graph's input names for a ``graph`` scorer (empty for other scorers)."""
        return set(getattr(self.scorer, "inputs", ()))

    @property
    def session(self) -> Any:
        """The onnxruntime session of a ``graph`` scorer (None for other scorers)."""
        return getattr(self.scorer, "session", None)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.artifact.manifest

    @property
    def settings(self) -> RuleSettings:
        """The rules, fixed for this ranker (its category index is built for them): other
        rules need another ``Ranker.load``."""
        return self._settings

    def rank(
        self,
        user_id: Any = None,
        cart: list[Any] | None = None,
        anchor: Any = None,
        placement: str = "cart",
        offer: str = "cross_sell",
        k: int | None = None,
        exclude: list[Any] | None = None,
        history: dict[Any, float] | None = None,
    ) -> RankResult:
        """Top add-ons for one shopper.

        Ids are integers or strings (a bool or a float is a :class:`RequestError`); an id the
        artifact does not know, including an integer outside int64, is "unknown" and named
        in the result.

        Parameters
        ----------
        user_id : external user id, or None for an anonymous shopper.
        cart : external item ids in the cart (never offered back); at most
            ``settings.max_cart_items``.
        anchor : the item the offer is about (product page). It joins the cart in the
            model's cart term ("bought with X"), the offer rules are relative to it (else to
            the cart), and it is never offered back.
        placement : where the block shows (``product``, ``cart``, ``checkout``, ``category``,
            ``email``).
        offer : ``cross_sell``, ``up_sell``, ``bundle`` or ``impulse``.
        k : number of offers (default ``settings.default_k``, at most ``settings.max_k``).
        exclude : external item ids the caller does not want (e.g. declined offers); at
            most ``settings.max_exclude_items``.
        history : fresher purchase history ``{item_id: weight}``, weights finite and >= 0;
            replaces the snapshot; at most ``settings.max_history_items`` items.
        """
        return self.rank_many(
            [dict(user_id=user_id, cart=cart, anchor=anchor, placement=placement, offer=offer,
                  k=k, exclude=exclude, history=history)]
        )[0]  # fmt: skip

    def rank_many(self, requests: list[dict[str, Any]], batch_size: int = 256) -> list[RankResult]:
        """Rank many requests (each the keyword arguments of :meth:`rank`) through the scorer
        in batches of ``batch_size`` rows: the e-mail / call-centre path."""
        results: list[RankResult] = []
        kind = str(self.manifest.get("model_kind", ""))
        for start in range(0, len(requests), batch_size):
            prepared = [self._prepare(**r) for r in requests[start : start + batch_size]]
            scored = self.scorer.score(self._batch(prepared))
            for row, p in enumerate(prepared):
                ranked = self._offers(scored, row, p)
                empty = (
                    None
                    if ranked
                    else why_empty(self.catalog, self.settings, p.offer, p.anchor, p.basket)
                )
                results.append(RankResult(ranked, p.unknown_user, p.unknown, kind, p.notes, empty))
        return results

    def _batch(self, prepared: list[_Prepared]) -> Batch:
        """The scorer's input for these validated requests."""
        width = max(max((p.cart.size for p in prepared), default=0), 1)
        cart = np.full((len(prepared), width), -1, dtype=np.int64)
        for row, p in enumerate(prepared):
            cart[row, : p.cart.size] = p.cart
        return Batch(
            user=np.array([p.user for p in prepared], dtype=np.int64),
            cart=cart,
            basket=[p.basket for p in prepared],
            anchor=[p.anchor for p in prepared],
            history_items=[p.history_items for p in prepared],
            history_weights=[p.history_weights for p in prepared],
            rules=[p.rules for p in prepared],
            fetch=min(self.n_items, max(p.k for p in prepared) * OVERFETCH),
            n_items=self.n_items,
            exclude_owned=self.settings.exclude_owned,
        )

    def _why(self, p: _Prepared) -> str:
        """The reason of an offer that is not a re-buy: what the cart term was fed."""
        if not self.scorer.uses_cart or p.cart.size == 0:  # no cart term in this kind's graph
            return "popular"
        if p.anchor is None:
            return "goes with the cart"
        return f"goes with item {p.anchor_id}" + (" and the cart" if p.basket.size else "")

    def _lookup(self, index: IdIndex, name: str, values: Sequence[Any]) -> tuple[np.ndarray, list]:
        """Positions (-1: unknown) and the unknown values of the ids ``values`` of request
        field ``name``. An integer id that int64 cannot hold, or text that is not an integer
        as ``str(int)`` writes it (``" 12"``, ``"12.0"``), cannot be in an integer id map: it
        is unknown, never an overflow."""
        values = list(values)
        if all(type(v) is int for v in values) and (  # the common case, kept fast (not a bool)
            not values or (_INT64_MIN <= min(values) and max(values) <= _INT64_MAX)
        ):
            return index.lookup(values)
        _check_ids(name, values)
        if index.is_str:
            return index.lookup(values)
        parsed = []
        for v in values:
            if isinstance(v, str):
                v = int(v) if _INTEGER.fullmatch(v) else None
            parsed.append(int(v) if v is not None and _INT64_MIN <= v <= _INT64_MAX else None)
        pos = np.full(len(values), -1, dtype=np.int64)
        ok = [i for i, v in enumerate(parsed) if v is not None]
        if ok:
            pos[ok] = index.lookup([parsed[i] for i in ok])[0]
        return pos, [v for v, at in zip(values, pos.tolist(), strict=True) if at < 0]

    def suggest(self, index: IdIndex, value: Any) -> Any:
        """The known id that ``value`` resembles (same text after :func:`_normalised`: case,
        spaces, leading zeros, a ``.0`` ending), or None."""
        key = _normalised(value)
        if not index.is_str:
            if not _INTEGER.fullmatch(key):
                return None
            pos, _ = self._lookup(index, "id", [key])
            return index.external(pos)[0] if pos[0] >= 0 else None
        table = self._normal_ids.get(id(index))
        if table is None:  # once per id map; ambiguous spellings suggest nothing
            table = {}
            for known in index.ids.tolist():
                n = _normalised(known)
                table[n] = None if n in table else known
            self._normal_ids[id(index)] = table
        found = table.get(key)
        return None if found is None or found == value else found

    def _unknown_note(self, index: IdIndex, name: str, value: Any) -> str:
        hint = self.suggest(index, value)
        return f"{name} {_short(value)} is unknown" + (
            f" (did you mean {hint!r}?)" if hint is not None else ""
        )

    def _prepare(
        self,
        user_id: Any = None,
        cart: Sequence[Any] | None = None,
        anchor: Any = None,
        placement: str = "cart",
        offer: str = "cross_sell",
        k: int | None = None,
        exclude: Sequence[Any] | None = None,
        history: Mapping[Any, float] | None = None,
    ) -> _Prepared:
        """Validate one request and turn it into the graph's inputs (one row each)."""
        s = self.settings
        k = s.default_k if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= s.max_k:
            raise RequestError(f"k: expected an integer from 1 to {s.max_k}, got {_short(k)}")
        if offer not in OFFERS:
            raise RequestError(f"offer: expected one of {', '.join(OFFERS)}, got {_short(offer)}")
        if placement not in PLACEMENTS:
            raise RequestError(
                f"placement: expected one of {', '.join(PLACEMENTS)}, got {_short(placement)}"
            )
        cart = self._id_list("cart", cart, s.max_cart_items)
        exclude = self._id_list("exclude", exclude, s.max_exclude_items)
        a = self.artifact
        unknown: list[Any] = []
        notes: list[str] = []
        user, unknown_user = -1, False
        if user_id is not None:
            idx, missing = self._lookup(a.users, "user_id", [user_id])
            user, unknown_user = int(idx[0]), bool(missing)
            if missing:
                note = self._unknown_note(a.users, "user_id", user_id)
                notes.append(f"{note}: ranked as an anonymous shopper")
        cart_idx, missing = self._lookup(a.items, "cart", cart)
        unknown += missing
        notes += [f"{self._unknown_note(a.items, 'cart item', v)}: ignored" for v in missing]
        cart_idx = cart_idx[cart_idx >= 0]
        anchor_idx = None
        if anchor is not None:
            idx, missing = self._lookup(a.items, "anchor", [anchor])
            unknown += missing
            anchor_idx = int(idx[0]) if idx[0] >= 0 else None
            if missing:
                notes.append(f"{self._unknown_note(a.items, 'anchor', anchor)}: ranked without it")
        excl_idx, missing = self._lookup(a.items, "exclude", exclude)
        unknown += missing
        if history is not None:  # fresher history sent with the request beats the snapshot
            h_items, h_weights = self._history(history, unknown)
        else:
            h_items, h_weights = _unique_last(*a.history_of(user))
        owned = h_items[h_weights > 0] if s.exclude_owned else h_items[:0]
        cart_idx = cart_idx.astype(np.int64)
        rules = Offerable(self.catalog, s, offer, anchor_idx, cart_idx, excl_idx, owned)
        # The anchor joins the cart term: "customers who bought X also bought".
        graph_cart = cart_idx
        if anchor_idx is not None and anchor_idx not in cart_idx:
            graph_cart = np.append(cart_idx, anchor_idx)
        return _Prepared(user, graph_cart.astype(np.int64), h_items, h_weights, rules, k,
                         unknown_user, unknown, offer, anchor_idx, cart_idx,
                         None if anchor_idx is None else anchor, notes)  # fmt: skip

    @staticmethod
    def _id_list(name: str, values: Sequence[Any] | None, limit: int) -> list[Any]:
        """A list of ids, at most ``limit`` of them (a string is not a list of ids)."""
        if values is None:
            return []
        if isinstance(values, str | bytes | Mapping) or not isinstance(values, Sequence):
            raise RequestError(f"{name}: expected a list of ids, got {type(values).__name__}")
        if len(values) > limit:
            raise RequestError(f"{name}: at most {limit} items, got {len(values)}")
        return list(values)

    def _history(
        self, history: Mapping[Any, float], unknown: list[Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(item positions, float32 weights) from ``{item_id: weight}``, as the snapshot's
        rows (ascending, unique: two spellings of one id keep the later weight, as a dense
        row would); weights must be finite numbers >= 0
        (NaN would silently drop the item, a negative weight would invert the re-buy term,
        1e300 becomes inf in float32)."""
        s = self.settings
        if not isinstance(history, Mapping):
            raise RequestError(
                f"history: expected a mapping of item id to weight, got {type(history).__name__}"
            )
        if len(history) > s.max_history_items:
            raise RequestError(f"history: at most {s.max_history_items} items, got {len(history)}")
        for item, w in history.items():
            bad = isinstance(w, bool) or not isinstance(w, numbers.Real)
            if bad or not (math.isfinite(w) and 0 <= w <= _FLOAT32_MAX):
                raise RequestError(
                    f"history: the weight of item {_short(item)} must be a finite number >= 0 "
                    f"(at most {_FLOAT32_MAX:.3g}), got {_short(w)}"
                )
        h_idx, missing = self._lookup(self.artifact.items, "history", list(history))
        unknown += missing
        weights = np.asarray(list(history.values()), dtype=np.float32)
        return _unique_last(h_idx[h_idx >= 0], weights[h_idx >= 0])

    def _offers(self, scored: Scored, row: int, p: _Prepared) -> list[RankedItem]:
        """Row ``row`` of the scorer's answer through the rules' selection, as offers."""
        scores, items = scored.scores[row], scored.items[row]
        slots = select(self.catalog, self.settings, scores, items, p.k, scored.probabilities)
        table, why = self.artifact.item_table, self._why(p)
        names = table[f"{self.settings.category_level}_name"]
        texts = scored.reasons[row] if scored.reasons is not None else None
        if hasattr(texts, "prefetch"):  # lazily computed reasons: only the selected slots'
            texts.prefetch(slots)
        external = self.artifact.items.external(items[slots])
        out: list[RankedItem] = []
        for slot, item_id in zip(slots, external, strict=True):
            item = int(items[slot])
            reason = texts[slot] if texts is not None else None
            if reason is None:
                reason = "bought before" if p.bought(item) else why
            price = float(table["price"][item])
            out.append(
                RankedItem(
                    item_id,
                    float(scores[slot]),
                    reason,
                    str(names[item]) or None,
                    price if np.isfinite(price) else None,
                )
            )
        return out
