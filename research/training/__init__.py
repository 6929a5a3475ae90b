"""The training layer: one run, from a composed config to a finished MLflow run (``run.train``),
and what it is made of: the LightningModule, data, optimiser, converters, strategies, callbacks,
checkpoints and preemption. ``preflight`` is the one check every entry point calls first."""
