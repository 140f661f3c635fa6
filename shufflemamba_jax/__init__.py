"""Vision Mamba and ShuffleMamba (stochastic layer-wise shuffle) in JAX / Flax NNX.

Layers, each a subpackage: `models` (needs only jax, flax and numpy) and `parallel` at the
bottom; `data` (tf.data over TFDS), `weights` (checkpoints, PyTorch import and export) and
`training` on top of them; the command-line entry points (`main`, `predict`, `convert`,
`prepare`, `benchmark`, `ablation`) above everything, imported by nothing.
"""

from shufflemamba_jax.models import (
  VARIANTS,
  SettingError,
  VisionMamba,
  VisionMambaConfig,
  create_model,
  layer_shuffle_probabilities,
  model_config,
  sample_token_permutations,
  selective_scan,
)

__version__ = "0.1.0"


def load_model(path: str, step: int | str | None = None, ema: bool = True) -> VisionMamba:
  """The model saved at `path` (a training workdir or converted weights); see `weights.load_model`."""
  from shufflemamba_jax import weights  # Lazy: reading checkpoints needs Orbax.

  return weights.load_model(path, step=step, ema=ema)


__all__ = [
  "VARIANTS",
  "SettingError",
  "VisionMamba",
  "VisionMambaConfig",
  "create_model",
  "layer_shuffle_probabilities",
  "load_model",
  "model_config",
  "sample_token_permutations",
  "selective_scan",
]
