"""Ali-CCP and AliExpress loaders on the real torch-rechub samples, and bad sources."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from shared_data import shared_data

from mtrec.data.alibaba import convert_ali_ccp, convert_aliexpress
from mtrec.data.contract import read_tasks, validate
from mtrec.errors import DataError


def _frames(root: Path):
    return tuple(
        pq.read_table(root / f).to_pandas() for f in ("interactions.parquet", "items.parquet", "users.parquet")
    )


def test_ali_ccp_sample(tmp_path: Path) -> None:
    out = convert_ali_ccp(shared_data("ali-ccp-sample"), tmp_path / "ccp")
    assert validate(out) == []
    inter, items, users = _frames(out)
    assert inter.split.value_counts().to_dict() == {"train": 100, "valid": 50, "test": 50}
    # SOURCE.md rates: train 0.07/0.01, val 0.06/0.02, test 0.04/0.02
    by = inter.groupby("split")[["click", "purchase"]].sum()
    assert (
        by.loc["train"].tolist() == [7, 1] and by.loc["valid"].tolist() == [3, 1] and by.loc["test"].tolist() == [2, 1]
    )
    assert (inter.click[inter.purchase == 1] == 1).all()  # ESMM: purchase implies click
    assert read_tasks(out)[1].depends_on == "click"
    assert inter.timestamp.tolist() == list(range(200))
    assert len(users) == 1 and items.item_id.is_unique and set(inter.item_id) <= set(items.item_id)
    assert dict(zip(items.item_id, items.text))[0] == "item 0, category 1, shop 1, intention node 1, brand 0"
    assert set(inter.context) == {"position 1"} and "D508" in inter and "508" not in inter
    train_items = set(inter.item_id[inter.split == "train"])
    assert (inter.cold_item == ~inter.item_id.isin(train_items)).all()


def test_aliexpress_sample(tmp_path: Path) -> None:
    src = shared_data("aliexpress-sample")
    out = convert_aliexpress(src, tmp_path / "ae")
    assert validate(out) == []
    inter, items, users = _frames(out)
    assert inter.split.value_counts().to_dict() == {"train": 90, "valid": 10, "test": 20}
    assert inter.click.sum() == 70 and inter.conversion.sum() == 4  # 60 + 10 clicks, 2 + 2 conversions
    assert (inter.click[inter.conversion == 1] == 1).all()
    assert len(users) == 51 and sum(c.startswith("numerical_") for c in inter) == 63
    # every row's item is the item-side profile of that row
    raw = pd.concat([pd.read_csv(src / f) for f in ("aliexpress_train_sample.csv", "aliexpress_test_sample.csv")])
    profile = items.set_index("item_id").loc[inter.item_id, [f"categorical_{i}" for i in range(10, 16)]]
    assert (profile.to_numpy() == raw[profile.columns].to_numpy()).all()
    assert dict(zip(items.item_id, items.text))[0].startswith("item profile 0, categorical 10 0,")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _assert_fails(fn, src: Path, out: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as e:
        fn(src, out)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_sources_name_file_and_column(tmp_path: Path) -> None:
    src = _copy(shared_data("ali-ccp-sample"), tmp_path / "src")
    val = src / "ali_ccp_val_sample.csv"
    text = val.read_text()
    val.write_text(text.replace(",205,", ",item,", 1))
    _assert_fails(
        convert_ali_ccp, src, tmp_path / "o1", "ali_ccp_val_sample.csv", "'205'", "required column is missing"
    )
    lines = text.splitlines()
    lines[3] = "x" + lines[3][1:]
    val.write_text("\n".join(lines))
    _assert_fails(convert_ali_ccp, src, tmp_path / "o2", "ali_ccp_val_sample.csv", "'click'", "'x'", "data row 3")
    lines[3] = "0,1" + lines[3][3:]
    val.write_text("\n".join(lines))
    _assert_fails(convert_ali_ccp, src, tmp_path / "o3", "ali_ccp_val_sample.csv", "'purchase'", "click=0")
    val.unlink()
    _assert_fails(convert_ali_ccp, src, tmp_path / "o4", "ali_ccp_val", "missing")


def test_aliexpress_missing_column(tmp_path: Path) -> None:
    src = _copy(shared_data("aliexpress-sample"), tmp_path / "src")
    test = src / "aliexpress_test_sample.csv"
    test.write_text(test.read_text().replace("numerical_63,", "numerical_x,", 1))
    _assert_fails(convert_aliexpress, src, tmp_path / "o", "aliexpress_test_sample.csv", "'numerical_63'")
