"""Softmax dot-product attention with GQA, causal / sliding-window masks and packed documents.

Per query head h (kv head h // (H / Hkv)), query token t at position p_t, key token s at p'_s:

    visible(t, s) = [p'_s <= p_t if causal] and [p'_s > p_t - window if window]
                    and [segment_ids_q[t] == segment_ids_kv[s] if segment ids]
    a_ts = scale * <q_t, k_s>      (float32),   scale = D**-0.5 by default
    o_t  = sum_s softmax_s(a_ts | visible) v_s,  and o_t = 0 when no s is visible.

Positions default to the bottom-right alignment of flash-attention: kv_positions = 0 .. S-1 and
q_positions = S-T .. S-1 (the queries are the last T of the keys; T == S is plain self-attention).
`segment_ids_kv` defaults to `segment_ids_q` (and vice versa) when T == S. Ids are compared for
equality (as splash / cuDNN do): for run-based documents where a later document may reuse an id,
pass `jaxlin.ops.documents.document_index(ids)` (the layer does).

Implementations (`impl`), all with a float32 softmax:
* "reference": float32 einsum + mask + softmax, the ground truth (any call).
* "xla": `jax.nn.dot_product_attention(implementation="xla")` with a boolean mask built from the
  positions and segment ids; when q, k, v dtypes differ (jax.nn needs one dtype) the reference
  math runs instead.
* "cudnn" (NVIDIA GPU): `jax.nn.dot_product_attention(implementation="cudnn")` with `is_causal`
  and `local_window_size=(window - 1, 0)` (cuDNN's sliding window is (p - window, p] with the
  causal mask); segment ids go in as a boolean mask, which jax turns into an additive [B,1,T,S]
  bias (memory O(B T S), still far below the xla path's [B,H,T,S] logits). Supported: bf16/f16,
  one dtype, D % 8 == 0 and D <= 128, default positions, T == S when causal, T and S even when
  segment ids are given (cuDNN's rule for a bias in training), compute capability >= 8.0.
  Anything else runs "xla". Rows that see no key (possible only with distinct q / kv ids) are
  zeroed afterwards.
* "pallas" (TPU): the splash-attention kernel (`jax.experimental.pallas.ops.tpu.
  splash_attention`; GQA native, causal / local masks with the bottom-right offset, segment ids,
  custom VJP with backward kernels), vmapped over the batch. Supported: float32/bf16, one dtype,
  T, S and D multiples of 128, default positions, T <= S when causal, and segment ids only as one
  shared array (T == S), since splash needs every row to see a key. Anything else runs "xla".
* "auto": "pallas" on TPU, "cudnn" on NVIDIA GPU, when `supports(...)` says so; else "xla".

A call that an implementation does not support falls back (see `resolve_impl`); it never returns
a wrong answer. What is checked where (tests/test_ops_attention.py): reference and xla (values and
gradients) and the splash wrapper in Pallas interpret mode are executed on CPU; the splash kernels
(forward and gradients) are lowered for TPU with `jax.export`; the cuDNN call is lowered for CUDA
(jax's cuDNN version probe patched, since a CPU jaxlib has no cuDNN), so its argument handling is
checked, but its numerics only run on a GPU: call `self_check("cudnn")` there.

Shape legend: B batch, T query length, S key length, H query heads, Hkv key/value heads
(H % Hkv == 0), D head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

from jaxlin.ops.arguments import _describe, check_float, check_integer_array

f32 = jnp.float32
IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")
_SPLASH_BLOCKS = (512, 256, 128)


# ------------------------------------------------------------------------------- arguments
def _check_args(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, window: int | None,
                segment_ids_q: jax.Array | None, segment_ids_kv: jax.Array | None,
                q_positions: jax.Array | None, kv_positions: jax.Array | None,
                impl: str) -> None:
  """Raises ValueError naming the argument, what it got and what was expected."""
  if impl not in IMPLS:
    raise ValueError(f"impl: got {impl!r}; expected one of {IMPLS}")
  for name, x, legend in (("q", q, "[B,T,H,D]"), ("k", k, "[B,S,Hkv,D]"),
                          ("v", v, "[B,S,Hkv,D]")):
    if x.ndim != 4:
      raise ValueError(f"{name}: got {_describe(x)}; expected rank 4 ({legend})")
    check_float(name, x)
  B, T, H, D = q.shape
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"k: got {_describe(k)}; expected [B,S,Hkv,D] with B={B} and D={D} like q")
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v: got {_describe(v)}; expected [B,S,Hkv,D] = {tuple(k.shape)} like k")
  Hkv = k.shape[2]
  if H % Hkv:
    raise ValueError(f"k: got {Hkv} kv heads ({_describe(k)}); the {H} query heads of q must "
                     f"be a multiple of Hkv, allowed Hkv: "
                     f"{[d for d in range(1, H + 1) if H % d == 0]}")
  if not isinstance(causal, (bool, np.bool_)):
    raise ValueError(f"causal: got {causal!r}; expected True or False")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
      raise ValueError(f"window: got {window!r}; expected None or an int >= 1")
    if not causal:
      raise ValueError(f"window: got {window} with causal=False; a sliding window needs "
                       "causal=True (keys at positions in (p - window, p])")
  S = k.shape[1]
  check_integer_array("segment_ids_q", segment_ids_q, [(B, T)], "[B,T]")
  check_integer_array("segment_ids_kv", segment_ids_kv, [(B, S)], "[B,S]")
  if T != S and (segment_ids_q is None) != (segment_ids_kv is None):
    missing = "segment_ids_kv" if segment_ids_kv is None else "segment_ids_q"
    raise ValueError(f"{missing}: got None while the other segment ids are given and T={T} != "
                     f"S={S}; expected both (they default to each other only when T == S)")
  check_integer_array("q_positions", q_positions, [(B, T), (T,)], "[B,T] or [T]")
  check_integer_array("kv_positions", kv_positions, [(B, S), (S,)], "[B,S] or [S]")


def _pair_ids(segment_ids_q: jax.Array | None, segment_ids_kv: jax.Array | None
              ) -> tuple[jax.Array | None, jax.Array | None, bool]:
  """(ids_q, ids_kv, shared): fills a missing side from the other; shared = one array."""
  if segment_ids_q is None and segment_ids_kv is None:
    return None, None, True
  shared = segment_ids_q is None or segment_ids_kv is None or segment_ids_q is segment_ids_kv
  ids_q = segment_ids_kv if segment_ids_q is None else segment_ids_q
  ids_kv = segment_ids_q if segment_ids_kv is None else segment_ids_kv
  return ids_q, ids_kv, shared


# --------------------------------------------------------------------------- implementation choice
def _platform() -> str:
  """The default backend as "cpu", "tpu", "cuda" or "rocm"."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = jax.extend.backend.get_backend().platform_version.lower()
  return "rocm" if "rocm" in version else "cuda"


def _cuda_capability_ok() -> bool:
  """Compute capability >= 8.0 (cuDNN flash attention) on the default device, if it says."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is None:
    return True
  return tuple(int(c) for c in str(capability).split(".")[:2]) >= (8, 0)


def supports(impl: str, q: Any, k: Any, v: Any, *, causal: bool = True,
             window: int | None = None, segment_ids_q: Any = None, segment_ids_kv: Any = None,
             q_positions: Any = None, kv_positions: Any = None,
             backend: str | None = None) -> bool:
  """Whether `impl` runs this call natively on `backend` (default: jax's default backend).

  q, k, v may be arrays or `jax.ShapeDtypeStruct`s (only shapes and dtypes are read). The
  conditions per implementation are listed in the module docstring.
  """
  platform = _platform() if backend is None else {"gpu": "cuda"}.get(backend, backend)
  B, T, H, D = q.shape
  S = k.shape[1]
  one_dtype = q.dtype == k.dtype == v.dtype
  default_positions = q_positions is None and kv_positions is None
  has_ids = segment_ids_q is not None or segment_ids_kv is not None
  shared = (segment_ids_q is None or segment_ids_kv is None
            or segment_ids_q is segment_ids_kv)
  if impl == "reference":
    return True
  if impl == "xla":
    return one_dtype
  if impl == "cudnn":
    return (platform == "cuda" and one_dtype and q.dtype in (jnp.bfloat16, jnp.float16)
            and D % 8 == 0 and D <= 128 and default_positions and (T == S or not causal)
            and (not has_ids or (T % 2 == 0 and S % 2 == 0))
            and (backend is not None or _cuda_capability_ok()))
  if impl == "pallas":
    return (platform == "tpu" and one_dtype and q.dtype in (jnp.float32, jnp.bfloat16)
            and T % 128 == 0 and S % 128 == 0 and D % 128 == 0 and default_positions
            and (T <= S or not causal) and (not has_ids or (shared and T == S)))
  raise ValueError(f"impl: got {impl!r}; expected one of {IMPLS}")


def resolve_impl(impl: str, q: Any, k: Any, v: Any, *, backend: str | None = None,
                 **mask_args: Any) -> str:
  """The implementation that `dot_product_attention(..., impl=impl)` runs for this call.

  "auto" -> "pallas" on TPU / "cudnn" on NVIDIA GPU where supported, else "xla"; an explicit
  "cudnn" or "pallas" that is not supported -> "xla"; "xla" with mixed dtypes -> "reference".
  `mask_args` are the keyword arguments of `supports`.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl: got {impl!r}; expected one of {IMPLS}")
  platform = _platform() if backend is None else {"gpu": "cuda"}.get(backend, backend)
  if impl == "auto":
    impl = {"tpu": "pallas", "cuda": "cudnn"}.get(platform, "xla")
  if impl in ("cudnn", "pallas") and not supports(impl, q, k, v, backend=backend, **mask_args):
    impl = "xla"
  if impl == "xla" and not supports("xla", q, k, v, **mask_args):
    impl = "reference"
  return impl


# ------------------------------------------------------------------------------------ masks
def visibility(B: int, T: int, S: int, *, causal: bool, window: int | None,
               segment_ids_q: jax.Array | None, segment_ids_kv: jax.Array | None,
               q_positions: jax.Array | None, kv_positions: jax.Array | None
               ) -> jax.Array | None:
  """[B, T, S] bool: query t may attend to key s (None when every pair is visible)."""
  mask = None
  if causal:
    qp = (jnp.arange(T, dtype=jnp.int32) + (S - T)) if q_positions is None else q_positions
    kp = jnp.arange(S, dtype=jnp.int32) if kv_positions is None else kv_positions
    qp = jnp.atleast_2d(qp).astype(jnp.int32)[:, :, None]      # [B|1, T, 1]
    kp = jnp.atleast_2d(kp).astype(jnp.int32)[:, None, :]      # [B|1, 1, S]
    mask = kp <= qp
    if window is not None:
      mask = mask & (kp > qp - window)
  if segment_ids_q is not None:
    same = segment_ids_q[:, :, None] == segment_ids_kv[:, None, :]
    mask = same if mask is None else mask & same
  return None if mask is None else jnp.broadcast_to(mask, (B, T, S))


def _zero_empty_rows(o: jax.Array, mask: jax.Array) -> jax.Array:
  """o [B,T,H,D] with the rows of queries that see no key set to 0."""
  return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], o, jnp.zeros((), o.dtype))


# ---------------------------------------------------------------------------- implementations
def _reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
               scale: float) -> jax.Array:
  """float32 einsum + masked softmax; fully masked rows give 0 (no NaN in value or grad)."""
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  qg = q.astype(f32).reshape(B, T, Hkv, H // Hkv, D)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(f32)) * scale
  if mask is not None:
    s = jnp.where(mask[:, None, None], s, -jnp.inf)   # mask before exp
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(f32))
  return o.reshape(B, T, H, D).astype(q.dtype)


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
         scale: float) -> jax.Array:
  """jax.nn.dot_product_attention (xla) with a [B,1,T,S] boolean mask."""
  o = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                   scale=scale, implementation="xla")
  return o if mask is None else _zero_empty_rows(o, mask)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: int | None,
           ids_q: jax.Array | None, ids_kv: jax.Array | None, shared: bool,
           scale: float) -> jax.Array:
  """jax.nn.dot_product_attention (cudnn): causal / window natively, ids as a mask."""
  B, T, _, _ = q.shape
  S = k.shape[1]
  mask = None if ids_q is None else (ids_q[:, :, None] == ids_kv[:, None, :])[:, None]
  o = jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=causal,
      local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
  if ids_q is not None and not (shared and T == S):
    o = _zero_empty_rows(o, visibility(B, T, S, causal=causal, window=window,
                                       segment_ids_q=ids_q, segment_ids_kv=ids_kv,
                                       q_positions=None, kv_positions=None))
  return o


def _block(n: int) -> int:
  """The largest splash block size dividing n (n is a multiple of 128)."""
  return next(b for b in _SPLASH_BLOCKS if n % b == 0)


def _splash_kernel(H: int, T: int, S: int, causal: bool, window: int | None,
                   interpret: bool) -> Any:
  """A splash-attention kernel for [H,T,D] x [Hkv,S,D] with a static causal/local/full mask.

  Built inside each trace (splash caches the mask processing itself): a kernel cached across
  traces closes over concrete arrays, which `jax.export` of its gradient rejects.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  if not causal:
    mask = splash.FullMask((T, S))
  elif window is None:
    mask = splash.CausalMask((T, S), offset=S - T)
  else:
    mask = splash.LocalMask((T, S), window_size=(window - 1, 0), offset=S - T)
  bq, bkv = _block(T), _block(S)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)
  return splash.make_splash_mha(splash.MultiHeadMask([mask] * H), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _pallas(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: int | None,
            ids: jax.Array | None, scale: float, interpret: bool = False) -> jax.Array:
  """Splash attention vmapped over the batch; the scale is folded into q (float32 multiply)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
  _, T, H, _ = q.shape
  kernel = _splash_kernel(H, T, k.shape[1], bool(causal), window, interpret)
  qt = (q.astype(f32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)   # [B, H, T, D]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)              # [B, Hkv, S, D]
  if ids is None:
    o = jax.vmap(lambda a, b, c: kernel(a, b, c))(qt, kt, vt)
  else:
    ids = ids.astype(jnp.int32)
    o = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=SegmentIds(s, s)))(
        qt, kt, vt, ids)
  return o.transpose(0, 2, 1, 3).astype(q.dtype)


# ------------------------------------------------------------------------------------- the op
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                          window: int | None = None, segment_ids_q: jax.Array | None = None,
                          segment_ids_kv: jax.Array | None = None,
                          q_positions: jax.Array | None = None,
                          kv_positions: jax.Array | None = None, scale: float | None = None,
                          impl: str = "auto") -> jax.Array:
  """o [B,T,H,D] = softmax(scale q k^T | visible) v per head, float32 softmax, GQA.

  q [B,T,H,D]; k, v [B,S,Hkv,D] with H % Hkv == 0; segment ids [B,T] / [B,S] int; positions
  [B,T] or [T] / [B,S] or [S] int (used by the causal and window masks). A query that sees no
  key gets o = 0. `impl` in {"auto", "reference", "xla", "cudnn", "pallas"}: see the module
  docstring; `resolve_impl` says which one a call runs.
  """
  _check_args(q, k, v, causal, window, segment_ids_q, segment_ids_kv, q_positions,
              kv_positions, impl)
  ids_q, ids_kv, shared = _pair_ids(segment_ids_q, segment_ids_kv)
  B, T, _, D = q.shape
  S = k.shape[1]
  scale = D ** -0.5 if scale is None else float(scale)
  chosen = resolve_impl(impl, q, k, v, causal=causal, window=window, segment_ids_q=ids_q,
                        segment_ids_kv=None if shared else ids_kv, q_positions=q_positions,
                        kv_positions=kv_positions)
  if chosen == "cudnn":
    return _cudnn(q, k, v, causal=causal, window=window, ids_q=ids_q, ids_kv=ids_kv,
                  shared=shared, scale=scale)
  if chosen == "pallas":
    return _pallas(q, k, v, causal=causal, window=window, ids=ids_q, scale=scale)
  mask = visibility(B, T, S, causal=causal, window=window, segment_ids_q=ids_q,
                    segment_ids_kv=ids_kv, q_positions=q_positions, kv_positions=kv_positions)
  if chosen == "xla":
    return _xla(q, k, v, mask, scale)
  return _reference(q, k, v, mask, scale)


# --------------------------------------------------------------------------------- self check
def self_check(impl: str = "auto", *, dtype: Any = jnp.bfloat16, head_dim: int = 128,
               seq_len: int = 256, seed: int = 0,
               configs: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
  """Runs `impl` on the default device against "reference" for a few configurations.

  For each configuration (causal, window, GQA, segment ids, non-causal) returns which
  implementation actually ran, and the max |difference| of o and of dq, dk, dv (loss
  sum(o * w)) relative to max |reference|. Meant for a GPU/TPU session, e.g.
  `self_check("cudnn")` on an H100; nothing is asserted here. `configs` picks a subset of
  {"causal", "window", "segments", "window_segments", "noncausal"} (default: all).
  """
  B, T, H, Hkv, D = 2, seq_len, 4, 2, head_dim
  rng = np.random.default_rng(seed)   # numpy: no PRNG kernels to compile
  q, k, v = (jnp.asarray(rng.standard_normal(shape), f32).astype(dtype)
             for shape in ((B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)))
  w = jnp.asarray(rng.standard_normal((B, T, H, D)), f32)
  ids = jnp.asarray(np.repeat((np.arange(T) * 4 // T)[None], B, 0), jnp.int32)  # 4 documents
  known = {"causal": {}, "window": {"window": 32}, "segments": {"segment_ids_q": ids},
           "window_segments": {"window": 32, "segment_ids_q": ids}, "noncausal": {"causal": False}}
  report = {}
  for name in known if configs is None else configs:
    kw = known[name]
    def both(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array,
             kw: dict = kw) -> tuple[Any, Any]:
      kw = {**kw, "segment_ids_q": ids} if "segment_ids_q" in kw else kw
      def loss(qkv: tuple[jax.Array, ...], which: str) -> tuple[jax.Array, jax.Array]:
        o = dot_product_attention(*qkv, impl=which, **kw)
        return jnp.sum(o.astype(f32) * w), o
      grad = jax.grad(loss, has_aux=True)
      return grad((q, k, v), impl), grad((q, k, v), "reference")
    (g_i, o_i), (g_r, o_r) = jax.jit(both)(q, k, v, ids)
    errors = {}
    for label, a, b in (("o", o_i, o_r), ("dq", g_i[0], g_r[0]), ("dk", g_i[1], g_r[1]),
                        ("dv", g_i[2], g_r[2])):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      errors[label] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
    report[name] = {"ran": resolve_impl(impl, q, k, v, **kw), **errors}
  return report
