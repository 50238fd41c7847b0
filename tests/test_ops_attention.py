"""Tests of jaxlin.ops.dot_product_attention (softmax attention with GQA, windows, packed documents).

    visible(t, s) = [p'_s <= p_t] [p'_s > p_t - window] [ids_q[t] == ids_kv[s]]
    o_t = sum_s softmax_s(scale <q_t, k_s> | visible) v_s,   o_t = 0 if nothing is visible

Executed on CPU: "reference" vs a float64 numpy loop; "xla" vs "reference" (outputs and dq, dk,
dv); the splash wrapper in Pallas interpret mode vs "reference". Lowered only: the splash kernels
(forward + backward) for TPU, the cuDNN custom calls (forward + backward) for CUDA.

Legend: B batch, T query length, S key length, H query heads, Hkv kv heads, D head dim.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import ops
from jaxlin.ops import attention as attn_mod
from jaxlin.ops.attention import dot_product_attention, resolve_impl, supports

F32_RTOL, F32_ATOL = 1e-5, 1e-5
BF16_ATOL_REL = 2e-2  # bf16 inputs: xla rounds probabilities to bf16 before P @ V
#: XLA backend optimisation level 0 halves compile time, which dominates these tiny tests.
JIT_OPTIONS = {"compiler_options": {"xla_backend_optimization_level": 0}}


@functools.lru_cache(maxsize=None)
def _jitted(static: tuple[tuple[str, Any], ...]) -> Any:
  def f(q: jax.Array, k: jax.Array, v: jax.Array, arrays: dict[str, jax.Array]) -> jax.Array:
    return dot_product_attention(q, k, v, **arrays, **dict(static))
  return jax.jit(f, **JIT_OPTIONS)


def _attend(q: Any, k: Any, v: Any, **kw: Any) -> np.ndarray:
  """Jitted dot_product_attention: array keyword arguments traced, the others static."""
  arrays = {n: x for n, x in kw.items() if isinstance(x, (np.ndarray, jax.Array))}
  static = tuple(sorted((n, x) for n, x in kw.items() if n not in arrays))
  return np.asarray(_jitted(static)(q, k, v, arrays))


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.standard_normal(shape).astype(np.float32)


def _inputs(B: int = 2, T: int = 63, S: int | None = None, H: int = 4, Hkv: int = 2,
            D: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  S = T if S is None else S
  return _normal(rng, (B, T, H, D)), _normal(rng, (B, S, Hkv, D)), _normal(rng, (B, S, Hkv, D))


def _ids(B: int, T: int, bounds: tuple[int, ...] = (5, 20, 41)) -> np.ndarray:
  """[B, T] ids with documents starting at `bounds` (row 1 shifted by 3; reused ids)."""
  out = np.zeros((B, T), np.int32)
  for b in range(B):
    for i, t in enumerate(bounds):
      out[b, min(t + 3 * b, T - 1):] = (i + 1) % 3 + 10
  return out


def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = True,
                  window: int | None = None, ids_q: np.ndarray | None = None,
                  ids_kv: np.ndarray | None = None, qpos: np.ndarray | None = None,
                  kpos: np.ndarray | None = None) -> np.ndarray:
  """float64 loop over (b, t, h), written from the formula in the module docstring."""
  B, T, H, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  qpos = np.arange(T) + S - T if qpos is None else qpos
  kpos = np.arange(S) if kpos is None else kpos
  o = np.zeros((B, T, H, D))
  for b in range(B):
    for t in range(T):
      vis = np.ones(S, bool)
      if causal:
        vis &= kpos <= qpos[t]
        if window is not None:
          vis &= kpos > qpos[t] - window
      if ids_q is not None:
        vis &= ids_kv[b] == ids_q[b, t]
      if not vis.any():
        continue
      for h in range(H):
        kh = h // (H // Hkv)
        a = (k[b, :, kh].astype(np.float64) @ q[b, t, h].astype(np.float64)) * D ** -0.5
        a = np.where(vis, a, -np.inf)
        p = np.exp(a - a.max())
        o[b, t, h] = (p / p.sum()) @ v[b, :, kh].astype(np.float64)
  return o


# ------------------------------------------------------------------------- reference vs numpy
def test_reference_matches_numpy_loop() -> None:
  q, k, v = _inputs(B=2, T=11, H=4, Hkv=2, D=8)
  ids = _ids(2, 11, (3, 7))
  cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
      ({}, {}),
      ({"causal": False}, {"causal": False}),
      ({"window": 3}, {"window": 3}),
      ({"segment_ids_q": ids}, {"ids_q": ids, "ids_kv": ids}),
      ({"window": 4, "segment_ids_q": ids}, {"window": 4, "ids_q": ids, "ids_kv": ids}),
  ]
  for kw, np_kw in cases:
    o = _attend(q, k, v, impl="reference", **kw)
    np.testing.assert_allclose(np.asarray(o), _np_attention(q, k, v, **np_kw), rtol=F32_RTOL,
                               atol=F32_ATOL, err_msg=str(list(kw)))
  # T != S: default bottom-right alignment, then explicit positions with a ragged layout.
  q2, k2, v2 = _inputs(B=1, T=3, S=8, H=2, Hkv=1, D=8, seed=1)
  o = _attend(q2, k2, v2, impl="reference")
  np.testing.assert_allclose(np.asarray(o), _np_attention(q2, k2, v2), rtol=F32_RTOL,
                             atol=F32_ATOL)
  qpos, kpos = np.array([2, 9, 4], np.int32), np.array([0, 1, 2, 3, 4, 5, 9, 30], np.int32)
  o = _attend(q2, k2, v2, q_positions=qpos, kv_positions=kpos, window=5, impl="reference")
  np.testing.assert_allclose(np.asarray(o), _np_attention(q2, k2, v2, window=5, qpos=qpos,
                                                          kpos=kpos), rtol=F32_RTOL, atol=F32_ATOL)


# ------------------------------------------------------------------------ xla vs reference
CONFIGS = {
    "causal": {},
    "noncausal": {"causal": False},
    "window": {"window": 7},
    "window1": {"window": 1},
    "segments": {"segments": True},
    "window_segments": {"window": 9, "segments": True},
    "noncausal_segments": {"causal": False, "segments": True},
}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (3, 1)}
# every config with GQA; MHA and MQA with the window + segments config
XLA_CASES = [(c, "gqa") for c in CONFIGS] + [("window_segments", h) for h in ("mha", "mqa")]


def _loss_and_grads(impl: str, q: Any, k: Any, v: Any, w: np.ndarray,
                    kw: dict[str, Any]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
  def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    o = dot_product_attention(q, k, v, impl=impl, **kw)
    return jnp.sum(o.astype(jnp.float32) * w), o
  grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), **JIT_OPTIONS)(q, k, v)
  return np.asarray(o, np.float32), tuple(np.asarray(g, np.float32) for g in grads)


@pytest.mark.parametrize("config,heads", XLA_CASES)
def test_xla_matches_reference_with_grads(config: str, heads: str) -> None:
  H, Hkv = HEADS[heads]
  q, k, v = _inputs(B=2, T=63, H=H, Hkv=Hkv, D=16)
  kw = dict(CONFIGS[config])
  if kw.pop("segments", False):
    kw["segment_ids_q"] = _ids(2, 63)
  w = np.random.default_rng(5).standard_normal(q.shape).astype(np.float32)
  assert resolve_impl("xla", q, k, v) == "xla"
  o_x, g_x = _loss_and_grads("xla", q, k, v, w, kw)
  o_r, g_r = _loss_and_grads("reference", q, k, v, w, kw)
  np.testing.assert_allclose(o_x, o_r, rtol=F32_RTOL, atol=F32_ATOL, err_msg="o")
  for name, a, b in zip(("dq", "dk", "dv"), g_x, g_r):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  if kw.get("window") == 1:  # each query sees only itself: o_t = v_t, no gradient to q or k
    np.testing.assert_allclose(o_r, np.repeat(v, H // Hkv, axis=2), rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_array_equal(g_r[0], 0.0)
  else:
    assert min(np.abs(g).max() for g in g_r) > 1e-2   # no gradient is trivially zero


@pytest.mark.parametrize("config", ["window_segments"])
def test_xla_bf16_matches_reference(config: str) -> None:
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(B=2, T=63, H=4, Hkv=2, D=16))
  kw = dict(CONFIGS[config])
  if kw.pop("segments", False):
    kw["segment_ids_q"] = _ids(2, 63)
  w = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)
  o_x, g_x = _loss_and_grads("xla", q, k, v, w, kw)
  o_r, g_r = _loss_and_grads("reference", q, k, v, w, kw)
  assert _attend(q, k, v, impl="xla", **kw).dtype == jnp.bfloat16
  for name, a, b in zip(("o", "dq", "dk", "dv"), (o_x, *g_x), (o_r, *g_r)):
    np.testing.assert_allclose(a, b, rtol=BF16_ATOL_REL, atol=BF16_ATOL_REL * np.abs(b).max(),
                               err_msg=name)


# -------------------------------------------------------------------------- empty rows
@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
def test_rows_that_see_no_key_are_zero(impl: str) -> None:
  q, k, v = _inputs(B=2, T=12, S=12, H=2, Hkv=1, D=8)
  ids_q = np.repeat(np.array([[1] * 6 + [2] * 6]), 2, 0).astype(np.int32)
  ids_kv = np.ones((2, 12), np.int32)  # no key carries id 2: rows 6.. see nothing
  def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    o = dot_product_attention(q, k, v, segment_ids_q=ids_q, segment_ids_kv=ids_kv, impl=impl)
    return jnp.sum(o * o), o
  grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), **JIT_OPTIONS)(q, k, v)
  o = np.asarray(o)
  assert np.all(np.isfinite(o)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  np.testing.assert_array_equal(o[:, 6:], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[:, 6:], 0.0)
  np.testing.assert_allclose(o, _np_attention(q, k, v, ids_q=ids_q, ids_kv=ids_kv),
                             rtol=F32_RTOL, atol=F32_ATOL)
  # Queries placed before every key (causal) see nothing either.
  o2 = _attend(q, k, v, q_positions=np.arange(12, dtype=np.int32) - 20, impl=impl)
  np.testing.assert_array_equal(np.asarray(o2), 0.0)


# ---------------------------------------------------------------------------- predicates
def _sds(shape: tuple[int, ...], dtype: Any = jnp.bfloat16) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def test_cudnn_predicate() -> None:
  q, k = _sds((2, 64, 8, 64)), _sds((2, 64, 2, 64))
  ids = _sds((2, 64), jnp.int32)
  assert supports("cudnn", q, k, k, backend="gpu")
  assert supports("cudnn", q, k, k, window=16, segment_ids_q=ids, backend="gpu")
  assert supports("cudnn", _sds((2, 16, 8, 64)), k, k, causal=False, backend="gpu")
  rejected = {
      "cpu backend": (dict(backend="cpu"), q, k),
      "tpu backend": (dict(backend="tpu"), q, k),
      "float32": (dict(backend="gpu"), _sds(q.shape, jnp.float32), _sds(k.shape, jnp.float32)),
      "head dim 160": (dict(backend="gpu"), _sds((2, 64, 8, 160)), _sds((2, 64, 2, 160))),
      "head dim 12": (dict(backend="gpu"), _sds((2, 64, 8, 12)), _sds((2, 64, 2, 12))),
      "positions": (dict(backend="gpu", q_positions=_sds((64,), jnp.int32)), q, k),
      "causal T != S": (dict(backend="gpu"), _sds((2, 16, 8, 64)), k),
      "odd T with ids": (dict(backend="gpu", segment_ids_q=_sds((2, 63), jnp.int32)),
                         _sds((2, 63, 8, 64)), _sds((2, 63, 2, 64))),
  }
  for name, (kw, qq, kk) in rejected.items():
    assert not supports("cudnn", qq, kk, kk, **kw), name
    assert resolve_impl("cudnn", qq, kk, kk, **kw) == "xla", name
  assert resolve_impl("auto", q, k, k, backend="gpu") == "cudnn"
  assert resolve_impl("auto", q, k, k, backend="cpu") == "xla"


def test_pallas_predicate() -> None:
  q, k = _sds((2, 256, 4, 128)), _sds((2, 256, 2, 128))
  ids = _sds((2, 256), jnp.int32)
  assert supports("pallas", q, k, k, backend="tpu")
  assert supports("pallas", q, k, k, window=64, segment_ids_q=ids, backend="tpu")
  assert supports("pallas", _sds((2, 128, 4, 128)), k, k, backend="tpu")  # T < S: offset mask
  assert supports("pallas", _sds(q.shape, jnp.float32), _sds(k.shape, jnp.float32),
                  _sds(k.shape, jnp.float32), backend="tpu")
  rejected = {
      "gpu backend": (dict(backend="gpu"), q, k),
      "head dim 64": (dict(backend="tpu"), _sds((2, 256, 4, 64)), _sds((2, 256, 2, 64))),
      "T = 200": (dict(backend="tpu"), _sds((2, 200, 4, 128)), _sds((2, 200, 2, 128))),
      "positions": (dict(backend="tpu", kv_positions=_sds((256,), jnp.int32)), q, k),
      "distinct ids": (dict(backend="tpu", segment_ids_q=ids, segment_ids_kv=_sds((2, 256),
                                                                                 jnp.int32)), q, k),
      "causal T > S": (dict(backend="tpu"), _sds((2, 512, 4, 128)), k),
  }
  for name, (kw, qq, kk) in rejected.items():
    assert not supports("pallas", qq, kk, kk, **kw), name
    assert resolve_impl("pallas", qq, kk, kk, **kw) == "xla", name
  assert resolve_impl("auto", q, k, k, backend="tpu") == "pallas"


def test_fallbacks_run_on_cpu_and_match_reference() -> None:
  q, k, v = _inputs(B=1, T=20, H=2, Hkv=1, D=8)
  ref = _attend(q, k, v, window=6, impl="reference")
  assert jax.default_backend() == "cpu" and resolve_impl("auto", q, k, v) == "xla"
  for impl in ("cudnn", "pallas"):  # "auto" and "xla" are compared in the tests above
    out = _attend(q, k, v, window=6, impl=impl)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_RTOL, atol=F32_ATOL, err_msg=impl)
  k16 = jnp.asarray(k, jnp.bfloat16)  # jax.nn needs one dtype: mixed dtypes run the reference
  assert resolve_impl("xla", q, k16, v) == "reference"
  out = _attend(q, k16, v, impl="xla")
  ref = _attend(q, k16, v, impl="reference")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


# ------------------------------------------------------------------ TPU: splash lowering + interpret
TPU_CASES = {
    "causal_gqa": dict(T=256, S=256, H=4, Hkv=2, kw={}),
    "window_segments": dict(T=256, S=256, H=4, Hkv=2, kw={"window": 64, "segments": True}),
    "noncausal_mqa": dict(T=128, S=256, H=2, Hkv=1, kw={"causal": False}),
    "causal_offset": dict(T=128, S=384, H=2, Hkv=2, kw={"segments": False}),
}


@pytest.mark.parametrize("case", list(TPU_CASES))
def test_tpu_auto_lowers_to_splash_kernels(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
  c = TPU_CASES[case]
  B, D = 2, 128
  q, k = _sds((B, c["T"], c["H"], D)), _sds((B, c["S"], c["Hkv"], D))
  kw = dict(c["kw"])
  segments = kw.pop("segments", False)
  ids = _sds((B, c["T"]), jnp.int32)
  monkeypatch.setattr(attn_mod, "_platform", lambda: "tpu")
  assert resolve_impl("auto", q, k, k, segment_ids_q=ids if segments else None, **kw) == "pallas"

  def fwd(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> jax.Array:
    return dot_product_attention(q, k, v, segment_ids_q=ids if segments else None, **kw)

  def grads(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> Any:
    f = lambda *a: jnp.sum(fwd(*a, ids).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for fn, calls in ((fwd, 1), (grads, 3)):  # forward; forward + dq + dkv kernels
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, k, k, ids)
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") == calls, (fn.__name__, text.count("tpu_custom_call"))
    if fn is fwd:
      assert "dot_general" not in text  # no XLA attention matmuls: the kernel does the work


@pytest.mark.parametrize("case", ["causal_offset_gqa", "window_segments"])
def test_splash_wrapper_in_interpret_mode_matches_reference(case: str) -> None:
  if case == "causal_offset_gqa":
    q, k, v = _inputs(B=1, T=128, S=256, H=2, Hkv=1, D=128, seed=3)
    kw: dict[str, Any] = {"causal": True, "window": None, "ids": None}
  else:
    q, k, v = _inputs(B=2, T=128, H=1, Hkv=1, D=128, seed=4)  # rows with different ids
    kw = {"causal": True, "window": 17, "ids": _ids(2, 128, (30, 70, 71))}
  ids = kw.pop("ids")
  run = jax.jit(lambda q, k, v, ids: attn_mod._pallas(q, k, v, ids=ids, scale=128 ** -0.5,
                                                      interpret=True, **kw), **JIT_OPTIONS)
  out = run(q, k, v, ids)
  kw["ids"] = ids
  ref = _attend(q, k, v, causal=kw["causal"], window=kw["window"], segment_ids_q=kw["ids"],
                impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- CUDA: cuDNN lowering
@pytest.mark.parametrize("case", ["causal", "window", "segments"])
def test_cuda_auto_lowers_to_cudnn(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
  """Lowering for CUDA runs jax's cuDNN argument checks and our call; only a GPU runs it."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
  monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)  # CPU jaxlib: no cuDNN
  monkeypatch.setattr(attn_mod, "_platform", lambda: "cuda")
  B, T, H, Hkv, D = 2, 64, 4, 2, 64
  q, k, ids = _sds((B, T, H, D)), _sds((B, T, Hkv, D)), _sds((B, T), jnp.int32)
  kw = {"causal": {}, "window": {"window": 8}, "segments": {}}[case]
  seg = case == "segments"
  assert resolve_impl("auto", q, k, k, segment_ids_q=ids if seg else None, **kw) == "cudnn"

  def grads(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> Any:
    f = lambda q, k, v: jnp.sum(dot_product_attention(
        q, k, v, segment_ids_q=ids if seg else None, **kw).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  text = jax.jit(grads).trace(q, k, k, ids).lower(lowering_platforms=("cuda",)).as_text()
  names = set(re.findall(r"custom_call @([\w$.]+)", text))
  kind = "ScaleBiasSoftmax" if seg else "Softmax"
  assert names == {f"__cudnn$fmha{kind}", f"__cudnn$fmha{kind}Backward"}, names
  config = text.replace("\\22", "")
  assert "mask_type: CAUSAL," in config and "fmha_scale: 0.125," in config
  assert ("sliding_window_length: 8," in config) == (case == "window")


# -------------------------------------------------------------------------------- errors
def test_errors_name_the_argument() -> None:
  q, k, v = _inputs(B=2, T=8, H=4, Hkv=2, D=8)
  bad: list[tuple[dict[str, Any], str]] = [
      (dict(q=q[0]), r"q: got shape \(8, 4, 8\).*rank 4"),
      (dict(k=k[:, :, :, :4]), r"k: got shape \(2, 8, 2, 4\).*D=8"),
      (dict(v=v[:, :5]), r"v: got shape \(2, 5, 2, 8\).*\(2, 8, 2, 8\)"),
      (dict(k=_inputs(B=2, T=8, H=4, Hkv=3, D=8)[1], v=_inputs(B=2, T=8, H=4, Hkv=3, D=8)[2]),
       r"k: got 3 kv heads.*allowed Hkv: \[1, 2, 4\]"),
      (dict(window=0), r"window: got 0; expected None or an int >= 1"),
      (dict(window=4, causal=False), r"window: got 4 with causal=False"),
      (dict(segment_ids_q=np.zeros((2, 7), np.int32)), r"segment_ids_q: got shape \(2, 7\).*\(2, 8\)"),
      (dict(segment_ids_q=np.zeros((2, 8), np.float32)), r"segment_ids_q:.*integer dtype"),
      (dict(q_positions=np.zeros((3,), np.int32)), r"q_positions: got shape \(3,\).*\(2, 8\) or \(8,\)"),
      (dict(impl="flash"), r"impl: got 'flash'; expected one of"),
  ]
  for override, pattern in bad:
    args = {"q": q, "k": k, "v": v, **override}
    with pytest.raises(ValueError, match=pattern):
      dot_product_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
  q3, k3, v3 = _inputs(B=2, T=4, S=8, H=4, Hkv=2, D=8)
  with pytest.raises(ValueError, match=r"segment_ids_kv: got None.*T=4 != S=8"):
    dot_product_attention(q3, k3, v3, segment_ids_q=np.zeros((2, 4), np.int32))


def test_self_check_runs() -> None:
  """The GPU/TPU self-check function, run here with impl="xla" on CPU at a tiny size."""
  report = attn_mod.self_check("xla", dtype=jnp.float32, head_dim=8, seq_len=16,
                              configs=("window_segments",))
  assert set(report) == {"window_segments"}
  for name, row in report.items():
    assert row["ran"] == "xla", name
    assert max(row[e] for e in ("o", "dq", "dk", "dv")) < 1e-5, (name, row)


def test_exported_from_ops() -> None:
  assert ops.dot_product_attention is dot_product_attention
