"""Training infrastructure: a run's pieces built from the config, strategies, global batch, eval-after."""
