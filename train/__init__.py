"""Ray Train glue: the per-worker loop, the TorchTrainer builder and ``python -m mtrec_train.run``."""
