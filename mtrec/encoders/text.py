"""Item text before it meets a tokenizer: cleaning, and the prompt template around it."""

from __future__ import annotations

import unicodedata

from mtrec.errors import ConfigError, DataError

# Unicode categories removed by cleaning: control, format (zero-width, BOM, bidi marks), surrogate,
# private use. Tabs and newlines are whitespace and become single spaces instead.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
_SHOWN_INDEXES = 10


def clean_text(s: str, max_chars: int = 2000) -> str:
    """NFKC-normalise, drop control characters, collapse whitespace, cap at ``max_chars`` characters.

    May return ``""``; :func:`clean_texts` turns that into an error naming the row.
    """
    s = unicodedata.normalize("NFKC", s)
    s = "".join(
        " " if ch.isspace() else ch for ch in s if ch.isspace() or unicodedata.category(ch) not in _DROPPED_CATEGORIES
    )
    s = " ".join(s.split())
    return s[:max_chars].rstrip()


def clean_texts(texts: list[str], max_chars: int = 2000) -> list[str]:
    """:func:`clean_text` over a list; non-strings and texts empty after cleaning are a DataError
    naming their indexes."""
    out, bad = [], []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            bad.append(f"texts[{i}] is {type(t).__name__} {t!r:.40}, not a string")
            out.append("")
            continue
        c = clean_text(t, max_chars)
        if not c:
            bad.append(f"texts[{i}] is empty after cleaning (raw {t!r:.40})")
        out.append(c)
    if bad:
        more = [f"... and {len(bad) - _SHOWN_INDEXES} more"] if len(bad) > _SHOWN_INDEXES else []
        raise DataError(bad[:_SHOWN_INDEXES] + more)
    return out


def split_prompt(template: str) -> tuple[str, str]:
    """``"Item: {text}\\nIn one word:"`` -> ``("Item: ", "\\nIn one word:")``.

    The template must hold ``{text}`` exactly once; other braces are literal text.
    """
    if template.count("{text}") != 1:
        raise ConfigError(f"encoder.prompt {template!r} must contain '{{text}}' exactly once")
    before, after = template.split("{text}")
    return before, after
