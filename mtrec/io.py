"""Writing files so that nothing half-written ever poses as complete, and nothing the user made is lost.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a synced temporary sibling, then a rename; a
  reader sees the old contents or the new.
- :func:`atomic_dir`: build a directory under a temporary sibling name and publish it with one rename
  once the block completes (files and directories fsynced first); on error nothing changes.
- :func:`claim_output`: an output directory the tool may (re)write: absent, empty, or one it wrote before
  (it holds :data:`OUTPUT_MARKER`). Anything else is the user's and is refused unless ``force``.
  :func:`check_output` refuses the same without creating anything, for writers that publish through
  :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from mtrec.errors import MtrecError

OUTPUT_MARKER = ".mtrec-output"  # written into every directory the tool publishes as an output


class OutputError(MtrecError, FileExistsError):
    """An output directory holds files the tool did not write."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a synced temporary sibling and a rename. On failure the
    temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = True, keep_foreign: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; publish it as ``out`` only when the block completes.

    The published directory carries :data:`OUTPUT_MARKER`. On any exception the temporary directory is
    removed and ``out`` is left as it was. An existing ``out`` is replaced by two renames (old aside, new
    in), so ``out`` is absent only between them. With ``keep_foreign``, an ``out`` the tool did not write
    (:func:`is_ours`; the caller was told ``--force``) is not replaced: the new entries are moved into it
    one by one, replacing those of the same names and keeping the rest, and it gets no marker (it stays
    the user's, so writing there again needs ``--force`` again).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).touch()
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_foreign and not is_ours(out):
        (tmp / OUTPUT_MARKER).unlink()
        for entry in tmp.iterdir():
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        fsync_dir(out)
        tmp.rmdir()
        return
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_ours(path: str | Path) -> bool:
    """True when ``path`` is absent, an empty directory, or a directory the tool wrote (its marker)."""
    path = Path(path)
    if not path.exists():
        return True
    return path.is_dir() and ((path / OUTPUT_MARKER).exists() or not any(path.iterdir()))


def check_output(path: str | Path, force: bool = False, flag: str = "--out") -> Path:
    """Raise :class:`OutputError` unless the tool may write ``path`` (see :func:`is_ours`) or ``force``
    is set; the message names the directory and a few of its entries. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file, not a directory")
    if not force and not is_ours(path):
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(
            f"{flag} {path}: the directory holds files ray-mtrec did not write ({shown}); "
            "choose another directory, or pass --force to write there anyway"
        )
    return path


def claim_output(path: str | Path, force: bool = False, flag: str = "--out") -> Path:
    """:func:`check_output`, then create ``path`` and mark it as ours."""
    path = check_output(path, force, flag)
    path.mkdir(parents=True, exist_ok=True)
    (path / OUTPUT_MARKER).touch()
    return path
