"""MovieLens (GroupLens; Harper & Konstan, ACM TiiS 2015) in the data contract.

Reads the ml-100k layout (``u.data`` tab-separated, ``u.item`` / ``u.user`` pipe-separated) or the
ml-1m layout (``ratings.dat`` / ``movies.dat`` / ``users.dat`` with ``::``), both latin-1. Tasks:

- ``click`` (binary): each observed rating is a click; for each rating one sampled negative, an item
  the user never rated that was already in the catalogue at the rating's time (its first rating is
  no later), with the rating's timestamp;
- ``like`` (binary, depends on click): rating >= 4; 0 on negatives;
- ``rating`` (regression): the 1-5 rating; null on negatives.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.config import TaskSpec
from mtrec.data.contract import write_dataset
from mtrec.data.source import fail, find_file, parse, read_text
from mtrec.data.splits import time_split

TASKS = [
    TaskSpec("click", "binary", fusion_weight=1.0),
    TaskSpec("like", "binary", depends_on="click", fusion_weight=1.0),
    TaskSpec("rating", "regression", fusion_weight=0.2),
]
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# ml-1m README: age is a bucket code, occupation an index into this list.
AGES_1M = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56 or over"}
OCCUPATIONS_1M = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
_YEAR = re.compile(r"\((\d{4})\)")
LIKE_THRESHOLD = 4


def convert(src: Path, out: Path, seed: int = 0, force: bool = False) -> Path:
    """Convert an ml-100k or ml-1m folder ``src`` into a dataset at ``out``; ``seed`` drives the
    negative sampling."""
    src = Path(src)
    if (src / "u.data").is_file() or not (src / "ratings.dat").is_file():
        ratings, items, users = _read_100k(src)
    else:
        ratings, items, users = _read_1m(src)
    inter = time_split(_with_negatives(ratings, np.random.default_rng(seed)))
    return write_dataset(out, inter, items, TASKS, users=users, force=force)


# ---------------------------------------------------------------------------------------- readers


def _ratings(path: Path, names: list[str], delimiter: str) -> pa.Table:
    t = read_text(path, names, delimiter)
    return pa.table({c: parse(t, path, c, "int") for c in ("user_id", "item_id", "timestamp", "rating")})


def _read_100k(src: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    ratings = _ratings(find_file(src, "u.data", "ratings.dat"), ["user_id", "item_id", "rating", "timestamp"], "\t")
    path = find_file(src, "u.item")
    t = read_text(path, ["item_id", "title", "release_date", "video_release_date", "url", *GENRES_100K], "|", "latin-1")
    flags = np.stack([parse(t, path, g, "binary").to_numpy() for g in GENRES_100K], axis=1)
    genres = [[g for g, f in zip(GENRES_100K, row) if f] for row in flags]
    items = _items(
        parse(t, path, "item_id", "int"), t.column("title").to_pylist(), genres, t.column("release_date").to_pylist()
    )

    path = find_file(src, "u.user")
    u = read_text(path, ["user_id", "age", "gender", "occupation", "zip_code"], "|", "latin-1")
    age = parse(u, path, "age", "int").to_pylist()
    users = _users(u, parse(u, path, "user_id", "int"), age, [str(a) for a in age], u.column("occupation").to_pylist())
    return ratings, items, users


def _read_1m(src: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    ratings = _ratings(find_file(src, "ratings.dat"), ["user_id", "item_id", "rating", "timestamp"], "::")
    path = find_file(src, "movies.dat")
    t = read_text(path, ["item_id", "title", "genres"], "::", "latin-1")
    genres = [[g for g in s.split("|") if g] for s in t.column("genres").to_pylist()]
    items = _items(parse(t, path, "item_id", "int"), t.column("title").to_pylist(), genres, [None] * t.num_rows)

    path = find_file(src, "users.dat")
    u = read_text(path, ["user_id", "gender", "age", "occupation", "zip_code"], "::", "latin-1")
    age = parse(u, path, "age", "int").to_pylist()
    occ_code = parse(u, path, "occupation", "int").to_pylist()
    for column, values, known in (("age", age, AGES_1M), ("occupation", occ_code, range(len(OCCUPATIONS_1M)))):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise fail(path, column, f"codes outside the ml-1m README's list (first {unknown[0]})", len(unknown))
    occupation = [OCCUPATIONS_1M[c] for c in occ_code]
    users = _users(u, parse(u, path, "user_id", "int"), age, [AGES_1M[a] for a in age], occupation)
    return ratings, items, users


def _items(ids: pa.Array, titles: list[str], genres: list[list[str]], release: list[str | None]) -> pa.Table:
    """Items with text like "Toy Story (1995). Genres: Animation, Children's, Comedy." and ``year``
    (0 when unknown) and ``genres`` ("A|B") side columns."""
    years, texts = [], []
    for title, gs, date in zip(titles, genres, release):
        in_title = _YEAR.findall(title)
        year = int(in_title[-1]) if in_title else int(date[-4:]) if date and date[-4:].isdigit() else 0
        name = title if in_title or not year else f"{title} ({year})"
        years.append(year)
        texts.append(f"{name}. Genres: {', '.join(gs) or 'unknown'}.")
    return pa.table(
        {
            "item_id": ids,
            "text": pa.array(texts, pa.string()),
            "year": pa.array(years, pa.int64()),
            "genres": pa.array(["|".join(gs) or "unknown" for gs in genres], pa.string()),
        }
    )


def _users(raw: pa.Table, ids: pa.Array, age: list[int], age_words: list[str], occupation: list[str]) -> pa.Table:
    """Users with a short text from demographics ("Age 24, male, occupation: technician.") and
    ``age``, ``gender``, ``occupation``, ``zip_prefix`` (first three characters) side columns."""
    gender = raw.column("gender").to_pylist()
    words = [{"M": "male", "F": "female"}.get(g, "gender unknown") for g in gender]
    return pa.table(
        {
            "user_id": ids,
            "text": pa.array([f"Age {a}, {g}, occupation: {o}." for a, g, o in zip(age_words, words, occupation)]),
            "age": pa.array(age, pa.int64()),
            "gender": pa.array(gender, pa.string()),
            "occupation": pa.array(occupation, pa.string()),
            "zip_prefix": pc.utf8_slice_codeunits(raw.column("zip_code"), 0, 3),
        }
    )


# ---------------------------------------------------------------------------------------- negatives


def sample_negatives(users: np.ndarray, items: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each rating ``(users[r], items[r], ts[r])``, an item the user never rated whose first
    rating is at or before ``ts[r]``, uniformly; -1 where no such item exists.

    Vectorised rejection sampling over the catalogue prefix (items sorted by first rating), then an
    exact pass for the few rows still unresolved (users who rated most of the catalogue at the time).
    """
    item_ids, item_code = np.unique(items, return_inverse=True)
    user_ids, user_code = np.unique(users, return_inverse=True)
    n_items = len(item_ids)
    first = np.full(n_items, np.iinfo(np.int64).max)
    np.minimum.at(first, item_code, ts)
    order = np.argsort(first, kind="stable")
    catalogue = np.searchsorted(first[order], ts, side="right")  # >= 1: the rated item itself is in it
    rated = np.unique(user_code.astype(np.int64) * n_items + item_code)

    def is_rated(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        key = u.astype(np.int64) * n_items + i
        pos = np.minimum(np.searchsorted(rated, key), len(rated) - 1)
        return rated[pos] == key

    neg = np.full(len(ts), -1, dtype=np.int64)
    todo = np.arange(len(ts))
    for _ in range(20):
        cand = order[(rng.random(len(todo)) * catalogue[todo]).astype(np.int64)]
        ok = ~is_rated(user_code[todo], cand)
        neg[todo[ok]] = cand[ok]
        todo = todo[~ok]
        if not len(todo):
            break
    for r in todo:
        pool = order[: catalogue[r]]
        pool = pool[~is_rated(np.full(len(pool), user_code[r]), pool)]
        if len(pool):
            neg[r] = pool[rng.integers(len(pool))]
    return np.where(neg >= 0, item_ids[np.maximum(neg, 0)], -1)


def _with_negatives(ratings: pa.Table, rng: np.random.Generator) -> pa.Table:
    users = ratings.column("user_id").to_numpy()
    ts = ratings.column("timestamp").to_numpy()
    rating = ratings.column("rating").to_numpy()
    neg = sample_negatives(users, ratings.column("item_id").to_numpy(), ts, rng)
    has = neg >= 0
    n, m = len(rating), int(has.sum())
    table = pa.table(
        {
            "user_id": pa.array(np.concatenate([users, users[has]]), pa.int64()),
            "item_id": pa.array(np.concatenate([ratings.column("item_id").to_numpy(), neg[has]]), pa.int64()),
            "timestamp": pa.array(np.concatenate([ts, ts[has]]), pa.int64()),
            "click": pa.array(np.concatenate([np.ones(n), np.zeros(m)]), pa.int8()),
            "like": pa.array(np.concatenate([rating >= LIKE_THRESHOLD, np.zeros(m, bool)]), pa.int8()),
            "rating": pa.array(np.concatenate([rating, np.full(m, np.nan)]), pa.float64(), from_pandas=True),
        }
    )
    return table.sort_by([("timestamp", "ascending"), ("user_id", "ascending"), ("click", "descending")])
