"""The experiments layer: grids, sweeps and their comparisons and reports, built on
``training.run.train`` and sent out through ``research.launch``."""
