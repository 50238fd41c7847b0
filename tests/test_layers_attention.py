"""Tests of jaxlin.layers.SoftmaxAttention (the N token mixer), from the spec.

    q, k = rope(x W_q), rope(x W_k) at positions inside each document; v = x W_v
    o_t = sum_{s <= t, s > t - window, same document} softmax_s(<q_t, k_s> / sqrt(D)) v_s
    y = concat_h(o) W_o;   cache: KV (ring buffer of `window` slots with a window)

Legend: B batch, T time, d d_model, H heads, Hkv kv heads, D head dim.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import SoftmaxAttention, document_positions
from jaxlin.layers.attention import ring_positions

RTOL, ATOL = 1e-5, 1e-5
#: XLA backend optimisation level 0 halves compile time, which dominates these tiny tests.
JIT_OPTIONS = {"compiler_options": {"xla_backend_optimization_level": 0}}


def _jit(fn: Callable[..., Any]) -> Callable[..., Any]:
  """jax.jit of fn(layer, *args) through nnx.split / nnx.merge (the train-step pattern)."""
  @functools.partial(jax.jit, static_argnums=0, **JIT_OPTIONS)
  def run(graphdef: Any, state: Any, *args: Any) -> Any:
    return fn(nnx.merge(graphdef, state), *args)
  return lambda layer, *args: run(*nnx.split(layer), *args)


_forward = _jit(lambda layer, x, ids=None: layer(x, segment_ids=ids).y)
_continue = _jit(lambda layer, x, cache: layer(x, cache=cache))
_jacobian = _jit(lambda layer, x, ids=None: jax.jacrev(lambda x: layer(x, segment_ids=ids).y)(x))


def _layer(d: int = 16, H: int = 4, **kw: Any) -> SoftmaxAttention:
  kw.setdefault("init_std", 0.4)  # large enough that attention is far from uniform
  return SoftmaxAttention(d, H, rngs=nnx.Rngs(0), **kw)


def _x(B: int, T: int, d: int = 16, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, d)), jnp.float32)


def _influence(layer: SoftmaxAttention, x: jax.Array,
               segment_ids: jax.Array | None = None) -> np.ndarray:
  """[B, T, T] sum over features of |d y[b, t] / d x[b, s]| (rows of the batch independent)."""
  jac = _jacobian(layer, x, segment_ids)                             # [B, T, d, B, T, d]
  jac = np.abs(np.asarray(jac)).sum(axis=(2, 5))                     # [B, T, B, T]
  B = x.shape[0]
  for b in range(B):
    for c in range(B):
      if b != c:
        assert np.all(jac[b, :, c] == 0.0), "batch rows must not interact"
  return np.stack([jac[b, :, b] for b in range(B)])


# ---------------------------------------------------------------------------- basics
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_dtype_finite(dtype: Any) -> None:
  layer = _layer(16, 4, num_kv_heads=2, qk_norm=True, dtype=dtype)
  out = _jit(lambda layer, x: layer(x))(layer, _x(2, 10))
  assert out.y.shape == (2, 10, 16) and out.y.dtype == dtype
  assert out.cache is None and out.aux == {}
  assert np.all(np.isfinite(np.asarray(out.y, np.float32)))
  assert float(jnp.abs(out.y.astype(jnp.float32)).max()) > 1e-2
  cache = layer.init_cache(2, 12)
  assert cache["keys"].shape == (2, 12, 2, 4) and cache["keys"].dtype == dtype
  assert cache["values"].shape == (2, 12, 2, 4) and int(cache["length"]) == 0
  ring = _layer(16, 4, num_kv_heads=2, window=5, dtype=dtype).init_cache(2, 1000)
  assert ring["keys"].shape == (2, 5, 2, 4)  # bounded by the window, not max_length


@pytest.mark.parametrize("window", [None, 3])
def test_causal_by_gradients(window: int | None) -> None:
  layer = _layer(16, 4, num_kv_heads=2, window=window)
  T = 8
  inf = _influence(layer, _x(2, T))
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = (s <= t) & ((s > t - window) if window else True)
  for b in range(2):
    np.testing.assert_array_equal(inf[b][~visible], 0.0)   # d y_t / d x_s == 0 exactly
    assert np.all(inf[b][visible] > 1e-6)                 # and every visible token matters


# ------------------------------------------------------------------------ packed documents
SEGMENTS = np.array([[1, 1, 1, 4, 4, 4, 4, 1, 1, 1],       # id 1 reused by a later document
                     [0, 0, 0, 0, 0, 0, 2, 2, 2, 2]], np.int32)


def _documents(row: np.ndarray) -> list[tuple[int, int]]:
  starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
  return list(zip(starts, starts[1:] + [len(row)]))


def test_document_positions_restart() -> None:
  pos = np.asarray(document_positions(jnp.asarray(SEGMENTS)))
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2],
                                      [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])


@pytest.mark.parametrize("window", [None, 2])
def test_packed_documents_do_not_leak(window: int | None) -> None:
  layer = _layer(16, 4, num_kv_heads=2, window=window)
  x = _x(2, 10, seed=1)
  ids = jnp.asarray(SEGMENTS)
  inf = _influence(layer, x, segment_ids=ids)
  packed = np.asarray(_forward(layer, x, ids))
  for b in range(2):
    doc = np.zeros(10, int)
    for i, (a, e) in enumerate(_documents(SEGMENTS[b])):
      doc[a:e] = i
      alone = np.asarray(_forward(layer, x[b:b + 1, a:e]))[0]    # the document on its own
      np.testing.assert_allclose(packed[b, a:e], alone, rtol=RTOL, atol=ATOL)
    across = doc[:, None] != doc[None, :]
    np.testing.assert_array_equal(inf[b][across], 0.0)            # exactly zero across documents
    assert np.all(inf[b][~across & (np.arange(10)[None, :] <= np.arange(10)[:, None])
                          & ((np.arange(10)[None, :] > np.arange(10)[:, None] - window)
                             if window else True)] > 1e-6)


# ---------------------------------------------------------------------- prefill + decode
def test_ring_positions() -> None:
  np.testing.assert_array_equal(np.asarray(ring_positions(jnp.int32(0), 4)), [2 ** 30] * 4)
  np.testing.assert_array_equal(np.asarray(ring_positions(jnp.int32(2), 4)),
                                [0, 1, 2 ** 30, 2 ** 30])
  np.testing.assert_array_equal(np.asarray(ring_positions(jnp.int32(9), 4)), [8, 5, 6, 7])


@pytest.mark.parametrize("window", [None, 4])
def test_prefill_then_decode_equals_full_forward(window: int | None) -> None:
  """Prompt of 6 (> window: the ring wraps), a chunk of 5 (> window), then 3 decode steps."""
  layer = _layer(16, 4, num_kv_heads=2, window=window, qk_norm=True)
  T = 14
  x = _x(2, T, seed=2)
  full = np.asarray(_forward(layer, x))
  cache = layer.init_cache(2, T)
  outs, t = [], 0
  for n in (6, 5, 1, 1, 1):
    out = _continue(layer, x[:, t:t + n], cache)
    assert out.y.shape == (2, n, 16) and out.aux == {}
    cache = out.cache
    outs.append(np.asarray(out.y))
    t += n
    assert int(cache["length"]) == t
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  slots = window if window else T
  assert cache["keys"].shape == (2, slots, 2, 4)


# ------------------------------------------------------------------------- numpy reference
def _np_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
  D = x.shape[-1]
  inv = theta ** (-np.arange(0, D, 2) / D)
  ang = pos[:, None] * inv[None, :]                                   # [T, D/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]         # [T, 1, D/2]
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * weight


@pytest.mark.parametrize("qk_norm", [False, True])
def test_layer_matches_numpy(qk_norm: bool) -> None:
  """With qk_norm, q and k are RMS-normalised per head (own weights, eps 1e-6) before RoPE."""
  d, H, Hkv, D, T, window, theta = 12, 4, 2, 6, 9, 5, 500.0
  layer = SoftmaxAttention(d, H, num_kv_heads=Hkv, head_dim=D, rope_theta=theta, window=window,
                           qk_norm=qk_norm, init_std=0.5, rngs=nnx.Rngs(3))
  x = np.asarray(_x(1, T, d, seed=4), np.float64)[0]
  w = {n: np.asarray(getattr(layer, n).kernel[...], np.float64)
       for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  q, k = (x @ w["q_proj"]).reshape(T, H, D), (x @ w["k_proj"]).reshape(T, Hkv, D)
  if qk_norm:
    rng = np.random.default_rng(5)
    for norm in (layer.q_norm, layer.k_norm):   # weights away from their init of ones
      norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32)
    q = _np_rmsnorm(q, np.asarray(layer.q_norm.weight[...], np.float64), layer.q_norm.eps)
    k = _np_rmsnorm(k, np.asarray(layer.k_norm.weight[...], np.float64), layer.k_norm.eps)
  pos = np.arange(T, dtype=np.float64)
  q, k = _np_rope(q, pos, theta), _np_rope(k, pos, theta)
  v = (x @ w["v_proj"]).reshape(T, Hkv, D)
  o = np.zeros((T, H, D))
  for h in range(H):
    g = h // (H // Hkv)
    for t in range(T):
      s = np.arange(max(0, t - window + 1), t + 1)
      a = k[s, g] @ q[t, h] / np.sqrt(D)
      p = np.exp(a - a.max())
      o[t, h] = (p / p.sum()) @ v[s, g]
  expected = o.reshape(T, H * D) @ w["o_proj"]
  got = np.asarray(_forward(layer, jnp.asarray(x[None], jnp.float32)))[0]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- errors
def test_config_errors_name_argument_and_allowed_values() -> None:
  rngs = nnx.Rngs(0)
  cases: list[tuple[dict[str, Any], str]] = [
      (dict(d_model=10, num_heads=4), r"num_heads: got 4.*d_model=10; allowed: \[1, 2, 5, 10\]"),
      (dict(d_model=16, num_heads=4, num_kv_heads=3),
       r"num_kv_heads: got 3.*num_heads=4, allowed: \[1, 2, 4\]"),
      (dict(d_model=16, num_heads=4, head_dim=5), r"head_dim: got 5; expected a positive even"),
      (dict(d_model=12, num_heads=4), r"head_dim: got 3"),
      (dict(d_model=16, num_heads=4, window=0), r"window: got 0; expected None or an int >= 1"),
      (dict(d_model=16, num_heads=4, impl="flash"), r"impl: got 'flash'; expected one of"),
      (dict(d_model=16, num_heads=0), r"num_heads: got 0; expected an int >= 1"),
  ]
  for kw, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      SoftmaxAttention(kw.pop("d_model"), kw.pop("num_heads"), rngs=rngs, **kw)


def test_call_errors() -> None:
  layer = _layer(16, 4)
  x = _x(2, 5)
  cache = layer.init_cache(2, 6)
  with pytest.raises(ValueError, match=r"x: got shape \(2, 5, 8\).*d_model = 16"):
    layer(x[..., :8])
  with pytest.raises(ValueError, match=r"segment_ids: got segment ids together with a cache"):
    layer(x, segment_ids=jnp.zeros((2, 5), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match=r"segment_ids: got shape \(2, 4\).*\(2, 5\)"):
    layer(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"cache: got .*init_cache\(2, max_length\)"):
    layer(x, cache=_layer(16, 2).init_cache(2, 6))
  with pytest.raises(ValueError, match=r"cache: got 6 key slots; expected a ring buffer of "
                     r"window = 3 slots"):
    _layer(16, 4, window=3)(x, cache=cache)
  cache = layer(x, cache=cache).cache
  with pytest.raises(ValueError, match=r"cache: holds 6 tokens \(max_length\), has seen 5; got 2"):
    layer(x[:, :2], cache=cache)
  with pytest.raises(ValueError, match=r"max_length: got 0"):
    layer.init_cache(2, 0)
