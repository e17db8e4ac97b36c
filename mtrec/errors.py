"""The project's error types. Each message names what was wrong: file, column, field, value."""


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
