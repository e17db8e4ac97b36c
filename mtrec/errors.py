"""The project's error types, and the one check of names against the valid ones. Each message names
what was wrong: file, column, field, value."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence


class MtrecError(Exception):
    """Base class of every error ray-mtrec raises on purpose."""


class ConfigError(MtrecError, ValueError):
    """A configuration key, type or value is invalid."""


class DataError(MtrecError, ValueError):
    """A dataset breaks the data contract. ``problems`` lists every problem found."""

    def __init__(self, problems: list):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        head = f"{len(lines)} data problem{'s' if len(lines) != 1 else ''}"
        super().__init__(head + ":\n  " + "\n  ".join(lines))


class BundleError(MtrecError, ValueError):
    """A model bundle is missing, corrupt or incompatible."""


def check_names(owner: str, given: Iterable[str], valid: Sequence[str], noun: str = "parameter") -> None:
    """ConfigError ``{owner}: unknown {noun} 'x'; valid {noun}s: a, b`` when ``given`` holds a name
    that ``valid`` lacks (every unknown name is listed, sorted)."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(
            f"{owner}: unknown {noun}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid {noun}s: {', '.join(valid) or '(none)'}"
        )


def check_keyword_params(owner: str, fn: Callable[..., object], params: Iterable[str]) -> None:
    """:func:`check_names` of ``params`` against the keyword-only parameters of ``fn`` (a class's
    ``__init__``). A ``fn`` that takes ``**kwargs`` checks its own names, so nothing is checked here."""
    signature = inspect.signature(fn).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in signature):
        check_names(owner, params, [p.name for p in signature if p.kind is p.KEYWORD_ONLY])
