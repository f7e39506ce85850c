"""A synthetic shop in the canonical schema: ``addons data synth``.

The generative model (every distribution and parameter: ``docs/data_synth.md``, and the
constants of :class:`SynthModel`, which ``synth.json`` records beside the data):

- a **catalog** of ``items`` products in a department > category > subcategory tree, with
  Zipf (power-law) popularity, log-normal prices per subcategory, margins per department and
  an in-stock flag;
- **complement groups**: the catalog is cut at random into groups of 2-6 items from
  different parts of the tree ("goes with"), so "bought together" is learnable;
- **households**: a log-normal activity that fixes each household's share of the ``rows``
  order lines, a basket-size scale, a personal set of staples each re-bought on its own
  cycle, and a shopping rhythm (Gamma gaps spread over one year) and time-of-day window;
- **baskets**: the staples due, plus "missions" (an anchor item drawn by popularity and
  some of its group partners), plus impulse items drawn by popularity.

Everything is vectorised numpy over blocks of whole households of about
:data:`CHUNK_ROWS` order lines; each block is written as Parquet row groups as soon as it is
made, so memory does not grow with ``rows`` beyond the per-user and per-item arrays. Each
block draws from its own generator seeded with ``(seed, block)``: the same arguments give
byte-identical files. The output folder is written under a temp name and swapped in
(:func:`features.io.atomic_directory`), so a reader never sees half a dataset.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from features.errors import ConfigError
from features.io import atomic_directory

#: Version of the generative model; bumped whenever the same arguments would give other data.
GENERATOR_VERSION = 1
#: The file that marks a folder as written by ``addons data synth`` (``--force`` replaces
#: only such folders).
MARKER = "synth.json"
#: Order lines per block of households (a block ends at the first household that starts past
#: it). Part of the model: blocks draw from their own seeded generators.
CHUNK_ROWS = 1 << 19
#: Ids are stored as int64 but indexed with int32 arrays inside blocks.
MAX_COUNT = 2**31 - 1
#: The year the timestamps cover: [START, START + DAYS days).
START = np.datetime64("2024-01-01T00:00:00", "us")
DAYS = 366
INTERACTIONS, ITEMS, USERS = "interactions.parquet", "items.parquet", "users.parquet"
HOUSEHOLD_SIZES = np.array(["1", "2", "3-4", "5+"])
REGIONS = np.array(["north", "south", "east", "west", "centre"])


@dataclass(frozen=True)
class SynthModel:
    """The constants of the generative model (see ``docs/data_synth.md`` for how each is used)."""

    zipf_exponent: float = 1.0  # item weight (popularity rank + 1) ** -zipf_exponent
    items_per_subcategory: int = 40
    subcategories_per_category: int = 5
    categories_per_department: int = 3
    max_departments: int = 20
    subcategory_size_shape: float = 2.0  # Gamma shape of subcategory sizes
    price_median: float = 2.5
    price_sigma_subcategory: float = 0.7
    price_sigma_item: float = 0.3
    price_min: float = 0.1
    margin_rate_low: float = 0.15
    margin_rate_high: float = 0.45
    margin_rate_sigma: float = 0.05
    margin_rate_min: float = 0.02
    margin_rate_max: float = 0.8
    in_stock_probability: float = 0.95
    group_extra_n: int = 4  # group size = 2 + Binomial(group_extra_n, group_extra_p)
    group_extra_p: float = 0.3
    partner_probability: float = 0.5
    activity_sigma: float = 1.0
    basket_scale_sigma: float = 0.35
    staples_base: int = 2
    staples_mean: float = 6.0
    staple_cycle_n: int = 5  # cycle = 1 + Binomial(staple_cycle_n, staple_cycle_p) baskets
    staple_cycle_p: float = 0.3
    staple_buy_probability: float = 0.9
    missions_mean: float = 1.0
    impulses_mean: float = 1.5
    gap_shape: float = 4.0
    shop_hour_first: int = 7
    shop_hour_last: int = 17
    shop_window_hours: float = 4.0
    extra_quantity_mean: float = 0.3
    promo_probability: float = 0.15
    promo_discount: float = 0.2
    household_size_cuts: tuple[float, float, float] = (0.8, 1.1, 1.5)


MODEL = SynthModel()


@dataclass(frozen=True)
class SynthSummary:
    """What ``synthesize`` wrote."""

    out: Path
    rows: int
    users: int
    items: int
    baskets: int
    seed: int
    files: dict[str, str]  # file name -> sha256

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "out": str(self.out)}


# -- arguments and the output folder -----------------------------------------------------------


def check_arguments(rows: int, users: int, items: int, seed: int) -> None:
    """Raise :class:`ConfigError` naming the flag when a size or the seed is out of range."""
    for flag, value in (("--rows", rows), ("--users", users), ("--items", items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(flag, f"must be a whole number >= 1, got {value!r}")
        if value > MAX_COUNT:
            raise ConfigError(flag, f"must be at most {MAX_COUNT:,}, got {value:,}")
    if users > rows:
        raise ConfigError(
            "--users",
            f"{users:,} households cannot fit in {rows:,} order lines (each household buys at "
            "least once): give --users <= --rows",
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError("--seed", f"must be a whole number in [0, 2**63), got {seed!r}")


def check_output(out: str | Path, force: bool) -> Path:
    """Refuse an ``--out`` that cannot or must not be written; returns it as a Path.

    An existing non-empty folder needs ``force``, and even then only a folder written by
    this command (it holds :data:`MARKER`) is replaced: an unrelated folder is never
    deleted. An empty existing folder is taken as is.
    """
    path = Path(out)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise ConfigError("--out", f"{path} exists and is not a folder: give a folder path")
        if any(path.iterdir()):
            if not force:
                raise ConfigError(
                    "--out", f"{path} exists and is not empty: pass --force to replace it"
                )
            if not (path / MARKER).is_file():
                raise ConfigError(
                    "--out",
                    f"{path} is not a folder written by addons data synth (no {MARKER}): "
                    "refusing to replace it, even with --force; choose another folder",
                )
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError("--out", f"{parent} is not a folder: cannot create {path} under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--out", f"cannot write in {parent} (permission denied)")
    return path


# -- vectorised helpers --------------------------------------------------------------------------


def _expand(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) of every slot when entry ``i`` owns ``lengths[i]`` slots."""
    lengths = np.asarray(lengths, dtype=np.int64)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    return owner, np.arange(len(owner), dtype=np.int64) - starts[owner]


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: index ``i`` with probability ``cdf[i] - cdf[i - 1]``."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def allocate(total: int, weights: np.ndarray, floor: int = 1) -> np.ndarray:
    """Split ``total`` into integers ``>= floor`` proportional to ``weights`` (largest
    remainder, ties to the lower index), summing exactly to ``total``."""
    n = len(weights)
    spare = total - floor * n
    share = spare * (weights / weights.sum())
    base = np.floor(share).astype(np.int64)
    left = spare - int(base.sum())
    if left > 0:
        base[np.argsort(-(share - base), kind="stable")[:left]] += 1
    return base + floor


# -- the catalog ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """Items (internal index ``i``, external id ``i + 1``) and their complement groups."""

    popularity_cdf: np.ndarray
    subcategory: np.ndarray
    category_of_sub: np.ndarray
    department_of_category: np.ndarray
    price: np.ndarray
    margin: np.ndarray
    in_stock: np.ndarray
    group_order: np.ndarray  # items listed group by group
    group_of: np.ndarray  # group of each item
    position: np.ndarray  # index of each item in group_order
    group_start: np.ndarray
    group_size: np.ndarray


def make_catalog(n_items: int, rng: np.random.Generator, m: SynthModel = MODEL) -> Catalog:
    """The product tree, popularity, prices, margins, stock and complement groups."""
    n_sub = max(1, round(n_items / m.items_per_subcategory))
    n_cat = max(1, round(n_sub / m.subcategories_per_category))
    n_dept = max(1, min(m.max_departments, -(-n_cat // m.categories_per_department)))
    sub_cdf = _cdf(rng.gamma(m.subcategory_size_shape, 1.0, n_sub))
    subcategory = _draw(sub_cdf, rng.random(n_items))
    category_of_sub = np.arange(n_sub) % n_cat
    department_of_category = np.arange(n_cat) % n_dept
    rank = rng.permutation(n_items)
    popularity = (rank + 1.0) ** -m.zipf_exponent
    sub_price = np.exp(rng.normal(np.log(m.price_median), m.price_sigma_subcategory, n_sub))
    item_factor = np.exp(rng.normal(0.0, m.price_sigma_item, n_items))
    price = np.maximum(m.price_min, np.round(sub_price[subcategory] * item_factor, 2))
    dept_rate = rng.uniform(m.margin_rate_low, m.margin_rate_high, n_dept)
    department = department_of_category[category_of_sub[subcategory]]
    rate = dept_rate[department] + rng.normal(0.0, m.margin_rate_sigma, n_items)
    margin = np.round(price * np.clip(rate, m.margin_rate_min, m.margin_rate_max), 2)
    in_stock = rng.random(n_items) < m.in_stock_probability
    # Complement groups: a random order of the catalog cut into runs of 2 + Binomial sizes,
    # so a group mixes departments (cross-sell) and every item is in exactly one group.
    order = rng.permutation(n_items)
    sizes = 2 + rng.binomial(m.group_extra_n, m.group_extra_p, n_items // 2 + 1)
    ends = np.cumsum(sizes)
    n_groups = int(np.searchsorted(ends, n_items)) + 1
    ends = ends[:n_groups]
    ends[-1] = n_items
    starts = np.concatenate([[0], ends[:-1]])
    group_size = ends - starts
    group_of_position = np.repeat(np.arange(n_groups), group_size)
    group_of = np.empty(n_items, dtype=np.int64)
    group_of[order] = group_of_position
    position = np.empty(n_items, dtype=np.int64)
    position[order] = np.arange(n_items)
    return Catalog(_cdf(popularity), subcategory, category_of_sub, department_of_category,
                   price, margin, in_stock, order, group_of, position, starts,
                   group_size)  # fmt: skip


def items_table(cat: Catalog) -> object:
    """The canonical items table (a pyarrow Table)."""
    import pyarrow as pa

    n_sub, n_cat = len(cat.category_of_sub), len(cat.department_of_category)
    n_dept = int(cat.department_of_category.max()) + 1
    dept_names = np.array([f"dept {d:02d}" for d in range(n_dept)])
    cat_names = np.array([f"cat {c:04d}" for c in range(n_cat)])
    sub_names = np.array([f"sub {s:05d}" for s in range(n_sub)])
    category = cat.category_of_sub[cat.subcategory]
    return pa.table({
        "item_id": pa.array(np.arange(1, len(cat.price) + 1, dtype=np.int64)),
        "department": pa.array(dept_names[cat.department_of_category[category]]),
        "category": pa.array(cat_names[category]),
        "subcategory": pa.array(sub_names[cat.subcategory]),
        "price": pa.array(cat.price),
        "margin": pa.array(cat.margin),
        "in_stock": pa.array(cat.in_stock),
    })  # fmt: skip


# -- households and baskets ----------------------------------------------------------------------


@dataclass
class Block:
    """One block of households: their order lines (sorted by user, basket, item)."""

    user: np.ndarray  # block-local household index per line
    basket: np.ndarray  # block-local basket index per line (dense, in user then time order)
    item: np.ndarray
    basket_time: np.ndarray  # datetime64[us] per basket
    scale: np.ndarray  # basket-size scale per household


def _compose(b_user: np.ndarray, b_k: np.ndarray, hh: dict[str, np.ndarray], cat: Catalog,
             rng: np.random.Generator, m: SynthModel) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Lines (basket, item) of baskets ``k`` of households ``b_user``, deduplicated and
    sorted by basket then item."""
    n_items, nb = len(cat.price), len(b_user)
    # staples due: staple s of the household is bought in basket k when (k + phase) % cycle
    # == 0, with probability staple_buy_probability
    s_b, s_j = _expand(hh["staple_count"][b_user])
    s_idx = hh["staple_start"][b_user[s_b]] + s_j
    due = (b_k[s_b] + hh["staple_phase"][s_idx]) % hh["staple_cycle"][s_idx] == 0
    due &= rng.random(len(s_idx)) < m.staple_buy_probability
    staple_basket, staple_item = s_b[due], hh["staple_item"][s_idx[due]]
    # missions: an anchor by popularity, then each other member of its group with
    # partner_probability, and one of them for sure
    scale = hh["scale"][b_user]
    n_missions = rng.poisson(m.missions_mean * scale)
    m_b, _ = _expand(n_missions)
    anchor = _draw(cat.popularity_cdf, rng.random(len(m_b)))
    group = cat.group_of[anchor]
    size, start = cat.group_size[group], cat.group_start[group]
    at = cat.position[anchor] - start
    other = np.floor(rng.random(len(m_b)) * (size - 1)).astype(np.int64)
    forced = np.where(size > 1, (at + 1 + other) % np.maximum(size, 1), at)
    e_m, e_j = _expand(size)
    take = (e_j == at[e_m]) | (e_j == forced[e_m]) | (rng.random(len(e_m)) < m.partner_probability)
    mission_basket = m_b[e_m[take]]
    mission_item = cat.group_order[start[e_m[take]] + e_j[take]]
    # impulses by popularity; a basket with nothing else gets one
    n_impulses = rng.poisson(m.impulses_mean * scale)
    empty = (np.bincount(staple_basket, minlength=nb) == 0) & (n_missions == 0)
    n_impulses[empty & (n_impulses == 0)] = 1
    i_b, _ = _expand(n_impulses)
    impulse_item = _draw(cat.popularity_cdf, rng.random(len(i_b)))
    # one line per (basket, item): an item drawn twice in a basket is one line
    key = np.unique(np.concatenate([
        staple_basket * n_items + staple_item,
        mission_basket * n_items + mission_item,
        i_b * n_items + impulse_item,
    ]))  # fmt: skip
    return key // n_items, key % n_items


def make_block(budget: np.ndarray, cat: Catalog, rng: np.random.Generator,
               m: SynthModel = MODEL) -> Block:  # fmt: skip
    """Households with the given order-line budgets, their baskets and lines."""
    n_items, nu = len(cat.price), len(budget)
    scale = rng.lognormal(0.0, m.basket_scale_sigma, nu)
    n_staples = np.minimum(n_items, m.staples_base + rng.poisson(m.staples_mean * scale))
    st_user, _ = _expand(n_staples)
    st_key = np.unique(st_user * n_items + _draw(cat.popularity_cdf, rng.random(len(st_user))))
    st_user, st_item = st_key // n_items, st_key % n_items
    cycle = 1 + rng.binomial(m.staple_cycle_n, m.staple_cycle_p, len(st_user))
    count = np.bincount(st_user, minlength=nu)
    hh = {
        "scale": scale,
        "staple_item": st_item,
        "staple_cycle": cycle,
        "staple_phase": np.floor(rng.random(len(st_user)) * cycle).astype(np.int64),
        "staple_count": count,
        "staple_start": np.cumsum(count) - count,
    }
    hour = rng.integers(m.shop_hour_first, m.shop_hour_last + 1, nu)
    # expected lines per basket (before de-duplication), to size the draws
    expected = (np.bincount(st_user, weights=m.staple_buy_probability / cycle, minlength=nu)
                + scale * (m.missions_mean * (2 + m.partner_probability
                                              * (m.group_extra_n * m.group_extra_p))
                           + m.impulses_mean))  # fmt: skip
    have = np.zeros(nu, dtype=np.int64)
    next_k = np.zeros(nu, dtype=np.int64)
    rounds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    while (todo := np.flatnonzero(have < budget)).size:
        # draw about 25 % more baskets than needed; a household still short gets another round
        left = budget[todo] - have[todo]
        n_draw = np.minimum(left, np.ceil(left / np.maximum(0.8 * expected[todo], 1.0)) + 1)
        n_draw = n_draw.astype(np.int64)
        owner, j = _expand(n_draw)
        b_user, b_k = todo[owner], next_k[todo][owner] + j
        line_basket, line_item = _compose(b_user, b_k, hh, cat, rng, m)
        sizes = np.bincount(line_basket, minlength=len(b_user))
        have += np.bincount(b_user, weights=sizes, minlength=nu).astype(np.int64)
        next_k[todo] += n_draw
        rounds.append((b_user, b_k, sizes, line_item))
    b_user = np.concatenate([r[0] for r in rounds])
    b_k = np.concatenate([r[1] for r in rounds])
    sizes = np.concatenate([r[2] for r in rounds])
    items = np.concatenate([r[3] for r in rounds])
    # baskets in (household, k) order; lines follow their basket
    order = np.lexsort((b_k, b_user))
    first_line = np.cumsum(sizes) - sizes
    sizes, b_user = sizes[order], b_user[order]
    owner, j = _expand(sizes)
    items = items[first_line[order][owner] + j]
    # cut each household at its budget: lines past it (the end of its last basket) go
    line_user = b_user[owner]
    user_first = np.searchsorted(line_user, np.arange(nu))
    keep = np.arange(len(items)) - user_first[line_user] < budget[line_user]
    items, basket = items[keep], owner[keep]
    used = np.unique(basket)  # baskets with a line left, in order
    basket = np.searchsorted(used, basket)
    b_user = b_user[used]
    return Block(b_user[basket], basket, items, _basket_times(b_user, hour, nu, rng, m), scale)


def _basket_times(b_user: np.ndarray, hour: np.ndarray, nu: int, rng: np.random.Generator,
                  m: SynthModel) -> np.ndarray:  # fmt: skip
    """Times of baskets sorted by household: Gamma gaps spread over the year, so each
    household keeps its own rhythm; the time of day inside its shopping window."""
    n_baskets = np.bincount(b_user, minlength=nu)
    gaps = rng.gamma(m.gap_shape, 1.0, len(b_user) + nu)  # one gap more per household
    owner, j = _expand(n_baskets + 1)
    total = np.cumsum(gaps)
    start = np.concatenate([[0.0], total])[np.cumsum(n_baskets + 1) - (n_baskets + 1)]
    running = total - start[owner]
    span = running[np.cumsum(n_baskets + 1) - 1]  # each household's sum of gaps
    is_basket = j < n_baskets[owner]
    days = DAYS * running[is_basket] / span[owner[is_basket]]
    day = np.floor(days)
    # increasing within a day too: the day's fraction is the position in the window
    seconds = (day * 86400 + hour[b_user] * 3600
               + np.floor((days - day) * m.shop_window_hours * 3600))  # fmt: skip
    return START + seconds.astype(np.int64) * np.timedelta64(1_000_000, "us")


def _household_table(first_id: int, scale: np.ndarray, rng: np.random.Generator,
                     m: SynthModel) -> object:  # fmt: skip
    import pyarrow as pa

    band = np.searchsorted(np.asarray(m.household_size_cuts), scale, side="right")
    return pa.table({
        "user_id": pa.array(np.arange(first_id, first_id + len(scale), dtype=np.int64)),
        "household_size": pa.array(HOUSEHOLD_SIZES[band]),
        "region": pa.array(REGIONS[rng.integers(0, len(REGIONS), len(scale))]),
    })  # fmt: skip


def _lines_table(block: Block, first_user: int, first_basket: int, cat: Catalog,
                 rng: np.random.Generator, m: SynthModel) -> object:  # fmt: skip
    import pyarrow as pa

    n = len(block.item)
    quantity = 1.0 + rng.poisson(m.extra_quantity_mean, n)
    promo = rng.random(n) < m.promo_probability
    value = np.round(quantity * cat.price[block.item] * np.where(promo, 1 - m.promo_discount, 1),
                     2)  # fmt: skip
    return pa.table({
        "user_id": pa.array(block.user + first_user),
        "item_id": pa.array(block.item + 1),
        "timestamp": pa.array(block.basket_time[block.basket]),
        "basket_id": pa.array(block.basket + first_basket),
        "quantity": pa.array(quantity),
        "value": pa.array(value),
    })  # fmt: skip


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def synthesize(out: str | Path, rows: int, users: int, items: int, seed: int = 0,
               force: bool = False, on_block: Callable[[int], None] | None = None,
               model: SynthModel = MODEL) -> SynthSummary:  # fmt: skip
    """Write a synthetic shop to the folder ``out``.

    Parameters
    ----------
    out : str or Path
        Folder to write: ``interactions.parquet``, ``items.parquet``, ``users.parquet`` and
        ``synth.json`` (the arguments, the model's constants, counts and file hashes). Must
        not exist, be empty, or (with ``force``) be a folder this function wrote.
    rows, users, items : int
        Order lines (exactly), households (each buys at least once, so ``users <= rows``)
        and catalog size (items may go unsold).
    seed : int
        Same arguments and seed: byte-identical files.
    force : bool
        Replace an earlier output of this function.
    on_block : callable, optional
        Called with the number of lines of each block written (progress).
    model : SynthModel
        The model's constants.

    Raises
    ------
    ConfigError
        A bad argument or an ``--out`` that must not or cannot be written (exit 2).
    """
    import pyarrow.parquet as pq

    check_arguments(rows, users, items, seed)
    target = check_output(out, force)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty folder: take its place
    catalog = make_catalog(items, np.random.default_rng([seed, 0]), model)
    activity = np.random.default_rng([seed, 1]).lognormal(0.0, model.activity_sigma, users)
    budget = allocate(rows, activity)
    # block b holds the households whose first line falls in [b, b + 1) * CHUNK_ROWS
    first_line = np.cumsum(budget) - budget
    bounds = np.flatnonzero(np.diff(first_line // CHUNK_ROWS, prepend=-1))
    bounds = np.append(bounds, users)
    n_baskets = 0
    try:
        with atomic_directory(target, MARKER) as tmp:
            pq.write_table(items_table(catalog), tmp / ITEMS, compression="zstd")
            lines_writer = users_writer = None
            try:
                for b, (u0, u1) in enumerate(itertools.pairwise(bounds)):
                    rng = np.random.default_rng([seed, 2, b])
                    block = make_block(budget[u0:u1], catalog, rng, model)
                    lines = _lines_table(block, int(u0) + 1, n_baskets + 1, catalog, rng, model)
                    hh = _household_table(int(u0) + 1, block.scale, rng, model)
                    n_baskets += int(block.basket[-1]) + 1
                    if lines_writer is None:
                        lines_writer = pq.ParquetWriter(tmp / INTERACTIONS, lines.schema,
                                                        compression="zstd")  # fmt: skip
                        users_writer = pq.ParquetWriter(tmp / USERS, hh.schema,
                                                        compression="zstd")  # fmt: skip
                    lines_writer.write_table(lines)
                    users_writer.write_table(hh)
                    if on_block is not None:
                        on_block(lines.num_rows)
            finally:
                for writer in (lines_writer, users_writer):
                    if writer is not None:
                        writer.close()
            files = {name: _sha256(tmp / name) for name in (INTERACTIONS, ITEMS, USERS)}
            meta = {
                "generator": "addons data synth",
                "version": GENERATOR_VERSION,
                "arguments": {"rows": rows, "users": users, "items": items, "seed": seed},
                "chunk_rows": CHUNK_ROWS,
                "start": str(START),
                "days": DAYS,
                "model": asdict(model),
                "counts": {"rows": rows, "users": users, "items": items, "baskets": n_baskets},
                "files": files,
            }
            (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except (PermissionError, NotADirectoryError, FileExistsError) as exc:
        raise ConfigError("--out", f"cannot write {target}: {exc}") from None
    return SynthSummary(target, rows, users, items, n_baskets, seed, files)
