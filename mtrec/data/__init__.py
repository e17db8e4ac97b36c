"""Datasets in the contract of :mod:`mtrec.data.contract`: loaders, synthetic scenarios, splits."""
