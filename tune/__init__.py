"""Ray Tune glue: search spaces over task weighting, the Tuner driver, the Pareto report."""
