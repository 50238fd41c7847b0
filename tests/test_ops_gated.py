"""Tests of jaxlin.ops.gated_linear_attention (G family) and its step function, from the spec.

S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t;
with bonus u: o_t = scale * (S_{t-1} + Diag(u) k_t v_t^T)^T q_t.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers as h

G = h.G_FAMILY
IMPLS = ("reference", "xla")

# (name, gate kind, bonus)
GATE_VARIANTS = [
    ("none", None, False),
    ("scalar", "scalar", False),
    ("vector", "vector", False),
    ("vector_bonus", "vector", True),
]
GATE_IDS = [v[0] for v in GATE_VARIANTS]
ALL_GATE_VARIANTS = GATE_VARIANTS + [("scalar_bonus", "scalar", True)]
ALL_GATE_IDS = [v[0] for v in ALL_GATE_VARIANTS]

# xla-vs-reference gradient sweep: (variant, T, chunk_size, initial_state, segment_ids). A covering
# design rather than the full product (each case costs two compilations): every gate kind, every T in
# {1, 63, 64, 200}, with and without initial_state / segment_ids, chunk 16 to cross chunks at small T.
_V = dict((v[0], v) for v in GATE_VARIANTS)
GRAD_CASES = [
    (_V["none"], 63, 16, True, True),
    (_V["none"], 200, 64, False, False),
    (_V["scalar"], 1, 64, True, False),
    (_V["scalar"], 64, 16, False, True),
    (_V["scalar"], 200, 64, True, True),
    (_V["vector"], 64, 16, False, False),
    (_V["vector"], 200, 64, True, True),
    (_V["vector_bonus"], 1, 16, True, True),
    (_V["vector_bonus"], 63, 16, True, True),
    (_V["vector_bonus"], 200, 64, True, True),
]
GRAD_IDS = [f"{v[0]}-T{T}-c{c}-{'init' if i else 'noinit'}-{'seg' if s else 'noseg'}" for v, T, c, i, s in GRAD_CASES]
# Fast-decaying gates (large cumulative decay inside a chunk): (variant, T, chunk_size, gate_strength)
STRONG_GATE_CASES = [
    (_V["scalar"], 200, 64, "strong"),
    (_V["scalar"], 200, 64, "mixed"),
    (_V["vector"], 200, 64, "strong"),
    (_V["vector_bonus"], 200, 64, "mixed"),
    (_V["vector_bonus"], 63, 16, "strong"),
]
STRONG_IDS = [f"{v[0]}-T{T}-c{c}-{st}" for v, T, c, st in STRONG_GATE_CASES]


def _decay_bhk(g: Optional[np.ndarray], B: int, H: int, K: int) -> np.ndarray:
    """Per-token decay exp(g) as [B, H, K] from g None, [B, H] or [B, H, K]."""
    if g is None:
        return np.ones((B, H, K))
    g = np.asarray(g, np.float64)
    return np.exp(g[..., None] * np.ones(K)) if g.ndim == 2 else np.exp(g)


# ------------------------------------------------------------------ 1. hand-computed cases
@pytest.mark.parametrize("impl", IMPLS)
def test_literal_two_tokens(impl: str) -> None:
    """K=2, V=1, default scale 2**-0.5, numbers worked out by hand."""
    q = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32).reshape(1, 2, 1, 2)
    k = np.array([[1.0, 2.0], [0.0, 1.0]], np.float32).reshape(1, 2, 1, 2)
    v = np.array([[3.0], [4.0]], np.float32).reshape(1, 2, 1, 1)
    g = np.log(np.array([[0.5, 0.5], [0.5, 0.25]], np.float32)).reshape(1, 2, 1, 2)
    # S1 = [[3],[6]] -> o0 = s*3 ; S2 = diag(.5,.25) S1 + k1 v1^T = [[1.5],[5.5]] -> o1 = s*(1.5+5.5)
    s = 2.0**-0.5
    run = h.op_jit(G, impl=impl, output_final_state=True)
    o, st = run(dict(q=q, k=k, v=v, g=g))
    np.testing.assert_allclose(np.asarray(o).reshape(2), [3 * s, 7 * s], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st).reshape(2), [1.5, 5.5], rtol=1e-6)
    # bonus u = [2, 0]: o0 = s*(S0 + u*k0 v0^T)^T q0 = s*(2*1*3) ; o1 = s*(S1 + u*k1 v1^T)^T q1 = s*(3+6+0)
    o, st = run(dict(q=q, k=k, v=v, g=g, bonus=np.array([[2.0, 0.0]], np.float32)))
    np.testing.assert_allclose(np.asarray(o).reshape(2), [6 * s, 9 * s], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st).reshape(2), [1.5, 5.5], rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,gate,bonus", ALL_GATE_VARIANTS, ids=ALL_GATE_IDS)
def test_hand_T1_T2(name: str, gate: Optional[str], bonus: bool, impl: str) -> None:
    """Two explicit recurrence steps (numpy float64) for T=1 and T=2, with an initial state."""
    B, H, K, V = 2, 2, 4, 3
    d = h.make_inputs(G, B=B, T=2, H=H, K=K, V=V, gate=gate, bonus=bonus, initial_state=True, seed=11)
    q, k, v, S0 = (np.asarray(d[n], np.float64) for n in ("q", "k", "v", "initial_state"))
    u = None if d["bonus"] is None else np.asarray(d["bonus"], np.float64)
    scale = K**-0.5
    a = [_decay_bhk(None if d["g"] is None else d["g"][:, t], B, H, K) for t in range(2)]
    outer = lambda kk, vv: np.einsum("bhk,bhv->bhkv", kk, vv)  # noqa: E731
    read = lambda S, qq: scale * np.einsum("bhkv,bhk->bhv", S, qq)  # noqa: E731
    S1 = a[0][..., None] * S0 + outer(k[:, 0], v[:, 0])
    S2 = a[1][..., None] * S1 + outer(k[:, 1], v[:, 1])
    if u is None:
        o0, o1 = read(S1, q[:, 0]), read(S2, q[:, 1])
    else:
        o0 = read(S0 + outer(u * k[:, 0], v[:, 0]), q[:, 0])
        o1 = read(S1 + outer(u * k[:, 1], v[:, 1]), q[:, 1])
    for T, o_exp, s_exp in ((1, o0[:, None], S1), (2, np.stack([o0, o1], 1), S2)):
        dT = h.slice_time(d, 0, T)
        o, st = h.op_jit(G, impl=impl, output_final_state=True)(dT)  # scale, chunk_size: defaults
        assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
        assert st.shape == (B, H, K, V) and st.dtype == jnp.float32
        h.assert_close(o, o_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name=f"o T={T}")
        h.assert_close(st, s_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name=f"state T={T}")


@pytest.mark.parametrize("extras", ["plain", "init_seg"])
@pytest.mark.parametrize("name,gate,bonus", ALL_GATE_VARIANTS, ids=ALL_GATE_IDS)
def test_parallel_form(name: str, gate: Optional[str], bonus: bool, extras: str) -> None:
    """Both impls against the numpy O(T^2) parallel form (with/without initial state + packed docs)."""
    with_extras = extras == "init_seg"
    d = h.make_inputs(
        G, B=2, T=40, H=2, K=8, V=6, gate=gate, bonus=bonus, initial_state=with_extras, segments=with_extras, seed=21
    )
    scale = 0.37 if with_extras else None
    o_exp, s_exp = h.np_reference(G, d, scale=scale)
    o, s = h.run_op(G, "reference", d, scale=scale)
    h.assert_close(o, o_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference o")
    h.assert_close(s, s_exp, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference state")
    o, s = h.run_op(G, "xla", d, chunk_size=16, scale=scale)
    h.assert_close(o, o_exp, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="xla o")
    h.assert_close(s, s_exp, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="xla state")


# ------------------------------------------------------------------ 2. xla vs reference + grads
@pytest.mark.parametrize("variant,T,chunk,init,seg", GRAD_CASES, ids=GRAD_IDS)
def test_xla_matches_reference_with_grads(variant: tuple, T: int, chunk: int, init: bool, seg: bool) -> None:
    """Outputs, final state and gradients of every input: chunked xla == token scan."""
    name, gate, bonus = variant
    d = h.make_inputs(
        G, B=2, T=T, H=2, K=32, V=48, gate=gate, bonus=bonus, initial_state=init, segments=seg, seed=100 + T
    )
    ref = h.run_with_grads(G, "reference", d)
    xla = h.run_with_grads(G, "xla", d, chunk_size=chunk)
    assert set(ref) == {"o", "state"} | h.expected_grad_keys(d)
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=f"{name} T={T}")


@pytest.mark.parametrize("variant,T,chunk,strength", STRONG_GATE_CASES, ids=STRONG_IDS)
def test_strong_gates_with_grads(variant: tuple, T: int, chunk: int, strength: str) -> None:
    """Fast and mixed fast/slow decays, with initial state and packed documents: xla == reference
    (outputs, final state, every gradient), and the reference == the numpy parallel form."""
    name, gate, bonus = variant
    d = h.make_inputs(
        G, B=1, T=T, H=2, K=32, V=48, gate=gate, bonus=bonus, initial_state=True, segments=True,
        seed=300 + T, gate_strength=strength,
    )
    ref = h.run_with_grads(G, "reference", d)
    xla = h.run_with_grads(G, "xla", d, chunk_size=chunk)
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=f"{name} {strength}")
    o_n, s_n = h.np_reference(G, d)
    h.assert_close(ref["o"], o_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference o vs numpy")
    h.assert_close(ref["state"], s_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="reference state vs numpy")


@pytest.mark.parametrize("chunk", [16, 48, 256])
def test_chunk_sizes(chunk: int) -> None:
    """Any multiple of 16 in [16, 256] works, incl. non-powers of two and chunk > T."""
    d = h.make_inputs(
        G, B=1, T=200, H=2, K=32, V=48, gate="vector", bonus=True, initial_state=True, segments=True, seed=5
    )
    o_r, s_r = h.run_op(G, "reference", d)
    o_x, s_x = h.run_op(G, "xla", d, chunk_size=chunk)
    h.assert_close(o_x, o_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="o")
    h.assert_close(s_x, s_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="state")


def test_auto_and_final_state_flag() -> None:
    """impl="auto" matches reference; final_state is None unless output_final_state=True."""
    d = h.make_inputs(G, B=2, T=70, H=2, K=16, V=8, gate="scalar", initial_state=True, seed=6)
    o_r, s_r = h.run_op(G, "reference", d)
    o, s = h.op_jit(G)(d)  # all defaults: impl="auto", output_final_state=False
    assert s is None
    assert o.shape == d["v"].shape and o.dtype == jnp.float32
    h.assert_close(o, o_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="auto o")
    for impl in ("reference", "xla", "auto"):
        assert jax.eval_shape(functools.partial(h.call_op, G, impl=impl), d)[1] is None
    o, s = h.run_op(G, "auto", d)
    h.assert_close(s, s_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="auto state")


def test_pallas_matches_reference() -> None:
    """impl="pallas" gives the reference answer: on CPU through the XLA fallback (with a warning);
    the kernels themselves are tested in test_kernels.py."""
    d = h.make_inputs(G, B=1, T=40, H=2, K=16, V=16, gate="vector", bonus=True, initial_state=True, seed=7)
    o_r, s_r = h.run_op(G, "reference", d)
    with pytest.warns(UserWarning, match="XLA chunked form"):
        o, s = h.call_op(G, d, impl="pallas", output_final_state=True)
    h.assert_close(o, o_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="pallas o")
    h.assert_close(s, s_r, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="pallas state")


# ------------------------------------------------------------------ 3. documents, continuation, step
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,gate,bonus", [GATE_VARIANTS[1], GATE_VARIANTS[3]], ids=["scalar", "vector_bonus"])
def test_packed_equals_separate(name: str, gate: Optional[str], bonus: bool, impl: str) -> None:
    """Packed documents == each document run alone (initial state only for the first), concatenated."""
    T = 64
    d = h.make_inputs(G, B=2, T=T, H=2, K=16, V=24, gate=gate, bonus=bonus, initial_state=True, seed=8)
    d["segment_ids"] = h.packed_test_segment_ids()
    o_p, s_p = h.run_op(G, impl, d, chunk_size=16)
    for b in range(2):
        docs = h.documents(d["segment_ids"][b], T)
        assert len(docs) >= 3
        for i, (a, e) in enumerate(docs):
            part = h.slice_time(d, a, e, batch=b)
            part["segment_ids"] = None
            if i > 0:
                part["initial_state"] = None
            o_d, s_d = h.run_op(G, impl, part, chunk_size=16)
            h.assert_close(o_p[b : b + 1, a:e], o_d, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name=f"o b={b} doc={i}")
        h.assert_close(s_p[b : b + 1], s_d, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name=f"final state b={b}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seg", [False, True], ids=["noseg", "seg"])
def test_continuation(impl: str, seg: bool) -> None:
    """Run T1=37 then T2=50 from the returned state == one run of 87 tokens."""
    T1, T2 = 37, 50
    d = h.make_inputs(G, B=2, T=T1 + T2, H=2, K=16, V=24, gate="vector", bonus=True, initial_state=True, seed=9)
    if seg:  # boundaries on both sides of T1 but not at T1 (a change exactly at T1 would reset the state)
        d["segment_ids"] = h.segment_ids_from_bounds([[10, 50], [20, 36, 60]], T1 + T2)
    o_full, s_full = h.run_op(G, impl, d, chunk_size=16)
    first = h.slice_time(d, 0, T1)
    o1, s1 = h.run_op(G, impl, first, chunk_size=16)
    second = h.slice_time(d, T1, T1 + T2)
    second["initial_state"] = s1
    o2, s2 = h.run_op(G, impl, second, chunk_size=16)
    h.assert_close(np.concatenate([o1, o2], 1), o_full, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="o")
    h.assert_close(s2, s_full, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="state")


@pytest.mark.parametrize("name,gate,bonus", GATE_VARIANTS, ids=GATE_IDS)
def test_step_equals_op(name: str, gate: Optional[str], bonus: bool) -> None:
    """gated_linear_attention_step token by token == the full op (reference), and the numpy form."""
    d = h.make_inputs(G, B=2, T=20, H=2, K=16, V=24, gate=gate, bonus=bonus, initial_state=True, seed=10)
    o_s, s_s = h.run_steps(G, d)
    o_r, s_r = h.run_op(G, "reference", d)
    h.assert_close(o_s, o_r, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o")
    h.assert_close(s_s, s_r, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="state")
    o_n, s_n = h.np_reference(G, d)
    h.assert_close(o_s, o_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o vs numpy")
    h.assert_close(s_s, s_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="state vs numpy")


def test_step_explicit_scale() -> None:
    """The step function honours an explicit scale (o scales linearly, state does not change)."""
    d = h.make_inputs(G, B=1, T=1, H=2, K=16, V=8, gate="vector", bonus=True, initial_state=True, seed=12)
    o1, s1 = h.run_steps(G, d, scale=1.0)
    o2, s2 = h.run_steps(G, d, scale=0.25)
    o_n, s_n = h.np_reference(G, d, scale=0.25)
    h.assert_close(o2, o_n, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o")
    h.assert_close(o2, 0.25 * o1, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="o linear in scale")
    h.assert_close(s2, s1, rtol=h.REF_RTOL, atol_rel=h.REF_ATOL_REL, name="state independent of scale")


# ------------------------------------------------------------------ 4. low precision inputs
@pytest.mark.parametrize("dtype,impl", h.LOWP_CASES, ids=h.LOWP_IDS)
def test_low_precision_inputs(dtype, impl: str) -> None:
    """bf16/f16 q,k,v,g,bonus: o has v's dtype, the state stays float32, o ~ float32 run on the same values."""
    d = h.make_inputs(
        G, B=2, T=100, H=2, K=32, V=48, gate="vector", bonus=True, initial_state=True, segments=True, seed=13
    )
    low = h.cast(d, dtype, ("q", "k", "v", "g", "bonus"))
    rounded = {n: (x if x is None or n == "segment_ids" else np.asarray(x, np.float32)) for n, x in low.items()}
    o, s = h.run_op(G, impl, low, chunk_size=32)
    assert o.dtype == dtype
    assert s.dtype == jnp.float32
    o32, s32 = h.run_op(G, impl, rounded, chunk_size=32)
    h.assert_close(o.astype(np.float32), o32, rtol=h.LOWP_RTOL, atol_rel=h.LOWP_ATOL_REL, name="o")
    h.assert_close(s, s32, rtol=h.LOWP_RTOL, atol_rel=h.LOWP_ATOL_REL, name="state")


# ------------------------------------------------------------------ 5. extreme gates
@pytest.mark.parametrize("value", [-30.0, -1e-6])
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_extreme_gates(gate: str, value: float) -> None:
    """g = -30 (state wiped every step) or -1e-6 (no decay) everywhere, T=200: finite, xla == reference."""
    d = h.make_inputs(G, B=1, T=200, H=2, K=32, V=48, gate=gate, initial_state=True, seed=14)
    d["g"] = np.full_like(d["g"], value)
    ref = h.run_with_grads(G, "reference", d)
    xla = h.run_with_grads(G, "xla", d)
    h.assert_finite(xla, ctx=f"xla g={value}")
    # d loss/d g_t ~ exp(g_t) <dL/dS_t, S_{t-1}> is ~1e-13 at g = -30. It is compared at its own
    # magnitude, like every other gradient: the chunked form must not obtain it as a difference of
    # O(1) terms (jaxlin.ops.chunking.pair_gaps).
    h.assert_all_close(xla, ref, rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, ctx=f"g={value}")
    if value == -30.0:  # decay exp(-30) ~ 1e-13: o_t is (to float32 precision) the single-token read
        isolated = {**d, "initial_state": None, "g": None, "segment_ids": np.arange(200, dtype=np.int32)[None]}
        d1 = h.np_reference(G, isolated)
        h.assert_close(xla["o"][:, 1:], d1[0][:, 1:], rtol=h.XLA_RTOL, atol_rel=h.XLA_ATOL_REL, name="isolated tokens")
