"""Where the real public datasets are, for the loader tests: ``$MTREC_SHARED_DATA`` or the
``shared/data`` folder beside the repository. A clean checkout (CI) has neither: tests skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("MTREC_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")


def shared_data(name: str) -> Path:
    """The folder ``name`` of the shared data; skips the calling test when it is absent."""
    path = ROOT / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MTREC_SHARED_DATA to the shared/data folder)")
    return path
