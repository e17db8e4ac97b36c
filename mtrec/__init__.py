"""ray-mtrec core: tasks, data contract, language-model encoders, multi-task models, loss weighting,
metrics, fusion and the serving bundle. Pure torch + transformers + pyarrow; never imports ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ray-mtrec")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
