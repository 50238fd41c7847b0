"""Liger (jaxlin.layers.liger), LoRA (jaxlin.layers.lora) and the Hugging Face format round trip.

The layer is checked against a float64 NumPy reference written from the paper's equations (its
own projections from the weights, the key-projection gates of Table 1, softmax feature maps,
the sliding-window softmax with RoPE), and by the invariant that shows the weights are reused
right: window weight 1, recurrent weight 0, window >= T gives the softmax layer exactly.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from safetensors.flax import load_file, save_file

from jaxlin.config import ModelConfig
from jaxlin.interop import huggingface as hf_io
from jaxlin.layers.attention import SoftmaxAttention
from jaxlin.layers.liger import LigerAttention
from jaxlin.model import LanguageModel
from jaxlin.training import optim, steps

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 2, 6
BASE = ModelConfig(vocab_size=41, d_model=D_MODEL, num_layers=2, num_heads=HEADS,
                   num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, linear_head_dim=HEAD_DIM,
                   pattern="N", mlp_hidden=32, qkv_bias=True, init_std=0.2)


# -------------------------------------------------------------------- NumPy reference
def _rope64(x: np.ndarray, theta: float = 10000.0) -> np.ndarray:
  """x [T, H, D] rotated by positions 0..T-1 (rotate-half pairing)."""
  T, _, D = x.shape
  inv = theta ** (-np.arange(0, D, 2) / D)
  a = np.arange(T)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([a, a], -1))[:, None], np.sin(np.concatenate([a, a], -1))[:, None]
  rotated = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
  return x * cos + rotated * sin


def _softmax64(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1 / (1 + np.exp(-x))


def liger_reference(x: np.ndarray, w: dict, *, gate: str, delta: bool, window: int,
                    a: float, c: float) -> np.ndarray:
  """One sequence x [T, d] through a Liger layer, float64, token by token."""
  T = x.shape[0]
  proj = lambda name: x @ w[name]["kernel"] + w[name].get("bias", 0.0)
  q = proj("q_proj").reshape(T, HEADS, HEAD_DIM)
  k = proj("k_proj").reshape(T, KV_HEADS, HEAD_DIM)
  v = proj("v_proj").reshape(T, KV_HEADS, HEAD_DIM)
  group = HEADS // KV_HEADS
  out = np.zeros((T, HEADS, HEAD_DIM))
  for h in range(HEADS):
    j = h // group                                      # the kv head of query head h
    S = np.zeros((HEAD_DIM, HEAD_DIM))
    for t in range(T):
      kt = k[t, j]
      fq, fk = _softmax64(q[t, h]), _softmax64(kt)
      if gate == "gla":
        decay = np.diag(_sigmoid(kt) ** (1 / 16))       # exp(logsigmoid(k)/16)
      elif gate == "mamba2":
        decay = np.exp(-np.log1p(np.exp(kt.mean()))) * np.eye(HEAD_DIM)
      elif gate == "hgrn2":
        decay = np.diag(_sigmoid(kt))
      else:                                             # rwkv6
        decay = np.diag(np.exp(-np.exp(kt)))
      if delta:
        fq, fk = fq / np.linalg.norm(fq), fk / np.linalg.norm(fk)
        b = _sigmoid(kt.mean())
        S = decay @ (np.eye(HEAD_DIM) - b * np.outer(fk, fk)) @ S + b * np.outer(fk, v[t, j])
      else:
        S = decay @ S + np.outer(fk, v[t, j])
      out[t, h] = c * (S.T @ fq)
  if window:
    qr, kr = _rope64(q), _rope64(k)
    for h in range(HEADS):
      j = h // group
      for t in range(T):
        s = np.arange(max(0, t - window + 1), t + 1)
        p = _softmax64(kr[s, j] @ qr[t, h] / np.sqrt(HEAD_DIM))
        out[t, h] += a * (p @ v[s, j])
  return out.reshape(T, -1) @ w["o_proj"]["kernel"]


def _layer(**kwargs) -> LigerAttention:
  return LigerAttention(D_MODEL, HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, qkv_bias=True,
                        init_std=0.4, rngs=nnx.Rngs(3), chunk_size=16, **kwargs)


def _weights(layer: nnx.Module) -> dict:
  pure = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


@pytest.mark.parametrize("gate,recurrence,window", [
    ("gla", "gla", 5), ("gla", "gla", 0), ("mamba2", "gla", 0), ("hgrn2", "gla", 0),
    ("rwkv6", "gla", 0), ("mamba2", "gated_deltanet", 4)])
def test_layer_equals_numpy_reference(gate: str, recurrence: str, window: int) -> None:
  layer = _layer(recurrence=recurrence, gate=gate, liger_window=window, window_weight=0.3,
                 recurrent_weight=0.7)
  x = np.random.RandomState(0).normal(size=(2, 19, D_MODEL))
  got = np.asarray(layer(jnp.asarray(x, jnp.float32)).y)
  for b in range(2):
    want = liger_reference(x[b], _weights(layer), gate=gate, delta=recurrence != "gla",
                           window=window, a=0.3, c=0.7)
    np.testing.assert_allclose(got[b], want, atol=2e-5, rtol=2e-4)


def test_window_branch_alone_is_the_softmax_layer() -> None:
  """Window weight 1, recurrent weight 0, window >= T: exactly the pretrained softmax layer."""
  liger = _layer(liger_window=32, window_weight=1.0, recurrent_weight=0.0)
  softmax = SoftmaxAttention(D_MODEL, HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             qkv_bias=True, rngs=nnx.Rngs(9))
  nnx.update(softmax, nnx.state(liger, nnx.Param))     # the same parameter tree
  x = jax.random.normal(jax.random.key(1), (2, 21, D_MODEL))
  segment_ids = jnp.asarray(np.repeat([[0] * 9 + [1] * 12], 2, axis=0))
  for ids in (None, segment_ids):
    np.testing.assert_array_equal(np.asarray(liger(x, segment_ids=ids).y),
                                  np.asarray(softmax(x, segment_ids=ids).y))


@pytest.mark.parametrize("recurrence,window", [("gla", 0), ("gla", 4), ("gated_deltanet", 4)])
def test_prefill_and_decode_equal_forward_with_constant_cache(recurrence: str, window: int) -> None:
  layer = _layer(recurrence=recurrence, liger_window=window)
  x = jax.random.normal(jax.random.key(2), (2, 13, D_MODEL))
  full = layer(x).y
  cache = layer.init_cache(2, max_length=1000)
  sizes = {n: a.size for n, a in cache.items()}
  out, cache = layer(x[:, :6], cache=cache)[:2]
  outs = [out]
  for t in range(6, 13):
    out, cache = layer(x[:, t:t + 1], cache=cache)[:2]
    outs.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                             atol=2e-5, rtol=2e-5)
  assert {n: a.size for n, a in cache.items()} == sizes      # nothing grew with the sequence
  assert "keys" not in cache if not window else cache["keys"].shape[1] == window


def test_packed_documents_equal_separate_sequences() -> None:
  layer = _layer(liger_window=4)
  x = jax.random.normal(jax.random.key(3), (1, 20, D_MODEL))
  ids = jnp.asarray([[0] * 7 + [1] * 13])
  packed = layer(x, segment_ids=ids).y
  np.testing.assert_allclose(np.asarray(packed[:, :7]), np.asarray(layer(x[:, :7]).y), atol=2e-5)
  np.testing.assert_allclose(np.asarray(packed[:, 7:]), np.asarray(layer(x[:, 7:]).y), atol=2e-5)


def test_bad_options_name_the_field() -> None:
  with pytest.raises(ValueError, match="liger_gate"):
    _layer(recurrence="gated_deltanet", gate="gla")      # the delta rule takes scalar gates
  with pytest.raises(ValueError, match="liger_recurrence"):
    _layer(recurrence="mamba")
  with pytest.raises(ValueError, match="lora_targets"):
    BASE.replace(lora_rank=2, lora_targets="q_proj,w_up")


# --------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  """A random all-softmax model exported in the Hugging Face format."""
  directory = str(tmp_path_factory.mktemp("hf") / "model")
  params = steps.init_params(BASE, 0)[1]
  hf_io.export(BASE, params, directory)
  return directory


def _forward(config: ModelConfig, params, tokens) -> np.ndarray:
  graphdef = steps.abstract_params(config)[0]
  return np.asarray(nnx.merge(graphdef, params)(tokens)[0])


TOKENS = jnp.asarray(np.random.RandomState(4).randint(0, 41, size=(2, 15)))


def test_export_import_round_trip_is_exact(checkpoint: str, tmp_path) -> None:
  config, params = hf_io.load_pretrained(checkpoint)
  assert config == BASE.replace(rope_scaling={})
  converted, cparams = hf_io.load_pretrained(checkpoint, mixer="liger", pattern="LN",
                                             liger_window=3, lora_rank=2)
  cparams = jax.tree_util.tree_map_with_path(   # a trained adapter: B no longer zero
      lambda p, a: a + 0.1 if "lora_b" in jax.tree_util.keystr(p) else a, cparams)
  hf_io.export(converted, cparams, str(tmp_path / "liger"), base_directory=checkpoint)
  back, bparams = hf_io.load_pretrained(str(tmp_path / "liger"))
  assert (back.mixer, back.pattern, back.liger_window, back.lora_rank) == ("liger", "LN", 3, 0)
  merged = hf_io.merged_params(converted, cparams)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), merged, bparams))
  np.testing.assert_allclose(_forward(back, bparams, TOKENS),
                             _forward(converted, cparams, TOKENS), atol=1e-5, rtol=1e-5)


def test_lora_starts_at_the_converted_model(checkpoint: str) -> None:
  plain, params = hf_io.load_pretrained(checkpoint, mixer="liger", pattern="L")
  adapted, aparams = hf_io.load_pretrained(checkpoint, mixer="liger", pattern="L", lora_rank=4,
                                           lora_targets="q_proj,k_proj,v_proj,o_proj")
  np.testing.assert_array_equal(_forward(adapted, aparams, TOKENS), _forward(plain, params, TOKENS))


def _rewrite(source: str, target: str, change) -> str:
  os.makedirs(target)
  tensors = load_file(os.path.join(source, "model.safetensors"))
  change(tensors)
  save_file(tensors, os.path.join(target, "model.safetensors"))
  with open(os.path.join(source, "config.json")) as f:
    hf = json.load(f)
  with open(os.path.join(target, "config.json"), "w") as f:
    json.dump(hf, f)
  return target


def test_bad_checkpoints_name_the_tensor(checkpoint: str, tmp_path) -> None:
  name = "model.layers.1.self_attn.k_proj.weight"
  missing = _rewrite(checkpoint, str(tmp_path / "missing"), lambda t: t.pop(name))
  with pytest.raises(hf_io.CheckpointError, match=f"missing tensor '{name}'"):
    hf_io.load_pretrained(missing)
  shaped = _rewrite(checkpoint, str(tmp_path / "shape"),
                    lambda t: t.update({name: t[name][:, :-1]}))
  with pytest.raises(hf_io.CheckpointError, match=rf"tensor '{name}': shape \(12, 23\)"):
    hf_io.load_pretrained(shaped)
  extra = _rewrite(checkpoint, str(tmp_path / "extra"),
                   lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[name]}))
  with pytest.raises(hf_io.CheckpointError, match="unexpected tensor 'model.layers.2"):
    hf_io.load_pretrained(extra)
  with pytest.raises(ValueError, match="model.d_model"):
    hf_io.load_pretrained(checkpoint, d_model=32)
  with pytest.raises(hf_io.CheckpointError, match="model_type 'gpt2'"):
    hf_io.model_config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def _flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_lora_training_changes_only_the_adapters_and_lowers_the_loss(checkpoint: str) -> None:
  """A few LoRA steps of the converted model on a repeated batch: the loss falls, only
  lora_a / lora_b leaves change; merging gives the same function."""
  config, params = hf_io.load_pretrained(checkpoint, mixer="liger", pattern="L", lora_rank=4)
  opt = optim.default_config()
  opt.update(trainable="lora", learning_rate=3e-2, warmup_steps=0, weight_decay=0.0)
  tx, schedule = optim.make_optimizer(opt, 30)
  graphdef = steps.abstract_params(config)[0]
  train_step = jax.jit(steps.make_train_step(graphdef, tx, schedule,
                                              trainable=optim.trainable_mask(opt)))
  tokens = np.random.RandomState(5).randint(0, 41, size=(4, 17))
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
           "segment_ids": jnp.zeros((4, 16), jnp.int32), "weights": jnp.ones((4, 16))}
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  # the frozen weights' gradients are not computed: fewer flops than the unmasked step
  flops = [_flops(jax.jit(steps.make_train_step(graphdef, tx, schedule, trainable=mask)),
                  state, batch) for mask in (None, optim.lora_mask)]
  assert flops[1] < 0.9 * flops[0], flops
  losses = []
  for _ in range(30):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses
  before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(state.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all(p[-1] in ("lora_a", "lora_b") for p in changed), changed
  assert {p for p in before if p[-1] == "lora_b"} <= changed
  merged = hf_io.merged_params(config, state.params)
  plain = config.replace(lora_rank=0)
  np.testing.assert_allclose(_forward(plain, merged, TOKENS), _forward(config, state.params, TOKENS),
                             atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ configs/liger.py
def _byte_bpe(path: str, vocab_size: int) -> None:
  """A byte-level BPE tokenizer.json with `<|endoftext|>`, trained on a little Shakespeare."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from jaxlin.data import shakespeare
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(shakespeare.load_works()[0].text[:20_000].split("\n\n"), trainer)
  tok.save(path)


@pytest.mark.slow  # ~30 s: a 4-step run, its checkpoint restored and exported
def test_liger_config_fine_tunes_a_checkpoint_and_exports_it(tmp_path) -> None:
  """configs/liger.py as a user runs it: init_from a Hugging Face directory (its tokenizer.json
  becomes the data tokenizer), LoRA steps change only the adapters, --mode=export writes a
  directory that re-imports to the same function."""
  from configs import liger
  from jaxlin.training import export, restore, train
  hf_dir = str(tmp_path / "hf")
  base = BASE.replace(vocab_size=300)
  hf_io.export(base, steps.init_params(base, 0)[1], hf_dir)
  _byte_bpe(os.path.join(hf_dir, "tokenizer.json"), 300)
  config = liger.get_config()
  config.init_from, config.workdir = hf_dir, str(tmp_path / "run")
  config.data.update(seq_len=32, batch_size=4)
  config.model.liger_window = 4
  config.train.num_steps = 4
  config.optimizer.warmup_steps = 1
  config.checkpoint.every_steps = 4
  config.eval.update(every_steps=4, num_batches=1)
  config.logging.update(progress=False, tensorboard=False)
  config.sample.update(num_samples=1, max_new_tokens=8)
  assert config.data.tokenizer == os.path.join(hf_dir, "tokenizer.json")
  result = train.train(config)
  assert result.final_step == 4 and np.isfinite(result.last_eval["loss"])

  run = restore.trained(config)
  converted = hf_io.load_pretrained(hf_dir, **config.model.to_dict())[1]
  before, after = traverse_util.flatten_dict(converted), traverse_util.flatten_dict(run.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all(p[-1] in ("lora_a", "lora_b") for p in changed), changed

  _, out = export.export_run(config, str(tmp_path / "exported"))
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  back, bparams = hf_io.load_pretrained(out)
  assert (back.mixer, back.liger_window, back.lora_rank) == ("liger", 4, 0)
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, 300, size=(2, 15)))
  np.testing.assert_allclose(_forward(back, bparams, tokens),
                             _forward(run.model_config, run.params, tokens), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="already holds a checkpoint"):
    export.export_run(config, out)
