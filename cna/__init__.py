"""cna: contrastive neuron attribution (arXiv 2605.12290).

Find the few MLP neurons whose activation differs most between a positive and a
negative prompt set, then steer a model by scaling them at inference time.
"""

from cna.errors import CnaError, ConfigError

__all__ = ["CnaError", "ConfigError"]
__version__ = "0.1.0"
