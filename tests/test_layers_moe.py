"""Tests of jaxlin.layers.mlp.SwiGLU and jaxlin.layers.moe.MoE, from the spec.

swiglu(x)   = (silu(x W_gate) * (x W_up)) W_down
router      l = x W_r;  p = softmax(l)
            softmax_topk: (w, e) = top_k(p);  topk_softmax: w = softmax(top_k(l))
moe(x)      = sum_j w_j swiglu_{e_j}(x) + g(x) swiglu_shared(x),  g = sigmoid(x w_g) or 1
balance     = coef * E * sum_e f_e P_e, f_e = #assignments/(N k), P_e = mean_n p_e
z-loss      = coef * mean_n logsumexp(l_n)^2
capacity    C = ceil(cf N k / E); an expert keeps its first C assignments in token order

The references are float64 numpy loops over tokens; tiny shapes (D=16, E<=8, k=2, N=10).
Legend: B batch, T time, N = B*T, D width, E experts, k top_k, F expert width.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import MoE, SwiGLU, expert_capacity, moe_param_counts

D, F, K_TOP = 16, 8, 2
RTOL, ATOL_REL = 1e-5, 1e-5   # float32 layer vs float64 numpy, atol relative to max|expected|


def _silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _np_swiglu(x: np.ndarray, wg: np.ndarray, wu: np.ndarray, wd: np.ndarray) -> np.ndarray:
  return (_silu(x @ wg) * (x @ wu)) @ wd


def _f64(p: Any) -> np.ndarray:
  return np.asarray(p[...], np.float64)


def _np_route(logits: np.ndarray, k: int, scoring: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-token (experts [N, k], weights [N, k]) by sorting in numpy, best first."""
  probs = _softmax(logits)
  experts, weights = [], []
  for n in range(logits.shape[0]):
    if scoring == "softmax_topk":
      idx = np.argsort(-probs[n])[:k]
      w = probs[n, idx]
    else:
      idx = np.argsort(-logits[n])[:k]
      w = _softmax(logits[n, idx])
    experts.append(idx)
    weights.append(w)
  return np.array(experts), np.array(weights)


def _np_moe(m: MoE, x: np.ndarray, dropped: frozenset = frozenset()) -> np.ndarray:
  """Token loop: sum over the top-k experts (skipping (token, expert) in `dropped`) + shared."""
  x = np.asarray(x, np.float64).reshape(-1, D)
  experts, weights = _np_route(x @ _f64(m.router), m.top_k, m.scoring)
  wg, wu, wd = _f64(m.w_gate), _f64(m.w_up), _f64(m.w_down)
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for e, w in zip(experts[n], weights[n]):
      if (n, int(e)) not in dropped:
        y[n] += w * _np_swiglu(x[n], wg[e], wu[e], wd[e])
  if m.shared is not None:
    s = _np_swiglu(x, _f64(m.shared.w_gate), _f64(m.shared.w_up), _f64(m.shared.w_down))
    if m.shared_gate_weight is not None:
      s = s / (1.0 + np.exp(-(x @ _f64(m.shared_gate_weight))))
    y += s
  return y


def _close(actual: Any, expected: np.ndarray, name: str = "") -> None:
  a = np.asarray(actual, np.float64)
  assert a.shape == expected.shape, (name, a.shape, expected.shape)
  assert np.all(np.isfinite(a)), name
  np.testing.assert_allclose(a, expected, rtol=RTOL,
                             atol=ATOL_REL * float(np.abs(expected).max()), err_msg=name)


def _x(seed: int, b: int = 2, t: int = 5) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D)), jnp.float32)


def _build(cls: type, *args: Any, seed: int = 0, std: float = 0.3, **kw: Any) -> Any:
  """cls(*args, **kw) with N(0, std^2) parameters drawn by numpy.

  The module is traced abstractly (nnx.eval_shape) and filled from numpy: on the shared
  2-core CPU an eager jax.random draw compiles for seconds per new shape.
  """
  m = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kw))
  rng = np.random.default_rng(seed)
  for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    v.set_value(jnp.asarray(std * rng.standard_normal(v.shape), v.dtype))
  return m


def _moe(seed: int = 0, **kw: Any) -> MoE:
  args: dict[str, Any] = dict(num_experts=4, top_k=K_TOP, expert_hidden_dim=F)
  args.update(kw)
  return _build(MoE, D, seed=seed, **args)


#: the tests' jitted calls compile at XLA backend optimisation level 0 (faster compiles on CPU)
O0 = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _jitted(graphdef: Any, method: str) -> Any:
  def f(state: Any, x: jax.Array) -> Any:
    return getattr(nnx.merge(graphdef, state), method)(x)
  return jax.jit(f, compiler_options=O0)


def _call(m: nnx.Module, x: Any, method: str = "__call__") -> Any:
  """m(x) (or m.method(x)) under jax.jit, compiled once per module configuration."""
  graphdef, state = nnx.split(m)
  return _jitted(graphdef, method)(state, jnp.asarray(x))


def _route(m: MoE, x: Any) -> Any:
  return _call(m, x, "route")


# --------------------------------------------------------------------------------- SwiGLU
def test_swiglu_matches_numpy() -> None:
  mlp = _build(SwiGLU, D, 24)
  assert mlp.w_gate[...].shape == (D, 24) and mlp.w_down[...].shape == (24, D)
  x = _x(1)
  y, aux = _call(mlp, x)
  assert aux == {} and y.dtype == jnp.float32
  expected = _np_swiglu(np.asarray(x, np.float64), _f64(mlp.w_gate), _f64(mlp.w_up),
                        _f64(mlp.w_down))
  _close(y, expected, "swiglu")
  y16, _ = _call(_build(SwiGLU, D, 24, dtype=jnp.bfloat16), x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float64), expected, rtol=0,
                             atol=2e-2 * np.abs(expected).max())


def test_constructor_initialises_with_init_std() -> None:
  """The real rngs path (one jitted construction): N(0, init_std^2), distinct draws."""
  kw = dict(num_experts=4, top_k=2, expert_hidden_dim=32, num_shared_experts=1,
            shared_gate=True, init_std=0.02)

  def make() -> Any:
    return nnx.state(MoE(D, rngs=nnx.Rngs(0), **kw), nnx.Param)

  params = {"/".join(map(str, p)): np.asarray(v[...], np.float64)
            for p, v in nnx.to_flat_state(jax.jit(make, compiler_options=O0)())}
  assert sorted(params) == ["router", "shared/w_down", "shared/w_gate", "shared/w_up",
                            "shared_gate_weight", "w_down", "w_gate", "w_up"]
  for name, p in params.items():
    if p.size >= 512:   # std estimate within ~3% (1 sigma): 15% is > 4 sigma
      assert 0.017 < p.std() < 0.023 and abs(p.mean()) < 0.004, (name, p.std(), p.mean())
  assert not np.allclose(params["w_gate"], params["w_up"])
  assert not np.allclose(params["w_gate"][0], params["w_gate"][1])   # experts differ


# ------------------------------------------------------------------------- dropless vs loop
SHARED = {
    "none": dict(),
    "qwen2_gated": dict(num_shared_experts=1, shared_hidden_dim=12, shared_gate=True),
    "deepseek_plain": dict(num_shared_experts=2),
}


@pytest.mark.parametrize("shared", sorted(SHARED))
@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_dropless_matches_token_loop(scoring: str, shared: str) -> None:
  m = _moe(num_experts=6, scoring=scoring, **SHARED[shared])
  x = _x(2)
  y, aux = _call(m, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert "moe_dropped_fraction" not in aux
  _close(y, _np_moe(m, x).reshape(x.shape), f"{scoring}/{shared}")
  # the routing the layer uses is the numpy one, and the two scorings really differ
  r = _route(m, x)
  experts, weights = _np_route(np.asarray(x, np.float64).reshape(-1, D) @ _f64(m.router),
                               K_TOP, scoring)
  np.testing.assert_array_equal(np.asarray(r.experts), experts)
  _close(r.weights, weights, "weights")
  sums = np.asarray(r.weights).sum(-1)
  if scoring == "topk_softmax":
    np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
  else:
    assert np.all(sums < 0.999), sums   # not renormalised over the k


def test_dropless_uneven_and_empty_groups() -> None:
  """Experts no token picks (group size 0) and one that gets every token."""
  m = _moe(num_experts=5, scoring="topk_softmax")
  router = np.zeros((D, 5), np.float32)
  router[0, 1], router[1, 3], router[2, 2] = 50.0, 20.0, 1.0
  router[3, 0], router[3, 4] = -100.0, -100.0
  m.router[...] = jnp.asarray(router)
  x = np.array(_x(3))
  x[..., 0] = np.abs(x[..., 0]) + 3.0       # expert 1 first for every token
  x[..., 3] = np.abs(x[..., 3]) + 1.0       # experts 0 and 4 last for every token
  x = jnp.asarray(x)
  experts = np.asarray(_route(m, x).experts)
  assert np.all(experts[:, 0] == 1) and not np.any((experts == 0) | (experts == 4))
  assert np.any(experts[:, 1] == 2) and np.any(experts[:, 1] == 3)
  y, _ = _call(m, x)
  _close(y, _np_moe(m, x).reshape(x.shape), "uneven")


# ------------------------------------------------------------------------------ aux losses
@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_aux_losses_match_numpy(scoring: str) -> None:
  m = _moe(num_experts=8, scoring=scoring, aux_loss_coef=0.03, z_loss_coef=0.002)
  x = _x(4)
  _, aux = _call(m, x)
  assert set(aux) == {"moe_load_balance_loss", "moe_z_loss"}
  logits = np.asarray(_route(m, x).logits, np.float64)
  _close(logits, np.asarray(x, np.float64).reshape(-1, D) @ _f64(m.router), "logits")
  experts, _ = _np_route(logits, K_TOP, scoring)
  f = np.array([(experts == e).sum() for e in range(8)]) / experts.size
  assert abs(f.sum() - 1.0) < 1e-12
  p = _softmax(logits).mean(0)
  balance = 0.03 * 8 * np.sum(f * p)
  lse = np.log(np.exp(logits).sum(-1))
  z = 0.002 * np.mean(lse ** 2)
  np.testing.assert_allclose(float(aux["moe_load_balance_loss"]), balance, rtol=1e-5)
  np.testing.assert_allclose(float(aux["moe_z_loss"]), z, rtol=1e-5)
  _, aux0 = _call(_moe(num_experts=8, scoring=scoring), x)
  assert set(aux0) == {"moe_load_balance_loss"}   # no z-loss key when z_loss_coef = 0


def test_balance_loss_is_one_when_uniform() -> None:
  """Zero router: p_e = 1/E; ties pick experts 0..k-1 (f = 1/k there): E * sum f P = 1."""
  m = _moe(num_experts=4, aux_loss_coef=1.0)
  m.router[...] = jnp.zeros((D, 4))
  _, aux = _call(m, _x(5))
  np.testing.assert_allclose(float(aux["moe_load_balance_loss"]), 1.0, rtol=1e-6)


# -------------------------------------------------------------------------------- capacity
# 10 tokens, E=4, k=2, capacity_factor 0.5 -> C = ceil(0.5*10*2/4) = 3. (first, second) choice:
ROUTES = [(0, 1), (0, 2), (1, 0), (0, 3), (2, 1), (1, 3), (3, 2), (0, 2), (3, 1), (2, 3)]
# first come first served in token order: every expert keeps its first 3 tokens
#   e0: t0 t1 t2 | t3 t7    e1: t0 t2 t4 | t5 t8    e2: t1 t4 t6 | t7 t9    e3: t3 t5 t6 | t8 t9
# (a choice-major rule, all first choices before second ones, would keep (3, 0) and drop (2, 0))
DROPPED = frozenset({(3, 0), (7, 0), (5, 1), (8, 1), (7, 2), (9, 2), (8, 3), (9, 3)})


def _routed_inputs(m: MoE) -> jax.Array:
  """x [2, 5, D] (tokens flattened row-major) whose router logits are 10*(1, .5) on ROUTES."""
  router = np.zeros((D, 4), np.float32)
  router[:4, :4] = 10.0 * np.eye(4)
  m.router[...] = jnp.asarray(router)
  x = np.random.default_rng(6).standard_normal((10, D)).astype(np.float32)
  x[:, :4] = 0.0
  for n, (a, b) in enumerate(ROUTES):
    x[n, a], x[n, b] = 1.0, 0.5
  return jnp.asarray(x.reshape(2, 5, D))


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_capacity_drops_exactly_the_late_assignments(scoring: str) -> None:
  m = _moe(scoring=scoring, dispatch="capacity", capacity_factor=0.5)
  x = _routed_inputs(m)
  assert m.capacity(10) == 3
  np.testing.assert_array_equal(np.asarray(_route(m, x).experts), np.array(ROUTES))
  y, aux = _call(m, x)
  assert float(aux["moe_dropped_fraction"]) == pytest.approx(8 / 20, abs=1e-7)
  y = np.asarray(y, np.float64).reshape(10, D)
  _close(y, _np_moe(m, x, DROPPED), "capacity")
  full = np.asarray(_call(_moe_dropless_twin(m), x)[0], np.float64).reshape(10, D)
  for n in (0, 1, 2, 4, 6):           # nothing dropped: same as dropless
    _close(y[n], full[n], f"token {n}")
  np.testing.assert_array_equal(y[7:], 0.0)   # all their assignments dropped
  for n in (3, 5):                    # lost their first choice only
    assert np.abs(y[n] - full[n]).max() > 1e-3


def _moe_dropless_twin(m: MoE) -> MoE:
  """A dropless MoE with the same parameters as m."""
  twin = _moe(scoring=m.scoring, num_experts=m.num_experts)
  nnx.update(twin, nnx.state(m, nnx.Param))
  return twin


def test_capacity_uses_rows_in_order_and_keeps_shared() -> None:
  """The shared expert sees dropped tokens; the priority runs across batch rows in order."""
  m = _moe(dispatch="capacity", capacity_factor=0.5, num_shared_experts=1, shared_gate=True)
  x = _routed_inputs(m)
  y, _ = _call(m, x)
  _close(y, _np_moe(m, x, DROPPED).reshape(x.shape), "capacity+shared")
  assert np.abs(np.asarray(y)[1, 2:]).min() > 0   # tokens 7..9: shared contribution only
  # batch rows swapped: tokens 5..9 now come first. By hand (old token ids), the drops are
  #   e3: t5 t6 t8 | t9 t3   e2: t6 t7 t9 | t1 t4   e1: t5 t8 t0 | t2 t4   e0: t7 t0 t1 | t2 t3
  swapped_old = {(9, 3), (3, 3), (1, 2), (4, 2), (2, 1), (4, 1), (2, 0), (3, 0)}
  assert swapped_old != set(DROPPED)
  drops = frozenset((t - 5 if t >= 5 else t + 5, e) for t, e in swapped_old)   # new ids
  assert drops == _fcfs_drops([ROUTES[(n + 5) % 10] for n in range(10)])
  y2, aux2 = _call(m, x[::-1])
  _close(y2, _np_moe(m, x[::-1], drops).reshape(x.shape), "rows swapped")
  assert float(aux2["moe_dropped_fraction"]) == pytest.approx(8 / 20, abs=1e-7)


def _fcfs_drops(routes: list[tuple[int, int]], capacity: int = 3) -> set[tuple[int, int]]:
  """(token, expert) pairs beyond each expert's capacity, tokens in list order."""
  seen: dict[int, int] = {}
  drops = set()
  for n, choice in enumerate(routes):
    for e in choice:
      seen[e] = seen.get(e, 0) + 1
      if seen[e] > capacity:
        drops.add((n, e))
  return drops


def test_fcfs_helper_reproduces_the_hand_list() -> None:
  assert _fcfs_drops(ROUTES) == set(DROPPED)


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_capacity_large_enough_equals_dropless(scoring: str) -> None:
  kw = dict(num_experts=8, scoring=scoring, num_shared_experts=1)
  dense, capped = _moe(**kw), _moe(dispatch="capacity", capacity_factor=4.0, **kw)
  assert capped.capacity(10) == 10
  x = _x(7)
  y0, aux0 = _call(dense, x)
  y1, aux1 = _call(capped, x)
  assert float(aux1["moe_dropped_fraction"]) == 0.0
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-6, atol=1e-6)
  assert float(aux1["moe_load_balance_loss"]) == float(aux0["moe_load_balance_loss"])


def test_expert_capacity_values() -> None:
  assert expert_capacity(10, 4, 2, 1.25) == 7         # ceil(6.25)
  assert expert_capacity(10, 2, 1, 1.1) == 6          # ceil(5.5)
  assert expert_capacity(10, 1, 1, 1.1) == 10         # 11 capped at N = 10
  assert expert_capacity(20, 2, 1, 1.1) == 11         # exactly 11, not 12 from rounding
  assert expert_capacity(3, 64, 8, 0.01) == 1


# ------------------------------------------------------------------------------- gradients
def _grads(m: MoE, x: jax.Array) -> dict[str, np.ndarray]:
  """d/d(params) of sum(y * w) + the aux losses, w fixed random."""
  w = jnp.asarray(np.random.default_rng(8).standard_normal(x.shape), jnp.float32)
  graphdef, params = nnx.split(m)

  def loss(params: Any) -> jax.Array:
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y.astype(jnp.float32) * w) + sum(v for k, v in aux.items()
                                                   if k.endswith("_loss"))

  g = jax.jit(jax.grad(loss), compiler_options=O0)(params)
  return {"/".join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.to_flat_state(g)}


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_router_and_experts(dispatch: str) -> None:
  m = _moe(dispatch=dispatch, capacity_factor=0.5, num_shared_experts=1, shared_gate=True,
           z_loss_coef=1e-3)
  x = _routed_inputs(m) + 0.1 * _x(9)   # drops in the capacity path, no ties
  grads = _grads(m, x)
  assert set(grads) == {"router", "w_gate", "w_up", "w_down", "shared_gate_weight",
                        "shared/w_gate", "shared/w_up", "shared/w_down"}
  for name, g in grads.items():
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 1e-6, name
  for e in range(4):   # every expert receives tokens here
    assert np.abs(grads["w_down"][e]).max() > 1e-6, e


def test_gradients_capacity_equal_dropless_without_drops() -> None:
  kw = dict(num_experts=4, z_loss_coef=1e-2)
  x = _x(10)
  g0 = _grads(_moe(**kw), x)
  g1 = _grads(_moe(dispatch="capacity", capacity_factor=2.0, **kw), x)
  assert set(g0) == set(g1)
  for name in g0:
    np.testing.assert_allclose(g1[name], g0[name], rtol=1e-5,
                               atol=1e-6 * np.abs(g0[name]).max(), err_msg=name)


# ------------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_bf16_compute(dispatch: str) -> None:
  kw = dict(num_experts=6, dispatch=dispatch, capacity_factor=3.0, num_shared_experts=1,
            shared_gate=True, z_loss_coef=1e-3)
  x = _x(11)
  m32, m16 = _moe(**kw), _moe(dtype=jnp.bfloat16, **kw)
  y32, aux32 = _call(m32, x)
  y16, aux16 = _call(m16, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16 and y16.shape == x.shape
  # the router runs in float32: same routing as float32 on the bf16-rounded input
  r = _route(m16, x.astype(jnp.bfloat16))
  assert r.logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(r.experts), np.asarray(_route(m32, x).experts))
  ref = np.asarray(y32, np.float64)   # bf16 has an 8-bit mantissa: ~1% of the output scale
  np.testing.assert_allclose(np.asarray(y16, np.float64), ref, rtol=0,
                             atol=2e-2 * np.abs(ref).max())
  np.testing.assert_allclose(float(aux16["moe_load_balance_loss"]),
                             float(aux32["moe_load_balance_loss"]), rtol=1e-2)
  mp = _moe(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kw)
  assert mp.w_gate[...].dtype == jnp.bfloat16
  yp, _ = _call(mp, x)
  assert yp.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(yp, np.float32)))


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kw, pieces", [
    (dict(top_k=5), ["top_k", "5", "num_experts=4"]),
    (dict(top_k=0), ["top_k", "0", "[1, num_experts=4]"]),
    (dict(scoring="softmax"), ["scoring", "'softmax'", "softmax_topk", "topk_softmax"]),
    (dict(dispatch="dense"), ["dispatch", "'dense'", "dropless", "capacity"]),
    (dict(capacity_factor=0.0), ["capacity_factor", "0.0", "> 0"]),
    (dict(capacity_factor=-1.0), ["capacity_factor", "-1.0", "> 0"]),
    (dict(num_experts=0, top_k=1), ["num_experts", "0", ">= 1"]),
    (dict(shared_gate=True), ["shared_gate", "num_shared_experts"]),
    (dict(num_shared_experts=-1), ["num_shared_experts", "-1", ">= 0"]),
    (dict(aux_loss_coef=-0.1), ["aux_loss_coef", "-0.1", ">= 0"]),
])
def test_config_errors(kw: dict[str, Any], pieces: list[str]) -> None:
  with pytest.raises(ValueError) as err:
    _moe(**kw)
  for piece in pieces:
    assert piece in str(err.value), (piece, str(err.value))


def test_input_width_error() -> None:
  with pytest.raises(ValueError, match=r"x: got shape \(2, 5, 8\).*d_model = 16"):
    _moe()(jnp.zeros((2, 5, 8)))


# -------------------------------------------------------------------------- parameter counts
def _count(module_fn: Any) -> int:
  abstract = nnx.eval_shape(module_fn)   # shapes only, nothing allocated
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("kw", [
    dict(d_model=16, num_experts=4, top_k=2, expert_hidden_dim=8),
    dict(d_model=16, num_experts=6, top_k=2, expert_hidden_dim=8, num_shared_experts=2,
         shared_hidden_dim=12, shared_gate=True),
    dict(d_model=1024, num_experts=64, top_k=8, expert_hidden_dim=896),    # A0.3B-2B
    dict(d_model=2048, num_experts=64, top_k=8, expert_hidden_dim=1024),   # A1B-7B
])
def test_param_counts_match_eval_shape(kw: dict[str, Any]) -> None:
  counts = moe_param_counts(**kw)
  kw = dict(kw)
  d_model = kw.pop("d_model")
  assert counts.total == _count(lambda: MoE(d_model, rngs=nnx.Rngs(0), **kw))
  per_expert = 3 * d_model * kw["expert_hidden_dim"]
  routed_total = kw["num_experts"] * per_expert
  assert counts.total - counts.active == routed_total - kw["top_k"] * per_expert
  if d_model == 1024:
    assert counts == (1024 * 64 + 64 * 3 * 1024 * 896, 1024 * 64 + 8 * 3 * 1024 * 896)
