"""T5X-style core: partitioning, train state, trainer, checkpoints, optimizers, summaries."""
