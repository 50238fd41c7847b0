"""Tests of jaxlin.config.ModelConfig and jaxlin.model.LanguageModel, from the spec.

    layer_types = (pattern repeated)[:num_layers];  block i is MoE iff (i+1) % moe_every == 0
    h_{i+1} = h_i' + mlp_i(norm(h_i')),  h_i' = h_i + mixer_i(norm(h_i))
    logits  = norm(h_L) W_out (float32),  W_out = E^T when tied
    aux     = per key: sum over blocks of "*_loss", mean of metrics

Parameter counts are checked against closed forms written here from the layer
definitions (GLA: q, k, v, output-gate, output projections D x D each; gate
D -> 16 -> D with bias; per-head gated RMSNorm [D/H]; MoE: router D E and E
SwiGLU experts 3 D F; two RMSNorms [D] per block).

Legend: B batch, T time, D d_model, V vocab, H heads, L layers, E experts, k top-k,
F expert width.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxlin.config import ModelConfig
from jaxlin.layers import linear_attention
from _model_helpers import build, jitted
from jaxlin.model import LanguageModel, aux_loss, count_parameters

TINY = dict(vocab_size=32, d_model=16, num_layers=4, num_heads=2, pattern="LLN",
            linear_variant="gla", use_short_conv=True, chunk_size=16, moe_every=2,
            num_experts=4, moe_top_k=2, expert_hidden=16, num_shared_experts=1,
            moe_shared_gate=True, mlp_hidden=32, dtype="float32", init_std=0.2)
# the forward tests run MoM as the L mixer (its aux loss must reach the model's aux)
TINY_MOM = dict(TINY, mixer="mom", mom_num_memories=3, mom_top_k=2)
B, T = 2, 9


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelConfig, LanguageModel]:
  """(config, model, jitted (tokens, segment_ids) -> (logits, cache, aux)) of TINY_MOM."""
  config = ModelConfig(**TINY_MOM)
  model = build(config)
  return config, model, jitted(model, lambda m, t, s: m(t, segment_ids=s))


# ------------------------------------------------------------------------ config
def test_pattern_repeats_to_depth() -> None:
  assert ModelConfig(pattern="LN", num_layers=5).layer_types == ("L", "N", "L", "N", "L")
  assert ModelConfig(pattern="LLLN", num_layers=8).layer_types == tuple("LLLNLLLN")
  assert ModelConfig(pattern="N", num_layers=2).layer_types == ("N", "N")
  assert ModelConfig(pattern="LLLN", num_layers=3).layer_types == ("L", "L", "L")
  assert ModelConfig(num_layers=5, moe_every=2).moe_layers == (1, 3)
  assert ModelConfig(num_layers=3, moe_every=1).moe_layers == (0, 1, 2)
  assert ModelConfig(num_layers=3, moe_every=0).moe_layers == ()


@pytest.mark.parametrize("changes, match", [
    (dict(pattern="LXN"), r"pattern: got 'LXN'; expected a non-empty string over \['L', 'N'\]"),
    (dict(pattern="lln"), r"pattern: got 'lln'; expected a non-empty string over \['L', 'N'\]"),
    (dict(pattern=""), r"pattern: got ''; expected a non-empty string"),
    (dict(linear_variant="gla2"), r"linear_variant: got 'gla2'; expected one of .*'gla'"),
    (dict(mixer="rnn"), r"mixer: got 'rnn'; expected one of \('linear', 'mom', 'liger'\)"),
    (dict(mixer="mom", mom_core="rwkv7"), r"mom_core: got 'rwkv7'; expected one of \('bla', "),
    (dict(mixer="mom", mom_num_memories=2, mom_top_k=3), r"mom_top_k: got 3; expected an int in \[1, mom_num_memories=2\]"),
    (dict(d_model=30, num_heads=4), r"num_heads: got 4; expected a divisor of d_model=30"),
    (dict(num_heads=4, num_kv_heads=3), r"num_kv_heads: got 3; expected a divisor of num_heads=4: one of \[1, 2, 4\]"),
    (dict(moe_every=1, num_experts=4, moe_top_k=5), r"moe_top_k: got 5; expected an int in \[1, num_experts=4\]"),
    (dict(moe_every=1, moe_scoring="sigmoid"), r"moe_scoring: got 'sigmoid'; expected one of \('softmax_topk', 'topk_softmax'\)"),
    (dict(moe_every=1, moe_dispatch="drop"), r"moe_dispatch: got 'drop'; expected one of \('dropless', 'capacity'\)"),
    (dict(moe_every=1, moe_shared_gate=True), r"moe_shared_gate: got True; expected False without shared experts"),
    (dict(num_layers=2, moe_every=3), r"moe_every: got 3; expected 0 \(dense\) or an int in \[1, num_layers=2\]"),
    (dict(chunk_size=20), r"multiple of 16 in \[16, 256\]"),
    (dict(impl="cuda"), r"impl: got 'cuda'; expected one of \('auto', 'reference', 'xla', 'pallas'\)"),
    (dict(dtype="float64"), r"dtype: got 'float64'; expected one of "),
    (dict(feature_map="cosine"), r"feature_map: got 'cosine'; expected one of .*'elu'"),
    (dict(num_layers=0), r"num_layers: got 0; expected an int >= 1"),
    (dict(dense_init="xavier"), r"dense_init: got 'xavier'; expected one of \('normal', 'fan_in'\)"),
    (dict(pattern="N", d_model=12, num_heads=4), r"head_dim: got 3; expected an even int"),
    (dict(pattern="LLN", num_layers=3, scan_layers=True), r"scan_layers: got True; expected False for blocks of different kinds .*\('L', False\), \('N', False\)"),
    (dict(num_layers=4, moe_every=2, scan_layers=True), r"scan_layers: got True; expected False .*moe_every 0 or 1"),
])
def test_config_errors(changes: dict[str, Any], match: str) -> None:
  with pytest.raises(ValueError, match=match):
    ModelConfig(**changes)


def test_unknown_variant_lists_the_registry() -> None:
  with pytest.raises(ValueError) as info:
    ModelConfig(linear_variant="mamba3")
  for name in linear_attention.VARIANTS:
    assert repr(name) in str(info.value)


def test_from_config_dict() -> None:
  cfg = ml_collections.ConfigDict(dict(TINY, linear_options={"gate_low_rank": 8}))
  config = ModelConfig.from_config_dict(cfg)
  assert config == ModelConfig(**TINY, linear_options={"gate_low_rank": 8})
  assert config.linear_options == {"gate_low_rank": 8}
  hash(config)  # usable as a static jit argument
  preset = ModelConfig.from_config_dict(ml_collections.ConfigDict(
      {"preset": "A0.3B-2B", "num_layers": 2}))
  assert (preset.d_model, preset.num_layers, preset.num_experts, preset.vocab_size) == (
      1024, 2, 64, 151936)
  with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['d_modle'\]"):
    ModelConfig.from_config_dict(ml_collections.ConfigDict({"d_modle": 8}))
  with pytest.raises(ValueError, match=r"preset: got 'B7'; expected one of"):
    ModelConfig.preset("B7")


def test_compute_dtype() -> None:
  expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  assert ModelConfig().compute_dtype() == expected
  assert ModelConfig(dtype="bfloat16").compute_dtype() == jnp.bfloat16
  assert ModelConfig().parameter_dtype() == jnp.float32


# ------------------------------------------------------------------------- model
def _manual_forward(model: LanguageModel, tokens: jax.Array) -> tuple[jax.Array, list]:
  """The spec's composition, written out: embed -> blocks -> norm -> head; per-block aux."""
  h = model.embedding[...][tokens]
  auxes = []
  for block in model.blocks:
    out = block.mixer(block.mixer_norm(h))
    h = h + out.y
    y, mlp_aux = block.mlp(block.mlp_norm(h))
    h = h + y
    auxes.append((out.aux, mlp_aux))
  return model.final_norm(h) @ model.head[...], auxes


def test_forward_shapes_aux_and_composition(tiny: tuple) -> None:
  config, model, run = tiny
  assert [b.layer_type for b in model.blocks] == ["L", "L", "N", "L"]
  assert [type(b.mixer).__name__ for b in model.blocks] == [
      "MixtureOfMemories", "MixtureOfMemories", "SoftmaxAttention", "MixtureOfMemories"]
  assert [type(b.mlp).__name__ for b in model.blocks] == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
  logits, cache, aux = run(tokens, jnp.ones((B, T), jnp.int32))  # one document = no ids
  manual_logits, auxes = jitted(model, _manual_forward)(tokens)
  assert logits.shape == (B, T, config.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  assert np.all(np.isfinite(np.asarray(logits)))
  np.testing.assert_allclose(logits, manual_logits, rtol=1e-5, atol=1e-5)
  assert sorted(aux) == ["mixer/mom_load_balance_loss", "mlp/moe_load_balance_loss",
                         "mlp/moe_z_loss"]
  expected = {"mixer/mom_load_balance_loss": [auxes[i][0]["mom_load_balance_loss"]
                                              for i in (0, 1, 3)],
              "mlp/moe_load_balance_loss": [auxes[i][1]["moe_load_balance_loss"] for i in (1, 3)],
              "mlp/moe_z_loss": [auxes[i][1]["moe_z_loss"] for i in (1, 3)]}
  for key, per_layer in expected.items():
    assert all(float(v) > 0 for v in per_layer)
    np.testing.assert_allclose(aux[key], sum(float(v) for v in per_layer), rtol=1e-6)
  np.testing.assert_allclose(aux_loss(aux), sum(float(v) for v in aux.values()), rtol=1e-6)


def test_causal_and_documents_do_not_leak(tiny: tuple) -> None:
  """Logits at t < 5 ignore tokens >= 5; with segment ids, document 2 ignores document 1."""
  config, _, run_all = tiny
  run = lambda t, s: run_all(t, s)[0]
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, config.vocab_size)
  changed = tokens.at[:, 5:].set((tokens[:, 5:] + 7) % config.vocab_size)
  one_doc = jnp.ones((B, T), jnp.int32)
  base, other = np.asarray(run(tokens, one_doc)), np.asarray(run(changed, one_doc))
  np.testing.assert_allclose(other[:, :5], base[:, :5], rtol=1e-5, atol=2e-5)  # f32 rounding
  assert np.max(np.abs(other[:, 5:] - base[:, 5:])) > 1e-3  # the future does matter there

  docs = jnp.asarray([[1] * 4 + [2] * 5] * B, jnp.int32)
  first_changed = tokens.at[:, :4].set((tokens[:, :4] + 3) % config.vocab_size)
  a, b = np.asarray(run(tokens, docs)), np.asarray(run(first_changed, docs))
  np.testing.assert_allclose(b[:, 4:], a[:, 4:], rtol=1e-5, atol=2e-5)
  assert np.max(np.abs(b[:, :4] - a[:, :4])) > 1e-3


@pytest.mark.slow   # CI step 2
def test_remat_same_loss_and_grads() -> None:
  # one softmax + MoE block keeps the two gradient compiles cheap on CPU
  config = ModelConfig(**dict(TINY, num_layers=1, pattern="N", moe_every=1))
  tokens = jax.random.randint(jax.random.key(3), (B, T), 0, config.vocab_size)

  def loss(model: LanguageModel) -> jax.Array:
    logits, _, aux = model(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux_loss(aux)

  results = []
  for remat in (False, True):
    model = build(config.replace(remat=remat))
    results.append(jitted(model, lambda m: nnx.value_and_grad(loss)(m))())
  (v0, g0), (v1, g1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1) > 10
  assert any(np.max(np.abs(np.asarray(g))) > 0 for g in flat0)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("changes", [
    dict(mixer="linear", moe_every=1, shared_expert_hidden=None, remat=True),   # GLA + MoE
    dict(mixer="mom", moe_every=0, remat=False),                           # MoM + SwiGLU
], ids=["gla_moe_remat", "mom"])
def test_scan_layers_same_logits_aux_and_grads(changes: dict) -> None:
  # the scan over stacked blocks is the loop's math: logits, every aux entry and the
  # gradient of every parameter (packed documents, so segment ids reach every block)
  config = ModelConfig(**dict(TINY_MOM, pattern="L", num_layers=3, **changes))
  tokens = jax.random.randint(jax.random.key(5), (B, T), 0, config.vocab_size)
  segments = jnp.array([[1] * 5 + [2] * 4, [1] * 9])

  def loss(model: LanguageModel) -> tuple[jax.Array, tuple]:
    logits, _, aux = model(tokens, segment_ids=segments)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux_loss(aux), (logits, aux)

  model = build(config)
  # the scanned forward is one scan over the 3 blocks at the top of the jaxpr; the loop has none
  for scan, count in ((False, 0), (True, 1)):
    graphdef = nnx.graphdef(build(config.replace(scan_layers=scan)))
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, segment_ids=segments)[0])(
        nnx.state(model))
    assert sum(e.primitive.name == "scan" and e.params["length"] == 3
               for e in jaxpr.jaxpr.eqns) == count, scan
  results = []
  for scan in (False, True):
    scanned = nnx.merge(nnx.graphdef(build(config.replace(scan_layers=scan))), nnx.state(model))
    results.append(jitted(scanned, lambda m: nnx.value_and_grad(loss, has_aux=True)(m))())
  ((v0, (y0, aux0)), g0), ((v1, (y1, aux1)), g1) = results
  # float32 reassociation only (the scan body fuses differently): a few ulps of |y| ~ 3
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  assert sorted(aux1) == sorted(aux0) and any(k.endswith("_loss") for k in aux0)
  for key in aux0:
    np.testing.assert_allclose(aux1[key], aux0[key], rtol=1e-5, atol=1e-7)
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1) > 20
  for a, b in zip(flat0, flat1):   # reassociation again: relative to each array's scale
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.max(np.abs(a)))
  for i in range(3):   # every block's weights get a gradient through the scan
    assert max(np.max(np.abs(np.asarray(g))) for g in jax.tree.leaves(g1["blocks"][i])) > 0


def test_scan_layers_needs_identical_blocks() -> None:
  # Lightning's decay depends on the layer's depth: same kinds, different static attributes
  for mixer in (dict(linear_variant="lightning"), dict(mixer="mom", mom_core="lightning")):
    with pytest.raises(ValueError, match="scan_layers: got True; expected False with the "
                       "'lightning' gate: its constants depend on the layer's depth"):
      ModelConfig(**dict(TINY, pattern="L", num_layers=2, moe_every=0, scan_layers=True,
                         **mixer))


# ----------------------------------------------------------------- parameter counts
def _gla_moe_counts(vocab: int, d: int, heads: int, layers: int, experts: int, top_k: int,
                    ffn: int, tied: bool) -> tuple[int, int, int, int]:
  """(total, active, total w/o embeddings, active w/o embeddings) in closed form."""
  mixer = 5 * d * d + (d * 16 + 16 * d + d) + d // heads  # q k v g o; gate; per-head norm
  routed = experts * 3 * d * ffn
  block = mixer + 2 * d + d * experts + routed
  body = layers * block + d                                 # + final norm
  emb = vocab * d * (1 if tied else 2)
  inactive = layers * (experts - top_k) * 3 * d * ffn
  return body + emb, body + emb - inactive, body, body - inactive


@pytest.mark.parametrize("name, dims", [
    ("A0.3B-2B", dict(d=1024, heads=8, layers=12, ffn=896)),
    ("A1B-7B", dict(d=2048, heads=16, layers=16, ffn=1024)),
])
def test_paper_parameter_counts(name: str, dims: dict[str, int]) -> None:
  config = ModelConfig.preset(name)
  assert (config.linear_variant, config.moe_layers) == ("gla", tuple(range(dims["layers"])))
  expected = _gla_moe_counts(151936, experts=64, top_k=8, tied=False, **dims)
  full = count_parameters(config)
  body = count_parameters(config, include_embeddings=False)
  assert (full.total, full.active, body.total, body.active) == expected
  # the paper's names count non-embedding parameters: ~2B / ~0.3B and ~7B / ~1B
  billions = [round(x / 1e9, 1) for x in (body.total, body.active)]
  assert billions == ([2.2, 0.3] if name == "A0.3B-2B" else [6.8, 1.1])


def test_tied_vs_untied_counts() -> None:
  untied = ModelConfig(**dict(TINY, tie_embeddings=False))
  tied = untied.replace(tie_embeddings=True)
  cu, ct = count_parameters(untied), count_parameters(tied)
  assert cu.total - ct.total == TINY["vocab_size"] * TINY["d_model"]
  assert cu.total - cu.active == ct.total - ct.active == 2 * (4 - 2) * 3 * 16 * 16
  assert count_parameters(tied, include_embeddings=False) == count_parameters(
      untied, include_embeddings=False)
  model = nnx.eval_shape(lambda: LanguageModel(tied, rngs=nnx.Rngs(0)))
  assert model.head is None


def test_tiny_hybrid_count_closed_form() -> None:
  """L L N L blocks, MoE in blocks 1 and 3 (with a gated shared expert), untied head."""
  v, d, h, e, k, f_moe, f_dense = 32, 16, 2, 4, 2, 16, 32
  gla = 5 * d * d + (d * 16 + 16 * d + d) + d // h + 4 * 3 * d   # + conv 4 x (q, k, v)
  softmax = 4 * d * d                                              # q, k, v, o
  dense = 3 * d * f_dense
  moe = d * e + e * 3 * d * f_moe + 3 * d * f_moe + d              # + shared + its gate
  body = (gla + dense) + (gla + moe) + (softmax + dense) + (gla + moe) + 4 * 2 * d + d
  total = body + 2 * v * d
  inactive = 2 * (e - k) * 3 * d * f_moe
  assert tuple(count_parameters(ModelConfig(**TINY))) == (total, total - inactive)
