"""Where a run's arrays live: the mesh of `config.mesh` and the shardings of the train state.

    mesh            jaxlin.parallel.make_mesh(config.mesh): data, fsdp, sequence, expert, tensor
    params          each leaf as jaxlin.parallel.sharding's tables say (FSDP over fsdp, heads and
                    MLP units over tensor, experts over expert; small leaves replicated)
    opt_state       each per-parameter leaf as its parameter; counts replicated
    batch           [B, T] over (data, fsdp, expert) x sequence

`init_state` creates the parameters and optimizer state already sharded (jit with
out_shardings: no full copy on one device), and `jit_train_step` keeps them so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlin import parallel, validation
from jaxlin.ops import lasp2
from jaxlin.config import ModelConfig
from jaxlin.training import steps


@dataclasses.dataclass(frozen=True)
class Placement:
  """The mesh and the shardings of one model + optimizer."""
  mesh: Mesh
  rules: dict[str, tuple[str, ...]]
  params: Any                     # tree of NamedSharding like the parameters
  opt_state: Any                  # tree of NamedSharding like the optimizer state
  batch: NamedSharding
  replicated: NamedSharding
  options: dict[str, Any] = dataclasses.field(default_factory=dict)   # parallel layers' options

  @property
  def state(self) -> steps.TrainState:
    """The shardings of a TrainState."""
    return steps.TrainState(self.replicated, self.params, self.opt_state)

  def describe(self) -> str:
    return " x ".join(f"{a} {n}" for a, n in self.mesh.shape.items() if n > 1) or "one device"


def check_mesh(mesh: Mesh, model_config: ModelConfig, batch_size: int,
               accumulation_steps: int = 1, seq_len: int | None = None) -> None:
  """The mesh must divide the batch (and each micro-batch), the sequence (LASP-2 spans), the
  heads and the experts."""
  sizes = dict(mesh.shape)
  parallel.check_batch(sizes, batch_size)
  if seq_len is not None:
    validation.require(seq_len % sizes["sequence"] == 0, "data.seq_len", seq_len,
                       f"a multiple of mesh.sequence={sizes['sequence']} (one span per shard)")
  parallel.check_batch(sizes, batch_size // max(accumulation_steps, 1),
                       "data.batch_size / train.accumulation_steps")
  for field, value in (("num_heads", model_config.num_heads),
                       ("num_kv_heads", model_config.resolved_num_kv_heads)):
    validation.require(value % sizes["tensor"] == 0, "mesh.tensor", sizes["tensor"],
                       f"a divisor of model.{field}={value}")
  if model_config.moe_every:
    validation.require(model_config.num_experts % sizes["expert"] == 0, "mesh.expert",
                       sizes["expert"], f"a divisor of model.num_experts={model_config.num_experts}")


def make_placement(mesh_config: ml_collections.ConfigDict | None, model_config: ModelConfig,
                   tx: optax.GradientTransformation, *, batch_size: int,
                   accumulation_steps: int = 1, seq_len: int | None = None,
                   devices: list[jax.Device] | None = None) -> Placement:
  """The Placement of `model_config` + `tx` on the mesh of `mesh_config` (None: defaults)."""
  mesh_config = mesh_config if mesh_config is not None else parallel.mesh.default_config()
  mesh = parallel.make_mesh(mesh_config, devices)
  check_mesh(mesh, model_config, batch_size, accumulation_steps, seq_len)
  rules = parallel.parse_rules(mesh_config.get("rules", ""))
  abstract = steps.abstract_params(model_config)[1]
  params = parallel.param_shardings(abstract, mesh, rules)
  opt_state = parallel.opt_state_shardings(tx, abstract, params, mesh)
  collective = lasp2.check_collective(mesh_config.get("sequence_collective", "all_gather"))
  return Placement(mesh, rules, params, opt_state, parallel.batch_sharding(mesh, rules),
                   NamedSharding(mesh, PartitionSpec()), {"sequence_collective": collective})


def abstract_state(placement: Placement, model_config: ModelConfig,
                   tx: optax.GradientTransformation) -> steps.TrainState:
  """The TrainState as ShapeDtypeStructs carrying their shardings: nothing allocated (a
  restore target, or the input of a compile-only memory plan)."""
  abstract = steps.abstract_params(model_config)[1]
  place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return steps.TrainState(
      jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.replicated),
      jax.tree.map(place, abstract, placement.params),
      jax.tree.map(place, jax.eval_shape(tx.init, abstract), placement.opt_state))


def init_state(placement: Placement, model_config: ModelConfig, tx: optax.GradientTransformation,
               seed: int, params: Any | None = None) -> steps.TrainState:
  """A TrainState created sharded: `params` given (e.g. a pretrained checkpoint) are placed,
  else initialised from `seed` directly into their shardings."""
  if params is None:
    params = steps.init_params(model_config, seed, placement.params)[1]
  else:
    params = jax.device_put(params, placement.params)
  opt_state = jax.jit(tx.init, out_shardings=placement.opt_state)(params)
  return steps.TrainState(jax.device_put(jnp.zeros((), jnp.int32), placement.replicated),
                          params, opt_state)


def jit_train_step(placement: Placement, graphdef: Any, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, accumulation_steps: int = 1,
                   trainable: Callable[[Any], Any] | None = None) -> Callable:
  """steps.make_train_step jitted with the state kept in its shardings (donated)."""
  return jax.jit(_on_mesh(placement, steps.make_train_step(
      graphdef, tx, schedule, accumulation_steps, trainable, gradient_shardings=placement.params)),
                 in_shardings=(placement.state, placement.batch),
                 out_shardings=(placement.state, placement.replicated), donate_argnums=(0,))


def _on_mesh(placement: Placement, fn: Callable) -> Callable:
  """fn traced with the model's activation constraints on the placement's mesh."""
  def wrapped(*args: Any) -> Any:
    with parallel.activations_on(placement.mesh, placement.rules, placement.options):
      return fn(*args)
  return wrapped


def jit_eval_step(placement: Placement, graphdef: Any) -> Callable:
  """steps.make_eval_step jitted on the placement (sums replicated)."""
  return jax.jit(_on_mesh(placement, steps.make_eval_step(graphdef)),
                 in_shardings=(placement.params, placement.batch),
                 out_shardings=placement.replicated)
