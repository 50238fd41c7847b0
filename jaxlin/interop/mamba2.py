"""transformers' `Mamba2Mixer` weights -> the parameters of a jaxlin mamba2 `LinearAttention`.

No torch needed: the input is the mixer's tensors as arrays (its `state_dict()` as NumPy, or
safetensors), named as in transformers (`prefix` + name). jaxlin gives every head its own B and
C, so the mixer must have n_groups = num_heads (a Mamba2 group is a jaxlin head) and no
projection biases. H heads, P head dim, N state size, d model width, W conv width; torch Linear
weights are [out, in], jaxlin kernels [in, out]:

    in_proj.weight  [2HP + 2HN + H, d] rows [z | x | B | C | dt]   g_proj, v_proj, k_proj,
                                                                   q_proj, gate.proj kernels
    conv1d.weight   [HP + 2HN, 1, W] channels [x | B | C]          conv.weight [W, HP + 2HN],
    conv1d.bias     [HP + 2HN]                                     channels [q | k | v] = [C | B | x]
    A_log, dt_bias, D [H]                                          gate.A_log, gate.dt_bias, skip
    norm.weight     [HP]                                           norm.weight [H, P]
    out_proj.weight [d, HP]                                        o_proj.kernel

The result is the layer's `nnx.Param` state as a pure dict, for `nnx.replace_by_pure_dict`.
Any mismatch stops with an error naming the tensor (missing, unexpected, wrong shape).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "dt_bias", "D",
           "norm.weight", "out_proj.weight")


def _shape_error(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> ValueError:
  return ValueError(f"Mamba2Mixer tensor {name!r}: shape {got}, expected {expected}")


def mixer_params(tensors: Mapping[str, Any], *, n_groups: int, prefix: str = "",
                 dtype: Any = jnp.float32) -> dict[str, Any]:
  """The jaxlin mamba2 layer's parameters (pure dict) from a Mamba2Mixer's `tensors`.

  `n_groups` is the mixer's config.n_groups (the tensors give only n_groups * N); it must
  equal its number of heads. Tensors under other names than `prefix` + TENSORS are ignored
  unless they start with `prefix` (then they are unexpected: a bias jaxlin does not have).
  """
  names = {prefix + t for t in TENSORS}
  missing = sorted(n for n in names if n not in tensors)
  if missing:
    raise ValueError(f"Mamba2Mixer tensors missing: {missing} (expected {sorted(names)})")
  extra = sorted(n for n in tensors if n.startswith(prefix) and n not in names)
  if extra:
    raise ValueError(f"Mamba2Mixer tensors unexpected: {extra}; jaxlin's mamba2 layer has "
                     f"exactly {list(TENSORS)} (use_bias=False, use_conv_bias=True)")
  get = {t: np.asarray(tensors[prefix + t]) for t in TENSORS}
  heads = get["A_log"].shape[0] if get["A_log"].ndim == 1 else -1
  if heads < 1:
    raise _shape_error(prefix + "A_log", get["A_log"].shape, ("num_heads",))
  if n_groups != heads:
    raise ValueError(f"n_groups={n_groups} with num_heads={heads}: jaxlin gives every head its "
                     f"own B and C, so it imports only Mamba2Mixers with n_groups == num_heads")
  out_w = get["out_proj.weight"]
  if out_w.ndim != 2 or out_w.shape[1] % heads:
    raise _shape_error(prefix + "out_proj.weight", out_w.shape, ("d_model", "num_heads * P"))
  d, inner = out_w.shape
  in_w, conv_w = get["in_proj.weight"], get["conv1d.weight"]
  state = (conv_w.shape[0] - inner) // 2 if conv_w.ndim == 3 else 0
  if conv_w.ndim != 3 or conv_w.shape[1] != 1 or state < heads or state % heads:
    raise _shape_error(prefix + "conv1d.weight", conv_w.shape,
                       (f"{inner} + 2 * num_heads * N", 1, "W"))
  expected = {"in_proj.weight": (2 * inner + 2 * state + heads, d),
              "conv1d.bias": (inner + 2 * state,), "dt_bias": (heads,), "D": (heads,),
              "norm.weight": (inner,)}
  for t, shape in expected.items():
    if get[t].shape != shape:
      raise _shape_error(prefix + t, get[t].shape, shape)
  cast = lambda a: jnp.asarray(a, dtype)
  z, x, b, c, dt = np.split(in_w, np.cumsum([inner, inner, state, state]), axis=0)
  conv_x, conv_b, conv_c = np.split(conv_w[:, 0, :], np.cumsum([inner, state]), axis=0)
  bias_x, bias_b, bias_c = np.split(get["conv1d.bias"], np.cumsum([inner, state]))
  return {
      "g_proj": {"kernel": cast(z.T)}, "v_proj": {"kernel": cast(x.T)},
      "k_proj": {"kernel": cast(b.T)}, "q_proj": {"kernel": cast(c.T)},
      "gate": {"proj": {"kernel": cast(dt.T)}, "A_log": cast(get["A_log"]),
               "dt_bias": cast(get["dt_bias"])},
      "conv": {"weight": cast(np.concatenate([conv_c, conv_b, conv_x]).T),
               "bias": cast(np.concatenate([bias_c, bias_b, bias_x]))},
      "skip": cast(get["D"]),
      "norm": {"weight": cast(get["norm.weight"].reshape(heads, inner // heads))},
      "o_proj": {"kernel": cast(out_w.T)},
  }
