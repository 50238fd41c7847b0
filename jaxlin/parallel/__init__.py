"""Device meshes and shardings: `mesh` (the config's mesh group -> jax Mesh), `sharding` (the
logical axis names of every parameter and the one rules table). docs/design.md §7."""

from jaxlin.parallel.mesh import AXES, BATCH_AXES, axis_sizes, check_batch, make_mesh
from jaxlin.parallel.sharding import (PARAM_AXES, RULES, activations_on, batch_sharding,
                                      constrain, logical_axes, map_over_batch, mesh_axes,
                                      opt_state_shardings, param_shardings, parse_rules)

__all__ = ["AXES", "BATCH_AXES", "PARAM_AXES", "RULES", "activations_on", "axis_sizes",
           "batch_sharding", "check_batch", "constrain", "logical_axes", "make_mesh",
           "map_over_batch", "mesh_axes", "opt_state_shardings", "param_shardings", "parse_rules"]
