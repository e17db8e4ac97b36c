"""The Ray environment every glue package shares: starting or joining Ray, local Ray up/down, Prometheus, job submission."""
