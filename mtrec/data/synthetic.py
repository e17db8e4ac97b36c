"""Synthetic scenarios with known ground truth: ``ecommerce``, ``social`` and ``search``.

A scenario is a small generative world. Items have latent attributes (category, colour, price
band, brand, ..., plus a quality level) that their ``text`` spells out in words, so a language
model reading the text can recover them; catalogues and text templates live in
``mtrec/data/scenarios/<scenario>.yaml``. Users belong to one of eight ``segment`` values and have
an age band and a region (``users.parquet`` side columns). Taste is low-rank, as in matrix
factorisation: a user's taste for an attribute value is the value's latent vector dotted with the
segment's vector plus a small personal offset (which the user's history reveals and the user's text
hints at), plus age-band and region shifts on one attribute each. Each row is an impression at a
time on a fixed schedule; its label probabilities are a deterministic function of what a model can
see (user features and id, item text and id, the row's numeric columns and query), and labels are
Bernoulli draws from them (gamma draws for ``dwell_time``), so the noise is irreducible and the
stored probabilities (``ground_truth.parquet``) are the best any model can do: :func:`oracle_metrics`.

Items released during the period (30% of the catalogue, some promoted as new arrivals) become the
cold items of the valid and test splits; the split follows :mod:`mtrec.data.splits`. Rows are
simulated in blocks of :data:`BLOCK_ROWS`, each from its own random stream keyed by (seed, scenario,
block), and streamed to Parquet in row groups of ``chunk_rows``: memory does not grow with the number
of rows, and the content does not depend on the chunk size. Besides the data contract's files, a
dataset holds ``ground_truth.parquet`` (``p_<task>`` per row, same order: full-space probabilities,
p(purchase) = p(click) p(cart | click) p(purchase | cart)), ``item_latent.parquet`` (the items'
attributes, quality, hidden popularity and release time) and ``synthetic.json`` (the arguments that
rebuild it).
"""

from __future__ import annotations

import contextlib
import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from mtrec.config import DataConfig, TaskSpec
from mtrec.data.contract import (
    INTERACTIONS,
    ITEMS,
    SPLITS,
    TASKS,
    USERS,
    Problem,
    check_entity,
    check_foreign_ids,
    check_interactions,
    read_tasks,
    task_problems,
    write_tasks,
)
from mtrec.data.splits import assign_split, split_boundaries
from mtrec.errors import ConfigError, DataError
from mtrec.io import atomic_dir, check_output
from mtrec.metrics import task_metrics

SCENARIOS = ("ecommerce", "social", "search")
GROUND_TRUTH = "ground_truth.parquet"
ITEM_LATENT = "item_latent.parquet"
MANIFEST = "synthetic.json"

BLOCK_ROWS = 65_536  # rows drawn from one random stream: the unit of determinism
CHUNK_ROWS = 4 * BLOCK_ROWS  # default rows per Parquet row group
START = 1_704_067_200  # 2024-01-01T00:00:00Z
PERIOD = 60 * 86_400  # the simulated period; row k of n happens at START + k * PERIOD // n
NEW_ITEM_FRACTION = 0.3  # share of the catalogue released during the period, uniformly in time
FRESH_WINDOW = 7 * 86_400  # items released this recently are "new arrivals"...
FRESH_SHARE = 0.1  # ...and fill this share of impressions, when there are any
NUM_SEGMENTS = 8
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
REGIONS = ("north", "south", "east", "west", "centre", "coast")
AGE_AFFINITY, REGION_AFFINITY = 0.3, 0.25  # std (logits) of age-band / region taste shifts
QUALITY_STEP = 0.6  # logit per quality level, centred on the middle level 2
POPULARITY_STD = 0.15  # hidden per-item logit, learnable from the item id
TASTE_RANK = 4  # dimension of the latent taste space
QUALITY_MIX = (0.1, 0.2, 0.4, 0.2, 0.1)  # share of items per quality level 0..4
SEARCH_CANDIDATES = 16  # items retrieved per query, one of which is shown
DWELL_SHAPE = 3.0  # gamma shape of dwell_time around its true mean (minutes)
_SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


# ---------------------------------------------------------------------------------------- splits


def _timestamps(rows: np.ndarray, num_rows: int) -> np.ndarray:
    """(N,) int64 time of rows ``rows`` (0-based) of ``num_rows``: evenly spread over the period."""
    return START + (np.asarray(rows, np.int64) * PERIOD) // num_rows


class _Schedule(Sequence):
    """The sorted timestamps of a dataset of ``num_rows`` rows, computed on demand."""

    def __init__(self, num_rows: int):
        self._num_rows = num_rows

    def __len__(self) -> int:
        return self._num_rows

    def __getitem__(self, k):  # type: ignore[override]
        return int(_timestamps(np.asarray(k), self._num_rows))


# ---------------------------------------------------------------------------------------- world


@dataclass
class _Queries:
    """The search scenario's query catalogue."""

    attr: np.ndarray  # (Q, A) int64 value named per attribute, -1 where the query does not name it
    text: pa.Array  # (Q,) string
    cum: np.ndarray  # (S, Q) float64 cumulative query probabilities per segment
    index_attr: int  # the attribute every query names, by which the engine retrieves
    index: list[tuple[np.ndarray, np.ndarray]]  # per value of it: (item indexes, cumulative exposure)


@dataclass
class _World:
    """Everything latent about one scenario: catalogue, users and their tastes."""

    scenario: str
    spec: dict
    seed: int
    num_rows: int
    attrs: list[str]
    vocab: list[list[str]]
    offsets: np.ndarray  # (A,) int64 start of each attribute's values on the (V,) value axis
    item_attr: np.ndarray  # (I, A) int64 value index per attribute
    item_quality: np.ndarray  # (I,) int64 level 0..4
    item_pop: np.ndarray  # (I,) float64 hidden popularity logit
    item_release: np.ndarray  # (I,) int64 seconds, non-decreasing
    num_initial_items: int
    exposure_cum: np.ndarray  # (I,) float64 cumulative exposure weight
    user_segment: np.ndarray  # (U,) int64
    user_age: np.ndarray  # (U,) int64 index into AGE_BANDS
    user_region: np.ndarray  # (U,) int64 index into REGIONS
    user_pref: np.ndarray  # (U, V) float32 taste per attribute value, logits
    activity_cum: np.ndarray  # (U,) float64 cumulative activity weight
    segment_params: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (S,) float64
    queries: _Queries | None = None

    def attr_slice(self, name: str) -> slice:
        """The attribute's values on the (V,) value axis."""
        a = self.attrs.index(name)
        return slice(int(self.offsets[a]), int(self.offsets[a]) + len(self.vocab[a]))


def load_spec(scenario: str) -> dict:
    """The scenario's YAML catalogue (a ``catalogue:`` key pulls in another scenario's)."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
    spec = yaml.safe_load((_SCENARIO_DIR / f"{scenario}.yaml").read_text())
    if "catalogue" in spec:
        spec = {**load_spec(spec["catalogue"]), **spec}
    return spec


def _build_world(scenario: str, num_users: int, num_items: int, num_rows: int, seed: int) -> _World:
    spec = load_spec(scenario)
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario), 0])
    attrs = list(spec["item_attributes"])
    vocab = [[str(v) for v in spec["item_attributes"][a]["values"]] for a in attrs]
    sizes = np.array([len(v) for v in vocab])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    item_attr = np.stack([rng.integers(0, s, num_items) for s in sizes], axis=1)
    quality = rng.choice(len(QUALITY_MIX), size=num_items, p=QUALITY_MIX)
    pop = rng.normal(0.0, POPULARITY_STD, num_items)
    num_initial = max(1, round(num_items * (1 - NEW_ITEM_FRACTION)))
    released = np.sort(rng.integers(START, START + PERIOD, num_items - num_initial))
    exposure = np.exp(rng.normal(0.0, 1.0, num_items) + 1.5 * pop)

    segment = rng.integers(0, NUM_SEGMENTS, num_users)
    age_mix = rng.dirichlet(np.ones(len(AGE_BANDS)), NUM_SEGMENTS).cumsum(axis=1)  # age bands lean by segment
    age = np.minimum((rng.random(num_users)[:, None] > age_mix[segment]).sum(axis=1), len(AGE_BANDS) - 1)
    region = rng.integers(0, len(REGIONS), num_users)
    # Low-rank taste, as in matrix factorisation: each attribute value has a latent vector (scaled by
    # its attribute's affinity), dotted with the user's vector = segment vector + personal offset.
    scale = np.repeat([float(spec["item_attributes"][a]["affinity"]) for a in attrs], sizes)
    value_vec = rng.normal(0.0, 1.0, (int(sizes.sum()), TASTE_RANK)) * (scale / np.sqrt(TASTE_RANK))[:, None]
    segment_vec = rng.normal(0.0, 1.0, (NUM_SEGMENTS, TASTE_RANK))
    personal = rng.normal(0.0, float(spec["personal_affinity"]), (num_users, TASTE_RANK))
    pref = (segment_vec[segment] + personal) @ value_vec.T
    for by, key, std in ((age, "age_affects", AGE_AFFINITY), (region, "region_affects", REGION_AFFINITY)):
        a = attrs.index(spec[key])
        pref[:, offsets[a] : offsets[a] + sizes[a]] += rng.normal(0.0, std, (int(by.max()) + 1, sizes[a]))[by]

    w = _World(
        scenario=scenario,
        spec=spec,
        seed=seed,
        num_rows=num_rows,
        attrs=attrs,
        vocab=vocab,
        offsets=offsets,
        item_attr=item_attr,
        item_quality=quality,
        item_pop=pop,
        item_release=np.concatenate([np.full(num_initial, START - 1), released]),
        num_initial_items=num_initial,
        exposure_cum=np.cumsum(exposure),
        user_segment=segment,
        user_age=age,
        user_region=region,
        user_pref=pref.astype(np.float32),
        activity_cum=np.cumsum(np.exp(rng.normal(0.0, 0.5, num_users))),
        segment_params={k: rng.normal(m, sd, NUM_SEGMENTS) for k, (m, sd) in spec.get("segment_params", {}).items()},
    )
    if "queries" in spec:
        w.queries = _build_queries(w, segment_vec @ value_vec.T, rng)
    return w


def _build_queries(w: _World, segment_taste: np.ndarray, rng: np.random.Generator) -> _Queries:
    """Every query of every kind; a segment asks for what it likes (softmax of its taste)."""
    rows, texts = [], []
    for template in w.spec["queries"]:
        named = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        for values in product(*(range(len(w.vocab[w.attrs.index(f)])) for f in named)):
            row = np.full(len(w.attrs), -1)
            row[[w.attrs.index(f) for f in named]] = values
            words = {f: w.vocab[w.attrs.index(f)][v] for f, v in zip(named, values)}
            prefix = w.spec["query_prefixes"][rng.integers(len(w.spec["query_prefixes"]))]
            suffix = w.spec["query_suffixes"][rng.integers(len(w.spec["query_suffixes"]))]
            rows.append(row)
            texts.append(prefix + template.format(**words) + suffix)
    attr = np.array(rows)
    named = attr >= 0
    logits = (segment_taste[:, np.where(named, attr + w.offsets, 0)] * named).sum(axis=2)  # (S, Q)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    by = w.attrs.index(w.spec["retrieve_by"])
    exposure = np.diff(w.exposure_cum, prepend=0.0)
    index = [
        (items, np.cumsum(exposure[items]))
        for items in map(np.flatnonzero, w.item_attr[:, by] == np.arange(len(w.vocab[by]))[:, None])
    ]
    return _Queries(attr, pa.array(texts, pa.string()), np.cumsum(probs, axis=1), by, index)


# ---------------------------------------------------------------------------------------- text


def _sentence(s: str) -> str:
    s = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", s)
    return s[0].upper() + s[1:]


def _item_texts(w: _World, rng: np.random.Generator) -> list[str]:
    templates, phrases = w.spec["item_templates"], w.spec["quality_phrases"]
    out = []
    for i in range(len(w.item_attr)):
        words = {a: w.vocab[k][w.item_attr[i, k]] for k, a in enumerate(w.attrs)}
        levels = phrases[w.item_quality[i]]
        words["quality"] = levels[rng.integers(len(levels))]
        out.append(_sentence(templates[rng.integers(len(templates))].format(**words)))
    return out


def _user_texts(w: _World, rng: np.random.Generator) -> list[str]:
    """Age band, region and the user's favourite value of each attribute in ``user_mentions``."""
    templates = w.spec["user_templates"]
    favourite = {a: w.user_pref[:, w.attr_slice(a)].argmax(axis=1) for a in w.spec["user_mentions"]}
    out = []
    for u in range(len(w.user_segment)):
        words = {a: w.vocab[w.attrs.index(a)][favourite[a][u]] for a in favourite}
        words.update(age=AGE_BANDS[w.user_age[u]], region=REGIONS[w.user_region[u]])
        out.append(_sentence(templates[rng.integers(len(templates))].format(**words)))
    return out


def _entity_tables(w: _World) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(items, users, item_latent) tables; ids are 1-based indexes."""
    rng = np.random.default_rng([w.seed, SCENARIOS.index(w.scenario), 2])
    num_items, num_users = len(w.item_attr), len(w.user_segment)
    item_id = pa.array(np.arange(1, num_items + 1), pa.int64())
    items = pa.table({"item_id": item_id, "text": pa.array(_item_texts(w, rng), pa.string())})
    users = pa.table(
        {
            "user_id": pa.array(np.arange(1, num_users + 1), pa.int64()),
            "segment": pa.array([f"S{s + 1}" for s in w.user_segment], pa.string()),
            "age_band": pc.take(pa.array(AGE_BANDS), pa.array(w.user_age)),
            "region": pc.take(pa.array(REGIONS), pa.array(w.user_region)),
            "text": pa.array(_user_texts(w, rng), pa.string()),
        }
    )
    latent = {"item_id": item_id}
    latent |= {a: pc.take(pa.array(w.vocab[k]), pa.array(w.item_attr[:, k])) for k, a in enumerate(w.attrs)}
    latent |= {
        "quality": pa.array(w.item_quality.astype(np.int8)),
        "popularity": pa.array(w.item_pop.astype(np.float32)),
        "release_time": pa.array(w.item_release, pa.int64()),
    }
    return items, users, pa.table(latent)


# ---------------------------------------------------------------------------------------- rows


@dataclass
class _Rows:
    """One block of simulated impressions."""

    items: np.ndarray  # (N,) int64 item index
    features: dict[str, np.ndarray]  # per-interaction numeric columns
    labels: dict[str, np.ndarray]  # task -> (N,) float64, NaN where unobserved
    truth: dict[str, np.ndarray]  # task -> (N,) float64 true probability or mean
    context: np.ndarray | None = None  # (N,) int64 query index


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _draw(cum: np.ndarray, u: np.ndarray, limit: np.ndarray | int | None = None) -> np.ndarray:
    """Index drawn in proportion to the weights whose cumulative sum is ``cum``, among the first ``limit``."""
    n = len(cum) if limit is None else limit
    return np.minimum(np.searchsorted(cum, u * cum[np.asarray(n) - 1], side="right"), np.asarray(n) - 1)


def _draw_items(w: _World, ts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) items on show at ``ts``: by exposure among released items, or a uniformly chosen new arrival."""
    released = np.searchsorted(w.item_release, ts, side="right")
    items = _draw(w.exposure_cum, rng.random(len(ts)), released)
    fresh_from = np.maximum(np.searchsorted(w.item_release, ts - FRESH_WINDOW, side="left"), w.num_initial_items)
    fresh = (rng.random(len(ts)) < FRESH_SHARE) & (released > fresh_from)
    pick = fresh_from + (rng.random(len(ts)) * (released - fresh_from)).astype(np.int64)
    return np.where(fresh, pick, items)


def _affinity(w: _World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(N,) float64 the user's taste summed over the item's attribute values."""
    return w.user_pref[users[:, None], w.item_attr[items] + w.offsets].sum(axis=1, dtype=np.float64)


def _quality(w: _World, items: np.ndarray) -> np.ndarray:
    return QUALITY_STEP * (w.item_quality[items] - 2.0)


def _positions(rng: np.random.Generator, n: int, last: int) -> np.ndarray:
    return np.minimum(rng.geometric(0.2, n), last).astype(np.int16)


def _observe(rng: np.random.Generator, p: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
    """(N,) float64 Bernoulli(p) labels; 0 where ``given`` (the parent label) is 0."""
    y = (rng.random(len(p)) < p).astype(np.float64)
    return y if given is None else y * given


def _ecommerce(w: _World, users: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> _Rows:
    """Click -> add_to_cart -> purchase in the full space; on sponsored rows the click is the ad click."""
    n = len(users)
    items = _draw_items(w, ts, rng)
    position = _positions(rng, n, 20)
    is_ad = (rng.random(n) < 0.2).astype(np.int8)
    discount = np.where(rng.random(n) < 0.3, np.round(rng.uniform(0.05, 0.5, n), 2), 0.0).astype(np.float32)
    aff, q, seg = _affinity(w, users, items), _quality(w, items), w.user_segment[users]
    organic = -1.4 + aff + q + w.item_pop[items] - 0.06 * (position - 1)
    p_ad = _sigmoid(organic + w.segment_params["ad_shift"][seg])
    p_click = np.where(is_ad == 1, p_ad, _sigmoid(organic))
    price = w.item_attr[items, w.attrs.index("price")] / (len(w.vocab[w.attrs.index("price")]) - 1) * 2 - 1
    price_term = w.segment_params["price_sensitivity"][seg] * price
    p_cart = _sigmoid(-1.6 + 0.3 * aff + 0.4 * q + price_term + 1.5 * discount)  # given click
    p_buy = _sigmoid(-0.9 + 0.2 * aff + 0.3 * q + price_term + 2.5 * discount)  # given add_to_cart
    click = _observe(rng, p_click)
    cart = _observe(rng, p_cart, click)
    buy = _observe(rng, p_buy, cart)
    return _Rows(
        items,
        {"position": position, "is_ad": is_ad, "discount": discount},
        {"click": click, "add_to_cart": cart, "purchase": buy, "ad_click": np.where(is_ad == 1, click, np.nan)},
        {"click": p_click, "add_to_cart": p_click * p_cart, "purchase": p_click * p_cart * p_buy, "ad_click": p_ad},
    )


def _social(w: _World, users: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> _Rows:
    """Open a post (click), then like / follow its creator / share it; friends' engagement lifts like and share."""
    n = len(users)
    items = _draw_items(w, ts, rng)
    position = _positions(rng, n, 30)
    friends = np.clip(rng.beta(0.7, 6.0, n) * np.exp(w.item_pop[items]), 0.0, 1.0).astype(np.float32)
    aff, q, seg = _affinity(w, users, items), _quality(w, items), w.user_segment[users]
    creator = w.user_pref[users, w.item_attr[items, w.attrs.index("creator")] + w.attr_slice("creator").start]
    tone_vocab = w.vocab[w.attrs.index("tone")]
    share_boost = np.array([w.spec["share_boost"][t] for t in tone_vocab])[w.item_attr[items, w.attrs.index("tone")]]
    p_click = _sigmoid(-1.2 + aff + q + w.item_pop[items] - 0.04 * (position - 1) + 0.8 * friends)
    p_like = _sigmoid(-1.6 + 0.3 * aff + 0.6 * q + 1.8 * friends)
    p_follow = _sigmoid(-2.6 + 1.0 * creator + 0.4 * q + w.segment_params["follow_propensity"][seg])
    p_share = _sigmoid(-2.4 + share_boost + 0.3 * aff + 2.5 * friends)
    click = _observe(rng, p_click)
    labels = {"click": click}
    labels |= {k: _observe(rng, p, click) for k, p in (("like", p_like), ("follow", p_follow), ("share", p_share))}
    truth = {"click": p_click, "like": p_click * p_like, "follow": p_click * p_follow, "share": p_click * p_share}
    return _Rows(items, {"position": position, "friend_engagement": friends}, labels, truth)


def _search(w: _World, users: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> _Rows:
    """A query per row; the engine retrieves candidates (half by the query's category, half by popularity)
    and shows one, favouring relevant ones; relevance (share of the query's attributes matched) drives the click."""
    assert w.queries is not None
    n, k = len(users), SEARCH_CANDIDATES
    seg = w.user_segment[users]
    u = rng.random(n)
    query = np.zeros(n, np.int64)
    for s in range(NUM_SEGMENTS):
        query[seg == s] = _draw(w.queries.cum[s], u[seg == s])
    candidates = _draw_items(w, np.repeat(ts, k), rng).reshape(n, k)
    asked = w.queries.attr[query]  # (N, A)
    u = rng.random((n, k // 2))
    for value, (items, cum) in enumerate(w.queries.index):  # half the candidates: retrieved by the query's value
        rows = np.flatnonzero(asked[:, w.queries.index_attr] == value)
        released = np.searchsorted(w.item_release[items], ts[rows], side="right")[:, None]
        rows, released = rows[released[:, 0] > 0], released[released[:, 0] > 0]
        candidates[rows, : k // 2] = items[_draw(cum, u[rows], released)]
    hits = sum(
        (w.item_attr[candidates, a] == asked[:, a, None]) & (asked[:, a, None] >= 0) for a in range(len(w.attrs))
    )
    relevance_all = hits / (asked >= 0).sum(axis=1, keepdims=True)  # (N, K) share of the query's attributes matched
    shown = np.argmax(2.0 * relevance_all + rng.gumbel(size=(n, k)), axis=1)
    items, relevance = candidates[np.arange(n), shown], relevance_all[np.arange(n), shown]
    position = rng.integers(1, 11, n).astype(np.int16)
    aff, q = _affinity(w, users, items), _quality(w, items)
    p_click = _sigmoid(-2.3 + 2.5 * relevance + 0.6 * aff + q + w.item_pop[items] - 0.12 * (position - 1))
    dwell_mean = np.exp(0.3 + 0.25 * aff + 0.8 * q + 0.5 * relevance)  # minutes
    click = _observe(rng, p_click)
    dwell = np.where(click == 1, rng.gamma(DWELL_SHAPE, dwell_mean / DWELL_SHAPE), np.nan)
    return _Rows(
        items,
        {"position": position},
        {"click": click, "dwell_time": dwell},
        {"click": p_click, "dwell_time": dwell_mean},
        context=query,
    )


_SIMULATORS: dict[str, Callable[[_World, np.ndarray, np.ndarray, np.random.Generator], _Rows]] = {
    "ecommerce": _ecommerce,
    "social": _social,
    "search": _search,
}


def _simulate_block(w: _World, block: int) -> tuple[np.ndarray, np.ndarray, _Rows]:
    """(users (N,) int64 indexes, timestamps (N,) int64, rows) of rows ``block * BLOCK_ROWS`` onwards."""
    rng = np.random.default_rng([w.seed, SCENARIOS.index(w.scenario), 1, block])
    rows = np.arange(block * BLOCK_ROWS, min((block + 1) * BLOCK_ROWS, w.num_rows))
    ts = _timestamps(rows, w.num_rows)
    users = _draw(w.activity_cum, rng.random(len(rows)))
    return users, ts, _SIMULATORS[w.scenario](w, users, ts, rng)


# ---------------------------------------------------------------------------------------- writing


def _block_tables(
    w: _World, block: int, tasks: list[TaskSpec], boundaries: tuple[float, float], seen: np.ndarray
) -> tuple[pa.Table, pa.Table]:
    """(interactions, ground truth) of one block. ``seen`` (I,) bool marks items met in the train split so far.

    Rows are in time order, so all train rows come before any valid or test row: once a block's train
    rows are marked, an item is cold exactly when :func:`mtrec.data.splits.mark_cold_items` calls it cold.
    """
    users, ts, rows = _simulate_block(w, block)
    split = assign_split(ts, *boundaries)
    seen[rows.items[split == "train"]] = True
    cols = {
        "user_id": pa.array(users + 1, pa.int64()),
        "item_id": pa.array(rows.items + 1, pa.int64()),
        "timestamp": pa.array(ts, pa.int64()),
    }
    if rows.context is not None and w.queries is not None:
        cols["context"] = pc.take(w.queries.text, pa.array(rows.context))
    cols |= {name: pa.array(v) for name, v in rows.features.items()}
    for t in tasks:
        y = rows.labels[t.name]
        dtype = np.int8 if t.kind == "binary" else np.float32
        cols[t.label] = pa.array(np.nan_to_num(y).astype(dtype), mask=np.isnan(y))
    cols["split"] = pa.array(split, pa.string())
    cols["cold_item"] = pa.array(~seen[rows.items])
    truth = pa.table({f"p_{t.name}": pa.array(rows.truth[t.name].astype(np.float32)) for t in tasks})
    return pa.table(cols), truth


def _chunks(num_rows: int, chunk_rows: int) -> list[range]:
    """Blocks of each row group; a last row group shorter than a block joins the one before it."""
    num_blocks, per = -(-num_rows // BLOCK_ROWS), chunk_rows // BLOCK_ROWS
    chunks = [range(b, min(b + per, num_blocks)) for b in range(0, num_blocks, per)]
    if len(chunks) > 1 and num_rows - chunks[-1].start * BLOCK_ROWS < BLOCK_ROWS:
        last = chunks.pop()
        chunks[-1] = range(chunks[-1].start, last.stop)
    return chunks


def _write_rows(
    w: _World, tasks: list[TaskSpec], tmp: Path, shown: Path, chunk_rows: int, items: pa.Table, users: pa.Table
) -> None:
    """Stream interactions and ground truth, one row group per chunk, checking each chunk before writing it.

    Each chunk goes through the data contract's interaction checks (types, labels, split values, ids
    present in items and users); the per-file ones (items, users, tasks) ran before. A chunk always
    has at least one block of rows, so "no observed label" is as strict per chunk as per file.
    """
    cfg = DataConfig()
    boundaries = split_boundaries(_Schedule(w.num_rows), cfg.valid_fraction, cfg.test_fraction, presorted=True)
    seen = np.zeros(len(w.item_attr), bool)
    file = str(shown / INTERACTIONS)
    with contextlib.ExitStack() as stack:
        writers: list[pq.ParquetWriter] = []
        for blocks in _chunks(w.num_rows, chunk_rows):
            parts = [_block_tables(w, b, tasks, boundaries, seen) for b in blocks]
            inter, truth = pa.concat_tables([p[0] for p in parts]), pa.concat_tables([p[1] for p in parts])
            problems = check_interactions(inter, file, tasks)
            problems += check_foreign_ids(inter, items, "item_id", file, str(shown / ITEMS))
            problems += check_foreign_ids(inter, users, "user_id", file, str(shown / USERS))
            if problems:
                first, last = blocks.start * BLOCK_ROWS, blocks.start * BLOCK_ROWS + inter.num_rows - 1
                raise DataError(
                    [Problem(p.file, p.column, p.rows, f"{p.message} in rows {first:,}-{last:,}") for p in problems]
                )
            if not writers:
                writers = [
                    stack.enter_context(pq.ParquetWriter(tmp / f, t.schema))
                    for f, t in ((INTERACTIONS, inter), (GROUND_TRUTH, truth))
                ]
            writers[0].write_table(inter, row_group_size=inter.num_rows)
            writers[1].write_table(truth, row_group_size=truth.num_rows)


def generate(
    scenario: str,
    out: str | Path,
    num_users: int = 2000,
    num_items: int = 1000,
    num_interactions: int = 100_000,
    seed: int = 0,
    chunk_rows: int = CHUNK_ROWS,
    force: bool = False,
) -> Path:
    """Write scenario ``scenario`` to ``out`` (atomically); the same arguments give byte-identical files.

    ``chunk_rows`` (a multiple of :data:`BLOCK_ROWS`) is the Parquet row-group size; it changes the
    file layout, never the content. ``out`` and ``force`` as in :func:`mtrec.data.contract.write_dataset`.
    """
    check_output(out, force)
    for name, value in (("num_users", num_users), ("num_items", num_items), ("num_interactions", num_interactions)):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    if chunk_rows < BLOCK_ROWS or chunk_rows % BLOCK_ROWS:
        raise ConfigError(f"chunk_rows={chunk_rows}: must be a positive multiple of {BLOCK_ROWS}")
    w = _build_world(scenario, num_users, num_items, num_interactions, seed)
    tasks = [TaskSpec(**t) for t in w.spec["tasks"]]
    shown = Path(out)
    with atomic_dir(shown, keep_foreign=True) as tmp:
        items, users, latent = _entity_tables(w)
        for f, table in ((ITEMS, items), (USERS, users), (ITEM_LATENT, latent)):
            pq.write_table(table, tmp / f)
        write_tasks(tasks, tmp)
        problems = task_problems(tasks, str(shown / TASKS))
        problems += check_entity(items, str(shown / ITEMS), "item_id", text_required=True)
        problems += check_entity(users, str(shown / USERS), "user_id", text_required=False)
        if problems:
            raise DataError(problems)
        _write_rows(w, tasks, tmp, shown, chunk_rows, items, users)
        manifest = {
            "scenario": scenario,
            "num_users": num_users,
            "num_items": num_items,
            "num_interactions": num_interactions,
            "seed": seed,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return shown


# ---------------------------------------------------------------------------------------- oracle


def _row_groups(f: pq.ParquetFile) -> list[int]:
    return [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]


def oracle_metrics(data_dir: str | Path, split: str = "test") -> dict[str, dict[str, float]]:
    """Metrics of the true probabilities (means) against the drawn labels of ``split``: the best achievable.

    Computed by :func:`mtrec.metrics.task_metrics` with the user as the ranking group, as training
    reports a model's, so the keys match (auc, logloss, cold_auc, ndcg@10, hr@10 per binary task; rmse,
    mae, cold_rmse per regression task). Reads one row group at a time and keeps only the split's rows.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    root = Path(data_dir)
    tasks = read_tasks(root)
    inter, truth = pq.ParquetFile(root / INTERACTIONS), pq.ParquetFile(root / GROUND_TRUTH)
    if _row_groups(inter) != _row_groups(truth):
        message = f"row groups {_row_groups(truth)} do not line up with {_row_groups(inter)} of {root / INTERACTIONS}"
        raise DataError([Problem(str(root / GROUND_TRUTH), None, truth.metadata.num_rows, message)])
    labels, preds, cold, users = [], [], [], []
    for g in range(inter.num_row_groups):
        rows = inter.read_row_group(g, columns=["user_id", "split", "cold_item", *(t.label for t in tasks)])
        keep = pc.equal(rows.column("split"), split)
        rows, p = rows.filter(keep), truth.read_row_group(g, columns=[f"p_{t.name}" for t in tasks]).filter(keep)
        labels.append(
            np.stack([pc.cast(rows.column(t.label), pa.float64()).to_numpy(zero_copy_only=False) for t in tasks], 1)
        )
        preds.append(np.stack([p.column(f"p_{t.name}").to_numpy().astype(np.float64) for t in tasks], 1))
        cold.append(rows.column("cold_item").to_numpy(zero_copy_only=False))
        users.append(rows.column("user_id").to_numpy())
    return task_metrics(
        tasks, np.concatenate(labels), np.concatenate(preds), cold=np.concatenate(cold), groups=np.concatenate(users)
    )
