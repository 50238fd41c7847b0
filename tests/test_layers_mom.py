"""Tests of jaxlin.layers.mom.MixtureOfMemories (MoM over GLA and Gated DeltaNet), from the spec.

NAIVE masked form (numpy float64, written here): every memory m runs over the FULL sequence on
its own; a token not routed to m has k = v = 0 and g = 0 there (no decay, no write), so it
leaves S^m untouched; the short conv of memory m runs over the stream of tokens routed to m
(no tap across a packed document); then o_t = sum_j w_tj o^{m_tj}_t (+ o^shared_t), per-head
gated RMSNorm, output projection. The module must match it with ONE sorted op call. The
per-token projections (q, per-memory k, v, gates, beta, z) are computed here from the weights
(`projections_np`), and `memory_inputs` is checked against them.

Legend: B batch, T time, D model width, H heads, K = V head dim, M memories, k top_k.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import MixtureOfMemories
from jaxlin.layers.linear_attention import VARIANTS, LinearAttention
from jaxlin.layers.mom import CORES

D, H, T, B = 32, 2, 13, 2
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
RTOL, ATOL_REL = 2e-4, 2e-5     # float32 module vs float64 numpy (atol relative to max|y|)
CONT_RTOL, CONT_ATOL_REL = 1e-4, 1e-5  # prefill/decode vs full forward, both float32


def _module(core: str, *, shared: bool = True, num_memories: int = 3, conv: bool = True,
            impl: str = "reference", seed: int = 0) -> MixtureOfMemories:
  return MixtureOfMemories(D, H, core=core, num_memories=num_memories, top_k=2,
                           shared_memory=shared, use_short_conv=conv, impl=impl,
                           aux_loss_coef=0.01, init_std=0.2, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def _jitted(core: str, shared: bool, num_memories: int, conv: bool,
            impl: str) -> tuple[MixtureOfMemories, Callable[..., Any]]:
  """(module, jitted f(state, x, segment_ids, cache) -> MixerOutput), one per config."""
  module = _module(core, shared=shared, num_memories=num_memories, conv=conv, impl=impl)
  graph, state = nnx.split(module)

  def apply(state: nnx.State, x: jax.Array, segment_ids: jax.Array | None,
            cache: dict | None) -> Any:
    return nnx.merge(graph, state)(x, segment_ids=segment_ids, cache=cache)

  jitted = jax.jit(apply, compiler_options=COMPILER_OPTIONS)
  return module, lambda x, segment_ids=None, cache=None: jitted(state, x, segment_ids, cache)


def _x(seed: int, batch: int = B, time: int = T) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, time, D)).astype(np.float32)


def _close(actual: jax.Array, expected: np.ndarray, rtol: float, atol_rel: float) -> None:
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=atol_rel * np.abs(expected).max())


# ------------------------------------------------------------------------- numpy reference
def _np(a: jax.Array) -> np.ndarray:
  return np.asarray(a, np.float64)


def _silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _route_np(m: MixtureOfMemories, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """softmax(x W_r) [B,T,M]; top-k memories [B,T,k]; weights renormalised over the k."""
  logits = x.astype(np.float64) @ _np(m.router[...])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1)[..., :m.top_k]
  w = np.take_along_axis(p, top, -1)
  return p, top, w / w.sum(-1, keepdims=True)


def _doc_index(segment_ids: np.ndarray | None, batch: int, time: int) -> np.ndarray:
  if segment_ids is None:
    return np.zeros((batch, time), np.int64)
  starts = np.concatenate([np.zeros((batch, 1), bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return np.cumsum(starts, axis=1)


def _stream_conv_np(u: np.ndarray, docs: np.ndarray, w: np.ndarray) -> np.ndarray:
  """silu(sum_lag w[K-1-lag] u[i-lag]) over one memory's stream, no tap across documents."""
  ksize = w.shape[0]
  y = np.zeros_like(u)
  for i in range(len(u)):
    for lag in range(ksize):
      if i - lag >= 0 and docs[i - lag] == docs[i]:
        y[i] += w[ksize - 1 - lag] * u[i - lag]
  return _silu(y)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


def projections_np(m: MixtureOfMemories, x: np.ndarray) -> dict[str, np.ndarray]:
  """The per-token projections from the weights (float64), as the paper writes them:
  q = x W_q (shared), k^m = x W_k^m, v^m = x W_v^m; GLA gate g^m = logsigmoid(x W1^m W2^m +
  b^m) / 16 [.., H, K]; Gated DeltaNet g^m = -exp(A_log^m) softplus(x W_a^m + dt_bias^m) [.., H]
  and beta^m = sigmoid(x W_b^m); z = x W_z (output gate). k, v, g, beta: [B, T, M', ...]."""
  x = x.astype(np.float64)
  batch, time, _ = x.shape
  per_slot = lambda w: np.einsum("btd,mde->btme", x, _np(w))
  out = {"q": x @ _np(m.q_proj[...]), "k": per_slot(m.k_proj[...]),
         "v": per_slot(m.v_proj[...]), "z": x @ _np(m.out_gate_proj[...])}
  gs = []
  for gate in m.gates:
    if m.core == "gla":
      logits = x @ _np(gate.down.kernel[...]) @ _np(gate.up.kernel[...]) + _np(gate.up.bias[...])
      gs.append((_log_sigmoid(logits) / gate.normalizer).reshape(batch, time, m.num_heads, -1))
    else:
      dt = np.logaddexp(0.0, x @ _np(gate.proj.kernel[...]) + _np(gate.dt_bias[...]))
      gs.append(-np.exp(_np(gate.A_log[...])) * dt)
  out["g"] = np.stack(gs, axis=2)
  if m.beta_proj is not None:
    out["beta"] = 1.0 / (1.0 + np.exp(-per_slot(m.beta_proj[...])))
  return out


def naive_mom(m: MixtureOfMemories, x: np.ndarray,
              segment_ids: np.ndarray | None = None) -> np.ndarray:
  """The naive masked form (see the module docstring), float64. x [B,T,D] -> y [B,T,D]."""
  batch, time, _ = x.shape
  heads, hd, mems = m.num_heads, m.head_dim, m.num_memories
  proj = projections_np(m, x)
  _, top, w = _route_np(m, x)
  docs = _doc_index(segment_ids, batch, time)
  gdn = m.core == "gated_deltanet"
  o = np.zeros((batch, time, heads, hd))
  for b in range(batch):
    for mem in range(m.num_slots):
      shared = mem == mems
      routed = np.ones(time, bool) if shared else (top[b] == mem).any(-1)
      weight = np.ones(time) if shared else (w[b] * (top[b] == mem)).sum(-1)
      idx = np.nonzero(routed)[0]
      streams = [proj["q"][b, idx], proj["k"][b, idx, mem], proj["v"][b, idx, mem]]
      if m.use_short_conv:
        convs = (m.q_conv, m.k_conv, m.v_conv)
        streams = [_stream_conv_np(u, docs[b, idx], _np(c.weight[...]))
                   for u, c in zip(streams, convs)]
      elif gdn:
        streams = [_silu(u) for u in streams]
      q = np.zeros((time, heads, hd))
      k, v = np.zeros_like(q), np.zeros_like(q)
      for full, s in zip((q, k, v), streams):
        full[idx] = s.reshape(len(idx), heads, hd)
      if gdn:
        q[idx] /= np.sqrt((q[idx] ** 2).sum(-1, keepdims=True) + 1e-6)
        k[idx] /= np.sqrt((k[idx] ** 2).sum(-1, keepdims=True) + 1e-6)
      g = np.where(routed.reshape((time,) + (1,) * (proj["g"].ndim - 3)), proj["g"][b, :, mem], 0.0)
      beta = np.where(routed[:, None], proj["beta"][b, :, mem], 0.0) if gdn else None
      state = np.zeros((heads, hd, hd))
      for t in range(time):
        if t > 0 and docs[b, t] != docs[b, t - 1]:
          state = np.zeros_like(state)
        for h in range(heads):
          if gdn:
            kk = k[t, h]
            state[h] = np.exp(g[t, h]) * (state[h] - beta[t, h] * np.outer(kk, kk @ state[h]))
            state[h] += beta[t, h] * np.outer(kk, v[t, h])
          else:
            state[h] = np.exp(g[t, h])[:, None] * state[h] + np.outer(k[t, h], v[t, h])
          o[b, t, h] += weight[t] * (hd ** -0.5) * (state[h].T @ q[t, h])
  z = x.astype(np.float64) @ _np(m.out_gate_proj[...])
  z = z.reshape(batch, time, heads, hd)
  normed = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + m.o_norm.eps) * _np(m.o_norm.weight[...])
  out = (normed * _silu(z)).reshape(batch, time, heads * hd)
  return out @ _np(m.o_proj[...])


# ------------------------------------------------------------------------------- tests
EQUIVALENCE_CASES = [  # (core, shared, conv, impl)
    ("gla", True, True, "reference"),
    ("gla", False, True, "xla"),
    ("gla", True, False, "reference"),
    ("gated_deltanet", True, True, "reference"),
    ("gated_deltanet", False, True, "xla"),
    ("gated_deltanet", True, False, "reference"),
]


@pytest.mark.parametrize("core,shared,conv,impl", EQUIVALENCE_CASES,
                         ids=[f"{c}-{'shared' if s else 'noshared'}-{'conv' if v else 'noconv'}-{i}"
                              for c, s, v, i in EQUIVALENCE_CASES])
def test_sorted_single_call_equals_naive_masked_form(core: str, shared: bool, conv: bool,
                                                     impl: str) -> None:
  module, f = _jitted(core, shared, 3, conv, impl)
  x = _x(1)
  out = f(jnp.asarray(x))
  assert out.y.shape == (B, T, D) and out.cache is None
  expected = naive_mom(module, x)
  _close(out.y, expected, RTOL, ATOL_REL)
  # the routing is not degenerate: every memory gets some token in this call
  _, top, _ = _route_np(module, x)
  assert set(np.unique(top)) == set(range(3))


@pytest.mark.parametrize("core", CORES)
def test_memory_inputs_equal_the_weights_projections(core: str) -> None:
  module = _module(core)
  x = _x(3)
  expected = projections_np(module, x)
  got = jax.jit(lambda a: module.memory_inputs(a), compiler_options=COMPILER_OPTIONS)(
      jnp.asarray(x))
  assert set(got) == set(expected) | ({"dt"} if core == "gated_deltanet" else set())
  for name, value in expected.items():
    _close(got[name], value, 1e-5, 1e-6)


@pytest.mark.parametrize("core", CORES)
def test_packed_documents_do_not_leak(core: str) -> None:
  module, f = _jitted(core, True, 3, True, "reference")
  rng = np.random.default_rng(2)
  a, b, c = (rng.normal(size=(n, D)).astype(np.float32) for n in (6, 7, 6))
  # row 0 packs [A | B]; row 1 packs [B | C]: B must give the same output in both places
  x = np.stack([np.concatenate([a, b]), np.concatenate([b, c])])
  seg = np.array([[1] * 6 + [2] * 7, [5] * 7 + [3] * 6], np.int32)
  y = np.asarray(f(jnp.asarray(x), segment_ids=jnp.asarray(seg)).y)
  _close(y, naive_mom(module, x, seg), RTOL, ATOL_REL)
  _close(y[0, 6:], y[1, :7], CONT_RTOL, CONT_ATOL_REL)
  # changing document A (and so its routing) leaves B untouched
  x2 = x.copy()
  x2[0, :6] = rng.normal(size=(6, D))
  y2 = np.asarray(f(jnp.asarray(x2), segment_ids=jnp.asarray(seg)).y)
  assert np.abs(y2[0, :6] - y[0, :6]).max() > 1e-3
  _close(y2[0, 6:], y[0, 6:], CONT_RTOL, CONT_ATOL_REL)
  # without segment ids, B does see A
  y3 = np.asarray(f(jnp.asarray(x)).y)
  assert np.abs(y3[0, 6:] - y[0, 6:]).max() > 1e-3


@pytest.mark.parametrize("core", CORES)
def test_causal_through_gradients(core: str) -> None:
  module, _ = _jitted(core, True, 3, True, "reference")
  graph, state = nnx.split(module)
  t0 = 6
  r = jnp.asarray(np.random.default_rng(3).normal(size=(B, D)).astype(np.float32))

  def probe(x: jax.Array) -> jax.Array:
    return jnp.sum(nnx.merge(graph, state)(x).y[:, t0] * r)

  grad = np.asarray(jax.jit(jax.grad(probe), compiler_options=COMPILER_OPTIONS)(
      jnp.asarray(_x(4))))
  norms = np.abs(grad).sum(-1)                       # [B, T]
  assert np.all(norms[:, t0 + 1:] == 0.0), norms
  assert np.all(norms[:, :t0 + 1] > 1e-6), norms      # the shared memory sees every token


@pytest.mark.parametrize("core", CORES)
def test_prefill_and_decode_equal_full_forward(core: str) -> None:
  module, f = _jitted(core, True, 3, True, "reference")
  x = jnp.asarray(_x(5))
  full = np.asarray(f(x).y)
  cache = module.init_cache(B, T)
  assert cache["state"].shape == (B, 4, H, D // H, D // H)
  assert cache["conv_k"].shape == (B, 4, 3, D)

  # prefill 4 on the empty cache; prefill 4 more from the NON-empty cache (T > 1 with
  # per-memory initial states); then decode token by token
  first = f(x[:, :4], cache=cache)
  second = f(x[:, 4:8], cache=first.cache)
  assert np.abs(np.asarray(second.cache["state"]) - np.asarray(first.cache["state"])).max() > 0
  _close(first.y, full[:, :4], CONT_RTOL, CONT_ATOL_REL)
  ys, c = [first.y, second.y], second.cache
  for t in range(8, T):
    out = f(x[:, t:t + 1], cache=c)
    ys.append(out.y)
    c = out.cache
  _close(jnp.concatenate(ys, axis=1), full, CONT_RTOL, CONT_ATOL_REL)


@pytest.mark.parametrize("core", CORES)
def test_xla_without_shared_memory_decodes_like_the_full_forward(core: str) -> None:
  """The cache path with the chunked op and no shared memory (a token routed nowhere else
  leaves every other memory's state as it was)."""
  module, f = _jitted(core, False, 3, True, "xla")
  x = jnp.asarray(_x(11))
  full = np.asarray(f(x).y)
  _close(full, naive_mom(module, np.asarray(x)), RTOL, ATOL_REL)
  first = f(x[:, :5], cache=module.init_cache(B, T))
  ys, cache = [first.y], first.cache
  for t in range(5, T):
    out = f(x[:, t:t + 1], cache=cache)
    ys.append(out.y)
    cache = out.cache
  _close(jnp.concatenate(ys, axis=1), full, CONT_RTOL, CONT_ATOL_REL)


def test_load_balance_loss_matches_numpy() -> None:
  module, f = _jitted("gla", True, 3, True, "reference")
  x = _x(1)
  aux = f(jnp.asarray(x)).aux
  assert set(aux) == {"mom_load_balance_loss"}
  p, top, _ = _route_np(module, x)
  counts = np.zeros(3)
  for mem in top.reshape(-1):
    counts[mem] += 1
  f_m = counts / top.size                      # fraction of the B*T*k assignments
  p_m = p.reshape(-1, 3).mean(0)               # mean router probability
  expected = 0.01 * 3 * np.sum(f_m * p_m)
  np.testing.assert_allclose(float(aux["mom_load_balance_loss"]), expected, rtol=1e-5)
  assert abs(expected - 0.01) > 1e-5           # not trivially balanced


@pytest.mark.parametrize("kwargs,match", [
    (dict(core="mamba"), r"core: got 'mamba'; expected one of \('bla', .*'gla', .*'gated_deltanet'"),
    (dict(core="gla", num_memories=3, top_k=4), r"top_k: got 4; expected an int in \[1, num_memories=3\]"),
    (dict(core="gla", top_k=0), r"top_k: got 0"),
    (dict(core="gla", num_memories=0), r"num_memories: got 0; expected an int >= 1"),
    (dict(core="gated_deltanet", aux_loss_coef=-1.0), r"aux_loss_coef: got -1.0"),
    (dict(core="gla", impl="cuda"), r"impl: got 'cuda'"),
    (dict(core="gla", chunk_size=10), r"chunk_size: got 10"),
])
def test_config_errors(kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    MixtureOfMemories(D, H, rngs=nnx.Rngs(0), **kwargs)


def test_call_errors() -> None:
  with pytest.raises(ValueError, match=r"num_heads: got 5; expected a divisor of d_model=32"):
    MixtureOfMemories(D, 5, core="gla", rngs=nnx.Rngs(0))
  module = _module("gla", num_memories=2)
  with pytest.raises(ValueError, match=r"x: got shape \(2, 3, 16\)"):
    module(jnp.zeros((2, 3, 16)))
  with pytest.raises(ValueError, match=r"segment_ids: got an array with a cache; expected None"):
    module(jnp.zeros((2, 3, D)), segment_ids=jnp.zeros((2, 3), jnp.int32),
           cache=module.init_cache(2, 3))
  with pytest.raises(ValueError, match=r"segment_ids: got shape \(2, 4\)"):
    module(jnp.zeros((2, 3, D)), segment_ids=jnp.zeros((2, 4), jnp.int32))


# ------------------------------------------------------ one memory = the core layer itself
def _perturb(module: nnx.Module, seed: int) -> None:
  """Adds 0.1 N(0, 1) to every parameter (zero-initialised parts become active)."""
  params = nnx.state(module, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(module, jax.tree.unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))


def _copy_core_into_mom(layer: LinearAttention, mom: MixtureOfMemories) -> None:
  """Puts the core layer's weights into a one-memory MoM (linear in the weights, so it maps
  gradients as well): projections (memory axis of size 1), the joint conv (and its bias)
  split into the q / k / v convs, the gate, beta, the feature maps, the variant's extras and the output."""
  slot = lambda a: a[...][None]
  mom.q_proj[...] = layer.q_proj.kernel[...]
  mom.v_proj[...] = slot(layer.v_proj.kernel)
  if layer.k_proj is not None:
    mom.k_proj[...] = slot(layer.k_proj.kernel)
  if layer.conv is not None:
    convs = [mom.q_conv] + ([mom.k_conv] if layer.k_proj is not None else []) + [mom.v_conv]
    start = 0
    for conv in convs:
      conv.weight[...] = layer.conv.weight[...][:, start:start + conv.channels]
      if layer.conv.bias is not None:   # Mamba2's conv bias
        conv.bias[...] = layer.conv.bias[...][start:start + conv.channels]
      start += conv.channels
  if layer.gate_conv is not None:
    mom.gate_conv.weight[...] = layer.gate_conv.weight[...]
  if layer.beta_proj is not None:
    mom.beta_proj[...] = slot(layer.beta_proj.kernel)
  pairs = [(mom.gates[0], layer.gate), (mom.q_map, layer.q_map), (mom.k_map, layer.k_map),
           (mom.shift_mix, layer.shift_mix)]
  for target, source in pairs:
    if source is not None:
      nnx.update(target, nnx.state(source, nnx.Param))
  for name in ("removal_logit", "correction", "bonus", "skip"):
    if getattr(layer, name) is not None:
      getattr(mom, name)[...] = getattr(layer, name)[...]
  if layer.g_proj is not None:
    mom.out_gate_proj[...] = layer.g_proj.kernel[...]
  if layer.norm is not None:
    mom.o_norm.weight[...] = layer.norm.weight[...]
  mom.o_proj[...] = layer.o_proj.kernel[...]


def _check_one_memory_equals_core(variant: str, short_conv: bool | None = None,
                                  output_gate: bool | None = None) -> None:
  short_conv = VARIANTS[variant].short_conv if short_conv is None else short_conv
  layer = LinearAttention(D, H, variant=variant, use_short_conv=short_conv, chunk_size=16,
                          use_output_gate=output_gate, impl="xla", rngs=nnx.Rngs(0))
  _perturb(layer, seed=1)
  mom = MixtureOfMemories(D, H, core=variant, num_memories=1, top_k=1, shared_memory=False,
                          use_short_conv=short_conv, use_output_gate=output_gate,
                          norm_eps=1e-5, chunk_size=16, impl="xla", rngs=nnx.Rngs(2))
  assert (mom.out_gate_proj is None) == (layer.g_proj is None)
  _copy_core_into_mom(layer, mom)
  x = jnp.asarray(_x(9))
  seg = jnp.asarray(np.stack([np.ones(T), np.where(np.arange(T) < 6, 1, 2)]), jnp.int32)
  w = jnp.asarray(np.random.default_rng(10).normal(size=(B, T, D)), jnp.float32)

  def value_and_grads(module: nnx.Module) -> Any:
    graph, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
      y = nnx.merge(graph, params, rest)(x, segment_ids=seg).y
      return jnp.sum(y * w), y

    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS)(params, x)

  (_, y_core), (dp_core, dx_core) = value_and_grads(layer)
  (_, y_mom), (dp_mom, dx_mom) = value_and_grads(mom)
  _close(y_mom, np.asarray(y_core), CONT_RTOL, CONT_ATOL_REL)
  _close(dx_mom, np.asarray(dx_core), CONT_RTOL, CONT_ATOL_REL)
  # the core's parameter gradients, mapped like its weights, are MoM's (the router's is 0)
  graph, _, rest = nnx.split(layer, nnx.Param, ...)
  core_grads = nnx.merge(graph, dp_core, rest)
  graph, params, rest = nnx.split(mom, nnx.Param, ...)
  mapped = nnx.merge(graph, jax.tree.map(jnp.zeros_like, params), rest)
  _copy_core_into_mom(core_grads, mapped)
  expected = jax.tree_util.tree_leaves_with_path(nnx.state(mapped, nnx.Param))
  for (path, want), got in zip(expected, jax.tree.leaves(dp_mom)):
    scale = float(np.max(np.abs(np.asarray(want)))) or 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=CONT_RTOL,
                               atol=CONT_ATOL_REL * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", CORES)
def test_one_memory_top1_no_shared_equals_its_core_layer(variant: str) -> None:
  """MoM with one memory, top-1 and no shared memory IS its core layer: the same output
  and gradients (input and every weight) given the same weights."""
  _check_one_memory_equals_core(variant)


@pytest.mark.parametrize("variant, output_gate", [("gated_deltanet", False), ("deltanet", True)])
def test_one_memory_equals_its_core_with_the_output_gate_overridden(variant: str,
                                                                    output_gate: bool) -> None:
  """use_output_gate overrides the row's output gate in MoM as it does in LinearAttention."""
  _check_one_memory_equals_core(variant, output_gate=output_gate)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in CORES])
def test_one_memory_equals_every_other_core_layer(variant: str) -> None:
  _check_one_memory_equals_core(variant)


def test_one_memory_equals_hgrn2_with_its_gate_conv() -> None:
  """HGRN2 with the short conv: the gate's logits run through their own conv in MoM's
  stream as in the layer (`GateSpec.convolved`)."""
  _check_one_memory_equals_core("hgrn2", short_conv=True)
