"""MovieLens loader: real ml-100k facts, negative sampling rules, ml-1m '::' format, bad sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shared_data import assert_fails_cleanly, shared_data

from mtrec.data.contract import read_tasks, validate
from mtrec.data.movielens import convert, sample_negatives
from mtrec.errors import DataError
from mtrec_app.cli import main


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    assert main(["data", "movielens", "--src", str(shared_data("ml-100k")), "--out", str(out)]) == 0
    return out


def _frames(root: Path):
    return tuple(
        pq.read_table(root / f).to_pandas() for f in ("interactions.parquet", "items.parquet", "users.parquet")
    )


def test_ml100k_counts_match_the_release(ml100k: Path) -> None:
    assert validate(ml100k) == []
    inter, items, users = _frames(ml100k)
    pos = inter[inter.click == 1]
    assert len(pos) == 100_000
    assert pos.user_id.nunique() == 943 and len(users) == 943
    assert pos.item_id.nunique() == 1682 and len(items) == 1682
    assert pos.rating.value_counts().sort_index().tolist() == [6110, 11370, 27145, 34174, 21201]  # README counts
    neg = inter[inter.click == 0]
    assert 99_900 <= len(neg) <= 100_000  # only the first ratings, with a tiny catalogue, can lack one
    assert neg.rating.isna().all() and pos.rating.notna().all()
    assert (neg.like == 0).all() and (pos.like == (pos.rating >= 4)).all()
    assert [t.name for t in read_tasks(ml100k)] == ["click", "like", "rating"]
    assert read_tasks(ml100k)[1].depends_on == "click"


def test_ml100k_split_is_by_time_with_cold_items(ml100k: Path) -> None:
    inter, _, _ = _frames(ml100k)
    share = inter.split.value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.8, abs=0.01) and share["test"] == pytest.approx(0.1, abs=0.01)
    assert inter[inter.split == "train"].timestamp.max() <= inter[inter.split == "valid"].timestamp.min()
    train_items = set(inter[inter.split == "train"].item_id)
    assert (inter.cold_item == ~inter.item_id.isin(train_items)).all() and inter.cold_item.any()


def test_ml100k_negatives_are_unrated_items_already_in_the_catalogue(ml100k: Path) -> None:
    inter, _, _ = _frames(ml100k)
    pos, neg = inter[inter.click == 1], inter[inter.click == 0]
    rated = set(zip(pos.user_id, pos.item_id))
    assert not any(pair in rated for pair in zip(neg.user_id, neg.item_id))
    first = pos.groupby("item_id").timestamp.min()
    assert (first.loc[neg.item_id].to_numpy() <= neg.timestamp.to_numpy()).all()
    assert neg.item_id.nunique() > 1000  # uniform over the catalogue, not a few items


def test_ml100k_text_and_side_columns(ml100k: Path) -> None:
    _, items, users = _frames(ml100k)
    text = dict(zip(items.item_id, items.text))
    assert text[1] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert any("Misérables" in t for t in items.text)  # u.item is latin-1
    u1 = users.set_index("user_id").loc[1]
    assert (u1.age, u1.gender, u1.occupation, u1.zip_prefix) == (24, "M", "technician", "857")
    assert u1.text == "Age 24, male, occupation: technician."


def test_sampling_is_deterministic_by_seed(tmp_path: Path) -> None:
    users = np.repeat(np.arange(50), 20)
    rng = np.random.default_rng(0)
    items = np.concatenate([rng.choice(200, 20, replace=False) for _ in range(50)])
    ts = rng.integers(0, 1000, len(users))
    a = sample_negatives(users, items, ts, np.random.default_rng(1))
    assert np.array_equal(a, sample_negatives(users, items, ts, np.random.default_rng(1)))
    assert not np.array_equal(a, sample_negatives(users, items, ts, np.random.default_rng(2)))


def test_sampling_exact_cases() -> None:
    # item 7 first appears at t=1, item 8 at t=2, item 9 at t=5. User 0 rates 7 and 8; user 1 rates 9.
    users, items, ts = np.array([0, 0, 1]), np.array([7, 8, 9]), np.array([1, 2, 5])
    neg = sample_negatives(users, items, ts, np.random.default_rng(0))
    # user 0 rated every item in the catalogue at t=1 and t=2 (item 9 came later); user 1 can get 7 or 8
    assert neg[0] == -1 and neg[1] == -1 and neg[2] in (7, 8)


ML1M = {
    "ratings.dat": "1::10::5::100\n1::20::3::200\n2::10::4::150\n2::30::2::300\n3::20::1::250\n3::10::4::400\n",
    "movies.dat": "10::Misérables, Les (1995)::Drama|Musical\n20::Toy Story (1995)::Animation|Children's|Comedy\n"
    "30::Heat (1995)::Action|Crime|Thriller\n40::Never Rated (1999)::Drama\n",
    "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-1234\n",
}


def _write_ml1m(root: Path, files: dict[str, str] = ML1M) -> Path:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_bytes(text.encode("latin-1"))
    return root


def test_ml1m_double_colon_format(tmp_path: Path) -> None:
    out = convert(_write_ml1m(tmp_path / "ml-1m"), tmp_path / "out", seed=3)
    assert validate(out) == []
    inter, items, users = _frames(out)
    assert (inter.click == 1).sum() == 6 and len(items) == 4 and len(users) == 3
    text = dict(zip(items.item_id, items.text))
    assert text[10] == "Misérables, Les (1995). Genres: Drama, Musical."
    assert dict(zip(items.item_id, items.year))[40] == 1999
    u = users.set_index("user_id")
    assert u.loc[1].text == "Age under 18, female, occupation: K-12 student."
    assert (u.loc[2].age, u.loc[2].occupation, u.loc[3].zip_prefix) == (56, "self-employed", "551")
    neg = inter[inter.click == 0]
    rated = set(zip(inter[inter.click == 1].user_id, inter[inter.click == 1].item_id))
    assert not any(pair in rated for pair in zip(neg.user_id, neg.item_id))
    assert 40 not in set(neg.item_id)  # never rated: never in the catalogue


def _assert_fails(src: Path, out: Path, *fragments: str) -> None:
    assert_fails_cleanly(convert, src, out, *fragments)


def test_bad_sources_name_file_and_column(tmp_path: Path) -> None:
    bad = dict(ML1M, **{"ratings.dat": ML1M["ratings.dat"] + "4::10::five::500\n"})
    _assert_fails(_write_ml1m(tmp_path / "garbage", bad), tmp_path / "o1", "ratings.dat", "'rating'", "'five'", "1 row")
    missing = {k: v for k, v in ML1M.items() if k != "movies.dat"}
    _assert_fails(_write_ml1m(tmp_path / "missing", missing), tmp_path / "o2", "movies.dat", "missing")
    ragged = dict(ML1M, **{"users.dat": "1::F::1::10\n"})
    _assert_fails(_write_ml1m(tmp_path / "ragged", ragged), tmp_path / "o3", "users.dat", "Expected 5 columns")
    code = dict(ML1M, **{"users.dat": ML1M["users.dat"].replace("1::F::1::10", "1::F::7::10")})
    _assert_fails(_write_ml1m(tmp_path / "code", code), tmp_path / "o4", "users.dat", "'age'", "first 7")
    _assert_fails(tmp_path / "nowhere", tmp_path / "o5", "nowhere", "does not exist")


def test_failure_keeps_a_previous_dataset(tmp_path: Path) -> None:
    src = _write_ml1m(tmp_path / "ml-1m")
    out = convert(src, tmp_path / "out")
    before = (out / "interactions.parquet").read_bytes()
    (src / "ratings.dat").write_text("1::10::x::100\n")
    with pytest.raises(DataError):
        convert(src, out)
    assert (out / "interactions.parquet").read_bytes() == before
