"""The config layer: composing a run's Hydra config (``compose``) and turning it into the model
config, precision and linear factory the trainer needs (``build``)."""
