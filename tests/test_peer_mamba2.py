"""jaxlin's Mamba2 layer against transformers' Mamba2Mixer (the mamba_ssm math, its PyTorch path).

transformers' `Mamba2Mixer` is an independent statement of Mamba2 (Dao and Gu, 2024) as the
authors' mamba_ssm computes it:

    [z, xBC, dt] = W_in u;   xBC = silu(conv1d(xBC) + b);   dt = softplus(dt + dt_bias)
    h_t = exp(-exp(A_log) dt_t) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t^T h_t + D x_t
    out = W_out RMSNormGated(y * silu(z)), normalised per group of d_inner / n_groups channels

jaxlin's row has one B, C per head (n_groups = num_heads: a group is a head, and so is the
norm's group). `jaxlin.interop.mamba2` copies the mixer's weights into it (C -> q, B -> k,
x -> v, z -> the output gate, the dt rows -> the gate; the conv's weight and bias, A_log,
dt_bias, D, the norm's weight, W_out), and the outputs must agree on random inputs (float64
in torch, float32 here, measured ~1e-6 of the output's scale). Slow: needs torch and transformers (CI step 2).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.interop import mamba2 as interop_mamba2
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
  """The mixer's weights into the jaxlin layer, through `jaxlin.interop.mamba2`."""
  tensors = {name: t.detach().numpy() for name, t in mixer.state_dict().items()}
  state = nnx.state(layer, nnx.Param)
  nnx.replace_by_pure_dict(state, interop_mamba2.mixer_params(tensors, n_groups=H))
  nnx.update(layer, state)


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
