"""KuaiRand (Gao et al., CIKM 2022; Kuaishou short-video logs) in the data contract.

Reads every ``log_standard_*.csv`` in the folder (the header the release documents:
``user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,
long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab``).
Tasks: is_click, is_like, is_follow, is_comment, is_forward, long_view (binary). The tab (the app's
page) is the context; the video duration and the random-exposure flag are numeric features. What
the user did after the exposure (play time, stay times, profile entry, is_hate) is left out: it
would leak the labels. ``video_features_basic_*.csv`` and ``user_features_*.csv``, when present,
give item text and side columns and the users table; otherwise the item text comes from the log.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from mtrec.config import TaskSpec
from mtrec.data.contract import write_dataset
from mtrec.data.source import fail, fields_text, find_files, first_rows, parse, parses_as, read_text, require_columns
from mtrec.data.splits import time_split

TASKS = [
    TaskSpec("is_click", "binary", fusion_weight=1.0),
    TaskSpec("long_view", "binary", fusion_weight=1.0),
    TaskSpec("is_like", "binary", fusion_weight=2.0),
    TaskSpec("is_follow", "binary", fusion_weight=2.0),
    TaskSpec("is_comment", "binary", fusion_weight=1.0),
    TaskSpec("is_forward", "binary", fusion_weight=1.0),
]
LOG_COLUMNS = ["user_id", "video_id", "time_ms", "duration_ms", "is_rand", "tab", *(t.label for t in TASKS)]
VIDEO_INT = ("author_id", "music_type")
VIDEO_TEXT = ("video_type", "upload_dt", "upload_type", "tag")
USER_COUNTS = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")  # numeric, not categories


def convert(src: Path, out: Path, seed: int = 0, force: bool = False) -> Path:
    """Convert a KuaiRand ``data`` folder ``src`` into a dataset at ``out``. Deterministic; ``seed``
    is unused."""
    src = Path(src)
    log = pa.concat_tables([_read_log(p) for p in find_files(src, "log_standard_*.csv")])
    log = log.sort_by([("timestamp", "ascending"), ("user_id", "ascending")])
    items = _items(src, first_rows(log.select(["item_id", "duration_s"]), "item_id"))
    users = _users(src, log.column("user_id"))
    inter = time_split(log.drop_columns(["tab"]).append_column("context", _tab_words(log.column("tab"))))
    return write_dataset(out, inter, items, TASKS, users=users, force=force)


def _read_log(path: Path) -> pa.Table:
    raw = read_text(path)
    require_columns(raw, path, LOG_COLUMNS)
    return pa.table(
        {
            "user_id": parse(raw, path, "user_id", "int"),
            "item_id": parse(raw, path, "video_id", "int"),
            "timestamp": pc.divide(parse(raw, path, "time_ms", "int"), 1000),
            **{t.label: parse(raw, path, t.label, "binary") for t in TASKS},
            "duration_s": pc.divide(parse(raw, path, "duration_ms", "float"), 1000.0),
            "is_rand": parse(raw, path, "is_rand", "binary"),
            "tab": parse(raw, path, "tab", "int"),
        }
    )


def _tab_words(tab: pa.ChunkedArray) -> pa.Array:
    return pa.array([f"app tab {t}" for t in tab.to_pylist()], pa.string())


def _items(src: Path, logged: pa.Table) -> pa.Table:
    """One row per logged video: text and side columns from ``video_features_basic_*.csv`` where
    the video is listed there (unknown: -1 / "unknown"), duration from the log."""
    found = sorted(src.glob("video_features_basic_*.csv"))
    if not found:
        text = fields_text(
            [("video", logged.column("item_id")), ("duration in seconds", pc.round(logged.column("duration_s"), 1))]
        )
        return logged.select(["item_id"]).append_column("text", text)
    path = found[0]
    raw = read_text(path)
    feats = pa.table(
        {
            "item_id": parse(raw, path, "video_id", "int"),
            **{c: parse(raw, path, c, "int") for c in VIDEO_INT},
            **{c: raw.column(c) for c in VIDEO_TEXT},
        }
    )
    t = logged.join(first_rows(feats, "item_id"), "item_id", join_type="left outer").sort_by("item_id")
    words = [
        ("video", "item_id"),
        ("by author", "author_id"),
        ("type", "video_type"),
        ("uploaded", "upload_dt"),
        ("upload type", "upload_type"),
        ("tags", "tag"),
        ("music type", "music_type"),
    ]
    text = fields_text(
        [(w, t.column(c)) for w, c in words] + [("duration in seconds", pc.round(t.column("duration_s"), 1))]
    )
    filled = {c: pc.fill_null(t.column(c), -1) for c in VIDEO_INT} | {
        c: pc.fill_null(t.column(c), "unknown") for c in VIDEO_TEXT
    }
    return pa.table({"item_id": t.column("item_id"), "text": text, **filled})


def _users(src: Path, logged: pa.ChunkedArray) -> pa.Table | None:
    """The users table from ``user_features_*.csv`` (every column a side column; counts as floats),
    or None when absent. Logged users missing from it are an error of the source."""
    found = sorted(src.glob("user_features_*.csv"))
    if not found:
        return None
    path = found[0]
    raw = read_text(path)
    cols = {"user_id": parse(raw, path, "user_id", "int")}
    for c in raw.column_names:
        if c in USER_COUNTS:
            cols[c] = parse(raw, path, c, "float")
        elif c != "user_id":
            cols[c] = parse(raw, path, c, "int") if parses_as(raw.column(c), "int") else raw.column(c)
    users = pa.table(cols)
    missing = pc.sum(pc.invert(pc.is_in(pc.unique(logged), value_set=users.column("user_id")))).as_py()
    if missing:
        raise fail(path, "user_id", "users in the log are missing from this file", missing)
    return users
