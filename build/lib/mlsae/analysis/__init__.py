"""Analyses of a trained MLSAE; each module runs as `python -m mlsae.analysis.<name>`."""
