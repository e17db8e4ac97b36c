"""Ray Train glue: the per-worker loop, the TorchTrainer builder and ``python -m train.run``."""
