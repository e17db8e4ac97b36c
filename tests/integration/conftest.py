"""One real local Ray cluster per test session (each TorchTrainer.fit costs ~40 s of start-up here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster; the product keeps token auth on
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    from cluster.ray_env import ensure_ray

    started = ensure_ray(num_cpus=4)
    import ray

    yield ray
    if started:
        ray.shutdown()
