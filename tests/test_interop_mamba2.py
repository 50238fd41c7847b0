"""`jaxlin.interop.mamba2`: the tensor layout it accepts and the errors it gives.

That the mapping computes transformers' Mamba2Mixer is `tests/test_peer_mamba2.py` (slow,
torch); here, without torch: the result fits a jaxlin mamba2 layer's parameters exactly
(structure and shapes), each tensor lands where the layout table says, and every mismatch
names the tensor.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlin.interop import mamba2 as interop_mamba2
from jaxlin.layers.linear_attention import LinearAttention

D, H, P, N, W = 24, 3, 8, 4, 4    # d_model, heads (= groups), head dim, state size, conv width


def _tensors(prefix: str = "") -> dict[str, np.ndarray]:
  """A Mamba2Mixer's tensors (transformers' names and shapes), each entry its flat index."""
  conv = H * P + 2 * H * N
  shapes = {"in_proj.weight": (2 * H * P + 2 * H * N + H, D), "conv1d.weight": (conv, 1, W),
            "conv1d.bias": (conv,), "A_log": (H,), "dt_bias": (H,), "D": (H,),
            "norm.weight": (H * P,), "out_proj.weight": (D, H * P)}
  return {prefix + k: np.arange(np.prod(s), dtype=np.float64).reshape(s) + 1000 * i
          for i, (k, s) in enumerate(shapes.items())}


def _layer_shapes() -> Any:
  layer = nnx.eval_shape(lambda: LinearAttention(
      D, H, variant="mamba2", key_dim=N, value_dim=P, conv_size=W, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))


def test_params_fit_the_jaxlin_layer() -> None:
  params = interop_mamba2.mixer_params(_tensors("backbone.layers.0.mixer."), n_groups=H,
                                       prefix="backbone.layers.0.mixer.")
  assert jax.tree.map(lambda a: a.shape, params) == _layer_shapes()


def test_each_tensor_lands_where_the_layout_says() -> None:
  t = _tensors()
  p = interop_mamba2.mixer_params(t, n_groups=H)
  inner, state = H * P, H * N
  rows = np.split(t["in_proj.weight"], np.cumsum([inner, inner, state, state]))
  for name, block in zip(("g_proj", "v_proj", "k_proj", "q_proj"), rows):
    np.testing.assert_array_equal(p[name]["kernel"], block.T)
  np.testing.assert_array_equal(p["gate"]["proj"]["kernel"], rows[4].T)
  conv = t["conv1d.weight"][:, 0, :]          # channels [x | B | C] -> jaxlin [C | B | x]
  np.testing.assert_array_equal(p["conv"]["weight"][:, :state], conv[inner + state:].T)
  np.testing.assert_array_equal(p["conv"]["weight"][:, state:2 * state],
                                conv[inner:inner + state].T)
  np.testing.assert_array_equal(p["conv"]["weight"][:, 2 * state:], conv[:inner].T)
  np.testing.assert_array_equal(p["conv"]["bias"][:state], t["conv1d.bias"][inner + state:])
  np.testing.assert_array_equal(p["norm"]["weight"][1], t["norm.weight"][P:2 * P])
  np.testing.assert_array_equal(p["skip"], t["D"])
  np.testing.assert_array_equal(p["o_proj"]["kernel"], t["out_proj.weight"].T)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("dt_bias"), "missing: \\['dt_bias'\\]"),
    (lambda t: t.update({"in_proj.bias": np.zeros(3)}), "unexpected: \\['in_proj.bias'\\]"),
    (lambda t: t.update({"D": np.zeros(H + 1)}), "'D': shape \\(4,\\), expected \\(3,\\)"),
    (lambda t: t.update({"norm.weight": np.zeros(H * P - 1)}), "'norm.weight': shape"),
    (lambda t: t.update({"conv1d.weight": np.zeros((H * P + 2 * H * N, W))}),
     "'conv1d.weight': shape"),
])
def test_mismatches_name_the_tensor(change: Any, message: str) -> None:
  tensors = _tensors()
  change(tensors)
  with pytest.raises(ValueError, match=message):
    interop_mamba2.mixer_params(tensors, n_groups=H)


def test_shared_groups_are_refused() -> None:
  with pytest.raises(ValueError, match="n_groups=1 with num_heads=3"):
    interop_mamba2.mixer_params(_tensors(), n_groups=1)
