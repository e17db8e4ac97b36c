"""Cluster operations: local Ray up/down, Prometheus configuration, job submission, the demo."""
