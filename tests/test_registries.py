"""Every registry entry is tested by enumeration: a new family, gate or variant row is
checked here without a new test.

* FAMILIES: the chunked form against the token-by-token reference (o, final state and the
  gradient of every input; T = 37, two packed documents, an initial state); the step form
  token by token against the op; the span summary S_end = M S_start + N against the op run
  from a random S_start.
* GATES: each gate in a row of its own (on the gated family; a scalar gate on the delta
  family too) through LinearAttention and MixtureOfMemories (slow step).
* VARIANTS: each row through LinearAttention, and through MixtureOfMemories as its core
  (slow step).
  A layer check: impl "xla" against impl "reference" with the same weights (y and the
  gradients of x and of every parameter, packed documents), and prefill + token-by-token
  decode from a cache against the full forward.
* A toy gate and a toy row registered at run time give working layers without touching
  library files.

Legend: B batch, T time, H heads, K key dim, V value dim, D model width.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import gates
from jaxlin.layers.linear_attention import (VARIANTS, LinearAttention, Variant,
                                            register_variant)
from jaxlin.layers.mom import MixtureOfMemories
from jaxlin.ops.families import FAMILIES, Family

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
B, T, H, K, V = 2, 37, 2, 8, 6
D, LAYER_T, PREFILL, CHUNK = 16, 11, 6, 16
f32 = jnp.float32


def _close(actual: Any, expected: Any, name: str, rtol: float = 2e-4,
           atol_rel: float = 2e-5) -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_rel * scale, err_msg=name)


# --------------------------------------------------------------------------- families
def _family_inputs(family: Family, per_key: bool, seed: int = 0) -> dict[str, jax.Array]:
  """Random inputs for every input the family takes (gate strength moderate)."""
  keys = iter(jax.random.split(jax.random.key(seed), 12))
  normal = lambda *shape: jax.random.normal(next(keys), shape, f32)
  unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  d = {"q": normal(B, T, H, K), "k": unit(normal(B, T, H, K)), "v": normal(B, T, H, V)}
  gate_shape = (B, T, H, K) if per_key else (B, T, H)
  d["g"] = jax.nn.log_sigmoid(2.0 + normal(*gate_shape)) / 2
  optional = {"beta": lambda: jax.nn.sigmoid(normal(B, T, H)),
              "removal": lambda: 0.5 * jax.nn.sigmoid(normal(B, T, H)),
              "removal_key": lambda: unit(normal(B, T, H, K)),
              "bonus": lambda: 0.5 * normal(H, K)}
  for name in family.token_inputs + family.head_inputs:
    if name in optional:
      d[name] = optional[name]()
  return d


def _family_cases() -> list[tuple[str, bool]]:
  return [(name, per_key) for name, fam in FAMILIES.items()
          for per_key in ((False, True) if fam.per_key_gate else (False,))]


SEGMENTS = jnp.asarray(np.stack([np.ones(T), np.where(np.arange(T) < 20, 3, 4)]), jnp.int32)


@functools.lru_cache(maxsize=None)
def _family_run(name: str, impl: str) -> Callable:
  family = FAMILIES[name]

  def loss(inputs, state, w_o, w_s):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    rest = {n: a for n, a in inputs.items() if n not in "qkv"}
    o, final = family.op(q, k, v, **rest, initial_state=state, segment_ids=SEGMENTS,
                         output_final_state=True, chunk_size=CHUNK, impl=impl)
    return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                 compiler_options=COMPILER_OPTIONS)


@pytest.mark.parametrize("name,per_key", _family_cases())
def test_family_chunked_form_matches_reference(name: str, per_key: bool) -> None:
  family = FAMILIES[name]
  inputs = _family_inputs(family, per_key)
  keys = jax.random.split(jax.random.key(1), 3)
  state = jax.random.normal(keys[0], (B, H, K, V))
  w_o, w_s = jax.random.normal(keys[1], (B, T, H, V)), jax.random.normal(keys[2], (B, H, K, V))
  (_, (o_x, s_x)), (g_x, gs_x) = _family_run(name, "xla")(inputs, state, w_o, w_s)
  (_, (o_r, s_r)), (g_r, gs_r) = _family_run(name, "reference")(inputs, state, w_o, w_s)
  _close(o_x, o_r, f"{name} o")
  _close(s_x, s_r, f"{name} final state")
  _close(gs_x, gs_r, f"{name} d initial_state")
  assert set(g_x) == set(inputs)
  for n in inputs:
    _close(g_x[n], g_r[n], f"{name} d{n}", rtol=1e-3, atol_rel=1e-4)
    assert float(jnp.max(jnp.abs(g_r[n]))) > 0, f"{name}: d{n} is zero"


@pytest.mark.parametrize("name,per_key", _family_cases())
def test_family_step_and_span_summary(name: str, per_key: bool) -> None:
  family = FAMILIES[name]
  inputs = _family_inputs(family, per_key, seed=3)
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
  rest = {n: a for n, a in inputs.items() if n not in "qkv"}
  token = {n: a for n, a in rest.items() if n in family.token_inputs}
  heads = {n: a for n, a in rest.items() if n in family.head_inputs}
  start = jax.random.normal(jax.random.key(4), (B, H, K, V))
  o, final = family.op(q, k, v, **rest, initial_state=start, output_final_state=True,
                       impl="reference")

  def step(state, xs):
    qt, kt, vt, tt = xs
    o_t, state = family.step(qt, kt, vt, **tt, **heads, state=state)
    return state, o_t

  moved = lambda a: jnp.moveaxis(a, 1, 0)
  last, o_steps = jax.lax.scan(step, start, (moved(q), moved(k), moved(v),
                                             jax.tree.map(moved, token)))
  _close(moved(o_steps), o, f"{name} step o")
  _close(last, final, f"{name} step state")

  for segment_ids in (None, SEGMENTS):
    summary = family.span_summary(k, v, **rest, segment_ids=segment_ids, chunk_size=CHUNK)
    _, want = family.op(q, k, v, **rest, initial_state=start, segment_ids=segment_ids,
                        output_final_state=True, impl="reference")
    _close(summary.apply(start), want, f"{name} span summary (documents: "
           f"{segment_ids is not None})", rtol=1e-4, atol_rel=1e-5)
  # the reset: a document starting inside the span makes M = 0 for that row only
  summary = family.span_summary(k, v, **rest, segment_ids=SEGMENTS, chunk_size=CHUNK)
  assert float(jnp.max(jnp.abs(summary.transition[1]))) == 0.0
  assert float(jnp.max(jnp.abs(summary.transition[0]))) > 1e-3


# ----------------------------------------------------------------------------- layers
def _perturb(module: nnx.Module) -> None:
  """Adds 0.1 N(0, 1) to every parameter (zero-initialised parts become active)."""
  params = nnx.state(module, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  nnx.update(module, jax.tree.unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))


def _layer(kind: str, variant: str, impl: str) -> nnx.Module:
  if kind == "linear":
    module = LinearAttention(D, H, variant=variant, chunk_size=CHUNK, impl=impl,
                             rngs=nnx.Rngs(0))
  else:
    module = MixtureOfMemories(D, H, core=variant, num_memories=2, top_k=1, chunk_size=CHUNK,
                               impl=impl, init_std=0.3, rngs=nnx.Rngs(0))
  _perturb(module)
  return module


def check_layer(kind: str, variant: str) -> None:
  """xla vs reference (y, dx, every dparam, packed documents); prefill + decode == forward."""
  x = jax.random.normal(jax.random.key(5), (B, LAYER_T, D))
  seg = jnp.asarray(np.stack([np.ones(LAYER_T), np.where(np.arange(LAYER_T) < 5, 1, 2)]),
                    jnp.int32)
  w = jax.random.normal(jax.random.key(6), (B, LAYER_T, D))
  results = {}
  for impl in ("xla", "reference"):
    graph, params, rest = nnx.split(_layer(kind, variant, impl), nnx.Param, ...)

    def loss(params, x, graph=graph, rest=rest):
      out = nnx.merge(graph, params, rest)(x, segment_ids=seg)
      return jnp.sum(out.y * w) + sum(out.aux.values(), 0.0), out.y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                 compiler_options=COMPILER_OPTIONS)
    results[impl] = fn(params, x)
  (_, y_x), (dp_x, dx_x) = results["xla"]
  (_, y_r), (dp_r, dx_r) = results["reference"]
  label = f"{kind} over {variant}"
  assert bool(jnp.all(jnp.isfinite(y_x))), label
  _close(y_x, y_r, f"{label}: y")
  _close(dx_x, dx_r, f"{label}: dx", rtol=1e-3, atol_rel=1e-4)
  flat_x, flat_r = jax.tree_util.tree_leaves_with_path(dp_x), jax.tree.leaves(dp_r)
  for (path, a), b in zip(flat_x, flat_r):
    _close(a, b, f"{label}: d{jax.tree_util.keystr(path)}", rtol=1e-3, atol_rel=1e-4)

  module = _layer(kind, variant, "xla")
  graph, state = nnx.split(module)

  @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
  def decode_vs_forward(state, x):
    layer = nnx.merge(graph, state)
    full = layer(x).y
    first = layer(x[:, :PREFILL], cache=layer.init_cache(B, LAYER_T))

    def step(cache, x_t):
      out = layer(x_t[:, None], cache=cache)
      return out.cache, out.y[:, 0]

    _, ys = jax.lax.scan(step, first.cache, jnp.moveaxis(x[:, PREFILL:], 1, 0))
    return full, jnp.concatenate([first.y, jnp.moveaxis(ys, 0, 1)], axis=1)

  full, cached = decode_vs_forward(state, x)
  _close(cached, full, f"{label}: prefill + decode vs forward")


def test_every_row_fits_its_family_and_gate() -> None:
  for name, row in VARIANTS.items():
    row.check(name)
  with pytest.raises(ValueError, match=r"bad.family: got 'recurrent'; expected one of "):
    Variant("recurrent", "none", "identity", False, False, True).check("bad")
  with pytest.raises(ValueError, match=r"bad.bonus: got True; expected False"):
    Variant("delta", "none", "identity", False, False, True, bonus=True).check("bad")
  with pytest.raises(ValueError, match=r"gate: got 'lstm'; expected one of \('none', "):
    Variant("gated", "lstm", "identity", False, False, True).check("bad")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_in_linear_attention(variant: str) -> None:
  check_layer("linear", variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_as_a_mom_core(variant: str) -> None:
  check_layer("mom", variant)


def _gate_rows() -> list[tuple[str, str]]:
  """(gate, family) pairs: every gate on the gated family, scalar gates on delta too."""
  return [(gate, family) for gate, spec in gates.GATES.items()
          for family in FAMILIES if not spec.per_key or FAMILIES[family].per_key_gate]


@pytest.mark.slow
@pytest.mark.parametrize("gate,family", _gate_rows())
def test_every_gate(gate: str, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
  name = f"test-{gate}-{family}"
  row = Variant(family, gate, "identity", short_conv=False, output_gate=True, norm=True,
                qk_l2norm=family == "delta")
  monkeypatch.setitem(VARIANTS, name, row)
  row.check(name)
  check_layer("linear", name)
  check_layer("mom", name)


# ---------------------------------------------------------------------- run-time toy
class ToyGate(nnx.Module):
  """A gate from outside the library: g = -softplus(w . x) per head, and its own keys."""

  def __init__(self, context: gates.GateContext) -> None:
    self.num_heads, self.key_dim = context.num_heads, context.key_dim
    self.proj = nnx.Linear(context.d_model, context.num_heads, rngs=context.rngs)
    self.keys = nnx.Linear(context.d_model, context.num_heads * context.key_dim,
                           rngs=context.rngs)

  def __call__(self, x: jax.Array) -> gates.GateOut:
    g = -jax.nn.softplus(self.proj(x).astype(f32))
    keys = jax.nn.sigmoid(self.keys(x).astype(f32))
    return gates.GateOut(g, keys=keys.reshape(*x.shape[:-1], self.num_heads, self.key_dim))


@pytest.fixture
def restored_registries() -> Any:
  """Puts GATES and VARIANTS back as they were after the test (in place: the layers hold
  the same dicts)."""
  saved = [(registry, dict(registry)) for registry in (gates.GATES, VARIANTS)]
  yield
  for registry, content in saved:
    registry.clear()
    registry.update(content)


def test_a_gate_registered_at_run_time(restored_registries: Any) -> None:
  gates.register_gate("toy", gates.GateSpec(ToyGate, gives_keys=True))
  with pytest.raises(ValueError, match=r"gate name: got 'toy'; expected a new name"):
    gates.register_gate("toy", gates.GateSpec(ToyGate))
  row = Variant("delta", "toy", "identity", short_conv=True, output_gate=True, norm=True,
                qk_l2norm=True)
  register_variant("toy_delta", row)
  with pytest.raises(ValueError, match=r"toy_gla.gate: got 'gla'; expected a gate without"):
    register_variant("toy_gla", dataclasses.replace(row, gate="gla"))
  layer = LinearAttention(D, H, variant="toy_delta", rngs=nnx.Rngs(0))
  assert isinstance(layer.gate, ToyGate) and layer.k_proj is None   # keys from the gate
  check_layer("linear", "toy_delta")
  check_layer("mom", "toy_delta")
