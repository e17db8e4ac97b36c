"""The help text of every ``mtrec`` command: defaults shown, and plain words where docstrings say more.

Each command's parser passes ``formatter_class=HelpFormatter``. Descriptions often come from a module
docstring's first line, whose reStructuredText markup (````mtrec train````, ``:func:`x```) would show
literally in a terminal; it is removed here, once, for every parser.
"""

from __future__ import annotations

import argparse
import re

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`name`, :class:`~pkg.Name` -> name, pkg.Name
_LITERAL = re.compile(r"``([^`]+)``")  # ``text`` -> text


def plain(text: str) -> str:
    """``text`` without reStructuredText roles and literal quotes."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus ``(default: X)`` after an option's help where X says something (not
    None, False or empty, and the help does not already name its default), and :func:`plain` text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        shown = not any(default is v for v in (None, False, argparse.SUPPRESS)) and default not in ([], "")
        if shown and action.option_strings and "default" not in help_:
            help_ += " (default: %(default)s)"
        return help_

    def format_help(self) -> str:
        return plain(super().format_help())
