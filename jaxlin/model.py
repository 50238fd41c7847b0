"""`LanguageModel`: embedding -> hybrid pre-norm blocks -> final norm -> head.

For tokens t [B, T], with h_0 = E[t] (embedding rows) and block i = 0..L-1:

    a_i      = mixer_i(RMSNorm(h_i))             linear / MoM ("L") or softmax ("N")
    h_i'     = h_i + a_i
    h_{i+1}  = h_i' + mlp_i(RMSNorm(h_i'))       dense SwiGLU or MoE (config.moe_every)
    logits   = RMSNorm(h_L) W_out                W_out = E^T when tie_embeddings

The logits are float32 (matmul inputs in the compute dtype, float32
accumulation). `aux` gathers the blocks' aux dicts (jaxlin.layers.base): each
key is prefixed "mixer/" or "mlp/"; keys ending in "_loss" are summed over the
blocks (already weighted: add them to the training loss, `aux_loss(aux)` does),
the other keys (metrics) are averaged over the blocks that report them.

Decoding: `init_cache(B, max_length)` gives one cache per block,
{"layer_<i>": mixer cache}; `model(tokens, cache=cache)` continues the sequence
(prefill with the prompt, then one token at a time) and returns the new cache.

Legend: B batch, T time, D d_model, V vocab_size, L num_layers.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlin import parallel
from jaxlin.config import ModelConfig
from jaxlin.layers.attention import SoftmaxAttention
from jaxlin.layers.base import Aux, Cache, ParamCounts
from jaxlin.layers.initializers import dense_initializer
from jaxlin.layers.liger import LigerAttention
from jaxlin.layers.linear_attention import LinearAttention
from jaxlin.layers.mlp import SwiGLU
from jaxlin.layers.moe import MoE
from jaxlin.layers.mom import MixtureOfMemories
from jaxlin.layers.norm import RMSNorm

f32 = jnp.float32


# ---------------------------------------------------------------- layer factories
def build_token_mixer(config: ModelConfig, index: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The token mixer of block `index`: linear attention / MoM for "L", softmax for "N"."""
  dtypes = dict(dtype=config.compute_dtype(), param_dtype=config.parameter_dtype())
  attention = dict(num_kv_heads=config.resolved_num_kv_heads, head_dim=config.resolved_head_dim,
                   rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
                   qk_norm=config.qk_norm, impl=config.attention_impl, qkv_bias=config.qkv_bias,
                   out_bias=config.out_bias, lora=config.lora_spec(), init_std=config.init_std,
                   rngs=rngs, **dtypes)
  if config.layer_types[index] == "N":
    return SoftmaxAttention(config.d_model, config.num_heads, window=config.window, **attention)
  if config.mixer == "liger":
    return LigerAttention(
        config.d_model, config.num_heads, recurrence=config.liger_recurrence,
        gate=config.liger_gate, liger_window=config.liger_window,
        window_weight=config.liger_window_weight,
        recurrent_weight=config.liger_recurrent_weight, chunk_size=config.chunk_size,
        recurrent_impl=config.impl, **attention)
  if config.mixer == "mom":
    return MixtureOfMemories(
        config.d_model, config.num_heads, core=config.mom_core,
        num_memories=config.mom_num_memories, top_k=config.mom_top_k,
        shared_memory=config.mom_shared_memory, aux_loss_coef=config.mom_aux_coef,
        head_dim=config.linear_head_dim,
        use_short_conv=True if config.use_short_conv is None else config.use_short_conv,
        conv_size=config.conv_size, chunk_size=config.chunk_size, impl=config.impl,
        init_std=config.init_std, layer_index=index, num_layers=config.num_layers,
        rope_theta=config.rope_theta, rngs=rngs, **dtypes, **config.mom_options)
  # LinearAttention initialises its projections itself (nnx.Linear defaults)
  return LinearAttention(
      config.d_model, config.num_heads, variant=config.linear_variant,
      head_dim=config.linear_head_dim, feature_map=config.feature_map,
      use_short_conv=config.use_short_conv, conv_size=config.conv_size,
      chunk_size=config.chunk_size, impl=config.impl, layer_index=index,
      num_layers=config.num_layers, rngs=rngs, **dtypes, **config.linear_options)


def build_channel_mixer(config: ModelConfig, index: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The channel mixer of block `index`: MoE when config.is_moe_layer(index), else SwiGLU."""
  common = dict(dtype=config.compute_dtype(), param_dtype=config.parameter_dtype(),
                rngs=rngs, init_std=config.init_std, dense_init=config.dense_init)
  if config.is_moe_layer(index):
    return MoE(
        config.d_model, num_experts=config.num_experts, top_k=config.moe_top_k,
        expert_hidden_dim=config.resolved_expert_hidden, scoring=config.moe_scoring,
        num_shared_experts=config.num_shared_experts,
        shared_hidden_dim=config.resolved_shared_expert_hidden,
        shared_gate=config.moe_shared_gate, aux_loss_coef=config.moe_aux_coef,
        z_loss_coef=config.moe_z_coef, dispatch=config.moe_dispatch,
        capacity_factor=config.moe_capacity_factor, **common, **config.moe_options)
  return SwiGLU(config.d_model, config.resolved_mlp_hidden, **common)


# ------------------------------------------------------------------------ modules
class Block(nnx.Module):
  """Pre-norm residual block: h += mixer(norm(h)); h += mlp(norm(h))."""

  def __init__(self, config: ModelConfig, index: int, *, rngs: nnx.Rngs) -> None:
    self.layer_type = config.layer_types[index]
    self.is_moe = config.is_moe_layer(index)
    pdt = config.parameter_dtype()
    self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=pdt)
    self.mixer = build_token_mixer(config, index, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=pdt)
    self.mlp = build_channel_mixer(config, index, rngs=rngs)

  def __call__(self, h: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> tuple[jax.Array, Cache | None, Aux]:
    """h [B, T, D] -> (h' [B, T, D], the mixer's new cache or None, aux)."""
    out = self.mixer(self.mixer_norm(h), segment_ids=segment_ids, cache=cache)
    h = h + out.y.astype(h.dtype)
    y, mlp_aux = self.mlp(self.mlp_norm(h))
    h = h + y.astype(h.dtype)
    aux = {f"mixer/{k}": v for k, v in out.aux.items()}
    aux.update({f"mlp/{k}": v for k, v in mlp_aux.items()})
    return h, out.cache, aux


def _block_forward(block: Block, h: jax.Array,
                   segment_ids: jax.Array | None) -> tuple[jax.Array, Aux]:
  """A block's full-sequence forward (no cache); the function nnx.remat wraps."""
  h, _, aux = block(h, segment_ids=segment_ids)
  return h, aux


_block_forward_remat = nnx.remat(_block_forward)


def _scan_blocks(blocks: list[Block], h: jax.Array, segment_ids: jax.Array | None,
                 remat: bool) -> tuple[jax.Array, list[Aux]]:
  """The blocks' full-sequence forward as one `lax.scan` over their stacked weights
  (ModelConfig.scan_layers): h_{i+1} = block(W_i, h_i). The same math as the loop; one
  block's gathered (FSDP) weights and temporaries live at a time, and with remat the
  backward recomputes one block per scan step. The blocks must be identical modules."""
  graphdefs, states, others = zip(*(nnx.split(block, nnx.Param, ...) for block in blocks))
  for i, graphdef in enumerate(graphdefs[1:], start=1):
    if graphdef != graphdefs[0]:
      raise ValueError(
          f"scan_layers: got True, but block {i} differs from block 0 in a static attribute "
          "(e.g. Lightning's per-layer decay); expected identical blocks, or scan_layers=False")
  extra = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(others)]
  if extra:   # state a block would update (rng counts, statistics) is not carried by the scan
    raise ValueError(f"scan_layers: got True, but the blocks hold non-parameter state {extra[:4]}"
                     "; expected parameters only, or scan_layers=False")
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

  def step(h: jax.Array, state: nnx.State) -> tuple[jax.Array, Aux]:
    h, aux = _block_forward(nnx.merge(graphdefs[0], state, others[0]), h, segment_ids)
    return parallel.constrain(h, "batch", "length", None), aux

  # prevent_cse=False: the scan already keeps the recomputation apart (jax.checkpoint's docs)
  h, aux = jax.lax.scan(jax.checkpoint(step, prevent_cse=False) if remat else step, h, stacked)
  return h, [jax.tree.map(lambda a, i=i: a[i], aux) for i in range(len(blocks))]


def _gather_aux(per_block: list[Aux]) -> Aux:
  """Sum the "*_loss" keys over blocks, average the other keys over reporting blocks."""
  grouped: dict[str, list[jax.Array]] = {}
  for aux in per_block:
    for key, value in aux.items():
      grouped.setdefault(key, []).append(jnp.asarray(value, f32))
  return {key: (sum(vals) if key.endswith("_loss") else sum(vals) / len(vals))
          for key, vals in grouped.items()}


def aux_loss(aux: Aux) -> jax.Array:
  """The total auxiliary loss: sum of the aux entries whose key ends in "_loss"."""
  return sum((jnp.asarray(v, f32) for k, v in aux.items() if k.endswith("_loss")),
             jnp.zeros((), f32))


class LanguageModel(nnx.Module):
  """Hybrid linear / softmax language model (see the module docstring for the math).

  Parameters: embedding [V, D] ~ N(0, init_std^2); blocks; final RMSNorm [D];
  head [D, V] initialised by config.dense_init (N(0, init_std^2) or U(+-D^-1/2)) unless
  tie_embeddings (logits = h E^T).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
    self.config = config
    self.dtype = config.compute_dtype()
    pdt = config.parameter_dtype()
    init = jax.nn.initializers.normal(config.init_std)
    self.embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.d_model), pdt))
    self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=pdt)
    head_init = dense_initializer(config.dense_init, config.init_std)
    self.head = (None if config.tie_embeddings else
                 nnx.Param(head_init(rngs.params(), (config.d_model, config.vocab_size), pdt)))

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Empty decoding cache for `batch_size` rows of up to `max_length` tokens."""
    return {f"layer_{i}": block.mixer.init_cache(batch_size, max_length)
            for i, block in enumerate(self.blocks)}

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> tuple[jax.Array, Cache | None, Aux]:
    """tokens [B, T] int -> (logits [B, T, V] float32, new cache or None, aux)."""
    h, new_cache, aux = self.features(tokens, segment_ids=segment_ids, cache=cache)
    return self.logits(h, self.head_matrix()), new_cache, aux

  def head_matrix(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (E^T when tied)."""
    return (self.embedding[...].T if self.head is None else self.head[...]).astype(self.dtype)

  @staticmethod
  def logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """logits = h head, float32 [..., V] (a static method: a loss can call it per chunk)."""
    logits = jnp.matmul(h.astype(head.dtype), head, preferred_element_type=f32)
    return parallel.constrain(logits, *("batch", "length", "vocab")[-logits.ndim:])

  def features(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: Cache | None = None) -> tuple[jax.Array, Cache | None, Aux]:
    """tokens [B, T] int -> (final-normed hidden states [B, T, D], new cache or None, aux)."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens: got shape {tuple(tokens.shape)}; expected [B, T]")
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids with a cache: a cache holds one sequence per row")
    if cache is not None and set(cache) != {f"layer_{i}" for i in range(len(self.blocks))}:
      raise ValueError(f"cache has keys {sorted(cache)}; expected layer_0..layer_"
                       f"{len(self.blocks) - 1} (from LanguageModel.init_cache)")
    h = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]
    h = parallel.constrain(h, "batch", "length", None)   # no-op without a mesh context
    if cache is None and self.config.scan_layers:
      h, per_block = _scan_blocks(list(self.blocks), h, segment_ids, self.config.remat)
      return self.final_norm(h), None, _gather_aux(per_block)
    per_block: list[Aux] = []
    new_cache: Cache | None = None if cache is None else {}
    for i, block in enumerate(self.blocks):
      if cache is not None:
        h, new_cache[f"layer_{i}"], aux = block(h, cache=cache[f"layer_{i}"])
      elif self.config.remat:
        h, aux = _block_forward_remat(block, h, segment_ids)
      else:
        h, aux = _block_forward(block, h, segment_ids)
      h = parallel.constrain(h, "batch", "length", None)
      per_block.append(aux)
    return self.final_norm(h), new_cache, _gather_aux(per_block)


# --------------------------------------------------------------- parameter counts
def count_parameters(config: ModelConfig, *, include_embeddings: bool = True) -> ParamCounts:
  """(total, active) parameter counts from shapes only (`nnx.eval_shape`, no allocation).

      active = total - sum over MoE blocks of (E - k) / E * |routed expert weights|

  (router and shared experts count as active). include_embeddings=False leaves
  out the embedding and an untied head, the convention of the paper names
  (A0.3B-2B: ~0.3B active of ~2B non-embedding parameters).
  """
  model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  total = size(nnx.state(model, nnx.Param))
  if not include_embeddings:
    total -= size(model.embedding) + (0 if model.head is None else size(model.head))
  inactive = 0
  for block in model.blocks:
    if block.is_moe:
      moe = block.mlp
      routed = size([moe.w_gate, moe.w_up, moe.w_down])
      inactive += routed // moe.num_experts * (moe.num_experts - moe.top_k)
  return ParamCounts(total=total, active=total - inactive)


PAPER_PRESETS = ("A0.3B-2B", "A1B-7B")


def print_parameter_table() -> None:
  """Prints the parameter counts of the paper presets (shapes only, nothing allocated)."""
  print("preset     | total          | active         | total w/o emb. | active w/o emb.")
  for name in PAPER_PRESETS:
    config = ModelConfig.preset(name)
    full, body = count_parameters(config), count_parameters(config, include_embeddings=False)
    cells = [f"{n:,} ({n / 1e9:.2f}B)" for n in (*full, *body)]
    print(f"{name:10s} | " + " | ".join(cells))

