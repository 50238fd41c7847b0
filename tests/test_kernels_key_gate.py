"""The per-key-gate kernels (`pallas_kernels.fused_terms.key_kernels`) against plain JAX.

On CPU the kernels run in the Pallas interpreter, natively on a GPU host. Compared: o, the final state
and the gradients of q, k, v, b and the initial state of the loss
sum(o w) + sum(final^2), against a float32 reference that forms the in-chunk
scores from an explicit masked [C, C, K] exponent and runs the chunk recurrence
of `chunk_recurrence.reference` (its gradients by autodiff); bf16 inputs against
the reference on the same rounded values. Gates mix strengths across keys; one
case has strong gates (-5 to -30 per token on some keys), where any split
exp(b_i) exp(-b_j) would overflow. Also: both kernels lower for CUDA (Triton).

Legend: R rows, N chunks, C chunk length, K key dim, V value dim.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as h

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.chunk_recurrence.reference import chunk_recurrence
from pallas_kernels.fused_terms import gated_chunks

f32 = jnp.float32
INTERPRET = jax.default_backend() != "gpu"   # natively on a GPU host
NAMES = ("q", "k", "v", "b", "h0")
BLOCKS = BlockSizes(block_v=16, block_k=16)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, rel: jax.Array | None,
              h0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(o, final state) in float32 by the math of `fused_terms/key_kernels.py`, every chunk at once.

  The gaps that are 0 by construction (A's diagonal, c at the last token) are constants,
  so they pass no gradient to b (the kernel leaves them out exactly).
  """
  q, k, v = (x.astype(f32) for x in (q, k, v))
  chunk = q.shape[2]
  pos = jnp.arange(chunk)
  causal = pos[None, :] <= pos[:, None]
  strict = pos[None, :] < pos[:, None]
  is_last = (pos == chunk - 1)[:, None]
  b_last = b[..., -1:, :]
  start = end = carry = True
  if rel is not None:
    same = rel[..., :, None] == rel[..., None, :]
    causal, strict = causal & same, strict & same
    rel_last = rel[..., -1:]
    start, end, carry = ((rel == 0)[..., None], (rel == rel_last)[..., None],
                         (rel_last == 0)[..., None])
  gaps = b[..., :, None, :] - b[..., None, :, :]                       # [R,N,C,C,K]
  gaps = jnp.where(strict[..., None], gaps, 0.0)
  decays = jnp.where(causal[..., None], jnp.exp(gaps), 0.0)
  scores = jnp.einsum("rnik,rnjk,rnijk->rnij", q, k, decays)
  q_in = q * jnp.where(start, jnp.exp(b), 0.0)
  k_out = k * jnp.where(end, jnp.exp(jnp.where(is_last, 0.0, b_last - b)), 0.0)
  decay = jnp.where(carry, jnp.exp(b_last), 0.0)
  o, _, final = chunk_recurrence(q_in, k_out, scores, v, None, decay, h0)
  return o, final


def _value_and_grad(fn: Callable[..., tuple[jax.Array, jax.Array]]) -> Callable:
  """jit(value_and_grad) of sum(o w) + sum(final^2) in q, k, v, b, h0, with (o, final) as aux."""
  def loss(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, h0: jax.Array,
           rel: jax.Array | None, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    o, final = fn(q, k, v, b, rel, h0)
    return jnp.sum(o.astype(f32) * w) + jnp.sum(final ** 2), (o, final)
  # LLVM optimisation off: it halves the compile time of the interpreted kernels' unrolled
  # bodies (seconds of compiling against milliseconds of running).
  return jax.jit(jax.value_and_grad(loss, tuple(range(len(NAMES))), has_aux=True),
                 compiler_options={"xla_backend_optimization_level": 0})


# Module level, so cases of one shape and dtype share a compilation.
KERNEL = _value_and_grad(
    lambda *xs: gated_chunks(*xs, blocks=BLOCKS, interpret=INTERPRET))
REFERENCE = _value_and_grad(reference)


def make_inputs(seed: int, chunk: int, *, docs: bool, strong: bool, rows: int = 2,
                num: int = 2, key_dim: int = 32, value_dim: int = 32) -> dict:
  """Random float32 inputs [R, N, C, ...], b the in-chunk cumsum of per-key log gates, rel
  (or None) and the loss weights w."""
  rng = np.random.default_rng(seed)
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  shape = (rows, num, chunk)
  # Mixed strengths across keys: from almost no decay (key K-1) to a strong one (key 0).
  logits = np.linspace(-4.0, 6.0, key_dim) + rng.normal(size=(*shape, key_dim))
  g = log_sigmoid(logits)
  if strong:  # every other key decays by 5 to 30 per token
    g[..., ::2] = -rng.uniform(5.0, 30.0, size=(*shape, key_dim // 2))
  rel = None
  if docs:
    starts = rng.random(shape) < 3.0 / chunk
    starts[..., chunk // 2] = True                     # at least two documents
    starts[0, 0, 0] = True                             # a chunk with no incoming document
    rel = jnp.asarray(np.cumsum(starts, axis=-1), jnp.int32)
  return dict(q=rng.normal(size=(*shape, key_dim)) * key_dim ** -0.5,
              k=rng.normal(size=(*shape, key_dim)), v=rng.normal(size=(*shape, value_dim)),
              b=np.cumsum(g, axis=2), h0=rng.normal(size=(rows, key_dim, value_dim)),
              rel=rel, w=rng.normal(size=(*shape, value_dim)))


def _error(got: jax.Array, want: jax.Array) -> float:
  """max |got - want| relative to max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values"
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


SLOW = pytest.mark.slow   # the op tests of tests/test_kernels.py cover C=64 with documents
CASES = [  # (chunk, N, docs, strong gates, dtype)
    pytest.param(64, 2, True, False, jnp.float32, marks=SLOW),
    pytest.param(64, 2, True, True, jnp.float32, marks=SLOW),
    pytest.param(16, 3, False, False, jnp.float32),
    pytest.param(32, 2, False, True, jnp.float32),
    pytest.param(32, 2, True, False, jnp.bfloat16, marks=SLOW),
]


@pytest.mark.parametrize(
    "chunk,num,docs,strong,dtype", CASES,
    ids=[f"C{c}-N{n}{'-docs' if d else ''}{'-strong' if s else ''}-{jnp.dtype(t).name}"
         for c, n, d, s, t in (p.values for p in CASES)])
def test_matches_reference(chunk: int, num: int, docs: bool, strong: bool,
                           dtype: jnp.dtype) -> None:
  """o, the final state and the gradients of every input agree with the float32 reference."""
  x = make_inputs(chunk + num + 10 * strong, chunk, docs=docs, strong=strong, num=num)
  # bf16: q, k, v rounded in numpy; the reference takes the same rounded values in float32.
  rounded = {n: np.asarray(x[n]).astype(dtype) for n in ("q", "k", "v")}
  args = [jnp.asarray(rounded[n]) if n in rounded else jnp.asarray(x[n], f32) for n in NAMES]
  ref_args = [jnp.asarray(rounded[n].astype(np.float32)) if n in rounded
              else jnp.asarray(x[n], f32) for n in NAMES]
  w = jnp.asarray(x["w"], f32)
  (_, (o, final)), grads = KERNEL(*args, x["rel"], w)
  with jax.default_matmul_precision("highest"):
    (_, (o_ref, final_ref)), grads_ref = REFERENCE(*ref_args, x["rel"], w)
  assert o.dtype == dtype and final.dtype == f32
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  errors = {"o": _error(o, o_ref), "final": _error(final, final_ref)}
  for name, g, g_ref, a in zip(NAMES, grads, grads_ref, args):
    assert g.dtype == a.dtype, name
    errors["d" + name] = _error(g, g_ref)
  if strong:  # the strong keys' gate gradients on their own (small, but not lost)
    errors["db strong keys"] = _error(grads[3][..., ::2], grads_ref[3][..., ::2])
  print(" ".join(f"{n}={e:.1e}" for n, e in errors.items()))
  bad = {n: e for n, e in errors.items() if not e <= tol}
  assert not bad, f"errors above {tol}: {bad}"


LOWERED = [  # (chunk, K, V, dtype, docs)
    (64, 128, 128, jnp.bfloat16, True),
    (64, 16, 256, jnp.float32, False),
]


@pytest.mark.parametrize("chunk,key_dim,value_dim,dtype,docs", LOWERED,
                         ids=[f"C{c}-K{k}-V{v}-{jnp.dtype(t).name}{'-docs' if d else ''}"
                              for c, k, v, t, d in LOWERED])
@pytest.mark.slow   # tests/test_kernels_lowering.py lowers these kernels through the op
def test_lowers_for_cuda(chunk: int, key_dim: int, value_dim: int, dtype: jnp.dtype,
                         docs: bool) -> None:
  """The score, output and gradient kernels lower through Triton for an H100 (`jax.export`)."""
  rows, num = 2, 2
  blocks = BlockSizes.default("gpu", key_dim, value_dim)
  spec = lambda *shape, dtype=f32: jax.ShapeDtypeStruct(shape, dtype)
  args = [spec(rows, num, chunk, key_dim, dtype=dtype)] * 2
  args += [spec(rows, num, chunk, value_dim, dtype=dtype), spec(rows, num, chunk, key_dim),
           spec(rows, key_dim, value_dim)]
  rel = spec(rows, num, chunk, dtype=jnp.int32) if docs else None

  def loss(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, h0: jax.Array,
           rel: jax.Array | None) -> jax.Array:
    o, final = gated_chunks(q, k, v, b, rel, h0, blocks=blocks)
    return jnp.sum(o.astype(f32)) + jnp.sum(final ** 2)

  fn = jax.jit(jax.value_and_grad(loss, tuple(range(5))))
  text = h.export_cuda(fn, *args, rel)
  names = ("key_gate_scores", "key_gate_outputs", "key_gate_value_gradients",
           "key_gate_gradients")
  for name in names:
    assert name in text, f"kernel {name} not in the lowered module"
  # the four and the two state kernels: the backward reads the forward's A, no second scores
  assert text.count("__gpu$xla.gpu.triton") == 6
