"""Where the real public datasets are, for the loader tests: ``$MTREC_SHARED_DATA`` or the
``shared/data`` folder beside the repository. A clean checkout (CI) has neither: tests skip."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("MTREC_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")


def shared_data(name: str) -> Path:
    """The folder ``name`` of the shared data; skips the calling test when it is absent."""
    path = ROOT / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MTREC_SHARED_DATA to the shared/data folder)")
    return path


def assert_fails_cleanly(convert: Callable[[Path, Path], Path], src: Path, out: Path, *fragments: str) -> None:
    """``convert(src, out)`` raises a DataError naming every fragment and leaves no output behind."""
    from mtrec.errors import DataError

    with pytest.raises(DataError) as e:
        convert(src, out)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
