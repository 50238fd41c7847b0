"""jaxlin: linear sequence modeling with Mixture-of-Experts in JAX/Flax.

The recurrence ops live in `jaxlin.ops`; see the README for the feature table.
"""

from jaxlin import ops

__all__ = ["ops"]
__version__ = "0.1.0"
