"""The platform: build a model from config, train, measure, track and compare."""
