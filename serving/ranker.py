"""``Ranker``: personalised add-ons from an exported artifact, in-process.

Data flow of one request: external ids -> internal indices (unknown ids are named in the
result) -> exclusion mask (cart, owned, stock, offer rules, caller's list) -> the ONNX graph
(scores, user / cart terms, TopK over a few times k) -> margin re-ranking and the
per-category cap -> the k best with a reason each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.artifact import Artifact
from serving.rules import OFFERS, PLACEMENTS, Catalog, RuleSettings, candidate_mask

#: How many more candidates than k the graph returns, so rules applied after it still fill k.
OVERFETCH = 10


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
    items: list[RankedItem]
    unknown_user: bool = False
    unknown_items: list[Any] = field(default_factory=list)
    model_kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": [
                {"item_id": i.item_id, "score": i.score, "reason": i.reason} for i in self.items
            ],
            "unknown_user": self.unknown_user,
            "unknown_items": self.unknown_items,
            "model_kind": self.model_kind,
        }


@dataclass
class _Prepared:
    """One validated request as graph inputs."""

    user: int
    cart: np.ndarray
    history: np.ndarray
    mask: np.ndarray
    k: int
    unknown_user: bool
    unknown: list[Any]


class Ranker:
    """Ranks add-ons with an artifact's ONNX graph and the business rules."""

    def __init__(
        self, artifact: Artifact, settings: RuleSettings | None = None, threads: int = 1
    ) -> None:
        self.artifact = artifact
        self._settings = settings or RuleSettings()
        options = ort.SessionOptions()
        # 1 thread per request keeps latency flat when many requests run at once; a single
        # caller (a batch job, one user at a time) can give the graph more.
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(artifact.path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.n_items = len(artifact.items.ids)
        self.catalog = Catalog.from_table(artifact.item_table, self.settings.category_level)

    @classmethod
    def load(
        cls, path: str | Path, settings: RuleSettings | None = None, threads: int = 1
    ) -> Ranker:
        """Load and verify an artifact directory (hashes checked; a mismatch is refused)."""
        return cls(Artifact.load(path), settings, threads)

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

        Parameters
        ----------
        user_id : external user id, or None for an anonymous shopper.
        cart : external item ids in the cart (never offered back).
        anchor : the item the offer is about (product page); defaults to the cart.
        placement : where the block shows (``product``, ``cart``, ``checkout``, ``category``,
            ``email``).
        offer : ``cross_sell``, ``up_sell``, ``bundle`` or ``impulse``.
        k : number of offers (default ``settings.default_k``, at most ``settings.max_k``).
        exclude : external item ids the caller does not want (e.g. declined offers).
        history : fresher purchase history ``{item_id: weight}``; replaces the snapshot.
        """
        return self.rank_many(
            [dict(user_id=user_id, cart=cart, anchor=anchor, placement=placement, offer=offer,
                  k=k, exclude=exclude, history=history)]
        )[0]  # fmt: skip

    def rank_many(self, requests: list[dict[str, Any]], batch_size: int = 256) -> list[RankResult]:
        """Rank many requests (each the keyword arguments of :meth:`rank`) through the graph
        in batches of ``batch_size`` rows: the e-mail / call-centre path."""
        results: list[RankResult] = []
        for start in range(0, len(requests), batch_size):
            prepared = [self._prepare(**r) for r in requests[start : start + batch_size]]
            width = max(max((p.cart.size for p in prepared), default=0), 1)
            cart = np.full((len(prepared), width), -1, dtype=np.int64)
            for row, p in enumerate(prepared):
                cart[row, : p.cart.size] = p.cart
            fetch = min(self.n_items, max(p.k for p in prepared) * OVERFETCH)
            feeds: dict[str, np.ndarray] = {
                "user": np.array([p.user for p in prepared], dtype=np.int64),
                "cart": cart,
                "exclude": np.stack([p.mask for p in prepared]),
                "k": np.array([fetch], dtype=np.int64),
            }
            if "history" in self.inputs:
                feeds["history"] = np.stack([p.history for p in prepared])
            if "history_items" in self.inputs:  # only item x item graphs need the indices
                owned = [np.flatnonzero(p.history) for p in prepared]
                feeds["history_items"] = np.full(
                    (len(prepared), max(max(o.size for o in owned), 1)), -1, np.int64
                )
                for row, o in enumerate(owned):
                    feeds["history_items"][row, : o.size] = o
            # onnxruntime's run is thread-safe: concurrent requests share one session.
            scores, items = self.session.run(
                None, {n: v for n, v in feeds.items() if n in self.inputs}
            )
            kind = str(self.manifest.get("model_kind", ""))
            for row, p in enumerate(prepared):
                ranked = self._postprocess(scores[row], items[row], p.k, p.history, p.cart.size > 0)
                results.append(RankResult(ranked, p.unknown_user, p.unknown, kind))
        return results

    def _prepare(
        self,
        user_id: Any = None,
        cart: list[Any] | None = None,
        anchor: Any = None,
        placement: str = "cart",
        offer: str = "cross_sell",
        k: int | None = None,
        exclude: list[Any] | None = None,
        history: dict[Any, float] | None = None,
    ) -> _Prepared:
        """Validate one request and turn it into the graph's inputs (one row each)."""
        s = self.settings
        k = s.default_k if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= s.max_k:
            raise RequestError(f"k: expected an integer from 1 to {s.max_k}, got {k!r}")
        if offer not in OFFERS:
            raise RequestError(f"offer: expected one of {', '.join(OFFERS)}, got {offer!r}")
        if placement not in PLACEMENTS:
            raise RequestError(
                f"placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}"
            )
        cart = list(cart or [])
        if len(cart) > s.max_cart_items:
            raise RequestError(f"cart: at most {s.max_cart_items} items, got {len(cart)}")
        a = self.artifact
        unknown: list[Any] = []
        user, unknown_user = -1, False
        if user_id is not None:
            idx, missing = a.users.lookup([user_id])
            user, unknown_user = int(idx[0]), bool(missing)
        cart_idx, missing = a.items.lookup(cart)
        unknown += missing
        cart_idx = cart_idx[cart_idx >= 0]
        anchor_idx = None
        if anchor is not None:
            idx, missing = a.items.lookup([anchor])
            unknown += missing
            anchor_idx = int(idx[0]) if idx[0] >= 0 else None
        excl_idx, missing = a.items.lookup(list(exclude or []))
        unknown += missing
        if history is not None:  # fresher history sent with the request beats the snapshot
            h_idx, missing = a.items.lookup(list(history))
            unknown += missing
            hist = np.zeros(self.n_items, dtype=np.float32)
            weights = np.asarray(list(history.values()), dtype=np.float32)
            hist[h_idx[h_idx >= 0]] = weights[h_idx >= 0]
        else:
            hist = a.history_rows(np.array([user]))[0]
        mask = candidate_mask(self.catalog, s, offer, anchor_idx, cart_idx)
        mask[cart_idx] = True
        if anchor_idx is not None:
            mask[anchor_idx] = True
        mask[excl_idx[excl_idx >= 0]] = True
        if s.exclude_owned:
            mask |= hist > 0
        return _Prepared(user, cart_idx.astype(np.int64), hist, mask, k, unknown_user, unknown)

    def _postprocess(
        self, scores: np.ndarray, items: np.ndarray, k: int, hist: np.ndarray, has_cart: bool
    ) -> list[RankedItem]:
        s, table = self.settings, self.artifact.item_table
        keep = np.isfinite(scores)
        scores, items = scores[keep], items[keep]
        if s.margin_weight and items.size:
            span = scores.max() - scores.min()
            norm = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
            margin = np.nan_to_num(table["margin"][items], nan=0.0)
            top = margin.max()
            order = np.argsort(
                -(norm + s.margin_weight * (margin / top if top > 0 else margin)), kind="stable"
            )
            scores, items = scores[order], items[order]
        category = table[s.category_level]
        taken: dict[int, int] = {}
        out: list[RankedItem] = []
        for score, item in zip(scores.tolist(), items.tolist(), strict=True):
            c = int(category[item])
            if c >= 0 and taken.get(c, 0) >= s.max_per_category:
                continue
            taken[c] = taken.get(c, 0) + 1
            price = float(table["price"][item])
            out.append(
                RankedItem(
                    self.artifact.items.external(np.array([item]))[0],
                    float(score),
                    self._reason(item, hist, has_cart),
                    str(table[f"{s.category_level}_name"][item]) or None,
                    price if np.isfinite(price) else None,
                )
            )
            if len(out) == k:
                break
        return out

    @staticmethod
    def _reason(item: int, hist: np.ndarray, has_cart: bool) -> str:
        if hist[item] > 0:
            return "bought before"
        if has_cart:
            return "goes with the cart"
        return "popular"
