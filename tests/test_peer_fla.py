"""jaxlin's ops against fla's own PyTorch reference recurrences (fla-core 0.4.2, float32 on CPU).

fla (flash-linear-attention, by the authors of GLA and Gated DeltaNet) ships naive token-by-token
PyTorch implementations next to its Triton kernels. They are an independent statement of each
variant's math, with the same conventions as jaxlin ([B, T, H, D] layout, scale K**-0.5,
log-space gates):

    simple GLA   S_t = exp(g_t) S_{t-1} + k_t v_t^T,          o_t = scale S_t^T q_t
    GLA          S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale S_t^T q_t
    RWKV6        S_t as GLA,  o_t = scale (S_{t-1} + Diag(u) k_t v_t^T)^T q_t
    Gated DeltaNet  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
                 o_t = scale S_t^T q_t

Compared, at T = 37 with an initial state: o, the final state and the gradient of every input
(q, k, v, gates, beta, u, initial state) of a random linear loss of o and the final state, for
impl "reference" and "xla". fla's naive modules are loaded from their files: importing the
`fla` package runs its Triton autotuner decorators, which fla-core 0.4.2 writes for an older
Triton than the 3.9 of the `resources` extra. Needs `pip install -e '.[peers]'` (CI step 2).
"""
from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin.ops import delta_rule, gated_linear_attention

pytestmark = pytest.mark.slow   # the peers extra (torch, fla-core) is installed for the slow step

B, T, H, K, V = 2, 37, 3, 16, 8
# float32 on both sides, the same recurrence: measured 1e-7 to 3e-7 relative
TOLERANCE = 1e-5
CASES = ("simple_gla", "gla", "rwkv6", "gated_deltanet")


def _fla_module(relative_path: str) -> ModuleType:
  spec = importlib.util.find_spec("fla")
  if spec is None:
    raise ModuleNotFoundError("fla-core is not installed: pip install -e '.[peers]'")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / relative_path
  module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _fla_naive(case: str) -> Callable[..., Any]:
  return {
      "simple_gla": lambda: _fla_module("simple_gla/naive.py").naive_recurrent_simple_gla,
      "gla": lambda: _fla_module("gla/naive.py").naive_recurrent_gla,
      "rwkv6": lambda: _fla_module("rwkv6/recurrent_naive.py").naive_recurrent_rwkv6,
      "gated_deltanet":
          lambda: _fla_module("gated_delta_rule/naive.py").naive_recurrent_gated_delta_rule,
  }[case]()


def _inputs(case: str) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(CASES.index(case))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  log_sigmoid = lambda x: (-np.logaddexp(0.0, -x)).astype(np.float32)
  x = {"q": normal(B, T, H, K), "k": normal(B, T, H, K) / 4, "v": normal(B, T, H, V),
       "h0": normal(B, H, K, V), "do": normal(B, T, H, V), "ds": normal(B, H, K, V)}
  if case in ("gla", "rwkv6"):
    x["g"] = log_sigmoid(3.0 + normal(B, T, H, K)) / 4
  else:
    x["g"] = log_sigmoid(3.0 + normal(B, T, H))
  if case == "rwkv6":
    x["u"] = normal(H, K)
  if case == "gated_deltanet":
    x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
    x["beta"] = (1.0 / (1.0 + np.exp(-normal(B, T, H)))).astype(np.float32)
  return x


def _leaves(x: dict[str, np.ndarray]) -> list[str]:
  return [n for n in ("q", "k", "v", "g", "beta", "u", "h0") if n in x]


def _jaxlin(case: str, impl: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """o, final state S and d<leaf> of sum(o * do) + sum(S * ds), from jaxlin."""
  def loss(a: dict[str, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    if case == "gated_deltanet":
      o, s = delta_rule(a["q"], a["k"], a["v"], a["beta"], a["g"], initial_state=a["h0"],
                        output_final_state=True, impl=impl)
    else:
      o, s = gated_linear_attention(a["q"], a["k"], a["v"], a["g"], bonus=a.get("u"),
                                    initial_state=a["h0"], output_final_state=True, impl=impl)
    return jnp.sum(o * x["do"]) + jnp.sum(s * x["ds"]), (o, s)

  (_, (o, s)), grads = jax.value_and_grad(loss, has_aux=True)(
      {n: jnp.asarray(x[n]) for n in _leaves(x)})
  return {"o": np.asarray(o), "S": np.asarray(s), **{f"d{n}": np.asarray(g)
                                                    for n, g in grads.items()}}


def _fla(case: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The same from fla's naive recurrence, by torch autograd."""
  import torch  # pylint: disable=import-outside-toplevel
  naive = _fla_naive(case)
  t = {n: torch.tensor(x[n], requires_grad=True) for n in _leaves(x)}
  if case == "rwkv6":   # fla's naive RWKV6 is head-first, [B, H, T, D]
    heads_first = lambda z: z.transpose(1, 2)
    o, s = naive(heads_first(t["q"]), heads_first(t["k"]), heads_first(t["v"]),
                 heads_first(t["g"]), t["u"], initial_state=t["h0"], output_final_state=True)
    o = heads_first(o)
  elif case == "gated_deltanet":
    o, s = naive(t["q"], t["k"], t["v"], t["beta"], t["g"], initial_state=t["h0"],
                 output_final_state=True)
  else:
    o, s = naive(t["q"], t["k"], t["v"], t["g"], initial_state=t["h0"], output_final_state=True)
  loss = torch.sum(o * torch.tensor(x["do"])) + torch.sum(s * torch.tensor(x["ds"]))
  loss.backward()
  return {"o": o.detach().numpy(), "S": s.detach().numpy(),
          **{f"d{n}": v.grad.numpy() for n, v in t.items()}}


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", CASES)
def test_matches_fla_naive_recurrence(case: str, impl: str) -> None:
  x = _inputs(case)
  ours, theirs = _jaxlin(case, impl, x), _fla(case, x)
  assert set(ours) == set(theirs) == {"o", "S", *(f"d{n}" for n in _leaves(x))}
  for name, want in theirs.items():
    got = ours[name].astype(np.float64)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < TOLERANCE, (name, error)
