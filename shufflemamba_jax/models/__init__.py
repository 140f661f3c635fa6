"""The model layer: the selective scan, the bidirectional Mamba mixer, SLWS, token layouts, the
Vim backbone and its named variants. Needs only jax, flax and numpy (no TensorFlow, no Orbax)."""

from shufflemamba_jax.checks import SettingError
from shufflemamba_jax.models.slws import layer_shuffle_probabilities, sample_token_permutations
from shufflemamba_jax.models.ssm import selective_scan
from shufflemamba_jax.models.variants import VARIANTS, create_model, model_config
from shufflemamba_jax.models.vim import VisionMamba, VisionMambaConfig

__all__ = [
  "VARIANTS",
  "SettingError",
  "VisionMamba",
  "VisionMambaConfig",
  "create_model",
  "layer_shuffle_probabilities",
  "model_config",
  "sample_token_permutations",
  "selective_scan",
]
