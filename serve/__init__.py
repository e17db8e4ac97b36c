"""Ray Serve glue: ``build_app``, the Ingress, Embedder, TaskHeads and the WeightController."""
