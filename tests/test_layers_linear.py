"""Tests of jaxlin.layers.linear_attention (every variant), gates and feature maps.

Each variant is compiled ONCE (`_results`): one jitted function computes
  * the unsegmented forward of two rows: row 0 = document 1 followed by document 2 of a
    packed row, row 1 = document 2 first (so doc 1 "alone" is row 0's first 9 outputs and
    doc 2 "alone" row 1's first 12, by causality, which is tested separately);
  * the packed forward (row 0 one document, row 1 two documents, 9 + 12 tokens) and its
    Jacobian rows d<r, y_t>/dx_s for every t (chunk 16, so T = 21 crosses a chunk edge);
  * prefill of 13 tokens then 8 single-token decode steps on the unsegmented input.
Parameters are perturbed away from their init so that zero-initialised parts matter.
Direct numpy float64 references written from each paper's equations check every variant:
recurrences for the data-gated rows, the parallel (attention) form for the others.

Legend: B batch, T time, D d_model, H heads, K key dim, V value dim.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import feature_maps, gates
from jaxlin.layers.linear_attention import VARIANTS, LinearAttention
from jaxlin.layers.mom import MixtureOfMemories

B, T, D, H = 2, 21, 32, 2
DOC1 = 9            # packed row: tokens [0, 9) are document 1, [9, 21) document 2
PREFILL = 13
CHUNK = 16
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# Layer configurations beyond the variants' defaults: name -> (variant, LinearAttention options)
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "hgrn2+conv": ("hgrn2", {"use_short_conv": True}),   # the gate's logits convolved too
}
NAMES = list(VARIANTS) + list(OPTIONS)


def _layer(name: str, **kwargs: Any) -> LinearAttention:
  """The layer of NAMES entry `name` (a variant, or an OPTIONS configuration)."""
  variant, options = OPTIONS.get(name, (name, {}))
  return LinearAttention(D, H, variant=variant, **options, **kwargs)


def _perturb(module: nnx.Module, seed: int) -> None:
  """Adds 0.1 * N(0, 1) to every parameter (zero-initialised parts become active)."""
  params = nnx.state(module, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(tree, leaves))


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(x [B,T,D] packed input, x_alone [B,T,D] unsegmented rows, segment_ids [B,T])."""
  x = np.asarray(jax.random.normal(jax.random.key(1), (B, T, D)), np.float32)
  seg = np.stack([np.zeros(T, np.int32), np.where(np.arange(T) < DOC1, 1, 2).astype(np.int32)])
  alone = np.stack([x[1], np.roll(x[1], -DOC1, axis=0)])
  return x, alone, seg


@functools.lru_cache(maxsize=None)
def _results(name: str) -> dict:
  """Builds variant `name`, runs every check's computation in one compiled function."""
  module = _layer(name, chunk_size=CHUNK, rngs=nnx.Rngs(0))
  _perturb(module, seed=len(name))
  graphdef, state = nnx.split(module)
  x, alone, seg = _inputs()
  cotangent = np.asarray(jax.random.normal(jax.random.key(2), (D,)), np.float32)

  def compute(state, x, alone, seg):
    layer = nnx.merge(graphdef, state)
    y_alone = layer(alone).y
    y_packed, vjp = jax.vjp(lambda xx: layer(xx, segment_ids=seg).y, x)
    rows = jnp.broadcast_to(jnp.eye(T)[:, None, :, None] * cotangent, (T, B, T, D))
    jac = jax.vmap(lambda c: vjp(c)[0])(rows)              # [T(out), B, T(in), D]
    cache = layer.init_cache(B, T)
    y_pre, cache, _ = layer(alone[:, :PREFILL], cache=cache)

    def decode(cache, x_t):
      y_t, cache, _ = layer(x_t[:, None], cache=cache)
      return cache, y_t[:, 0]

    cache, y_dec = jax.lax.scan(decode, cache, jnp.swapaxes(alone[:, PREFILL:], 0, 1))
    y_cached = jnp.concatenate([y_pre, jnp.swapaxes(y_dec, 0, 1)], axis=1)
    return y_alone, y_packed, jac, y_cached, cache

  out = jax.jit(compute, compiler_options=COMPILER_OPTIONS)(state, x, alone, seg)
  y_alone, y_packed, jac, y_cached, cache = jax.tree.map(np.asarray, out)
  return {"module": module, "x": x, "alone": alone, "y_alone": y_alone,
          "y_packed": y_packed, "jac": np.abs(jac).sum(-1), "y_cached": y_cached,
          "cache": cache}


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4,
           atol_rel: float = 2e-5) -> None:
  """allclose with an absolute tolerance relative to max |expected|."""
  np.testing.assert_allclose(actual, expected, rtol=rtol,
                             atol=atol_rel * float(np.max(np.abs(expected))))


# ------------------------------------------------------------------------ every variant
@pytest.mark.parametrize("name", NAMES)
def test_shape_and_finite(name: str) -> None:
  r = _results(name)
  for key in ("y_alone", "y_packed", "y_cached"):
    assert r[key].shape == (B, T, D) and r[key].dtype == np.float32, key
    assert np.all(np.isfinite(r[key])), key
  assert np.std(r["y_alone"]) > 1e-3


def _assert_zero(block: np.ndarray, jac: np.ndarray, what: str) -> None:
  """Asserts |d y / d x| is exactly 0 on `block`, reporting the leak relative to max |jac|."""
  leak = float(np.max(block))
  assert leak == 0.0, f"{what}: max |dy/dx| = {leak:.3g} ({leak / np.max(jac):.3g} of the largest)"


@pytest.mark.parametrize("name", NAMES)
def test_causal_through_gradients(name: str) -> None:
  jac = _results(name)["jac"][:, 0]              # row 0: one document; [t, s]
  future = np.triu(np.ones((T, T), bool), k=1)
  _assert_zero(jac[future], jac, "an output depends on a later input")
  assert np.all(np.diag(jac) > 0) and np.all(np.diag(jac, k=-1) > 0)
  assert np.all(jac[T - 1, :] > 0), "the last output must see every input"


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_do_not_leak(name: str) -> None:
  r = _results(name)
  jac = r["jac"][:, 1]                           # row 1: documents [0, 9) and [9, 21)
  _assert_zero(jac[DOC1:, :DOC1], jac, "document 2 sees document 1")
  _assert_zero(jac[:DOC1, DOC1:], jac, "document 1 sees document 2")
  assert np.all(jac[T - 1, DOC1:] > 0) and np.all(jac[DOC1 - 1, :DOC1] > 0)
  _close(r["y_packed"][1, :DOC1], r["y_alone"][0, :DOC1])
  _close(r["y_packed"][1, DOC1:], r["y_alone"][1, :T - DOC1])


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_equals_forward(name: str) -> None:
  r = _results(name)
  _close(r["y_cached"], r["y_alone"])
  module = r["module"]
  empty = module.init_cache(B, 1000)
  assert jax.tree.map(np.shape, empty) == jax.tree.map(np.shape, r["cache"])
  state = r["cache"]["state"]
  assert state.dtype == np.float32 and state.shape[:2] == (B, H)


# ------------------------------------------------------------- numpy references (float64)
def _np(a: jax.Array) -> np.ndarray:
  return np.asarray(a, np.float64)


def _linear(layer: nnx.Linear, x: np.ndarray) -> np.ndarray:
  y = x @ _np(layer.kernel[...])
  return y if layer.bias is None else y + _np(layer.bias[...])


def _silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _softplus(x: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, x)


def _conv(weight: jax.Array, x: np.ndarray) -> np.ndarray:
  """Causal depthwise conv, tap K-1 on the current token: x [T, C]."""
  w = _np(weight)
  size = w.shape[0]
  padded = np.concatenate([np.zeros((size - 1, x.shape[1])), x])
  return sum(w[j] * padded[j:j + x.shape[0]] for j in range(size))


def _conv_silu(weight: jax.Array, x: np.ndarray, bias: jax.Array | None = None) -> np.ndarray:
  """Causal depthwise conv (+ bias), then SiLU: x [T, C]."""
  return _silu(_conv(weight, x) + (0.0 if bias is None else _np(bias)))


def _rmsnorm(o: np.ndarray, weight: jax.Array, eps: float = 1e-5) -> np.ndarray:
  return o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + eps) * _np(weight)


def _heads(a: np.ndarray) -> np.ndarray:
  return a.reshape(a.shape[0], H, -1)


def _finish(m: LinearAttention, o: np.ndarray, x_gate: np.ndarray | None) -> np.ndarray:
  """Per-head RMSNorm (when the layer has one; SiLU output gate when x_gate is given) and
  the output projection."""
  if m.norm is not None:
    o = _rmsnorm(o, m.norm.weight[...])
  if x_gate is not None:
    o = o * _silu(_heads(_linear(m.g_proj, x_gate)))
  return _linear(m.o_proj, o.reshape(o.shape[0], -1))


def _gate_then_norm(m: LinearAttention, o: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Mamba2's output: RMSNorm(o_h * silu(x W_z)_h) per head (one group per head, a weight
  per channel), then W_o."""
  gated = o * _silu(_heads(_linear(m.g_proj, x)))
  return _linear(m.o_proj, _rmsnorm(gated, m.norm.weight[...]).reshape(o.shape[0], -1))


def _l2(a: np.ndarray) -> np.ndarray:
  return a / np.sqrt(np.sum(a ** 2, -1, keepdims=True) + 1e-6)


def _qkv_conv(m: LinearAttention, x: np.ndarray) -> tuple[np.ndarray, ...]:
  """q, k, v [T, H, *] after the projections and the short conv."""
  parts = [_linear(m.q_proj, x), _linear(m.k_proj, x), _linear(m.v_proj, x)]
  joint = _conv_silu(m.conv.weight[...], np.concatenate(parts, -1),
                     None if m.conv.bias is None else m.conv.bias[...])
  sizes = np.cumsum([p.shape[-1] for p in parts])[:-1]
  return tuple(_heads(a) for a in np.split(joint, sizes, -1))


def _gla(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """GLA: S_t = Diag(a_t) S + k v^T, a_t = sigmoid(W2 W1 x + b)^(1/16); o = S^T q / sqrt(K)."""
  q, k, v = (_heads(_linear(p, x)) for p in (m.q_proj, m.k_proj, m.v_proj))
  alpha = _sigmoid(_linear(m.gate.up, _linear(m.gate.down, x))) ** (1 / 16)
  alpha = _heads(alpha)
  S, out = np.zeros((H, k.shape[-1], v.shape[-1])), []
  for t in range(x.shape[0]):
    S = alpha[t][..., None] * S + k[t][..., None] * v[t][:, None]
    out.append(np.einsum("hk,hkv->hv", q[t], S) / np.sqrt(k.shape[-1]))
  return _finish(m, np.stack(out), x)


def _mamba2(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """SSD: h_t = exp(dt_t A) h + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t (C = q, B = k, x = v,
  after the short conv with its bias); out = W_o RMSNorm(y_h * silu(z_h)) per head (Mamba2's
  gate-then-norm, one group per head)."""
  c, b, xv = _qkv_conv(m, x)
  dt = _softplus(_linear(m.gate.proj, x) + _np(m.gate.dt_bias[...]))       # [T, H]
  a = -np.exp(_np(m.gate.A_log[...]))
  h, out = np.zeros((H, b.shape[-1], xv.shape[-1])), []
  for t in range(x.shape[0]):
    h = np.exp(dt[t] * a)[:, None, None] * h + dt[t][:, None, None] * (
        b[t][..., None] * xv[t][:, None])
    out.append(np.einsum("hk,hkv->hv", c[t], h) + _np(m.skip[...])[:, None] * xv[t])
  return _gate_then_norm(m, np.stack(out), x)


def _rwkv6(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """RWKV6: ddlerp token shift; o_t = (S + Diag(u) k v^T)^T r, S = Diag(exp(-exp(w))) S + k v^T."""
  mix = m.shift_mix
  prev = np.concatenate([np.zeros((1, D)), x[:-1]])
  delta = prev - x
  z = np.tanh(_linear(mix.down, x + delta * _np(mix.mu_x[...]))).reshape(len(x), 5, -1)
  mu = np.einsum("tnr,nrd->ntd", z, _np(mix.up[...])) + _np(mix.bias[...])[:, None]
  xr, xw, xk, xv, xg = x[None] + delta[None] * mu
  r, k, v = _heads(_linear(m.q_proj, xr)), _heads(_linear(m.k_proj, xk)), _heads(
      _linear(m.v_proj, xv))
  w = np.tanh(_linear(m.gate.down, xw)) @ _np(m.gate.up.kernel[...]) + _np(m.gate.bias[...])
  decay = _heads(np.exp(-np.exp(w)))
  u = _np(m.bonus[...])
  S, out = np.zeros((H, k.shape[-1], v.shape[-1])), []
  for t in range(len(x)):
    kv = k[t][..., None] * v[t][:, None]
    out.append(np.einsum("hk,hkv->hv", r[t], S + u[..., None] * kv))
    S = decay[t][..., None] * S + kv
  return _finish(m, np.stack(out), xg)


def _delta(m: LinearAttention, x: np.ndarray, gated: bool, comba: bool) -> np.ndarray:
  """DeltaNet: S_t = (I - b k k^T) S + b k v^T.  Gated DeltaNet: S_t = alpha_t (I - b k k^T) S
  + b k v^T, alpha_t = exp(-exp(A_log) softplus(W x + dt_bias)), SiLU output gate.
  Comba (paper): S_t = (alpha I - beta~ k k^T) S + beta k v^T with beta~ = alpha beta
  sigmoid(c_h); read with q - d_h k."""
  q, k, v = _qkv_conv(m, x)
  q, k = _l2(q), _l2(k)
  beta = _sigmoid(_linear(m.beta_proj, x))                                 # [T, H]
  alpha = np.ones_like(beta)
  if gated:
    alpha = np.exp(-np.exp(_np(m.gate.A_log[...])) * _softplus(
        _linear(m.gate.proj, x) + _np(m.gate.dt_bias[...])))
  beta_tilde = alpha * beta
  if comba:
    beta_tilde = beta_tilde * _sigmoid(_np(m.removal_logit[...]))
    q = q - _np(m.correction[...])[:, None] * k
  eye = np.eye(k.shape[-1])
  S, out = np.zeros((H, k.shape[-1], v.shape[-1])), []
  for t in range(len(x)):
    transition = alpha[t][:, None, None] * eye - beta_tilde[t][:, None, None] * (
        k[t][:, :, None] * k[t][:, None, :])
    S = transition @ S + beta[t][:, None, None] * (k[t][..., None] * v[t][:, None])
    out.append(np.einsum("hk,hkv->hv", q[t], S) / np.sqrt(k.shape[-1]))
  return _finish(m, np.stack(out), x if gated else None)


def _hgrn2(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """HGRN2: f_t = sigmoid(W_f x + b) per key dim, h_t = Diag(f_t) h + (1 - f_t) v_t^T,
  o_t = h_t^T swish(W_q x) / sqrt(K); RMSNorm, no output gate. With the short conv (fla's
  HGRN2 with use_short_conv): W_f x + b through a conv of its own (no activation) before the
  sigmoid, and q, v through the layer's conv (SiLU)."""
  q, f, v = _linear(m.q_proj, x), _linear(m.gate.proj, x), _linear(m.v_proj, x)
  if m.conv is not None:
    qv = _conv_silu(m.conv.weight[...], np.concatenate([q, v], -1))
    q, v = qv[:, :q.shape[-1]], qv[:, q.shape[-1]:]
    f = _conv(m.gate_conv.weight[...], f)
  q, f, v = _heads(_silu(q)), _heads(_sigmoid(f)), _heads(v)
  S, out = np.zeros((H, q.shape[-1], v.shape[-1])), []
  for t in range(len(x)):
    S = f[t][..., None] * S + (1.0 - f[t])[..., None] * v[t][:, None]
    out.append(np.einsum("hk,hkv->hv", q[t], S) / np.sqrt(q.shape[-1]))
  return _finish(m, np.stack(out), None)


# The variants without a data-dependent gate, in their parallel (attention) form:
#   o_t = sum_{s <= t} gamma_h^(t-s) score(q_t, k_s) v_s   [/ sum_{s <= t} score(q_t, k_s) + eps]
def _parallel(q: np.ndarray, k: np.ndarray, v: np.ndarray,
              score: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
              gamma: np.ndarray | None = None, normalised: bool = False) -> np.ndarray:
  """q, k [T, H, K], v [T, H, V]; score(q_t, k_s, t - s) -> [H]; gamma [H] or None."""
  out = np.zeros(v.shape)
  for t in range(len(q)):
    weights = np.stack([score(q[t], k[s], t - s) * (1.0 if gamma is None else gamma ** (t - s))
                        for s in range(t + 1)])                          # [t + 1, H]
    out[t] = np.einsum("sh,shv->hv", weights, v[:t + 1])
    if normalised:
      out[t] /= weights.sum(0)[:, None] + 1e-6
  return out


def _projections(m: LinearAttention, x: np.ndarray) -> tuple[np.ndarray, ...]:
  return tuple(_heads(_linear(p, x)) for p in (m.q_proj, m.k_proj, m.v_proj))


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.sum(a * b, -1)


def _bla(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """Katharopoulos et al.: score = (elu(q) + 1) . (elu(k) + 1) / sqrt(K); RMSNorm."""
  q, k, v = _projections(m, x)
  elu1 = lambda a: np.where(a > 0, a + 1.0, np.exp(a))
  score = lambda qt, ks, lag: _dot(elu1(qt), elu1(ks)) / np.sqrt(q.shape[-1])
  return _finish(m, _parallel(q, k, v, score), None)


def _lightning(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """Lightning attention (one layer): score = swish(q) . swish(k) / sqrt(K), decay
  gamma_h = exp(-2^(-8 (h + 1) / H)) (the ALiBi slopes); RMSNorm, SiLU output gate."""
  q, k, v = _projections(m, x)
  gamma = np.exp(-(2.0 ** (-8.0 * (np.arange(H) + 1) / H)))
  score = lambda qt, ks, lag: _dot(_silu(qt), _silu(ks)) / np.sqrt(q.shape[-1])
  return _finish(m, _parallel(q, k, v, score, gamma), x)


def _retention(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """RetNet: score = Re(sum_j zq_j conj(zk_j) e^{i (t - s) w_j}) / sqrt(K) with z = x[:K/2] +
  i x[K/2:], w_j = 10000^(-2j/K) (RoPE as a relative rotation), gamma_h = 1 - 2^(-5 - h);
  RMSNorm, SiLU output gate."""
  q, k, v = _projections(m, x)
  half = q.shape[-1] // 2
  freq = 10000.0 ** (-2.0 * np.arange(half) / q.shape[-1])
  complex_of = lambda a: a[..., :half] + 1j * a[..., half:]
  score = lambda qt, ks, lag: np.real(np.sum(
      complex_of(qt) * np.conj(complex_of(ks)) * np.exp(1j * lag * freq), -1)) / np.sqrt(
          q.shape[-1])
  return _finish(m, _parallel(q, k, v, score, 1.0 - 2.0 ** (-5.0 - np.arange(H))), x)


def _based(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """Based: score = 1 + q.k / sqrt(K) + (q.k)^2 / (2K) (2nd-order Taylor of exp), normalised
  by the sum of the scores; no norm, no output gate."""
  q, k, v = _projections(m, x)
  dim = q.shape[-1]
  score = lambda qt, ks, lag: (1.0 + _dot(qt, ks) / np.sqrt(dim)
                               + _dot(qt, ks) ** 2 / (2.0 * dim))
  return _finish(m, _parallel(q, k, v, score, normalised=True), None)


def _rebased(m: LinearAttention, x: np.ndarray) -> np.ndarray:
  """ReBased: y = gamma LayerNorm(x) + beta (per map), score = (y_q . y_k)^2 / K, normalised."""
  q, k, v = _projections(m, x)

  def affine_norm(a: np.ndarray, fmap: Any) -> np.ndarray:
    centred = a - a.mean(-1, keepdims=True)
    normed = centred / np.sqrt(np.mean(centred ** 2, -1, keepdims=True) + 1e-5)
    return normed * _np(fmap.gamma[...]) + _np(fmap.bias[...])

  q, k = affine_norm(q, m.q_map), affine_norm(k, m.k_map)
  score = lambda qt, ks, lag: _dot(qt, ks) ** 2 / q.shape[-1]
  return _finish(m, _parallel(q, k, v, score, normalised=True), None)


REFERENCES = {
    "bla": _bla,
    "lightning": _lightning,
    "retention": _retention,
    "gla": _gla,
    "mamba2": _mamba2,
    "hgrn2": _hgrn2,
    "hgrn2+conv": _hgrn2,
    "rwkv6": _rwkv6,
    "based": _based,
    "rebased": _rebased,
    "deltanet": functools.partial(_delta, gated=False, comba=False),
    "gated_deltanet": functools.partial(_delta, gated=True, comba=False),
    "comba": functools.partial(_delta, gated=True, comba=True),
}


def test_every_variant_has_a_reference() -> None:
  assert sorted(REFERENCES) == sorted(NAMES)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_matches_direct_recurrence(name: str) -> None:
  r = _results(name)
  for row in range(B):
    expected = REFERENCES[name](r["module"], r["alone"][row].astype(np.float64))
    _close(r["y_alone"][row], expected)


@pytest.mark.parametrize("name", NAMES)
def test_builds_under_jit(name: str) -> None:
  """Parameters made inside a traced function (jit / vmap over seeds): no fixed decay may need
  a concrete value (Lightning's and RetNet's decays are static numbers)."""
  shapes = jax.eval_shape(lambda key: nnx.state(_layer(name, rngs=nnx.Rngs(params=key))),
                          jax.random.key(0))
  assert jax.tree.leaves(shapes)


# ----------------------------------------------------------------- gates, feature maps
def test_fixed_decays() -> None:
  np.testing.assert_allclose(np.exp(gates.retention_log_decay(3)),
                             [1 - 2.0 ** -5, 1 - 2.0 ** -6, 1 - 2.0 ** -7], rtol=1e-6)
  np.testing.assert_allclose(gates.alibi_slopes(4), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
  first, last = (gates.lightning_log_decay(4, i, 3) for i in (0, 2))
  np.testing.assert_allclose(first, -(1 + 1e-5) * np.asarray(gates.alibi_slopes(4)), rtol=1e-6)
  np.testing.assert_allclose(last, -1e-5 * np.asarray(gates.alibi_slopes(4)), rtol=1e-4)
  with pytest.raises(ValueError, match="layer_index"):
    gates.lightning_log_decay(4, 3, 3)


def test_gate_modules_are_log_space() -> None:
  rngs = nnx.Rngs(0)
  modules = (gates.LowRankLogSigmoidGate(D, H, 4, rngs=rngs), gates.Mamba2Decay(D, H, rngs=rngs),
             gates.HGRN2Gate(D, H, 4, lower_bound=0.5, rngs=rngs),
             gates.RWKV6Decay(D, H, 4, rngs=rngs))
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, D))
  seg = jnp.asarray([[0, 0, 1, 1, 1]] * 2)

  @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
  def run(x):
    gla, mamba, hgrn, rwkv = modules
    return (gla(x), mamba(x), hgrn(x), rwkv(x), gates.shift_tokens(x, x[:, 0] + 1.0, seg))

  out_gla, out_mamba, out_hgrn, out_rwkv, shifted = run(x)
  g_gla, (g_mamba, dt), (g_hgrn, k_hgrn), g_rwkv = (
      out_gla.g, (out_mamba.g, out_mamba.dt), (out_hgrn.g, out_hgrn.keys), out_rwkv.g)
  assert g_gla.shape == (2, 5, H, 4) and bool(jnp.all(g_gla <= 0))
  assert bool(jnp.all(g_gla >= jnp.log(jax.nn.sigmoid(-50.0)) / 16))
  assert g_mamba.shape == dt.shape == (2, 5, H)
  assert bool(jnp.all(g_mamba < 0)) and bool(jnp.all(dt > 0))
  np.testing.assert_allclose(np.exp(g_hgrn) + k_hgrn, 1.0, rtol=1e-6)
  assert bool(jnp.all(jnp.exp(g_hgrn) >= 0.5 - 1e-6))
  assert g_rwkv.shape == (2, 5, H, 4) and bool(jnp.all(g_rwkv < 0))
  np.testing.assert_array_equal(shifted[:, 0], x[:, 0] + 1.0)
  np.testing.assert_array_equal(shifted[:, 2], 0.0)
  np.testing.assert_array_equal(shifted[:, 3], x[:, 2])


def test_mamba2_decay_starts_at_the_papers_init() -> None:
  """Mamba2's defaults (mamba_ssm Mamba2: A_init_range (1, 16), dt in [1e-3, 0.1] log-uniform,
  floored at 1e-4, dt_bias = softplus^-1(dt)), checked on many heads' draws."""
  heads = 4096
  gate = gates.Mamba2Decay(D, heads, rngs=nnx.Rngs(0))
  a = np.exp(np.asarray(gate.A_log[...], np.float64))
  dt = np.logaddexp(0.0, np.asarray(gate.dt_bias[...], np.float64))
  assert a.min() >= 1.0 - 1e-5 and a.max() <= 16.0 + 1e-4
  np.testing.assert_allclose([a.mean(), a.std()], [8.5, 15 / np.sqrt(12)], rtol=0.05)
  assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
  log_dt = np.log(dt)
  lo, hi = np.log(1e-3), np.log(0.1)
  np.testing.assert_allclose([log_dt.mean(), log_dt.std()],
                             [(lo + hi) / 2, (hi - lo) / np.sqrt(12)], rtol=0.05)


@pytest.mark.parametrize("variant, a_range", [("mamba2", (1.0, 16.0)),
                                              ("gated_deltanet", (0.0, 16.0)),
                                              ("comba", (0.0, 16.0))])
def test_decay_init_of_each_row_and_its_options(variant: str, a_range: tuple[float, float]
                                                ) -> None:
  """A ~ U(a_range): mamba_ssm's (1, 16) for Mamba2, fla's (0, 16) for Gated DeltaNet and
  Comba (through the row's gate_options); a layer's gate_options override the row's (dt_max:
  every dt = dt_min = 1e-3), in LinearAttention and in MoM's memories."""
  heads = 1024
  layer = LinearAttention(2 * heads, heads, variant=variant, head_dim=2, rngs=nnx.Rngs(0))
  a = np.exp(np.asarray(layer.gate.A_log[...], np.float64))
  lo, hi = a_range
  assert a.min() >= lo and a.max() <= hi + 1e-4
  np.testing.assert_allclose([a.mean(), a.std()], [(lo + hi) / 2, (hi - lo) / np.sqrt(12)],
                             rtol=0.05)
  options = {"dt_max": 1e-3, "a_init_range": (2.0, 3.0)}
  small = LinearAttention(8, 2, variant=variant, gate_options=options, rngs=nnx.Rngs(0))
  mom = MixtureOfMemories(8, 2, core=variant, gate_options=options, rngs=nnx.Rngs(0))
  for gate in (small.gate, *mom.gates):
    np.testing.assert_allclose(np.logaddexp(0.0, np.asarray(gate.dt_bias[...], np.float64)),
                               1e-3, rtol=1e-5)
    a = np.exp(np.asarray(gate.A_log[...]))
    assert np.all((a >= 2.0 - 1e-5) & (a <= 3.0 + 1e-5)), a


def test_feature_map_kernels() -> None:
  rngs = nnx.Rngs(0)
  maps = {name: feature_maps.FeatureMap(name, 6, rngs=rngs) for name in feature_maps.FEATURE_MAPS}
  _perturb(maps["hedgehog"], seed=1)   # away from W = I, b = 0
  _perturb(maps["t2r"], seed=2)
  q, k = np.asarray(jax.random.normal(jax.random.key(3), (2, 6)), np.float64)
  phis = jax.jit(lambda a: {n: f(a) for n, f in maps.items()},
                 compiler_options=COMPILER_OPTIONS)(jnp.asarray(np.stack([q, k]), jnp.float32))
  phis = {n: np.asarray(p, np.float64) for n, p in phis.items()}
  s = q @ k / np.sqrt(6)
  np.testing.assert_allclose(phis["taylor"][0] @ phis["taylor"][1], 1 + s + s ** 2 / 2, rtol=1e-5)
  yq, yk = ((a - a.mean()) / np.sqrt(a.var() + 1e-5) for a in (q, k))
  np.testing.assert_allclose(phis["rebased"][0] @ phis["rebased"][1], (yq @ yk) ** 2 / 6,
                             rtol=1e-4)
  qk = np.stack([q, k])
  np.testing.assert_allclose(phis["identity"], qk, rtol=1e-6)
  np.testing.assert_allclose(phis["relu"], np.maximum(qk, 0.0), rtol=1e-6)
  np.testing.assert_allclose(phis["swish"], qk / (1.0 + np.exp(-qk)), rtol=1e-5)
  lin = {n: qk @ np.asarray(maps[n].weight[...], np.float64) + np.asarray(maps[n].bias[...])
         for n in ("hedgehog", "t2r")}
  np.testing.assert_allclose(phis["t2r"], np.maximum(lin["t2r"], 0.0), rtol=1e-5, atol=1e-7)
  both = np.concatenate([2.0 * lin["hedgehog"], -2.0 * lin["hedgehog"]], -1)
  softmax = np.exp(both - both.max(-1, keepdims=True))
  np.testing.assert_allclose(phis["hedgehog"], softmax / softmax.sum(-1, keepdims=True),
                             rtol=1e-5)
  np.testing.assert_allclose(phis["elu"], np.where(qk > 0, qk + 1, np.exp(qk)), rtol=1e-5)
  r = np.maximum(np.concatenate([qk, -qk], -1), 0)
  dpfp = np.concatenate([r * np.roll(r, j, -1) for j in range(1, 5)], -1)
  np.testing.assert_allclose(phis["dpfp"], dpfp, rtol=1e-5, atol=1e-7)
  for name, phi in phis.items():
    assert phi.shape == (2, feature_maps.feature_dim(name, 6)), name
    assert np.all(np.isfinite(phi)), name


def test_every_feature_map_in_basic_linear_attention() -> None:
  maps = ("elu", "relu", "swish", "identity", "hedgehog", "t2r", "dpfp")
  layers = [LinearAttention(D, H, variant="bla", feature_map=f, rngs=nnx.Rngs(0))
            for f in maps]
  x = jnp.asarray(_inputs()[0][:, :5])

  @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
  def run(states):
    return [nnx.merge(nnx.graphdef(l), s)(x).y for l, s in zip(layers, states)]

  for f, y, layer in zip(maps, run([nnx.state(l) for l in layers]), layers):
    assert y.shape == (B, 5, D) and bool(jnp.all(jnp.isfinite(y))), f
    assert layer.init_cache(1, 1)["state"].shape == (
        1, H, feature_maps.feature_dim(f, D // H), D // H)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "gla2"}, r"variant: got 'gla2'; expected one of .*'gla'"),
    ({"variant": "bla", "feature_map": "cosine"}, r"feature_map: got 'cosine'; expected one of .*'hedgehog'"),
    ({"variant": "gla", "num_heads": 3}, r"num_heads: got 3; expected a divisor of d_model=32"),
    ({"variant": "gla", "num_heads": 0}, r"num_heads: got 0; expected an int >= 1"),
    ({"variant": "gla", "key_dim": -2}, r"key_dim: got -2; expected an int >= 1"),
    ({"variant": "hgrn2", "feature_map": "dpfp"}, r"feature_map: got 'dpfp'; expected one of"),
    ({"variant": "retention", "feature_map": "taylor", "key_dim": 1}, r"use_rope.*even"),
])
def test_config_errors(kwargs: dict, match: str) -> None:
  kwargs = {"num_heads": H, **kwargs}
  with pytest.raises(ValueError, match=match):
    LinearAttention(D, rngs=nnx.Rngs(0), **kwargs)


def test_call_errors() -> None:
  layer = LinearAttention(D, H, variant="bla", rngs=nnx.Rngs(0))
  x = jnp.zeros((1, 3, D))
  with pytest.raises(ValueError, match="segment_ids: got an array with a cache; expected None"):
    layer(x, segment_ids=jnp.zeros((1, 3), jnp.int32), cache=layer.init_cache(1, 3))
  with pytest.raises(ValueError, match="d_model=32"):
    layer(jnp.zeros((1, 3, 16)))
