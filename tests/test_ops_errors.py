"""Argument validation of the jaxlin.ops recurrence ops: ValueError naming the offending argument."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
import pytest

import _helpers as h
from jaxlin import ops

B, T, H, K, V = 2, 8, 2, 8, 4
G, D = h.G_FAMILY, h.D_FAMILY


def _g_inputs() -> h.Inputs:
    """Valid G inputs with every optional argument present."""
    return h.make_inputs(
        G, B=B, T=T, H=H, K=K, V=V, gate="vector", bonus=True, initial_state=True, segments=True, seed=0
    )


def _d_inputs() -> h.Inputs:
    """Valid D inputs with every optional argument present."""
    return h.make_inputs(
        D, B=B, T=T, H=H, K=K, V=V, gate="scalar", removal_key=True, removal=True, initial_state=True,
        segments=True, seed=0,
    )


def _z(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


def _neg(*shape: int) -> np.ndarray:
    return np.full(shape, -0.1, np.float32)


def _with_positive(x: np.ndarray) -> np.ndarray:
    """Copy of a valid gate with one entry made positive."""
    y = np.array(x)
    y.flat[5] = 0.25
    return y


# (id, family, argument replaced, new value, regex the message must match)
BAD_INPUTS: list[tuple[str, str, str, Callable[[h.Inputs], Any], str]] = [
    ("G-q-rank", G, "q", lambda d: d["q"][0], r"\bq\b"),
    ("G-k-shape", G, "k", lambda d: _z(B, T, H, K + 1), r"\bk\b"),
    ("G-k-rank", G, "k", lambda d: _z(B, T, H * K), r"\bk\b"),
    ("G-v-time", G, "v", lambda d: _z(B, T + 1, H, V), r"\bv\b"),
    ("G-v-heads", G, "v", lambda d: _z(B, T, H + 1, V), r"\bv\b"),
    ("G-v-rank", G, "v", lambda d: _z(B, T, H, V, 1), r"\bv\b"),
    ("G-g-shape-vector", G, "g", lambda d: _neg(B, T, H, K + 1), r"\bg\b"),
    ("G-g-shape-scalar", G, "g", lambda d: _neg(B, T, H + 1), r"\bg\b"),
    ("G-g-rank", G, "g", lambda d: _neg(B, T), r"\bg\b"),
    ("G-g-positive", G, "g", lambda d: _with_positive(d["g"]), r"\bg\b"),
    ("G-g-positive-scalar", G, "g", lambda d: _with_positive(d["g"][..., 0]), r"\bg\b"),
    ("G-bonus-shape", G, "bonus", lambda d: _z(H, K + 1), r"\bbonus\b"),
    ("G-bonus-rank", G, "bonus", lambda d: _z(B, H, K), r"\bbonus\b"),
    ("G-initial_state-shape", G, "initial_state", lambda d: _z(B, H, K, V + 1), r"\binitial_state\b"),
    ("G-initial_state-rank", G, "initial_state", lambda d: _z(H, K, V), r"\binitial_state\b"),
    ("G-segment_ids-shape", G, "segment_ids", lambda d: _z(B, T + 1, dtype=np.int32), r"\bsegment_ids\b"),
    ("G-segment_ids-float", G, "segment_ids", lambda d: d["segment_ids"].astype(np.float32), r"\bsegment_ids\b"),
    ("D-q-rank", D, "q", lambda d: d["q"][..., 0], r"\bq\b"),
    ("D-k-shape", D, "k", lambda d: _z(B, T, H, K + 1), r"\bk\b"),
    ("D-v-time", D, "v", lambda d: _z(B, T - 1, H, V), r"\bv\b"),
    ("D-beta-shape", D, "beta", lambda d: _z(B, T, H, 1), r"\bbeta\b"),
    ("D-beta-time", D, "beta", lambda d: _z(B, T + 1, H), r"\bbeta\b"),
    ("D-g-vector", D, "g", lambda d: _neg(B, T, H, K), r"\bg\b"),
    ("D-g-shape", D, "g", lambda d: _neg(B, T, H + 1), r"\bg\b"),
    ("D-g-positive", D, "g", lambda d: _with_positive(d["g"]), r"\bg\b"),
    ("D-removal_key-shape", D, "removal_key", lambda d: _z(B, T, H, K + 1), r"\bremoval_key\b"),
    ("D-removal-shape", D, "removal", lambda d: _z(B, T, H, K), r"\bremoval\b"),
    ("D-initial_state-shape", D, "initial_state", lambda d: _z(B, H, V, K), r"\binitial_state\b"),
    ("D-segment_ids-shape", D, "segment_ids", lambda d: _z(B, dtype=np.int32), r"\bsegment_ids\b"),
    ("D-segment_ids-float", D, "segment_ids", lambda d: d["segment_ids"].astype(np.float64), r"\bsegment_ids\b"),
]


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(case: tuple, impl: str) -> None:
    """Wrong ranks, mismatched shapes, non-integer segment ids, positive gates -> ValueError(name)."""
    _, family, name, make_bad, pattern = case
    d = _g_inputs() if family == G else _d_inputs()
    jax.eval_shape(functools.partial(h.call_op, family, impl=impl, chunk_size=16), d)  # the unmodified inputs are valid
    d[name] = make_bad(d)
    with pytest.raises(ValueError, match=pattern):
        h.call_op(family, d, impl=impl, chunk_size=16)


@pytest.mark.parametrize("family", [G, D])
@pytest.mark.parametrize("impl", ["fast", "Reference", "", "triton"])
def test_unknown_impl(family: str, impl: str) -> None:
    """An impl outside {"auto", "reference", "xla", "pallas"} -> ValueError naming impl."""
    d = _g_inputs() if family == G else _d_inputs()
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        h.call_op(family, d, impl=impl)


@pytest.mark.parametrize("family", [G, D])
@pytest.mark.parametrize("chunk", [0, -16, 8, 24, 100, 272, 512, 32.0])
def test_bad_chunk_size(family: str, chunk: Any) -> None:
    """chunk_size must be an int multiple of 16 in [16, 256] -> ValueError naming chunk_size."""
    d = _g_inputs() if family == G else _d_inputs()
    for impl in ("xla", "auto"):
        with pytest.raises(ValueError, match=r"\bchunk_size\b"):
            h.call_op(family, d, impl=impl, chunk_size=chunk)


@pytest.mark.parametrize("family", [G, D])
@pytest.mark.parametrize("chunk", [16, 48, 256])
def test_valid_chunk_sizes_accepted(family: str, chunk: int) -> None:
    """The boundaries and a non-power of two of the valid chunk_size range do not raise."""
    d = _g_inputs() if family == G else _d_inputs()
    o, _ = jax.eval_shape(functools.partial(h.call_op, family, impl="xla", chunk_size=chunk), d)
    assert o.shape == (B, T, H, V)


def test_gate_zero_is_valid() -> None:
    """g = 0 (no decay) is allowed: only strictly positive gates are rejected."""
    d = _g_inputs()
    d["g"] = np.zeros_like(d["g"])
    o, _ = h.call_op(G, d, impl="reference")
    assert np.all(np.isfinite(np.asarray(o)))
    dd = _d_inputs()
    dd["g"] = np.zeros_like(dd["g"])
    o, _ = h.call_op(D, dd, impl="reference")
    assert np.all(np.isfinite(np.asarray(o)))


STEP_CASES = [
    ("G-state-shape", G, "state", (B, H, K, V + 1), r"\bstate\b"),
    ("G-q-rank", G, "q", (B, 1, H, K), r"\bq\b"),
    ("G-g-shape", G, "g", (B, H, K + 1), r"\bg\b"),
    ("D-state-shape", D, "state", (B, H, K + 1, V), r"\bstate\b"),
    ("D-beta-shape", D, "beta", (B, H, 1), r"\bbeta\b"),
    ("D-g-vector", D, "g", (B, H, K), r"\bg\b"),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_step_bad_shapes(case: tuple) -> None:
    """The step functions also reject mismatched shapes with a ValueError naming the argument."""
    _, family, name, shape, pattern = case
    tok: dict[str, Any] = dict(q=_z(B, H, K), k=_z(B, H, K), v=_z(B, H, V), g=_neg(B, H), state=_z(B, H, K, V))
    if family == D:
        tok["beta"] = _z(B, H)
    step = ops.gated_linear_attention_step if family == G else ops.delta_rule_step
    step(**tok)  # valid
    tok[name] = _neg(*shape) if name == "g" else _z(*shape)
    with pytest.raises(ValueError, match=pattern):
        step(**tok)
