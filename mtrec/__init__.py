"""ray-mtrec core: tasks, data contract, language-model encoders, multi-task models, loss weighting,
metrics, fusion and the serving bundle. Pure torch + transformers + pyarrow; never imports ray."""

__version__ = "0.1.0"
