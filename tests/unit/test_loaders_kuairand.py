"""KuaiRand loader on a made-up fixture that keeps the release's real file headers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from shared_data import assert_fails_cleanly

from mtrec.data.contract import read_tasks, validate
from mtrec.data.kuairand import convert

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand"
LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
    "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab"
)  # as documented in the KuaiRand README (chongminggao/KuaiRand)


def _logs() -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in sorted(FIXTURE.glob("log_standard_*.csv"))])


def test_fixture_keeps_the_real_header() -> None:
    for p in FIXTURE.glob("log_standard_*.csv"):
        assert p.read_text().splitlines()[0] == LOG_HEADER


def test_convert_fixture(tmp_path: Path) -> None:
    out = convert(FIXTURE, tmp_path / "kr")
    assert validate(out) == []
    inter = pq.read_table(out / "interactions.parquet").to_pandas()
    items = pq.read_table(out / "items.parquet").to_pandas().set_index("item_id")
    users = pq.read_table(out / "users.parquet").to_pandas().set_index("user_id")
    logs = _logs()
    tasks = ["is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward"]
    assert [t.name for t in read_tasks(out)] == tasks
    assert len(inter) == len(logs) == 50 and (inter[tasks].sum() == logs[tasks].sum()).all()
    assert sorted(inter.timestamp) == sorted(logs.time_ms // 1000) and inter.timestamp.is_monotonic_increasing
    assert not {"play_time_ms", "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_hate"} & set(inter)
    assert set(inter.context) <= {"app tab 0", "app tab 1", "app tab 2"} and inter.duration_s.max() < 200
    assert items.loc[10].text == (
        "video 10, by author 402, type NORMAL, uploaded 2022-03-20, upload type PictureSet, tags 3,21, "
        "music type 0, duration in seconds 113"
    )
    assert items.loc[18].author_id == -1 and items.loc[18].video_type == "unknown"  # not in video features
    assert items.loc[18].text.startswith("video 18, duration in seconds")
    assert users.loc[3].user_active_degree == "UNKNOWN" and users.loc[3].fans_user_num == 9.0
    schema = pq.read_schema(out / "users.parquet")
    assert schema.field("onehot_feat3").type == "int64" and schema.field("follow_user_num_range").type == "string"


def test_without_feature_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for p in FIXTURE.glob("log_standard_*.csv"):
        shutil.copyfile(p, src / p.name)
    out = convert(src, tmp_path / "kr")
    assert validate(out) == [] and not (out / "users.parquet").exists()
    items = pq.read_table(out / "items.parquet").to_pandas()
    assert items.text.str.match(r"^video \d+, duration in seconds \d+").all()


def _assert_fails(src: Path, out: Path, *fragments: str) -> None:
    assert_fails_cleanly(convert, src, out, *fragments)


def test_bad_sources_name_file_and_column(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    log = src / "log_standard_4_22_to_5_08_pure.csv"
    good = log.read_text()
    log.write_text(good.replace(",is_like,", ",is_liked,", 1))
    _assert_fails(src, tmp_path / "o1", log.name, "'is_like'", "required column is missing")
    lines = good.splitlines()
    lines[2] = lines[2][: lines[2].rindex(",")] + ",tab9"
    log.write_text("\n".join(lines))
    _assert_fails(src, tmp_path / "o2", log.name, "'tab'", "'tab9'", "data row 2")
    log.write_text(good)
    users = src / "user_features_pure.csv"
    users.write_text("\n".join(users.read_text().splitlines()[:-1]))  # drop user 3
    _assert_fails(src, tmp_path / "o3", users.name, "'user_id'", "missing from this file")
    _assert_fails(tmp_path / "empty", tmp_path / "o4", "empty")
    (tmp_path / "empty").mkdir()
    _assert_fails(tmp_path / "empty", tmp_path / "o5", "log_standard_*.csv", "no file matches")
