"""jaxlin: linear sequence modeling with Mixture-of-Experts in JAX/Flax.

The recurrence ops live in `jaxlin.ops`; see the README for the feature table.
"""

from jaxlin import xla_cpu_workaround

xla_cpu_workaround.apply()   # before any computation: XLA:CPU reads XLA_FLAGS when it starts

from jaxlin import ops  # noqa: E402  (after the workaround)

__all__ = ["ops"]
__version__ = "0.1.0"

# the model, its configuration and generation; `jaxlin.generate` is the module
# (jaxlin.generate.generate(model, prompt, ...), sample_logits, filter_logits)
from jaxlin import generate
from jaxlin.config import ModelConfig
from jaxlin.model import LanguageModel, count_parameters

__all__ += ["LanguageModel", "ModelConfig", "count_parameters", "generate"]
