"""The one interface every model honours.

A model is fitted on a :class:`features.dataset.Dataset` and scores a batch of queries: a
user (internal index, or -1 for an anonymous / unknown shopper) with an optional cart. All
candidate filtering (cart, owned items, allow-list, block-list) happens here, once, so that
evaluation, export and serving treat every model alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp

from features.dataset import Dataset
from features.errors import InputError
from serving.topk import top_k  # the one implementation; models import it from here

if TYPE_CHECKING:
    from training.artifact_writer import ArtifactParts
    from training.onnx_graph import Graph


class ParamError(InputError):
    """A hyper-parameter value outside its allowed range (names the parameter); a bad
    input, so the command line exits 2."""

    def __init__(self, param: str, problem: str) -> None:
        self.param = param
        super().__init__(f"{param}: {problem}")


@dataclass(frozen=True)
class CandidateFilter:
    """Which items may be recommended.

    Attributes
    ----------
    exclude_cart : bool
        Never recommend what is in the cart (default true).
    exclude_owned : bool
        Never recommend what the user bought in train (durables); groceries are re-bought,
        so the default is false.
    allow_items : numpy.ndarray, optional
        Internal indices that may be recommended; everything else is removed.
    block_items : numpy.ndarray, optional
        Internal indices that must not be recommended.
    """

    exclude_cart: bool = True
    exclude_owned: bool = False
    allow_items: np.ndarray | None = None
    block_items: np.ndarray | None = None

    def static_mask(self, n_items: int) -> np.ndarray:
        """Boolean [n_items]: True where ``allow_items`` / ``block_items`` refuse the item
        for every query."""
        mask = np.zeros(n_items, dtype=bool)
        if self.allow_items is not None:
            mask[:] = True
            mask[np.asarray(self.allow_items, dtype=np.int64)] = False
        if self.block_items is not None:
            mask[np.asarray(self.block_items, dtype=np.int64)] = True
        return mask


class RecommenderBase(ABC):
    """Base class: hyper-parameters are constructor arguments, learned state ends with ``_``.

    Subclasses implement :meth:`_fit` and :meth:`score`; :meth:`fit` records what every model
    needs (catalog size, each user's purchase history for the owned-item filter).
    """

    #: Name used in configs and reports.
    kind: str = "base"

    n_users_: int
    n_items_: int
    owned_: sp.csr_matrix

    #: The hyper-parameter that counts epochs (``iterations``, ``epochs``) for models that
    #: train in epochs and call ``epoch_callback``; None for the others.
    epoch_param: ClassVar[str | None] = None

    def fit(self, data: Dataset, epoch_callback: Callable[[int], None] | None = None) -> Self:
        """Fit on the interactions of ``data`` (a train part of a split). Returns ``self``.

        Parameters
        ----------
        data : Dataset
            The train part.
        epoch_callback : callable, optional
            ``epoch_callback(epoch)`` (1-based) after each epoch of a model that has epochs
            (:attr:`epoch_param` set), with the model already able to :meth:`score` on that
            epoch's state (tuning reports intermediate values this way). An exception it
            raises (e.g. ``optuna.TrialPruned``) ends the fit and propagates. Models without
            epochs ignore it.
        """
        self.n_users_ = data.n_users
        self.n_items_ = data.n_items
        owned = data.user_item_counts().copy()
        owned.data[:] = 1.0
        self.owned_ = owned
        # private (leading underscore): never saved with the model, see training.persistence
        self._epoch_callback = epoch_callback
        try:
            self._fit(data)
        finally:
            self._epoch_callback = None
        return self

    def _end_epoch(self, epoch: int) -> None:
        """Call the ``epoch_callback`` given to :meth:`fit`, if any (``epoch`` is 1-based)."""
        callback = getattr(self, "_epoch_callback", None)
        if callback is not None:
            callback(epoch)

    def _wants_epochs(self) -> bool:
        """Whether :meth:`fit` got an ``epoch_callback`` (then each epoch leaves a scorable
        state, which costs a copy of the factors)."""
        return getattr(self, "_epoch_callback", None) is not None

    @abstractmethod
    def _fit(self, data: Dataset) -> None: ...

    @abstractmethod
    def score(self, users: np.ndarray, carts: sp.csr_matrix) -> np.ndarray:
        """Scores of every item for each query; higher is better.

        Parameters
        ----------
        users : numpy.ndarray, shape (n,), int
            Internal user index per query; -1 for an anonymous or unknown user.
        carts : scipy.sparse.csr_matrix, shape (n, n_items)
            Items in each query's cart (binary); rows may be empty.

        Returns
        -------
        numpy.ndarray, shape (n, n_items), float32
        """

    def recommend(
        self,
        users: np.ndarray,
        carts: sp.csr_matrix | None = None,
        k: int = 10,
        candidates: CandidateFilter | None = None,
        batch_size: int = 512,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query, best first.

        Returns
        -------
        (items, scores) : numpy.ndarray, shape (n, k) each
            Internal item indices (int32; -1 where fewer than ``k`` candidates remain) and
            their scores (float32; -inf where padded).
        """
        self._check_fitted()
        users = np.asarray(users, dtype=np.int64)
        n = users.shape[0]
        if carts is None:
            carts = sp.csr_matrix((n, self.n_items_), dtype=np.float32)
        if carts.shape != (n, self.n_items_):
            raise ValueError(f"carts must have shape ({n}, {self.n_items_}), got {carts.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        cand = candidates or CandidateFilter()
        k_eff = min(k, self.n_items_)
        out_items = np.full((n, k), -1, dtype=np.int32)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        static_mask = cand.static_mask(self.n_items_)
        from training.progress import bar

        pbar = bar(total=n, desc="ranking", unit="query")
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            u, c = users[start:stop], carts[start:stop]
            s = np.asarray(self.score(u, c), dtype=np.float32)
            s[:, static_mask] = -np.inf
            self.mask_per_query(s, u, c, cand)
            items, scores = top_k(s, k_eff)
            out_items[start:stop, :k_eff] = items
            out_scores[start:stop, :k_eff] = scores
            pbar.update(stop - start)
        pbar.close()
        return out_items, out_scores

    def mask_per_query(
        self, scores: np.ndarray, users: np.ndarray, carts: sp.csr_matrix, cand: CandidateFilter
    ) -> None:
        """Set to -inf, in place, what ``cand`` excludes per query: the cart and, if asked,
        the items the (known) user bought in train."""
        if cand.exclude_cart:
            _mask_rows(scores, carts)
        if cand.exclude_owned:
            _mask_rows(scores, owned_rows(self.owned_, users))

    # -- export (training.export): each kind owns its scoring graph ---------------------
    #: Whether :mod:`training.export` can write an artifact for this kind (the kind is then
    #: in ``training.export.EXPORTABLE``, derived from ``training.models.MODELS``).
    exportable: ClassVar[bool] = False

    def graph_scores(self, g: Graph) -> str:
        """Add this model's scoring subgraph to ``g`` (:class:`training.onnx_graph.Graph`) and
        return the name of its ``[B, n_items]`` float32 score tensor. Factor models need not
        override it (:meth:`factor_parts` is enough); a kind with no graph raises
        :class:`training.onnx_graph.ExportError`."""
        from training.onnx_graph import ExportError

        parts = self.factor_parts()
        if parts is None:
            raise ExportError(f"model kind {self.kind!r} cannot be exported as a scoring graph")
        users, unknown, items, bias = parts
        return g.factor_scores(users, unknown, items, bias, getattr(self, "cart_weight", 0.0))

    def factor_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(user vectors, unknown-user vector, item vectors, item bias with the tie-break) of
        a factor model, whose graph can then score a head of long item vectors first
        (:func:`training.onnx_graph.build_graph`); None for every other kind."""
        return None

    def export_history(self) -> sp.csr_matrix:
        """The per-user state an artifact ships (``user_state.npz``, model item order): the
        re-buy scores if the model has them, else the owned items."""
        if hasattr(self, "user_scores_"):
            return sp.csr_matrix(self.user_scores_, dtype=np.float32)
        return sp.csr_matrix(self.owned_, dtype=np.float32)

    def export_parts(self, head: int | None = None) -> ArtifactParts:
        """What the artifact writer needs from this model besides the id maps and item table:
        by default one scoring graph over the catalog (``scorer: graph``). A kind served by
        other code (a serving scorer of :data:`serving.scorers.SCORERS`) overrides this and
        returns its own ONNX model, extra arrays and manifest fields."""
        from training.artifact_writer import ArtifactParts
        from training.onnx_graph import build_graph

        graph = build_graph(self, head)
        return ArtifactParts(graph.onnx, graph.order, graph.head)

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_items_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(data) first")

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (the config round-trips through these)."""
        if hasattr(self, "__dataclass_fields__"):
            return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {}


def history_and_cart(
    owned: sp.csr_matrix,
    users: np.ndarray,
    carts: sp.csr_matrix,
    history_weight: float,
    cart_weight: float,
) -> sp.csr_matrix:
    """Query rows ``history_weight * h_u + cart_weight * cart`` for item x item models; an
    unknown user (-1) has no history."""
    users = np.asarray(users, dtype=np.int64)
    history = owned[np.maximum(users, 0)].multiply((users >= 0)[:, None].astype(np.float32))
    query = history_weight * sp.csr_matrix(history) + cart_weight * sp.csr_matrix(
        carts, dtype=np.float32
    )
    return sp.csr_matrix(query)


def owned_rows(owned: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    """The train items of each query's user, shape ``[len(users), n_items]``; unknown
    users (index -1) get an empty row.

    Zeroing the unknown rows by multiplication leaves explicit zeros in the matrix, which
    every stored-pattern mask would read as "owned" (an unknown user lost user 0's items):
    they are removed here.
    """
    known = (users >= 0).astype(np.float32)[:, None]
    rows = sp.csr_matrix(owned[np.maximum(users, 0)].multiply(known))
    rows.eliminate_zeros()
    return rows


def _mask_rows(scores: np.ndarray, mask: sp.csr_matrix) -> None:
    """Set ``scores[r, j] = -inf`` wherever ``mask[r, j]`` is stored."""
    mask = sp.csr_matrix(mask)
    rows = np.repeat(np.arange(mask.shape[0]), np.diff(mask.indptr))
    scores[rows, mask.indices] = -np.inf
