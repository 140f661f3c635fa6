"""Vision Mamba and ShuffleMamba (stochastic layer-wise shuffle) in JAX / Flax NNX.

The model package needs only jax, flax and optax; the training modules import TensorFlow,
tensorflow-datasets, Orbax and ml_collections lazily.
"""

from shufflemamba_jax.ssm import selective_scan
from shufflemamba_jax.slws import layer_shuffle_probabilities, sample_token_permutations
from shufflemamba_jax.variants import VARIANTS, create_model, model_config
from shufflemamba_jax.vim import VisionMamba, VisionMambaConfig

__version__ = "0.1.0"


def load_model(path: str, step: int | None = None, ema: bool = True):
  """Loads a trained or converted model for inference (see `shufflemamba_jax.predict.load_model`)."""
  from shufflemamba_jax import predict  # Lazy: checkpoints need Orbax and ml_collections.
  return predict.load_model(path, step=step, ema=ema)


__all__ = [
    "VARIANTS",
    "VisionMamba",
    "VisionMambaConfig",
    "create_model",
    "load_model",
    "layer_shuffle_probabilities",
    "model_config",
    "sample_token_permutations",
    "selective_scan",
]
