"""The UT-transform kernel (`pallas_kernels.fused_terms.ut_transform`) against plain JAX.

On CPU the kernels run in the Pallas interpreter, natively on a GPU host. Compared: U, W_k and the
gradients of k, p, v, beta, strength and cum of a random linear loss, against
a float32 reference of the same math built on `triangular.unit_lower_inverse`
(its gradients by autodiff); bf16 inputs against the reference on the same
rounded values. Also: the kernel equals `delta_terms.chunk_terms` on its own layout,
and the forward and backward kernels lower for CUDA (Triton).

Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as h

from jaxlin.ops import chunking, delta_terms
from jaxlin.ops.triangular import unit_lower_inverse
from pallas_kernels.fused_terms.ut_transform import ut_transform

f32 = jnp.float32
INTERPRET = jax.default_backend() != "gpu"   # natively on a GPU host
NAMES = ("k", "p", "v", "beta", "strength", "cum")


def reference(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array, strength: jax.Array,
              cum: jax.Array, rel: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(U, W_k) in float32 by the module docstring's math, every chunk at once."""
  k, p, v = (x.astype(f32) for x in (k, p, v))
  chunk = k.shape[2]
  pos = jnp.arange(chunk)
  mask = pos[None, :] < pos[:, None]
  incoming = jnp.exp(cum)
  if rel is not None:
    mask = mask & (rel[..., :, None] == rel[..., None, :])
    incoming = jnp.where(rel == 0, incoming, 0.0)
  gaps = cum[..., :, None] - cum[..., None, :]
  decays = jnp.where(mask, jnp.exp(jnp.where(mask, gaps, 0.0)), 0.0)
  lower = strength[..., None] * jnp.einsum("rnik,rnjk->rnij", p, k) * decays
  inverse = unit_lower_inverse(lower)
  u = inverse @ (beta[..., None] * v)
  w = inverse @ ((strength * incoming)[..., None] * p)
  return u, w


def make_inputs(seed: int, chunk: int, key_dim: int, value_dim: int, *, docs: bool,
                same_pk: bool, strong: bool, rows: int = 2, num: int = 2) -> dict:
  """Random inputs [R, N, C, ...] (float32; k, p rows unit norm) and rel (or None)."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  shape = (rows, num, chunk)
  k = unit(rng.normal(size=(*shape, key_dim)))
  p = k if same_pk else unit(k + rng.normal(size=k.shape))
  v = rng.normal(size=(*shape, value_dim))
  gates = rng.normal(-1.0, 1.5, shape) if strong else rng.normal(3.0, 1.0, shape)
  cum = np.cumsum(log_sigmoid(gates), axis=-1)
  rel = None
  if docs:
    starts = rng.random(shape) < 3.0 / chunk
    starts[..., chunk // 2] = True                     # at least two documents
    starts[0, 0, 0] = True                             # one chunk with no incoming document
    rel = jnp.asarray(np.cumsum(starts, axis=-1), jnp.int32)
  arrays = dict(k=k, p=p, v=v, beta=sigmoid(rng.normal(size=shape)),
                strength=sigmoid(rng.normal(size=shape)), cum=cum)
  out = {name: jnp.asarray(x, f32) for name, x in arrays.items()}
  out["rel"] = rel
  return out


def _value_and_grad(fn: Callable[..., tuple[jax.Array, jax.Array]]) -> Callable:
  """jit(value_and_grad) of sum(U w_u) + sum(W_k w_w) in k, p, v, beta, strength and cum,
  with (U, W_k) as aux."""
  def loss(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array, strength: jax.Array,
           cum: jax.Array, rel: jax.Array | None, w_u: jax.Array,
           w_w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    u, w = fn(k, p, v, beta, strength, cum, rel)
    return jnp.sum(u.astype(f32) * w_u) + jnp.sum(w.astype(f32) * w_w), (u, w)
  return jax.jit(jax.value_and_grad(loss, tuple(range(len(NAMES))), has_aux=True))


# Module level, so cases of one shape and dtype share a compilation.
KERNEL = _value_and_grad(lambda *xs: ut_transform(*xs, interpret=INTERPRET))
REFERENCE = _value_and_grad(reference)


def _error(got: jax.Array, want: jax.Array) -> float:
  """max |got - want| relative to max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _weights(u_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The loss weights w_u, w_w (numpy draws: eager jax.random would compile per shape)."""
  rng = np.random.default_rng(7)
  return (jnp.asarray(rng.normal(size=u_shape), f32), jnp.asarray(rng.normal(size=w_shape), f32))


SLOW = pytest.mark.slow   # the D op tests of tests/test_kernels.py run these kernels too
CASES = [  # (chunk, K, V, docs, p = k, strong gate, dtype)
    pytest.param(64, 32, 32, True, False, False, jnp.float32, marks=SLOW),
    pytest.param(64, 32, 32, True, True, True, jnp.float32, marks=SLOW),
    pytest.param(16, 32, 32, False, False, False, jnp.float32),
    pytest.param(32, 16, 64, False, True, False, jnp.float32, marks=SLOW),
    pytest.param(64, 32, 32, True, False, False, jnp.bfloat16, marks=SLOW),
    pytest.param(32, 32, 32, False, False, True, jnp.bfloat16),
    # K, V > 64: the backward kernels walk two 64-column blocks of each.
    pytest.param(16, 128, 128, True, False, False, jnp.float32),
    # K, V > 128: the forward kernel walks two 128-column blocks of each.
    pytest.param(32, 256, 256, True, False, False, jnp.float32),
]


@pytest.mark.parametrize(
    "chunk,key_dim,value_dim,docs,same_pk,strong,dtype", CASES,
    ids=[f"C{c}-K{k}-V{v}{'-docs' if d else ''}{'-pk' if s else ''}{'-strong' if g else ''}"
         f"-{jnp.dtype(t).name}" for c, k, v, d, s, g, t in (p.values for p in CASES)])
def test_matches_reference(chunk: int, key_dim: int, value_dim: int, docs: bool, same_pk: bool,
                           strong: bool, dtype: jnp.dtype) -> None:
  """Outputs and the gradients of every input agree with the float32 reference."""
  x = make_inputs(chunk + key_dim + value_dim, chunk, key_dim, value_dim, docs=docs,
                  same_pk=same_pk, strong=strong)
  # bf16: k, p, v rounded in numpy; the reference takes the same rounded values in float32.
  rounded = {n: np.asarray(x[n]).astype(dtype) for n in ("k", "p", "v")}
  args = [jnp.asarray(rounded[n]) if n in rounded else x[n] for n in NAMES]
  ref_args = [jnp.asarray(rounded[n].astype(np.float32)) if n in rounded else x[n] for n in NAMES]
  w_u, w_w = _weights(args[2].shape, args[0].shape)
  (value, (u, w)), grads = KERNEL(*args, x["rel"], w_u, w_w)
  (value_ref, (u_ref, w_ref)), grads_ref = REFERENCE(*ref_args, x["rel"], w_u, w_w)
  assert u.dtype == dtype and w.dtype == dtype
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  # The loss is a sum that cancels heavily: its error is taken relative to sum |terms|.
  mass = jnp.sum(jnp.abs(u_ref * w_u)) + jnp.sum(jnp.abs(w_ref * w_w))
  errors = {"U": _error(u, u_ref), "W_k": _error(w, w_ref),
            "loss": float(jnp.abs(value - value_ref) / mass)}
  for name, g, g_ref, a in zip(NAMES, grads, grads_ref, args):
    assert g.dtype == a.dtype, name
    errors["d" + name] = _error(g, g_ref)
  print(" ".join(f"{n}={e:.1e}" for n, e in errors.items()))
  bad = {n: e for n, e in errors.items() if not e <= tol}
  assert not bad, f"errors above {tol}: {bad}"


@pytest.mark.slow   # the D op tests compare the same path with the reference
def test_matches_chunk_terms() -> None:
  """U and W_k equal `delta_terms.chunk_terms` (gated, with documents) on the same chunks."""
  # R = B H = 2, N = 2, C = 64, K = V = 32: the shapes of the first case (its compilation).
  batch, time, heads, chunk, key_dim, value_dim = 1, 128, 2, 64, 32, 32
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  normal = lambda *shape: rng.normal(size=shape)
  k = jnp.asarray(unit(normal(batch, time, heads, key_dim)), f32)
  p = jnp.asarray(unit(normal(batch, time, heads, key_dim)), f32)
  v = jnp.asarray(normal(batch, time, heads, value_dim), f32)
  beta, b = (jnp.asarray(1.0 / (1.0 + np.exp(-normal(batch, time, heads))), f32)
             for _ in range(2))
  g = jnp.asarray(-np.logaddexp(0.0, -rng.normal(3.0, 1.0, (batch, time, heads))), f32)
  segment_ids = jnp.zeros((batch, time), jnp.int32).at[:, 20:].set(1).at[:, 90:].set(2)
  rows = lambda x: x.reshape(batch * heads, *x.shape[2:])

  @jax.jit
  def xla_terms(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array, b: jax.Array,
                g: jax.Array, segment_ids: jax.Array) -> tuple:
    """(U, W_k) of `delta_terms.chunk_terms` and the kernel's inputs, [R, N, C, ...]."""
    terms = delta_terms.chunk_terms(k, k, v, beta, g, p, b, segment_ids, chunk)
    docs = chunking.document_masks(segment_ids, chunk)
    cum = chunking.chunk_cumsum(chunking.to_chunks(g, chunk), docs.same)   # [B, H, N, C]
    rel = jnp.broadcast_to(chunking.documents_in_chunk(segment_ids, chunk), cum.shape)
    chunks = lambda x: rows(chunking.to_chunks(x, chunk))
    args = [chunks(k), chunks(p), chunks(v), chunks(beta), chunks(b), rows(cum), rows(rel)]
    return rows(terms.values), rows(terms.w_k), args

  u_ref, w_ref, (*args, rel) = xla_terms(k, p, v, beta, b, g, segment_ids)
  w_u, w_w = _weights(args[2].shape, args[0].shape)
  (_, (u, w)), _ = KERNEL(*args, rel, w_u, w_w)
  assert _error(u, u_ref) < 1e-5
  assert _error(w, w_ref) < 1e-5


LOWERED = [  # (chunk, K, V, dtype, docs)
    (64, 128, 128, jnp.bfloat16, True),
    (16, 16, 256, jnp.float32, False),
    (32, 256, 16, jnp.float16, True),
]


@pytest.mark.parametrize("chunk,key_dim,value_dim,dtype,docs", LOWERED,
                         ids=[f"C{c}-K{k}-V{v}-{jnp.dtype(t).name}{'-docs' if d else ''}"
                              for c, k, v, t, d in LOWERED])
def test_lowers_for_cuda(chunk: int, key_dim: int, value_dim: int, dtype: jnp.dtype,
                         docs: bool) -> None:
  """The forward and backward kernels lower through Triton for an H100 (`jax.export`)."""
  rows, num = 2, 2
  spec = lambda *shape, dtype=f32: jax.ShapeDtypeStruct(shape, dtype)
  args = [spec(rows, num, chunk, key_dim, dtype=dtype)] * 2
  args += [spec(rows, num, chunk, value_dim, dtype=dtype)] + [spec(rows, num, chunk)] * 3
  rel = spec(rows, num, chunk, dtype=jnp.int32) if docs else None

  def loss(k: jax.Array, p: jax.Array, v: jax.Array, beta: jax.Array, strength: jax.Array,
           cum: jax.Array, rel: jax.Array | None) -> jax.Array:
    u, w = ut_transform(k, p, v, beta, strength, cum, rel)
    return jnp.sum(u.astype(f32)) + jnp.sum(w.astype(f32) ** 2)

  fn = jax.jit(jax.value_and_grad(loss, tuple(range(6))))
  text = h.export_cuda(fn, *args, rel)
  for name in ("ut_transform_fwd", "ut_transform_bwd_columns", "ut_transform_bwd_keys"):
    assert name in text, f"kernel {name} not in the lowered module"
  assert text.count("__gpu$xla.gpu.triton") == 3
