"""Tests of jaxlin.ops.delta_rule (D family) and its step function, from the spec.

S_t = exp(g_t) (I - b_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t;
p (removal_key) defaults to k, b (removal) defaults to beta.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as h

D = h.D_FAMILY
IMPLS = ("reference", "xla")

# (name, gate kind, explicit removal_key, explicit removal)
VARIANTS = [
    ("delta", None, False, False),
    ("gated_delta", "scalar", False, False),
    ("comba", "scalar", True, True),
    ("delta_p", None, True, False),
    ("gated_b", "scalar", False, True),
]
VARIANT_IDS = [v[0] for v in VARIANTS]

# xla-vs-reference gradient sweep: (variant, T, chunk_size, initial_state, segment_ids). A covering
# design rather than the full product (each case costs two compilations): every variant, every T in
# {1, 63, 64, 200}, with and without initial_state / segment_ids, chunk 16 to cross chunks at small T.
_V = dict((v[0], v) for v in VARIANTS)
GRAD_CASES = [
    (_V["delta"], 1, 64, True, False),
    (_V["delta"], 64, 16, False, False),
    (_V["delta"], 200, 64, True, True),
    (_V["gated_delta"], 63, 16, True, True),
    (_V["gated_delta"], 200, 64, False, False),
    (_V["comba"], 1, 16, True, True),
    (_V["comba"], 63, 16, True, True),
    (_V["comba"], 64, 64, False, True),
    (_V["comba"], 200, 64, True, True),
    (_V["delta_p"], 63, 16, True, True),
    (_V["gated_b"], 200, 64, True, True),
]
GRAD_IDS = [f"{v[0]}-T{T}-c{c}-{'init' if i else 'noinit'}-{'seg' if s else 'noseg'}" for v, T, c, i, s in GRAD_CASES]


def _inputs(variant: tuple, **kw) -> h.Inputs:
    """make_inputs for a VARIANTS entry."""
    _, gate, p, b = variant
    return h.make_inputs(D, gate=gate, removal_key=p, removal=b, **kw)


# ------------------------------------------------------------------ 1. hand-computed cases
@pytest.mark.parametrize("impl", IMPLS)
def test_literal_two_tokens(impl: str) -> None:
    """K=2, V=1, default scale 2**-0.5, numbers worked out by hand."""
    s = 2.0**-0.5
    q = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32).reshape(1, 2, 1, 2)
    k = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32).reshape(1, 2, 1, 2)
    v = np.array([[2.0], [5.0]], np.float32).reshape(1, 2, 1, 1)
    beta = np.array([0.5, 1.0], np.float32).reshape(1, 2, 1)
    g = np.log(np.array([0.5, 1.0], np.float32)).reshape(1, 2, 1)
    S0 = np.array([[4.0], [2.0]], np.float32).reshape(1, 1, 2, 1)
    # S1 = .5 (S0 - .5 k0 (k0^T S0)) + .5 k0 v0^T = .5 [[2],[2]] + [[1],[0]] = [[2],[1]] -> o0 = s*3
    # S2 = S1 - 1 k1 (k1^T S1) + k1 v1^T = [[2],[0]] + [[0],[5]] = [[2],[5]] -> o1 = s*5
    run = h.op_jit(D, impl=impl, output_final_state=True)
    o, st = run(dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=S0))
    np.testing.assert_allclose(np.asarray(o).reshape(2), [3 * s, 5 * s], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st).reshape(2), [2.0, 5.0], rtol=1e-6)
    # explicit p1 = [1, 0], b1 = 0.25 (token 0 keeps p0 = k0, b0 = beta0):
    # S2 = S1 - .25 k1 (p1^T S1) + k1 v1^T = [[2],[1 - .5 + 5]] = [[2],[5.5]] -> o1 = s*5.5
    p = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32).reshape(1, 2, 1, 2)
    b = np.array([0.5, 0.25], np.float32).reshape(1, 2, 1)
    o, st = run(dict(q=q, k=k, v=v, beta=beta, g=g, removal_key=p, removal=b, initial_state=S0))
    np.testing.assert_allclose(np.asarray(o).reshape(2), [3 * s, 5.5 * s], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st).reshape(2), [2.0, 5.5], rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_hand_T1_T2(variant: tuple, impl: str) -> None:
    """Two explicit recurrence steps (numpy float64) for T=1 and T=2, with an initial state."""
    B, H, K, V = 2, 2, 4, 3
    d = _inputs(variant, B=B, T=2, H=H, K=K, V=V, initial_state=True, seed=31)
    q, k, v, beta, S0 = (np.asarray(d[n], np.float64) for n in ("q", "k", "v", "beta", "initial_state"))
    p = k if d["removal_key"] is None else np.asarray(d["removal_key"], np.float64)
    b = beta if d["removal"] is None else np.asarray(d["removal"], np.float64)
    a = np.ones((B, 2, H)) if d["g"] is None else np.exp(np.asarray(d["g"], np.float64))
    scale = K**-0.5

    def step(S: np.ndarray, t: int) -> np.ndarray:
        removed = S - b[:, t, :, None, None] * np.einsum("bhk,bhj,bhjv->bhkv", k[:, t], p[:, t], S)
        written = beta[:, t, :, None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        return a[:, t, :, None, None] * removed + written

    S1 = step(S0, 0)
    S2 = step(S1, 1)
    o0 = scale * np.einsum("bhkv,bhk->bhv", S1, q[:, 0])
    o1 = scale * np.einsum("bhkv,bhk->bhv", S2, q[:, 1])
    for T, o_exp, s_exp in ((1, o0[:, None], S1), (2, np.stack([o0, o1], 1), S2)):
        dT = h.slice_time(d, 0, T)
        o, st = h.op_jit(D, impl=impl, output_final_state=True)(dT)  # scale, chunk_size: defaults
        assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
        assert st.shape == (B, H, K, V) and st.dtype == jnp.float32
        h.assert_close(o, o_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name=f"o T={T}")
        h.assert_close(st, s_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name=f"state T={T}")


@pytest.mark.parametrize("extras", ["plain", "init_seg"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_numpy_loop(variant: tuple, extras: str) -> None:
    """Both impls against the numpy float64 token loop (with/without initial state + packed docs)."""
    with_extras = extras == "init_seg"
    d = _inputs(variant, B=2, T=40, H=2, K=8, V=6, initial_state=with_extras, segments=with_extras, seed=41)
    scale = 0.37 if with_extras else None
    o_exp, s_exp = h.np_reference(D, d, scale=scale)
    o, s = h.run_op(D, "reference", d, scale=scale)
    h.assert_close(o, o_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference o")
    h.assert_close(s, s_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference state")
    o, s = h.run_op(D, "xla", d, chunk_size=16, scale=scale)
    h.assert_close(o, o_exp, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="xla o")
    h.assert_close(s, s_exp, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="xla state")


# ------------------------------------------------------------------ 2. xla vs reference + grads
@pytest.mark.parametrize("variant,T,chunk,init,seg", GRAD_CASES, ids=GRAD_IDS)
def test_xla_matches_reference_with_grads(variant: tuple, T: int, chunk: int, init: bool, seg: bool) -> None:
    """Outputs, final state and gradients of every input: chunked xla == token scan."""
    d = _inputs(variant, B=2, T=T, H=2, K=32, V=48, initial_state=init, segments=seg, seed=200 + T)
    ref = h.run_with_grads(D, "reference", d)
    xla = h.run_with_grads(D, "xla", d, chunk_size=chunk)
    assert set(ref) == {"o", "state"} | h.expected_grad_keys(d)
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=f"{variant[0]} T={T}")


@pytest.mark.parametrize("strength", ["strong", "mixed"])
def test_strong_gates_with_grads(strength: str) -> None:
    """Fast (and per-head mixed fast/slow) decays with initial state and packed documents:
    xla == reference (outputs, final state, every gradient), reference == the numpy loop."""
    d = _inputs(
        VARIANTS[2], B=1, T=200, H=2, K=32, V=48, initial_state=True, segments=True, seed=301, gate_strength=strength
    )
    ref = h.run_with_grads(D, "reference", d)
    xla = h.run_with_grads(D, "xla", d)
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=strength)
    o_n, s_n = h.np_reference(D, d)
    h.assert_close(ref["o"], o_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference o vs numpy")
    h.assert_close(ref["state"], s_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference state vs numpy")


@pytest.mark.parametrize("chunk", [16, 48, 256])
def test_chunk_sizes(chunk: int) -> None:
    """Any multiple of 16 in [16, 256] works, incl. non-powers of two and chunk > T."""
    d = _inputs(VARIANTS[2], B=1, T=200, H=2, K=32, V=48, initial_state=True, segments=True, seed=5)
    o_r, s_r = h.run_op(D, "reference", d)
    o_x, s_x = h.run_op(D, "xla", d, chunk_size=chunk)
    h.assert_close(o_x, o_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="o")
    h.assert_close(s_x, s_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="state")


def test_auto_and_final_state_flag() -> None:
    """impl="auto" matches reference; final_state is None unless output_final_state=True."""
    d = _inputs(VARIANTS[1], B=2, T=70, H=2, K=16, V=8, initial_state=True, seed=6)
    o_r, s_r = h.run_op(D, "reference", d)
    o, s = h.op_jit(D)(d)  # all defaults: impl="auto", output_final_state=False
    assert s is None
    assert o.shape == d["v"].shape and o.dtype == jnp.float32
    h.assert_close(o, o_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="auto o")
    for impl in ("reference", "xla", "auto"):
        assert jax.eval_shape(functools.partial(h.call_op, D, impl=impl), d)[1] is None
    o, s = h.run_op(D, "auto", d)
    h.assert_close(s, s_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="auto state")


def test_pallas_matches_reference() -> None:
    """impl="pallas" gives the reference answer: on CPU through the XLA fallback (with a warning);
    the kernels themselves are tested in test_kernels.py."""
    d = _inputs(VARIANTS[2], B=1, T=40, H=2, K=16, V=16, initial_state=True, seed=7)
    o_r, s_r = h.run_op(D, "reference", d)
    with pytest.warns(UserWarning, match="XLA chunked form"):
        o, s = h.call_op(D, d, impl="pallas", output_final_state=True)
    h.assert_close(o, o_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="pallas o")
    h.assert_close(s, s_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="pallas state")


# ------------------------------------------------------------------ 3. documents, continuation, step
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[2]], ids=["gated_delta", "comba"])
def test_packed_equals_separate(variant: tuple, impl: str) -> None:
    """Packed documents == each document run alone (initial state only for the first), concatenated."""
    T = 64
    d = _inputs(variant, B=2, T=T, H=2, K=16, V=24, initial_state=True, seed=8)
    d["segment_ids"] = h.packed_test_segment_ids()
    o_p, s_p = h.run_op(D, impl, d, chunk_size=16)
    for b in range(2):
        docs = h.documents(d["segment_ids"][b], T)
        assert len(docs) >= 3
        for i, (a, e) in enumerate(docs):
            part = h.slice_time(d, a, e, batch=b)
            part["segment_ids"] = None
            if i > 0:
                part["initial_state"] = None
            o_d, s_d = h.run_op(D, impl, part, chunk_size=16)
            h.assert_close(o_p[b : b + 1, a:e], o_d, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name=f"o b={b} doc={i}")
        h.assert_close(s_p[b : b + 1], s_d, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name=f"final state b={b}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seg", [False, True], ids=["noseg", "seg"])
def test_continuation(impl: str, seg: bool) -> None:
    """Run T1=37 then T2=50 from the returned state == one run of 87 tokens."""
    T1, T2 = 37, 50
    d = _inputs(VARIANTS[2], B=2, T=T1 + T2, H=2, K=16, V=24, initial_state=True, seed=9)
    if seg:  # boundaries on both sides of T1 but not at T1 (a change exactly at T1 would reset the state)
        d["segment_ids"] = h.segment_ids_from_bounds([[10, 50], [20, 36, 60]], T1 + T2)
    o_full, s_full = h.run_op(D, impl, d, chunk_size=16)
    first = h.slice_time(d, 0, T1)
    o1, s1 = h.run_op(D, impl, first, chunk_size=16)
    second = h.slice_time(d, T1, T1 + T2)
    second["initial_state"] = s1
    o2, s2 = h.run_op(D, impl, second, chunk_size=16)
    h.assert_close(np.concatenate([o1, o2], 1), o_full, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="o")
    h.assert_close(s2, s_full, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="state")


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_step_equals_op(variant: tuple) -> None:
    """delta_rule_step token by token == the full op (reference), and the numpy loop."""
    d = _inputs(variant, B=2, T=20, H=2, K=16, V=24, initial_state=True, seed=10)
    o_s, s_s = h.run_steps(D, d)
    o_r, s_r = h.run_op(D, "reference", d)
    h.assert_close(o_s, o_r, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o")
    h.assert_close(s_s, s_r, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="state")
    o_n, s_n = h.np_reference(D, d)
    h.assert_close(o_s, o_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o vs numpy")
    h.assert_close(s_s, s_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="state vs numpy")


def test_step_explicit_scale() -> None:
    """The step function honours an explicit scale (o scales linearly, state does not change)."""
    d = _inputs(VARIANTS[2], B=1, T=1, H=2, K=16, V=8, initial_state=True, seed=12)
    o1, s1 = h.run_steps(D, d, scale=1.0)
    o2, s2 = h.run_steps(D, d, scale=0.25)
    o_n, _ = h.np_reference(D, d, scale=0.25)
    h.assert_close(o2, o_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o")
    h.assert_close(o2, 0.25 * o1, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o linear in scale")
    h.assert_close(s2, s1, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="state independent of scale")


# ------------------------------------------------------------------ 4. low precision inputs
@pytest.mark.parametrize("dtype,impl", h.LOWP_CASES, ids=h.LOWP_IDS)
def test_low_precision_inputs(dtype, impl: str) -> None:
    """Low-precision q,k,v,beta,g,p,b: o has v's dtype, the state stays float32, o ~ float32 run."""
    d = _inputs(VARIANTS[2], B=2, T=100, H=2, K=32, V=48, initial_state=True, segments=True, seed=13)
    low = h.cast(d, dtype, ("q", "k", "v", "beta", "g", "removal_key", "removal"))
    rounded = {n: (x if x is None or n == "segment_ids" else np.asarray(x, np.float32)) for n, x in low.items()}
    o, s = h.run_op(D, impl, low, chunk_size=32)
    assert o.dtype == dtype
    assert s.dtype == jnp.float32
    o32, s32 = h.run_op(D, impl, rounded, chunk_size=32)
    h.assert_close(o.astype(np.float32), o32, rtol=h.LOWP_RTOL, atol_rel=h.LOWP_ATOL_REL, name="o")
    h.assert_close(s, s32, rtol=h.LOWP_RTOL, atol_rel=h.LOWP_ATOL_REL, name="state")


# ------------------------------------------------------------------ 5. extreme gates / strengths
@pytest.mark.parametrize("value", [-30.0, -1e-6])
def test_extreme_gates(value: float) -> None:
    """Scalar g = -30 or -1e-6 everywhere, T=200: finite, xla == reference incl. gradients."""
    d = _inputs(VARIANTS[2], B=1, T=200, H=2, K=32, V=48, initial_state=True, seed=14)
    d["g"] = np.full_like(d["g"], value)
    ref = h.run_with_grads(D, "reference", d)
    xla = h.run_with_grads(D, "xla", d)
    h.assert_finite(xla, ctx=f"xla g={value}")
    # d loss/d g_t ~ exp(g_t) <dL/dS_t, S_{t-1}> is ~1e-13 at g = -30. It is compared at its own
    # magnitude, like every other gradient: the chunked form must not obtain it as a difference of
    # O(1) terms (jaxlin.ops.chunking.pair_gaps).
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=f"g={value}")


@pytest.mark.parametrize("gate", [None, "scalar"], ids=["delta", "gated_delta"])
def test_strength_near_two(gate: Optional[str]) -> None:
    """Unit keys with beta = removal = 1.999 (b*||k||^2 ~ 2, transition near a reflection), T=200:
    xla output, state and every gradient finite and equal to reference."""
    d = h.make_inputs(D, B=1, T=200, H=2, K=32, V=48, gate=gate, removal=True, initial_state=True, seed=15)
    d["beta"] = np.full_like(d["beta"], 1.999)
    d["removal"] = np.full_like(d["removal"], 1.999)
    ref = h.run_with_grads(D, "reference", d)
    xla = h.run_with_grads(D, "xla", d)
    h.assert_finite(ref, ctx="reference")
    h.assert_finite(xla, ctx="xla")
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx="b*||k||^2 ~ 2")
    o_n, s_n = h.np_reference(D, d)
    h.assert_close(ref["o"], o_n, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="reference o vs numpy")
