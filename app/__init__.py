"""The top floor: the ``mtrec`` command, the demo, simulated users and fault injection. Nothing imports it."""
