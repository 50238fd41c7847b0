"""jaxlin: linear sequence modeling with Mixture-of-Experts in JAX/Flax.

The recurrence ops live in `jaxlin.ops`; see the README for the feature table.
"""

from jaxlin import ops

__all__ = ["ops"]
__version__ = "0.1.0"

# the model, its configuration and generation; `jaxlin.generate` is the module
# (jaxlin.generate.generate(model, prompt, ...), sample_logits, filter_logits)
from jaxlin import generate
from jaxlin.config import ModelConfig
from jaxlin.model import LanguageModel, count_parameters

__all__ += ["LanguageModel", "ModelConfig", "count_parameters", "generate"]
