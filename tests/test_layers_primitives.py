"""Tests of jaxlin.layers primitives (RMSNorm, GatedRMSNorm, ShortConv, RoPE), from the spec.

rmsnorm(x) = x / sqrt(mean(x^2) + eps) * w;  gated = rmsnorm(x) * silu(z)
short conv:  y_t = act(sum_{i<K} w[K-1-i] x_{t-i} + b), no tap crossing a document
rope:        x*cos + rotate_half(x)*sin, pairs (j, j + D/2), inv_freq_j = theta^(-2j/D)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import GatedRMSNorm, RMSNorm, ShortConv, apply_rope, rope_frequencies

RTOL, ATOL = 1e-5, 1e-5
K = 4  # conv kernel size used throughout


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


def _silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------------- norms
def _np_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def test_rms_norm_matches_numpy() -> None:
  rng = _rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32) * 3.0
  norm = RMSNorm(8, eps=1e-5)
  assert norm.weight[...].shape == (8,)
  np.testing.assert_array_equal(np.asarray(norm.weight[...]), np.ones(8))
  w = rng.normal(size=8).astype(np.float32)
  norm.weight[...] = jnp.asarray(w)
  y = norm(jnp.asarray(x))
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), _np_rmsnorm(x, w, 1e-5), rtol=RTOL, atol=ATOL)


def test_gated_rms_norm_matches_numpy() -> None:
  rng = _rng(1)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  z = rng.normal(size=(2, 3, 8)).astype(np.float32) * 2.0
  w = rng.normal(size=8).astype(np.float32)
  norm = GatedRMSNorm(8)
  assert norm.weight[...].shape == (8,)
  norm.weight[...] = jnp.asarray(w)
  y = norm(jnp.asarray(x), jnp.asarray(z))
  expected = _np_rmsnorm(x, w, 1e-6) * _silu(z.astype(np.float64))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)


def test_norms_keep_bf16() -> None:
  rng = _rng(2)
  x32 = rng.normal(size=(2, 5, 16)).astype(np.float32)
  z32 = rng.normal(size=(2, 5, 16)).astype(np.float32)
  x, z = jnp.asarray(x32, jnp.bfloat16), jnp.asarray(z32, jnp.bfloat16)
  w = np.ones(16, np.float32)
  y = RMSNorm(16)(x)
  assert y.dtype == jnp.bfloat16
  expected = _np_rmsnorm(np.asarray(x, np.float32), w, 1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2)
  yg = GatedRMSNorm(16)(x, z)
  assert yg.dtype == jnp.bfloat16
  expected_g = expected * _silu(np.asarray(z, np.float64))
  np.testing.assert_allclose(np.asarray(yg, np.float32), expected_g, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------- short conv
def _conv(seed: int = 0, *, channels: int = 3, activation: str | None = "silu",
          use_bias: bool = True) -> ShortConv:
  """A ShortConv with random (non-zero) bias so the bias path is exercised."""
  conv = ShortConv(channels, kernel_size=K, activation=activation, use_bias=use_bias,
                   rngs=nnx.Rngs(seed))
  if use_bias:
    conv.bias[...] = jnp.asarray(_rng(seed + 100).normal(size=channels), jnp.float32)
  return conv


def _np_documents(segment_ids: np.ndarray) -> np.ndarray:
  """[B, T] ids -> document index (a new document at every change of id)."""
  doc = np.zeros(segment_ids.shape, np.int64)
  for t in range(1, segment_ids.shape[1]):
    doc[:, t] = doc[:, t - 1] + (segment_ids[:, t] != segment_ids[:, t - 1])
  return doc


def _np_short_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                   activation: str | None, state: np.ndarray | None = None,
                   segment_ids: np.ndarray | None = None) -> np.ndarray:
  """Loop over the formula, float64."""
  B, T, C = x.shape
  k = w.shape[0]
  state = np.zeros((B, k - 1, C)) if state is None else state
  doc = np.zeros((B, T), np.int64) if segment_ids is None else _np_documents(segment_ids)
  y = np.zeros((B, T, C))
  for b in range(B):
    for t in range(T):
      acc = np.zeros(C) if bias is None else bias.astype(np.float64).copy()
      for i in range(k):
        s = t - i
        if s >= 0:
          if doc[b, s] == doc[b, t]:
            acc += w[k - 1 - i] * x[b, s]
        elif doc[b, t] == 0:
          acc += w[k - 1 - i] * state[b, k - 1 + s]
      y[b, t] = acc
  return _silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_matches_numpy_loop(activation: str | None, use_bias: bool,
                                       with_state: bool) -> None:
  rng = _rng(3)
  conv = _conv(activation=activation, use_bias=use_bias)
  x = rng.normal(size=(2, 7, 3)).astype(np.float32)
  state = rng.normal(size=(2, K - 1, 3)).astype(np.float32) if with_state else None
  y = conv(jnp.asarray(x), state=None if state is None else jnp.asarray(state))
  w = np.asarray(conv.weight[...], np.float64)
  assert w.shape == (K, 3)
  assert np.all(np.abs(w) <= K ** -0.5) and np.any(w != 0)
  bias = np.asarray(conv.bias[...]) if use_bias else None
  expected = _np_short_conv(x.astype(np.float64), w, bias, activation, state)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)


def test_short_conv_bf16_and_bad_activation() -> None:
  conv = _conv()
  x = jnp.asarray(_rng(4).normal(size=(1, 5, 3)), jnp.bfloat16)
  y, state = conv(x, return_state=True)
  assert y.dtype == jnp.bfloat16 and state.dtype == jnp.bfloat16 and state.shape == (1, K - 1, 3)
  with pytest.raises(ValueError, match="activation"):
    ShortConv(3, activation="gelu_tanh_whatever", rngs=nnx.Rngs(0))


def _jacobian(conv: ShortConv, x: np.ndarray, **kwargs) -> np.ndarray:
  """d y[0, t, c] / d x[0, s, c'] as [T, C, T, C] (batch 1)."""
  fn = lambda xx: conv(xx, **kwargs)[0]
  return np.asarray(jax.jacrev(fn)(jnp.asarray(x))[:, :, 0])


def test_short_conv_is_causal() -> None:
  conv = _conv()
  x = _rng(5).normal(size=(1, 6, 3)).astype(np.float32)
  jac = _jacobian(conv, x)  # [T, C, T, C]
  T = x.shape[1]
  for t in range(T):
    assert np.all(jac[t, :, t + 1:] == 0.0), f"y_{t} depends on a later token"
    # the receptive field is exactly K tokens: the current one and K-1 before
    assert np.any(jac[t, :, t] != 0.0)
    assert np.all(jac[t, :, :max(0, t - K + 1)] == 0.0)
  # depthwise: no mixing of channels
  for c in range(3):
    for c2 in range(3):
      if c != c2:
        assert np.all(jac[:, c, :, c2] == 0.0)


# segment ids with a reused id (3 appears again after a 1-token document of id 7)
SEGMENTS = np.array([[3, 3, 3, 7, 3, 5, 5, 5, 5, 5, 2, 2]], np.int32)
DOC_BOUNDS = [(0, 3), (3, 4), (4, 5), (5, 10), (10, 12)]


def test_short_conv_packed_documents_equal_separate_runs() -> None:
  rng = _rng(6)
  conv = _conv()
  T = SEGMENTS.shape[1]
  x = rng.normal(size=(1, T, 3)).astype(np.float32)
  state = rng.normal(size=(1, K - 1, 3)).astype(np.float32)
  seg = jnp.asarray(SEGMENTS)
  y, new_state = conv(jnp.asarray(x), segment_ids=seg, state=jnp.asarray(state),
                      return_state=True)
  for n, (a, b) in enumerate(DOC_BOUNDS):
    doc_state = jnp.asarray(state) if n == 0 else None
    y_doc = conv(jnp.asarray(x[:, a:b]), state=doc_state)
    np.testing.assert_allclose(np.asarray(y[:, a:b]), np.asarray(y_doc), rtol=RTOL, atol=ATOL)
  w = np.asarray(conv.weight[...], np.float64)
  expected = _np_short_conv(x.astype(np.float64), w, np.asarray(conv.bias[...]), "silu",
                            state, SEGMENTS)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)
  # the returned state only carries the last document's inputs (2 tokens < K-1: one zero row)
  np.testing.assert_array_equal(np.asarray(new_state[0, 0]), np.zeros(3))
  np.testing.assert_array_equal(np.asarray(new_state[0, 1:]), x[0, -2:])

  jac = _jacobian(conv, x, segment_ids=seg, state=jnp.asarray(state))
  doc = _np_documents(SEGMENTS)[0]
  for t in range(T):
    for s in range(T):
      if doc[s] != doc[t]:
        assert np.all(jac[t, :, s] == 0.0), f"token {t} sees token {s} of another document"


def test_short_conv_segment_state_gradient_only_first_document() -> None:
  conv = _conv()
  x = jnp.asarray(_rng(7).normal(size=(1, SEGMENTS.shape[1], 3)), jnp.float32)
  state = jnp.asarray(_rng(8).normal(size=(1, K - 1, 3)), jnp.float32)
  fn = lambda st: conv(x, segment_ids=jnp.asarray(SEGMENTS), state=st)[0]
  jac = np.asarray(jax.jacrev(fn)(state))  # [T, C, 1, K-1, C]
  first_len = DOC_BOUNDS[0][1]
  assert np.any(jac[:first_len] != 0.0)
  assert np.all(jac[first_len:] == 0.0)


def test_short_conv_prefill_then_step_equals_full_call() -> None:
  rng = _rng(9)
  conv = _conv()
  T, prefill = 9, 5
  x = jnp.asarray(rng.normal(size=(2, T, 3)), jnp.float32)
  y_full = conv(x)
  y_pre, state = conv(x[:, :prefill], return_state=True)
  ys = [y_pre]
  for t in range(prefill, T):
    y_t, state = conv.step(x[:, t], state)
    ys.append(y_t[:, None])
  np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1)), np.asarray(y_full),
                             rtol=RTOL, atol=ATOL)
  # decoding from scratch with init_state
  state = conv.init_state(2, jnp.float32)
  assert state.shape == (2, K - 1, 3) and not np.any(np.asarray(state))
  ys = []
  for t in range(T):
    y_t, state = conv.step(x[:, t], state)
    ys.append(y_t)
  np.testing.assert_allclose(np.asarray(jnp.stack(ys, 1)), np.asarray(y_full),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(state), np.asarray(x[:, -(K - 1):]))


@pytest.mark.parametrize("t1", [5, 2])
def test_short_conv_state_continuation_equals_one_call(t1: int) -> None:
  rng = _rng(10)
  conv = _conv()
  t2 = 7
  x = jnp.asarray(rng.normal(size=(2, t1 + t2, 3)), jnp.float32)
  state0 = jnp.asarray(rng.normal(size=(2, K - 1, 3)), jnp.float32)
  y_full, state_full = conv(x, state=state0, return_state=True)
  y1, state1 = conv(x[:, :t1], state=state0, return_state=True)
  if t1 < K - 1:  # shifted in from the old state
    expected_state1 = jnp.concatenate([state0, x[:, :t1]], axis=1)[:, -(K - 1):]
    np.testing.assert_array_equal(np.asarray(state1), np.asarray(expected_state1))
  y2, state2 = conv(x[:, t1:], state=state1, return_state=True)
  np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y_full),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(state2), np.asarray(state_full))


# ------------------------------------------------------------------------------------- rope
def _np_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """Pair (j, j + D/2) rotated by angle p * theta^(-2j/D), written per pair."""
  x = x.astype(np.float64)
  D = x.shape[-1]
  half = D // 2
  out = np.empty_like(x)
  for j in range(half):
    angle = positions.astype(np.float64) * theta ** (-2.0 * j / D)  # [B, T]
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]      # [B, T, 1] over heads
    a, b = x[..., j], x[..., j + half]                              # [B, T, H]
    out[..., j] = a * c - b * s
    out[..., j + half] = b * c + a * s
  return out


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_numpy(theta: float) -> None:
  rng = _rng(11)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 200, size=(2, 5)).astype(np.int32)
  y = apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=theta)
  assert y.shape == x.shape and y.dtype == jnp.float32
  # float32 angles of positions up to 200: allow a few ulps of the angle
  np.testing.assert_allclose(np.asarray(y), _np_rope(x, positions, theta), rtol=1e-4, atol=1e-4)
  freqs = np.asarray(rope_frequencies(8, theta))
  np.testing.assert_allclose(freqs, theta ** (-np.arange(4) * 2.0 / 8), rtol=1e-6)
  yb = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions), theta=theta)
  assert yb.dtype == jnp.bfloat16


def test_rope_position_zero_is_identity() -> None:
  x = jnp.asarray(_rng(12).normal(size=(1, 4, 2, 6)), jnp.float32)
  y = apply_rope(x, jnp.zeros((1, 4), jnp.int32))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_rope_scores_depend_on_relative_position_only() -> None:
  rng = _rng(13)
  D = 16
  q = jnp.asarray(rng.normal(size=(1, 1, 1, D)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, D)), jnp.float32)
  pos = lambda p: jnp.full((1, 1), p, jnp.int32)
  score = lambda p, p2: float(jnp.sum(apply_rope(q, pos(p)) * apply_rope(k, pos(p2))))
  for p, p2 in [(3, 1), (0, 9), (17, 17)]:
    base = score(p, p2)
    for shift in (1, 5, 40):
      np.testing.assert_allclose(score(p + shift, p2 + shift), base, rtol=1e-4, atol=1e-4)
  # and it does depend on the offset (the test above could not pass vacuously)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3


def test_rope_odd_head_dim_raises() -> None:
  with pytest.raises(ValueError, match="head_dim"):
    rope_frequencies(7)
  with pytest.raises(ValueError, match="head_dim"):
    apply_rope(jnp.ones((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32))
