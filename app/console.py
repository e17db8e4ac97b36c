"""A quiet terminal for a long command: its own lines on the terminal, everything else in a log file.

Ray, Serve, Tune, Ray Data and the libraries under them write to the process's stdout and stderr (and
so do Ray's worker processes, whose output the driver relays). :func:`quiet_terminal` points file
descriptors 1 and 2 at a log file for the length of a block, so all of that lands there, and hands
the block a :class:`Console` that writes to a duplicate of the terminal's stdout taken before. The
duplicate is not inherited: processes started in the block (Ray's) never hold the terminal.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

BAR_WIDTH = 24
REDRAW_S = 1.0  # a live bar's elapsed time ticks at this period


class Console:
    """Lines for the user, and at most one live progress bar under them.

    On a terminal (``tty``) the bar is one line redrawn in place with ``\\r``; elsewhere (a pipe, a
    file, CI) there is no bar, only the lines, so that a log holds each line once.
    """

    def __init__(self, stream: TextIO, tty: bool, name: str) -> None:
        self._stream = stream
        self.tty = tty
        self._name = name
        self._lock = threading.RLock()
        self._bar: Bar | None = None  # the live bar (on a terminal only)

    def say(self, msg: str) -> None:
        """A stage line: ``[name HH:MM:SS] msg``."""
        self.line(f"[{self._name} {time.strftime('%H:%M:%S')}] {msg}")

    def line(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._stream.write("\r\033[K")  # the bar's line becomes this line; the bar is redrawn below
            self._stream.write(text + "\n")
            if self._bar is not None:
                self._stream.write(self._bar.render())
            self._stream.flush()

    def draw(self, bar: Bar) -> None:
        """Redraw ``bar`` in place when it is the live one."""
        with self._lock:
            if self._bar is bar:
                self._stream.write("\r\033[K" + bar.render())
                self._stream.flush()

    @contextmanager
    def bar(self, label: str, total: int, unit: str) -> Iterator[Bar]:
        """A bar for the block: live on a terminal (its elapsed time ticking), erased when the block ends."""
        bar = Bar(self, label, total, unit)
        if not self.tty:
            yield bar
            return
        with self._lock:
            self._bar = bar
        self.draw(bar)
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(bar, stop), daemon=True)
        ticker.start()
        try:
            yield bar
        finally:
            stop.set()
            ticker.join()
            with self._lock:
                self._bar = None
                self._stream.write("\r\033[K")
                self._stream.flush()

    def _tick(self, bar: Bar, stop: threading.Event) -> None:
        while not stop.wait(REDRAW_S):
            self.draw(bar)


class Bar:
    """``label [#####.......] done/total unit  m:ss``; :meth:`set` and :meth:`advance` move it."""

    def __init__(self, console: Console, label: str, total: int, unit: str) -> None:
        self._console = console
        self._label, self._total, self._unit = label, max(1, total), unit
        self._done = 0
        self._start = time.monotonic()

    def set(self, done: int) -> None:
        self._done = min(max(done, 0), self._total)
        self._console.draw(self)

    def advance(self, n: int = 1) -> None:
        self.set(self._done + n)

    def render(self) -> str:
        filled = BAR_WIDTH * self._done // self._total
        elapsed = int(time.monotonic() - self._start)
        return (
            f"   {self._label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self._done}/{self._total} {self._unit}"
            f"  {elapsed // 60}:{elapsed % 60:02d}"
        )


@contextmanager
def quiet_terminal(log: Path, name: str) -> Iterator[Console]:
    """Within the block, file descriptors 1 and 2 write to ``log`` (appended); the block gets a
    :class:`Console` on the terminal's stdout. Both are restored when the block ends, also on error."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    terminal, saved_err = os.dup(1), os.dup(2)  # not inheritable (PEP 446)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    stream = os.fdopen(os.dup(terminal), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        yield Console(stream, tty=os.isatty(terminal), name=name)
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        stream.close()
        os.dup2(terminal, 1)
        os.dup2(saved_err, 2)
        os.close(terminal)
        os.close(saved_err)
