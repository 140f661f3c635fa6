"""Weights: the one checkpoint format (Orbax), filling a model by parameter name, and the
official PyTorch weights. Imports the model layer only."""

from shufflemamba_jax.weights.checkpoint import Checkpointer, SavedWeights, load_model, read_weights

__all__ = ["Checkpointer", "SavedWeights", "load_model", "read_weights"]
