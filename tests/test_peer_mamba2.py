"""jaxlin's Mamba2 layer against transformers' Mamba2Mixer (the mamba_ssm math, its PyTorch path).

transformers' `Mamba2Mixer` is an independent statement of Mamba2 (Dao and Gu, 2024) as the
authors' mamba_ssm computes it:

    [z, xBC, dt] = W_in u;   xBC = silu(conv1d(xBC) + b);   dt = softplus(dt + dt_bias)
    h_t = exp(-exp(A_log) dt_t) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t^T h_t + D x_t
    out = W_out RMSNormGated(y * silu(z)), normalised per group of d_inner / n_groups channels

jaxlin's row has one B, C per head (n_groups = num_heads: a group is a head, and so is the
norm's group). Its projections are copied from the mixer (C -> q, B -> k, x -> v, z -> the
output gate, the dt rows -> the gate; the conv's weight and bias, A_log, dt_bias, D, the
norm's weight, W_out), and the outputs must agree on random inputs (float64 in torch, float32
here, measured ~1e-6 of the output's scale). Slow: needs torch and transformers (CI step 2).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers.linear_attention import LinearAttention

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
configuration = pytest.importorskip("transformers.models.mamba2.configuration_mamba2")

D, H, P, N, T = 48, 3, 16, 8, 37    # d_model, heads (= groups), head dim, state size, length
TOLERANCE = 1e-5                     # relative to the output's largest entry


def _mixer() -> object:
  """A float64 Mamba2Mixer with random (non-default) norm weight, D and A."""
  torch.manual_seed(0)
  config = configuration.Mamba2Config(
      hidden_size=D, expand=1, head_dim=P, num_heads=H, state_size=N, n_groups=H,
      num_hidden_layers=1, chunk_size=16, use_conv_bias=True, layer_norm_epsilon=1e-5)
  mixer = mamba2.Mamba2Mixer(config, 0).double()
  with torch.no_grad():
    mixer.norm.weight.uniform_(0.5, 1.5)
    mixer.D.uniform_(0.5, 1.5)
    mixer.A_log.copy_(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
  return mixer


def _copy(mixer: object, layer: LinearAttention) -> None:
  """The mixer's weights into the jaxlin layer (torch Linear weights are [out, in])."""
  value = lambda t: jnp.asarray(t.detach().numpy(), jnp.float32)
  z, x, b, c, dt = np.split(mixer.in_proj.weight.detach().numpy(),
                            np.cumsum([H * P, H * P, H * N, H * N]), axis=0)
  for proj, rows in ((layer.g_proj, z), (layer.v_proj, x), (layer.k_proj, b),
                     (layer.q_proj, c), (layer.gate.proj, dt)):
    proj.kernel[...] = jnp.asarray(rows.T, jnp.float32)
  # conv channels: transformers [x | B | C], jaxlin [q | k | v] = [C | B | x]
  sizes = np.cumsum([H * P, H * N])
  cx, cb, cc = np.split(mixer.conv1d.weight.detach().numpy()[:, 0, :], sizes, axis=0)
  bx, bb, bc = np.split(mixer.conv1d.bias.detach().numpy(), sizes)
  layer.conv.weight[...] = jnp.asarray(np.concatenate([cc, cb, cx]).T, jnp.float32)
  layer.conv.bias[...] = jnp.asarray(np.concatenate([bc, bb, bx]), jnp.float32)
  layer.gate.A_log[...] = value(mixer.A_log)
  layer.gate.dt_bias[...] = value(mixer.dt_bias)
  layer.skip[...] = value(mixer.D)
  layer.norm.weight[...] = value(mixer.norm.weight).reshape(H, P)
  layer.o_proj.kernel[...] = value(mixer.out_proj.weight).T


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_mamba2_layer_equals_transformers_mamba2_mixer(impl: str) -> None:
  mixer = _mixer()
  layer = LinearAttention(D, H, variant="mamba2", key_dim=N, value_dim=P, chunk_size=16,
                          impl=impl, rngs=nnx.Rngs(0))
  _copy(mixer, layer)
  u = np.random.default_rng(0).normal(size=(2, T, D))
  expected = mixer(torch.as_tensor(u)).detach().numpy()
  got = np.asarray(layer(jnp.asarray(u, jnp.float32)).y)
  error = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
  assert error < TOLERANCE, f"max |jaxlin - transformers| / max |transformers| = {error:.2e}"
