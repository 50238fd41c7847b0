"""Shared helpers for the jaxlin.ops tests.

Random inputs, independent numpy float64 references written from the docs/design.md §4 formulas,
jitted wrappers around the ops (forward, forward+gradients, token-by-token step) and comparisons.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlin import ops
from gpu_lowering import export_cuda  # noqa: F401  (the lowering tests call h.export_cuda)

Inputs = dict[str, Optional[np.ndarray]]

# ---------------------------------------------------------------------------------------------
# Tolerances. An absolute tolerance is always given relative to the largest magnitude of the
# expected array (``atol = ATOL_REL * max|expected|``), so the same constant serves outputs,
# states and gradients whatever their scale.
# ---------------------------------------------------------------------------------------------
#: float32 op (any impl) vs float64 numpy, or two float32 evaluations of the same token recurrence.
REF_RTOL, REF_ATOL_REL = 1e-4, 2e-5
#: chunked ``impl="xla"`` vs token-by-token ``impl="reference"`` (both float32), incl. gradients.
XLA_RTOL, XLA_ATOL_REL = 1e-3, 2e-4
#: bf16/f16 inputs vs a float32 run on the same rounded values (o is rounded to the input dtype).
LOWP_RTOL, LOWP_ATOL_REL = 2e-2, 1e-2

#: Compile the tests' jitted functions at XLA backend optimisation level 0: it halves compile time,
#: which dominates these small-shape tests on CPU; it does not change what is computed.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

#: (dtype, impl) cases of the low-precision input tests
LOWP_CASES = [(jnp.bfloat16, "reference"), (jnp.bfloat16, "xla"), (jnp.float16, "xla")]
LOWP_IDS = ["bf16-reference", "bf16-xla", "f16-xla"]

G_FAMILY, D_FAMILY = "G", "D"
G_KEYS = ("q", "k", "v", "g", "bonus", "initial_state", "segment_ids")
D_KEYS = ("q", "k", "v", "beta", "g", "removal_key", "removal", "initial_state", "segment_ids")


# ----------------------------------------------------------------------------- random inputs
def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable log(sigmoid(x)) (always <= 0)."""
    return -np.logaddexp(0.0, -x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def unit_norm(x: np.ndarray) -> np.ndarray:
    """Normalise the last axis to unit L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_segment_ids(B: int, T: int, rng: np.random.Generator) -> np.ndarray:
    """Packed-document ids [B, T] int32 with different layouts per row.

    Row 0: boundaries at 1 (a one-token document), 16, 64 (chunk-aligned) and 150 where T allows,
    ids alternate 1, 4, 1, 4 (a later document reuses an earlier id: only *changes* count).
    Other rows: two random boundaries, increasing ids starting at 0 (id 0 is a normal document).
    """
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        if b == 0:
            bounds = [t for t in (1, 16, 64, 150) if t < T]
        else:
            n = min(2, T - 1)
            bounds = sorted(rng.choice(np.arange(1, T), size=n, replace=False).tolist()) if n > 0 else []
        doc = np.zeros(T, np.int64)
        for t in bounds:
            doc[t:] += 1
        seg[b] = np.where(doc % 2 == 0, 1, 4) if b == 0 else doc + 0
    return seg


def segment_ids_from_bounds(bounds: Sequence[Sequence[int]], T: int) -> np.ndarray:
    """[B, T] int32 ids 7, 8, 9, ... with a new document starting at each listed position per row."""
    seg = np.full((len(bounds), T), 7, np.int32)
    for b, row in enumerate(bounds):
        for t in row:
            seg[b, t:] += 1
    return seg


def packed_test_segment_ids() -> np.ndarray:
    """[2, 64] ids for the packed-vs-separate tests: row 0 lengths 8, 16, 16, 24 (ids 7, 8, 9, 10);
    row 1 lengths 24, 16, 24 with a reused id (3, 5, 3). Boundaries lie off the 16-token chunk grid,
    and few distinct lengths occur (each separate run compiles once per length)."""
    row1 = np.array([3] * 24 + [5] * 16 + [3] * 24, np.int32)
    return np.stack([segment_ids_from_bounds([[8, 24, 40]], 64)[0], row1])


def make_inputs(
    family: str,
    *,
    B: int = 2,
    T: int = 16,
    H: int = 2,
    K: int = 32,
    V: int = 48,
    gate: Optional[str] = None,
    bonus: bool = False,
    removal_key: bool = False,
    removal: bool = False,
    initial_state: bool = False,
    segments: bool = False,
    seed: int = 0,
    gate_strength: str = "weak",
) -> Inputs:
    """Realistic random float32 inputs for one op call, keyed by the op's argument names.

    gate: None, "scalar" ([B,T,H]) or "vector" ([B,T,H,K], G family only). gate_strength "weak":
    g = log_sigmoid(3 + 1.5 n), decays in roughly (0.3, 1) (GLA-like); "strong": log_sigmoid(-1 + 1.5 n),
    mean g ~ -1.5 (Mamba2-like fast decay); "mixed": log_sigmoid(c + n) with c from -4 to 6 across the
    last gate axis (key dims, or heads for a scalar gate), fast and slow channels side by side.
    For the D family k and removal_key have unit L2 norm and
    beta, removal = sigmoid(n). Absent optional arguments are None.
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    d: Inputs = {}
    d["q"] = rng.standard_normal((B, T, H, K)).astype(f32)
    k = rng.standard_normal((B, T, H, K))
    d["k"] = (unit_norm(k) if family == D_FAMILY else k).astype(f32)
    d["v"] = rng.standard_normal((B, T, H, V)).astype(f32)
    if family == D_FAMILY:
        d["beta"] = sigmoid(rng.standard_normal((B, T, H))).astype(f32)
    gshape = {None: None, "scalar": (B, T, H), "vector": (B, T, H, K)}[gate]
    if gshape is None:
        d["g"] = None
    elif gate_strength == "weak":
        d["g"] = log_sigmoid(3.0 + 1.5 * rng.standard_normal(gshape)).astype(f32)
    elif gate_strength == "strong":
        d["g"] = log_sigmoid(-1.0 + 1.5 * rng.standard_normal(gshape)).astype(f32)
    elif gate_strength == "mixed":
        d["g"] = log_sigmoid(np.linspace(-4.0, 6.0, gshape[-1]) + rng.standard_normal(gshape)).astype(f32)
    else:
        raise ValueError(gate_strength)
    if family == G_FAMILY:
        d["bonus"] = (0.5 * rng.standard_normal((H, K))).astype(f32) if bonus else None
    else:
        d["removal_key"] = unit_norm(rng.standard_normal((B, T, H, K))).astype(f32) if removal_key else None
        d["removal"] = sigmoid(rng.standard_normal((B, T, H))).astype(f32) if removal else None
    d["initial_state"] = (0.5 * rng.standard_normal((B, H, K, V))).astype(f32) if initial_state else None
    d["segment_ids"] = random_segment_ids(B, T, rng) if segments else None
    return d


def slice_time(inputs: Inputs, start: int, stop: int, batch: Optional[int] = None) -> Inputs:
    """Time slice [start, stop) of every per-token input (optionally one batch row, kept as B=1).

    bonus and initial_state are carried over unchanged (except for the batch selection).
    """
    out: Inputs = {}
    for name, x in inputs.items():
        if x is None:
            out[name] = None
            continue
        if name == "bonus":
            out[name] = x
            continue
        if batch is not None:
            x = x[batch : batch + 1]
        out[name] = x if name == "initial_state" else x[:, start:stop]
    return out


def documents(seg_row: Optional[np.ndarray], T: int) -> list[tuple[int, int]]:
    """[start, stop) of each document: a new one begins at every change of id."""
    if seg_row is None:
        return [(0, T)]
    starts = [0] + [t for t in range(1, T) if seg_row[t] != seg_row[t - 1]]
    return list(zip(starts, starts[1:] + [T]))


# ------------------------------------------------------------------------- numpy references
def _f64(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if x is None else np.asarray(x, np.float64)


def gla_parallel_doc(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, u: Optional[np.ndarray], scale: float, S0: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """O(T^2) parallel form of the G recurrence for one head of one document (float64).

    q, k, g: [T, K]; v: [T, V]; u: [K] or None; S0: [K, V]. With G_t = sum_{s<=t} g_s:
    o_t = scale * [sum_{s<=t} ((q_t * exp(G_t - G_s)) . k_s) v_s + (q_t * exp(G_t)) S0]; with bonus
    o_t = scale * [sum_{s<t} ((q_t * exp(G_{t-1} - G_s)) . k_s) v_s + (q_t . (u * k_t)) v_t
                  + (q_t * exp(G_{t-1})) S0]   (G_{-1} = 0).
    Final state S = sum_s Diag(exp(G_{T-1} - G_s)) k_s v_s^T + Diag(exp(G_{T-1})) S0.
    """
    T = q.shape[0]
    G = np.cumsum(g, axis=0)
    t_idx = np.arange(T)
    if u is None:
        mask = t_idx[:, None] >= t_idx[None, :]
        diff = np.where(mask[:, :, None], G[:, None, :] - G[None, :, :], -np.inf)
        A = np.einsum("tk,sk,tsk->ts", q, k, np.exp(diff))
        o = A @ v + (q * np.exp(G)) @ S0
    else:
        Gp = np.concatenate([np.zeros_like(G[:1]), G[:-1]], axis=0)
        mask = t_idx[:, None] > t_idx[None, :]
        diff = np.where(mask[:, :, None], Gp[:, None, :] - G[None, :, :], -np.inf)
        A = np.einsum("tk,sk,tsk->ts", q, k, np.exp(diff))
        A = A + np.diag(np.einsum("tk,k,tk->t", q, u, k))
        o = A @ v + (q * np.exp(Gp)) @ S0
    S = (k * np.exp(G[-1] - G)).T @ v + np.exp(G[-1])[:, None] * S0
    return scale * o, S


def np_gla(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: Optional[np.ndarray] = None,
    *,
    bonus: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    initial_state: Optional[np.ndarray] = None,
    segment_ids: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """G family in float64 via the parallel form, document by document. Returns (o, final_state)."""
    q, k, v, g, bonus, S0 = map(_f64, (q, k, v, g, bonus, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if g is None:
        g = np.zeros((B, T, H, K))
    elif g.ndim == 3:
        g = np.broadcast_to(g[..., None], (B, T, H, K))
    o = np.zeros((B, T, H, V))
    S_out = np.zeros((B, H, K, V))
    for b in range(B):
        docs = documents(None if segment_ids is None else np.asarray(segment_ids)[b], T)
        for h in range(H):
            for i, (a, e) in enumerate(docs):
                start = S0[b, h] if (S0 is not None and i == 0) else np.zeros((K, V))
                u = None if bonus is None else bonus[h]
                sl = (b, slice(a, e), h)
                o[sl], S = gla_parallel_doc(q[sl], k[sl], v[sl], g[sl], u, scale, start)
            S_out[b, h] = S
    return o, S_out


def np_delta(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    beta: np.ndarray,
    g: Optional[np.ndarray] = None,
    *,
    removal_key: Optional[np.ndarray] = None,
    removal: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    initial_state: Optional[np.ndarray] = None,
    segment_ids: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """D family in float64, token loop of S_t = exp(g_t)(I - b_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T.

    o_t = scale * S_t^T q_t; the state is zeroed where segment_ids changes. Returns (o, final_state).
    """
    q, k, v, beta, g, p, bb, S0 = map(_f64, (q, k, v, beta, g, removal_key, removal, initial_state))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    p = k if p is None else p
    bb = beta if bb is None else bb
    g = np.zeros((B, T, H)) if g is None else g
    o = np.zeros((B, T, H, V))
    S_out = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            S = np.zeros((K, V)) if S0 is None else S0[b, h].copy()
            for t in range(T):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    S = np.zeros((K, V))
                kt, pt = k[b, t, h], p[b, t, h]
                removed = S - bb[b, t, h] * np.outer(kt, pt @ S)
                S = np.exp(g[b, t, h]) * removed + beta[b, t, h] * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * (S.T @ q[b, t, h])
            S_out[b, h] = S
    return o, S_out


def np_reference(family: str, inputs: Inputs, scale: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to :func:`np_gla` or :func:`np_delta` with an inputs dict."""
    d = dict(inputs)
    if family == G_FAMILY:
        return np_gla(d.pop("q"), d.pop("k"), d.pop("v"), d.pop("g"), scale=scale, **d)
    return np_delta(d.pop("q"), d.pop("k"), d.pop("v"), d.pop("beta"), d.pop("g"), scale=scale, **d)


# ------------------------------------------------------------------------------- op wrappers
def call_op(family: str, inputs: dict[str, Any], **kwargs: Any) -> tuple[jax.Array, Optional[jax.Array]]:
    """Call the family's op with q, k, v (beta), g positionally and the rest by keyword."""
    d = inputs
    if family == G_FAMILY:
        return ops.gated_linear_attention(
            d["q"], d["k"], d["v"], d.get("g"),
            bonus=d.get("bonus"), initial_state=d.get("initial_state"), segment_ids=d.get("segment_ids"), **kwargs,
        )
    return ops.delta_rule(
        d["q"], d["k"], d["v"], d["beta"], d.get("g"),
        removal_key=d.get("removal_key"), removal=d.get("removal"),
        initial_state=d.get("initial_state"), segment_ids=d.get("segment_ids"), **kwargs,
    )


@functools.lru_cache(maxsize=None)
def op_jit(family: str, **kwargs: Any) -> Callable:
    """Jitted ``inputs -> call_op(family, inputs, **kwargs)`` (keyword arguments left out keep defaults)."""

    def f(inputs: dict[str, Any]) -> tuple[jax.Array, Optional[jax.Array]]:
        return call_op(family, inputs, **kwargs)

    return jax.jit(f, compiler_options=COMPILER_OPTIONS)


def run_op(
    family: str, impl: str, inputs: Inputs, chunk_size: int = 64, scale: Optional[float] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run the jitted op with output_final_state=True; returns numpy (o, final_state)."""
    o, s = op_jit(family, impl=impl, chunk_size=chunk_size, scale=scale, output_final_state=True)(inputs)
    return np.asarray(o), np.asarray(s)


@functools.lru_cache(maxsize=None)
def _loss_grad_jit(family: str, impl: str, chunk_size: int, kernel: Any = None) -> Callable:
    def loss(diff: dict, nondiff: dict, w_o: jax.Array, w_s: jax.Array):
        o, s = call_op(family, {**diff, **nondiff}, impl=impl, chunk_size=chunk_size, output_final_state=True,
                       kernel=kernel)
        value = jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)
        return value, (o, s)

    return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=COMPILER_OPTIONS)


def loss_weights(inputs: Inputs, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random weights w_o [B,T,H,V], w_s [B,H,K,V] of the scalar test loss."""
    B, T, H, K = inputs["q"].shape
    V = inputs["v"].shape[-1]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, H, V)).astype(np.float32), rng.standard_normal((B, H, K, V)).astype(np.float32)


def run_with_grads(
    family: str, impl: str, inputs: Inputs, chunk_size: int = 64, kernel: Any = None
) -> dict[str, np.ndarray]:
    """o, final state and d/d(every float input) of loss = sum(o*w_o) + sum(final_state*w_s).

    ``kernel``: the ops' KernelOptions for impl="pallas". Returns a flat dict: "o", "state", and
    "grad_<name>" for every non-None float input.
    """
    diff = {n: x for n, x in inputs.items() if x is not None and n != "segment_ids"}
    nondiff = {"segment_ids": inputs.get("segment_ids")}
    w_o, w_s = loss_weights(inputs)
    (_, (o, s)), grads = _loss_grad_jit(family, impl, chunk_size, kernel)(diff, nondiff, w_o, w_s)
    out = {"o": np.asarray(o), "state": np.asarray(s)}
    out.update({f"grad_{n}": np.asarray(gr) for n, gr in grads.items()})
    return out


@functools.lru_cache(maxsize=None)
def _step_jit(family: str, scale: Optional[float]) -> Callable:
    def f(tok: dict[str, Any], state: jax.Array):
        if family == G_FAMILY:
            return ops.gated_linear_attention_step(
                tok["q"], tok["k"], tok["v"], tok.get("g"), state=state, bonus=tok.get("bonus"), scale=scale
            )
        return ops.delta_rule_step(
            tok["q"], tok["k"], tok["v"], tok["beta"], tok.get("g"), state=state,
            removal_key=tok.get("removal_key"), removal=tok.get("removal"), scale=scale,
        )

    return jax.jit(f, compiler_options=COMPILER_OPTIONS)


def run_steps(family: str, inputs: Inputs, scale: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply the family's step function token by token (no segment_ids); returns (o, final state)."""
    B, T, H, _ = inputs["q"].shape
    K, V = inputs["q"].shape[-1], inputs["v"].shape[-1]
    state = inputs.get("initial_state")
    state = jnp.zeros((B, H, K, V), jnp.float32) if state is None else jnp.asarray(state)
    step = _step_jit(family, scale)
    outs = []
    for t in range(T):
        tok = {}
        for n, x in inputs.items():
            if x is None or n in ("initial_state", "segment_ids"):
                continue
            tok[n] = x if n == "bonus" else x[:, t]
        o_t, state = step(tok, state)
        assert o_t.shape == (B, H, V), o_t.shape
        assert state.shape == (B, H, K, V) and state.dtype == jnp.float32, (state.shape, state.dtype)
        outs.append(np.asarray(o_t))
    return np.stack(outs, axis=1), np.asarray(state)


# ------------------------------------------------------------------------------- comparisons
def assert_close(actual: Any, expected: Any, *, rtol: float, atol_rel: float, name: str = "") -> None:
    """|actual - expected| <= rtol*|expected| + atol_rel*max|expected|, elementwise; both finite."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: actual has non-finite values"
    assert np.all(np.isfinite(e)), f"{name}: expected has non-finite values"
    mag = float(np.max(np.abs(e))) if e.size else 0.0
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_rel * mag + 1e-30, err_msg=name)


def assert_all_close(
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    rtol: float,
    atol_rel: float,
    ctx: str = "",
) -> None:
    """assert_close for every key of ``expected`` (keys must match)."""
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    for n in expected:
        assert_close(actual[n], expected[n], rtol=rtol, atol_rel=atol_rel, name=f"{ctx} {n}")


def assert_finite(tree: dict[str, np.ndarray], ctx: str = "") -> None:
    """Every array in the dict is finite."""
    for n, x in tree.items():
        assert np.all(np.isfinite(np.asarray(x, np.float64))), f"{ctx} {n}: non-finite values"


def expected_grad_keys(inputs: Inputs) -> set[str]:
    """The gradient names run_with_grads must produce for these inputs."""
    return {f"grad_{n}" for n, x in inputs.items() if x is not None and n != "segment_ids"}


def cast(inputs: Inputs, dtype: Any, names: Sequence[str]) -> Inputs:
    """Copy of inputs with the named (non-None) arrays cast to dtype (as jax arrays)."""
    return {n: (jnp.asarray(x, dtype) if (x is not None and n in names) else x) for n, x in inputs.items()}
