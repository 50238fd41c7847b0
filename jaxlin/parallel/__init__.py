"""Device meshes and shardings: `mesh` (the config's mesh group -> jax Mesh), `sharding` (the
logical axis names of every parameter and the one rules table). docs/design.md §7."""

from jaxlin.parallel.mesh import AXES, BATCH_AXES, axis_sizes, check_batch, make_mesh
from jaxlin.parallel.sharding import (PARAM_AXES, RULES, batch_sharding, logical_axes,
                                      opt_state_shardings, param_shardings, parse_rules)

__all__ = ["AXES", "BATCH_AXES", "PARAM_AXES", "RULES", "axis_sizes", "batch_sharding",
           "check_batch", "logical_axes", "make_mesh", "opt_state_shardings",
           "param_shardings", "parse_rules"]
