"""Where every parameter, optimizer state and batch array lives on the mesh (docs/design.md §7).

Two tables, both here:

    PARAM_AXES   parameter path (regex over "blocks/0/mixer/q_proj/kernel") and rank
                 -> logical axis names, one per dimension
    RULES        logical axis name -> mesh axes (a tuple, several axes shard one dimension)

A parameter no PARAM_AXES row names (norm weights, gate vectors, conv taps, per-head scalars:
all small) is replicated; every matrix of the model is named (a test walks the tree). The
`mesh.rules` field overrides RULES ("embed=fsdp+tensor,vocab=" : vocab replicated). A
dimension a rule shards must divide evenly, else an error names the parameter, the mesh field
and the sizes that would divide.

    logical  embed    d_model side of every projection     -> fsdp
             heads    H * D side of q/k/v/o, gate inputs   -> tensor
             mlp      hidden units of SwiGLU / experts     -> tensor
             vocab    the embedding / head vocabulary      -> tensor
             expert   the experts of a MoE layer           -> expert
             batch    the batch of the data                -> data, fsdp, expert
             length   the sequence of the data             -> sequence
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlin import validation
from jaxlin.parallel.mesh import AXES, BATCH_AXES

Logical = tuple[str | None, ...]

RULES: dict[str, tuple[str, ...]] = {
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "batch": BATCH_AXES,
    "length": ("sequence",),
}

_PROJ_IN = r"(q|k|v|g|out_gate)_proj"    # d_model -> heads * head_dim
# (path regex, rank, logical axes); the first row whose regex and rank match wins
PARAM_AXES: tuple[tuple[str, int, Logical], ...] = (
    (r"^embedding$", 2, ("vocab", "embed")),
    (r"^head$", 2, ("embed", "vocab")),
    # attention / linear attention / Liger projections (nnx.Linear or LoRALinear: .../kernel)
    (rf"{_PROJ_IN}(/kernel)?$", 2, ("embed", "heads")),
    (rf"{_PROJ_IN}$", 3, (None, "embed", "heads")),          # MoM: one per memory slot
    (rf"{_PROJ_IN}/bias$", 1, ("heads",)),
    (r"o_proj(/kernel)?$", 2, ("heads", "embed")),
    (rf"{_PROJ_IN}/lora_a$", 2, ("embed", None)),
    (rf"{_PROJ_IN}/lora_b$", 2, (None, "heads")),
    (r"o_proj/lora_a$", 2, ("heads", None)),
    (r"o_proj/lora_b$", 2, (None, "embed")),
    (r"beta_proj(/kernel)?$", 2, ("embed", None)),
    (r"beta_proj$", 3, (None, "embed", None)),
    # MLPs: dense SwiGLU, shared experts, routed experts
    (r"w_(gate|up)$", 2, ("embed", "mlp")),
    (r"w_down$", 2, ("mlp", "embed")),
    (r"w_(gate|up)$", 3, ("expert", "embed", "mlp")),
    (r"w_down$", 3, ("expert", "mlp", "embed")),
    (r"(mlp|mixer)/router$", 2, ("embed", None)),
    (r"shared_gate_weight$", 2, ("embed", None)),
    # gate projections that read d_model (GLA's low-rank down, Mamba2's dt, RWKV6's mixes)
    (r"gates?(/\d+)?/(down|proj)/kernel$", 2, ("embed", None)),
    (r"gates?(/\d+)?/up/kernel$", 2, (None, "heads")),
    (r"shift_mix/down/kernel$", 2, ("embed", None)),
    (r"shift_mix/up$", 3, (None, None, "embed")),
)


def path_name(path: tuple[Any, ...]) -> str:
  """"blocks/0/mixer/q_proj/kernel" of a pure-dict key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def logical_axes(name: str, ndim: int) -> Logical:
  """The logical axes of the parameter `name` of rank `ndim` (all None: replicated)."""
  for pattern, rank, axes in PARAM_AXES:
    if rank == ndim and re.search(pattern, name):
      return axes
  return (None,) * ndim


def parse_rules(overrides: str) -> dict[str, tuple[str, ...]]:
  """RULES with `mesh.rules` ("logical=axis+axis,logical=,...") applied."""
  rules = dict(RULES)
  for item in filter(None, (p.strip() for p in (overrides or "").split(","))):
    logical, sep, axes = item.partition("=")
    validation.require(sep == "=" and logical in RULES, "mesh.rules", overrides,
                       f"'logical=axis+axis' items with logical one of {sorted(RULES)}")
    mesh_axes = tuple(a for a in axes.split("+") if a)
    validation.require(all(a in AXES for a in mesh_axes), "mesh.rules", overrides,
                       f"mesh axes from {AXES}")
    rules[logical] = mesh_axes
  return rules


def _split_axes(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], logical: str | None
                ) -> tuple[str, ...]:
  """The mesh axes (of size > 1) the rules split the logical axis over; () for None."""
  return tuple(a for a in rules.get(logical, ()) if mesh.shape[a] > 1) if logical else ()


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh,
                   rules: Mapping[str, tuple[str, ...]]) -> PartitionSpec:
  """The PartitionSpec of one parameter; a dimension that does not divide stops with an error."""
  spec = []
  for dim, logical in zip(shape, logical_axes(name, len(shape))):
    axes = _split_axes(mesh, rules, logical)
    shards = math.prod(mesh.shape[a] for a in axes)
    if dim % shards:
      fields = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
      divisors = [d for d in range(1, dim + 1) if dim % d == 0]
      validation.fail(fields, shards, f"a divisor of the {logical} dimension {dim} of parameter "
                      f"{name} {tuple(shape)}: one of {divisors[:12]}")
    spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]] | None = None) -> Any:
  """A tree of NamedShardings like `abstract_params` (arrays or ShapeDtypeStructs)."""
  rules = RULES if rules is None else rules
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path_name(path), leaf.shape, mesh,
                                                             rules)), abstract_params)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        shardings: Any, mesh: Mesh) -> Any:
  """The optimizer state's shardings: a leaf under a parameter's path (Adam's mu / nu mirror
  the parameter tree) with that parameter's shape is placed as the parameter; the rest (step
  counts) replicated. Works through masked states (multi_transform's MaskedNode)."""
  by_name = {path_name(path): (leaf.shape, sharding) for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings))}
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    keys = tuple(k for k in path
                 if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)))
    for start in range(len(keys)):   # the parameter path is the end of the state's path
      shape, sharding = by_name.get(path_name(keys[start:]), (None, None))
      if shape is not None:
        return sharding if shape == leaf.shape else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, abstract_params))


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] | None = None
                   ) -> NamedSharding:
  """[B, T] batch arrays: B over the batch axes, T over the sequence axis."""
  rules = RULES if rules is None else rules
  return NamedSharding(mesh, PartitionSpec(rules["batch"], rules["length"] or None))


# ---------------------------------------------------------------- activations inside a step
class _Active(NamedTuple):
  """One `activations_on` context."""
  mesh: Mesh
  rules: Mapping[str, tuple[str, ...]]
  options: Mapping[str, Any]


_ACTIVE: list[_Active] = []


@contextlib.contextmanager
def activations_on(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] | None = None,
                   options: Mapping[str, Any] | None = None) -> Iterator[None]:
  """While tracing inside this context, `constrain` and `map_over_batch` use `mesh`; outside
  it they do nothing (one device, tests, decoding). `options`: how the parallel layers
  communicate (e.g. {"sequence_collective": "ppermute_scan"}, `active_option`)."""
  _ACTIVE.append(_Active(mesh, RULES if rules is None else rules, dict(options or {})))
  try:
    yield
  finally:
    _ACTIVE.pop()


def active_option(name: str, default: Any) -> Any:
  """The innermost `activations_on`'s option `name`, or `default`."""
  return _ACTIVE[-1].options.get(name, default) if _ACTIVE else default


def _mesh_axes(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], logical: str | None,
               dim: int) -> tuple[str, ...]:
  """`_split_axes`, or () when they do not divide `dim` (an activation left unconstrained)."""
  axes = _split_axes(mesh, rules, logical)
  return axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
  """x with its dimensions placed as the logical names say (one name or None per dimension):
  activations stay sharded over the batch, so FSDP gathers weights rather than activations.
  A dimension that does not divide is left unconstrained."""
  if not _ACTIVE:
    return x
  mesh, rules, _ = _ACTIVE[-1]
  spec = [(_mesh_axes(mesh, rules, name, dim) or None) for name, dim in zip(logical, x.shape)]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def mesh_axes(logical: str, dim: int | None = None) -> tuple[str, ...]:
  """The active mesh's axes (of size > 1) the logical axis is split over; () without one, or
  when they do not divide `dim` (where given)."""
  if not _ACTIVE:
    return ()
  if dim is None:
    return _split_axes(_ACTIVE[-1].mesh, _ACTIVE[-1].rules, logical)
  return _mesh_axes(_ACTIVE[-1].mesh, _ACTIVE[-1].rules, logical, dim)


def active_mesh() -> Mesh | None:
  """The mesh of the innermost `activations_on`, or None."""
  return _ACTIVE[-1].mesh if _ACTIVE else None


def map_over_batch(fn: Callable[..., Any], sharded: tuple[Any, ...],
                   whole: tuple[Any, ...], whole_logical: tuple[str | None, ...] = ()) -> Any:
  """fn(*sharded, *whole) run on each batch shard: `sharded` (trees of arrays, leading dim
  the flattened tokens) split over the batch axes, `whole` gathered on every device (FSDP
  all-gathers the weights; `whole_logical` names a leading axis that stays split, e.g. the
  experts); every output's leading dim is split as the inputs'. Data-dependent
  token shuffles (a MoE's sort by expert) stay on their device instead of going global."""
  if not _ACTIVE:
    return fn(*sharded, *whole)
  mesh, rules, _ = _ACTIVE[-1]
  n = jax.tree.leaves(sharded)[0].shape[0]
  axes = _mesh_axes(mesh, rules, "batch", n)
  if not axes:
    return fn(*sharded, *whole)
  rows = PartitionSpec(axes)
  # whole_logical: a leading logical axis per `whole` input it stays split over (the experts)
  leading = [_mesh_axes(mesh, rules, name, w.shape[0]) if name else ()
             for name, w in zip(whole_logical or (None,) * len(whole), whole)]
  specs = tuple(PartitionSpec(a or None) for a in leading)
  return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) * len(sharded) + specs,
                       out_specs=rows, check_vma=False)(*sharded, *whole)
